"""What Tables 4, 5 and 6 share: a list of rows, some of them Table 2's runs, one seed, and the paper's column."""
from common import markdown_table, write_report
from lm import setup


def write_ablation(doc: str, name: str, title: str, rows, header: str):
    """rows(scale) -> [(label, Run, paper valid PPL)]; trains what is missing, writes OUT/<name>.md."""
    repro = setup(doc)
    rows = rows(repro.scale)
    results = repro.results([run for _, run, _ in rows])
    body = [[label, f"{r['valid_ppl']:.2f}", f"{r['test_ppl']:.2f}", paper, run.note]
            for (label, run, paper), r in zip(rows, results)]
    table = markdown_table([header, "Valid PPL", "Test PPL", "paper valid PPL", "note"], body)
    write_report(f"{repro.out}/{name}.md", f"# {title} at CPU scale (seed 1)\n\n{repro.scale.describe()}.\n\n{table}")

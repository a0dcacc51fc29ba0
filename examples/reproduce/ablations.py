"""What Tables 4, 5 and 6 share: a list of rows, some of them Table 2's runs, one seed, and the paper's column."""
from common import human, markdown_table, write_report
from lm import setup


def write_ablation(doc: str, name: str, title: str, rows, header: str):
    """rows(scale) -> [(label, Run, paper valid PPL)]; trains what is missing, writes OUT/<name>.md."""
    repro = setup(doc)
    rows = rows(repro.scale)
    results = repro.results([run for _, run, _ in rows])
    body = [[label, f"{r['valid_ppl']:.2f}", f"{r['test_ppl']:.2f}", paper, run.note]
            for (label, run, paper), r in zip(rows, results)]
    columns = [header, "Valid PPL", "Test PPL", "paper valid PPL", "note"]
    if any(r.get("freeze") for r in results):  # long mode: what each frozen routing froze (lm.freeze_report)
        columns += ["router params", "router agreement at the freeze", "frozen load max/mean (valid)"]
        for row, r in zip(body, results):
            f = r.get("freeze")
            row += [human(r.get("router_params", 0)),f"{100 * f['agreement']:.1f} % (update {f['agreement_update']})" if f and f["agreement"]
                    is not None else "–", f"{f['valid_load_max_mean']:.2f}" if f else "–"]
    table = markdown_table(columns, body)
    write_report(f"{repro.out}/{name}.md", f"# {title} at CPU scale (seed 1)\n\n{repro.scale.describe()}.\n\n{table}")

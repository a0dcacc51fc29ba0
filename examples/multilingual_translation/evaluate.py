"""Translate each language's test set with fairseq-generate and score it with sacrebleu; write a BLEU table.

For every X in --langs and each direction asked for (X->en, en->X), this runs fairseq-generate (in this process,
same options as the CLI) on the binarised test set, takes the detokenised hypotheses (sentencepiece pieces
joined back into text by --post-process sentencepiece), and scores them against the raw reference text with
sacrebleu's default 13a tokenisation. The table has one column per language and the plain average, as the
paper's Table 3.
"""
import argparse
import re
import time
from pathlib import Path

from sacrebleu.metrics import BLEU
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import generate

PLUGIN = str(Path(__file__).resolve().parents[2] / "fairseq_stablemoe")


def translate(prep, checkpoint, src, tgt, out_dir, extra):
    """fairseq-generate for one direction; returns the hypotheses in test-set order."""
    argv = [str(prep / "bin"), "--user-dir", PLUGIN, "--task", "stablemoe_translation_multi_simple_epoch",
            "--path", str(checkpoint), "--langs", ",".join((prep / "langs.txt").read_text().split()),
            "--lang-pairs", ",".join((prep / "lang_pairs.txt").read_text().split()),
            "--encoder-langtok", "src", "--decoder-langtok", "-s", src, "-t", tgt, "--gen-subset", "test",
            "--post-process", "sentencepiece", "--results-path", str(out_dir / f"{src}-{tgt}"),
            # with batches rounded to a multiple of 8, this task silently drops the last, short batch
            "--required-batch-size-multiple", "1", *extra]
    parser = options.get_generation_parser()
    generate.main(convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv)))
    hyps = {}
    for line in (out_dir / f"{src}-{tgt}" / "generate-test.txt").read_text(encoding="utf-8").split("\n"):
        m = re.match(r"D-(\d+)\t[^\t]*\t(.*)$", line)
        if m:
            hyps[int(m.group(1))] = m.group(2)
    return hyps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", required=True, type=Path, help="the --out folder of prepare.py")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="folder for the hypotheses and the table")
    p.add_argument("--name", default="model", help="the model's row name in the table")
    p.add_argument("--langs", default="", help="comma-separated X languages (default: all of prepare.py's)")
    p.add_argument("--directions", default="x2en,en2x", help="x2en, en2x or both")
    p.add_argument("generate_args", nargs=argparse.REMAINDER,
                   help="after --: more fairseq-generate options, e.g. -- --beam 4 --batch-size 64 --cpu")
    args = p.parse_args()
    extra = [a for a in args.generate_args if a != "--"]

    langs = args.langs.split(",") if args.langs else (args.prep / "langs.txt").read_text().split()[:-1]
    args.out.mkdir(parents=True, exist_ok=True)
    table, bleu = [], BLEU()  # sacrebleu.corpus_bleu's defaults; its signature names them
    for direction in args.directions.split(","):
        scores = {}
        for lang in langs:
            src, tgt = (lang, "en") if direction == "x2en" else ("en", lang)
            start = time.time()
            hyps = translate(args.prep, args.checkpoint, src, tgt, args.out, extra)
            refs = (args.prep / "raw" / f"{lang}-en" / f"test.{tgt}").read_text(encoding="utf-8").split("\n")[:-1]
            if len(hyps) != len(refs):
                raise SystemExit(f"{src}->{tgt}: {len(hyps)} hypotheses for {len(refs)} references")
            scores[lang] = bleu.corpus_score([hyps[i] for i in range(len(refs))], [refs]).score
            print(f"{args.name} {src}->{tgt}: BLEU {scores[lang]:.2f} ({len(refs)} sentences, "
                  f"{time.time() - start:.0f} s)", flush=True)
        label = "X→En" if direction == "x2en" else "En→X"
        table.append((label, scores))

    text = bleu_markdown(table, args.name, str(bleu.get_signature()))
    (args.out / "bleu.md").write_text(text, encoding="utf-8")
    print(text, end="")


def bleu_markdown(table, name: str, signature: str) -> str:
    """bleu.md: per direction a table (one column per language, and the average), then the sacreBLEU signature;
    it ends with a newline, so that files printed one after another (`cat */bleu.md`) do not run together."""
    lines = []
    for label, scores in table:
        lines += [f"| {label} | " + " | ".join(scores) + " | Avg |",
                  "|---" * (len(scores) + 2) + "|",
                  f"| {name} | " + " | ".join(f"{s:.2f}" for s in scores.values())
                  + f" | {sum(scores.values()) / len(scores):.2f} |", ""]
    lines.append(f"sacreBLEU signature: `{signature}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Paper Table 3 at CPU scale: X→En BLEU of the dense, FLOP-matched dense and MoE translation models.

    python examples/reproduce/table3.py [--quick] [--data ../shared/data/mt] [--out results/reproduce]

One multilingual model per row, trained on the nine X↔En pairs of the paper (both directions, temperature
sampling T=5) with examples/multilingual_translation/prepare.py's data, then examples/multilingual_translation/
evaluate.py translates each X→En test set (beam 4) and scores it with sacreBLEU. Writes OUT/{full,quick}/table3.md.
"""
import os
import re
import sys
from dataclasses import dataclass
from typing import Tuple

from common import PLUGIN, SHARED, cached, fairseq_cli, markdown_table, out_dir, parser, run_all, run_logged, \
    slug, threads_per_job, write_report

MT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multilingual_translation")
LANGS = ("de", "ro", "fr", "cs", "et", "hi", "tr", "fi", "lv")  # the paper's column order
PAPER = {  # X→En BLEU per language, average
    "Standard Transformer": (39.8, 36.0, 32.5, 29.1, 27.2, 24.5, 23.6, 21.8, 20.3, 28.31),
    "Larger Transformer": (40.6, 36.9, 33.7, 29.8, 27.8, 25.4, 24.6, 22.2, 20.9, 29.10),
    "Switch Transformer": (42.3, 37.1, 33.8, 31.0, 28.6, 26.0, 24.3, 23.0, 21.2, 29.70),
    "BASE Layer": (42.6, 37.8, 34.2, 31.0, 29.0, 26.9, 25.1, 23.2, 21.6, 30.16),
    "Hash Layer": (42.7, 37.0, 34.6, 31.3, 28.7, 26.5, 23.9, 23.1, 21.7, 29.94),
    "StableMoE": (43.0, 37.4, 34.7, 31.5, 29.3, 26.8, 24.7, 23.6, 21.9, 30.32),
}


@dataclass(frozen=True)
class MTScale:
    langs: Tuple[str, ...]
    train_lines: int  # per pair
    eval_lines: int
    vocab: int
    updates: int
    max_tokens: int
    beam: int

    def describe(self) -> str:
        return (f"{len(self.langs)} languages × {self.train_lines} training pairs each (X→En and En→X), "
                f"{self.eval_lines} test pairs per language; sentencepiece {self.vocab} joined; 2+2 blocks of "
                f"64/256 (4 heads), MoE: one layer of 8 experts × 2 sublayers after block 1 of each stack; "
                f"{self.max_tokens} tokens per batch, {self.updates} updates (StableMoE stage 1: 10 %), Adam "
                f"(0.9, 0.98), lr 2e-3 inverse-sqrt, clip 0.1, dropout 0.1, label smoothing 0.1; beam {self.beam}")


FULL = MTScale(langs=LANGS, train_lines=3000, eval_lines=100, vocab=4000, updates=200, max_tokens=2000, beam=4)
QUICK = MTScale(langs=("xx", "yy"), train_lines=200, eval_lines=10, vocab=100, updates=10, max_tokens=400, beam=1)

SHAPE = ["--encoder-embed-dim", 64, "--decoder-embed-dim", 64, "--encoder-ffn-embed-dim", 256,
         "--decoder-ffn-embed-dim", 256, "--encoder-layers", 2, "--decoder-layers", 2,
         "--encoder-attention-heads", 4, "--decoder-attention-heads", 4, "--dropout", 0.1, "--attention-dropout", 0]


def moe(routing: str):
    return ["--user-dir", PLUGIN, "--task", "stablemoe_translation_multi_simple_epoch", "--arch",
            "stablemoe_transformer_tiny", "--criterion", "stablemoe_label_smoothed_cross_entropy",
            "--moe-routing", routing]


ROWS = {
    "Standard Transformer": ["--task", "translation_multi_simple_epoch", "--arch", "transformer",
                             "--criterion", "label_smoothed_cross_entropy"],
    "Larger Transformer": moe("dense"),  # one dense expert per MoE layer: the MoE models' FLOPs (paper §2.3)
    "Switch Transformer": moe("switch"),
    "BASE Layer": moe("base"),
    "Hash Layer": moe("hash"),
    "StableMoE": moe("stablemoe"),
}


def prepare(args, scale, out) -> str:
    prep = os.path.join(out, "mt-data")

    def build():
        run_logged([sys.executable, os.path.join(MT, "prepare.py"), "--corpus", args.data, "--out", prep,
                    "--langs", ",".join(scale.langs), "--vocab-size", scale.vocab, "--train-lines",
                    scale.train_lines, "--valid-lines", scale.eval_lines, "--test-lines", scale.eval_lines],
                   os.path.join(out, "mt-prepare.log"), threads=2)
        return {"langs": list(scale.langs)}

    cached(os.path.join(out, "mt-data.json"), build)
    return prep


def train_and_score(name, flags, args, scale, prep, folder, threads):
    langs = open(os.path.join(prep, "langs.txt")).read().split()
    pairs = open(os.path.join(prep, "lang_pairs.txt")).read().split()
    stage1 = ["--stage1-updates", max(1, scale.updates // 10)] if "stablemoe" in flags else []
    log = run_logged(fairseq_cli("train") + [
        os.path.join(prep, "bin"), *flags, *SHAPE, "--langs", ",".join(langs), "--lang-pairs", ",".join(pairs),
        "--encoder-langtok", "src", "--decoder-langtok", "--sampling-method", "temperature",
        "--sampling-temperature", 5, "--share-all-embeddings", "--label-smoothing", 0.1,
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", 0.1, "--lr", 2e-3,
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", max(1, scale.updates // 8),
        "--max-tokens", scale.max_tokens, "--max-update", scale.updates,
        *stage1, "--seed", 1, "--save-dir", folder, "--no-epoch-checkpoints",
        "--save-interval-updates", max(1, scale.updates // 2), "--keep-interval-updates", 1,
        "--validate-interval", 1000, "--cpu", "--num-workers", 0, "--log-format", "simple", "--log-interval", 50],
        os.path.join(folder, "train.log"), threads)
    valid_ppl = float(re.findall(r"\| valid on 'valid' subset .*?\| ppl ([0-9.]+)", log)[-1])
    scored = run_logged([sys.executable, os.path.join(MT, "evaluate.py"), "--prep", prep, "--checkpoint",
                      os.path.join(folder, "checkpoint_last.pt"), "--out", os.path.join(folder, "eval"),
                      "--name", name, "--directions", "x2en", "--", "--beam", scale.beam, "--batch-size", 50,
                      "--cpu"], os.path.join(folder, "eval.log"), threads, append=False)
    bleu = {lang: float(score) for lang, score in re.findall(r"(\w+)->en: BLEU ([0-9.]+)", scored)}
    return {"name": name, "bleu": bleu, "valid_ppl": valid_ppl}


def main():
    args = parser(__doc__, os.path.join(SHARED, "mt")).parse_args()
    scale, out = (QUICK if args.quick else FULL), out_dir(args)
    missing = [lang for lang in scale.langs if not os.path.isdir(os.path.join(args.data, f"{lang}-en"))]
    if missing:
        sys.exit(f"--data {args.data}: no {', '.join(f'{lang}-en/' for lang in missing)} there; pass --data with "
                 f"the folder of <xx>-en/{{train,valid,test}}.{{xx,en}} (e.g. ../shared/data/mt)")
    prep = prepare(args, scale, out)
    threads = threads_per_job(args.jobs)

    def task(name, flags):
        folder = os.path.join(out, "runs", "mt-" + slug(name))
        os.makedirs(folder, exist_ok=True)
        return lambda: cached(os.path.join(folder, "result.json"),
                              lambda: train_and_score(name, flags, args, scale, prep, folder, threads))

    results = run_all([task(name, flags) for name, flags in ROWS.items()], args.jobs)
    body = []
    for result in results:
        scores = [result["bleu"][lang] for lang in scale.langs]
        body.append([result["name"], *(f"{s:.2f}" for s in scores), f"{sum(scores) / len(scores):.2f}",
                     f"{result['valid_ppl']:.1f}"])
    if scale.langs == LANGS:
        body += [[f"paper: {name}", *(f"{s:.1f}" for s in scores[:-1]), f"{scores[-1]:.2f}", ""]
                 for name, scores in PAPER.items()]
    table = markdown_table(["Model", *scale.langs, "Avg", "valid ppl (all directions)"], body)
    write_report(f"{out}/table3.md", f"# Table 3 at CPU scale: X→En test BLEU (seed 1)\n\n{scale.describe()}.\n\n"
                                     f"{table}\n")


if __name__ == "__main__":
    main()

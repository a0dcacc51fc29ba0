"""Paper Table 3 at CPU scale: X→En BLEU of the dense, FLOP-matched dense and MoE translation models.

    python examples/reproduce/table3.py [--quick | --long] [--data ../shared/data/mt] [--out results/reproduce]

One multilingual model per row, trained on the nine X↔En pairs of the paper (both directions, temperature
sampling T=5) with examples/multilingual_translation/prepare.py's data, then examples/multilingual_translation/
evaluate.py translates each X→En test set (beam 4) and scores it with sacreBLEU. Writes OUT/{full,quick,long}/
table3.md. --long: the standard Transformer and StableMoE, 2+2 blocks of 128, trained X→En on all the training
pairs for 4,000 updates, with a learning curve (greedy BLEU of de, cs, fr every 500 updates) and wall times.
"""
import glob
import os
import re
import sys
import time
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
    train_lines: int  # per pair; 0: all
    eval_lines: int
    vocab: int
    updates: int
    max_tokens: int
    beam: int
    x2en_only: bool = False  # train X→En only (else both directions)
    dim: int = 64
    layers: int = 2  # per stack
    curve_interval: int = 0  # long mode: keep a checkpoint every this many updates and score it (BLEU curve)
    curve_langs: Tuple[str, ...] = ()

    def describe(self) -> str:
        pairs = f"{self.train_lines} training pairs each" if self.train_lines else "all their training pairs"
        return (f"{len(self.langs)} languages × {pairs} ({'X→En only' if self.x2en_only else 'X→En and En→X'}), "
                f"{self.eval_lines} test pairs per language; sentencepiece {self.vocab} joined; "
                f"{self.layers}+{self.layers} blocks of {self.dim}/{4 * self.dim} (4 heads), MoE: one layer of 8 "
                f"experts × 2 sublayers after block {self.layers // 2} of each stack; {self.max_tokens} tokens per "
                f"batch, {self.updates} updates (StableMoE stage 1: 10 %), Adam (0.9, 0.98), lr 2e-3 inverse-sqrt, "
                f"clip 0.1, dropout 0.1, label smoothing 0.1; beam {self.beam}")


FULL = MTScale(langs=LANGS, train_lines=3000, eval_lines=100, vocab=4000, updates=200, max_tokens=2000, beam=4)
# long mode: a model and budget that can translate (X→En only; see RESULTS.md for the measured speed)
LONG = MTScale(langs=LANGS, train_lines=0, eval_lines=200, vocab=8000, updates=4000, max_tokens=4000, beam=4,
               x2en_only=True, dim=128, layers=2, curve_interval=500, curve_langs=("de", "cs", "fr"))
QUICK = MTScale(langs=("xx", "yy"), train_lines=200, eval_lines=10, vocab=100, updates=10, max_tokens=400, beam=1)

def shape(scale: MTScale) -> list:
    d = scale.dim
    return ["--encoder-embed-dim", d, "--decoder-embed-dim", d, "--encoder-ffn-embed-dim", 4 * d,
            "--decoder-ffn-embed-dim", 4 * d, "--encoder-layers", scale.layers, "--decoder-layers", scale.layers,
            "--encoder-attention-heads", 4, "--decoder-attention-heads", 4, "--dropout", 0.1,
            "--attention-dropout", 0]


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


LONG_ROWS = ("Standard Transformer", "StableMoE")


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
    if scale.x2en_only:
        pairs = [pair for pair in pairs if pair.endswith("-en")]
    stage1 = ["--stage1-updates", max(1, scale.updates // 10)] if "stablemoe" in flags else []
    saving = ["--save-interval-updates", max(1, scale.updates // 2), "--keep-interval-updates", 1,
              "--validate-interval", 1000]
    if scale.curve_interval:  # every kept checkpoint is a point of the curve; validate at each
        saving = ["--save-interval-updates", scale.curve_interval, "--keep-interval-updates", -1,
                  "--validate-interval-updates", scale.curve_interval, "--validate-interval", 1000]
    start = time.time()
    log = run_logged(fairseq_cli("train") + [
        os.path.join(prep, "bin"), *flags, *shape(scale), "--langs", ",".join(langs), "--lang-pairs", ",".join(pairs),
        "--encoder-langtok", "src", "--decoder-langtok", "--sampling-method", "temperature",
        "--sampling-temperature", 5, "--share-all-embeddings", "--label-smoothing", 0.1,
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", 0.1, "--lr", 2e-3,
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", max(1, scale.updates // 8),
        "--max-tokens", scale.max_tokens, "--max-update", scale.updates,
        *stage1, "--seed", 1, "--save-dir", folder, "--no-epoch-checkpoints", *saving, "--cpu", "--num-workers", 0,
        "--log-format", "simple", "--log-interval", max(1, min(50, scale.updates // 10))],
        os.path.join(folder, "train.log"), threads)
    seconds = time.time() - start
    valid_ppl = float(re.findall(r"\| valid on 'valid' subset .*?\| ppl ([0-9.]+)", log)[-1])
    scored = run_logged([sys.executable, os.path.join(MT, "evaluate.py"), "--prep", prep, "--checkpoint",
                      os.path.join(folder, "checkpoint_last.pt"), "--out", os.path.join(folder, "eval"),
                      "--name", name, "--directions", "x2en", "--", "--beam", scale.beam, "--batch-size", 50,
                      "--cpu"], os.path.join(folder, "eval.log"), threads, append=False)
    bleu = {lang: float(score) for lang, score in re.findall(r"(\w+)->en: BLEU ([0-9.]+)", scored)}
    result = {"name": name, "bleu": bleu, "valid_ppl": valid_ppl}
    if scale.curve_interval:
        result["train_seconds"] = seconds  # fairseq-train's wall time, validations included (this attempt)
        result["curve"] = bleu_curve(name, scale, prep, folder, log, threads)
    return result


def bleu_curve(name, scale, prep, folder, log, threads) -> list:
    """Greedy X→En test BLEU of scale.curve_langs at every kept checkpoint, with the validation ppl there."""
    valid = {int(u): float(p) for p, u in re.findall(
        r"\| valid on 'valid' subset .*?\| ppl ([0-9.]+) .*?\| num_updates ([0-9]+)", log)}
    points = []
    for update in range(scale.curve_interval, scale.updates + 1, scale.curve_interval):
        found = glob.glob(os.path.join(folder, f"checkpoint_*_{update}.pt"))  # checkpoint_<epoch>_<update>.pt
        if not found:
            continue
        checkpoint = found[0]
        scored = run_logged([sys.executable, os.path.join(MT, "evaluate.py"), "--prep", prep, "--checkpoint",
                             checkpoint, "--out", os.path.join(folder, f"curve-{update}"), "--name", name,
                             "--langs", ",".join(scale.curve_langs), "--directions", "x2en", "--", "--beam", 1,
                             "--batch-size", 100, "--cpu"], os.path.join(folder, "curve.log"), threads)
        bleu = dict(re.findall(r"(\w+)->en: BLEU ([0-9.]+)", scored.rsplit("$ ", 1)[-1]))
        points.append({"update": update, "valid_ppl": valid.get(update),
                       "bleu": {lang: float(b) for lang, b in bleu.items()}})
    return points


def run_folder(out, name) -> str:
    return os.path.join(out, "runs", "mt-" + slug(name))


def main():
    args = parser(__doc__, os.path.join(SHARED, "mt")).parse_args()
    if args.medium:
        sys.exit("--medium is a language-model mode (lm.MEDIUM); translation has --quick and --long")
    scale, out = (QUICK if args.quick else LONG if args.long else FULL), out_dir(args)
    rows = {name: ROWS[name] for name in LONG_ROWS} if args.long else ROWS
    missing = [lang for lang in scale.langs if not os.path.isdir(os.path.join(args.data, f"{lang}-en"))]
    if missing:
        sys.exit(f"--data {args.data}: no {', '.join(f'{lang}-en/' for lang in missing)} there; pass --data with "
                 f"the folder of <xx>-en/{{train,valid,test}}.{{xx,en}} (e.g. ../shared/data/mt)")
    prep = prepare(args, scale, out)
    threads = threads_per_job(args.jobs)

    def task(name, flags):
        folder = run_folder(out, name)
        os.makedirs(folder, exist_ok=True)
        return lambda: cached(os.path.join(folder, "result.json"),
                              lambda: train_and_score(name, flags, args, scale, prep, folder, threads))

    results = run_all([task(name, flags) for name, flags in rows.items()], args.jobs)
    body = []
    for result in results:
        scores = [result["bleu"][lang] for lang in scale.langs]
        body.append([result["name"], *(f"{s:.2f}" for s in scores), f"{sum(scores) / len(scores):.2f}",
                     f"{result['valid_ppl']:.1f}"])
    if scale.langs == LANGS:
        body += [[f"paper: {name}", *(f"{s:.1f}" for s in scores[:-1]), f"{scores[-1]:.2f}", ""]
                 for name, scores in PAPER.items()]
    directions = "X→En" if scale.x2en_only else "all directions"
    table = markdown_table(["Model", *scale.langs, "Avg", f"valid ppl ({directions})"], body)
    text = f"# Table 3 at CPU scale: X→En test BLEU (seed 1)\n\n{scale.describe()}.\n\n{table}\n"
    if scale.curve_interval:
        text += long_report(results, scale, out)
    write_report(f"{out}/table3.md", text)


def long_report(results, scale, out) -> str:
    folders = [run_folder(out, r["name"]) for r in results]
    signatures = {re.search(r"sacreBLEU signature: `(.+)`", open(os.path.join(f, "eval", "bleu.md")).read()).group(1)
                  for f in folders}
    seconds = markdown_table(["Model", "fairseq-train wall seconds (one thread, shared machine)"],
                             [[r["name"], f"{r['train_seconds']:.0f}"] for r in results])
    curve = markdown_table(
        ["Model", "update", "valid ppl", *(f"{lang} BLEU (greedy)" for lang in scale.curve_langs)],
        [[r["name"], p["update"], f"{p['valid_ppl']:.2f}" if p["valid_ppl"] else "–",
          *(f"{p['bleu'].get(lang, float('nan')):.2f}" for lang in scale.curve_langs)]
         for r in results for p in r["curve"]])
    routing = [[r["name"], *routing_in_training(os.path.join(f, "train.log"))]
               for r, f in zip(results, folders) if "stage=1" in open(os.path.join(f, "train.log")).read()]
    text = (f"\nsacreBLEU signature: `{' / '.join(sorted(signatures))}`\n\n{seconds}\n\nLearning curve (X→En test "
            f"BLEU of {', '.join(scale.curve_langs)} with greedy search at every {scale.curve_interval} updates):\n\n"
            f"{curve}\n")
    if routing:
        text += "\nStableMoE's routing in training (the train log's intervals; both MoE layers averaged):\n\n" + \
            markdown_table(["Model", "distilled router agrees with the backbone, last interval of stage 1",
                            "load max/mean, stage 2 (frozen routing), mean over intervals",
                            "unused experts, stage 2"], routing) + "\n"
    return text


def routing_in_training(log_path: str) -> list:
    """From a --log-format simple train log: the distilled router's agreement in the last interval wholly in
    stage 1 (and its update), and the frozen routing's load max/mean and unused experts over stage 2."""
    stage1, loads, unused = None, [], []
    for line in open(log_path):
        if "| train_inner |" not in line:
            continue
        stats = dict(re.findall(r"(\w+)=([-\d.e]+)", line))
        if stats.get("stage") == "1" and "distill_acc" in stats:
            stage1 = (int(stats["num_updates"]), float(stats["distill_acc"]))
        elif stats.get("stage") == "2":
            loads.append(float(stats["load_max_mean"]))
            unused.append(float(stats["unused_experts"]))
    return [f"{100 * stage1[1]:.1f} % (update {stage1[0]})" if stage1 else "–",
            f"{sum(loads) / len(loads):.2f}" if loads else "–", f"{sum(unused) / len(unused):.2f}" if unused else "–"]


if __name__ == "__main__":
    main()

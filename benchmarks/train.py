"""End-to-end fairseq-train words/s of stablemoe_lm (stage 1, stage 2, other routings) against a dense control.

    python benchmarks/train.py --data ../shared/data/lm/sotu --repeats 3
    python benchmarks/train.py --device cuda --shape base --synthetic --routings stablemoe dense --repeats 1

Every variant trains the same model shape on the same data and batches for --max-update updates; words/s is
fairseq's own `wps` of its train_inner logs (the first interval, with start-up, is left out), the median of a run.
Words per CPU-second counts the whole fairseq-train process (start-up included, the same for every variant):
unlike wps it does not count the time other processes hold the cores. Runs are interleaved: each repeat runs
every variant once, in a fresh random order, and a ratio is the median over repeats of the per-repeat ratio to
the reference, so load from other processes cancels out.

Variants (those whose routing this checkout lacks are listed as such):
  stablemoe S1 / S2   --moe-routing stablemoe, kept in stage 1 (--stage1-updates > --max-update) or in stage 2
                      from the first update (--stage1-updates 0: the frozen router's vocab->expert table routes)
  dense               --moe-routing dense: one expert's FFN stack in the MoE slot, the FLOP-matched control
  switch, base, hash  the baseline routings
  transformer_lm      fairseq's own transformer_lm with the same blocks and no MoE slot: fewer FLOPs than the
                      FLOP-matched control, shown as a stand-in reference only where `dense` is missing
Prints tables; passes no judgement.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import interleaved, plugin_env, print_ratio_rows, run_counting_cpu  # noqa: E402

BASE_SHAPE = ["--decoder-embed-dim", "768", "--decoder-ffn-embed-dim", "3072", "--decoder-layers", "12",
              "--decoder-attention-heads", "12", "--dropout", "0.0"]  # stablemoe_lm_base (paper Table 7)
TINY_SHAPE = ["--decoder-embed-dim", "128", "--decoder-ffn-embed-dim", "512", "--decoder-layers", "4",
              "--decoder-attention-heads", "4", "--decoder-learned-pos", "--decoder-normalize-before",
              "--share-decoder-input-output-embed", "--dropout", "0.0"]
INNER = re.compile(r"train_inner \| (\{.*\})")


def binarize(data, workdir, lines, vocab):
    """The first `lines` lines of train/valid, binarized once into workdir."""
    dest = os.path.join(workdir, f"bin-{lines}-{vocab}")
    if os.path.exists(os.path.join(dest, "dict.txt")):
        return dest
    raw = os.path.join(workdir, f"raw-{lines}")
    os.makedirs(raw, exist_ok=True)
    for split in ("train", "valid"):
        with open(os.path.join(data, f"{split}.txt")) as src, open(os.path.join(raw, f"{split}.txt"), "w") as dst:
            for i, line in enumerate(src):
                if i >= (lines if split == "train" else max(1, lines // 10)):
                    break
                dst.write(line)
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
                    "--trainpref", f"{raw}/train.txt", "--validpref",
                    f"{raw}/valid.txt", "--destdir", dest, "--workers", "1", "--nwordssrc", str(vocab)],
                   check=True, capture_output=True)
    return dest


def variants(args):
    from fairseq_stablemoe.moe.routing import ROUTINGS

    moe = ["--user-dir", os.path.join(ROOT, "fairseq_stablemoe"), "--task", "stablemoe_language_modeling",
           "--arch", "stablemoe_lm_tiny", "--criterion", "stablemoe_cross_entropy",
           "--moe-experts", str(args.experts), "--moe-sublayers", str(args.sublayers)] + shape(args)
    late = str(10 * args.max_update)
    stages = {"stablemoe S1": moe + ["--moe-routing", "stablemoe", "--stage1-updates", late],
              "stablemoe S2": moe + ["--moe-routing", "stablemoe", "--stage1-updates", "0"]}
    out = {name: flags for name, flags in stages.items() if int(name[-1]) in args.stablemoe_stages}
    for name in ["dense"] + [r for r in args.routings if r not in ("stablemoe", "dense")]:
        out[name] = moe + ["--moe-routing", name] if name in ROUTINGS else None
    if out["dense"] is None or args.stand_in:
        out["transformer_lm (stand-in)"] = ["--user-dir", os.path.join(ROOT, "fairseq_stablemoe"), "--task",
                                            "language_modeling", "--arch", "transformer_lm",
                                            "--criterion", "cross_entropy"] + shape(args)
    return out


def shape(args):
    return BASE_SHAPE if args.shape == "base" else TINY_SHAPE


PRECISION = {"fp32": [], "fp16": ["--fp16", "--fp16-no-flatten-grads"], "amp": ["--amp"]}


def device_flags(args):
    if args.device == "cpu":
        return ["--cpu"] + (["--on-cpu-convert-precision"] if args.precision == "fp16" else [])
    return []


def write_synthetic_corpus(directory, lines, vocab, seed=0):
    """Zipf-distributed random words (train.txt, valid.txt): for machines without the real corpus (a GPU box)."""
    import random

    rng = random.Random(seed)
    words, weights = [f"w{i}" for i in range(vocab)], [1.0 / (i + 1) for i in range(vocab)]
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", lines), ("valid", max(1, lines // 10))):
        with open(os.path.join(directory, f"{split}.txt"), "w") as f:
            f.writelines(" ".join(rng.choices(words, weights, k=rng.randint(50, 400))) + "\n" for _ in range(n))
    return directory


def train_wps(data, flags, args, save_dir):
    cmd = [sys.executable, "-m", "fairseq_cli.train", data, *flags, *PRECISION[args.precision], *device_flags(args),
           "--optimizer", "adam", "--lr", "5e-4", "--tokens-per-sample",
           str(args.tokens_per_sample), "--batch-size", str(args.batch_size), "--max-update", str(args.max_update),
           "--log-format", "json", "--log-interval", str(args.log_interval), "--seed", "1",
           "--save-dir", save_dir, "--no-save", "--disable-validation", "--num-workers", "0"]
    env = plugin_env(OMP_NUM_THREADS=str(args.threads))
    output, cpu_s = run_counting_cpu(cmd, env)
    logs = [json.loads(m.group(1)) for m in INNER.finditer(output)]
    wps = [float(log["wps"]) for log in logs[1:]]  # the first interval holds the start-up
    if not wps:
        raise RuntimeError(f"no train_inner logs after the first: raise --max-update\n{output[-2000:]}")
    words = args.max_update * args.batch_size * args.tokens_per_sample
    return statistics.median(wps), words / cpu_s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "lm", "sotu"),
                   help="a folder with train.txt and valid.txt, one paragraph a line")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "stablemoe-bench-train"))
    p.add_argument("--lines", type=int, default=4000, help="train lines to binarize")
    p.add_argument("--vocab", type=int, default=16000, help="--nwordssrc of fairseq-preprocess")
    p.add_argument("--routings", nargs="+", default=["stablemoe", "dense", "switch", "base", "hash"])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--sublayers", type=int, default=2)
    p.add_argument("--tokens-per-sample", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-update", type=int, default=30)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each fairseq-train")
    p.add_argument("--stand-in", action="store_true", help="also run transformer_lm when dense exists")
    p.add_argument("--stablemoe-stages", type=int, nargs="+", choices=[1, 2], default=[1, 2],
                   help="which StableMoE stages to time")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: fairseq-train without --cpu")
    p.add_argument("--precision", choices=list(PRECISION), default="fp32",
                   help="fp16: --fp16 --fp16-no-flatten-grads; amp: --amp (bf16 trains through fairseq-hydra-train)")
    p.add_argument("--shape", choices=["tiny", "base"], default="tiny",
                   help="tiny: 4 x 128/512 (CPU); base: stablemoe_lm_base's 12 x 768/3072 (GPU)")
    p.add_argument("--synthetic", action="store_true", help="a random Zipf corpus instead of --data")
    args = p.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    if args.synthetic:
        args.data = write_synthetic_corpus(os.path.join(args.workdir, "synthetic"), args.lines, args.vocab)
    data = binarize(args.data, args.workdir, args.lines, args.vocab)
    runs = variants(args)
    ready = [name for name, flags in runs.items() if flags is not None]
    reference = "dense" if runs["dense"] is not None else "transformer_lm (stand-in)"

    def run(name):
        with tempfile.TemporaryDirectory() as save_dir:
            wall, cpu = train_wps(data, runs[name], args, save_dir)
        print(f"# {name}: {wall:.0f} words/s, {cpu:.0f} words per CPU-second", file=sys.stderr, flush=True)
        return wall, cpu

    results = interleaved(ready, args.repeats, run)
    wps = {name: [r[0] for r in rs] for name, rs in results.items()}
    per_cpu_s = {name: [r[1] for r in rs] for name, rs in results.items()}
    print(f"# fairseq-train on {args.device} ({args.precision}), "
          f"{'12 x 768/3072' if args.shape == 'base' else '4 x 128/512'} blocks, {args.experts} experts x "
          f"{args.sublayers} sublayers, {args.batch_size} x {args.tokens_per_sample} tokens a batch, "
          f"{args.max_update} updates, "
          f"{args.threads} thread(s), {args.repeats} interleaved repeats; reference: {reference}"
          f"{'; synthetic corpus' if args.synthetic else ''}")
    print(f"| variant | words/s (fairseq wps) | ÷ {reference} | words per CPU-second (whole run) | ÷ {reference} |")
    print("|---|---|---|---|---|")
    for name, flags in runs.items():
        if flags is None:
            print(f"| {name} | not in this checkout's --moe-routing choices | - | - | - |")
    print_ratio_rows(ready, (wps, per_cpu_s), reference)


if __name__ == "__main__":
    main()

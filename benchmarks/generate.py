"""fairseq-generate tokens/s of stablemoe_transformer against the same model with --moe-routing dense.

    python benchmarks/generate.py --repeats 3

Each variant trains for --max-update updates on the same data (StableMoE switches to stage 2 halfway, as
inference routes anyway), then fairseq-generate translates the test set with the same beam and batches. End of
sentence is banned before step --length and forced at it (--min-len = --max-len-b, --max-len-a 0), so every
variant decodes the same number of steps whatever its weights learned. tokens/s is fairseq's own "Translated ...
tokens/s" (generation only, model loading left out); tokens per CPU-second counts the whole fairseq-generate
process. Runs are interleaved as in train.py. Without --data the script writes a synthetic corpus (a made-up
language xx whose sentences are word-by-word rewrites of English ones, as the translation tests use).
Prints tables; passes no judgement.
"""
import argparse
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from benchmarks.common import (interleaved, plugin_env, print_ratio_rows, print_table_header,  # noqa: E402
                               run_counting_cpu)

TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in [\d.]+s .* ([\d.]+) tokens/s\)")


def prepare_data(workdir, sentences):
    """The synthetic xx-en corpus, binarized with a joined dictionary (once per workdir and size)."""
    from helpers import write_parallel_corpus

    dest = os.path.join(workdir, f"bin-{sentences}")
    if os.path.exists(os.path.join(dest, "dict.en.txt")):
        return dest
    raw = write_parallel_corpus(os.path.join(workdir, f"raw-{sentences}"), langs=("xx",),
                                sizes=(("train", 2000), ("valid", 20), ("test", sentences)))
    splits = [a for split in ("train", "valid", "test") for a in (f"--{split}pref", f"{raw}/xx-en/{split}")]
    run_counting_cpu(["fairseq-preprocess", "-s", "xx", "-t", "en", "--joined-dictionary", "--destdir", dest,
                      "--workers", "1", *splits], os.environ)
    return dest


def task_flags(args):
    return ["--user-dir", os.path.join(ROOT, "fairseq_stablemoe"), "--task",
            "stablemoe_translation_multi_simple_epoch", "--langs", "xx,en", "--lang-pairs", "xx-en",
            "--encoder-langtok", "src", "--decoder-langtok"]


def train(data, routing, args, env):
    """A checkpoint of `routing` after --max-update updates; trained once per workdir and shape."""
    save_dir = os.path.join(args.workdir, f"ckpt-{routing}-{args.experts}x{args.sublayers}-{args.max_update}")
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.exists(checkpoint):
        run_counting_cpu([
            "fairseq-train", data, *task_flags(args), "--arch", args.arch, "--share-all-embeddings",
            "--moe-routing", routing, "--moe-experts", str(args.experts), "--moe-sublayers", str(args.sublayers),
            "--stage1-updates", str(args.max_update // 2), "--max-update", str(args.max_update),
            "--criterion", "stablemoe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "2000", "--cpu", "--seed", "1",
            "--save-dir", save_dir, "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0"], env)
    return checkpoint


def generate(data, checkpoint, args, env):
    """(fairseq's tokens/s, generated tokens per CPU-second of the whole process)."""
    output, cpu_s = run_counting_cpu([
        "fairseq-generate", data, *task_flags(args), "-s", "xx", "-t", "en", "--path", checkpoint,
        "--gen-subset", "test", "--beam", str(args.beam), "--batch-size", str(args.batch_size),
        "--required-batch-size-multiple", "1", "--max-len-a", "0", "--max-len-b", str(args.length),
        "--min-len", str(args.length), "--cpu", "--quiet", "--num-workers", "0"], env)
    match = TRANSLATED.search(output)
    if match is None:
        raise RuntimeError(f"no 'Translated ...' line in fairseq-generate's output\n{output[-2000:]}")
    return float(match.group(3)), int(match.group(2).replace(",", "")) / cpu_s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="binarized xx-en data with a joined dictionary (default: a synthetic corpus)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "stablemoe-bench-generate"))
    p.add_argument("--sentences", type=int, default=500, help="test sentences of the synthetic corpus")
    p.add_argument("--routings", nargs="+", default=["stablemoe", "dense"], help="the first one is the reference"
                   " of the ratios unless dense is among them")
    p.add_argument("--arch", default="stablemoe_transformer_tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--sublayers", type=int, default=2)
    p.add_argument("--max-update", type=int, default=20)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=20, help="decoding steps of every hypothesis")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each fairseq command")
    args = p.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    env = plugin_env(OMP_NUM_THREADS=str(args.threads))
    data = args.data or prepare_data(args.workdir, args.sentences)
    checkpoints = {routing: train(data, routing, args, env) for routing in args.routings}

    def run(routing):
        result = generate(data, checkpoints[routing], args, env)
        print(f"# {routing}: {result[0]:.0f} tokens/s, {result[1]:.0f} tokens per CPU-second", file=sys.stderr,
              flush=True)
        return result

    results = interleaved(args.routings, args.repeats, run)
    reference = "dense" if "dense" in args.routings else args.routings[0]
    print(f"# fairseq-generate, {args.arch}, {args.experts} experts x {args.sublayers} sublayers, beam {args.beam}, "
          f"batch {args.batch_size}, {args.length} tokens a hypothesis, {args.threads} thread(s), {args.repeats} "
          f"interleaved repeats; reference: {reference}")
    print_table_header(f"| routing | tokens/s (fairseq) | ÷ {reference} | tokens per CPU-second (whole run) "
                       f"| ÷ {reference} |")
    print_ratio_rows(args.routings, [{k: [r[i] for r in v] for k, v in results.items()} for i in (0, 1)],
                     reference)


if __name__ == "__main__":
    main()

"""Prepare a many-to-English corpus for fairseq: sentencepiece on the training text, one joined dictionary,
binarised pairs for --task stablemoe_translation_multi_simple_epoch.

Input: CORPUS/<xx>-en/{train,valid,test}.{xx,en} (raw text, line-aligned). Output in OUT:
  raw/<xx>-en/...     the (optionally subsampled) raw text; test references are read from here
  spm.model           the sentencepiece model (--vocab-size pieces, learned on all training text, both sides)
  bin/                fairseq-preprocess output: dict.<lang>.txt (all the same joined dictionary), <split>.<xx>-en.*
  langs.txt           the languages, for --langs; lang_pairs.txt: X->en and en->X, for --lang-pairs
"""
import argparse
import random
import sys
from pathlib import Path

import sentencepiece as spm
from fairseq import options
from fairseq_cli import preprocess as fairseq_preprocess

SPLITS = ("train", "valid", "test")


def read(path):
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def subsample(pair, n, seed):
    """The same random n line pairs of both sides (all when n is 0 or larger than the split)."""
    if not n or n >= len(pair[0]):
        return pair
    keep = sorted(random.Random(seed).sample(range(len(pair[0])), n))
    return tuple([side[i] for i in keep] for side in pair)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, type=Path, help="folder with <xx>-en/ subfolders")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--langs", default="", help="comma-separated X languages (default: every <xx>-en found)")
    p.add_argument("--vocab-size", type=int, default=64000,
                   help="sentencepiece pieces (paper: 64000; an upper bound on a small corpus)")
    p.add_argument("--train-lines", type=int, default=0, help="subsample each pair's training set (0 = all)")
    p.add_argument("--valid-lines", type=int, default=0, help="subsample each valid set (0 = all)")
    p.add_argument("--test-lines", type=int, default=0, help="subsample each test set (0 = all)")
    p.add_argument("--spm-sentences", type=int, default=2_000_000, help="sentences sentencepiece samples")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    langs = args.langs.split(",") if args.langs else sorted(
        d.name[:-3] for d in args.corpus.iterdir() if d.is_dir() and d.name.endswith("-en"))
    if not langs:
        sys.exit(f"no <xx>-en folders in {args.corpus}")
    limits = {"train": args.train_lines, "valid": args.valid_lines, "test": args.test_lines}
    raw, pieces, bin_dir = args.out / "raw", args.out / "spm", args.out / "bin"

    for lang in langs:
        for split in SPLITS:
            src = args.corpus / f"{lang}-en" / f"{split}.{lang}"
            x, en = subsample((read(src), read(src.with_suffix(".en"))), limits[split], args.seed)
            if len(x) != len(en):
                sys.exit(f"{src} and its .en file differ in length ({len(x)} vs {len(en)} lines)")
            write(raw / f"{lang}-en" / f"{split}.{lang}", x)
            write(raw / f"{lang}-en" / f"{split}.en", en)

    train_text = [str(raw / f"{lang}-en" / f"train.{side}") for lang in langs for side in (lang, "en")]
    spm.SentencePieceTrainer.train(
        input=train_text, model_prefix=str(args.out / "spm"), vocab_size=args.vocab_size,
        character_coverage=1.0, model_type="unigram", input_sentence_size=args.spm_sentences,
        shuffle_input_sentence=True, hard_vocab_limit=False, num_threads=args.workers, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(args.out / "spm.model"))
    for lang in langs:
        for split in SPLITS:
            for side in (lang, "en"):
                lines = read(raw / f"{lang}-en" / f"{split}.{side}")
                encoded = [" ".join(pieces_) for pieces_ in sp.encode(lines, out_type=str)]
                write(pieces / f"{lang}-en" / f"{split}.{side}", encoded)

    def preprocess(*extra):  # fairseq-preprocess, in this process (one fairseq start-up for all pairs)
        parser = options.get_preprocessing_parser()
        fairseq_preprocess.main(parser.parse_args(["--destdir", str(bin_dir), "--workers", str(args.workers),
                                                   *extra]))

    # one dictionary for every language: the pieces of all training text
    all_train = args.out / "spm" / "train.all"
    write(all_train, [line for f in sorted(pieces.glob("*-en/train.*")) for line in read(f)])
    preprocess("--only-source", "--trainpref", str(all_train), "--dict-only")
    joined = args.out / "dict.txt"
    (bin_dir / "dict.txt").rename(joined)
    all_train.unlink()
    for lang in langs:
        prefix = pieces / f"{lang}-en"
        preprocess("-s", lang, "-t", "en", "--srcdict", str(joined), "--tgtdict", str(joined),
                   *[a for split in SPLITS for a in (f"--{split}pref", str(prefix / split))])
    write(args.out / "langs.txt", langs + ["en"])
    write(args.out / "lang_pairs.txt", [f"{x}-en" for x in langs] + [f"en-{x}" for x in langs])
    print(f"{args.out}: {len(langs)} languages, {len(sp)} pieces; "
          f"--langs {','.join(langs + ['en'])} --lang-pairs {','.join(read(args.out / 'lang_pairs.txt'))}")


if __name__ == "__main__":
    main()

"""Train a sentencepiece model on text files, or encode text files with one (one line in, one line out)."""
import argparse

import sentencepiece as spm


def train(inputs, model_prefix, vocab_size, model_type="bpe", **options):
    """options: further SentencePieceTrainer flags, e.g. hard_vocab_limit=False for a corpus too small for the size."""
    spm.SentencePieceTrainer.train(
        input=",".join(inputs), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,  # fairseq adds its own specials
        **options,
    )


def encode(model, src, dst):
    sp = spm.SentencePieceProcessor(model_file=model)
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            fout.write(" ".join(sp.encode(line.strip(), out_type=str)) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--inputs", nargs="+", required=True)
    t.add_argument("--model-prefix", required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    e = sub.add_parser("encode")
    e.add_argument("--model", required=True)
    e.add_argument("--inputs", nargs="+", required=True)
    e.add_argument("--outputs", nargs="+", required=True)
    args = parser.parse_args()
    if args.cmd == "train":
        train(args.inputs, args.model_prefix, args.vocab_size)
    else:
        for src, dst in zip(args.inputs, args.outputs):
            encode(args.model, src, dst)


if __name__ == "__main__":
    main()

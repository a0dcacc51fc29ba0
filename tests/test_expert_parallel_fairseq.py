"""fairseq-train / fairseq-eval-lm with 2 gloo processes and expert parallelism, resumed and evaluated at
other world sizes. One test: the runs build on each other (train -> resume -> evaluate)."""
import logging
import math
import os
import random
import re
import shutil

import pytest
import torch
from helpers import PLUGIN, launch, train_lm_args, wait

from fairseq_stablemoe.reshard_checkpoint import main as reshard_main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BATCHES = ["--batch-size", "4", "--required-batch-size-multiple", "1"]  # exactly 4 blocks of 32 tokens
EVAL = ["--user-dir", PLUGIN, "--cpu", "--tokens-per-sample", "32", "--num-workers", "0"] + BATCHES


def train_args(data, save_dir, epochs, *extra):
    return [str(a) for a in train_lm_args(data, save_dir, "--max-epoch", epochs, *BATCHES, *extra,
                                          stage1=12, max_update=0)]


def make_corpus(directory):
    """Token streams that cut into 64 train / 16 valid blocks of 32: 8 updates an epoch on 2 x 4 blocks."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    for split, lines in (("train", 128), ("valid", 32)):
        with open(os.path.join(directory, f"{split}.txt"), "w") as f:
            for _ in range(lines):  # 15 words + </s> = 16 tokens
                start = rng.randrange(40)
                f.write(" ".join(words[(start + 3 * i + rng.randrange(2)) % 40] for i in range(15)) + "\n")


def preprocess(directory):
    from fairseq import options
    from fairseq_cli import preprocess as fairseq_preprocess

    args = options.get_preprocessing_parser().parse_args([
        "--only-source", "--trainpref", os.path.join(directory, "train.txt"),
        "--validpref", os.path.join(directory, "valid.txt"), "--destdir", os.path.join(directory, "bin"),
        "--workers", "1"])
    fairseq_preprocess.main(args)
    return os.path.join(directory, "bin")


def word_logprobs(messages):
    """{sample id: [natural-log probability of each token]} from fairseq-eval-lm --output-word-probs lines."""
    found = {}
    for message in messages:
        match = re.search(r"fairseq_cli\.eval_lm(?::| \| )(\d+) (.*)", message)
        if match:
            found[int(match.group(1))] = [float(x) for x in re.findall(r" \[(-?\d+\.\d+)\]", match.group(2))]
    return found


def perplexity(scores):
    return math.exp(-sum(scores) / len(scores))


def eval_lm_here(args, caplog):
    """fairseq-eval-lm in this process; returns its perplexity and {sample id: word log-probabilities}."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm

    parsed = options.parse_args_and_arch(options.get_eval_lm_parser(), args)
    with caplog.at_level(logging.INFO):
        results = eval_lm.main(convert_namespace_to_omegaconf(parsed))
    messages = [f"{r.name}:{r.getMessage()}" for r in caplog.records if r.name == "fairseq_cli.eval_lm"]
    return results["perplexity"], word_logprobs(messages)


def test_train_two_ranks_resume_with_one_and_two_evaluate_anywhere(tmp_path, caplog):
    tmp = str(tmp_path)
    make_corpus(tmp)
    data = preprocess(tmp)
    first = os.path.join(tmp, "ckpt")
    [log0, _] = wait(launch("fairseq_cli.train", train_args(data, first, 3), 2, os.path.join(tmp, "train")))
    assert "expert parallelism over 2 ranks; this rank holds experts [0, 1]" in log0  # rank 1 logs warnings only
    assert "update 12: 1 MoE layer(s) enter stage 2" in log0
    assert "num_updates 24" in log0  # 3 epochs of 8 updates, switch at 12

    state = torch.load(os.path.join(first, "checkpoint_last.pt"), weights_only=False)
    experts = {k.split(".experts.experts.")[1].split(".")[0] for k in state["model"] if ".experts.experts." in k}
    assert experts == {"0", "1", "2", "3"}  # rank 0 wrote every expert

    # resume: 2 processes as saved; 1 process with --update-freq 2 (the same batches per update) after
    # resharding the optimizer state. Both continue one epoch in stage 2 and must end with the same model.
    two, one = os.path.join(tmp, "two"), os.path.join(tmp, "one")
    shutil.copytree(first, two)
    os.makedirs(one)
    reshard_main([os.path.join(first, "checkpoint_last.pt"), os.path.join(one, "checkpoint_last.pt"),
                  "--world-size", "1"])
    on_two = launch("fairseq_cli.train", train_args(data, two, 4), 2, os.path.join(tmp, "resume2"))
    on_one = launch("fairseq_cli.train", train_args(data, one, 4, "--update-freq", 2), 1, os.path.join(tmp, "resume1"))
    [resumed2, _], [resumed1] = wait(on_two), wait(on_one)
    for log in (resumed2, resumed1):
        assert "Loaded checkpoint" in log and "@ 24 updates)" in log and "num_updates 32" in log
    assert "experts' optimizer state" in resumed2
    model2 = torch.load(os.path.join(two, "checkpoint_last.pt"), weights_only=False)["model"]
    model1 = torch.load(os.path.join(one, "checkpoint_last.pt"), weights_only=False)["model"]
    assert model2.keys() == model1.keys()
    for name in model2:
        if name.endswith("k_proj.bias"):  # its true gradient is 0 (softmax ignores it): Adam moves it by noise
            continue
        torch.testing.assert_close(model1[name], model2[name], rtol=0, atol=1e-5, msg=name)
    moved = [n for n in model2 if ".experts.experts." in n and not torch.equal(model2[n], state["model"][n])]
    assert moved  # the experts did train after the resume

    # fairseq-eval-lm of the 2-process model in one process (all experts local; run in this process) and
    # in two (experts sharded, each process evaluating half of the batches; only rank 0 prints).
    evaluate = [data, "--path", os.path.join(two, "checkpoint_last.pt"), "--gen-subset", "valid",
                "--output-word-probs"] + EVAL
    on_two = launch("fairseq_cli.eval_lm", evaluate, 2, os.path.join(tmp, "eval2"))
    ppl_one, words_one = eval_lm_here(evaluate, caplog)
    [log0, _] = wait(on_two)
    words_two = word_logprobs(log0.splitlines())
    assert len(words_one) == 16 and len(words_two) == 8  # rank 0: 2 of the 4 batches
    for sample, scores in words_two.items():
        torch.testing.assert_close(scores, words_one[sample], rtol=0, atol=2e-6)
    everything = [x for scores in words_one.values() for x in scores]
    assert len(everything) == 512 and abs(perplexity(everything) - ppl_one) < 1e-4
    mine = [x for scores in words_two.values() for x in scores]
    reported = float(re.search(r"Perplexity: ([\d.]+)", log0).group(1))  # rounded to 2 decimals
    shared = [x for sample in words_two for x in words_one[sample]]
    assert abs(perplexity(mine) - perplexity(shared)) < 1e-4 and abs(reported - perplexity(mine)) < 5e-3


def test_translation_trained_on_two_ranks_generates_in_one_process(tmp_path):
    from helpers import run_cli, write_parallel_corpus

    raw = write_parallel_corpus(tmp_path / "raw", langs=("xx",), sizes=(("train", 160), ("valid", 16), ("test", 13)))
    run_cli("fairseq_cli.preprocess", [
        "-s", "xx", "-t", "en", "--joined-dictionary", "--destdir", tmp_path / "bin", "--workers", 1,
        *[a for split in ("train", "valid", "test") for a in (f"--{split}pref", raw / "xx-en" / split)]])
    task = ["--user-dir", PLUGIN, "--task", "stablemoe_translation_multi_simple_epoch", "--langs", "xx,en",
            "--lang-pairs", "xx-en,en-xx", "--encoder-langtok", "src", "--decoder-langtok"]
    train = [str(a) for a in [
        tmp_path / "bin", *task, "--arch", "stablemoe_transformer_tiny", "--share-all-embeddings",
        "--moe-experts", 4, "--moe-sublayers", 1, "--criterion", "stablemoe_label_smoothed_cross_entropy",
        "--label-smoothing", 0.1, "--stage1-updates", 4, "--max-update", 8, "--optimizer", "adam", "--lr", 3e-3,
        "--max-tokens", 600, "--cpu", "--save-dir", tmp_path / "ckpt", "--no-epoch-checkpoints", "--seed", 1,
        "--log-format", "simple", "--num-workers", 0]]
    logs = wait(launch("fairseq_cli.train", train, 2, str(tmp_path / "train")))
    assert "update 4: 2 MoE layer(s) enter stage 2" in logs[0]
    assert "expert parallel: rank 0 of 2 holds experts [0, 1] of 4" in logs[0]  # others log warnings only
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)["model"]
    for stack in ("encoder", "decoder"):  # rank 0's checkpoint holds both ranks' experts of both stacks
        ids = {k.split("experts.experts.")[1].split(".")[0] for k in state if k.startswith(stack) and ".experts." in k}
        assert ids == {"0", "1", "2", "3"}, (stack, ids)

    out = run_cli("fairseq_cli.generate", [
        tmp_path / "bin", *task, "-s", "xx", "-t", "en", "--path", tmp_path / "ckpt" / "checkpoint_last.pt",
        "--gen-subset", "test", "--beam", 2, "--batch-size", 8, "--required-batch-size-multiple", 1, "--cpu"])
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 13

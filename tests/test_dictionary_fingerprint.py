"""A dictionary of the same size in another order (the data binarised again) is refused wherever a checkpoint
meets data: resuming, fairseq-eval-lm, fairseq-generate. A checkpoint without fingerprints loads, with a warning."""
import os

import pytest
import torch

import helpers

PLUGIN = ["--user-dir", helpers.PLUGIN, "--cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dictionaries")
    data, save_dir = helpers.trained_tiny_lm(tmp)
    # the same words, binarised again with a dictionary in another order
    entries = open(os.path.join(data, "dict.txt")).read().splitlines()
    (tmp / "reordered.txt").write_text("\n".join(entries[::-1]) + "\n")
    from fairseq import options
    from fairseq_cli import preprocess

    other = str(tmp / "other")
    text = os.path.join(str(tmp), "bin-text")
    with helpers.quiet():
        preprocess.main(options.get_preprocessing_parser().parse_args([
            "--only-source", "--srcdict", str(tmp / "reordered.txt"), "--trainpref", f"{text}/train.txt",
            "--validpref", f"{text}/valid.txt", "--testpref", f"{text}/test.txt", "--destdir", other,
            "--workers", "1"]))
    return tmp, data, other, save_dir


def refusal(other):
    return f"{other}/dict.txt is not the dictionary "


def test_eval_lm_and_generate_refuse_a_reordered_dictionary(setup, tmp_path):
    tmp, data, other, save_dir = setup
    ckpt = os.path.join(save_dir, "checkpoint_last.pt")
    code, log = helpers.run_forked("fairseq_cli.eval_lm", [data, "--path", ckpt, "--tokens-per-sample", 32, *PLUGIN],
                                   str(tmp_path / "same.log"))
    assert code == 0 and "Loss (base 2)" in log and "dictionary fingerprint" not in log
    code, log = helpers.run_forked("fairseq_cli.eval_lm", [other, "--path", ckpt, "--tokens-per-sample", 32, *PLUGIN],
                                   str(tmp_path / "eval.log"))
    assert code != 0 and refusal(other) in log and "(fairseq-preprocess --srcdict <training data>/dict.txt)" in log
    code, log = helpers.run_forked("fairseq_cli.generate", [
        other, "--task", "stablemoe_language_modeling", "--path", ckpt, "--tokens-per-sample", 32, *PLUGIN],
        str(tmp_path / "generate.log"))
    assert code != 0 and refusal(other) in log


def test_resume_refuses_a_reordered_dictionary(setup, tmp_path):
    tmp, data, other, save_dir = setup
    code, log = helpers.run_forked("fairseq_cli.train", helpers.train_lm_args(
        other, save_dir, stage1=2, max_update=5), str(tmp_path / "resume.log"))
    assert code != 0 and refusal(other) in log
    assert torch.load(os.path.join(save_dir, "checkpoint_last.pt"))["optimizer_history"][-1]["num_updates"] == 3
    assert f"{save_dir}/checkpoint_last.pt was trained with" in log  # the resumed file is named


def test_checkpoint_without_fingerprints_loads_with_a_warning(setup, tmp_path):
    tmp, data, other, save_dir = setup
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"))
    del state["cfg"]["model"]["dictionary_fingerprints"]  # as written before fingerprints were stored
    old = str(tmp_path / "old.pt")
    torch.save(state, old)
    code, log = helpers.run_forked("fairseq_cli.eval_lm", [data, "--path", old, "--tokens-per-sample", 32, *PLUGIN],
                                   str(tmp_path / "old.log"))
    assert code == 0 and "Loss (base 2)" in log
    assert (f"the checkpoint holds no dictionary fingerprint (written before they were stored): cannot check that "
            f"{data}/dict.txt is the dictionary it was trained with") in log

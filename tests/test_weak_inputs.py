"""Inputs that used to end in a bare error or pass silently (issue 22, the weak cases): each now gets one line that
names the flag or file and the fix, or simply works."""
import logging
import os

import pytest
import torch
from fairseq import checkpoint_utils

import helpers
from fairseq_stablemoe.checks import preflight, resume_checks
from fairseq_stablemoe.checkpoints import CheckpointError, load_checked


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return helpers.tiny_lm_data(tmp_path_factory.mktemp("weak"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weak-ckpt")
    return os.path.join(helpers.trained_tiny_lm(tmp)[1], "checkpoint_last.pt")


def test_zero_byte_random_and_directory_checkpoints_get_one_line_from_fairseqs_loader(tmp_path):
    empty, noise = tmp_path / "empty.pt", tmp_path / "noise.pt"
    empty.write_bytes(b"")
    noise.write_bytes(os.urandom(4096))
    for path, size in ((empty, 0), (noise, 4096)):  # before: a bare EOFError / torch's "weights_only=False ..."
        with pytest.raises(CheckpointError, match=f"checkpoint {path} is truncated or not a checkpoint \\({size} "
                                                  f"bytes, no zip central directory\\)"):
            checkpoint_utils.load_checkpoint_to_cpu(str(path))
    with pytest.raises(CheckpointError) as err:
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path))
    assert str(err.value) == (f"checkpoint {tmp_path} is a directory: name a checkpoint file in it, e.g. checkpoint "
                              f"{tmp_path}/checkpoint_last.pt")


@pytest.mark.slow
def test_a_legacy_format_checkpoint_loads_in_our_tools_as_in_fairseqs(checkpoint, tmp_path):
    legacy = str(tmp_path / "legacy.pt")
    torch.save(torch.load(checkpoint), legacy, _use_new_zipfile_serialization=False)
    state = load_checked(legacy)  # before: refused by our tools, loaded by fairseq-eval-lm
    assert state["model"].keys() == torch.load(checkpoint)["model"].keys()


def test_a_changed_distilled_router_depth_is_named_at_resume():
    with pytest.raises(ValueError, match=r"--distilled-router-layers 1 \(checkpoint\) / 2 \(command line\)"):
        resume_checks.compare_moe_settings({"distilled_router_layers": 1}, {"distilled_router_layers": 2}, "ckpt.pt")


def test_moe_ffn_embed_dim_given_as_the_size_0_stands_for_is_the_same_setting():
    saved = {"moe_ffn_embed_dim": 0, "decoder_ffn_embed_dim": 64}
    resume_checks.compare_moe_settings(saved, {"moe_ffn_embed_dim": 64, "decoder_ffn_embed_dim": 64}, "ckpt.pt")
    with pytest.raises(ValueError, match=r"--moe-ffn-embed-dim 0 \(checkpoint\) / 128 \(command line\)"):
        resume_checks.compare_moe_settings(saved, {"moe_ffn_embed_dim": 128, "decoder_ffn_embed_dim": 64}, "ckpt.pt")


def test_amp_on_cpu_says_it_trains_in_float32(data, caplog):
    with caplog.at_level(logging.WARNING):
        helpers.build_for_training(data, "--amp")
    assert "--amp on a CPU trains in float32: fairseq's --amp uses CUDA's autocast, which does nothing here" \
        in caplog.text


def test_max_tokens_below_one_sample_is_refused(data):
    with pytest.raises(ValueError) as err:  # before: an AssertionError inside fairseq's batching
        helpers.build_for_training(data, "--max-tokens", "1")
    assert str(err.value) == ("--max-tokens 1 is less than one sample (--tokens-per-sample 32): fairseq cannot make "
                              "a batch; use --max-tokens 32 or more, or --batch-size")


def test_an_empty_split_is_named(tmp_path):
    data = helpers.tiny_lm_data(tmp_path, lines=(200, 0, 20))
    _, task, _, _ = helpers.build_for_training(data)
    with pytest.raises(ValueError) as err:  # before: numpy's "cannot mmap an empty file"
        task.load_dataset("valid")
    assert str(err.value).startswith(f"the valid split ({data}/valid.bin) holds no token: fairseq cannot read an "
                                     f"empty split")


@pytest.mark.slow
def test_a_router_table_entry_out_of_range_is_refused_on_load(checkpoint, tmp_path):
    state = torch.load(checkpoint)
    key = next(k for k in state["model"] if k.endswith(".table"))
    state["model"][key][7] = 99  # before: an IndexError in the middle of evaluation
    bad = str(tmp_path / "table.pt")
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        checkpoint_utils.load_checkpoint_to_cpu(bad)
    assert str(err.value) == (f"checkpoint {bad}: {key} sends token id 7 to expert 99, but the model has --moe-experts "
                              f"4 (experts 0..3): refused; the file was changed or damaged after training, use "
                              f"another checkpoint")


def test_a_valid_split_smaller_than_one_batch_names_the_batch_size_multiple(tmp_path):
    data = helpers.tiny_lm_data(tmp_path, lines=(200, 2, 20))
    _, task, _, _ = helpers.build_for_training(data)
    task.load_dataset("valid")
    with pytest.raises(ValueError) as err:  # fairseq alone, at validation: "The dataset is empty. ..."
        task.get_batch_iterator(task.dataset("valid"), max_sentences=4, max_positions=32,
                                required_batch_size_multiple=8)
    assert str(err.value) == ("a split of 1 sample(s) makes no batch with --batch-size 4, --max-tokens None and "
                              "--required-batch-size-multiple 8 (fairseq's default is 8): pass "
                              "--required-batch-size-multiple 1, or use a larger split")
    task.get_batch_iterator(task.dataset("valid"), max_sentences=4, max_positions=32, required_batch_size_multiple=1)


def test_very_deep_experts_are_announced_before_the_long_build(caplog):
    with caplog.at_level(logging.WARNING):
        preflight.check_model_config({"moe_sublayers": 100000, "moe_experts": 2, "moe_layers": 1, "decoder_embed_dim": 8,
                                  "decoder_ffn_embed_dim": 8})
    assert "--moe-sublayers 100000: every expert is a stack of 100000 FFN sublayers run one after another" \
        in caplog.text

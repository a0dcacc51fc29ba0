"""Corrupt files, odd values, mixed precision on the wrong device, a CPU DDP backend: each gets one line with
the fix, before anything is allocated or loaded."""
import logging
import os
from types import SimpleNamespace

import pytest
import torch

import helpers
from fairseq_stablemoe.checkpoints import CheckpointError, prepare_resume
from fairseq_stablemoe.checks import preflight
from fairseq_stablemoe.moe import comm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return helpers.tiny_lm_data(tmp_path_factory.mktemp("bad"))


def test_random_bytes_in_checkpoint_last_are_repaired_from_checkpoint_best(tmp_path, caplog):
    best, last = str(tmp_path / "checkpoint_best.pt"), str(tmp_path / "checkpoint_last.pt")
    torch.save({"model": {"w": torch.ones(3)}}, best)
    with open(last, "wb") as f:
        f.write(os.urandom(5000))
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"):
        assert prepare_resume(str(tmp_path), "checkpoint_last.pt") == last
    assert torch.load(last)["model"]["w"].sum() == 3
    assert f"replaced it with a copy of {best}" in caplog.text
    assert os.path.getsize(f"{last}.damaged") == 5000  # the random bytes are kept aside, not destroyed


def test_restore_file_naming_a_directory(tmp_path):
    with pytest.raises(CheckpointError) as err:
        prepare_resume(str(tmp_path / "ckpt"), str(tmp_path))
    assert str(err.value) == (f"--restore-file {tmp_path} is a directory: name a checkpoint file in it, e.g. "
                              f"--restore-file {tmp_path}/checkpoint_last.pt")


@pytest.mark.parametrize("world", ["0", "-2"])
def test_reshard_world_size_must_be_positive(tmp_path, capsys, world):
    from fairseq_stablemoe import reshard_checkpoint

    with pytest.raises(SystemExit) as exit_:
        reshard_checkpoint.main([str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), "--world-size", world])
    assert exit_.value.code == 2
    assert (f"--world-size must be at least 1 (got {world}): the number of processes that will resume from the "
            f"output") in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_expert_tokens_top_must_not_be_negative(tmp_path, capsys):
    from fairseq_stablemoe.analysis import expert_tokens

    with pytest.raises(SystemExit):
        expert_tokens.main([str(tmp_path), "--path", str(tmp_path / "x.pt"), "--top", "-3"])
    assert "--top must be >= 0 (got -3): the number of tokens listed per expert" in capsys.readouterr().err


def test_experts_that_cannot_fit_are_refused_before_allocating(data):
    with pytest.raises(ValueError) as err:
        helpers.build_for_training(data, "--moe-experts", "100000", "--moe-ffn-embed-dim", "100000")
    assert str(err.value).startswith("--moe-experts 100000 × --moe-sublayers 1 makes 650.0B expert parameters per "
                                     "process, 2600.0 GB in fp32 (weights alone), more than this machine's ")


def test_more_experts_than_dictionary_entries_warns(data, caplog):
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"):
        helpers.build_for_training(data, "--moe-experts", "64")
    assert ("--moe-experts 64 is more than the dictionary's 48 entries: --moe-routing stablemoe sends each token id "
            "to one fixed expert (in stage 2), so at most 48 experts are ever used; use at most 48 experts"
            ) in caplog.text


def test_bf16_on_the_command_line_is_refused(data):
    with pytest.raises(ValueError) as err:
        helpers.build_for_training(data, "--bf16")
    assert str(err.value) == ("--bf16 on fairseq-train's command line turns on --tpu (fairseq's options.py), which "
                              "needs torch_xla: for bf16 see README.md, section 'Mixed precision'; on a GPU --fp16 "
                              "--fp16-no-flatten-grads (or --amp) works")


def test_flattened_fp16_on_cpu_is_refused(data):
    with pytest.raises(ValueError) as err:
        helpers.build_for_training(data, "--fp16")
    assert str(err.value) == ("--fp16 without --fp16-no-flatten-grads needs a GPU (fairseq's flattened fp16 optimizer "
                              "allocates on CUDA): on CPU add --fp16-no-flatten-grads, or train in fp32 (--amp does "
                              "nothing on a CPU)")


def test_cpu_processes_need_legacy_ddp(monkeypatch):
    task = SimpleNamespace(cfg=SimpleNamespace(cpu=True, ddp_backend="pytorch_ddp"))  # the task's options
    monkeypatch.setattr(comm, "world_size", lambda: 2)
    with pytest.raises(ValueError) as err:
        preflight.check_precision(task)
    assert str(err.value) == ("--ddp-backend pytorch_ddp with 2 CPU processes ends in torch's device_ids error: add "
                              "--ddp-backend legacy_ddp")
    task.cfg.ddp_backend = "legacy_ddp"
    preflight.check_precision(task)


def test_only_the_writing_rank_locks(data, tmp_path, monkeypatch):
    from fairseq_stablemoe.run_lock import LOCK_NAME

    os.makedirs(tmp_path / "rank1"), os.makedirs(tmp_path / "rank0")  # as fairseq-train makes them
    monkeypatch.setattr(comm, "rank", lambda: 1)  # a rank that does not write checkpoints
    helpers.build_for_training(data, save_dir=str(tmp_path / "rank1"))
    assert not (tmp_path / "rank1" / LOCK_NAME).exists()
    monkeypatch.setattr(comm, "rank", lambda: 0)
    helpers.build_for_training(data, save_dir=str(tmp_path / "rank0"))
    assert (tmp_path / "rank0" / LOCK_NAME).exists()


def test_training_memory_counts_gradients_optimizer_state_and_activations(data, monkeypatch):
    """--moe-experts 5000 --moe-ffn-embed-dim 4096: 5.3 GB of weights fit, but training needs four times that and
    the kernel killed the run (exit 137, no message). Refused before anything is allocated, with the figures."""

    monkeypatch.setattr(preflight, "available_memory", lambda on_gpu: 16e9)
    with pytest.raises(ValueError) as err:
        helpers.build_for_training(data, "--moe-experts", "5000", "--moe-ffn-embed-dim", "4096")
    message = str(err.value)
    assert message.startswith("training this model needs about 21.") and "per process: 1.33B parameters (1.33B in " \
        "the experts) take 5.3 GB of fp32 weights, 5.3 GB of gradients and 10.7 GB of Adam's two moments, and one " \
        "batch of 128 tokens about" in message, message
    assert message.endswith("this machine has 16.0 GB available: lower --moe-experts, --moe-ffn-embed-dim or "
                            "--moe-sublayers (or --max-tokens / --batch-size), or shard the experts over more processes")
    monkeypatch.setattr(preflight, "available_memory", lambda on_gpu: 1e12)
    preflight.training_memory_check(helpers.build_for_training(data)[1], SimpleNamespace(
        moe_experts=5000, moe_sublayers=1, moe_layers=1, decoder_embed_dim=32, moe_ffn_embed_dim=4096,
        decoder_layers=2, decoder_ffn_embed_dim=64))  # fits in 1 TB

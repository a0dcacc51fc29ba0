"""Before fairseq-train loads a checkpoint: changed MoE flags are named with both values, a finished run changes
nothing and says so, a checkpoint of several expert-sharded processes names the reshard command."""
import hashlib
import os

import pytest
import torch

import helpers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data, save_dir = helpers.trained_tiny_lm(tmp)
    return data, save_dir


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_changed_moe_flags_are_named_with_both_values(trained, tmp_path):
    data, save_dir = trained
    last = os.path.join(save_dir, "checkpoint_last.pt")
    before = digest(last)
    code, log = helpers.run_forked("fairseq_cli.train", helpers.train_lm_args(
        data, save_dir, "--moe-experts", 8, "--moe-sublayers", 2, "--moe-routing", "switch", "--distilled-dim", 20,
        stage1=2, max_update=6), str(tmp_path / "changed.log"))
    assert code != 0
    assert (f"{last} was trained with other MoE settings than this command line: --moe-experts 4 (checkpoint) / 8 "
            f"(command line), --moe-sublayers 1 (checkpoint) / 2 (command line), --moe-routing stablemoe (checkpoint) "
            f"/ switch (command line), --distilled-dim 50 (checkpoint) / 20 (command line); resume with the "
            f"checkpoint's values, or start a new run in another --save-dir") in log
    assert digest(last) == before


def test_translation_per_side_flags_are_compared():
    from fairseq_stablemoe.checks import resume_checks

    saved = {"encoder_moe_layers": 1, "decoder_moe_layers": 1, "encoder_moe_position": "middle", "moe_experts": 8}
    now = {"encoder_moe_layers": 0, "decoder_moe_layers": 1, "encoder_moe_position": "top", "moe_experts": 8}
    with pytest.raises(ValueError, match=r"--encoder-moe-layers 1 \(checkpoint\) / 0 \(command line\), "
                                         r"--encoder-moe-position middle \(checkpoint\) / top \(command line\);"):
        resume_checks.compare_moe_settings(saved, now, "ckpt.pt")
    resume_checks.compare_moe_settings(saved, saved, "ckpt.pt")


@pytest.mark.parametrize("max_update", [3, 2])
def test_a_finished_run_relaunched_changes_nothing(trained, tmp_path, max_update):
    data, save_dir = trained
    last = os.path.join(save_dir, "checkpoint_last.pt")
    before = digest(last)
    log = helpers.run_fairseq_train(helpers.train_lm_args(data, save_dir, stage1=2, max_update=max_update),
                                    str(tmp_path / "again.log"))  # exit code 0
    assert (f"{last} holds update 3 and --max-update is {max_update}: this run is finished, nothing to train; raise "
            f"--max-update to continue it, or give a new run another --save-dir") in log
    assert "num_updates" not in log and "training stays in stage 1" not in log
    assert digest(last) == before


def test_a_checkpoint_of_sharded_processes_names_the_reshard_command(trained, tmp_path):
    data, save_dir = trained
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"))
    state["cfg"]["distributed_training"]["distributed_world_size"] = 2  # as saved by 2 expert-sharded processes
    two = str(tmp_path / "two.pt")
    torch.save(state, two)
    code, log = helpers.run_forked("fairseq_cli.train", helpers.train_lm_args(
        data, str(tmp_path / "ckpt"), "--restore-file", two, stage1=2, max_update=6), str(tmp_path / "one.log"))
    assert code != 0
    assert (f"{two} was saved by 2 processes and this run has 1, with the experts sharded: its optimizer state does "
            f"not fit; run python -m fairseq_stablemoe.reshard_checkpoint {two} NEW_DIR/checkpoint_last.pt "
            f"--world-size 1 and resume with --restore-file NEW_DIR/checkpoint_last.pt (or add --reset-optimizer)") in log

"""Side files never end a training run (issue 22, family 4): a cut expert_loads.json or routing_probes.pt is moved
aside with a warning naming it, and the run trains on; the plugin writes every file through a temporary file."""
import json
import os
import signal

import pytest
import torch

import helpers

pytestmark = pytest.mark.slow  # fairseq-train, twice


def test_cut_side_files_are_moved_aside_and_training_goes_on(tmp_path):
    data = helpers.tiny_lm_data(tmp_path)
    save_dir = str(tmp_path / "ckpt")
    args = ["--routing-probe-interval", 2, "--routing-probe-tokens", 64, "--validate-interval-updates", 3,
            "--save-interval-updates", 3]
    helpers.run_fairseq_train(helpers.train_lm_args(data, save_dir, *args, stage1=2, max_update=6),
                              str(tmp_path / "first.log"))
    loads, probes = os.path.join(save_dir, "expert_loads.json"), os.path.join(save_dir, "routing_probes.pt")
    for path in (loads, probes):
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])
    log = helpers.run_fairseq_train(helpers.train_lm_args(data, save_dir, *args, stage1=2, max_update=9),
                                    str(tmp_path / "second.log"))
    assert "num_updates 9" in log
    assert f"{loads} could not be read (JSONDecodeError" in log and f"moved it to {loads}.unreadable" in log
    assert f"{probes} could not be read (" in log and f"moved it to {probes}.unreadable" in log
    assert os.path.getsize(f"{loads}.unreadable") > 0 and os.path.getsize(f"{probes}.unreadable") > 0
    assert json.load(open(loads))["validations"][-1]["update"] == 9  # a new record, written again
    assert int(torch.load(probes)["updates"][-1]) == 9


def _save_and_die(path):
    """A process writing a side file through the plugin that is killed (SIGKILL) in the middle of the write."""
    from fairseq_stablemoe.tasks import routing_probes

    real_save = torch.save

    def save_half_then_die(obj, f, *a, **k):
        f.write(b"PK\x03\x04" + b"\0" * 100)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_half_then_die
    try:
        routing_probes.save_probes(path, {"format": routing_probes.FORMAT})
    finally:
        torch.save = real_save


def test_a_kill_during_a_write_leaves_the_previous_file(tmp_path):
    import multiprocessing

    from fairseq_stablemoe.tasks.routing_probes import FORMAT, save_probes

    path = str(tmp_path / "routing_probes.pt")
    save_probes(path, {"format": FORMAT, "updates": torch.arange(3)})
    process = multiprocessing.get_context("fork").Process(target=_save_and_die, args=(path,))
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL
    assert torch.load(path)["updates"].tolist() == [0, 1, 2]  # the previous record, whole

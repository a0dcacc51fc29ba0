"""One fairseq-train run per --save-dir: a second run is refused naming the holder; a killed run's lock is
taken over by the next run, with a warning."""
import os
import signal
import socket
import time

import torch

import helpers
from fairseq_stablemoe.checkpoints import newest_intact, stored_update


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_second_run_refused_then_killed_run_taken_over(tmp_path):
    data = helpers.tiny_lm_data(tmp_path)
    save_dir = str(tmp_path / "ckpt")
    last = os.path.join(save_dir, "checkpoint_last.pt")
    first = helpers.start_fairseq_train(
        helpers.train_lm_args(data, save_dir, "--save-interval-updates", 2, stage1=2, max_update=100000),
        str(tmp_path / "first.log"))
    try:
        wait_for(lambda: os.path.exists(last))
        second = helpers.start_fairseq_train(helpers.train_lm_args(data, save_dir, stage1=2, max_update=3, seed=2),
                                             str(tmp_path / "second.log"))
        second.join(120)
        log = open(tmp_path / "second.log").read()
        assert second.exitcode != 0
        assert (f"--save-dir {save_dir} is in use by another fairseq-train run (pid {first.pid} on "
                f"{socket.gethostname()}, started ") in log
        assert "num_updates" not in log  # refused before training
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.join()
    # the first run's checkpoints are intact (the refused run wrote nothing). The kill may fall after a save and
    # before fairseq copied it to checkpoint_last.pt: the next run resumes from that newer save (refuse_stale_last)
    state = torch.load(last)
    done = stored_update(newest_intact(save_dir))
    assert done >= state["optimizer_history"][-1]["num_updates"] >= 2 and state["cfg"]["common"]["seed"] == 1
    # a third run takes the killed run's lock over, says so, and resumes from its checkpoint
    log = helpers.run_fairseq_train(helpers.train_lm_args(data, save_dir, stage1=2, max_update=done + 2),
                                    str(tmp_path / "third.log"))
    assert f"taking over the lock of a run that ended without releasing it (pid {first.pid} on " in log
    assert f"num_updates {done + 2}" in log

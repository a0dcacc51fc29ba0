"""One rank of two launched alone says what it waits for instead of waiting silently (issue 22, weak)."""
import multiprocessing
import os
import time

import pytest

import helpers

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _rank0_alone(data, save_dir, port, log_path):
    from fairseq_stablemoe import distributed_wait

    distributed_wait.WAIT_WARNING_S = 2.0
    helpers._fairseq_train_cli(helpers.train_lm_args(data, save_dir, *helpers.DISTRIBUTED, "--distributed-world-size", 2,
                                                     "--distributed-rank", 0, "--distributed-init-method",
                                                     f"tcp://127.0.0.1:{port}", max_update=2), log_path)


def test_a_rank_waiting_for_the_others_says_so(tmp_path):
    data = helpers.tiny_lm_data(tmp_path)
    log_path, port = str(tmp_path / "rank0.log"), helpers.free_port()
    process = multiprocessing.get_context("fork").Process(
        target=_rank0_alone, args=(data, str(tmp_path / "ckpt"), port, log_path))
    process.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "has waited" not in (open(log_path).read() if os.path.exists(log_path) else ""):
            time.sleep(0.5)
    finally:
        process.kill()
        process.join()
    assert (f"rank 0 has waited 2 s for the other 1 process(es) of --distributed-world-size 2 at "
            f"--distributed-init-method tcp://127.0.0.1:{port}: start the other ranks") in open(log_path).read()

"""kill -9 at random moments of a fairseq-train run, then resume: the run continues in the same stage with the
same router, and no checkpoint is left unreadable.

fairseq writes the first file of each save atomically (.tmp, then rename) but copies it non-atomically to
checkpoint_last.pt / checkpoint_best.pt; the plugin repairs a copy cut short before the next launch loads it
(fairseq_stablemoe/checkpoints.py, prepare_resume)."""
import os
import random
import re
import signal
import time

import pytest
import torch
from fairseq import checkpoint_utils

import helpers
from fairseq_stablemoe.checkpoints import checkpoint_files, is_intact

pytestmark = pytest.mark.slow

STAGE1, MAX_UPDATE = 8, 24
ROUTER = "decoder.layers.1.routing.distilled_router."


def saved_updates(save_dir):
    """The highest update count among the checkpoint_<epoch>_<updates>.pt files (written atomically)."""
    names = (re.match(r"checkpoint_\d+_(\d+)\.pt$", os.path.basename(p)) for p in checkpoint_files(save_dir))
    return max((int(m.group(1)) for m in names if m), default=0)


def wait_for_save(save_dir, target, process, timeout=90):
    """Wait until checkpoint_*_<target>.pt exists; return the seconds between this launch's last two saves."""
    start = time.time()
    saves = []
    seen = saved_updates(save_dir)
    while seen < target:
        assert process.is_alive(), "fairseq-train exited early"
        assert time.time() - start < timeout, "fairseq-train made no progress"
        time.sleep(0.02)
        if saved_updates(save_dir) != seen:
            seen = saved_updates(save_dir)
            saves.append(time.time())
    return saves[-1] - saves[-2]


def test_kill_9_and_resume(tmp_path):
    data = helpers.tiny_lm_data(tmp_path)
    save_dir = str(tmp_path / "ckpt")
    argv = helpers.train_lm_args(data, save_dir, "--save-interval-updates", 2, stage1=STAGE1, max_update=MAX_UPDATE)
    seed = random.randrange(1 << 16)
    rng = random.Random(seed)
    logs = []

    def launch():
        logs.append(str(tmp_path / f"launch{len(logs)}.log"))
        return helpers.start_fairseq_train(argv, logs[-1])

    # kill once in stage 1, twice in stage 2; each time at a random moment within a save interval (updates,
    # validation, writing, copying) after the launch made progress
    for at_least in (4, STAGE1 + 2, STAGE1 + 6):
        target = max(at_least, saved_updates(save_dir) + 4)  # two saves in this launch: an interval to measure
        process = launch()
        interval = wait_for_save(save_dir, target, process)
        time.sleep(rng.uniform(0, interval))
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        assert process.exitcode == -signal.SIGKILL, f"seed {seed}: the kill came after the run ended"
        # what a kill can leave: only a copy cut short (repaired by the next launch), never a first write
        for path in checkpoint_files(save_dir):
            assert is_intact(path) or os.path.basename(path) in ("checkpoint_last.pt", "checkpoint_best.pt"), path

    process = launch()
    process.join(120)
    assert process.exitcode == 0, open(logs[-1]).read()[-3000:]

    for log in logs[1:]:  # every relaunch resumed, none started from scratch
        assert re.search(r"Loaded checkpoint \S+ \(epoch \d+ @ [1-9]\d* updates\)", open(log).read()), log

    states = {}
    for path in checkpoint_files(save_dir):
        assert is_intact(path), path
        state = checkpoint_utils.load_checkpoint_to_cpu(path)  # torch.load as fairseq calls it: weights only
        states[path] = (state["optimizer_history"][-1]["num_updates"], state["model"])
    last = states[os.path.join(save_dir, "checkpoint_last.pt")]
    assert last[0] == MAX_UPDATE and helpers.saved_stage(last[1]) == 2

    # the switch happens in the update after STAGE1 updates; every later checkpoint holds the same frozen router
    stage2 = []
    for path, (updates, model) in states.items():
        assert helpers.stage2_began(model) == (STAGE1 if updates > STAGE1 else None), \
            (path, updates, helpers.stage2_began(model))
        if updates > STAGE1:
            stage2.append(model)
    reference = stage2[0]
    router = [k for k in reference if k.startswith(ROUTER)]
    assert ROUTER + "table" in router and int(reference[ROUTER + "table"].min()) >= 0
    for model in stage2[1:]:
        for key in router:
            assert torch.equal(model[key], reference[key]), key
    print(f"kill seed {seed}: {len(logs)} launches, {len(states)} checkpoints, {len(stage2)} in stage 2")

"""--tensorboard-logdir holds the routing statistics (needs the `tensorboard` extra, which `make install` installs)."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import run_cli, tiny_lm_data, train_lm_args

ROUTING_SCALARS = {"balance_loss", "distill_loss", "distill_acc", "load_cv", "unused_experts", "stage", "gate_mean",
                   "gate_p10", "gate_below_0_1"}


def scalars(logdir):
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow  # fairseq-train
def test_event_files_hold_the_routing_scalars(tmp_path):
    data = tiny_lm_data(tmp_path)
    run_cli("fairseq_cli.train", train_lm_args(
        data, tmp_path / "ckpt", "--tensorboard-logdir", tmp_path / "tb", "--routing-probe-interval", 2,
        "--validate-interval-updates", 5, stage1=4, max_update=8))
    train, valid = scalars(tmp_path / "tb" / "train_inner"), scalars(tmp_path / "tb" / "valid")
    assert ROUTING_SCALARS | {"route_change", "loss"} <= set(train)
    assert ROUTING_SCALARS <= set(valid)
    stage = dict(train["stage"])
    assert stage[1] == 1 and stage[8] == 2  # one point per update (--log-interval 1): the switch at update 4
    assert dict(train["balance_loss"])[8] == 0 and dict(train["distill_loss"])[8] == 0
    assert [step for step, _ in valid["distill_acc"]] == [5, 8]

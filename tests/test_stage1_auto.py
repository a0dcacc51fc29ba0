"""--stage1-updates auto: stage 1 ends when the routing probes find the routing settled, or at the upper bound."""
import os
import re

import pytest
import torch

from fairseq_stablemoe.tasks.stage1_auto import Stage1Auto

import helpers


def policy(**kw):
    return Stage1Auto(**{"route_change": 0.02, "min_gain": 0.005, "patience": 2, "max_updates": 1000, **kw})


def test_settled_means_few_changes_and_no_gain_at_patience_probes_in_a_row():
    auto = policy()
    auto.count(30, 100)
    assert auto.observe(10, None) is None  # no route_change yet
    auto.count(50, 100)
    assert auto.observe(20, 0.01) is None  # agreement still rising: 0.3 -> 0.5
    auto.count(50, 100)
    assert auto.observe(30, 0.01) is None  # settled once
    auto.count(51, 100)
    assert auto.observe(40, 0.05) is None  # too many changes: the count starts again
    auto.count(51, 100)
    assert auto.observe(50, 0.01) is None
    auto.count(50, 100)
    why = auto.observe(60, 0.0)
    assert why.startswith("the routing settled: route_change 0.0000 < 0.02") and "2 probes in a row" in why


def test_the_upper_bound_ends_stage1_whatever_the_routing_does():
    auto = policy(max_updates=50)
    assert auto.past_bound(49) is None
    assert auto.past_bound(50) == "--stage1-auto-max-updates 50 reached before the routing settled"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return helpers.tiny_lm_data(tmp_path_factory.mktemp("stage1_auto"))


def test_auto_needs_the_routing_probes(data, tmp_path):
    with pytest.raises(ValueError, match="--stage1-updates auto decides from the routing probes: add "
                                         "--routing-probe-interval K"):
        helpers.build_for_training(data, "--stage1-updates", "auto", save_dir=str(tmp_path))


def test_a_tiny_run_switches_when_settled_and_logs_why(data, tmp_path):
    """Thresholds that any routing meets: stage 1 ends at the second probe that finds it settled (patience 2)."""
    log = helpers.run_fairseq_train(helpers.train_lm_args(
        data, str(tmp_path / "ckpt"), "--routing-probe-interval", "2", "--stage1-auto-route-change", "1",
        "--stage1-auto-min-gain", "1", "--stage1-auto-patience", "2", "--stage1-auto-max-updates", "100",
        stage1="auto", max_update=12),
        str(tmp_path / "train.log"))
    assert ("StableMoE: update 6: 1 MoE layer(s) enter stage 2; distilled routers frozen, routing fixed from now on "
            "(--stage1-updates auto: the routing settled: route_change") in log
    assert "at 2 probes in a row)" in log
    assert "| stage 2 |" in log.split("update 6:")[-1]


def test_a_tiny_run_that_never_settles_ends_stage1_at_the_bound(data, tmp_path):
    log = helpers.run_fairseq_train(helpers.train_lm_args(
        data, str(tmp_path / "ckpt"), "--routing-probe-interval", "2", "--stage1-auto-route-change", "0",
        "--stage1-auto-max-updates", "5", stage1="auto", max_update=8), str(tmp_path / "train.log"))
    assert ("update 5: 1 MoE layer(s) enter stage 2; distilled routers frozen, routing fixed from now on "
            "(--stage1-updates auto: --stage1-auto-max-updates 5 reached before the routing settled)") in log
    assert os.path.exists(tmp_path / "ckpt" / "checkpoint_last.pt")


def test_bad_auto_settings_are_refused_by_name():
    from types import SimpleNamespace

    cfg = SimpleNamespace(stage1_auto_max_updates=0, stage1_auto_patience=0, stage1_auto_route_change=0.02,
                          stage1_auto_min_gain=0.005)
    with pytest.raises(ValueError) as error:
        Stage1Auto.from_task_config(cfg, 20)
    assert str(error.value) == ("--stage1-updates auto needs --stage1-auto-max-updates >= 1 (or --max-update, of "
                                "which it takes a fifth), --stage1-auto-patience >= 1 and --stage1-auto-route-change "
                                "in [0, 1] (got 0, --max-update 20, 0, 0.02)")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_switch_together_on_rank_0s_probes(data, tmp_path):
    """Only rank 0 probes; its decision must reach rank 1 at the same update (else the ranks train different
    objectives, and rank 1 would go on adding its distillation and balance losses to the all-reduced logs)."""
    save_dir = str(tmp_path / "ckpt")
    args = [str(a) for a in helpers.train_lm_args(
        data, save_dir, "--routing-probe-interval", "2", "--stage1-auto-route-change", "1",
        "--stage1-auto-min-gain", "1", "--stage1-auto-patience", "2", "--stage1-auto-max-updates", "100",
        stage1="auto", max_update=12)]
    log0, _ = helpers.wait(helpers.launch("fairseq_cli.train", args, 2, str(tmp_path / "train")))
    assert "StableMoE: update 6: 1 MoE layer(s) enter stage 2" in log0
    assert "(--stage1-updates auto: the routing settled: route_change" in log0
    updates = re.findall(r"\| train_inner \| .*? num_updates=(\d+)", log0)
    assert updates == [str(n) for n in range(1, 13)]
    for line in re.findall(r"\| train_inner \| .*", log0):  # the losses summed over both ranks' logging outputs
        stage2 = int(re.search(r"num_updates=(\d+)", line).group(1)) > 6
        distill, balance = (float(re.search(fr"{name}=([\d.e-]+)", line).group(1)) for name in ("distill_loss",
                                                                                                "balance_loss"))
        assert (distill == balance == 0) if stage2 else (distill > 0 and balance > 0), line
        assert f"stage={2 if stage2 else 1}," in line
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), weights_only=False)["model"]
    assert helpers.stage2_began(state) == 6

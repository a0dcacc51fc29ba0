"""Routing metrics per MoE layer (moe0_load_cv, ...), the stage as an integer in every summary, and each expert's
load per layer at every validation (SAVE_DIR/expert_loads.json) with its reader."""
import json
import os
import re
import subprocess
import sys

import pytest

from fairseq_stablemoe.analysis import expert_load

import helpers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layer_metrics")
    data = helpers.tiny_lm_data(tmp)
    save_dir = os.path.join(tmp, "ckpt")
    log = helpers.run_fairseq_train(
        helpers.train_lm_args(data, save_dir, "--moe-layers", "2", "--validate-interval-updates", "5",
                              stage1=10, max_update=20),
        os.path.join(tmp, "train.log"))
    return save_dir, log


def values(log, key):
    return [float(v) for v in re.findall(rf"\| {key} ([0-9.]+)", log)]


def test_each_layer_has_its_own_routing_metrics(run):
    _, log = run
    for layer in (0, 1):
        assert values(log, f"moe{layer}_load_cv"), f"no moe{layer}_load_cv in the log"
        assert values(log, f"moe{layer}_unused_experts")
        assert all(0 <= acc <= 1 for acc in values(log, f"moe{layer}_distill_acc"))
    assert values(log, "moe0_load_cv") != values(log, "moe1_load_cv")  # two layers, two routings


def test_the_stage_is_the_latest_integer_also_in_the_epoch_summary(run):
    _, log = run
    summary = re.search(r"epoch 001 \|.*", log.split("end of epoch 1")[-1]).group(0)
    assert re.search(r"\| stage 2 \|", summary), summary  # the epoch crossed the switch: not 1.5
    assert set(values(log, "stage")) == {1.0, 2.0}


def test_every_validation_writes_each_experts_load_per_layer(run, capsys):
    save_dir, _ = run
    with open(os.path.join(save_dir, "expert_loads.json")) as f:
        record = json.load(f)
    assert record["layers"] == ["decoder.layers.1", "decoder.layers.2"]
    assert [v["update"] for v in record["validations"]] == [5, 10, 15, 20]
    for v in record["validations"]:
        first, second = (sum(load) for load in v["load"])
        assert first == second > 0  # both layers route every non-pad token of the validation set
        assert all(len(load) == 4 for load in v["load"])
    assert len({sum(v["load"][0]) for v in record["validations"]}) == 1  # the same validation set each time

    expert_load.main([save_dir, "--plot", os.path.join(save_dir, "loads.png")])
    out = capsys.readouterr().out
    assert "update 20" in out and "decoder.layers.2" in out and "max/mean" in out
    assert os.path.getsize(os.path.join(save_dir, "loads.png")) > 0


def test_a_missing_or_foreign_record_is_refused_by_name_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as done:
        expert_load.main([str(tmp_path)])
    assert done.value.code.startswith(f"stablemoe-expert-load: {tmp_path}/expert_loads.json does not exist: "
                                      "fairseq-train writes it")
    (tmp_path / "expert_loads.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SystemExit, match="is not an expert load record of this version"):
        expert_load.main([str(tmp_path)])


def test_plot_prints_the_report_and_nothing_else(tmp_path):
    """Importing fairseq sets the root logger to DEBUG; matplotlib then logged ~230 font lines on stderr."""
    pytest.importorskip("matplotlib")
    (tmp_path / "expert_loads.json").write_text(json.dumps({
        "format": "fairseq_stablemoe.expert_loads/1", "layers": ["decoder.layers.2"], "num_experts": [4],
        "validations": [{"update": u, "subset": 0, "load": [[5, 3, 2, u % 3]]} for u in (10, 20)]}))
    proc = subprocess.run([sys.executable, "-m", "fairseq_stablemoe.analysis.expert_load", str(tmp_path),
                           "--plot", str(tmp_path / "loads.png")], capture_output=True, text=True,
                          cwd=helpers.ROOT, env={**os.environ, "PYTHONPATH": helpers.ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[:2000]
    assert proc.stdout.startswith("update 20 (validation subset 0):") and "wrote " in proc.stdout

"""Issue 20's ablations (--stage2-gate one, --hash-gate sigmoid, --hash-type file) and the gate's logged
distribution (mean, 10th percentile, share below 0.1) in the log, TensorBoard's metrics and expert_loads.json."""
import json
import os

import pytest
import torch

import helpers
from fairseq_stablemoe.moe import gate_stats
from fairseq_stablemoe.moe.layer import MoELayer
from fairseq_stablemoe.moe.routing import TokenView
from fairseq_stablemoe.moe.routing.hash import HashRouting

# Every message checked here, by its docs/errors.md case id.
MESSAGES = {
    "hash-gate-routing": "--hash-gate sigmoid applies to --moe-routing hash only (got --moe-routing stablemoe); "
                         "StableMoE's own gate is --stage2-gate",
    "stage2-gate-routing": "--stage2-gate one applies to --moe-routing stablemoe only (got --moe-routing hash); for "
                           "Hash layers use --hash-gate",
    "hash-table-missing-flag": "--hash-type file routes by the table of a StableMoE checkpoint: add --hash-table PATH "
                               "(a checkpoint_last.pt written in stage 2)",
    "hash-table-without-file": "--hash-table t.pt is read only with --hash-type file (got --hash-type balanced); add "
                               "--hash-type file or drop --hash-table",
    "hash-table-missing": "--hash-table <path> does not exist: pass a StableMoE checkpoint written in stage 2 (e.g. "
                          "its checkpoint_last.pt); to evaluate a model trained with it without the file, add "
                          "--model-overrides \"{'hash_type': 'random', 'hash_table': None}\" (the checkpoint carries "
                          "its table)",
    "hash-table-count": "--hash-table <path> holds 0 distilled-router tables (routing.distilled_router.table); pass a "
                        "checkpoint of a StableMoE model with one MoE layer and --distilled-router wordemb",
    "hash-table-vocab": "--hash-table <path>: the table covers 54 token ids (torch.int64) but this model's "
                        "dictionary has 64: use a checkpoint trained on the same data directory",
    "hash-table-stage1": "--hash-table <path> was written in stage 1 (its table is not built yet): pass a checkpoint "
                         "saved after --stage1-updates",
    "hash-table-experts": "--hash-table <path> routes to expert 3 but --moe-experts is 2: use the --moe-experts of "
                          "the run that wrote it",
}


def layer_of(model):
    return model.moe_layers()[0]


def randomize(module):
    """Experts start with a zero output projection: give every weight a value, so the FFN's output is not 0."""
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)


def stage2_model(tmp_path, *flags):
    model, _ = helpers.build_lm(tmp_path, *flags)
    layer_of(model).routing.end_stage1(0)
    randomize(layer_of(model).experts)
    return model.eval()


def test_stage2_gate_one_adds_the_expert_output_as_is(tmp_path):
    """h + 1·FFN(h): the sigmoid-gated output is h + σ(s)·(the gate-one output − h), token by token."""
    model = stage2_model(tmp_path, "--stage2-gate", "one")
    layer = layer_of(model)
    x, tokens = torch.randn(16, 2, 32), torch.randint(4, 50, (2, 16))
    with torch.no_grad():
        ungated, aux = MoELayer.forward(layer, x, tokens)  # the layer alone, outside the model's stack
        layer.routing.stage2_gated = True
        gated, _ = MoELayer.forward(layer, x, tokens)
        h = x.reshape(-1, 32)
        expert = layer.routing.distilled_router.route(tokens, 16, fixed=True).t().reshape(-1)
        gate = torch.sigmoid((h * layer.routing.centroids[expert]).sum(-1))
    ffn = ungated.reshape(-1, 32) - h
    assert ffn.abs().min() > 0  # every token got its expert's output
    torch.testing.assert_close(gated.reshape(-1, 32), h + gate[:, None] * ffn, rtol=1e-5, atol=1e-5)
    assert "gate" not in aux  # no soft gate, so no gate statistics


def test_stage2_gate_one_keeps_the_gate_in_stage_1(tmp_path):
    model, _ = helpers.build_lm(tmp_path, "--stage2-gate", "one")
    routing = layer_of(model).routing
    h, tokens = torch.randn(8, 32), torch.randint(4, 50, (1, 8))
    assert routing.train()(h, TokenView(tokens, 8, None)).gate is not None  # the balance loss needs σ
    routing.end_stage1(0)
    assert routing(h, TokenView(tokens, 8, None)).gate is None


def test_hash_gate_is_stablemoe_gate_on_the_table_and_trains_the_centroids():
    table = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    routing = HashRouting(table, num_experts=4, dim=6, gated=True)
    h, tokens = torch.randn(5, 6, requires_grad=True), torch.tensor([[1, 2, 4, 5, 7]])
    out = routing(h, TokenView(tokens, 5, None))
    expert = table[tokens[0]]
    assert out.expert.tolist() == expert.tolist()
    torch.testing.assert_close(out.gate, torch.sigmoid((h * routing.centroids[expert]).sum(-1)))
    out.gate.sum().backward()
    used = routing.centroids.grad.abs().sum(1) > 0
    assert used.tolist() == [False, True, True, False]  # the experts the table chose, and only those


def test_hash_without_gate_has_no_centroids(tmp_path):
    model, _ = helpers.build_lm(tmp_path, "--moe-routing", "hash")
    routing = layer_of(model).routing
    assert routing.centroids is None and not list(routing.parameters())


def save_stablemoe(tmp_path, *flags, vocab=50, stage2=True):
    model, _ = helpers.build_lm(tmp_path / "src", *flags, vocab=vocab)
    if stage2:
        layer_of(model).routing.end_stage1(0)
    path = str(tmp_path / "stablemoe.pt")
    torch.save({"model": model.state_dict()}, path)
    return path, model


def test_table_file_routes_exactly_as_the_file_says(tmp_path):
    path, source = save_stablemoe(tmp_path)
    table = layer_of(source).routing.distilled_router.table
    assert len(set(table.tolist())) > 1  # a table that tells routings apart
    model, _ = helpers.build_lm(tmp_path / "dst", "--moe-routing", "hash", "--hash-type", "file",
                                "--hash-table", path, "--hash-gate", "sigmoid")
    routing = layer_of(model).routing
    assert torch.equal(routing.table, table)
    tokens = torch.randint(4, 50, (3, 10))
    routed = routing.decide(torch.randn(30, 32), TokenView(tokens, 10, None))
    assert routed.tolist() == table[tokens.t().reshape(-1)].tolist()


def table_error(tmp_path, path, *flags, vocab=50):
    with pytest.raises(ValueError) as err:
        helpers.build_lm(tmp_path / "dst", "--moe-routing", "hash", "--hash-type", "file", "--hash-table", path,
                         *flags, vocab=vocab)
    return str(err.value).replace(str(path), "<path>")


def test_table_file_errors(tmp_path):
    assert table_error(tmp_path, str(tmp_path / "none.pt")) == MESSAGES["hash-table-missing"]
    path, _ = save_stablemoe(tmp_path, stage2=False)
    assert table_error(tmp_path, path) == MESSAGES["hash-table-stage1"]
    path, _ = save_stablemoe(tmp_path)
    assert table_error(tmp_path, path, vocab=60) == MESSAGES["hash-table-vocab"]
    assert table_error(tmp_path, path, "--moe-experts", "2") == MESSAGES["hash-table-experts"]
    hash_path, _ = save_stablemoe(tmp_path, "--moe-routing", "hash", stage2=False)
    assert table_error(tmp_path, hash_path) == MESSAGES["hash-table-count"]


class Payload:
    def __reduce__(self):
        return os.system, ("touch " + MARKER,)


MARKER = "/tmp/test_ablations_table_ran_code"


def test_table_file_cannot_run_code(tmp_path):
    path = str(tmp_path / "evil.pt")
    if os.path.exists(MARKER):
        os.remove(MARKER)
    torch.save({"model": {}, "x": Payload()}, path)
    message = table_error(tmp_path, path)
    assert message.startswith("--hash-table <path> holds pickled objects other than tensors")
    assert not os.path.exists(MARKER)


@pytest.mark.parametrize("case, flags", [
    ("hash-gate-routing", ("--hash-gate", "sigmoid")),
    ("stage2-gate-routing", ("--moe-routing", "hash", "--stage2-gate", "one")),
    ("hash-table-missing-flag", ("--moe-routing", "hash", "--hash-type", "file")),
    ("hash-table-without-file", ("--moe-routing", "hash", "--hash-table", "t.pt")),
])
def test_flag_errors(tmp_path, case, flags):
    with pytest.raises(ValueError) as err:
        helpers.build_lm(tmp_path, *flags)
    assert str(err.value) == MESSAGES[case]


def test_every_message_here_is_a_row_of_docs_errors_md():
    from test_errors import doc_messages

    rows = doc_messages()
    for case, message in MESSAGES.items():
        assert rows[case] == message, case


# --- the gate's distribution -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, gated", [
    (("--moe-routing", "stablemoe"), True), (("--moe-routing", "switch"), True), (("--moe-routing", "base"), True),
    (("--moe-routing", "hash", "--hash-gate", "sigmoid"), True), (("--moe-routing", "hash"), False),
    (("--moe-routing", "dense"), False)])
def test_every_soft_gate_is_described(tmp_path, flags, gated):
    model, _ = helpers.build_lm(tmp_path, *flags)
    model.eval()  # BASE's balanced assignment (training) needs fairseq.libbase; its gate is the same σ(s)
    with torch.no_grad():
        aux = model(torch.randint(4, 50, (2, 16)))[1]["moe_aux"][layer_of(model)]
    assert ("gate" in aux) == (flags[1] != "dense")  # every routed layer reports a row, zeros without a gate
    assert bool(aux.get("gate", torch.zeros(1)).any()) == gated
    if gated:
        assert aux["gate"][2:].sum() == 32  # every routed token in the histogram


def test_gate_summary_by_hand():
    # 20 gates: ten at 0.05 (bin 5), ten at 0.55 (bin 55); the 10th percentile is the 2nd of 20 values: the
    # target count 2 lies 2/10 into bin 5, so 0.05 + 0.2 · 0.01 = 0.052
    row = gate_stats.gate_row(torch.tensor([0.05] * 10 + [0.55] * 10))
    assert row.shape == (gate_stats.ROW,) and row[2 + 5] == 10 and row[2 + 55] == 10
    found = gate_stats.summary(row)
    assert found["mean"] == pytest.approx(0.3)
    assert found["below_0.1"] == pytest.approx(0.5)
    assert found["p10"] == pytest.approx(0.052)
    # summed over two batches, not averaged: 1 token at 0.995 (bin 99) + 9 at 0.5 → the 10 % point is bin 50's 1st
    both = gate_stats.gate_row(torch.tensor([0.995])) + gate_stats.gate_row(torch.full((9,), 0.5))
    assert gate_stats.summary(both)["p10"] == pytest.approx(0.50 + 1 / 9 * 0.01)
    assert gate_stats.summary(torch.zeros(gate_stats.ROW)) is None
    assert gate_stats.gate_row(torch.tensor([1.0, 0.0]))[[2, 2 + 99]].tolist() == [1, 1]


def test_gate_metrics_are_read_from_the_summed_histogram():
    from fairseq import metrics

    from fairseq_stablemoe.criterions.moe_aux import MoEAuxLossMixin

    batches = [torch.tensor([0.05] * 10), torch.tensor([0.55] * 10)]
    outputs = [{"moe_tokens": 10, "moe_forwards": 1, "moe_gate": gate_stats.gate_row(g)[None]} for g in batches]
    with metrics.aggregate(new_root=True) as agg:
        for output in outputs:  # fairseq reduces batch by batch at validation
            MoEAuxLossMixin.reduce_moe_metrics([output])
        values = agg.get_smoothed_values()
    assert values["gate_mean"] == pytest.approx(0.3)
    assert values["gate_p10"] == pytest.approx(0.052)
    assert values["gate_below_0_1"] == pytest.approx(0.5)


def test_training_logs_and_records_the_gate(tmp_path):
    """StableMoE with and without its stage-2 gate: the log lines, and expert_loads.json at each validation."""
    data = helpers.tiny_lm_data(tmp_path)
    logs = {}
    for name, flags in (("sigmoid", ()), ("one", ("--stage2-gate", "one"))):
        save_dir = str(tmp_path / name)
        args = helpers.train_lm_args(data, save_dir, "--log-format", "json", "--validate-interval-updates", "2",
                                     *flags, stage1=2, max_update=4)
        helpers.run_fairseq_train(args, str(tmp_path / f"{name}.log"))
        logs[name] = open(tmp_path / f"{name}.log").read()
        record = json.load(open(os.path.join(save_dir, "expert_loads.json")))
        gates = [v.get("gate") for v in record["validations"]]
        if name == "sigmoid":
            assert gates and all(g and set(g[0]) == {"mean", "p10", "below_0.1"} for g in gates)
            assert all(0 < g[0]["p10"] <= g[0]["mean"] < 1 for g in gates)
        else:  # validation routes as stage 2: no soft gate to describe
            assert all(g is None for g in gates)
    lines = {name: [json.loads(line) for line in log.splitlines() if line.startswith("{\"epoch\"")]
             for name, log in logs.items()}
    valid = [stats for stats in lines["sigmoid"] if "valid_loss" in stats]
    assert len(valid) == 2 and all(0 < float(v["valid_gate_p10"]) < 1 and "valid_gate_below_0_1" in v for v in valid)
    inner = [stats for stats in lines["sigmoid"] if "num_updates" in stats and "loss" in stats]
    assert len(inner) == 4 and all(float(stats["gate_mean"]) > 0 for stats in inner)  # the training lines too
    assert not any("valid_gate_mean" in stats for stats in lines["one"])
    # --stage2-gate one: the stage-1 lines have the gate, the stage-2 lines say there is none
    stage_gate = [(stats["stage"], stats["gate_mean"]) for stats in lines["one"] if "gate_mean" in stats]
    assert [stage for stage, _ in stage_gate] == ["1", "1", "2", "2"]
    assert all(gate is not None for stage, gate in stage_gate if stage == "1")
    assert all(gate is None for stage, gate in stage_gate if stage == "2")


def test_resuming_with_another_gate_or_table_is_refused():
    from fairseq_stablemoe.checks import resume_checks

    saved = {"moe_routing": "hash", "hash_gate": "sigmoid", "stage2_gate": "sigmoid", "hash_table": "a.pt"}
    now = {"moe_routing": "hash", "hash_gate": "none", "stage2_gate": "one", "hash_table": "b.pt"}
    with pytest.raises(ValueError, match=r"--hash-table a.pt \(checkpoint\) / b.pt \(command line\), --hash-gate "
                                         r"sigmoid \(checkpoint\) / none \(command line\), --stage2-gate sigmoid"):
        resume_checks.compare_moe_settings(saved, now, "ckpt.pt")
    resume_checks.compare_moe_settings(saved, saved, "ckpt.pt")

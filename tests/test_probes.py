"""Routing probes (paper Figs. 2 and 7) and the expert -> token table (Table 9)."""
import re
import shutil

import pytest
import torch
import torch.nn as nn
from fairseq.data import Dictionary

from fairseq_stablemoe.analysis import expert_tokens, fluctuation
from fairseq_stablemoe.moe import EncoderMoELayer, Experts, MoELayer
from fairseq_stablemoe.moe.placement import stack_forward
from fairseq_stablemoe.moe.distilled_router import WordEmbeddingRouter
from fairseq_stablemoe.moe.decisions import probe_experts
from fairseq_stablemoe.moe.routing import affinities
from fairseq_stablemoe.moe.routing.stablemoe import StableMoERouting
from fairseq_stablemoe.tasks.routing_probes import FORMAT, load_probes, save_probes
from helpers import preprocess_lm, run_cli, train_lm_args, write_corpus

PAD = 1
STAGE1, MAX_UPDATE, INTERVAL = 10, 30, 5

# 5 tokens x 5 probes; the final probe (update 50) is each token's final expert
UPDATES = [0, 10, 20, 45, 50]
EXPERTS = [  # per token, its expert at each probe
    [0, 0, 0, 0, 0],  # never differs: last fluctuation step 0
    [1, 0, 0, 0, 0],  # last differs at update 0
    [0, 1, 0, 0, 0],  # update 10: exactly 20% of 50, so not "after" 20%
    [0, 0, 0, 1, 0],  # update 45: after 80%
    [0, 1, 2, 3, 3],  # update 20: after 20%, not after 50%
]


def hand_made_record():
    experts = torch.tensor(EXPERTS, dtype=torch.uint8).t().contiguous()  # probes x tokens
    return {"format": FORMAT, "layers": ["decoder.layers.1"], "num_experts": [4],
            "tokens": [torch.arange(4, 9, dtype=torch.int32)], "updates": torch.tensor(UPDATES),
            "experts": [experts]}


def test_last_fluctuation_cdf_and_change_rates_by_hand():
    record = hand_made_record()
    experts = record["experts"][0].long()
    assert fluctuation.last_fluctuation_steps(record["updates"], experts).tolist() == [0, 0, 10, 45, 20]
    (layer,) = fluctuation.summarize(record, [20, 50, 80])
    assert layer["share_after"] == pytest.approx({20: 2 / 5, 50: 1 / 5, 80: 1 / 5})
    # tokens changing between probes: {1,2,4}, {2,4}, {3,4}, {3}
    assert layer["change_rates"] == pytest.approx([3 / 5, 2 / 5, 2 / 5, 1 / 5])


def test_fluctuation_without_probes_says_what_to_add_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as done:
        fluctuation.main([str(tmp_path)])
    assert done.value.code == (f"stablemoe-fluctuation: {tmp_path}/routing_probes.pt does not exist: "
                               "train with --routing-probe-interval K to record probes")


def test_fluctuation_command_reads_a_save_dir_and_plots(tmp_path, capsys):
    save_probes(str(tmp_path / "routing_probes.pt"), hand_made_record())
    plot = tmp_path / "fluctuation.png"
    args = [str(tmp_path)] + (["--plot", str(plot)] if _has_matplotlib() else [])
    fluctuation.main(args)
    out = capsys.readouterr().out
    assert "5 probes, updates 0..50" in out
    assert "40.0% / 20.0% / 20.0% of tokens" in out
    assert re.search(r"\n\s+45\s+40\.00%\n", out)
    if _has_matplotlib():
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class ToyModel(nn.Module):
    """Embedding, dropout, two MoE layers, output layer: enough to see what a probe runs and touches."""

    def __init__(self, vocab=12, dim=4, experts=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.dropout = nn.Dropout(0.5)
        self.moe = nn.ModuleList(
            EncoderMoELayer(StableMoERouting(dim, experts, WordEmbeddingRouter(vocab, experts, 3, PAD), 5),
                     Experts(range(experts), dim, 8, 1), experts, PAD) for _ in range(2))
        for p in self.moe.parameters():
            nn.init.normal_(p)  # non-identity experts: the second layer's input depends on the first
        self.out = nn.Linear(dim, vocab)

    def forward(self, src_tokens):
        x = self.dropout(self.embed(src_tokens)).transpose(0, 1)
        with stack_forward(self.moe, src_tokens):
            for layer in self.moe:
                x = layer(x)
        return self.out(x)


def test_probe_asks_decide_in_eval_mode_and_leaves_training_untouched():
    model = ToyModel().train()
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, PAD, PAD]])
    calls = []
    model.moe[1].experts.register_forward_hook(lambda *_: calls.append("experts of the last MoE layer"))
    model.out.register_forward_hook(lambda *_: calls.append("output layer"))
    rng = torch.get_rng_state()

    decided = probe_experts(model, {"src_tokens": tokens})

    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert calls == []  # nothing after the last MoE layer's routing decision runs
    with torch.no_grad():
        x = model.embed(tokens).transpose(0, 1)  # no dropout
        expected = []
        for layer in model.moe:
            e = affinities(x.transpose(0, 1).reshape(-1, 4), layer.routing.centroids).argmax(-1).view(2, 4)
            expected.append(e.masked_fill(tokens.eq(PAD), -1))  # stage 1: the backbone's greedy choice
            x, _ = MoELayer.forward(layer.eval(), x, tokens)  # later layers see the earlier ones' inference routing
    assert list(decided) == ["moe.0", "moe.1"]
    for (ids, experts), want in zip(decided.values(), expected):
        assert torch.equal(ids, tokens) and torch.equal(experts, want)

    model.moe[0].routing.end_stage1(0)  # stage 2: the frozen router's token -> expert table
    _, experts = probe_experts(model, {"src_tokens": tokens})["moe.0"]
    table = model.moe[0].routing.distilled_router.table
    assert torch.equal(experts, table[tokens].masked_fill(tokens.eq(PAD), -1))


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    """A tiny stablemoe LM trained with probes: stage 1 for STAGE1 updates, MAX_UPDATE in all."""
    root = tmp_path_factory.mktemp("probes")
    data = preprocess_lm(write_corpus(root / "text"), root / "bin")
    save = root / "ckpt"
    log = run_cli("fairseq_cli.train", train_lm_args(
        data, save, "--routing-probe-interval", INTERVAL, "--routing-probe-tokens", 256, "--dropout", 0.1,
        stage1=STAGE1, max_update=MAX_UPDATE))
    return data, save, log


@pytest.mark.slow
def test_stablemoe_routing_never_changes_after_stage1(probed_run):
    """Issue 3, acceptance 3: zero changes after --stage1-updates, some before."""
    _, save, log = probed_run
    record = load_probes(str(save))
    updates = record["updates"].tolist()
    assert updates == list(range(0, MAX_UPDATE + 1, INTERVAL))
    assert record["experts"][0].dtype == torch.uint8 and record["experts"][0].shape == (len(updates), 256)
    (layer,) = fluctuation.summarize(record, [20, 50, 80])
    changes = dict(zip(updates[1:], layer["change_rates"]))
    assert all(rate == 0 for update, rate in changes.items() if update > STAGE1), changes
    assert any(rate > 0 for update, rate in changes.items() if update < STAGE1), changes
    assert layer["share_after"][50] == 0  # STAGE1 < 50% of MAX_UPDATE
    assert re.search(r"route_change=0\.\d+", log) and "route_change=0," in log

    # the record holds the routing training used: in stage 2, the frozen router's token -> expert table
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    table = state["model"][f"{record['layers'][0]}.routing.distilled_router.table"]
    assert torch.equal(record["experts"][0][-1].long(), table[record["tokens"][0].long()])


@pytest.mark.slow
def test_resumed_run_continues_the_record(probed_run, tmp_path):
    data, save, _ = probed_run
    for name in ("checkpoint_last.pt", "routing_probes.pt"):
        shutil.copy(save / name, tmp_path / name)
    before = load_probes(str(tmp_path))
    run_cli("fairseq_cli.train", train_lm_args(
        data, tmp_path, "--routing-probe-interval", INTERVAL, "--routing-probe-tokens", 256, "--dropout", 0.1,
        stage1=STAGE1, max_update=MAX_UPDATE + INTERVAL))
    after = load_probes(str(tmp_path))
    assert after["updates"].tolist() == list(range(0, MAX_UPDATE + INTERVAL + 1, INTERVAL))
    assert torch.equal(after["experts"][0][: len(before["updates"])], before["experts"][0])
    assert torch.equal(after["tokens"][0], before["tokens"][0])


@pytest.mark.slow
def test_expert_token_table_follows_the_frozen_router(probed_run, capsys):
    data, save, _ = probed_run
    expert_tokens.main([str(data), "--path", str(save / "checkpoint_last.pt"), "--top", "3", "--cpu"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)%\s+(.*)$", out, re.M)
    assert "decoder.layers.1: 4 experts" in out and len(rows) == 4
    assert sum(float(load) for _, load, _ in rows) == pytest.approx(100, abs=0.5)
    dictionary = Dictionary.load(str(data / "dict.txt"))
    table = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"][
        "decoder.layers.1.routing.distilled_router.table"]
    listed = [(int(expert), token) for expert, _, tokens in rows for token in re.findall(r"(\S+) \(\d+\)", tokens)]
    assert listed and all(table[dictionary.index(token)] == expert for expert, token in listed)

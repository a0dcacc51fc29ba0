"""--distilled-router transformer (paper Table 6): causal, prefix-consistent, frozen in stage 2, checkpointed."""
import pytest
import torch

import fairseq_stablemoe  # noqa: F401  (registers the plugin for in-process loading)
from fairseq_stablemoe.moe import parameter_counts
from fairseq_stablemoe.moe.distilled_router import TransformerRouter
from helpers import PLUGIN, build_lm, preprocess_lm, run_cli, train_lm_args, write_corpus

PAD = 1


def trained_router(layers=2, dim=12, vocab=30, experts=4):
    torch.manual_seed(0)
    router = TransformerRouter(vocab, experts, dim, PAD, layers=layers)
    with torch.no_grad():
        for p in router.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # away from the N(0, 0.02) init, where every score is near 0
    return router.eval()


def test_a_prefix_routes_like_the_full_sequence():
    router = trained_router()
    tokens = torch.randint(4, 30, (3, 11))
    full = router(tokens, 11)
    for t in range(1, 12):
        assert torch.allclose(router(tokens[:, :t], 1), full[:, t - 1: t], atol=1e-5)
        assert torch.equal(router.route(tokens[:, :t], 1), full[:, t - 1].argmax(-1, keepdim=True))
    # and it is causal: changing a later token leaves earlier scores alone
    changed = tokens.clone()
    changed[:, 7] = 4 + (changed[:, 7] - 3) % 26
    assert torch.allclose(router(changed, 11)[:, :7], full[:, :7], atol=1e-6)
    assert not torch.allclose(router(changed, 11)[:, 7:], full[:, 7:], atol=1e-3)


def test_left_padding_does_not_change_the_routing():
    router = trained_router()
    tokens = torch.randint(4, 30, (1, 6))
    padded = torch.cat([torch.full((1, 3), PAD), tokens], 1)
    assert torch.allclose(router(padded, 6), router(tokens, 6), atol=1e-5)
    assert torch.isfinite(router(padded, 9)).all()  # pad positions too: no all-masked softmax


def test_layers_and_parameters(tmp_path):
    model, _ = build_lm(tmp_path, "--distilled-router", "transformer", "--distilled-router-layers", 3)
    router = model.moe_layers()[0].routing.distilled_router
    assert isinstance(router, TransformerRouter) and len(router.blocks) == 3
    # every router parameter is a distilled-router parameter (what the reproductions count as routing params)
    names = {n for n, _ in model.named_parameters() if ".distilled_router." in n}
    assert len(names) == len(list(router.parameters())) and any(".blocks.2." in n for n in names)
    routing = model.moe_layers()[0].routing
    assert parameter_counts(model)[2] == sum(p.numel() for p in routing.parameters())  # counted as routing
    assert sum(p.numel() for p in router.parameters()) > sum(p.numel() for p in router.embed.parameters()) * 2
    with pytest.raises(ValueError, match="--distilled-router-layers 2 applies to --distilled-router transformer"):
        build_lm(tmp_path, "--distilled-router-layers", 2)


def test_incremental_decoding_equals_full_forward(tmp_path):
    torch.manual_seed(0)
    model, task = build_lm(tmp_path, "--distilled-router", "transformer", "--distilled-router-layers", 2)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        tokens = torch.randint(4, len(task.dictionary), (3, 9))
        full = model(tokens)[0]
        state = {}
        steps = [model.decoder.forward(tokens[:, : t + 1], incremental_state=state)[0] for t in range(9)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trm")
    data = preprocess_lm(write_corpus(root / "text"), str(root / "bin"))
    save = root / "run"
    run_cli("fairseq_cli.train", train_lm_args(data, save, "--distilled-router", "transformer",
                                               "--distilled-router-layers", 2, "--save-interval-updates", 10,
                                               stage1=10, max_update=30))
    return data, save


def router_state(path):
    state = torch.load(path, weights_only=True)["model"]
    return {k: v for k, v in state.items() if ".distilled_router." in k}


@pytest.mark.slow  # the fixture trains
def test_frozen_bit_identical_in_stage2(trained):
    _, save = trained
    at_switch, end = router_state(save / "checkpoint_1_10.pt"), router_state(save / "checkpoint_last.pt")
    assert any(".blocks.1." in k for k in end)
    assert at_switch.keys() == end.keys()
    for k in at_switch:
        assert torch.equal(at_switch[k], end[k]), k


@pytest.mark.slow  # the fixture trains; fairseq-eval-lm
def test_checkpoint_round_trip(trained):
    from fairseq import checkpoint_utils

    data, save = trained
    path = str(save / "checkpoint_last.pt")
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    model = models[0].eval()
    routing = model.moe_layers()[0].routing
    router = routing.distilled_router
    assert cfg.model.distilled_router_layers == 2 and len(router.blocks) == 2 and routing.in_stage2
    saved = router_state(path)
    for name, value in model.state_dict().items():
        if ".distilled_router." in name:
            assert torch.equal(value, saved[name]), name
    tokens = torch.randint(4, len(task.dictionary), (2, 16))
    assert torch.equal(router.route(tokens, 16), router(tokens, 16).argmax(-1))
    out = run_cli("fairseq_cli.eval_lm", [data, "--user-dir", PLUGIN, "--path", path, "--tokens-per-sample", 32,
                                          "--cpu", "--num-workers", 0])
    assert "Perplexity" in out

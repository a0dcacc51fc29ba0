"""stablemoe_lm through fairseq's own CLIs: train across the stage switch, freeze, resume, evaluate."""
import copy
import glob
import os

import pytest
import torch

import fairseq_stablemoe  # noqa: F401  (registers the plugin for in-process loading)
from helpers import PLUGIN, preprocess_lm, run_cli, saved_stage, train_lm_args, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return preprocess_lm(write_corpus(root / "text"), str(root / "bin"))


def load(path):
    return torch.load(path, weights_only=True)["model"]  # also checks the checkpoint loads safely


def router_state(model_state):
    return {k: v for k, v in model_state.items() if "distilled_router" in k}


def test_train_switch_and_eval_lm(data, tmp_path):
    out = run_cli("fairseq_cli.train", train_lm_args(data, tmp_path, stage1=20, max_update=40))
    assert out.count("enter stage 2") == 1 and "update 20: 1 MoE layer(s) enter stage 2" in out
    assert "stage=1" in out and "stage=2" in out and "distill_acc" in out
    out = run_cli("fairseq_cli.eval_lm", [data, "--user-dir", PLUGIN, "--path", tmp_path / "checkpoint_last.pt",
                                          "--tokens-per-sample", 32, "--cpu", "--num-workers", 0])
    assert "Perplexity" in out


def test_router_frozen_bit_identical_after_50_stage2_adam_updates(data, tmp_path):
    run_cli("fairseq_cli.train", train_lm_args(data, tmp_path, "--save-interval-updates", 10,
                                               stage1=10, max_update=60))
    at_switch, end = load(tmp_path / "checkpoint_1_10.pt"), load(tmp_path / "checkpoint_last.pt")
    before, after = router_state(at_switch), router_state(end)
    table = [k for k in after if k.endswith("table")]
    assert table and (after[table[0]] >= 0).all()  # the vocab -> expert map, built at the switch
    assert saved_stage(end) == 2 and saved_stage(at_switch) == 1
    for k in before:
        if not k.endswith("table"):
            assert torch.equal(before[k], after[k]), k
    # the experts and the gate's centroids did keep learning
    assert not torch.equal(at_switch["decoder.layers.1.routing.centroids"], end["decoder.layers.1.routing.centroids"])


def probe_losses_and_routing(data, checkpoint):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    model = models[0].eval()
    tokens = torch.arange(4, 36).view(2, 16) % len(task.dictionary)
    tokens[tokens < 4] = 4
    with torch.no_grad():
        logits, extra = model(tokens)
    layer = model.moe_layers()[0]
    routing = extra["moe_aux"][layer]["load"], \
        layer.routing.distilled_router.route(tokens, 16, fixed=layer.routing.in_stage2)
    return logits, routing, copy.deepcopy(model.state_dict())


def test_resume_before_and_after_the_switch_matches_uninterrupted(data, tmp_path):
    k = 10
    straight = tmp_path / "straight"
    run_cli("fairseq_cli.train", train_lm_args(data, straight, stage1=k, max_update=2 * k))
    reference = probe_losses_and_routing(data, straight / "checkpoint_last.pt")
    for stop in (k - 1, k + 1):
        resumed = tmp_path / f"stop{stop}"
        run_cli("fairseq_cli.train", train_lm_args(data, resumed, stage1=k, max_update=stop))
        out = run_cli("fairseq_cli.train", train_lm_args(data, resumed, stage1=k, max_update=2 * k))
        assert ("enter stage 2" in out) == (stop < k) and ("resumed in stage 2" in out) == (stop > k)
        logits, (load, route), state = probe_losses_and_routing(data, resumed / "checkpoint_last.pt")
        assert torch.equal(route, reference[1][1]) and torch.equal(load, reference[1][0])
        assert torch.allclose(logits, reference[0], atol=1e-6)
        for name, value in reference[2].items():
            if torch.is_tensor(value):
                assert torch.allclose(state[name].float(), value.float(), atol=1e-6), name
            else:  # the routing's stage
                assert state[name] == value, name


def test_plain_language_modeling_task_refuses_to_train(data, tmp_path):
    args = train_lm_args(data, tmp_path, max_update=2)
    args[args.index("stablemoe_language_modeling")] = "language_modeling"
    args[args.index("stablemoe_cross_entropy")] = "cross_entropy"
    with pytest.raises(RuntimeError, match="--task stablemoe_language_modeling"):
        run_cli("fairseq_cli.train", args)


def test_checkpoint_with_another_dictionary_is_refused(data, tmp_path):
    run_cli("fairseq_cli.train", train_lm_args(data, tmp_path / "ckpt", stage1=1, max_update=2))
    other = preprocess_lm(write_corpus(tmp_path / "other", vocab=40), str(tmp_path / "other-bin"))
    with pytest.raises(RuntimeError, match="dict.txt is not the dictionary the checkpoint was trained with"):
        run_cli("fairseq_cli.eval_lm", [other, "--user-dir", PLUGIN, "--path", tmp_path / "ckpt/checkpoint_last.pt",
                                        "--tokens-per-sample", 32, "--cpu"])
    assert glob.glob(str(tmp_path / "ckpt/*.pt"))
    assert os.path.exists(tmp_path / "ckpt/checkpoint_last.pt")

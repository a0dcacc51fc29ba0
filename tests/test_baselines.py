"""The paper's baselines (Switch, BASE, Hash), the dense controls and the "BASE + fixed routing" ablation."""
import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_stablemoe.moe import ROUTINGS, MoESettings, parameter_counts
from fairseq_stablemoe.moe.routing import TokenView
from fairseq_stablemoe.moe.routing.base_layer import BASERouting, balanced_assignment
from fairseq_stablemoe.moe.routing.hash import HashRouting, balanced_hash
from fairseq_stablemoe.moe.routing.stablemoe import StableMoERouting
from fairseq_stablemoe.moe.routing.switch import SwitchRouting
from fairseq_stablemoe.moe.distilled_router import WordEmbeddingRouter
from fairseq_stablemoe.tasks.stablemoe_language_modeling import StableMoELanguageModelingTask

from helpers import preprocess_lm, saved_stage, write_corpus

MOE_ROUTINGS = ["stablemoe", "switch", "base", "hash"]
DENSE_CONTROLS = ["dense", "dense_deeper", "dense_wider"]


def parse(parser, argv):
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))


def no_tokens(n):
    return TokenView(torch.full((1, n), 4), n, None)


def test_switch_gate_and_loss_against_hand_computed_values():
    routing = SwitchRouting(dim=2, num_experts=2)
    with torch.no_grad():
        routing.centroids.copy_(torch.eye(2))
    h = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # scores = h: experts 0, 1, 0
    routing.train()
    out = routing(h, no_tokens(3))

    e2, e1 = math.exp(2), math.exp(1)
    probs = [[e2 / (e2 + 1), 1 / (e2 + 1)], [1 / (1 + e1), e1 / (1 + e1)], [e1 / (e1 + 1), 1 / (e1 + 1)]]
    f = [2 / 3, 1 / 3]
    mean_prob = [sum(p[i] for p in probs) / 3 for i in range(2)]
    expected = 2 * (f[0] * mean_prob[0] + f[1] * mean_prob[1])  # N · Σ f_i · P_i = 1.08462...

    assert out.expert.tolist() == [0, 1, 0]
    assert out.gate.tolist() == pytest.approx([probs[0][0], probs[1][1], probs[2][0]])
    # a token sum: the criterion divides by the token count
    assert out.losses["switch"].item() / 3 == pytest.approx(expected)
    assert expected == pytest.approx(1.08462, abs=1e-5)
    out.losses["switch"].backward()
    assert routing.centroids.grad.abs().sum() > 0  # through P_i (f_i is a count)

    routing.eval()
    assert routing(h, no_tokens(3)).losses == {}


def test_criterion_adds_the_switch_loss_times_its_factor():
    from fairseq_stablemoe.criterions.stablemoe_cross_entropy import (
        StableMoECrossEntropyConfig, StableMoECrossEntropyCriterion)
    from fairseq_stablemoe.moe import Experts, MoELayer

    assert StableMoECrossEntropyConfig().switch_loss_factor == 0.01  # the Switch Transformer's
    criterion = StableMoECrossEntropyCriterion(None, False, balance_factor=0.3, distill_factor=0.3,
                                               switch_loss_factor=0.5)
    torch.manual_seed(0)
    model = torch.nn.ModuleList([MoELayer(SwitchRouting(8, 4), Experts(range(4), 8, 16, 1), 4, padding_idx=1)])
    model.train()
    _, aux = model[0](torch.randn(5, 2, 8), torch.full((2, 5), 4))
    log = {}
    report = {model[0]: model[0].report(aux, ran=True)}  # what a model's stack hands the criterion
    loss = criterion.add_moe_losses(model, (None, {"moe_aux": report}), torch.tensor(3.0), log)
    assert aux["switch_loss"] > 0
    assert loss.item() == pytest.approx(3.0 + 0.5 * aux["switch_loss"].item())
    assert log["moe_switch_loss"] == aux["switch_loss"]


@pytest.mark.parametrize("tokens", [64, 7 * 8 + 3, 5])
def test_balanced_assignment_gives_every_expert_its_share(tokens):
    torch.manual_seed(0)
    scores = torch.randn(tokens, 8)
    scores[:, 0] += 5  # every token prefers expert 0: greedy would send them all there
    counts = torch.bincount(balanced_assignment(scores), minlength=8)
    if tokens % 8 == 0:
        assert counts.tolist() == [tokens // 8] * 8
    else:
        assert counts.sum() == tokens and counts.max() - counts.min() <= 1


def test_balanced_assignment_follows_the_scores_and_survives_nan():
    scores = torch.full((8, 4), -1.0)
    for t in range(8):
        scores[t, t // 2] = 1.0  # tokens 2i, 2i+1 belong to expert i
    assert balanced_assignment(scores).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    scores[3, 1] = float("nan")
    assert torch.bincount(balanced_assignment(scores), minlength=4).tolist() == [2, 2, 2, 2]


def test_missing_libbase_names_the_flag_and_the_fix(monkeypatch):
    import fairseq
    from fairseq_stablemoe.moe.routing import base_layer

    monkeypatch.setattr(base_layer, "_libbase", None)
    monkeypatch.delattr(fairseq, "libbase", raising=False)
    monkeypatch.setitem(sys.modules, "fairseq.libbase", None)  # as if the C++ extension was never built
    with pytest.raises(ImportError, match="--moe-routing base .*build_ext --inplace"):
        balanced_assignment(torch.randn(8, 2))


def test_base_routing_is_balanced_in_training_and_greedy_at_inference():
    torch.manual_seed(0)
    routing = BASERouting(dim=16, num_experts=4)
    h = torch.randn(32, 16)
    routing.train()
    out = routing(h, no_tokens(32))
    assert out.stats["load"].tolist() == [8, 8, 8, 8]
    assert out.losses == {}
    assert torch.equal(out.gate, torch.sigmoid(h @ routing.centroids.t()).gather(1, out.expert[:, None]).squeeze(1))
    assert torch.equal(routing.decide(h, no_tokens(32)), out.expert)
    routing.eval()
    assert torch.equal(routing(h, no_tokens(32)).expert, (h @ routing.centroids.t()).argmax(-1))


def zipf_counts(vocab, exponent=1.0, total=10 ** 7):
    return [round(total / (rank + 1) ** exponent) for rank in range(vocab)]


def test_balanced_hash_is_balanced_on_a_zipf_distribution():
    counts = zipf_counts(10000)
    counts[:4] = [1, 1, 1, 1]  # fairseq's special symbols
    table = balanced_hash(counts, 8)
    load = torch.zeros(8).index_add_(0, table, torch.tensor(counts, dtype=torch.float))
    share = load / load.sum()
    assert (share - 1 / 8).abs().max() <= 0.01, share
    # a random hash is not: the most frequent token alone is 10 % of the tokens
    random_table = torch.randint(8, (10000,), generator=torch.Generator().manual_seed(0))
    random_load = torch.zeros(8).index_add_(0, random_table, torch.tensor(counts, dtype=torch.float))
    assert (random_load / random_load.sum() - 1 / 8).abs().max() > 0.01


def test_hash_routing_routes_by_token_id_with_no_gate():
    routing = HashRouting(torch.tensor([0, 0, 0, 0, 3, 1, 2, 1]), num_experts=4)
    tokens = torch.tensor([[4, 5, 6], [7, 6, 1]])  # B x S; pad 1 is not routed
    view = TokenView(tokens, 3, torch.tensor([0, 1, 2, 3, 4]))  # time-major rows minus the pad
    out = routing(torch.randn(5, 8), view)
    assert out.expert.tolist() == [3, 1, 1, 2, 2]
    assert out.gate is None and out.losses == {}
    assert "table" in routing.state_dict()


def test_a_hash_table_for_another_dictionary_is_refused():
    from fairseq_stablemoe.models.common import MoEModelMixin

    class Model(MoEModelMixin, torch.nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.routing = HashRouting(torch.zeros(vocab, dtype=torch.long), 4)

    with pytest.raises(ValueError, match="covers 12 token ids but this model's dictionary has 10"):
        Model(10).load_state_dict(Model(12).state_dict())


def test_stablemoe_balanced_stage1_distils_the_balanced_assignment():
    torch.manual_seed(0)
    routing = StableMoERouting(16, 4, WordEmbeddingRouter(20, 4, 8, padding_idx=1), stage1_updates=10,
                               stage1_assignment="balanced")
    with torch.no_grad():
        routing.centroids[0] += 1.0  # greedy would overload expert 0
    tokens = torch.randint(4, 20, (4, 8))
    h = torch.randn(32, 16) + routing.centroids[0].detach() * 10
    routing.train()
    out = routing(h, TokenView(tokens, 8, None))
    assert out.stats["load"].tolist() == [8, 8, 8, 8]
    assert set(out.losses) == {"distill"}  # balanced by construction: no balance loss
    assert torch.equal(routing.decide(h, TokenView(tokens, 8, None)), out.expert)
    routing.end_stage1(0)  # stage 2 as in StableMoE: the distilled router routes
    assert torch.equal(routing(h, TokenView(tokens, 8, None)).expert,
                       TokenView(tokens, 8, None).select(routing.distilled_router.route(tokens, 8, fixed=True)))


@pytest.fixture(scope="module")
def paper_sized_model():
    """Builds the model fairseq-train would, on the meta device (no memory), with a GPT-2-sized dictionary."""
    dictionary = Dictionary()
    for i in range(50257):
        dictionary.add_symbol(f"w{i}", n=50257 - i)
    cfg = parse(options.get_training_parser(), [
        "unused", "--user-dir", "fairseq_stablemoe", "--task", "stablemoe_language_modeling",
        "--arch", "stablemoe_lm_base", "--tokens-per-sample", "1024"])
    task = StableMoELanguageModelingTask(cfg.task, dictionary, dictionary)

    def build(routing):
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.moe_routing = routing
        with torch.device("meta"):
            return task.build_model(model_cfg)

    return build


def test_parameter_counts_match_the_paper(paper_sized_model):
    """Paper Table 2 (base): 124M shared + 454M expert for the MoEs, 578M for the larger dense Transformers."""
    shared, expert, routing = parameter_counts(paper_sized_model("switch"))
    assert round(shared / 1e6) == 124 and round(expert / 1e6) == 454
    assert expert == 32 * 3 * 4_723_968  # spec §2.3: one base expert sublayer is 4,723,968 parameters
    assert routing == 32 * 768
    # StableMoE adds the distilled router: the paper's "2.51M" (50,261 × 50 + 32 × 50) and E
    assert parameter_counts(paper_sized_model("stablemoe")) == (shared, expert, 50261 * 50 + 32 * 50 + 32 * 768)
    for dense in ("dense_deeper", "dense_wider"):
        shared, expert, routing = parameter_counts(paper_sized_model(dense))
        assert round(shared / 1e6) == 578 and expert == 0 and routing == 0


def test_dense_controls_reshape_the_moe_slot():
    class Cfg:
        moe_experts, moe_sublayers, moe_ffn_embed_dim = 32, 3, 0

    layouts = {}
    for name in ["stablemoe"] + DENSE_CONTROLS:
        Cfg.moe_routing = name
        layouts[name] = MoESettings.of(Cfg).expert_layout(3072)  # the routing decides
    assert layouts == {"stablemoe": (32, 3072, 3), "dense": (1, 3072, 3), "dense_deeper": (1, 3072, 96),
                       "dense_wider": (1, 32 * 3072, 3)}
    assert set(MOE_ROUTINGS + DENSE_CONTROLS) <= set(ROUTINGS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return Path(preprocess_lm(write_corpus(root / "text", lines=(200, 30, 30)), str(root / "bin")))


@pytest.fixture(scope="module")
def commands(corpus):
    """One fairseq-train and one fairseq-eval-lm command line, parsed once (hydra's composition takes
    seconds); each run below changes only --moe-routing (and the save dir / checkpoint path)."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only contend
    train = parse(options.get_training_parser(), [
        str(corpus), "--user-dir", "fairseq_stablemoe", "--task", "stablemoe_language_modeling",
        "--arch", "stablemoe_lm_tiny", "--criterion", "stablemoe_cross_entropy", "--moe-routing", "stablemoe",
        "--stage1-updates", "5", "--max-update", "10", "--optimizer", "adam", "--lr", "1e-3",
        "--tokens-per-sample", "64", "--batch-size", "4", "--cpu", "--save-dir", "unset", "--no-epoch-checkpoints",
        "--disable-validation", "--num-workers", "0", "--seed", "1", "--no-progress-bar"])
    evaluate = parse(options.get_eval_lm_parser(), [
        str(corpus), "--user-dir", "fairseq_stablemoe", "--path", "unset", "--gen-subset", "valid",
        "--tokens-per-sample", "64", "--cpu", "--num-workers", "0", "--no-progress-bar"])
    yield train, evaluate
    torch.set_num_threads(torch_threads)


def train_and_evaluate(commands, save_dir, **model_flags):
    from fairseq_cli import eval_lm, train

    train_cfg, eval_cfg = (copy.deepcopy(c) for c in commands)
    for name, value in model_flags.items():
        setattr(train_cfg.model, name, value)
    train_cfg.checkpoint.save_dir = str(save_dir)
    train.main(train_cfg)
    eval_cfg.common_eval.path = str(save_dir / "checkpoint_last.pt")
    return eval_lm.main(eval_cfg), torch.load(save_dir / "checkpoint_last.pt", weights_only=False)["model"]


@pytest.mark.parametrize("routing", MOE_ROUTINGS + DENSE_CONTROLS)
@pytest.mark.slow
def test_each_routing_trains_and_evaluates_from_the_same_command(routing, corpus, commands, tmp_path):
    results, state = train_and_evaluate(commands, tmp_path, moe_routing=routing)
    vocab = len(Dictionary.load(str(corpus / "dict.txt")))
    assert math.isfinite(results["perplexity"]) and results["perplexity"] < vocab  # learned something
    if routing == "hash":
        table = next(v for k, v in state.items() if k.endswith("routing.table"))
        assert table.shape[0] == vocab and table.max() < 8
    if routing == "stablemoe":
        assert saved_stage(state) == 2
    if routing.startswith("dense"):
        assert not any(k.endswith("centroids") for k in state)
        assert len({k.split(".experts.")[1].split(".")[1] for k in state if ".experts." in k}) == 1


@pytest.mark.slow
def test_base_plus_fixed_routing_ablation_trains(commands, tmp_path):
    results, state = train_and_evaluate(commands, tmp_path, stage1_assignment="balanced")
    assert math.isfinite(results["perplexity"])
    assert saved_stage(state) == 2


def test_flags_that_do_not_apply_are_refused():

    class Cfg:
        moe_experts, moe_sublayers, moe_layers, distilled_dim, stage1_updates = 8, 2, 1, 50, 10
        capacity_factor = eval_capacity_factor = 0.0
        distilled_router, moe_position, hash_type, stage1_assignment = "wordemb", "middle", "balanced", "balanced"
        moe_routing = "switch"

    with pytest.raises(ValueError, match="--stage1-assignment balanced .* --moe-routing stablemoe"):
        MoESettings.of(Cfg)
    Cfg.stage1_assignment, Cfg.hash_type = "greedy", "random"
    with pytest.raises(ValueError, match="--hash-type random applies to --moe-routing hash"):
        MoESettings.of(Cfg)

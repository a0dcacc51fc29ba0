"""Bad input gets one clear line naming the flag and the fix. Every case here is a row of docs/errors.md,
and the row shows exactly the text checked here (paths written as <placeholders>)."""
import copy
import logging
import os
import re
import unittest.mock

import pytest
import torch
from fairseq import optim

import helpers
from fairseq_stablemoe.checkpoints import CheckpointError, prepare_resume
from fairseq_stablemoe.moe import MoEConfig, MoESettings, Vocabulary
from fairseq_stablemoe.tasks.stage import check_resumed_stage, staged_routings
from fairseq_stablemoe.tasks.training_checks import check_optimizer

DOC = os.path.join(helpers.ROOT, "docs", "errors.md")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return helpers.tiny_lm_data(tmp_path_factory.mktemp("errors"))


@pytest.fixture(scope="module")
def built(data):
    return helpers.build_for_training(data)


def moe_config(**overrides):
    cfg = MoEConfig()
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


CONFIG_CASES = {
    "experts": (dict(moe_experts=1), "--moe-experts must be at least 2 (got 1); for a dense control keep it and "
                                     "use --moe-routing dense, dense_deeper or dense_wider"),
    "sublayers": (dict(moe_sublayers=0), "--moe-sublayers must be at least 1 (got 0)"),
    "ffn-dim": (dict(moe_ffn_embed_dim=-1), "--moe-ffn-embed-dim must be >= 0 (got -1); 0 means the model's FFN size"),
    "no-layers": (dict(moe_layers=0), "--moe-layers must be at least 1 (got 0); for a model without MoE use "
                                      "transformer_lm"),
    "layers-vs-depth": (dict(moe_layers=5), "--moe-layers 5 is larger than the number of Transformer blocks (4); "
                                            "use at most 4 or more blocks"),
    "distilled-dim": (dict(distilled_dim=0), "--distilled-dim must be at least 1 (got 0); the paper uses 50"),
    "stage1-negative": (dict(stage1_updates=-1), "--stage1-updates must be a number of updates >= 0 or auto (got "
                                                 "-1); the paper uses 10% of --max-update"),
    "capacity-negative": (dict(capacity_factor=-1.0), "--capacity-factor/--eval-capacity-factor must be >= 0 "
                                                      "(got -1.0/0.0); 0 means unlimited"),
    "eval-capacity-negative": (dict(eval_capacity_factor=-0.5), "--capacity-factor/--eval-capacity-factor must be "
                                                                ">= 0 (got 0.0/-0.5); 0 means unlimited"),
    "capacity-inf": (dict(capacity_factor=float("inf")), "--capacity-factor/--eval-capacity-factor must be finite "
                                                         "(got inf/0.0); use 0 for unlimited"),
    "router-unknown": (dict(distilled_router="lstm"), "--distilled-router lstm is unknown; choose one of wordemb, "
                                                      "cnn, bigram, transformer"),
    "router-layers": (dict(distilled_router_layers=0), "--distilled-router-layers must be at least 1 (got 0); the "
                                                       "paper uses 1, 2 or 3"),
    "routing-unknown": (dict(moe_routing="topk"), "--moe-routing topk is unknown; choose one of stablemoe, switch, "
                                                  "base, hash, dense, dense_deeper, dense_wider"),
    "stage1-assignment": (dict(moe_routing="switch", stage1_assignment="balanced"),
                          "--stage1-assignment balanced is a StableMoE ablation; use it with --moe-routing stablemoe "
                          "(for BASE layers themselves use --moe-routing base)"),
    "hash-type": (dict(hash_type="random"), "--hash-type random applies to --moe-routing hash only (got "
                                            "--moe-routing stablemoe)"),
    "position-unknown": (dict(moe_position="left"), "--moe-position left is unknown; choose one of middle, top, "
                                                    "bottom, scattered"),
}

# Every message checked below, by case id (a row of docs/errors.md each).
MESSAGES = {
    **{case: message for case, (_, message) in CONFIG_CASES.items()},
    "criterion": "--criterion cross_entropy ignores the MoE balance and distillation losses; use "
        "--criterion stablemoe_cross_entropy (LM) or stablemoe_label_smoothed_cross_entropy "
        "(translation)",
    "task": "StableMoE models train only under the plugin's tasks, which check the optimizer and the checkpoint "
        "they resume from and gather sharded experts before saving: use --task stablemoe_language_modeling (LM) "
        "or --task stablemoe_translation_multi_simple_epoch (translation). Evaluation works under any task.",
    "resume-stage": "this checkpoint was saved in stage 2 but --stage1-updates 10 puts update 5 "
        "in stage 1; resume with --stage1-updates <= 5, or restart training without "
        "--restore-file",
    "fp16-flat": "--fp16 flattens all parameters into one fp32 copy, which moves StableMoE's frozen "
        "distilled router in stage 2: add --fp16-no-flatten-grads (or use "
        "--memory-efficient-fp16)",
    "dictionary": "the checkpoint's distilled router covers 48 token ids but this model's dictionary "
        "has 64: evaluate with the dictionary the model was trained with (the data "
        "directory passed to fairseq-train)",
    "restore-truncated": "--restore-file <path> is truncated or not a checkpoint (<n> bytes, no zip "
        "central directory): resume from an intact checkpoint, e.g. --restore-file "
        "<newest intact checkpoint>",
    "restore-missing": "--restore-file <path> does not exist; fix the path, or drop the flag to "
        "resume from <save_dir>/checkpoint_last.pt",
    "last-truncated": "<save_dir>/checkpoint_last.pt was truncated (the run was killed while fairseq "
        "copied a checkpoint); moved it to <save_dir>/checkpoint_last.pt.damaged and replaced it with a copy of "
        "<save_dir>/checkpoint_1_10.pt, the intact checkpoint with the most updates (0): resuming from update 0",
    "unsafe-pickle": "--restore-file <path> holds pickled objects other than tensors and fairseq's "
        "settings (posix.system); we refuse arbitrary pickles because loading them can "
        "run code: use a checkpoint written by fairseq-train",
    "token-ids": "token id 48 is outside the model's dictionary (0..47): the data was "
        "binarized with another dictionary than the model's; binarize it with the model's "
        "dict.txt (fairseq-preprocess --srcdict)",
    "no-token-ids": "MoELayer needs the token ids: the model sets them before each forward",
    "experts-vs-world": "--moe-expert-parallel on needs the number of processes (3) to divide --moe-experts (8); use "
                        "a multiple of 3 experts, or --moe-expert-parallel off to replicate the experts on every rank",
    "experts-vs-world-auto": "3 processes do not divide --moe-experts 8: every rank holds all experts (no expert "
                             "parallelism); use a multiple of 3 experts to shard them",
    "hash-dictionary": "the checkpoint's hash table covers 12 token ids but this model's dictionary has 10: evaluate "
                       "with the dictionary the model was trained with (the data directory passed to fairseq-train)",
    "hash-counts": "--hash-type balanced needs the training data's count of each of the dictionary's 48 tokens (a "
                   "dict.txt written by fairseq-preprocess); use --hash-type random otherwise",
    "no-libbase": "--moe-routing base (and --stage1-assignment balanced) needs fairseq's C++ extension "
                  "fairseq.libbase for the balanced assignment; build it from fairseq's source tree with "
                  "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .` there), against "
                  "the torch you train with",
    "balance-negative": "--balance-factor must be >= 0 (got -0.1); 0 switches the balance loss off",
    "distill-negative": "--distill-factor must be >= 0 (got -0.1); 0 switches the distill loss off",
    "stage1-only": "--stage1-updates 100 >= --max-update 100: training stays in stage 1 (routing never frozen); "
                   "the paper uses --stage1-updates = 10% of --max-update",
    "stage1-zero": "--stage1-updates 0 skips stage 1: the distilled router is frozen untrained, so routing is "
                   "random and fixed; the paper uses --stage1-updates = 10% of --max-update",
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_invalid_moe_flag(case):
    overrides, message = CONFIG_CASES[case]
    with pytest.raises(ValueError) as err:
        MoESettings.of(moe_config(**overrides)).check_placements({"decoder": 4})
    assert str(err.value) == message


def test_the_model_validates_its_flags_as_fairseq_builds_it(data):
    with pytest.raises(ValueError) as err:
        helpers.build_for_training(data, "--decoder-layers", "2", "--moe-layers", "3")
    assert str(err.value) == ("--moe-layers 3 is larger than the number of Transformer blocks (2); use at most 2 "
                              "or more blocks")


@pytest.mark.parametrize("flag,case", [("--balance-factor", "balance-negative"), ("--distill-factor", "distill-negative")])
def test_negative_aux_loss_weight(data, flag, case):
    message = MESSAGES[case]
    with pytest.raises(ValueError) as err:
        helpers.build_for_training(data, flag, "-0.1")
    assert str(err.value) == message


def test_criterion_without_moe_losses(data):
    message = MESSAGES["criterion"]
    with pytest.raises(ValueError) as err:
        helpers.build_for_training(data, "--criterion", "cross_entropy")
    assert str(err.value) == message


def test_training_under_a_plain_fairseq_task(data):
    message = MESSAGES["task"]
    model = helpers.build_for_training(data, "--task", "language_modeling")[2]
    model.train()
    with pytest.raises(RuntimeError) as err:
        model(torch.tensor([[4, 5, 6]]))
    assert str(err.value) == message
    model.eval()
    model(torch.tensor([[4, 5, 6]]))  # evaluation is fine


@pytest.mark.parametrize("flags,case", [
    (["--stage1-updates", "100", "--max-update", "100"], "stage1-only"),
    (["--stage1-updates", "0", "--max-update", "100"], "stage1-zero"),
])
def test_stage_schedule_warnings(data, tmp_path, caplog, flags, case):
    message = MESSAGES[case]
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"):
        helpers.build_for_training(data, *flags, save_dir=str(tmp_path))
    assert message in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_no_schedule_warning_for_the_paper_schedule(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"):
        helpers.build_for_training(data, "--stage1-updates", "10", "--max-update", "100", save_dir=str(tmp_path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "stage1" in r.getMessage()]


def test_resume_stage2_checkpoint_into_stage1(built):
    message = MESSAGES["resume-stage"]
    model = built[2]
    fresh = copy.deepcopy(model.state_dict())
    saved = dict(fresh)
    saved.update({k: {"stage2_began": 0} for k in saved if k.endswith("routing._extra_state")})  # a stage-2 one
    model.load_state_dict(saved)
    try:
        with pytest.raises(ValueError) as err:
            check_resumed_stage(model, 5)
        assert str(err.value) == message
    finally:
        model.load_state_dict(fresh)
    assert not staged_routings(model)[0].in_stage2


def test_flattened_fp16_optimizer_is_refused(data):
    message = MESSAGES["fp16-flat"]
    cfg, _, model, _ = helpers.build_for_training(data, "--fp16", "--fp16-no-flatten-grads")  # CPU: no flat copy
    params = [p for p in model.half().parameters()]
    flat = torch.nn.Parameter(torch.cat([p.detach().float().view(-1) for p in params]))
    flattened = optim.FP16Optimizer(cfg, params, fp32_optimizer=None, fp32_params={0: flat})
    with pytest.raises(ValueError) as err:
        check_optimizer(flattened)
    assert str(err.value) == message
    # the fix: per-parameter fp32 copies (what --fp16-no-flatten-grads builds; also runs on CPU)
    cfg.common.fp16_no_flatten_grads = True
    check_optimizer(optim.FP16Optimizer.build_optimizer(cfg, params))


def test_checkpoint_of_another_dictionary(built, tmp_path):
    message = MESSAGES["dictionary"]
    other = helpers.tiny_lm_data(tmp_path, vocab=60, name="other")
    bigger = helpers.build_for_training(other)[2]
    with pytest.raises(ValueError) as err:
        bigger.load_state_dict(built[2].state_dict())
    assert str(err.value) == message


def save_tiny_checkpoint(path, payload=None):
    torch.save({"model": {"w": torch.zeros(3)}, "cfg": {"common": {"seed": 1}}, "extra_state": payload or {}}, path)


def test_truncated_restore_file(tmp_path):
    message = MESSAGES["restore-truncated"]
    intact, broken = str(tmp_path / "checkpoint_1_10.pt"), str(tmp_path / "checkpoint_1_20.pt")
    save_tiny_checkpoint(intact)
    with open(intact, "rb") as f, open(broken, "wb") as g:
        g.write(f.read()[:200])
    with pytest.raises(CheckpointError) as err:
        prepare_resume(str(tmp_path), broken)
    shown = str(err.value).replace(broken, "<path>").replace(intact, "<newest intact checkpoint>")
    assert shown == message.replace("<n>", "200")


def test_missing_restore_file(tmp_path):
    message = MESSAGES["restore-missing"]
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError) as err:
        prepare_resume(str(tmp_path / "ckpt"), missing)
    assert str(err.value).replace(missing, "<path>").replace(str(tmp_path / "ckpt"), "<save_dir>") == message


def test_truncated_last_checkpoint_is_repaired(tmp_path, caplog):
    message = MESSAGES["last-truncated"]
    source, last = str(tmp_path / "checkpoint_1_10.pt"), str(tmp_path / "checkpoint_last.pt")
    save_tiny_checkpoint(source)
    with open(source, "rb") as f, open(last, "wb") as g:
        g.write(f.read()[:300])
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"):
        assert prepare_resume(str(tmp_path), "checkpoint_last.pt") == last
    assert [r.getMessage().replace(str(tmp_path), "<save_dir>") for r in caplog.records] == [message]
    assert torch.load(last)["model"]["w"].shape == (3,)


def test_checkpoint_with_a_pickled_object_is_refused_before_training(tmp_path):
    message = MESSAGES["unsafe-pickle"]

    class Payload:
        def __reduce__(self):
            return os.system, ("true",)

    path = str(tmp_path / "evil.pt")
    save_tiny_checkpoint(path, {"x": Payload()})
    with pytest.raises(CheckpointError) as err:
        prepare_resume(str(tmp_path), path)
    assert str(err.value).replace(path, "<path>") == message


def test_tokens_outside_the_router_vocabulary(built):
    message = MESSAGES["token-ids"]
    model = built[2].eval()
    with pytest.raises(ValueError) as err:
        model(torch.tensor([[4, 5, 48]]))
    assert str(err.value) == message


def test_layer_without_token_ids(built):
    message = MESSAGES["no-token-ids"]
    layer = built[2].moe_layers()[0]
    built[2].eval()(torch.tensor([[4, 5, 6]]))  # the token ids of a forward do not outlive it
    with pytest.raises(RuntimeError) as err:
        layer(torch.zeros(3, 1, 32))
    assert str(err.value) == message


def test_experts_not_divisible_by_the_world_size(caplog):
    from fairseq_stablemoe.moe import build_moe_layer, comm

    with pytest.raises(ValueError) as err:
        MoESettings.of(moe_config(moe_experts=8, moe_expert_parallel="on")).expert_parallel_world(3)
    assert str(err.value) == MESSAGES["experts-vs-world"]
    auto = MoESettings.of(moe_config(moe_experts=8))  # the default: falls back to replicated experts, and says so
    assert auto.expert_parallel_world(3) == 1 and auto.expert_parallel_world(4) == 4
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"), \
            unittest.mock.patch.object(comm, "world_size", lambda: 3):
        layer = build_moe_layer(auto, 16, 32, Vocabulary(48, 1))
    assert MESSAGES["experts-vs-world-auto"] in [r.getMessage() for r in caplog.records]
    assert len(layer.experts) == 8


def test_hash_table_of_another_dictionary():
    from fairseq_stablemoe.models.common import MoEModelMixin
    from fairseq_stablemoe.moe.routing.hash import HashRouting

    class Model(MoEModelMixin, torch.nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.routing = HashRouting(torch.zeros(vocab, dtype=torch.long), 4)

    with pytest.raises(ValueError) as err:
        Model(10).load_state_dict(Model(12).state_dict())
    assert str(err.value) == MESSAGES["hash-dictionary"]


def test_balanced_hash_without_token_counts():
    from fairseq_stablemoe.moe.routing.hash import HashRouting

    with pytest.raises(ValueError) as err:
        HashRouting.build(moe_config(moe_routing="hash"), 32, Vocabulary(48, 1))
    assert str(err.value) == MESSAGES["hash-counts"]


def test_base_routing_without_libbase(monkeypatch):
    import sys

    import fairseq
    from fairseq_stablemoe.moe.routing import base_layer

    monkeypatch.setattr(base_layer, "_libbase", None)
    monkeypatch.delattr(fairseq, "libbase", raising=False)
    monkeypatch.setitem(sys.modules, "fairseq.libbase", None)  # as if the C++ extension was never built
    with pytest.raises(ImportError) as err:
        base_layer._auction()
    assert str(err.value) == MESSAGES["no-libbase"]


def doc_messages():
    """The 'exact text' column of every row of docs/errors.md, by case id."""
    rows = {}
    for line in open(DOC):
        m = re.match(r"\|\s*`([\w-]+)`\s*\|.*\|\s*`(.+)`\s*\|\s*[\w/.]*\s*\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_docs_table_shows_the_exact_messages():
    rows = doc_messages()
    assert len(rows) >= 20
    for case, message in MESSAGES.items():
        assert rows.get(case) == message, f"docs/errors.md row `{case}` differs from the code"

"""The stage is one saved number, the update stage 2 began at (None in stage 1), kept as the routing's extra state.
Checkpoints in today's format round-trip through fairseq's save and load (weights-only), and those written before
(buffers `stage` and `stage2_start`; before that, `stage` alone) still load strictly, in either stage, and resume
training with the same routing."""
import pytest
import torch
from fairseq.trainer import Trainer

import helpers
from fairseq_stablemoe.checkpoints import unsafe_globals
from fairseq_stablemoe.moe.distilled_router import WordEmbeddingRouter
from fairseq_stablemoe.moe.routing.stablemoe import StableMoERouting

STAGE1 = 3  # --stage1-updates: the step after 3 updates begins stage 2
SAVED_AT = {1: STAGE1 - 1, 2: STAGE1 + 2}  # the update count of each stage's checkpoint
LAST = STAGE1 + 4  # the last update the reference run takes
ROUTING = "decoder.layers.1.routing."
EXTRA = ROUTING + "_extra_state"


def trainer(data, save_dir):
    cfg, task, model, criterion = helpers.build_for_training(data, "--stage1-updates", STAGE1,
                                                             save_dir=str(save_dir))
    task.load_dataset("train")
    return Trainer(cfg, task, model, criterion)


def routing_of(model):
    return model.moe_layers()[0].routing


def batch(task, update):
    dataset = task.dataset("train")
    return dataset.collater([dataset[(4 * update + i) % len(dataset)] for i in range(4)])


def train_routing(trainer_, update):
    """One training update at `update` (as fairseq-train takes it), and the experts its MoE layer chose."""
    assert trainer_.get_num_updates() == update
    chosen = []
    hook = routing_of(trainer_.model).register_forward_hook(lambda m, i, out: chosen.append(out.expert))
    try:
        trainer_.train_step([batch(trainer_.task, update)])
    finally:
        hook.remove()
    return torch.cat(chosen)


def eval_routing(model):
    chosen = []
    hook = routing_of(model).register_forward_hook(lambda m, i, out: chosen.append(out.expert))
    model.eval()
    try:
        with torch.no_grad():
            model(torch.arange(4, 36).view(2, 16) % 40 + 4)
    finally:
        hook.remove()
        model.train()
    return torch.cat(chosen)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run of LAST + 1 updates, saved (fairseq's Trainer.save_checkpoint) at an update of each stage: its
    checkpoints, and the experts it chose in each update and at evaluation when it saved."""
    tmp = tmp_path_factory.mktemp("stage-checkpoints")
    data = helpers.tiny_lm_data(tmp)
    run = trainer(data, tmp / "reference")
    record = {"data": data, "train": {}, "eval": {}, "path": {}, "began": {}, "table": {}}
    for update in range(LAST + 1):
        for stage, at in SAVED_AT.items():
            if update == at:
                routing = routing_of(run.model)
                assert routing.in_stage2 == (stage == 2)
                record["path"][stage] = str(tmp / f"stage{stage}.pt")
                run.consolidate_optimizer()
                run.save_checkpoint(record["path"][stage], {})
                record["eval"][stage] = eval_routing(run.model)
                record["began"][stage] = routing.stage2_began
                record["table"][stage] = routing.distilled_router.table.clone()
        record["train"][update] = train_routing(run, update)
    assert record["began"] == {1: None, 2: STAGE1}
    return record


def old_format(model_state: dict, with_stage2_start: bool) -> dict:
    """A model state as the code before the stage was one number saved it: buffers `stage` (1 or 2) and
    `stage2_start` (the update, -1 before; absent before 2026-12-02) where the extra state is now."""
    old = {}
    for key, value in model_state.items():
        if not key.endswith("routing._extra_state"):
            old[key] = value
            continue
        prefix, began = key[:-len("_extra_state")], value["stage2_began"]
        old[prefix + "stage"] = torch.tensor(1 if began is None else 2)
        if with_stage2_start:
            old[prefix + "stage2_start"] = torch.tensor(-1 if began is None else began)
    return old


FORMATS = ["extra state", "stage and stage2_start buffers", "stage buffer"]


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("saved_as", FORMATS)
def test_checkpoint_resumes_with_the_same_stage_and_routing(reference, tmp_path, saved_as, stage):
    path = reference["path"][stage]
    if saved_as != "extra state":
        state = torch.load(path, weights_only=True)
        state["model"] = old_format(state["model"], with_stage2_start=saved_as.startswith("stage and"))
        path = str(tmp_path / "old.pt")
        torch.save(state, path)
    state = torch.load(path, weights_only=True)["model"]  # as fairseq reads it: no pickled object allowed
    assert unsafe_globals(path) == []
    assert (EXTRA in state) == (saved_as == "extra state") and (ROUTING + "stage" in state) != (EXTRA in state)
    if saved_as == "extra state":
        assert state[EXTRA] == {"stage2_began": reference["began"][stage]}

    resumed = trainer(reference["data"], tmp_path / "resumed")
    resumed.load_checkpoint(path)  # fairseq's strict load: the old buffers are converted, not unexpected
    routing = routing_of(resumed.model)
    assert routing.in_stage2 == (stage == 2) and routing.stage2_began == reference["began"][stage]
    assert torch.equal(routing.distilled_router.table, reference["table"][stage])
    saved_now = resumed.model.state_dict()
    assert saved_now[EXTRA] == {"stage2_began": reference["began"][stage]}
    assert not [k for k in saved_now if k.endswith(("routing.stage", "routing.stage2_start"))]
    assert torch.equal(eval_routing(resumed.model), reference["eval"][stage])
    for update in range(SAVED_AT[stage], LAST + 1):  # the stage-1 checkpoint enters stage 2 on the way
        assert torch.equal(train_routing(resumed, update), reference["train"][update]), update
    assert routing.stage2_began == STAGE1 and not any(p.requires_grad for p in routing.distilled_router.parameters())


def test_half_precision_copies_keep_the_stage(reference, tmp_path):
    """.half(), .to(bf16) and a state dict saved from either keep the stage, a host number no conversion touches."""
    for dtype in (torch.float16, torch.bfloat16):
        model = trainer(reference["data"], tmp_path).model
        model.load_state_dict(torch.load(reference["path"][2], weights_only=True)["model"])
        converted = model.half() if dtype == torch.float16 else model.to(dtype)
        assert routing_of(converted).stage2_began == STAGE1
        assert converted.state_dict()[EXTRA] == {"stage2_began": STAGE1}
        fresh = trainer(reference["data"], tmp_path).model
        fresh.load_state_dict(converted.state_dict())
        assert routing_of(fresh).stage2_began == STAGE1


def routing_alone(stage1_updates):
    return StableMoERouting(4, 3, WordEmbeddingRouter(10, 3, 2, padding_idx=1), stage1_updates)


@pytest.mark.parametrize("schedule, stage, stage2_start, began", [
    (7, 1, -1, None), (7, 2, 5, 5), (7, 1, None, None), (7, 2, None, 7), ("auto", 2, None, 0), (0, 2, None, 0),
])
def test_old_stage_buffers_become_the_update_stage2_began_at(schedule, stage, stage2_start, began):
    """A checkpoint without stage2_start began stage 2 at --stage1-updates (auto: unknown, 0)."""
    source = routing_alone(7)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    state["stage"] = torch.tensor(stage)
    if stage2_start is not None:
        state["stage2_start"] = torch.tensor(stage2_start)
    routing = routing_alone(schedule)
    routing.end_stage1(99)  # the checkpoint wins over what the update count said before
    routing.load_state_dict(state)  # strict
    assert routing.stage2_began == began and routing.in_stage2 == (began is not None)


def test_a_damaged_saved_stage_is_refused():
    routing = routing_alone(7)
    for bad in (-1, 2.5, "3", True, [4], {"stage": 2}):
        extra = bad if isinstance(bad, dict) else {"stage2_began": bad}  # a dict without the key: shown whole
        state = dict(routing.state_dict(), _extra_state=extra)
        with pytest.raises(ValueError) as err:
            routing.load_state_dict(state)
        assert str(err.value) == (f"a StableMoE routing's saved stage2_began must be an update count >= 0 or None "
                                  f"(got {bad!r}): the checkpoint was changed or damaged")
    assert routing.stage2_began is None

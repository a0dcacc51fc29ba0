"""Determinism: fixed seeds give bit-identical routing; at inference a sentence's output does not depend on
the other sentences of its batch (inference capacity is unlimited by default)."""
import pytest
import torch
from fairseq import optim
from fairseq.data import data_utils

import helpers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return helpers.tiny_lm_data(tmp_path_factory.mktemp("determinism"))


def train_and_record_routing(data, seed, updates=6, stage1=3):
    """What fairseq-train does per update (seeded init, task.train_step, optimizer step); returns the experts
    each MoE forward chose, and the final parameters."""
    torch.manual_seed(seed)
    cfg, task, model, criterion = helpers.build_for_training(data, "--seed", str(seed), "--stage1-updates", str(stage1))
    task.load_dataset("train")
    dataset = task.dataset("train")
    optimizer = optim.build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    chosen = []
    for layer in model.moe_layers():
        layer.routing.register_forward_hook(lambda m, i, out: chosen.append(out.expert.clone()))
    model.train()
    for step in range(updates):
        sample = dataset.collater([dataset[i] for i in range(4 * step, 4 * step + 4)])
        task.train_step(sample, model, criterion, optimizer, update_num=step)
        optimizer.step()
        optimizer.zero_grad()
    return chosen, model.state_dict()


def test_fixed_seed_gives_bit_identical_routing(data):
    first, first_state = train_and_record_routing(data, seed=3)
    second, second_state = train_and_record_routing(data, seed=3)
    assert len(first) == 6
    for step, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"update {step} routed differently"
    assert helpers.same_state(first_state, second_state)
    assert helpers.saved_stage(first_state) == 2  # both stages were exercised
    other_seed, _ = train_and_record_routing(data, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(first, other_seed))  # the seed does matter


@pytest.mark.parametrize("stage2", [False, True])
def test_inference_output_does_not_depend_on_the_batch(data, stage2):
    torch.manual_seed(0)
    _, task, model, _ = helpers.build_for_training(data)
    layer = model.moe_layers()[0]
    assert layer.eval_capacity_factor == 0  # unlimited at inference unless --eval-capacity-factor says otherwise
    with torch.no_grad():  # experts that differ from one another, so a different expert would show
        for p in layer.experts.parameters():
            p.normal_(0, 0.2)
    if stage2:
        layer.routing.end_stage1(0)
    model.eval()
    with open(data + "-text/valid.txt") as f:
        sentences = [task.dictionary.encode_line(line, add_if_not_exist=False).long() for line in f][:6]
    sentence, others = sentences[0], sentences[1:]
    length = sentence.numel()
    assert max(o.numel() for o in others) > length  # the sentence gets padded in the batch

    def log_probs(batch, row):
        tokens = data_utils.collate_tokens(batch, task.dictionary.pad())  # right-padded, as fairseq batches
        with torch.no_grad():
            return model.get_normalized_probs(model(tokens), log_probs=True)[row, :length]

    alone = log_probs([sentence], 0)
    for row in (0, 3):
        batched = log_probs(others[:row] + [sentence] + others[row:], row)
        assert torch.allclose(alone, batched, atol=1e-5), f"row {row}: max diff {(alone - batched).abs().max()}"
    # why inference capacity must stay unlimited: with a capacity, the neighbours decide who is dropped
    layer.eval_capacity_factor = 1.0
    assert not torch.allclose(log_probs([sentence], 0), log_probs(others + [sentence], len(others)), atol=1e-5)

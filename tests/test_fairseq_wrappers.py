"""fairseq's own machinery that wraps or hooks modules works with our layers (issue 22): --checkpoint-activations
(fairseq's checkpoint_wrapper recomputes each block in the backward pass: the balance and distillation losses,
collected from the MoE layers during the forward, must keep their gradients), --offload-activations, and quant
noise (--quant-noise-pq hooks the blocks' nn.Linear layers; the experts' stacked weights are not nn.Linear and get
none)."""
import pytest
import torch

import helpers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return helpers.tiny_lm_data(tmp_path_factory.mktemp("wrappers"))


def first_batch(task):
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_sentences=4, max_positions=32)
    return next(iter(itr.next_epoch_itr(shuffle=False)))


def loss_and_grads(model, criterion, sample):
    model.train()
    torch.manual_seed(1)  # the same dropout masks
    loss, _, log = criterion(model, sample)
    loss.backward()
    return log, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flag", ["--checkpoint-activations", "--offload-activations"])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(data, flag):
    _, task, wrapped, criterion = helpers.build_for_training(data, flag)
    _, _, plain, plain_criterion = helpers.build_for_training(data)
    plain.load_state_dict(wrapped.state_dict())
    assert any("checkpoint" in type(m).__name__.lower() or hasattr(m, "precheckpoint_forward")
               for m in wrapped.modules())  # fairseq really wrapped the blocks
    sample = first_batch(task)
    log_w, grads_w = loss_and_grads(wrapped, criterion, sample)
    log_p, grads_p = loss_and_grads(plain, plain_criterion, sample)
    for key in ("loss", "moe_balance_loss", "moe_distill_loss"):
        assert float(log_w[key]) == pytest.approx(float(log_p[key]), rel=1e-6), key
    assert grads_w.keys() == grads_p.keys()
    routing = [n for n in grads_p if "routing" in n]
    assert routing and all(grads_p[n].abs().sum() > 0 for n in routing)  # the router does learn
    for name in grads_p:
        torch.testing.assert_close(grads_w[name], grads_p[name], rtol=1e-5, atol=1e-6, msg=name)


def test_quant_noise_trains_through_the_moe_layers(data):
    _, task, model, criterion = helpers.build_for_training(data, "--quant-noise-pq", "0.5",
                                                           "--quant-noise-pq-block-size", "8")
    hooked = [n for n, m in model.named_modules() if m._forward_pre_hooks]
    assert hooked  # fairseq's quant_noise hooked the blocks' linear layers
    log, grads = loss_and_grads(model, criterion, first_batch(task))
    assert torch.isfinite(torch.tensor(float(log["loss"])))
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any("experts" in n for n in grads)  # the experts train alongside

"""The routing decisions of a model's MoE layers on a batch (what each token would train with), without training side
effects: routing probes and the expert -> token table read them."""
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .placement import StackedMoELayer


class _EveryModuleSeen(Exception):
    """Raised by the last hook: nothing after the last MoE layer is needed (no experts, no output layer)."""


def forward_until(model: nn.Module, net_input: dict, modules: Sequence[nn.Module],
                  on_call: Callable[[int, tuple, object], None], before: bool = True):
    """Run `model(**net_input)` only until each of `modules` has been called once.

    `on_call(i, args, output)` sees module i's positional inputs, and its output unless `before`
    (then output is None and the module itself is not run if it is the last one to be seen).
    """
    seen = set()

    def hook(i):
        def call(module, args, output=None):
            if i in seen:
                return
            seen.add(i)
            on_call(i, args, output)
            if len(seen) == len(modules):
                raise _EveryModuleSeen

        return call

    register = "register_forward_pre_hook" if before else "register_forward_hook"
    handles = [getattr(m, register)(hook(i)) for i, m in enumerate(modules)]
    try:
        model(**net_input)
    except _EveryModuleSeen:
        pass
    finally:
        for handle in handles:
            handle.remove()


def probe_experts(model: nn.Module, net_input: dict) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """For every MoE layer (by module name): its B x T token ids, and the experts they would train with now
    (-1 at pads).

    The blocks run in eval mode (no dropout) with no gradient; each MoE layer is asked for its
    training-time decision (`MoELayer.decide`). MoE layers before the last one run their inference
    routing to produce the next blocks' input. The training RNG is left exactly as it was.
    """
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, StackedMoELayer)]
    names: List[str] = [name for name, _ in named]
    layers = [m for _, m in named]
    decided = {}

    def on_call(i, args, _):
        x = args[0]
        tokens = layers[i].stack_tokens()
        decided[names[i]] = (tokens[:, -x.size(0):], layers[i].decide(x, tokens))

    device = next(model.parameters()).device
    was_training = model.training
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
        model.eval()
        try:
            forward_until(model, net_input, layers, on_call)
        finally:
            model.train(was_training)
    return {name: decided[name] for name in names if name in decided}

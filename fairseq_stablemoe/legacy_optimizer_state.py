"""Resuming from a checkpoint written while each expert was its own module (before main 26fcf9f).

Its model weights load as they are (one entry per expert, keyed by global id, then and now). Its optimizer state
has one entry per expert parameter, where the bank now has one parameter per projection (sublayer, expert, ...):
torch's optimizer would refuse it. `convert_when_loaded` stacks each expert's moments into the bank's layout as
fairseq loads that file, in memory: the file itself is never rewritten.
"""
import logging
import os
from typing import Dict, List

import torch
from fairseq import checkpoint_utils
from omegaconf import OmegaConf

from .moe import MoESettings
from .moe.expert_bank import PARAMETERS
from .moe.expert_keys import CHECKPOINT_NAMES, expert_entry, trainable_names
from .moe.expert_parallel import expert_shard
from .moe.experts import Experts

logger = logging.getLogger(__name__)

_pending: Dict[str, "StackExpertMoments"] = {}  # real path -> its conversion, applied when fairseq loads it


def legacy_parameter_names(model: torch.nn.Module, cfg, world: int) -> List[str]:
    """The trainable parameters fairseq handed its optimizer, in order, as the plugin named them before the
    experts' weights were stacked: one module per expert, in id order, holding rank 0's experts only (of `world`
    processes training the model `cfg` describes)."""
    settings = MoESettings.of(cfg)
    ids = expert_shard(settings.num_experts, settings.expert_parallel_world(world), 0)  # rank 0's
    banks = {name: m for name, m in model.named_modules() if isinstance(m, Experts)}
    names, done = [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner, _, leaf = name.rpartition(".")
        bank = banks.get(owner)
        if bank is None or leaf not in CHECKPOINT_NAMES:
            names.append(name)
            continue
        if owner in done:
            continue
        done.add(owner)
        names.extend(expert_entry(owner, i, s, parameter) for i in ids for s in range(bank.sublayers)
                     for parameter in PARAMETERS)
    return names


class StackExpertMoments:
    """Maps an optimizer state in the per-expert-module order (`legacy_names`) onto this model's trainable
    parameters, in the order fairseq hands them to its optimizer."""

    def __init__(self, model, legacy_names: List[str]):
        self.names = trainable_names(model)
        self.legacy = legacy_names
        self.banks = {name: m for name, m in model.named_modules() if isinstance(m, Experts)}

    def matches(self, optim_state) -> bool:
        groups = (optim_state or {}).get("param_groups") or []
        return len(groups) == 1 and len(groups[0]["params"]) == len(self.legacy) != len(self.names)

    def per_expert(self, name: str):
        """(sublayer x expert) legacy names of a bank parameter; None for any other parameter."""
        owner, _, leaf = name.rpartition(".")
        bank = self.banks.get(owner)
        if bank is None or leaf not in CHECKPOINT_NAMES:
            return None
        return [[expert_entry(owner, i, s, leaf) for i in bank.global_ids] for s in range(bank.sublayers)]

    def __call__(self, optim_state: Dict) -> Dict:
        group, old = optim_state["param_groups"][0], optim_state["state"]
        index = dict(zip(self.legacy, group["params"]))
        state = {}
        for new_index, name in enumerate(self.names):
            rows = self.per_expert(name)
            if rows is None:
                if index[name] in old:
                    state[new_index] = old[index[name]]
                continue
            entries = [[old.get(index[legacy]) for legacy in row] for row in rows]
            present = [e for row in entries for e in row if e]
            if present:
                state[new_index] = stack_entries(entries, present)
        return {**optim_state, "state": state, "param_groups": [{**group, "params": list(range(len(self.names)))}]}


def stack_entries(entries, present):
    """One parameter's optimizer entry from its experts' (sublayer x expert): moments stacked, zeros for an expert
    that never had a gradient; the step count the largest (an expert skipped by routing did not step)."""
    merged = {}
    for key, value in present[0].items():
        if torch.is_tensor(value) and value.dim() > 0:
            merged[key] = torch.stack([torch.stack([e[key] if e else torch.zeros_like(value) for e in row])
                                       for row in entries])
        else:
            merged[key] = max((e[key] for e in present), key=lambda v: float(v))
    return merged


def _load_checkpoint_to_cpu(path, *args, **kwargs):
    state = _original(path, *args, **kwargs)
    convert = _pending.pop(_key(path), None)
    optim = state.get("last_optimizer_state") if isinstance(state, dict) else None
    if convert is not None and convert.matches(optim):
        state["last_optimizer_state"] = convert(optim)
        logger.info(f"{path} was written while each expert was its own module: its optimizer state was stacked "
                    f"into the experts' bank as it loaded (the file is unchanged)")
    return state


def _key(path) -> str:
    return os.path.realpath(str(path))


_original = checkpoint_utils.load_checkpoint_to_cpu


def convert_when_loaded(path: str, model) -> bool:
    """If `path` holds a per-expert-module optimizer state for `model`, convert it when fairseq loads it (before
    fairseq builds the optimizer from `model`'s trainable parameters). True if so."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        optim, cfg = state.get("last_optimizer_state"), state.get("cfg")
        cfg = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
        world = cfg.distributed_training.distributed_world_size
    except (RuntimeError, OSError, ValueError, AttributeError, TypeError):
        return False  # not a checkpoint of this plugin's: fairseq and the resume checks report on it
    convert = StackExpertMoments(model, legacy_parameter_names(model, cfg.model, world))
    if not convert.matches(optim):
        return False
    global _original
    if checkpoint_utils.load_checkpoint_to_cpu is not _load_checkpoint_to_cpu:
        _original = checkpoint_utils.load_checkpoint_to_cpu
        checkpoint_utils.load_checkpoint_to_cpu = _load_checkpoint_to_cpu
    _pending[_key(path)] = convert
    return True

"""How a checkpoint names the experts' weights: the one owner of the format.

An Experts module stores each of its experts' parameters as its own entry, `experts.<global id>.<sublayer>.<name>`
(fairseq BASE layers' naming of one module per expert), keyed by global id so that a checkpoint names an expert
the same way at any number of processes. In memory the weights are stacked (sublayer, expert, ...) tensors, one
per parameter of PARAMETERS; the optimizer state of code before 26fcf9f was kept per expert entry, in id order.
"""
from typing import List

import torch.nn as nn

from .expert_bank import PARAMETERS

# stacked parameter -> its name inside one expert's sublayer in a checkpoint
CHECKPOINT_NAMES = dict(zip(PARAMETERS, ("norm.weight", "norm.bias", "ff1.weight", "ff1.bias", "ff2.weight",
                                         "ff2.bias")))
ENTRY = "experts."  # what an Experts module's state dict puts before each expert key


def expert_key(global_id: int, sublayer: int, parameter: str) -> str:
    """"<global id>.<sublayer>.<name>" of a stacked `parameter` (one of PARAMETERS) of one expert."""
    return f"{global_id}.{sublayer}.{CHECKPOINT_NAMES[parameter]}"


def expert_entry(owner: str, global_id: int, sublayer: int, parameter: str) -> str:
    """The full state-dict name of one expert's parameter under the Experts module named `owner`."""
    return f"{owner}.{ENTRY}{expert_key(global_id, sublayer, parameter)}"


def is_expert_parameter(name: str) -> bool:
    """A model parameter (stacked) or a per-expert checkpoint entry of the experts, by its full name."""
    owner, _, leaf = name.rpartition(".")
    stacked = leaf in CHECKPOINT_NAMES and (owner.endswith(".experts") or owner == "experts")
    return stacked or f".experts.{ENTRY}" in name or name.startswith(f"experts.{ENTRY}")


def trainable_names(model: nn.Module) -> List[str]:
    """The parameters fairseq hands to its optimizer, in order: the experts' stacked weights do not depend on the
    number of processes (only their shapes do)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]

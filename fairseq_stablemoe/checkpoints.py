"""Safe loading of fairseq checkpoints on torch >= 2.6 (where torch.load defaults to weights_only=True).

fairseq pickles a few plain Python objects besides tensors. We allow exactly those, so
fairseq-eval-lm / fairseq-generate load our checkpoints with nothing set by the user, while any
other pickled object is still refused by torch's weights-only unpickler.
"""
import argparse
import collections
import typing

import torch
from fairseq.distributed.utils import _TensorPlaceholder
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

# Namespace: old-style `args`. The rest: what fairseq pickles when rank 0 broadcasts a loaded checkpoint to
# the other ranks (resuming with several processes): the omegaconf config and tensor placeholders.
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace, DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode,
                              typing.Any, collections.defaultdict, dict, list, int, _TensorPlaceholder]

if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)

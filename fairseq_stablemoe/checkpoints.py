"""Safe loading of fairseq checkpoints on torch >= 2.6 (where torch.load defaults to weights_only=True).

fairseq pickles a few plain Python objects besides tensors. We allow exactly those, so
fairseq-eval-lm / fairseq-generate load our checkpoints with nothing set by the user, while any
other pickled object is still refused by torch's weights-only unpickler.
"""
import argparse

import torch

FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace]

if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)

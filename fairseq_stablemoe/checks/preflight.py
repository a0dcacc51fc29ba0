"""Checks before a model is built: does its config fit this machine (the experts' weights, and for training also
gradients, Adam's moments and a batch's activations), is it sensible (very deep experts, more experts than token
ids), and can the training settings run here (mixed precision on the wrong device, a CPU DDP backend)."""
import logging
import os
from typing import Optional, Tuple

import torch

from ..dictionaries import check_fingerprints
from ..moe import MoESettings, comm
from ..options import option, task_option
from ..safe_config import refuse_evaluated_code

logger = logging.getLogger(__name__)


def expert_parameters(cfg, world: int = 1) -> Tuple[int, int]:
    """(expert parameters per process, the layers' other parameters: attention, dense FFNs, layer norms) of the
    model `cfg` describes; the embeddings are left out (the dictionary is not known here)."""
    settings = moe_settings(cfg)
    total, dense = 0, 0
    for placement in settings.placements if settings else ():
        side = placement.side
        dim, model_ffn = int(option(cfg, f"{side}_embed_dim", 0)), int(option(cfg, f"{side}_ffn_embed_dim", 0))
        experts, ffn, sublayers = settings.expert_layout(model_ffn)
        experts //= settings.expert_parallel_world(world)
        total += placement.layers * experts * sublayers * (2 * dim * ffn + ffn + 3 * dim)  # LN, two linear layers
        dense += int(option(cfg, f"{side}_layers", 0)) * (4 * dim * dim + 2 * dim * model_ffn)
    return total, dense


def moe_settings(cfg) -> Optional[MoESettings]:
    """The MoE settings of a model config; None for a model without MoE layers (e.g. fairseq's transformer_lm)."""
    return MoESettings.of(cfg) if option(cfg, "moe_experts") is not None else None


def available_memory(on_gpu: bool) -> float:
    """Bytes this process can still allocate: the GPU's free memory, or the machine's MemAvailable."""
    if on_gpu:
        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def moe_memory_check(cfg, world: int = 1) -> None:
    """Estimate the experts' fp32 weights per process before building them; refuse what cannot fit."""
    total, _ = expert_parameters(cfg, world)
    gigabytes = total * 4 / 1e9
    on_gpu = torch.cuda.is_available() and not option(cfg, "cpu", False)
    memory = (torch.cuda.get_device_properties(0).total_memory if on_gpu
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 1e9
    if gigabytes > memory:
        raise ValueError(
            f"--moe-experts {option(cfg, 'moe_experts')} × --moe-sublayers {option(cfg, 'moe_sublayers')} makes "
            f"{total / 1e9:.1f}B expert "
            f"parameters per process, {gigabytes:.1f} GB in fp32 (weights alone), more than this "
            f"{'GPU' if on_gpu else 'machine'}'s {memory:.1f} GB: lower --moe-experts, --moe-sublayers or "
            f"--moe-ffn-embed-dim, or shard the experts over more processes")


def training_memory_check(task, cfg, world: int = 1) -> None:
    """Before fairseq-train builds the model: what training allocates per process (fp32 weights, their gradients,
    Adam's two moments, and an estimate of one batch's activations) against the memory available now."""
    experts, dense = expert_parameters(cfg, world)
    params = experts + dense
    weights, grads, moments = 4 * params, 4 * params, 8 * params
    tokens = int(task_option(task, "max_tokens", 0) or 0) or \
        int(task_option(task, "batch_size", 0) or 0) * int(task_option(task, "tokens_per_sample", 0) or 0)
    dims = [int(option(cfg, f"{side}_embed_dim", 0) or 0) for side in ("encoder", "decoder")]
    ffns = [int(option(cfg, "moe_ffn_embed_dim", 0) or 0) or int(option(cfg, f"{side}_ffn_embed_dim", 0) or 0)
            for side in ("encoder", "decoder")]
    blocks = sum(int(option(cfg, f"{side}_layers", 0) or 0) for side in ("encoder", "decoder"))
    # per token and block: ~16 vectors of the model's width and 2 of the FFN's kept for the backward pass (fp32)
    activations = 4 * tokens * max(blocks, 1) * (16 * max(dims) + 2 * max(ffns))
    needed = weights + grads + moments + activations
    on_gpu = torch.cuda.is_available() and not task_option(task, "cpu", False)
    available = available_memory(on_gpu)
    if needed > available:
        gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
        raise ValueError(
            f"training this model needs about {gb(needed)} per process: {params / 1e9:.2f}B parameters "
            f"({experts / 1e9:.2f}B in the experts) take {gb(weights)} of fp32 weights, {gb(grads)} of gradients and "
            f"{gb(moments)} of Adam's two moments, and one batch of {tokens} tokens about {gb(activations)} of "
            f"activations; this {'GPU' if on_gpu else 'machine'} has {gb(available)} available: lower "
            f"--moe-experts, --moe-ffn-embed-dim or --moe-sublayers (or --max-tokens / --batch-size), or shard the "
            f"experts over more processes")


DEEP_EXPERTS = 64  # sublayers per expert beyond which building and every forward are slow enough to say so


def check_model_config(cfg, task=None) -> None:
    """Before a model is built from `cfg` (a checkpoint's, or the command line's) for `task`'s data."""
    refuse_evaluated_code(cfg, "model")
    moe_memory_check(cfg, comm.world_size())
    sublayers = int(option(cfg, "moe_sublayers", 0) or 0)
    if sublayers > DEEP_EXPERTS:
        logger.warning(f"--moe-sublayers {sublayers}: every expert is a stack of {sublayers} FFN sublayers run one "
                       f"after another, so building the model and each forward pass take long (minutes at 100000); "
                       f"the default is 3")
    if task is not None:
        check_fingerprints(task, option(cfg, "dictionary_fingerprints"))


def warn_unusable_experts(cfg, vocab: int) -> None:
    settings = moe_settings(cfg)
    if settings is None:
        return
    routing, experts = settings.moe_routing, settings.moe_experts
    by_token = routing == "hash" or (routing == "stablemoe" and settings.distilled_router == "wordemb")
    if by_token and experts > vocab:
        logger.warning(f"--moe-experts {experts} is more than the dictionary's {vocab} entries: --moe-routing "
                       f"{routing} sends each token id to one fixed expert (in stage 2), so at most {vocab} experts "
                       f"are ever used; use at most {vocab} experts")


def check_precision(task) -> None:
    def opt(name, default=None):
        return task_option(task, name, default)

    if opt("tpu", False):
        try:
            import torch_xla  # noqa: F401
        except ImportError:
            raise ValueError("--bf16 on fairseq-train's command line turns on --tpu (fairseq's options.py), which "
                             "needs torch_xla: for bf16 see README.md, section 'Mixed precision'; on a GPU "
                             "--fp16 --fp16-no-flatten-grads (or --amp) works") from None
    flattened_fp16 = opt("fp16", False) and not (opt("fp16_no_flatten_grads", False)
                                                 or opt("memory_efficient_fp16", False))
    if flattened_fp16 and (opt("cpu", False) or not torch.cuda.is_available()):
        raise ValueError("--fp16 without --fp16-no-flatten-grads needs a GPU (fairseq's flattened fp16 optimizer "
                         "allocates on CUDA): on CPU add --fp16-no-flatten-grads, or train in fp32 (--amp does "
                         "nothing on a CPU)")
    if opt("amp", False) and (opt("cpu", False) or not torch.cuda.is_available()):
        logger.warning("--amp on a CPU trains in float32: fairseq's --amp uses CUDA's autocast, which does nothing "
                       "here; drop --amp (the numbers are the same), or train on a GPU for mixed precision")
    max_tokens, tokens_per_sample = opt("max_tokens"), opt("tokens_per_sample")
    if max_tokens and tokens_per_sample and int(max_tokens) < int(tokens_per_sample):
        raise ValueError(f"--max-tokens {max_tokens} is less than one sample (--tokens-per-sample "
                         f"{tokens_per_sample}): fairseq cannot make a batch; use --max-tokens {tokens_per_sample} or "
                         f"more, or --batch-size")
    world, backend = comm.world_size(), str(opt("ddp_backend", "legacy_ddp"))
    if world > 1 and (opt("cpu", False) or not torch.cuda.is_available()) and backend not in ("legacy_ddp",
                                                                                              "no_c10d"):
        raise ValueError(f"--ddp-backend {backend} with {world} CPU processes ends in torch's device_ids error: "
                         f"add --ddp-backend legacy_ddp")

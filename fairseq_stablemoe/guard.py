"""Checks between a checkpoint, the data and the command line, before anything is built or loaded.

`GuardedTask` is mixed into our tasks (first among their bases). It refuses a config that fairseq would eval()
(safe_config), and, when fairseq-train builds the model it will train: takes the save dir's lock (run_lock),
refuses settings that cannot run here (mixed precision on the wrong device, a CPU DDP backend, experts that do
not fit in memory), and compares the checkpoint it will resume with the command line, the dictionaries and the
number of processes before fairseq loads it; and it stores the dictionaries' fingerprints in the model's config.
"""
import logging
import os
import sys
from typing import Optional, Tuple

import torch
from omegaconf import OmegaConf

from .checkpoints import check_checkpoint, prepare_resume
from .dictionaries import check_fingerprints, task_fingerprints
from .moe import MoESettings, comm
from .moe.config import flag, option, task_option
from .run_lock import lock_save_dir
from .safe_config import refuse_evaluated_code

logger = logging.getLogger(__name__)

# the MoE flags a checkpoint's weights and routing depend on (the translation model has per-side ones)
MOE_SETTINGS = ["moe_experts", "moe_sublayers", "moe_layers", "moe_position", "moe_ffn_embed_dim", "moe_routing",
                "hash_type", "hash_table", "hash_gate", "stage2_gate", "stage1_assignment", "distilled_router",
                "distilled_dim", "distilled_router_layers", "encoder_moe_layers",
                "encoder_moe_position", "decoder_moe_layers", "decoder_moe_position"]


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
            f"--moe-experts {option(cfg, 'moe_experts')} × --moe-sublayers {option(cfg, 'moe_sublayers')} makes {total / 1e9:.1f}B expert "
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


class GuardedTask:
    """Mix into our tasks, first among their bases."""

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        refuse_evaluated_code(cfg, "task")
        return super().setup_task(cfg, **kwargs)

    def build_model(self, cfg, from_checkpoint=False):
        check_model_config(cfg)
        warn_unusable_experts(cfg, len(self.target_dictionary))
        if not from_checkpoint:
            guard_training(self, cfg)
            if not OmegaConf.is_config(cfg) or "dictionary_fingerprints" in cfg:  # our models' configs
                cfg.dictionary_fingerprints = task_fingerprints(self)  # the checkpoints' config holds them
        return super().build_model(cfg, from_checkpoint)


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


def resume_path(task) -> Optional[str]:
    """The checkpoint fairseq-train resumes from (--restore-file, or SAVE_DIR/checkpoint_last.pt), if it exists."""
    save_dir, restore = task_option(task, "save_dir"), task_option(task, "restore_file", "checkpoint_last.pt")
    if save_dir is None:
        return None
    path = restore if restore != "checkpoint_last.pt" else os.path.join(save_dir, restore)
    return path if os.path.isfile(path) else None


def checkpoint_to_load(task) -> Tuple[Optional[str], str]:
    """The checkpoint fairseq-train will load (after repairing truncated copies), and 'resume' or 'finetune'."""
    save_dir = task_option(task, "save_dir")
    if save_dir is None:
        return None, ""
    if comm.rank() == 0:
        prepare_resume(save_dir, task_option(task, "restore_file", "checkpoint_last.pt"))
    path = resume_path(task)
    if path is not None:
        return path, "resume"
    finetune = task_option(task, "finetune_from_model")
    if finetune:
        if os.path.exists(finetune):
            check_checkpoint(finetune, "--finetune-from-model")
        return finetune, "finetune"
    return None, ""


def read_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True)  # weights_only: our allow-list applies
    except RuntimeError:
        return torch.load(path, map_location="cpu")  # the legacy (pre-zip) format cannot be memory-mapped


def guard_training(task, cfg) -> None:
    check_precision(task)
    training_memory_check(task, cfg, comm.world_size())
    if comm.rank() == 0:  # it alone writes checkpoints, also under expert parallelism
        lock_save_dir(task_option(task, "save_dir"))
    path, kind = checkpoint_to_load(task)
    if path is None or not os.path.isfile(path):
        return
    state = read_checkpoint(path)
    saved = state.get("cfg") or {"model": state.get("args")}
    refuse_evaluated_code(saved, "")
    if kind == "resume":
        refuse_finished_run(task, state, path)
        compare_moe_settings(option(saved, "model"), cfg, path)
        check_world_size(task, saved, path)
    check_fingerprints(task, option(option(saved, "model"), "dictionary_fingerprints"), path)


def refuse_finished_run(task, state: dict, path: str) -> None:
    """fairseq trains one more update on a finished run (and rewrites checkpoint_last.pt): change nothing."""
    history = state.get("optimizer_history") or [{}]
    done, max_update = int(history[-1].get("num_updates", 0)), int(task_option(task, "max_update", 0))
    if max_update > 0 and done >= max_update:
        logger.info(f"{path} holds update {done} and --max-update is {max_update}: this run is finished, nothing "
                    f"to train; raise --max-update to continue it, or give a new run another --save-dir")
        sys.exit(0)


def _setting(cfg, name):
    """A MoE flag's value as the model uses it: --moe-ffn-embed-dim 0 stands for the model's FFN size."""
    value = option(cfg, name)
    if name == "moe_ffn_embed_dim" and value is not None and int(value) == 0:
        sizes = {int(option(cfg, f"{side}_ffn_embed_dim")) for side in ("encoder", "decoder")
                 if option(cfg, f"{side}_ffn_embed_dim") is not None}
        if len(sizes) == 1:
            return sizes.pop()
    return value


def compare_moe_settings(saved, cfg, path: str) -> None:
    differ = [f"{flag(name)} {option(saved, name)} (checkpoint) / {option(cfg, name)} (command line)"
              for name in MOE_SETTINGS
              if option(saved, name) is not None and option(cfg, name) is not None
              and str(_setting(saved, name)) != str(_setting(cfg, name))]
    if differ:
        raise ValueError(f"{path} was trained with other MoE settings than this command line: {', '.join(differ)}; "
                         f"resume with the checkpoint's values, or start a new run in another --save-dir")


def _sharded(model_cfg, world: int) -> bool:
    settings = moe_settings(model_cfg)
    return settings is not None and settings.expert_parallel_world(world) > 1


def check_world_size(task, saved, path: str) -> None:
    """A checkpoint of W expert-sharded processes holds rank 0's optimizer state: N/W experts' worth."""
    saved_world = int(option(option(saved, "distributed_training"), "distributed_world_size", 1))
    world = comm.world_size()
    if saved_world == world or task_option(task, "reset_optimizer", False):
        return
    if _sharded(option(saved, "model"), saved_world) or _sharded(option(saved, "model"), world):
        raise ValueError(
            f"{path} was saved by {saved_world} processes and this run has {world}, with the experts sharded: "
            f"its optimizer state does not fit; run python -m fairseq_stablemoe.reshard_checkpoint {path} "
            f"NEW_DIR/checkpoint_last.pt --world-size {world} and resume with --restore-file "
            f"NEW_DIR/checkpoint_last.pt (or add --reset-optimizer)")

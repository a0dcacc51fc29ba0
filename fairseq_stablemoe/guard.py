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
from .moe import comm
from .run_lock import lock_save_dir
from .safe_config import refuse_evaluated_code

logger = logging.getLogger(__name__)

# the MoE flags a checkpoint's weights and routing depend on (the translation model has per-side ones)
MOE_SETTINGS = ["moe_experts", "moe_sublayers", "moe_layers", "moe_position", "moe_ffn_embed_dim", "moe_routing",
                "hash_type", "hash_table", "hash_gate", "stage2_gate", "stage1_assignment", "distilled_router",
                "distilled_dim", "distilled_router_layers", "encoder_moe_layers",
                "encoder_moe_position", "decoder_moe_layers", "decoder_moe_position"]


def _get(cfg, name, default=None):
    if cfg is None:
        return default
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    return default if value is None else value


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def expert_parameters(cfg, world: int = 1) -> Tuple[int, int]:
    """(expert parameters per process, the layers' other parameters: attention, dense FFNs, layer norms) of the
    model `cfg` describes; the embeddings are left out (the dictionary is not known here)."""
    experts, sublayers = int(_get(cfg, "moe_experts", 0)), int(_get(cfg, "moe_sublayers", 0))
    if str(_get(cfg, "moe_expert_parallel", "auto")) != "off" and world > 1 and experts % world == 0:
        experts //= world
    total, dense = 0, 0
    translation = _get(cfg, "encoder_moe_layers") is not None
    stacks = (("encoder", "encoder_moe_layers"), ("decoder", "decoder_moe_layers")) if translation else (
        ("decoder", "moe_layers"),)
    for side, layers_flag in stacks:
        layers = int(_get(cfg, layers_flag, 0))
        dim = int(_get(cfg, f"{side}_embed_dim", 0))
        ffn = int(_get(cfg, "moe_ffn_embed_dim", 0)) or int(_get(cfg, f"{side}_ffn_embed_dim", 0))
        total += layers * experts * sublayers * (2 * dim * ffn + ffn + 3 * dim)  # LN, two linear layers
        blocks = int(_get(cfg, f"{side}_layers", 0) or 0)
        dense += blocks * (4 * dim * dim + 2 * dim * int(_get(cfg, f"{side}_ffn_embed_dim", 0) or 0))
    return total, dense


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


def _on_gpu(cfg) -> bool:
    return torch.cuda.is_available() and not _get(cfg, "cpu", False)


def moe_memory_check(cfg, world: int = 1) -> None:
    """Estimate the experts' fp32 weights per process before building them; refuse what cannot fit."""
    total, _ = expert_parameters(cfg, world)
    sublayers = int(_get(cfg, "moe_sublayers", 0))
    gigabytes = total * 4 / 1e9
    on_gpu = _on_gpu(cfg)
    memory = (torch.cuda.get_device_properties(0).total_memory if on_gpu
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 1e9
    if gigabytes > memory:
        raise ValueError(
            f"--moe-experts {_get(cfg, 'moe_experts')} × --moe-sublayers {sublayers} makes {total / 1e9:.1f}B expert "
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
    dims = [int(_get(cfg, f"{side}_embed_dim", 0) or 0) for side in ("encoder", "decoder")]
    ffns = [int(_get(cfg, "moe_ffn_embed_dim", 0) or 0) or int(_get(cfg, f"{side}_ffn_embed_dim", 0) or 0)
            for side in ("encoder", "decoder")]
    blocks = sum(int(_get(cfg, f"{side}_layers", 0) or 0) for side in ("encoder", "decoder"))
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
    sublayers = int(_get(cfg, "moe_sublayers", 0) or 0)
    if sublayers > DEEP_EXPERTS:
        logger.warning(f"--moe-sublayers {sublayers}: every expert is a stack of {sublayers} FFN sublayers run one "
                       f"after another, so building the model and each forward pass take long (minutes at 100000); "
                       f"the default is 3")
    if task is not None:
        check_fingerprints(task, _get(cfg, "dictionary_fingerprints"))


def task_option(task, name, default=None):
    """A training option as our tasks see it: in the task's dataclass config (which interpolates fairseq's
    top-level options) or, for fairseq's argparse tasks, in its args."""
    for cfg in (getattr(task, "cfg", None), getattr(task, "args", None)):
        try:
            value = getattr(cfg, name, None) if cfg is not None else None
        except Exception:  # an interpolation a config loaded from a checkpoint cannot resolve
            value = None
        if value is not None:
            return value
    return default


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
    routing, experts = str(_get(cfg, "moe_routing", "stablemoe")), int(_get(cfg, "moe_experts", 0))
    by_token = routing == "hash" or (routing == "stablemoe" and str(_get(cfg, "distilled_router")) == "wordemb")
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
        compare_moe_settings(_get(saved, "model"), cfg, path)
        check_world_size(task, saved, path)
    check_fingerprints(task, _get(_get(saved, "model"), "dictionary_fingerprints"), path)


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
    value = _get(cfg, name)
    if name == "moe_ffn_embed_dim" and value is not None and int(value) == 0:
        sizes = {int(_get(cfg, f"{side}_ffn_embed_dim")) for side in ("encoder", "decoder")
                 if _get(cfg, f"{side}_ffn_embed_dim") is not None}
        if len(sizes) == 1:
            return sizes.pop()
    return value


def compare_moe_settings(saved, cfg, path: str) -> None:
    differ = [f"{flag(name)} {_get(saved, name)} (checkpoint) / {_get(cfg, name)} (command line)"
              for name in MOE_SETTINGS
              if _get(saved, name) is not None and _get(cfg, name) is not None
              and str(_setting(saved, name)) != str(_setting(cfg, name))]
    if differ:
        raise ValueError(f"{path} was trained with other MoE settings than this command line: {', '.join(differ)}; "
                         f"resume with the checkpoint's values, or start a new run in another --save-dir")


def _sharded(model_cfg, world: int) -> bool:
    mode, experts = str(_get(model_cfg, "moe_expert_parallel", "auto")), int(_get(model_cfg, "moe_experts", 0))
    return world > 1 and mode != "off" and experts % world == 0


def check_world_size(task, saved, path: str) -> None:
    """A checkpoint of W expert-sharded processes holds rank 0's optimizer state: N/W experts' worth."""
    saved_world = int(_get(_get(saved, "distributed_training"), "distributed_world_size", 1))
    world = comm.world_size()
    if saved_world == world or task_option(task, "reset_optimizer", False):
        return
    if _sharded(_get(saved, "model"), saved_world) or _sharded(_get(saved, "model"), world):
        raise ValueError(
            f"{path} was saved by {saved_world} processes and this run has {world}, with the experts sharded: "
            f"its optimizer state does not fit; run python -m fairseq_stablemoe.reshard_checkpoint {path} "
            f"NEW_DIR/checkpoint_last.pt --world-size {world} and resume with --restore-file "
            f"NEW_DIR/checkpoint_last.pt (or add --reset-optimizer)")

"""`GuardedTask`, mixed into our tasks (first among their bases): the checks between a checkpoint, the data and
the command line, before anything is built or loaded.

It refuses a config that fairseq would eval() (safe_config), and, when fairseq-train builds the model it will
train: refuses settings that cannot run here (preflight), takes the save dir's lock (run_lock), and compares the
checkpoint it will resume with the command line, the dictionaries and the number of processes before fairseq
loads it (resume_checks); and it stores the dictionaries' fingerprints in the model's config.
"""
import os

from omegaconf import OmegaConf

from ..dictionaries import check_fingerprints, task_fingerprints
from ..moe import comm
from ..options import option, task_option
from ..run_lock import lock_save_dir
from ..safe_config import refuse_evaluated_code
from .preflight import check_model_config, check_precision, training_memory_check, warn_unusable_experts
from .resume_checks import (
    check_world_size, checkpoint_to_load, compare_moe_settings, read_checkpoint, refuse_finished_run,
)


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

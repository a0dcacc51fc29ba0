"""The one raw read of fairseq's configs: every module reads a fairseq option through `option` (the MoE flags
through moe.config.MoESettings, which is built with it)."""


def option(cfg, name: str, default=None):
    """The one raw read of a fairseq config (argparse Namespace, omegaconf DictConfig, dataclass, or a checkpoint's
    dict): `default` where the option is unset, None, or an interpolation that cannot resolve (a config loaded from
    a checkpoint without the rest of fairseq's)."""
    if cfg is None:
        return default
    try:
        value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    except Exception:  # omegaconf's InterpolationResolutionError and friends
        return default
    return default if value is None else value


def task_config(task):
    """A task's options: its dataclass config, or the args of fairseq's legacy argparse tasks."""
    cfg = getattr(task, "cfg", None)
    return cfg if cfg is not None else getattr(task, "args", None)


def task_option(task, name: str, default=None):
    """A training option as a task sees it: in its dataclass config (which interpolates fairseq's top-level
    options) or, for fairseq's argparse tasks, in its args."""
    for cfg in (getattr(task, "cfg", None), getattr(task, "args", None)):
        value = option(cfg, name)
        if value is not None:
            return value
    return default

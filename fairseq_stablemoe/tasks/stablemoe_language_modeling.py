import os
from dataclasses import dataclass
from typing import Optional

from fairseq import utils
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from omegaconf import II

from ..checks.guard import GuardedTask
from .routing_probes import RoutingProbeConfig
from . import skipped_samples  # noqa: F401  (counts what any task skips: fairseq_stablemoe/tasks/skipped_samples.py)
from .moe_task import MoETask
from .stage1_auto import Stage1AutoConfig


@dataclass
class StableMoELanguageModelingConfig(LanguageModelingConfig, RoutingProbeConfig, Stage1AutoConfig):
    # training options the stage switch and the resume checks read (not flags of their own)
    max_update: int = II("optimization.max_update")
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    # what the checks before training read (fairseq_stablemoe/checks/)
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")
    reset_optimizer: bool = II("checkpoint.reset_optimizer")
    fp16: bool = II("common.fp16")
    memory_efficient_fp16: bool = II("common.memory_efficient_fp16")
    fp16_no_flatten_grads: bool = II("common.fp16_no_flatten_grads")
    cpu: bool = II("common.cpu")
    amp: bool = II("common.amp")
    ddp_backend: str = II("distributed_training.ddp_backend")
    max_tokens: Optional[int] = II("dataset.max_tokens")  # the training memory check's batch size


@register_task("stablemoe_language_modeling", dataclass=StableMoELanguageModelingConfig)
class StableMoELanguageModelingTask(GuardedTask, MoETask, LanguageModelingTask):
    """fairseq's language_modeling, plus the StableMoE stage switch and routing probes in the update loop."""

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        check_split_not_empty(self.args.data, split, epoch)
        return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    def get_batch_iterator(self, dataset, *args, **kwargs):
        """fairseq's; a split that makes no batch at all is named with its cause (fairseq alone: 'The dataset is
        empty ... Try increasing the max number of allowed tokens')."""
        itr = super().get_batch_iterator(dataset, *args, **kwargs)
        frozen = getattr(itr, "frozen_batches", None)
        if frozen is not None and len(frozen) == 0 and len(dataset) > 0:
            multiple = kwargs.get("required_batch_size_multiple", 1)
            getattr(self, "dataset_to_epoch_iter", {}).pop(dataset, None)  # fairseq caches it: not this one
            raise ValueError(
                f"a split of {len(dataset)} sample(s) makes no batch with --batch-size {kwargs.get('max_sentences')}, "
                f"--max-tokens {kwargs.get('max_tokens')} and --required-batch-size-multiple {multiple} (fairseq's "
                f"default is 8): pass --required-batch-size-multiple 1, or use a larger split")
        return itr


def check_split_not_empty(data: str, split: str, epoch: int = 1) -> None:
    """fairseq fails on a binarised split of no token with numpy's bare 'cannot mmap an empty file'."""
    paths = utils.split_paths(data)
    binary = os.path.join(paths[(epoch - 1) % len(paths)], f"{split}.bin")
    if os.path.isfile(binary) and os.path.getsize(binary) == 0:
        raise ValueError(f"the {split} split ({binary}) holds no token: fairseq cannot read an empty split ('cannot "
                         f"mmap an empty file'); put text into its source file and run fairseq-preprocess again, or "
                         f"leave {split} out (--valid-subset, --gen-subset, --disable-validation)")

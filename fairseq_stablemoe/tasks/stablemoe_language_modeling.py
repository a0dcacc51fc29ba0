from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from omegaconf import II

from .routing_probes import RoutingProbeConfig
from .stage import StageSwitchingTask


@dataclass
class StableMoELanguageModelingConfig(LanguageModelingConfig, RoutingProbeConfig):
    # training options the stage switch and the resume checks read (not flags of their own)
    max_update: int = II("optimization.max_update")
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")


@register_task("stablemoe_language_modeling", dataclass=StableMoELanguageModelingConfig)
class StableMoELanguageModelingTask(StageSwitchingTask, LanguageModelingTask):
    """fairseq's language_modeling, plus the StableMoE stage switch and routing probes in the update loop."""

from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from .routing_probes import RoutingProbeConfig
from .stage import StageSwitchingTask


@dataclass
class StableMoELanguageModelingConfig(LanguageModelingConfig, RoutingProbeConfig):
    pass


@register_task("stablemoe_language_modeling", dataclass=StableMoELanguageModelingConfig)
class StableMoELanguageModelingTask(StageSwitchingTask, LanguageModelingTask):
    """fairseq's language_modeling, plus the StableMoE stage switch and routing probes in the update loop."""

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from .stage import StageSwitchingTask


@register_task("stablemoe_language_modeling", dataclass=LanguageModelingConfig)
class StableMoELanguageModelingTask(StageSwitchingTask, LanguageModelingTask):
    """fairseq's language_modeling, plus the StableMoE stage switch in the update loop."""

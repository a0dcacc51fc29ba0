"""What every StableMoE model shares: its MoE layers and the task it trains under."""
from typing import List

from ..moe import MoELayer, moe_layers
from ..options import option


def set_defaults(args, **defaults):
    """An architecture's defaults: each value where the command line left the option unset."""
    for name, value in defaults.items():
        setattr(args, name, option(args, name, value))


class MoEModelMixin:
    # set by MoETask.build_model. The stage is the model's own (set_num_updates), but a plain fairseq
    # task would skip the training loop's safeguards: the fp16 optimizer and resume checks, the expert gathering
    moe_task = False

    @classmethod
    def hub_models(cls):
        # fairseq's transformer/transformer_lm list dense downloads here; no StableMoE model is published
        return {}

    @classmethod
    def from_pretrained(cls, model_name_or_path, checkpoint_file="model.pt", data_name_or_path=".", **kwargs):
        from ..hub import from_pretrained

        return from_pretrained(cls, model_name_or_path, checkpoint_file, data_name_or_path, **kwargs)

    def moe_layers(self) -> List[MoELayer]:
        return list(moe_layers(self))

    def forward(self, *args, **kwargs):
        if self.training and not self.moe_task:
            raise RuntimeError(
                "StableMoE models train only under the plugin's tasks, which check the optimizer and the checkpoint "
                "they resume from and gather sharded experts before saving: use --task stablemoe_language_modeling "
                "(LM) or --task stablemoe_translation_multi_simple_epoch (translation). Evaluation works under "
                "any task.")
        return super().forward(*args, **kwargs)

"""What every StableMoE model shares: its MoE layers, the task it trains under, checkpoint checks."""
from itertools import chain
from typing import List

from ..moe import MoELayer, moe_layers


class MoEModelMixin:
    # set by StageSwitchingTask.build_model: only such a task switches StableMoE's stages in training
    stage_switching_task = False

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
        if self.training and not self.stage_switching_task:
            raise RuntimeError(
                "StableMoE models train only under a task that switches their stages: use --task "
                "stablemoe_language_modeling (LM) or --task stablemoe_translation_multi_simple_epoch "
                "(translation). Evaluation works under any task.")
        return super().forward(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        # named tensors, not state_dict(): under expert parallelism that one gathers other ranks' experts
        for name, param in chain(self.named_parameters(), self.named_buffers()):
            # token-id tables: the distilled router's embedding, the hash routing's table
            if name.endswith(("distilled_router.embed.weight", "routing.table")) and name in state_dict:
                saved = state_dict[name].shape[0]
                if saved != param.shape[0]:
                    raise ValueError(
                        f"the checkpoint's {'distilled router' if 'distilled_router' in name else 'hash table'} "
                        f"covers {saved} token ids but this model's dictionary "
                        f"has {param.shape[0]}: evaluate with the dictionary the model was trained with "
                        f"(the data directory passed to fairseq-train)")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from .moe_aux import MoEAuxLossConfig, MoEAuxLossMixin


@dataclass
class StableMoECrossEntropyConfig(CrossEntropyCriterionConfig, MoEAuxLossConfig):
    pass


@register_criterion("stablemoe_cross_entropy", dataclass=StableMoECrossEntropyConfig)
class StableMoECrossEntropyCriterion(MoEAuxLossMixin, CrossEntropyCriterion):
    """Task loss + α·L_bal + β·L_dis (+ the baselines' losses); every term a token sum, normalised by fairseq's
    sample size."""

    def __init__(self, task, sentence_avg, balance_factor, distill_factor, switch_loss_factor):
        super().__init__(task, sentence_avg)
        self.set_aux_factors(balance=balance_factor, distill=distill_factor, switch=switch_loss_factor)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        # our "loss" adds the MoE losses to the cross-entropy "nll_loss": fairseq's reduction of such a pair is
        # label-smoothed CE's (nll_loss and ppl per token); with no MoE loss it logs what cross_entropy logs
        LabelSmoothedCrossEntropyCriterion.reduce_metrics(logging_outputs)
        MoEAuxLossMixin.reduce_moe_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True

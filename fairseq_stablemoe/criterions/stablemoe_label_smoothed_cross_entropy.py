from dataclasses import dataclass

from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from .moe_aux import MoEAuxLossConfig, MoEAuxLossMixin


@dataclass
class StableMoELabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig, MoEAuxLossConfig):
    pass


@register_criterion("stablemoe_label_smoothed_cross_entropy", dataclass=StableMoELabelSmoothedCrossEntropyConfig)
class StableMoELabelSmoothedCrossEntropyCriterion(MoEAuxLossMixin, LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed CE + α·L_bal + β·L_dis (+ the baselines' losses), every term a token sum normalised by
    fairseq's sample size."""

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 balance_factor=0.3, distill_factor=0.3, switch_loss_factor=0.01):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.set_aux_factors(balance=balance_factor, distill=distill_factor, switch=switch_loss_factor)

    def log_task_metrics(self, model, net_output, sample, logging_output):
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        MoEAuxLossMixin.reduce_moe_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True

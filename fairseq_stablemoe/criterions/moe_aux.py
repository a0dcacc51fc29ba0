"""MoE losses and routing statistics, summed over all MoE layers, for any task criterion."""
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict

import torch
from fairseq import metrics, utils

from ..moe import moe_layers


def collect_moe_aux(net_output) -> Dict[str, torch.Tensor]:
    """Sum the losses and token statistics of every MoE layer that ran in this forward (the model returns them
    in its output's extra, "moe_aux"); the load spread per layer."""
    total: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
    for key in ("tokens", "dropped", "forwards"):  # the same keys every batch, so ranks can sum them
        total[key] = torch.zeros((), dtype=torch.long)
    for aux in net_output[1].get("moe_aux", {}).values():
        aux = dict(aux)
        load = aux.pop("load", None)
        for key, value in aux.items():
            total[key] = total[key] + value.detach() if not key.endswith("_loss") else total[key] + value
        if load is not None:
            load = load.float()
            mean = load.mean().clamp(min=1e-9)
            total["load_max_over_mean"] = total["load_max_over_mean"] + load.max() / mean
            total["load_cv"] = total["load_cv"] + load.std(unbiased=False) / mean
            total["unused_experts"] = total["unused_experts"] + (load == 0).sum()
            total["forwards"] = total["forwards"] + 1
    return total


@dataclass
class MoEAuxLossConfig:
    """The MoE loss weights, mixed into each criterion's config dataclass."""

    balance_factor: float = field(default=0.3, metadata={"help": "α: weight of the balance loss (paper Eq. 8)"})
    distill_factor: float = field(default=0.3, metadata={"help": "weight of the distillation loss (paper Eq. 10)"})
    switch_loss_factor: float = field(
        default=0.01, metadata={"help": "--moe-routing switch: weight of the Switch load-balancing loss "
                                        "N·Σ f_i·P_i (Switch Transformer's default 0.01)"})


class MoEAuxLossMixin:
    """Mix into a criterion: `aux_factors` maps a layer loss name (e.g. balance) to its weight."""

    aux_factors: Dict[str, float] = {}

    aux_flags: Dict[str, str] = {"switch": "--switch-loss-factor"}  # default: --{name}-factor

    def set_aux_factors(self, **factors: float):
        """e.g. set_aux_factors(balance=α, distill=β); a negative weight would reward the opposite."""
        for name, factor in factors.items():
            if not factor >= 0:  # also NaN
                flag = self.aux_flags.get(name, f"--{name}-factor")
                raise ValueError(f"{flag} must be >= 0 (got {factor}); 0 switches the {name} loss off")
        self.aux_factors = dict(factors)

    def forward(self, model, sample, reduce=True):
        """fairseq's criterion's loss (its compute_loss: loss, nll_loss) plus the weighted MoE losses."""
        net_output = model(**sample["net_input"])
        task_loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {"ntokens": sample["ntokens"], "nsentences": sample["target"].size(0),
                          "sample_size": sample_size}
        loss = self.add_moe_losses(model, net_output, task_loss, logging_output)
        logging_output["nll_loss"] = nll_loss.data
        self.log_task_metrics(model, net_output, sample, logging_output)
        return loss, sample_size, logging_output

    def log_task_metrics(self, model, net_output, sample, logging_output: dict):
        """What fairseq's criterion logs besides its losses (e.g. accuracy)."""

    def add_moe_losses(self, model, net_output, task_loss: torch.Tensor, logging_output: dict) -> torch.Tensor:
        aux = collect_moe_aux(net_output)
        loss = task_loss
        produced = {name for layer in moe_layers(model) for name in layer.routing.loss_names}
        for name, factor in self.aux_factors.items():
            if name not in produced:
                continue
            value = aux.get(f"{name}_loss")
            if value is None:  # e.g. stage 2, or validation: the term is not part of the objective
                value = task_loss.new_zeros(())
            elif factor:
                loss = loss + factor * value
            logging_output[f"moe_{name}_loss"] = value.data
        for key, value in aux.items():
            if not key.endswith("_loss"):
                logging_output[f"moe_{key}"] = value
        logging_output["loss"] = loss.data
        return loss

    @staticmethod
    def reduce_moe_metrics(logging_outputs) -> None:
        """The MoE keys only; loss, nll_loss and ppl are fairseq's criterion's own reduction."""
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        routed, forwards = total("moe_tokens"), total("moe_forwards")
        if routed > 0:
            for key in [k for k in logging_outputs[0] if k.startswith("moe_") and k.endswith("_loss")]:
                metrics.log_scalar(key[4:], total(key) / routed, routed, round=4)
            if any("moe_distill_agree" in log for log in logging_outputs):  # only StableMoE distils
                metrics.log_scalar("distill_acc", total("moe_distill_agree") / routed, routed, round=4)
            metrics.log_scalar("dropped", total("moe_dropped") / routed, routed, round=4)
        if forwards > 0:
            for key, name in [("moe_load_max_over_mean", "load_max_mean"), ("moe_load_cv", "load_cv"),
                              ("moe_unused_experts", "unused_experts"), ("moe_stage", "stage")]:
                if any(key in log for log in logging_outputs):  # e.g. only staged routings have a stage
                    metrics.log_scalar(name, total(key) / forwards, forwards, round=3)

"""MoE losses and routing statistics, summed over all MoE layers, for any task criterion."""
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict

import torch
from fairseq import metrics, utils

from ..moe import gate_stats


def load_spread(load: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One layer's expert loads |A_i| as logged: busiest over mean, coefficient of variation, unused experts."""
    load = load.float()
    mean = load.mean().clamp(min=1e-9)
    return {"load_max_over_mean": load.max() / mean, "load_cv": load.std(unbiased=False) / mean,
            "unused_experts": (load == 0).sum()}


PER_LAYER = ("tokens", "distill_agree", "load_cv", "unused_experts", "forwards")  # logged as moe{i}_<key>


def collect_moe_aux(model, net_output) -> Dict[str, torch.Tensor]:
    """The MoE layers' reports (the model returns them in its output's extra, "moe_aux": every MoE layer, in the
    model's order, with the keys of MoELayer.report), summed over layers; with several MoE layers also each
    layer's own (`{i}:<key>`), at validation each layer's load per expert (`expert_load`), and each routed layer's
    gate statistics (`gate`: one gate_stats row per layer). Reads nothing but the reports (and model.training)."""
    reports = list(net_output[1].get("moe_aux", {}).values())
    total: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
    gates, loads, stages = [], [], []
    for i, report in enumerate(reports):
        aux = dict(report)
        if "gate" in aux:
            gates.append(aux.pop("gate"))
        load = aux.pop("load", None)
        if load is not None:
            loads.append(load)
            ran = aux["forwards"]  # 0 for a layer layerdrop skipped: its spread counts for nothing
            aux.update({key: value * ran for key, value in load_spread(load).items()})
        if "stage" in aux:
            stages.append(aux.pop("stage"))
        for key, value in aux.items():
            total[key] = total[key] + (value if key.endswith("_loss") else value.detach())
        if len(reports) > 1:
            for key in PER_LAYER:
                if key in aux:  # only StableMoE distils, and a dense control has no loads
                    total[f"{i}:{key}"] = aux[key].detach()
    if gates:
        total["gate"] = torch.stack(gates)
    if stages:  # a model is in stage 2 once all its staged layers are
        total["stage"] = torch.stack(stages).min()
        total["staged"] = torch.ones((), dtype=torch.long)
    if loads and not model.training:
        expert_load = torch.zeros(len(loads), max(load.numel() for load in loads), dtype=torch.long)
        for i, load in enumerate(loads):
            expert_load[i, :load.numel()] = load.detach().long().cpu()
        total["expert_load"] = expert_load
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
        aux = collect_moe_aux(model, net_output)
        loss = task_loss
        for name, factor in self.aux_factors.items():
            value = aux.get(f"{name}_loss")
            if value is None:  # no layer's routing has this loss
                continue
            if factor:  # zero where the objective lacks the term (stage 2, validation)
                loss = loss + factor * value
            logging_output[f"moe_{name}_loss"] = value.data
        for key, value in aux.items():
            if not key.endswith("_loss"):
                layer, _, stat = key.rpartition(":")
                logging_output[f"moe{layer}_{stat}"] = value
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
            if "moe_distill_agree" in logging_outputs[0]:  # only StableMoE distils
                metrics.log_scalar("distill_acc", total("moe_distill_agree") / routed, routed, round=4)
            metrics.log_scalar("dropped", total("moe_dropped") / routed, routed, round=4)
        if forwards > 0:
            for key, name in [("moe_load_max_over_mean", "load_max_mean"), ("moe_load_cv", "load_cv"),
                              ("moe_unused_experts", "unused_experts")]:
                metrics.log_scalar(name, total(key) / forwards, forwards, round=3)
        staged = total("moe_staged")
        if staged > 0:
            # the latest update's stage, not its average over the interval or epoch (which read 1.5 across the
            # switch); its floor, so that one rank or micro-batch still in stage 1 shows as stage 1
            metrics.log_scalar("_stage", total("moe_stage") / staged, staged)
            metrics.log_derived("stage", lambda meters: int(meters["_stage"].val))
        layer = 0
        while f"moe{layer}_forwards" in logging_outputs[0]:
            log_layer_metrics(f"moe{layer}", total, logging_outputs[0].__contains__)
            layer += 1
        if "moe_expert_load" in logging_outputs[0]:
            metrics.log_scalar_sum("_moe_expert_load", sum(log["moe_expert_load"] for log in logging_outputs))
        if "moe_gate" in logging_outputs[0]:
            log_gate_metrics(sum(log["moe_gate"] for log in logging_outputs))


GATE_METRICS = {"gate_mean": "mean", "gate_p10": "p10", "gate_below_0_1": "below_0.1"}


def log_gate_metrics(rows: torch.Tensor) -> None:
    """gate_mean, gate_p10, gate_below_0_1 over all MoE layers' soft gates, read from the rows summed over the
    log interval or validation (a percentile does not average over batches). None in an interval without gates
    (e.g. stage 2 under --stage2-gate one)."""
    if float(rows[:, 2:].sum()) == 0:
        return
    metrics.log_scalar_sum("_moe_gate", rows)
    for name, key in GATE_METRICS.items():
        metrics.log_derived(name, lambda meters, key=key: gate_metric(meters, key))


def gate_metric(meters, key: str):
    rows = meters["_moe_gate"].sum if "_moe_gate" in meters else None
    found = gate_stats.summary(rows) if torch.is_tensor(rows) else None  # a reset meter's sum is 0
    return None if found is None else round(found[key], 4)


def log_layer_metrics(prefix: str, total, has) -> None:
    """One MoE layer's load_cv, unused_experts and distill_acc, e.g. moe0_load_cv."""
    forwards, tokens = total(f"{prefix}_forwards"), total(f"{prefix}_tokens")
    if forwards > 0:
        metrics.log_scalar(f"{prefix}_load_cv", total(f"{prefix}_load_cv") / forwards, forwards, round=3)
        metrics.log_scalar(f"{prefix}_unused_experts", total(f"{prefix}_unused_experts") / forwards, forwards,
                           round=3)
    if tokens > 0 and has(f"{prefix}_distill_agree"):
        metrics.log_scalar(f"{prefix}_distill_acc", total(f"{prefix}_distill_agree") / tokens, tokens, round=4)

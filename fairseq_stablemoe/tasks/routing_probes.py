"""Routing probes (paper §1.1, Figs. 2 and 7): during training, record at fixed updates the expert that
every token of a fixed probe set would train with, for every MoE layer, into SAVE_DIR/routing_probes.pt.

Read the record with `python -m fairseq_stablemoe.analysis.fluctuation SAVE_DIR`.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq import utils
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import BaseFairseqModel
from omegaconf import II

from ..atomic import atomic_open, move_aside
from ..moe import comm
from ..options import option
from ..moe.decisions import probe_experts

logger = logging.getLogger(__name__)

PROBES_FILE = "routing_probes.pt"
FORMAT = "fairseq_stablemoe.routing_probes/1"


@dataclass
class RoutingProbeConfig(FairseqDataclass):
    """Mix into a task's dataclass config; a task with argparse options (add_args) calls add_routing_probe_args."""

    routing_probe_interval: int = field(
        default=0,
        metadata={"help": "every K updates (and at update 0 and at each validation, so the final update too), "
                          "record the expert each token of a fixed probe set would train with, for every MoE "
                          "layer, into SAVE_DIR/routing_probes.pt, and log the share of tokens whose expert "
                          "changed since the previous probe (route_change); 0 = off"})
    routing_probe_tokens: int = field(
        default=4096, metadata={"help": "probe set size: the first M tokens of the (first) validation subset"})
    routing_probe_dir: str = II("checkpoint.save_dir")
    routing_probe_split: str = II("dataset.valid_subset")


def add_routing_probe_args(parser):
    gen_parser_from_dataclass(parser, RoutingProbeConfig())


class InconsistentRecord(ValueError):
    """a probe record whose per-layer lists differ in length (caught: the file is moved aside)"""


def expert_dtype(num_experts: int) -> torch.dtype:
    return torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 2 ** 15 else torch.int32


def save_probes(path: str, record: dict):
    """Write the whole record to a temporary file, then atomically replace `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_open(path) as f:
        torch.save(record, f)


def load_probes(path: str) -> dict:
    """{layers: [name], num_experts: [N], tokens: [ids (n,)], updates: (P,), experts: [(P, n)]}, per MoE layer."""
    if os.path.isdir(path):
        path = os.path.join(path, PROBES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: train with --routing-probe-interval K to record probes")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a routing probe record of this version ({FORMAT})")
    return record


def probe_sample(dataset, num_tokens: int) -> dict:
    """The first items of `dataset` holding at least `num_tokens` tokens, collated as a batch."""
    items, total = [], 0
    for i in range(len(dataset)):
        if total >= num_tokens:
            break
        items.append(dataset[i])
        total += dataset.num_tokens(i)
    if not items:
        raise ValueError("--routing-probe-interval needs a non-empty validation subset for its probe set")
    return dataset.collater(items)


def unwrap(model):
    """The fairseq model inside distributed wrappers: probes must not run their forward (collectives)."""
    while not isinstance(model, BaseFairseqModel) and hasattr(model, "module"):
        model = model.module
    return model


class RoutingProbes:
    """The probe record of one training run; only the first rank probes and writes."""

    def __init__(self, path: str, interval: int, num_tokens: int, split: str):
        self.path, self.interval, self.num_tokens, self.split = path, interval, num_tokens, split
        self.record: Optional[dict] = None
        self.sample: Optional[dict] = None
        self.latest_change: Optional[float] = None  # share of probe tokens whose expert changed at the last probe

    @property
    def active(self) -> bool:
        return comm.rank() == 0

    @classmethod
    def from_task_config(cls, cfg) -> Optional["RoutingProbes"]:
        interval, tokens = option(cfg, "routing_probe_interval", 0), option(cfg, "routing_probe_tokens", 0)
        if not interval:
            return None
        if interval < 0 or tokens < 1:
            raise ValueError(f"--routing-probe-interval must be >= 0 and --routing-probe-tokens >= 1 (got "
                             f"{interval}, {tokens})")
        # argparse tasks get the whole command line: --save-dir and --valid-subset themselves
        save_dir = option(cfg, "routing_probe_dir") or option(cfg, "save_dir")
        split = str(option(cfg, "routing_probe_split") or option(cfg, "valid_subset")).split(",")[0]
        return cls(os.path.join(save_dir, PROBES_FILE), interval, tokens, split)

    def recorded(self, update: int) -> bool:
        return self.record is not None and len(self.record["updates"]) > 0 and \
            int(self.record["updates"][-1]) >= update

    def probe(self, task, model, update: int):
        """Record the experts at `update` (once per update) and rewrite the file."""
        if not self.active:
            return
        if self.sample is None:
            self.sample = probe_sample(task.dataset(self.split), self.num_tokens)
            self._continue_record(update)
        if self.recorded(update):
            return
        tokens, experts, num_experts = self._route(unwrap(model))
        if self.record is None:
            self.record = {
                "format": FORMAT, "layers": list(tokens), "num_experts": num_experts,
                "tokens": list(tokens.values()), "updates": torch.zeros(0, dtype=torch.long),
                "experts": [e.new_zeros(0, e.numel()) for e in experts.values()],
            }
        rec = self.record
        if rec["layers"] != list(tokens) or len(rec["tokens"]) != len(tokens) or \
                not all(map(torch.equal, rec["tokens"], tokens.values())):
            aside = move_aside(self.path, "old") if os.path.exists(self.path) else "nowhere (not written yet)"
            logger.warning(f"{self.path} was recorded with another probe set or other MoE layers (other data, "
                           f"--routing-probe-tokens or model): moved it to {aside} and started a new record")
            self.record = None
            return self.probe(task, model, update)
        rec["updates"] = torch.cat([rec["updates"], torch.tensor([update])])
        rec["experts"] = [torch.cat([old, new.unsqueeze(0)]) for old, new in zip(rec["experts"], experts.values())]
        save_probes(self.path, rec)
        changes = self._changes()
        if changes:
            logger.info(f"routing probes: update {update}: the expert changed since update "
                        f"{int(rec['updates'][-2])} for {', '.join(f'{c:.2%}' for c in changes)} of "
                        f"{rec['tokens'][0].numel()} probe tokens")

    def _continue_record(self, update: int):
        """A resumed run keeps the probes up to `update` and drops later ones (the future it replaces);
        a run from update 0 starts a new record."""
        if update == 0 or not os.path.exists(self.path):
            return
        try:
            record = load_probes(self.path)
            if not (isinstance(record["layers"], list) and len(record["layers"]) == len(record["tokens"])
                    == len(record["experts"]) == len(record["num_experts"])):
                raise InconsistentRecord  # its per-layer lists differ in length
            keep = record["updates"] <= update
            record["updates"] = record["updates"][keep]
            record["experts"] = [e[keep] for e in record["experts"]]
            self.record = record
            self._changes()
        except Exception as err:  # a side file, cut or foreign: never the end of a training run
            self.record = None
            aside = move_aside(self.path, "unreadable")
            logger.warning(f"{self.path} could not be read ({type(err).__name__}: {str(err)[:80]}): moved it to "
                           f"{aside} and started a new record; training goes on")
            return
        logger.info(f"routing probes: continuing {self.path} from its {int(keep.sum())} probes up to update {update}")

    def _route(self, model):
        """Per MoE layer: the probe tokens' ids, their experts now (compact dtype), the layer's expert count."""
        device = next(model.parameters()).device
        decided = probe_experts(model, utils.apply_to_sample(lambda t: t.to(device), self.sample)["net_input"])
        layers = dict(model.named_modules())
        tokens, experts, num_experts = {}, {}, []
        for name, (ids, expert) in decided.items():
            routed = expert >= 0
            num_experts.append(layers[name].num_experts)
            tokens[name] = ids[routed][: self.num_tokens].to("cpu", torch.int32)
            experts[name] = expert[routed][: self.num_tokens].to("cpu", expert_dtype(num_experts[-1]))
        return tokens, experts, num_experts

    def _changes(self) -> List[float]:
        """Per layer: share of probe tokens whose expert differs between the last two probes."""
        experts = self.record["experts"]
        if len(self.record["updates"]) < 2:
            return []
        changes = [(e[-1] != e[-2]).float().mean().item() for e in experts]
        self.latest_change = sum(changes) / len(changes)
        return changes

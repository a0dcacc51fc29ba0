"""`--stage1-updates auto`: end StableMoE's stage 1 when the routing has settled (beyond the paper, which fixes stage 1
at 10 % of training).

Settled means, at `--stage1-auto-patience` routing probes in a row: the share of probe tokens whose backbone expert
changed since the previous probe (`route_change`) is below `--stage1-auto-route-change`, and the distilled router's
agreement with the backbone in training (`distill_acc` over the updates since the previous probe) rose by less than
`--stage1-auto-min-gain`. Whatever the routing does, stage 1 ends at `--stage1-auto-max-updates`. The task asks at
each probe (`observe`), and every update for the upper bound (`past_bound`).
"""
import logging
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

from ..moe import comm
from ..options import option

logger = logging.getLogger(__name__)


SETTLED = "--stage1-updates auto: the routing counts as settled at a probe where"
HELP = {
    "route_change": f"{SETTLED} route_change (share of probe tokens whose expert changed since the previous probe) "
                    f"is below this",
    "min_gain": f"{SETTLED} the distilled router's agreement with the backbone rose by less than this since the "
                f"previous probe",
    "patience": "--stage1-updates auto: probes in a row that must find the routing settled",
    "max_updates": "--stage1-updates auto: stage 1 ends at this update at the latest (0 = a fifth of --max-update)",
}


@dataclass
class Stage1AutoConfig(FairseqDataclass):
    """Mix into a task's dataclass config; a task with argparse options (add_args) calls add_stage1_auto_args."""

    stage1_auto_route_change: float = field(default=0.02, metadata={"help": HELP["route_change"]})
    stage1_auto_min_gain: float = field(default=0.005, metadata={"help": HELP["min_gain"]})
    stage1_auto_patience: int = field(default=3, metadata={"help": HELP["patience"]})
    stage1_auto_max_updates: int = field(default=0, metadata={"help": HELP["max_updates"]})


def add_stage1_auto_args(parser):
    gen_parser_from_dataclass(parser, Stage1AutoConfig())


class Stage1Auto:
    """The decision, probe by probe. `observe` returns why stage 1 ends now, or None."""

    def __init__(self, route_change: float, min_gain: float, patience: int, max_updates: int):
        self.route_change, self.min_gain, self.patience, self.max_updates = route_change, min_gain, patience, max_updates
        self.settled = 0  # probes in a row that found the routing settled
        self.agreement: Optional[float] = None  # at the previous probe
        self._agree = self._tokens = 0.0

    @classmethod
    def from_task_config(cls, cfg, max_update: int) -> "Stage1Auto":
        given = {f.name: option(cfg, f.name, f.default) for f in fields(Stage1AutoConfig)}
        route_change, patience = given["stage1_auto_route_change"], given["stage1_auto_patience"]
        max_updates = given["stage1_auto_max_updates"] or max_update // 5
        if max_updates < 1 or patience < 1 or not 0 <= route_change <= 1:
            raise ValueError(
                f"--stage1-updates auto needs --stage1-auto-max-updates >= 1 (or --max-update, of which it takes "
                f"a fifth), --stage1-auto-patience >= 1 and --stage1-auto-route-change in [0, 1] (got "
                f"{given['stage1_auto_max_updates']}, --max-update {max_update}, {patience}, {route_change})")
        return cls(route_change, given["stage1_auto_min_gain"], patience, max_updates)

    def count(self, distill_agree: float, tokens: float):
        """A training update's distillation agreement (token sums, all ranks)."""
        self._agree += distill_agree
        self._tokens += tokens

    def observe(self, update: int, route_change: Optional[float]) -> Optional[str]:
        """At a probe (route_change None: not measured yet): why stage 1 ends at `update`, or None."""
        agreement = self._agree / self._tokens if self._tokens else None
        self._agree = self._tokens = 0.0
        gain = None if agreement is None or self.agreement is None else agreement - self.agreement
        self.agreement = agreement if agreement is not None else self.agreement
        settled = route_change is not None and route_change < self.route_change and gain is not None \
            and gain < self.min_gain
        self.settled = self.settled + 1 if settled else 0
        if self.settled >= self.patience:
            return (f"the routing settled: route_change {route_change:.4f} < {self.route_change} and the distilled "
                    f"router's agreement {agreement:.4f} rose by {gain:+.4f} < {self.min_gain} at {self.settled} "
                    f"probes in a row")
        return None

    def past_bound(self, update: int) -> Optional[str]:
        if update >= self.max_updates:
            return f"--stage1-auto-max-updates {self.max_updates} reached before the routing settled"
        return None

    @staticmethod
    def agree_everywhere(decision: bool, device) -> bool:
        """Rank 0 probes and decides; every rank must enter stage 2 at the same update."""
        return bool(comm.all_reduce_sum(torch.tensor([int(decision)], device=device)).item())

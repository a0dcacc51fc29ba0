"""Each expert's load per MoE layer at every validation, in SAVE_DIR/expert_loads.json (plain JSON: loading it runs
nothing). Read or plot it with `python -m fairseq_stablemoe.analysis.expert_load SAVE_DIR`."""
import json
import logging
import os
from typing import List, Optional

import torch

from ..atomic import atomic_open, move_aside
from ..moe import gate_stats

logger = logging.getLogger(__name__)

EXPERT_LOADS_FILE = "expert_loads.json"
FORMAT = "fairseq_stablemoe.expert_loads/1"


def load_expert_loads(path: str) -> dict:
    """{format, layers: [name], num_experts: [N], validations: [{update, subset, load: [[tokens per expert]],
    gate: [{mean, p10, below_0.1} or null per layer]}]}; subset is the validation subset's place in --valid-subset;
    gate (its mean, 10th percentile and share below 0.1, moe/gate_stats.py) is null for a layer without a soft
    gate, and absent from records written before it was logged."""
    if os.path.isdir(path):
        path = os.path.join(path, EXPERT_LOADS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: fairseq-train writes it beside the checkpoints at each "
                                f"validation (with --task stablemoe_language_modeling or "
                                f"stablemoe_translation_multi_simple_epoch)")
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not an expert load record of this version ({FORMAT})")
    return record


class ExpertLoadRecord:
    """The record of one training run; a resumed run drops what was recorded after the update it resumed from."""

    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, EXPERT_LOADS_FILE)
        self.record: Optional[dict] = None

    def add(self, update: int, subset: int, layers: List[str], num_experts: List[int], load: torch.Tensor,
            gate: Optional[torch.Tensor] = None):
        """load: layers x N tokens per expert; gate: layers x gate_stats.ROW summed rows (None: no soft gate)."""
        if self.record is None:
            self.record = self._continued(update, layers, num_experts)
        validation = {"update": update, "subset": subset,
                      "load": [row[:n].tolist() for row, n in zip(load.long(), num_experts)]}
        if torch.is_tensor(gate):
            validation["gate"] = [gate_stats.summary(row) for row in gate.cpu()]
        self.record["validations"].append(validation)
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with atomic_open(self.path, "w") as f:
                json.dump(self.record, f)
        except OSError as err:  # a side file: training goes on without it
            logger.warning(f"could not write {self.path} ({err}); training goes on, this validation's expert loads "
                           f"are not recorded")

    def _continued(self, update: int, layers: List[str], num_experts: List[int]) -> dict:
        fresh = {"format": FORMAT, "layers": layers, "num_experts": num_experts, "validations": []}
        if not os.path.exists(self.path):
            return fresh
        try:
            record = load_expert_loads(self.path)
            if record["layers"] != layers or record["num_experts"] != num_experts:
                move_aside(self.path, "old")  # another model's record: kept aside, not mixed in
                return fresh
            record["validations"] = [v for v in record["validations"] if int(v["update"]) < update]
            return record
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError) as err:
            aside = move_aside(self.path, "unreadable")
            logger.warning(f"{self.path} could not be read ({type(err).__name__}: {str(err)[:80]}): moved it to "
                           f"{aside} and started a new record; training goes on")
            return fresh

"""The gate's distribution (logged for every routing with a soft gate): mean, 10th percentile, share below 0.1.

A percentile is no sum over batches, so each forward contributes a row that is one: [Σ gate, tokens with gate
< 0.1, a 100-bin histogram of the gate on [0, 1]]. Rows are summed over batches, ranks and log intervals like
the other statistics, and the summary is read off the sum: mean and share exactly, the percentile from the
histogram (linear within its bin, so to within 0.01).
"""
from typing import Optional

import torch

BINS = 100
LOW = 0.1  # a gate below this mostly switches its expert off (issue 20: 10 % of tokens below 0.03)
ROW = 2 + BINS


def gate_row(gate: torch.Tensor) -> torch.Tensor:
    """One forward's (ROW,) float64 statistics of the gates (n,) in [0, 1]."""
    gate = gate.detach().double()
    bins = (gate * BINS).floor().clamp(0, BINS - 1).long()  # [k/100, (k+1)/100); 1.0 in the last bin
    histogram = torch.bincount(bins, minlength=BINS).double()
    return torch.cat([gate.sum().view(1), (gate < LOW).sum().double().view(1), histogram])


def percentile(histogram: torch.Tensor, q: float) -> float:
    """The q-quantile (0 < q < 1) of values binned in `histogram` over [0, 1], linear within the bin."""
    counts = histogram.double()
    target = q * float(counts.sum())
    cumulative = torch.cumsum(counts, 0)
    k = int((cumulative < target).sum())  # the first bin where the cumulative count reaches the target
    k = min(k, BINS - 1)
    before = float(cumulative[k - 1]) if k > 0 else 0.0
    inside = float(counts[k])
    fraction = (target - before) / inside if inside > 0 else 0.0
    return (k + fraction) / BINS


def summary(rows: torch.Tensor) -> Optional[dict]:
    """{mean, p10, below_0.1} of summed rows (ROW,) or (layers, ROW) (summed over layers); None without gates."""
    row = rows.reshape(-1, ROW).sum(0).double()
    tokens = float(row[2:].sum())
    if tokens == 0:
        return None
    return {"mean": float(row[0]) / tokens, "p10": percentile(row[2:], 0.1), "below_0.1": float(row[1]) / tokens}

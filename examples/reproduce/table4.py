"""Paper Table 4 at CPU scale: where the MoE layer goes (StableMoE, seed 1).

    python examples/reproduce/table4.py [--quick] [--data ...] [--out results/reproduce]

Stacked after the last block (top), after block L/2 (middle: Table 2's StableMoE run), before the first block
(bottom), or scattered: one single-sublayer MoE layer after each of evenly spaced blocks, as many layers as
the stacked layer has sublayers (the paper: 3 after blocks L/4, 2L/4, 3L/4).
"""
from ablations import write_ablation
from lm import STABLEMOE, moe


def rows(scale):
    return [
        ("stacked, top", moe("StableMoE top", "stablemoe", "--moe-position", "top"), 19.55),
        ("stacked, middle (default)", STABLEMOE, 19.28),
        ("stacked, bottom", moe("StableMoE bottom", "stablemoe", "--moe-position", "bottom"), 22.82),
        ("scattered", moe("StableMoE scattered", "stablemoe", "--moe-position", "scattered", "--moe-layers",
                          str(scale.sublayers), "--moe-sublayers", "1",
                          note=f"{scale.sublayers} MoE layers × 1 sublayer"), 20.56),
    ]


if __name__ == "__main__":
    write_ablation(__doc__, "table4", "Table 4: position of the MoE layer", rows, "Position")

"""Paper Table 5 at CPU scale: the effect of a fixed routing (seed 1).

    python examples/reproduce/table5.py [--quick] [--data ...] [--out results/reproduce]

BASE Layer (Table 2's run); BASE Layer + fixed routing: stage 1 assigns by BASE's balanced assignment (no
balance loss) and distils it into the word-embedding router, which routes alone from then on
(--stage1-assignment balanced); StableMoE with only stage 1 (stage 1 never ends; valid and test are scored,
as always, with the distilled router's routing); full StableMoE (Table 2's run).
"""
from ablations import write_ablation
from lm import BASE_FIXED, STABLEMOE, TABLE2, moe

ROWS = [
    ("BASE Layer", next(r for r in TABLE2 if r.routing == "base"), 20.04),
    ("BASE Layer + fixed routing (stage 2)", BASE_FIXED, 19.41),
    ("StableMoE with only stage 1", moe("StableMoE stage 1 only", "stablemoe", stage1_fraction=1.5,
                                        note="stage 1 for every update"), 19.48),
    ("StableMoE (stage 1 + fixed routing in stage 2)", STABLEMOE, 19.28),
]

if __name__ == "__main__":
    write_ablation(__doc__, "table5", "Table 5: fixed routing", lambda scale: ROWS, "Model")

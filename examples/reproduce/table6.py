"""Paper Table 6 at CPU scale: stage-1 length and distilled-router variants (StableMoE, seed 1).

    python examples/reproduce/table6.py [--quick] [--data ...] [--out results/reproduce]

The paper's routers are a word embedding, a CNN and 1-, 2-, 3-layer Transformers; the plugin has the word
embedding, a causal width-5 CNN and a bigram embedding (--distilled-router), so the Transformer rows are
replaced by the bigram router.
"""
from ablations import write_ablation
from lm import STABLEMOE, moe

ROWS = [
    ("Word embedding, stage 1 10 %", STABLEMOE, 19.28),
    ("Word embedding, stage 1 25 %", moe("StableMoE wordemb 25", "stablemoe", stage1_fraction=0.25), 19.34),
    ("Word embedding, stage 1 50 %", moe("StableMoE wordemb 50", "stablemoe", stage1_fraction=0.5), 19.41),
    ("CNN, stage 1 25 %", moe("StableMoE cnn 25", "stablemoe", "--distilled-router", "cnn",
                              stage1_fraction=0.25), 19.39),
    ("Bigram embedding, stage 1 25 %", moe("StableMoE bigram 25", "stablemoe", "--distilled-router", "bigram",
                                           stage1_fraction=0.25, note="paper: 1/2/3-layer Transformer"),
     "19.42 / 19.38 / 19.65"),
]

if __name__ == "__main__":
    write_ablation(__doc__, "table6", "Table 6: stage-1 length and distilled router", lambda scale: ROWS,
                   "Distilled router, stage 1")

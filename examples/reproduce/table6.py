"""Paper Table 6 at CPU scale: stage-1 length and distilled-router variants (StableMoE, seed 1).

    python examples/reproduce/table6.py [--quick | --long] [--data ...] [--out results/reproduce]

The paper's routers are a word embedding, a CNN and 1-, 2-, 3-layer Transformers. The default and quick modes
(run before the plugin had --distilled-router transformer) train the word embedding, the causal width-5 CNN and a
bigram embedding; --long trains the word embedding (10 %, 25 %) and the 1-, 2-, 3-layer Transformer routers.
"""
from ablations import write_ablation
from lm import LONG, STABLEMOE, moe

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


def transformer(layers: int):
    return (f"{layers}-layer Transformer, stage 1 25 %",
            moe(f"StableMoE transformer{layers} 25", "stablemoe", "--distilled-router", "transformer",
                "--distilled-router-layers", str(layers), stage1_fraction=0.25), (19.42, 19.38, 19.65)[layers - 1])


# long mode (lm.LONG): the paper's Transformer routers next to the word embedding, as CPU allows
LONG_ROWS = ROWS[:2] + [transformer(layers) for layers in (1, 2, 3)]

if __name__ == "__main__":
    write_ablation(__doc__, "table6", "Table 6: stage-1 length and distilled router",
                   lambda scale: LONG_ROWS if scale is LONG else ROWS, "Distilled router, stage 1")

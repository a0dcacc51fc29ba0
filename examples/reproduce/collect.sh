#!/usr/bin/env bash
# Copy the finished runs' result files and the tables of one mode into docs/results/<mode>/ (committed).
#   bash examples/reproduce/collect.sh [long|full|quick] [OUT (default results/reproduce)]
set -euo pipefail
MODE=${1:-long} OUT=${2:-results/reproduce}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
mkdir -p "docs/results/$MODE/runs"
for run in "$OUT/$MODE"/runs/*/; do
  [ -e "$run/result.json" ] && cp "$run/result.json" "docs/results/$MODE/runs/$(basename "$run").json"
done
for table in "$OUT/$MODE"/*.md; do
  [ -e "$table" ] && cp "$table" "docs/results/$MODE/"
done
ls "docs/results/$MODE" "docs/results/$MODE/runs"

#!/usr/bin/env bash
# Every table and figure of the paper at CPU scale, in the order that shares runs best; re-run to resume.
#   bash examples/reproduce/all.sh [--quick] [--data-lm DIR] [--data-mt DIR] [--out DIR] [--jobs N]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LM=() MT=() COMMON=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) COMMON+=(--quick); shift ;;
    --data-lm) LM+=(--data "$2"); shift 2 ;;
    --data-mt) MT+=(--data "$2"); shift 2 ;;
    --out|--jobs) COMMON+=("$1" "$2"); shift 2 ;;
    *) echo "unknown option $1; see the header of $0" >&2; exit 2 ;;
  esac
done
for entry in table2 fig4 fig2 table5 table4 table6; do
  python "$HERE/$entry.py" "${LM[@]}" "${COMMON[@]}"
done
python "$HERE/table3.py" "${MT[@]}" "${COMMON[@]}"

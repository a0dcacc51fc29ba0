#!/usr/bin/env bash
# `make demo`: a StableMoE language model on the US State-of-the-Union addresses, on CPU, end to end:
# data -> sentencepiece -> fairseq-preprocess -> fairseq-train (stage 1 -> stage 2) -> fairseq-eval-lm.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${DEMO_DIR:-demo}
UPDATES=${DEMO_UPDATES:-500}
STAGE1=$((UPDATES / 10))  # the paper's 10 %
PROBE=$(( UPDATES >= 10 ? UPDATES / 10 : 1 ))  # routing probes for stablemoe-fluctuation
# One thread per process unless you set OMP_NUM_THREADS: on 2 cores shared with other jobs, two threads per process
# oversubscribe them and trained several times slower (README's time table).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "make demo: $UPDATES updates, $OMP_NUM_THREADS thread(s) per process (OMP_NUM_THREADS), writing to $OUT/"
mkdir -p "$OUT"

[ -s "$OUT/text/train.txt" ] || python examples/demo/prepare_sotu.py "$OUT/text"
if [ ! -s "$OUT/spm.model" ]; then
  python examples/sentencepiece_bpe.py train --inputs "$OUT/text/train.txt" --model-prefix "$OUT/spm" --vocab-size 8000
  python examples/sentencepiece_bpe.py encode --model "$OUT/spm.model" \
    --inputs "$OUT"/text/{train,valid,test}.txt --outputs "$OUT"/text/{train,valid,test}.bpe
fi
if [ ! -s "$OUT/bin/dict.txt" ]; then  # its settings and progress go to $OUT/preprocess.log
  fairseq-preprocess --only-source --trainpref "$OUT/text/train.bpe" --validpref "$OUT/text/valid.bpe" \
    --testpref "$OUT/text/test.bpe" --destdir "$OUT/bin" --workers 2 > "$OUT/preprocess.log" 2>&1 \
    || { tail -20 "$OUT/preprocess.log"; exit 1; }
  grep -E "sents,|Wrote" "$OUT/preprocess.log" | sed -E 's/^INFO:fairseq_cli.preprocess://; s/^\[None\] //'
fi

# stablemoe_lm_tiny: 4 blocks of 128/512, one MoE layer of 8 experts x 2 sublayers after block 2.
# On screen, what matters while it trains: the plugin's lines (parameters, stage switch, warnings), progress and
# validation; the whole log (model, config, a line per routing probe) goes to $OUT/train.log.
if ! PYTHONUNBUFFERED=1 fairseq-train "$OUT/bin" --user-dir fairseq_stablemoe --cpu \
  --task stablemoe_language_modeling --arch stablemoe_lm_tiny \
  --criterion stablemoe_cross_entropy --balance-factor 0.3 --distill-factor 0.3 \
  --stage1-updates "$STAGE1" --max-update "$UPDATES" \
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.1 --lr 2e-3 \
  --lr-scheduler polynomial_decay --total-num-update "$UPDATES" --warmup-updates $((UPDATES / 20)) \
  --tokens-per-sample 128 --sample-break-mode none --batch-size 8 \
  --save-dir "$OUT/checkpoints" --no-epoch-checkpoints --validate-interval-updates $((UPDATES / 4)) --max-valid-steps 50 \
  --routing-probe-interval "$PROBE" --routing-probe-tokens 4096 \
  --log-format simple --log-interval $(( UPDATES >= 10 ? UPDATES / 10 : 1 )) --seed 1 2>&1 | tee "$OUT/train.log" \
  | grep --line-buffered -E "\| fairseq_stablemoe\.|\| (train_inner|valid) \||WARNING|ERROR|done training" \
  | grep --line-buffered -v "| INFO | fairseq_stablemoe.tasks.routing_probes |"; then
  echo "fairseq-train failed; the end of $OUT/train.log:"
  tail -40 "$OUT/train.log"
  exit 1
fi

echo
echo "=== evaluation: fairseq-eval-lm on the whole valid and test splits (the frozen distilled router routes) ==="
for split in valid test; do
  fairseq-eval-lm "$OUT/bin" --user-dir fairseq_stablemoe --task stablemoe_language_modeling --cpu \
    --path "$OUT/checkpoints/checkpoint_last.pt" --gen-subset "$split" --tokens-per-sample 128 --batch-size 16 \
    2>&1 | grep -E "Perplexity|WARNING|Error" | sed -E "s/^INFO:fairseq_cli.eval_lm://; s/^/$split: /"
done
echo
echo "=== routing statistics at the last logged updates (train_inner) ==="
grep "| train_inner |" "$OUT/train.log" | tail -1 | sed 's/.*epoch [0-9]*: *//' | tr ',' '\n' \
  | grep -E "num_updates|balance|distill|load|unused|dropped|stage"
echo "=== fairseq-train's last validation: the first 50 batches of valid only (--max-valid-steps 50), so its"
echo "    ppl differs from eval-lm's valid perplexity above, which covers the whole split ==="
grep "| valid |" "$OUT/train.log" | tail -1 | tr '|' '\n' | grep -E "ppl|distill_acc|load|unused"
echo
echo "=== more on this run (after: . .venv/bin/activate) ==="
echo "stablemoe-fluctuation $OUT/checkpoints --plot $OUT/fluctuation.png   # routing fluctuation (paper Figs. 2, 7)"
echo "stablemoe-expert-load $OUT/checkpoints --plot $OUT/loads.png         # experts' loads per validation"
echo "stablemoe-expert-tokens $OUT/bin --path $OUT/checkpoints/checkpoint_last.pt --split test --top 8 --cpu  # Table 9"

#!/usr/bin/env bash
# End to end on a CPU: prepare (sentencepiece + joined dictionary), train StableMoE and its FLOP-matched dense
# control, translate each test set, write the BLEU tables. The default sizes took 47 min on a busy 2-core
# machine (see README.md); PRESET=small (2 languages, 100 updates) is a smoke run of every step in minutes.
# Override any size through the environment, e.g. TRAIN_LINES=0 (all) VOCAB=64000 for a full run.
#   bash examples/multilingual_translation/run_cpu.sh ../shared/data/mt runs/mt
#   PRESET=small bash examples/multilingual_translation/run_cpu.sh ../shared/data/mt runs/mt-small
set -euo pipefail
CORPUS=${1:?corpus folder with <xx>-en/ subfolders}
OUT=${2:?output folder}
HERE=$(cd "$(dirname "$0")" && pwd)
PLUGIN=$(cd "$HERE/../.." && pwd)/fairseq_stablemoe
case ${PRESET:-default} in
  default) ;;
  small) LANGS=${LANGS:-de,fr} VOCAB=${VOCAB:-1000} TRAIN_LINES=${TRAIN_LINES:-1000} EVAL_LINES=${EVAL_LINES:-20}
         MAX_UPDATE=${MAX_UPDATE:-100} STAGE1=${STAGE1:-10} ;;
  *) echo "PRESET must be default or small (got $PRESET)" >&2; exit 2 ;;
esac
LANGS=${LANGS:-}  # comma-separated X languages; empty = every <xx>-en folder of the corpus
VOCAB=${VOCAB:-4000} TRAIN_LINES=${TRAIN_LINES:-3000} EVAL_LINES=${EVAL_LINES:-100}
MAX_UPDATE=${MAX_UPDATE:-400} STAGE1=${STAGE1:-40} MAX_TOKENS=${MAX_TOKENS:-2000}
DIRECTIONS=${DIRECTIONS:-x2en}   # x2en, or x2en,en2x to train and evaluate both directions
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a busy CPU one thread per process is many times faster
mkdir -p "$OUT"
timed() {
  local start=$SECONDS status=0
  "$@" || status=$?
  echo "[time] $(( SECONDS - start )) s: ${*:1:3}$([ $status = 0 ] || echo " FAILED (exit $status)")" \
    | tee -a "$OUT/timings.txt"
  return $status
}
# wait for every background job; stop, naming the logs, if any failed (a plain `wait` reports success)
wait_all() {
  local failed=0 pid
  for pid in "$@"; do wait "$pid" || failed=1; done
  [ $failed = 0 ] || { echo "a job failed: see the end of each log in $OUT/*.log" >&2; exit 1; }
}

timed python "$HERE/prepare.py" --corpus "$CORPUS" --out "$OUT/prep" --vocab-size "$VOCAB" --langs "$LANGS" \
  --train-lines "$TRAIN_LINES" --valid-lines "$EVAL_LINES" --test-lines "$EVAL_LINES"
LANGS=$(paste -sd, "$OUT/prep/langs.txt")
PAIRS=$(grep -- '-en$' "$OUT/prep/lang_pairs.txt" | paste -sd,)
[[ $DIRECTIONS == *en2x* ]] && PAIRS=$(paste -sd, "$OUT/prep/lang_pairs.txt")

COMMON=("$OUT/prep/bin" --langs "$LANGS" --lang-pairs "$PAIRS" --encoder-langtok src --decoder-langtok
  --sampling-method temperature --sampling-temperature 5 --share-all-embeddings
  --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-attention-heads 4 --decoder-attention-heads 4
  --encoder-layers 2 --decoder-layers 2 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256
  --dropout 0.1 --attention-dropout 0 --label-smoothing 0.1
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.1 --lr 2e-3 --lr-scheduler inverse_sqrt
  --warmup-updates 50 --max-tokens "$MAX_TOKENS" --max-update "$MAX_UPDATE" --cpu --seed 1
  --no-epoch-checkpoints --save-interval 1000 --validate-interval 1000 --num-workers 0
  --log-format simple --log-interval 50)

# The two models train at the same time, one thread each.
# StableMoE: one MoE layer after the middle block of each stack, 8 experts x 2 sublayers
timed fairseq-train "${COMMON[@]}" --user-dir "$PLUGIN" --task stablemoe_translation_multi_simple_epoch \
  --arch stablemoe_transformer_tiny --criterion stablemoe_label_smoothed_cross_entropy \
  --stage1-updates "$STAGE1" --save-dir "$OUT/stablemoe" > "$OUT/stablemoe.log" 2>&1 &
TRAIN_STABLEMOE=$!
# Dense control, FLOP-matched: each stack's 2 blocks get the FFN width of blocks + expert sublayers (2x256 -> 512)
timed fairseq-train "${COMMON[@]}" --task translation_multi_simple_epoch --arch transformer \
  --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --criterion label_smoothed_cross_entropy \
  --save-dir "$OUT/dense" > "$OUT/dense.log" 2>&1 &
wait_all "$TRAIN_STABLEMOE" $!

EVALS=()
for model in stablemoe dense; do
  timed python "$HERE/evaluate.py" --prep "$OUT/prep" --checkpoint "$OUT/$model/checkpoint_last.pt" \
    --out "$OUT/eval-$model" --name "$model" --directions "$DIRECTIONS" \
    -- --beam 4 --batch-size 50 --cpu > "$OUT/eval-$model.log" 2>&1 &
  EVALS+=($!)
done
wait_all "${EVALS[@]}"
cat "$OUT"/eval-*/bleu.md "$OUT/timings.txt"

#!/usr/bin/env bash
# Paper Table 7: StableMoE LM, base or large, 60K updates (6K in stage 1) of 512K tokens.
#   base:  32 experts x 3 sublayers, 12 x 768/3072, 12 heads, lr 6e-4; 32 V100-32GB GPUs, one expert per GPU:
#          8 sequences x 1024 tokens x 32 GPUs x update-freq 2 = 524,288 tokens
#   large: 64 experts x 6 sublayers, 24 x 1024/4096, 16 heads, lr 3e-4; 64 V100-32GB GPUs:
#          8 x 1024 x 64 x update-freq 1 = 524,288 tokens
#   srun --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 examples/reproduce/paper_scale/lm.sh base DATA-BIN SAVE-DIR
# DATA-BIN: fairseq-preprocess output of GPT-2 BPE text (vocab 50,257). ROUTING=switch|base|hash|dense_deeper|
# dense_wider trains Table 2's other rows with the same budget; GPUS=N keeps 512K tokens through --update-freq;
# PRINT=1 prints the command (to paste into a shell) instead of training.
set -euo pipefail
SIZE=${1:?base or large}; DATA=${2:?data-bin}; SAVE=${3:?save dir}; ROUTING=${ROUTING:-stablemoe}
case "$SIZE" in
  base)  SHAPE=(--arch stablemoe_lm_base --moe-experts 32 --moe-sublayers 3 --decoder-embed-dim 768
                --decoder-ffn-embed-dim 3072 --decoder-attention-heads 12 --decoder-layers 12 --lr 0.0006)
         GPUS=${GPUS:-32} ;;
  large) SHAPE=(--arch stablemoe_lm_large --moe-experts 64 --moe-sublayers 6 --decoder-embed-dim 1024
                --decoder-ffn-embed-dim 4096 --decoder-attention-heads 16 --decoder-layers 24 --lr 0.0003)
         GPUS=${GPUS:-64} ;;
  *) echo "size must be base or large (got $SIZE)" >&2; exit 2 ;;
esac
ARGS=("$DATA" --user-dir "$(cd "$(dirname "$0")/../../.." && pwd)/fairseq_stablemoe"
  --task stablemoe_language_modeling "${SHAPE[@]}" --moe-routing "$ROUTING" --moe-layers 1 --moe-position middle
  --dropout 0 --attention-dropout 0 --share-decoder-input-output-embed
  --criterion stablemoe_cross_entropy --balance-factor 0.3 --distill-factor 0.3
  --stage1-updates 6000 --distilled-router wordemb --distilled-dim 50
  --capacity-factor 2  # not in the paper; the authors' README command uses it
  --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.1
  --lr-scheduler polynomial_decay --power 1 --warmup-updates 2000 --total-num-update 60000 --max-update 60000
  --tokens-per-sample 1024 --sample-break-mode none --batch-size 8 --update-freq $((64 / GPUS))
  --fp16 --fp16-no-flatten-grads --ddp-backend legacy_ddp --distributed-world-size "$GPUS" --distributed-port 12355
  --save-dir "$SAVE" --validate-interval-updates 500 --save-interval-updates 500 --keep-interval-updates 2
  --no-epoch-checkpoints --log-format json --log-interval 100)
if [ -n "${PRINT:-}" ]; then
  source "$(dirname "$0")/print_command.sh"; print_command fairseq-train "${ARGS[@]}"
else
  exec fairseq-train "${ARGS[@]}"
fi

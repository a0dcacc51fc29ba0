#!/usr/bin/env bash
# Paper Table 8: StableMoE multilingual translation (X<->En, 9 languages), 6+6 blocks of 512/2048, two MoE layers
# (after the 3rd encoder and the 3rd decoder block) of 32 experts x 3 sublayers, 352K updates (30K in stage 1),
# up to 512K tokens per update. Assumes 32 V100-32GB GPUs, one expert per GPU of each MoE layer:
# 4,096 tokens x 32 GPUs x update-freq 4 = 524,288 tokens.
#   srun --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 examples/reproduce/paper_scale/mt_wmt.sh PREP SAVE-DIR
# PREP: examples/multilingual_translation/prepare.py --vocab-size 64000 output (its langs.txt, lang_pairs.txt,
# bin/). ROUTING=switch|base|hash|dense for Table 3's other rows; PRINT=1 prints the command
# (to paste into a shell) instead.
set -euo pipefail
PREP=${1:?prepare.py output}; SAVE=${2:?save dir}; ROUTING=${ROUTING:-stablemoe}; GPUS=${GPUS:-32}
ARGS=("$PREP/bin" --user-dir "$(cd "$(dirname "$0")/../../.." && pwd)/fairseq_stablemoe"
  --task stablemoe_translation_multi_simple_epoch --arch stablemoe_transformer_wmt10 --moe-routing "$ROUTING"
  --langs "$(paste -sd, "$PREP/langs.txt" 2>/dev/null || echo LANGS)"
  --lang-pairs "$(paste -sd, "$PREP/lang_pairs.txt" 2>/dev/null || echo PAIRS)"
  --encoder-langtok src --decoder-langtok --sampling-method temperature --sampling-temperature 5
  --share-all-embeddings --max-source-positions 256 --max-target-positions 256
  --moe-experts 32 --moe-sublayers 3
  --encoder-embed-dim 512 --encoder-ffn-embed-dim 2048 --encoder-attention-heads 8 --encoder-layers 6
  --decoder-embed-dim 512 --decoder-ffn-embed-dim 2048 --decoder-attention-heads 8 --decoder-layers 6
  --dropout 0.1 --attention-dropout 0
  --criterion stablemoe_label_smoothed_cross_entropy --label-smoothing 0.1 --balance-factor 0.3 --distill-factor 0.3
  --stage1-updates 30000 --distilled-router wordemb --distilled-dim 50
  --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.1 --lr 0.0005
  --lr-scheduler inverse_sqrt --warmup-updates 4000 --max-update 352000
  --max-tokens 4096 --update-freq $((128 / GPUS))
  --fp16 --fp16-no-flatten-grads --ddp-backend legacy_ddp --distributed-world-size "$GPUS" --distributed-port 12355
  --save-dir "$SAVE" --validate-interval-updates 2000 --save-interval-updates 2000 --keep-interval-updates 2
  --no-epoch-checkpoints --log-format json --log-interval 100)
if [ -n "${PRINT:-}" ]; then
  source "$(dirname "$0")/print_command.sh"; print_command fairseq-train "${ARGS[@]}"
else
  exec fairseq-train "${ARGS[@]}"
fi

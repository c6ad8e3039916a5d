#!/usr/bin/env bash
# The CPU evaluations behind two README tables (run here on 2026-11-29 once the session's GPU time was spent):
#   bash benchmarks/cpu_eval.sh before     passkey of the original SmolLM2 past its 8K context (dense; 16K x 4, 32K x 2)
#   bash benchmarks/cpu_eval.sh selection  real-text retrieval at 4K: default selection vs per-token vs 32-token blocks
# Results were copied to benchmarks/results/finetune_smollm2/first_159steps/passkey_before_cpu*/ and
# benchmarks/results/eval_smollm2/cpu_selection_4k/.
set -euo pipefail
out="${OUT:-/tmp}"
case "${1:-before}" in
  before)
    sparsex-eval --model smollm2 --tasks passkey --lengths 16384 --methods sdpa --samples 4 --batch-size 1 \
        --output "$out/before_cpu16" --no-progress
    sparsex-eval --model smollm2 --tasks passkey --lengths 32768 --methods sdpa --samples 2 --batch-size 1 \
        --output "$out/before_cpu32" --no-progress ;;
  selection)
    C="--model smollm2 --tasks niah_single_text,niah_multikey --lengths 4096 --samples 10 --batch-size 5 --no-progress
       --sink-tokens 64 --window 1024 --stride 64"
    sparsex-eval $C --methods sdpa,sparsex --block-size 64 --topk 12 --output "$out/exp_base"
    sparsex-eval $C --methods sparsex --block-size 64 --topk 12 --select-tile 1 --output "$out/exp_tile1"
    sparsex-eval $C --methods sparsex --block-size 32 --topk 24 --output "$out/exp_b32" ;;
esac

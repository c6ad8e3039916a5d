#!/usr/bin/env bash
# One device call on the H200: kernel tests (GPU-gated included), then the prefill benchmark with the
# FlexAttention rows. Writes everything under $OUT (device tool) or benchmarks/results.
# Usage (device tool): bash benchmarks/run_h200.sh
set -uo pipefail
out="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -1
timeout 240 python3 -m pytest tests/ops/test_prefill.py tests/test_integration.py -q -p no:cacheprovider -rs \
    -k "gpu or compile or bf16 or gradients" 2>&1 | tee "$out/pytest_gpu.log" | tail -5
timeout 300 python3 benchmarks/bench_prefill.py --lengths 32768 131072 --sparse-only --dense-bwd-max 0 \
    --flex 32768 131072 --tag flex --out-dir "$out" 2>&1 | tee "$out/bench_flex.log" | tail -12

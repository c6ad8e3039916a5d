#!/usr/bin/env bash
# Run one benchmark script, the GPU tests or sparsex-eval on a GPU machine; files and a log go to one folder.
#
#   bash benchmarks/run_gpu.sh NAME [ARGS...]
#
#   NAME = a script of benchmarks/ without .py   python benchmarks/NAME.py --out-dir OUT ARGS...
#          tests                                 python -m pytest ARGS...  (the GPU test selection: see docs/benchmarks.md)
#          tests-part K/N                        the K-th of N contiguous shares of the whole test suite (8-14 workers)
#          matrix                                the GPU matrix (tests/ops/test_matrix.py): every head dim x block size x
#                                                dtype, forward + backward + decode against the reference + ARGS
#                                                (one process per CPU core, at most 16; each cell named in the log)
#          tests-fast                            the fast GPU subset: every realistic-size GPU case and kernel variant
#                                                (84 tests, 137 s on the H200 with 14 workers, 2026-12-02) + ARGS
#          eval                                  sparsex-eval --output OUT/eval ARGS...
#
# OUT is $OUT when set (the device tool's output folder), else benchmarks/results. TIME_LIMIT=S stops the run
# after S seconds with SIGINT (sparsex-eval keeps every method it finished; the call can still pack its files). The package is installed
# from this checkout first (no network needed). Wheels placed in .whl/ (or .whl2/, ...) are installed into
# /tmp/site, which is put on PYTHONPATH; a wheel too large for one transfer may come as NAME.whl.part-K-of-N
# files over several calls to the same machine: parts wait in /root/whl until all N are there, then are joined.
set -euo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ls -d .whl* >/dev/null 2>&1; then
    mkdir -p /root/whl && for d in .whl*/; do cp "$d"* /root/whl/; done
    for first in /root/whl/*.part-1-of-*; do
        [ -e "$first" ] || continue
        whl="${first%.part-1-of-*}"; n="${first##*-of-}"
        if [ "$(ls "$whl".part-*-of-"$n" | wc -l)" -eq "$n" ]; then
            for k in $(seq 1 "$n"); do cat "$whl.part-$k-of-$n"; done > "$whl" && rm "$whl".part-*
        fi
    done
    ls /root/whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site /root/whl/*.whl
fi
if [ -d /tmp/site ]; then  # a site directory, so that its .pth files run (nvidia-cutlass-dsl's adds its packages)
    mkdir -p /tmp/site_boot && echo 'import site; site.addsitedir("/tmp/site")' > /tmp/site_boot/sitecustomize.py
    export PYTHONPATH="/tmp/site_boot:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
    || { cat "$out/install.log"; exit 1; }

name="${1:?usage: run_gpu.sh NAME [ARGS...]}"
shift
limit=()
[ -n "${TIME_LIMIT:-}" ] && limit=(timeout -s INT "$TIME_LIMIT")
# test processes: one per ~9 GB of GPU memory, at most 14 (an 80 GB H100: 8; a 141 GB H200: 14)
workers=$(python3 -c "import torch; print(max(1, min(14, torch.cuda.get_device_properties(0).total_memory // (9 << 30))))" 2>/dev/null || echo 1)
case "$name" in
    tests-fast) "${limit[@]}" python3 -m pytest -p no:cacheprovider -rs -n "$workers" -q tests/ops/test_decode.py \
        tests/ops/test_prefill.py tests/ops/test_tuning.py tests/apps/test_oracle.py tests/hf/test_attention.py tests/hf/test_static_cache.py \
        -k "gpu or rerank or two_stage or decode_union or select_kernel or padding or anchor or not_rounded or \
low_precision_selection or exact_scores or oracle or loaders or from_pretrained_helper or unsupported or save_load or \
cached_decode or group_loop or static or custom_op or device_tensor or covers or tile_shapes or tuning" "$@" 2>&1 \
        | tee "$out/pytest.log" ;;
    matrix) export SPARSEX_FITTED_LOG="$out/fitted.jsonl"  # small compile-bound cells: one process per CPU core
        "${limit[@]}" python3 -m pytest -p no:cacheprovider -rf -n "$(( $(nproc) < 16 ? $(nproc) : 16 ))" -v tests/ops/test_matrix.py "$@" 2>&1 \
        | tee "$out/pytest.log" ;;
    tests) "${limit[@]}" python3 -m pytest -p no:cacheprovider -rs "$@" 2>&1 | tee "$out/pytest.log" ;;
    tests-part) part="${1:?usage: run_gpu.sh tests-part K/N [ARGS...]}"; shift
        "${limit[@]}" python3 -m pytest -p no:cacheprovider -rs -n "$workers" -q tests --part "$part" "$@" 2>&1 \
        | tee "$out/pytest.log" ;;
    eval) "${limit[@]}" python3 -m sparsex_hf.apps.eval --output "$out/eval" "$@" 2>&1 | tr '\r' '\n' | tee "$out/eval.log" ;;
    *) "${limit[@]}" python3 "benchmarks/$name.py" --out-dir "$out" "$@" 2>&1 | tee "$out/$name.log" ;;
esac

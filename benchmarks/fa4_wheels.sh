#!/usr/bin/env bash
# Download FlashAttention-4 and what it needs for the GPU machine (Python 3.12, CUDA 13) and split them over two
# carried folders that each fit one device call: .whl3 (all but the second half of the CUDA 13 libraries) and
# .whl4 (that half and cuda-bindings). run_gpu.sh joins the halves and installs everything into /tmp/site.
#
#   bash benchmarks/fa4_wheels.sh        then: a call carrying .whl3, and at once a call carrying .whl4
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
pip download -q --no-deps -d "$tmp" --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: \
    flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 "quack-kernels>=0.5.3" \
    "apache-tvm-ffi>=0.1.11,<0.2" torch-c-dlpack-ext einops "cuda-bindings>=13,<14" "cuda-pathfinder>=1.4.2"
rm -rf .whl3 .whl4 && mkdir .whl3 .whl4
big=$(cd "$tmp" && ls nvidia_cutlass_dsl_libs_cu13-*.whl)
split -n 2 -d "$tmp/$big" "$tmp/part" && rm "$tmp/$big"
mv "$tmp/part00" ".whl3/$big.part-1-of-2" && mv "$tmp/part01" ".whl4/$big.part-2-of-2"
mv "$tmp"/cuda_bindings-*.whl .whl4/ && mv "$tmp"/*.whl .whl3/
rmdir "$tmp"
du -sh .whl3 .whl4

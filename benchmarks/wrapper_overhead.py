"""The time ``sparsex_attention`` adds to SDPA where SDPA computes the call (every key set covers its causal
keys): tiny tensors, so SDPA's own work is small and the difference is the wrapper's host work (checks, the
handoff decision). Median of ``--reps`` calls each, on the CPU (or ``--device cuda``, synchronised per batch).

    python benchmarks/wrapper_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsex_hf import SparseXConfig, sparsex_attention


def per_call_us(fn, reps: int, device: str) -> float:
    for _ in range(200):
        fn()
    samples = []
    for _ in range(20):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t) / reps * 1e6)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    q = torch.randn(1, 4, 16, 16, device=args.device)
    k, v = (torch.randn(1, 2, 16, 16, device=args.device) for _ in range(2))
    cfg = SparseXConfig()
    sdpa = per_call_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), args.reps,
                       args.device)
    ours = per_call_us(lambda: sparsex_attention(q, k, v, cfg), args.reps, args.device)
    print(f"{args.device}: SDPA {sdpa:.1f} us, sparsex_attention {ours:.1f} us, wrapper {ours - sdpa:.1f} us per call")


if __name__ == "__main__":
    main()

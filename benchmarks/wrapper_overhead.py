"""The host time Sparse-X adds where SDPA computes the call, on tiny tensors (SDPA's own work is small, so the
difference is host work): ``sparsex_attention`` where every key set covers its causal keys (checks, the handoff
decision), the decode step's handoff ``dense_decode`` against SDPA's own call and what the public decode function
adds before it (its input checks, the cost decision), and the model config lookup every layer makes
(``get_sparsex_config``). Median of ``--reps`` calls each, on the CPU (or ``--device cuda``, synchronised per batch).

    python benchmarks/wrapper_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from sparsex_hf import SparseXConfig, get_sparsex_config, set_sparsex_config, sparsex_attention
from sparsex_hf.ops.attention import dense_decode
from sparsex_hf.ops.attention.api import _check_decode
from sparsex_hf.ops.attention.rules import cost


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
    qd = q[:, :, -1:]
    step = per_call_us(lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True), args.reps, args.device)
    handoff = per_call_us(lambda: dense_decode(qd, k, v, 16, 16), args.reps, args.device)
    print(f"{args.device}: decode step: SDPA {step:.1f} us, dense_decode {handoff:.1f} us per call")
    # what sparsex_decode_attention adds before its handoff: the checks of its inputs and the cost model's decision
    summaries = tuple(torch.zeros(1, 2, 1, 16, device=args.device) for _ in range(3))
    offsets = torch.zeros(1, dtype=torch.long, device=args.device)
    checks = per_call_us(lambda: _check_decode(qd, k, v, summaries, offsets, 16, cfg, 16, None, None, None, None),
                         args.reps, "cpu")
    decide = per_call_us(lambda: cost.decode_dense_is_faster(cfg, 16, 2, 16, 1, "NVIDIA H100 80GB HBM3", False),
                         args.reps, "cpu")
    print(f"decode step: sparsex_decode_attention's input checks {checks:.1f} us, cost decision {decide:.1f} us per call")
    config = LlamaConfig(num_hidden_layers=1)
    set_sparsex_config(type("Model", (), {"config": config})(), window=64)
    lookup = per_call_us(lambda: get_sparsex_config(config), args.reps, "cpu")
    parse = per_call_us(lambda: SparseXConfig.from_any(dict(config.sparsex)), args.reps, "cpu")
    print(f"config: get_sparsex_config {lookup:.1f} us per call (parsing it: {parse:.1f} us)")


if __name__ == "__main__":
    main()

"""Time kernel variants (block sizes, warps, stages) of the Sparse-X forward and forward+backward at one
length; one row per variant in ``sweep.csv``. Each variant updates the forward's tile shape
(``sparsex_hf.ops.attention.prefill.FWD_TILE`` and ``BWD_TILE``) before it is timed.

    python benchmarks/sweep_prefill.py --tokens 131072 --variants 64,8,2 128,8,3 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import triton
from _common import append_csv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention import prefill

HEADLINE = dict(window=4096, stride=256, topk=8, block_size=64, sink_tokens=64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--variants", nargs="+", default=["64,4,2", "64,8,2", "64,4,3", "128,8,2", "128,8,3", "128,4,3"],
                    help="BLOCK_M,WARPS,STAGES")
    ap.add_argument("--bwd", action="store_true", help="also time forward+backward")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    t, hq, hkv, d = args.tokens, 32, 8, 128
    cfg = SparseXConfig(**HEADLINE)
    q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    rows = []
    for var in args.variants:
        bm, warps, stages = var.split(",")
        for tile in (prefill.FWD_TILE, prefill.BWD_TILE):  # the variant for both passes
            tile.update(block_m=int(bm), num_warps=int(warps), num_stages=int(stages))
        ms = triton.testing.do_bench(lambda: sparsex_attention(q, k, v, cfg, backend="triton"), warmup=50, rep=400,
                                     return_mode="median")
        row = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), tokens=t,
                   block_m=bm, warps=warps, stages=stages, fwd_ms=round(ms, 2))
        if args.bwd:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            do = torch.randn_like(q)
            row["fwd_bwd_ms"] = round(triton.testing.do_bench(
                lambda: torch.autograd.grad(sparsex_attention(qg, kg, vg, cfg, backend="triton"), (qg, kg, vg), do),
                warmup=50, rep=400, return_mode="median"), 2)
        rows.append(row)
        print(row, flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "sweep.csv")
    append_csv(path, rows)


if __name__ == "__main__":
    main()

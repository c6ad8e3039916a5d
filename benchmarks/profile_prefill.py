"""Where one Sparse-X prefill forward's time goes on the GPU: each kernel's device time and the host's time per call.

For each length: the host time to issue one call (median of 20, no sync), its device time (CUDA events,
median of 20), and a profiler table of the operators and kernels by device time and by host time, written to
``profile_prefill_T.txt``. Headline config (window 4096, stride 256, top-8 of 64, sink 64), bf16, 32/8 heads, d 128,
the kernels (``dense_when_faster=False``).

    python benchmarks/profile_prefill.py --lengths 8192 32768 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from sparsex_hf import SparseXConfig, sparsex_attention

HEADLINE = dict(window=4096, stride=256, topk=8, block_size=64, sink_tokens=64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    cfg = SparseXConfig.preset(args.preset, **HEADLINE, dense_when_faster=False)
    hq, hkv = args.heads
    for t in args.lengths:
        gen = torch.Generator(device="cuda").manual_seed(t)
        q = torch.randn(1, hq, t, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, hkv, t, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, hkv, t, 128, device="cuda", dtype=torch.bfloat16, generator=gen)

        def fwd():
            return sparsex_attention(q, k, v, cfg, backend="triton")

        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
        host, device = [], []
        for _ in range(20):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            t0 = time.perf_counter()
            fwd()
            host.append((time.perf_counter() - t0) * 1e3)
            e.record()
            torch.cuda.synchronize()
            device.append(s.elapsed_time(e))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
        avg = prof.key_averages()
        text = (f"T={t} heads={hq}/{hkv} preset={args.preset}: host {np.median(host):.3f} ms to issue a call, "
                f"events {np.median(device):.3f} ms\n--- by device time\n"
                + avg.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70)
                + "\n--- by host time\n"
                + avg.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        print(text, flush=True)
        with open(os.path.join(args.out_dir, f"profile_prefill_{t}.txt"), "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()

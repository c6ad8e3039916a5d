"""Sparse-X prefill on one GPU against dense attention in the same run.

Times, per length: Sparse-X forward (selection included), forward+backward, selection alone; SDPA flash
(FA2) and SDPA cuDNN forward (and forward+backward up to --dense-bwd-max) on K/V expanded to the query heads, and
cuDNN with enable_gqa on the unexpanded K/V up to --gqa-max (the call a GQA model's SDPA layer makes); optionally
FlexAttention with a block mask of the same pattern (sink + window + stride + the selected blocks). Headline configuration
(the paper's): window 4096, stride 256, top-8 blocks of 64, sink 64, bf16, batch 1, 32 query / 8 KV
heads, head dim 128. Lengths where dense does not fit run with --heads-long (8/2) and are scaled by
32/8. Effective TFLOP/s count only the keys each query attends. Rows are appended to a CSV with the GPU
name, versions and date; a plot is drawn from the CSV rows of this run.

    python benchmarks/bench_prefill.py --lengths 8192 32768 131072 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import time

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import append_csv

import sparsex_hf
from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention.custom_ops import select_op
from sparsex_hf.ops.attention.rules import cost

HEADLINE = dict(window=4096, stride=256, topk=8, block_size=64, sink_tokens=64)


def attended_keys(t: int, cfg: SparseXConfig) -> float:
    """Sum over query positions of |S(i)| (sink, window, stride, top-k blocks below the window)."""
    p = np.arange(t, dtype=np.int64)
    local = np.minimum(cfg.window, p + 1)
    below = np.maximum(0, p - cfg.window + 1)  # keys [0, below) are outside the window
    sink = np.minimum(cfg.sink_tokens, below)
    stride = np.zeros_like(p)
    if cfg.stride:
        lo = -(-cfg.sink_tokens // cfg.stride)
        stride = np.maximum(0, -(-below // cfg.stride) - lo)
    eligible = np.maximum(0, below // cfg.block_size - cfg.sink_tokens // cfg.block_size)
    per_block = cfg.block_size - (cfg.block_size // cfg.stride if cfg.stride and cfg.stride <= cfg.block_size else
                                  (1 if cfg.stride else 0))
    topk = np.minimum(cfg.topk, eligible) * per_block
    return float((local + sink + stride + topk).sum())


def bench(fn, rep_ms: float, max_runs: int | None = None) -> float:
    if max_runs is not None:  # long runs: a few timed repetitions with events
        fn()
        times = []
        for _ in range(max_runs):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return float(np.median(times))
    return triton.testing.do_bench(fn, warmup=max(25, rep_ms / 4), rep=rep_ms, return_mode="median")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 262144, 1048576])
    ap.add_argument("--sparse-only", type=int, nargs="*", default=[10485760], help="lengths for Sparse-X alone (8/2 heads)")
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8])
    ap.add_argument("--heads-long", type=int, nargs=2, default=[8, 2])
    ap.add_argument("--long-from", type=int, default=1048576, help="lengths >= this run with --heads-long")
    ap.add_argument("--dense-max", type=int, default=1048576)
    ap.add_argument("--dense-bwd-max", type=int, default=131072)
    ap.add_argument("--bwd-max", type=int, default=1048576)
    ap.add_argument("--flex", type=int, nargs="*", default=[], help="lengths for FlexAttention")
    ap.add_argument("--gqa-max", type=int, default=16384, help="up to this length, also SDPA cuDNN with enable_gqa "
                    "on the unexpanded K/V (the dense handoff's own call; a GQA model's SDPA layer)")
    ap.add_argument("--preset", default="default", help="the SparseXConfig preset (with the headline budget)")
    ap.add_argument("--config", default="", help="SparseXConfig overrides, e.g. select_tile=1,topk=16")
    ap.add_argument("--backend", default="triton", choices=["triton", "flash4"],
                    help="the Sparse-X rows' backend (flash4: rows sparsex_flash4, the FlashAttention-4 stage)")
    ap.add_argument("--tag", default="headline")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--report", nargs="+", metavar="TAG", help="no timing: table and plot from the CSV rows of these tags")
    args = ap.parse_args()
    if args.report:
        with open(os.path.join(args.out_dir, "prefill.csv")) as f:
            rows = [r for r in csv.DictReader(f) if r["tag"] in args.report]
        for r in rows:
            for key in ("tokens", "hq", "hkv"):
                r[key] = int(r[key])
            r["ms"] = float(r["ms"])
        global _written
        _written = len(rows)  # nothing new to append
        write(rows, args.out_dir)
        return

    cfg = SparseXConfig.preset(args.preset, **HEADLINE)
    for kv in filter(None, args.config.split(",")):
        key, val = kv.split("=")
        old = getattr(cfg, key)
        if key == "anchor" and val in ("last", "split"):
            old = ""
        cfg = cfg.replace(**{key: val in ("1", "true", "True") if isinstance(old, bool) else val if isinstance(old, str)
                             else type(old)(val)})
    # the "sparsex" rows time the kernels (cost-model handoff off); "sparsex_auto" rows time what the default does
    # where the cost model hands the prefill to SDPA instead
    auto_cfg, cfg = cfg, cfg.replace(dense_when_faster=False)
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    meta = dict(date=datetime.date.today().isoformat(), gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                sparsex=sparsex_hf.__version__, tag=args.tag, config=str(cfg.to_dict()).replace(",", ";"))
    rows = []

    def record(impl, phase, t, hq, hkv, d, ms, flops, peak, qkvo, note=""):
        row = dict(meta, impl=impl, phase=phase, tokens=t, hq=hq, hkv=hkv, d=d, ms=round(ms, 3),
                   eff_tflops=round(flops / ms / 1e9, 1) if flops else "", peak_gb=round(peak / 2**30, 2),
                   qkvo_gb=round(qkvo / 2**30, 2), note=note)
        rows.append(row)
        print(f"{impl:>14} {phase:>7} T={t:>9} heads={hq}/{hkv} {ms:10.2f} ms  {row['eff_tflops']:>6} TFLOP/s  "
              f"peak {row['peak_gb']:7.2f} GB (qkvo {row['qkvo_gb']:.2f}) {note}", flush=True)

    d = 128
    impl = "sparsex" if args.backend == "triton" else f"sparsex_{args.backend}"
    for t in args.lengths + args.sparse_only:
        sparse_only = t in args.sparse_only and t not in args.lengths
        hq, hkv = args.heads_long if (t >= args.long_from or sparse_only) else args.heads
        torch.cuda.empty_cache()
        gen = torch.Generator(device=dev).manual_seed(t)
        q = torch.randn(1, hq, t, d, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16, generator=gen)
        qkvo = 2 * q.numel() * 2 + 2 * k.numel() * 2
        long_run = t >= 1 << 20
        rep = 400 if t <= 131072 else 1000
        runs = 2 if t >= 4 << 20 else (3 if long_run else None)

        keys = attended_keys(t, cfg)
        flops = 4 * hq * d * keys
        fwd = lambda: sparsex_attention(q, k, v, cfg, backend=args.backend)  # noqa: E731
        ms = bench(fwd, rep, runs)
        # peak of one plain call (do_bench's 256 MB cache-flush buffer must not count), plus q, k, v
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base + (q.numel() + 2 * k.numel()) * 2
        record(impl, "fwd", t, hq, hkv, d, ms, flops, peak, qkvo, f"{keys / t:.0f} keys/query")
        if args.backend == "triton" and auto_cfg.dense_when_faster and cost.dense_is_faster(auto_cfg, t, hq, d, 1, gpu):
            with torch.no_grad():
                auto = bench(lambda: sparsex_attention(q, k, v, auto_cfg, backend="triton"), rep, runs)
            record("sparsex_auto", "fwd", t, hq, hkv, d, auto, 0, 0, qkvo, "the default: SDPA by the cost model")
        sel = lambda: select_op(q, k, None, None, None, cfg.json, 0)  # noqa: E731
        record(impl, "select", t, hq, hkv, d, bench(sel, rep, runs), 0, 0, qkvo)
        if t <= args.bwd_max:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            do = torch.randn_like(q)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()

            def fwd_bwd():
                out = sparsex_attention(qg, kg, vg, cfg, backend=args.backend)
                torch.autograd.grad(out, (qg, kg, vg), do)

            ms_b = bench(fwd_bwd, rep, runs)
            record(impl, "fwd+bwd", t, hq, hkv, d, ms_b, 3.5 * flops, torch.cuda.max_memory_allocated() - base, qkvo)
            if args.backend == "triton" and auto_cfg.dense_when_faster and cost.dense_is_faster(
                    auto_cfg, t, hq, d, 1, gpu, train=True):
                def auto_bwd():
                    out = sparsex_attention(qg, kg, vg, auto_cfg, backend="triton")
                    torch.autograd.grad(out, (qg, kg, vg), do)

                record("sparsex_auto", "fwd+bwd", t, hq, hkv, d, bench(auto_bwd, rep, runs), 0, 0, qkvo,
                       "the default: SDPA by the cost model")
            del qg, kg, vg, do
        if sparse_only or t > args.dense_max:
            continue
        kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        dense_flops = 4 * hq * d * t * (t + 1) / 2
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def dense():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            record(name, "fwd", t, hq, hkv, d, bench(dense, rep, runs), dense_flops,
                   torch.cuda.max_memory_allocated() - base, qkvo)
            if t <= args.dense_bwd_max:
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, kr, vr))
                do = torch.randn_like(q)

                def dense_bwd():
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                    torch.autograd.grad(out, (qg, kg, vg), do)

                record(name, "fwd+bwd", t, hq, hkv, d, bench(dense_bwd, rep, runs), 3.5 * dense_flops, 0, qkvo)
                del qg, kg, vg, do
        if t <= args.gqa_max:  # what a GQA model's SDPA layer runs: K/V not expanded, the group sum in the backward
            gqa_rows(q, k, v, t, hq, hkv, d, rep, runs, dense_flops, qkvo, record)
        kr = vr = None  # free before the next length
        write(rows, args.out_dir, final=False)
    for t in args.flex:  # last: its compilation is the slowest part of the run
        hq, hkv = args.heads
        gen = torch.Generator(device=dev).manual_seed(t)
        q = torch.randn(1, hq, t, d, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16, generator=gen)
        flex_row(q, k, v, cfg, t, hq, hkv, d, 400, record, 2 * q.numel() * 2 + 2 * k.numel() * 2, attended_keys(t, cfg))
        write(rows, args.out_dir, final=False)
    write(rows, args.out_dir)


def gqa_rows(q, k, v, t, hq, hkv, d, rep, runs, dense_flops, qkvo, record):
    """``sdpa_cudnn_gqa``: SDPA's cuDNN backend with ``enable_gqa=True`` on the unexpanded K/V, forward and forward +
    backward (its key and value gradients summed over each query group): the call the dense handoff makes."""
    def fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    record("sdpa_cudnn_gqa", "fwd", t, hq, hkv, d, bench(fwd, rep, runs), dense_flops, 0, qkvo)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def fwd_bwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
        torch.autograd.grad(out, (qg, kg, vg), do)

    record("sdpa_cudnn_gqa", "fwd+bwd", t, hq, hkv, d, bench(fwd_bwd, rep, runs), 3.5 * dense_flops, 0, qkvo)


def flex_row(q, k, v, cfg, t, hq, hkv, d, rep, record, qkvo, keys):
    """FlexAttention with the same key sets: sink | window | stride (token level) | the selected blocks of
    each 64-query tile (a [Hkv, T/64, T/64] lookup table built from Sparse-X's own selection)."""
    sel = select_op(q, k, None, None, None, cfg.json, 0)
    nt = t // 64
    table = torch.zeros(hkv, nt, nt + 1, dtype=torch.bool, device=q.device)
    rows_sel = sel[0, :, ::64].long()  # one selection per 64-query tile
    table.scatter_(-1, torch.where(rows_sel >= 0, rows_sel, nt), True)
    g = hq // hkv
    window, sink, stride = cfg.window, cfg.sink_tokens, cfg.stride

    def mask_mod(b, h, q_idx, kv_idx):
        base = (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sink) | (kv_idx % stride == 0))
        return base | ((kv_idx <= q_idx) & table[h // g, q_idx // 64, kv_idx // 64])

    t0 = time.time()
    bm = create_block_mask(mask_mod, 1, hq, t, t, device=q.device, _compile=True)
    build = time.time() - t0
    fa = torch.compile(flex_attention)
    ms = bench(lambda: fa(q, k, v, block_mask=bm, enable_gqa=True), rep)
    record("flex", "fwd", t, hq, hkv, d, ms, 4 * hq * d * keys, 0, qkvo, f"block mask built in {build:.1f}s")


_written = 0


def write(rows, out_dir, final=True):
    """Append the rows not yet written to the CSV; on the final call also the table and the plot."""
    global _written
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "prefill.csv")
    append_csv(path, rows[_written:])
    _written = len(rows)
    if not final:
        return
    # speed-ups (dense at fewer heads scaled to the sparse run's heads)
    lines = ["| tokens | Sparse-X fwd | SDPA flash | SDPA cuDNN | vs flash | vs cuDNN | select | Sparse-X fwd+bwd | "
             "flash fwd+bwd | vs flash |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["impl"], r["phase"], r["tokens"]): r for r in rows}
    for t in sorted({r["tokens"] for r in rows}):
        s = by.get(("sparsex", "fwd", t))
        if s is None:
            continue

        def scaled(impl, phase):
            r = by.get((impl, phase, t))
            return None if r is None else r["ms"] * (s["hq"] / r["hq"])

        fl, cu = scaled("sdpa_flash", "fwd"), scaled("sdpa_cudnn", "fwd")
        sb, fb = by.get(("sparsex", "fwd+bwd", t)), scaled("sdpa_flash", "fwd+bwd")
        sel = by.get(("sparsex", "select", t))
        fmt = lambda x: "-" if x is None else f"{x:.2f} ms"  # noqa: E731
        ratio = lambda a, b: "-" if (a is None or b is None) else f"{a / b:.1f}x"  # noqa: E731
        lines.append(f"| {t} ({s['hq']}/{s['hkv']} heads) | {s['ms']:.2f} ms | {fmt(fl)} | {fmt(cu)} | {ratio(fl, s['ms'])} | "
                     f"{ratio(cu, s['ms'])} | {sel['ms'] / s['ms']:.0%} | {fmt(sb and sb['ms'])} | {fmt(fb)} | "
                     f"{ratio(fb, sb and sb['ms'])} |")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, phase in zip(axes, ("fwd", "fwd+bwd")):
        for impl in ("sparsex", "sdpa_flash", "sdpa_cudnn", "flex"):
            pts = sorted((r["tokens"], r["ms"] * (32 / r["hq"])) for r in rows if r["impl"] == impl and r["phase"] == phase)
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=impl)
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms (32 query heads; fewer-head runs scaled)")
        ax.set_title(f"{phase}, bf16, head dim 128, GQA 4 ({rows[0]['gpu']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "prefill.png"), dpi=120)


if __name__ == "__main__":
    main()

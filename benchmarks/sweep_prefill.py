"""Time tile shapes of the Sparse-X prefill kernels at one length and keep the fastest per GPU.

Each variant ``BLOCK_M,WINDOW_N,WARPS,STAGES[,TMA]`` is timed for the forward (selection included) and, with
``--bwd``, for forward+backward with that forward and the variant as the backward's tile; one row per variant in
``sweep.csv``. ``--save`` writes the fastest forward and backward tiles into ``sparsex_hf/ops/attention/tiles.json``
under this GPU's name (``tuning.py`` reads it at launch; nothing is tuned at run time).

    python benchmarks/sweep_prefill.py --tokens 131072 --variants 64,64,4,2 64,128,4,2 --bwd --save
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import triton
from _common import append_csv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention import tuning

HEADLINE = dict(window=4096, stride=256, topk=8, block_size=64, sink_tokens=64)
FIELDS = ("block_m", "window_n", "num_warps", "num_stages", "tma")


def parse_variant(text: str) -> dict:
    """``"64,128,4,2"`` or ``"64,128,4,2,1"`` (TMA on) -> a tile dict (checked)."""
    values = [int(x) for x in text.split(",")]
    if len(values) not in (4, 5):
        raise SystemExit(f"variant {text!r}: give {','.join(FIELDS).upper()} (4 integers, then 1 for TMA)")
    return tuning.check_tile(dict(zip(FIELDS, values[:4] + [bool(values[4:] and values[4])])), f"variant {text!r}")


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")


def time_variant(tile: dict, fwd, first: torch.Tensor, meta: dict) -> dict:
    """One row: the forward's time with ``tile`` and its output's distance from ``first``."""
    row = dict(meta, **tile, fwd_ms="", fwd_bwd_ms="", rel_err="", error="")
    try:
        with tuning.override(fwd=tile):
            out = fwd()
            row["rel_err"] = f"{((out.float() - first.float()).norm() / first.float().norm()).item():.1e}"
            row["fwd_ms"] = round(time_ms(fwd), 3)
    except Exception as e:  # a shape the GPU cannot run (shared memory, registers): recorded, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    print(row, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8])
    ap.add_argument("--variants", nargs="+", default=["64,64,4,2", "64,128,4,2", "64,128,4,3", "128,128,8,2", "128,64,8,3"],
                    help="BLOCK_M,WINDOW_N,WARPS,STAGES[,TMA]")
    ap.add_argument("--bwd", action="store_true", help="also time forward+backward (the backward with each variant)")
    ap.add_argument("--bwd-variants", nargs="+", help="variants for the backward only (default: --variants)")
    ap.add_argument("--save", action="store_true", help="write the fastest tiles into the table for this GPU")
    ap.add_argument("--tag", default="sweep")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    t, (hq, hkv), d = args.tokens, args.heads, 128
    cfg = SparseXConfig(**HEADLINE)
    q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    fwd = lambda: sparsex_attention(q, k, v, cfg, backend="triton")
    rows, gpu = [], torch.cuda.get_device_name()
    with tuning.override(fwd=parse_variant(args.variants[0])):
        first = fwd()  # every variant's output is compared with the first's (the same function, other tiles)
    try:  # an interrupt (run_gpu.sh's TIME_LIMIT) keeps the rows measured so far
        for text in args.variants:
            rows.append(time_variant(parse_variant(text), fwd, first, dict(
                date=datetime.date.today().isoformat(), gpu=gpu, triton=triton.__version__, tag=args.tag, tokens=t,
                hq=hq, hkv=hkv)))
        if args.bwd:
            best_fwd = min((r for r in rows if r["fwd_ms"] != ""), key=lambda r: r["fwd_ms"])
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            do = torch.randn_like(q)
            step = lambda: torch.autograd.grad(sparsex_attention(qg, kg, vg, cfg, backend="triton"), (qg, kg, vg), do)
            for text in args.bwd_variants or args.variants:
                tile = parse_variant(text)
                row = next((r for r in rows if all(r[f] == tile[f] for f in FIELDS)), None)
                if row is None:
                    row = dict(rows[0], **tile, fwd_ms="", fwd_bwd_ms="", rel_err="", error="")
                    rows.append(row)
                try:
                    with tuning.override(fwd={f: best_fwd[f] for f in FIELDS}, bwd=tile):
                        row["fwd_bwd_ms"] = round(time_ms(step), 3)
                except Exception as e:  # a shape the GPU cannot run (shared memory, registers): recorded, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                print(row, flush=True)
    except KeyboardInterrupt:
        print("interrupted: writing the rows measured so far", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    append_csv(os.path.join(args.out_dir, "sweep.csv"), rows)
    if args.save and rows:
        best = {p: min((r for r in rows if r[f"{p}_ms"] != ""), key=lambda r: r[f"{p}_ms"]) for p in ("fwd", "fwd_bwd")
                if any(r[f"{p}_ms"] != "" for r in rows)}
        fwd_tile = {f: best["fwd"][f] for f in FIELDS}
        bwd_tile = {f: best["fwd_bwd"][f] for f in FIELDS} if "fwd_bwd" in best else tuning.tile_shape(q.device, True)
        note = f"benchmarks/results/sweep.csv tag {args.tag}: {t} tokens, {hq}/{hkv} heads, headline config, {rows[0]['date']}"
        tuning.save_entry(gpu, fwd_tile, bwd_tile, note)
        print(f"saved {gpu}: fwd {fwd_tile}, bwd {bwd_tile}", flush=True)


if __name__ == "__main__":
    main()

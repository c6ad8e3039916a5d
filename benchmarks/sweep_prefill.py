"""Time launch shapes of the Sparse-X prefill kernels at one length and keep the fastest per GPU.

Forward variants ``BLOCK_M,WINDOW_N,WARPS,STAGES`` are timed on the forward (selection included), backward
variants on forward+backward (with the fastest forward), selection variants ``ROWS,WARPS`` on the selection
alone; one row per variant in ``sweep.csv``, with the output's distance from the first variant's. ``--save`` writes
the fastest of each into ``sparsex_hf/ops/attention/kernels/tiles.json`` under this GPU's name (``tuning.py`` reads it at
launch; nothing is tuned at run time).

    python benchmarks/sweep_prefill.py --tokens 131072 --fwd 64,64,4,2 128,128,8,2 --bwd 128,64,8,3 --select 32,4 64,4 --save
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import triton
from _common import append_csv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention.custom_ops import select_op
from sparsex_hf.ops.attention.kernels import tuning

HEADLINE = dict(window=4096, stride=256, topk=8, block_size=64, sink_tokens=64)


def parse(text: str, kind: str) -> dict:
    """``"64,128,4,2"`` (fwd, bwd) or ``"32,4"`` (select) -> a checked shape."""
    fields = tuning.FIELDS[kind]
    values = [int(x) for x in text.split(",")]
    if len(values) != len(fields):
        raise SystemExit(f"{kind} variant {text!r}: give {','.join(fields).upper()}")
    return tuning.check_tile(dict(zip(fields, values)), kind, f"{kind} variant {text!r}")


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.dtype == torch.int32:  # selections: the share of slots that differ
        return f"{(a != b).float().mean().item():.1e}"
    return f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}"


def sweep(kind: str, variants: list[str], run, meta: dict, fixed: dict, rows: list[dict]) -> None:
    """Time ``run`` under each variant of ``kind`` (other kernels as in ``fixed``), a row each into ``rows``;
    errors are recorded, not fatal."""
    first = None
    for text in variants:
        shape = parse(text, kind)
        row = dict(meta, kernel=kind, shape=text, ms="", rel_err="", error="")
        rows.append(row)
        try:
            with tuning.override(**fixed, **{kind: shape}):
                out = run()
                first = out if first is None else first
                row["rel_err"] = rel(out, first)
                row["ms"] = round(time_ms(run), 3)
        except Exception as e:  # a shape the GPU cannot run (shared memory, registers)
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        print(row, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8])
    ap.add_argument("--fwd", nargs="*", default=["64,64,4,2", "128,128,8,2"], help="BLOCK_M,WINDOW_N,WARPS,STAGES")
    ap.add_argument("--bwd", nargs="*", default=[], help="BLOCK_M,WINDOW_N,WARPS,STAGES (timed as forward+backward)")
    ap.add_argument("--select", nargs="*", default=[], help="ROWS,WARPS")
    ap.add_argument("--save", action="store_true", help="write the fastest shapes into the table for this GPU")
    ap.add_argument("--tag", default="sweep")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    t, (hq, hkv), d = args.tokens, args.heads, 128
    cfg = SparseXConfig(**HEADLINE, dense_when_faster=False)  # the kernels, whatever the cost model says
    q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    gpu = torch.cuda.get_device_name()
    meta = dict(date=datetime.date.today().isoformat(), gpu=gpu, triton=triton.__version__, tag=args.tag, tokens=t,
                hq=hq, hkv=hkv)
    runs = {
        "fwd": lambda: sparsex_attention(q, k, v, cfg, backend="triton"),
        "bwd": lambda: torch.autograd.grad(sparsex_attention(qg, kg, vg, cfg, backend="triton"), (qg, kg, vg), do)[0],
        "select": lambda: select_op(q, k, None, None, None, cfg.json, 0),
    }
    rows, best = [], {}
    try:  # an interrupt (run_gpu.sh's TIME_LIMIT) keeps the rows measured so far
        for kind in ("select", "fwd", "bwd"):
            sweep(kind, getattr(args, kind), runs[kind], meta, dict(best), rows)
            timed = [r for r in rows if r["kernel"] == kind and r["ms"] != ""]
            if timed:
                best[kind] = parse(min(timed, key=lambda r: r["ms"])["shape"], kind)
    except KeyboardInterrupt:
        print("interrupted: writing the rows measured so far", flush=True)
    append_csv(os.path.join(args.out_dir, "sweep.csv"), rows)
    if args.save and best:
        tiles = {kind: best.get(kind, tuning.tile_shape(q.device, kind)) for kind in ("fwd", "bwd", "select")}
        tuning.save_entry(gpu, tiles, f"benchmarks/results/sweep.csv tag {args.tag}: {t} tokens, {hq}/{hkv} heads, "
                                      f"headline config, {meta['date']}")
        print(f"saved {gpu}: {tiles}", flush=True)


if __name__ == "__main__":
    main()

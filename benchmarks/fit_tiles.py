"""Find, for every head dim x block size x dtype, the prefill launch shape that fits this GPU's shared memory.

The table's plain ``fwd`` / ``bwd`` shapes (``tiles.json``, measured at head dim 128, bf16, blocks of 64) need more
shared memory than a Hopper card has at some other shapes (head dim 128 with fp32, or 128-key blocks). At run time
the kernels then try smaller shapes one compile at a time (``prefill.smaller_tile``: a stage fewer, half the
window chunk, half the rows), which costs a user minutes of compiling at the first call. This script compiles every
candidate of every shape at once, one process per CPU core, on tiny inputs, and keeps the first candidate of each
chain that fits; ``--save`` writes those that differ from the plain shape into the table as qualified keys
(``bwd@d128,fp32,b128``), so the kernels start from a shape that fits. One row per candidate in ``fit.csv``.

    python benchmarks/fit_tiles.py --save
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import itertools
import multiprocessing as mp
import os
import re
import time

import torch
import triton
from _common import append_csv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention import TRITON_BLOCK_SIZES, TRITON_HEAD_DIMS
from sparsex_hf.ops.attention.dense import sparse_kernels_only
from sparsex_hf.ops.attention.kernels import tuning
from sparsex_hf.ops.attention.kernels.prefill import smaller_tile

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SMALLEST_FWD = dict(block_m=16, window_n=16, num_warps=4, num_stages=1)  # the forward under a backward probe


def chain(tile: dict, block_size: int) -> list[dict]:
    """``tile`` and every smaller shape the kernels would try after it, in order."""
    out = [tile]
    while (tile := smaller_tile(tile, block_size)) is not None:
        out.append(tile)
    return out


def probe(d: int, bs: int, dt: str, kind: str, tile: dict) -> dict:
    """Compile and run one launch shape on a tiny input: whether it fits, and the shared memory it asked for where
    it did not (Triton's ``OutOfResources`` message)."""
    cfg = SparseXConfig(block_size=bs, sink_tokens=bs, window=2 * bs, stride=bs, topk=3, dense_when_faster=False)
    t = 6 * bs + 5
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, t, d, device="cuda", generator=g).to(DTYPES[dt]) for h in (2, 1, 1))
    shapes = {kind: tile} if kind == "fwd" else {"fwd": SMALLEST_FWD, "bwd": tile}
    start = time.time()
    try:
        with sparse_kernels_only(), tuning.override(**shapes):
            if kind == "fwd":
                sparsex_attention(q, k, v, cfg, backend="triton")
            else:
                q.requires_grad_()
                sparsex_attention(q, k, v, cfg, backend="triton").sum().backward()
            torch.cuda.synchronize()
        return dict(fits=True, required="", error="", s=round(time.time() - start, 1))
    except ValueError as e:
        if "does not fit" not in str(e):
            raise
        need = re.search(r"Required: (\d+)", str(e))
        return dict(fits=False, required=need.group(1) if need else "", error="", s=round(time.time() - start, 1))


def _job(args):
    try:
        return probe(*args)
    except Exception as e:  # a compile error is a row, not the end of the fit
        return dict(fits=False, required="", error=f"{type(e).__name__}: {str(e)[:160]}", s="")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--save", action="store_true", help="write the fitted shapes into the table for this GPU")
    ap.add_argument("--tag", default="fit")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    dev, gpu = torch.device("cuda"), torch.cuda.get_device_name()
    shapes = list(itertools.product(TRITON_HEAD_DIMS, TRITON_BLOCK_SIZES, DTYPES, ("fwd", "bwd")))
    chains = {s: chain(dict(tuning.tile_shape(dev, s[3])), s[1]) for s in shapes}
    meta = dict(date=datetime.date.today().isoformat(), gpu=gpu, triton=triton.__version__, tag=args.tag)
    rows, fits = [], {}  # fits[(shape, candidate)]: whether it fits

    def run(pool, todo):
        futures = {(s, i): pool.submit(_job, (*s, chains[s][i])) for s, i in todo}
        for (s, i), fut in futures.items():
            res = fits[s, i] = fut.result()
            d, bs, dt, kind = s
            rows.append(dict(meta, kind=kind, head_dim=d, block_size=bs, dtype=dt, candidate=i,
                             tile=",".join(str(x) for x in chains[s][i].values()), **res))
            print(rows[-1], flush=True)

    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        # the plain shape everywhere first; then every other candidate of the chains it did not fit, at once
        run(pool, [(s, 0) for s in shapes])
        run(pool, [(s, i) for s in shapes if not fits[s, 0]["fits"] for i in range(1, len(chains[s]))])
    fitted = {s: next((chains[s][i] for i in range(len(chains[s])) if fits.get((s, i), {}).get("fits")), None)
              for s in shapes if not fits[s, 0]["fits"]}
    unfit = [s for s, tile in fitted.items() if tile is None]
    keys = {f"{kind}@d{d},{dt},b{bs}": tile for (d, bs, dt, kind), tile in fitted.items() if tile is not None}
    append_csv(os.path.join(args.out_dir, "fit.csv"), rows)
    print(f"fitted {len(keys)} shapes: {keys}", flush=True)
    if unfit:
        print(f"NO SHAPE FITS: {unfit}", flush=True)
    if args.save:
        tuning.save_keys(gpu, keys, f"benchmarks/results/fit.csv tag {args.tag}: the first shape of each chain that "
                                    f"fits, triton {triton.__version__}, {meta['date']}")
        print(f"saved {gpu}: {len(keys)} qualified shapes", flush=True)


if __name__ == "__main__":
    main()

"""Peak host memory of one forward of a tiny random Llama on the CPU: Sparse-X reference vs SDPA.

Each (implementation, length) runs in a fresh process; the peak resident set size of that process is
recorded, minus that of the same process after building the model (the baseline). A padding mask is
passed (one pad token) so that SDPA builds its real [B, 1, T, T] mask, as it does for any padded batch.

    python benchmarks/cpu_memory.py --lengths 4096 8192 16384 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import torch
import transformers
from _common import append_csv


def _run(impl: str, length: int, queue) -> None:
    # a fresh (spawned) process: the model is built here, so the measured peak is this forward's alone
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from utils import tiny_model

    import sparsex_hf

    model = tiny_model("llama", impl)
    if impl == "sparsex":
        sparsex_hf.set_sparsex_config(model, window=1024, stride=256, topk=4, block_size=64, sink_tokens=64)
    ids = torch.randint(3, 256, (1, length))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    with torch.no_grad():
        model(ids, attention_mask=mask, logits_to_keep=1)
    secs = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(((peak - base) / 1024, secs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--impls", nargs="+", default=["sparsex", "sdpa"])
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    rows = []
    for length in args.lengths:
        for impl in args.impls:
            q = ctx.Queue()
            p = ctx.Process(target=_run, args=(impl, length, q))
            p.start()
            extra_mib, secs = q.get()
            p.join()
            row = dict(
                date=datetime.date.today().isoformat(), machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, transformers=transformers.__version__,
                impl=impl, tokens=length, peak_extra_mib=round(extra_mib, 1), seconds=round(secs, 2),
            )
            rows.append(row)
            print(row, flush=True)
    append_csv(os.path.join(args.out_dir, "cpu_memory.csv"), rows)


if __name__ == "__main__":
    main()

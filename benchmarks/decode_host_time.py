"""The host time of a Triton decode step besides its kernel launches: the op's checks, the shortlist and attention
hosts, scratch and counter look-ups, with the two kernels replaced by no-ops (runs on the CPU: the Triton
interpreter's launcher is never reached). Prints microseconds per step for the default config and one-stage.

    python benchmarks/decode_host_time.py --tokens 65536
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (no GPU needed)

import torch  # noqa: E402

from sparsex_hf import SparseXConfig  # noqa: E402
from sparsex_hf.ops.attention import sparsex_decode_attention  # noqa: E402
from sparsex_hf.ops.attention.kernels import decode as decode_kernel  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    decode_kernel._shortlist_kernel = decode_kernel._attend_kernel = _NoLaunch()
    t = args.tokens
    k = torch.randn(1, 8, t, 64, dtype=torch.bfloat16)
    summaries = tuple(torch.randn(1, 8, t // 64, 64, dtype=torch.bfloat16) for _ in range(3))
    q = torch.randn(1, 32, 1, 64, dtype=torch.bfloat16)
    off = torch.zeros(1, dtype=torch.int32)
    anchor = torch.randint(0, t // 64, (1, 8, 8))
    for name in ("default", "one-stage"):
        cfg = SparseXConfig.preset(name)

        def step():
            return sparsex_decode_attention(q, k, k, summaries, off, t, cfg, max_doc_len=t, backend="triton",
                                            anchor=anchor if cfg.anchor else None)

        for _ in range(50):
            step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        print(f"{name}: {(time.perf_counter() - t0) / args.steps * 1e6:.1f} us of host work per step besides the launches")


if __name__ == "__main__":
    main()

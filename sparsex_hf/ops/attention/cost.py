"""Which computes one prefill call faster on this GPU: Sparse-X's kernels or dense causal attention by SDPA.

A linear model per card, fitted to measured forwards (``benchmarks/results/prefill.csv``): Sparse-X takes a fixed
time per call (the selection's launches and host work) plus its attended keys' matrix work at an effective rate;
SDPA's fastest backend takes the causal matrix work at its rate. With ``n`` keys, ``Hq`` query heads, head dim
``d`` and batch ``B``:

    sparse_ms = fixed_ms + 4 * B * Hq * n * K(n) * d / sparse_rate      K(n): mean keys per query
    dense_ms  =            4 * B * Hq * n * (n / 2) * d / dense_rate

Dense is chosen where ``dense_ms < sparse_ms`` (``SparseXConfig.dense_when_faster``, inference calls only). Cards off
the table use the H100's row (said once in the log). ``crossover`` gives the length where the choice flips.
"""

from __future__ import annotations

import functools
import logging

from ...config import SparseXConfig

logger = logging.getLogger(__name__)

# rates in TFLOP/s, times in ms; each row fitted to one call's measurements (SDPA in the same call)
CARDS: dict[str, dict] = {
    "NVIDIA H100 80GB HBM3": dict(
        sparse_tflops=336.0, fixed_ms=1.77, dense_tflops=560.0,
        measured="prefill.csv tags new27d / exact28, H100, 2026-12-06: the default's forward at 8K / 32K / 128K "
                 "(3.15 / 8.76 / 32.58 ms, 32/8 heads, d 128: 336 TFLOP/s on the attended keys + 1.77 ms per call) "
                 "and cuDNN's (1.00 / 14.41 / 255.86 ms: 550-610 TFLOP/s)",
    ),
}
REFERENCE_CARD = "NVIDIA H100 80GB HBM3"


@functools.cache
def card(name: str) -> dict:
    """The cost model's row for GPU ``name``; cards off the table get the H100's (said once)."""
    if name not in CARDS:
        logger.warning("sparsex: the dense/sparse cost model has no row for %r: using the H100's "
                       "(sparsex_hf/ops/attention/cost.py; benchmarks/bench_prefill.py measures a card)", name)
        return CARDS[REFERENCE_CARD]
    return CARDS[name]


def mean_keys_per_query(cfg: SparseXConfig, n: int) -> float:
    """Mean over the positions of an ``n``-token document of the keys a query attends (a position ``p`` sees
    ``min(p + 1, sink + window + topk * block + p / stride + 1)``; 3346 at 8K with the defaults, 3338 counted)."""
    base = cfg.sink_tokens + cfg.window + cfg.topk * cfg.block_size + 1
    first = min(n, base)  # positions that see every earlier key
    total = first * (first + 1) / 2 + (n - first) * base
    if cfg.stride:
        total += (n * (n - 1) / 2 - first * (first - 1) / 2) / cfg.stride
    return total / max(n, 1)


def predicted_ms(cfg: SparseXConfig, n: int, heads: int, head_dim: int, batch: int, gpu: str) -> tuple[float, float]:
    """``(sparse_ms, dense_ms)`` predicted for a prefill of ``batch`` rows of ``n`` keys on ``gpu``."""
    row = card(gpu)
    work = 4.0 * batch * heads * n * head_dim
    sparse = row["fixed_ms"] + work * mean_keys_per_query(cfg, n) / (row["sparse_tflops"] * 1e9)
    dense = work * (n / 2) / (row["dense_tflops"] * 1e9)
    return sparse, dense


def dense_is_faster(cfg: SparseXConfig, n: int, heads: int, head_dim: int, batch: int, gpu: str) -> bool:
    sparse, dense = predicted_ms(cfg, n, heads, head_dim, batch, gpu)
    return dense < sparse


def crossover(cfg: SparseXConfig, heads: int, head_dim: int, batch: int = 1, gpu: str = REFERENCE_CARD,
              longest: int = 1 << 24) -> int:
    """The shortest length (a multiple of 256, at most ``longest``) from which Sparse-X is predicted faster."""
    lo, hi = 1, longest // 256
    if dense_is_faster(cfg, longest, heads, head_dim, batch, gpu):
        return longest
    while lo < hi:  # dense's cost grows faster than Sparse-X's: one crossing
        mid = (lo + hi) // 2
        if dense_is_faster(cfg, mid * 256, heads, head_dim, batch, gpu):
            lo = mid + 1
        else:
            hi = mid
    return lo * 256

"""Which computes one call faster on this GPU: Sparse-X's kernels or dense causal attention by SDPA.

Linear models per card, fitted to measured calls (``benchmarks/results/prefill.csv`` and ``e2e.csv``, SDPA's
fastest backend in the same run). With ``n`` keys, ``Hq`` query heads, head dim ``d`` and batch ``B``:

* a prefill (forward; ``train`` rows: forward + backward, 3.5x the matrix work):

      sparse_ms = fixed_ms + 4 * B * Hq * n * K(n) * d / sparse_rate      K(n): mean keys per query
      dense_ms  =            4 * B * Hq * n * (n / 2) * d / dense_rate

* a decode step (one layer; ``Hkv`` key/value heads): both read their keys once, so bytes decide. Dense reads the
  whole cache, Sparse-X its key sets and the block summaries but pays a fixed time for its two launches (larger in
  eager mode, where the host issues them, than when a CUDA graph replays them):

      dense_ms  = dense_fixed_ms  + B * Hkv * n * d * 4 bytes / bandwidth
      sparse_ms = sparse_fixed_ms + B * Hkv * (budget * d * 4 + (n / block) * d * 6) bytes / bandwidth

Dense is chosen where ``dense_ms < sparse_ms`` (``SparseXConfig.dense_when_faster``). Cards off the table use the
H100's rows (said once in the log). ``crossover`` gives the prefill length where the choice flips.
"""

from __future__ import annotations

import functools
import logging

from ....config import SparseXConfig

logger = logging.getLogger(__name__)

# rates in TFLOP/s, bandwidth in GB/s, times in ms; each row fitted to one call's measurements (SDPA in the same call)
CARDS: dict[str, dict] = {
    "NVIDIA H100 80GB HBM3": dict(
        prefill=dict(sparse_tflops=332.0, fixed_ms=0.58, dense_tflops=565.0),
        train=dict(sparse_tflops=281.0, fixed_ms=0.73, dense_tflops=530.0),
        decode=dict(gbps=3100.0, dense_fixed_ms=0.050, sparse_fixed_ms=0.147, dense_graph_fixed_ms=0.010,
                    sparse_graph_fixed_ms=0.052),
        measured="H100, 2026-12-06, default config: prefill.csv tag t28 (forward and forward + backward 8K-512K, "
                 "32/8 heads, d 128: 332 TFLOP/s + 0.58 ms and 281 + 0.73 on the attended keys; cuDNN 560-610 and "
                 "505-566 TFLOP/s from 8K) and e2e.csv tag t28d (one layer's decode step, 32/8 heads, d 64, "
                 "1K-1M: cuDNN 0.010 ms + 3.1 TB/s graphed, 0.05 ms + the same eager; Sparse-X 0.025-0.098 ms "
                 "graphed, 0.146-0.209 eager)",
    ),
    "NVIDIA H200": dict(
        prefill=dict(sparse_tflops=321.0, fixed_ms=0.16, dense_tflops=550.0),
        train=dict(sparse_tflops=283.0, fixed_ms=1.39, dense_tflops=540.0),
        decode=dict(gbps=4500.0, dense_fixed_ms=0.050, sparse_fixed_ms=0.170, dense_graph_fixed_ms=0.010,
                    sparse_graph_fixed_ms=0.055),
        measured="H200, 2026-12-06, default config: prefill.csv tag t28g (forward and forward + backward 8K-512K, "
                 "32/8 heads, d 128, least squares: 321 TFLOP/s + 0.16 ms and 283 + 1.39 on the attended keys, "
                 "within 3% from 16K, 23% / 15% at 8K; cuDNN 509-593 and 507-554 TFLOP/s from 8K) and e2e.csv tag "
                 "t28f (one layer's decode step, 32/8 heads, d 64, 4K-1M: cuDNN 0.010 ms + 4.5 TB/s graphed, "
                 "0.05 ms + the same eager; Sparse-X 0.056-0.097 ms graphed, 0.17-0.28 eager)",
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


def predicted_ms(cfg: SparseXConfig, n: int, heads: int, head_dim: int, batch: int, gpu: str,
                 train: bool = False) -> tuple[float, float]:
    """``(sparse_ms, dense_ms)`` predicted for a prefill of ``batch`` rows of ``n`` keys on ``gpu`` (``train``: the
    forward and the backward)."""
    row = card(gpu)["train" if train else "prefill"]
    work = 4.0 * batch * heads * n * head_dim * (3.5 if train else 1.0)
    sparse = row["fixed_ms"] + work * mean_keys_per_query(cfg, n) / (row["sparse_tflops"] * 1e9)
    dense = work * (n / 2) / (row["dense_tflops"] * 1e9)
    return sparse, dense


def dense_is_faster(cfg: SparseXConfig, n: int, heads: int, head_dim: int, batch: int, gpu: str,
                    train: bool = False) -> bool:
    sparse, dense = predicted_ms(cfg, n, heads, head_dim, batch, gpu, train)
    return dense < sparse


def decode_predicted_ms(cfg: SparseXConfig, n: int, kv_heads: int, head_dim: int, batch: int, gpu: str,
                        graphed: bool) -> tuple[float, float]:
    """``(sparse_ms, dense_ms)`` predicted for one layer's decode step over ``n`` cached keys of ``batch`` rows
    (``graphed``: replayed from a CUDA graph, else issued by the host)."""
    row = card(gpu)["decode"]
    per_key = batch * kv_heads * head_dim * 4 / (row["gbps"] * 1e6)  # ms per key read (key + value, 2 bytes each)
    budget = min(n, cfg.sink_tokens + cfg.window + cfg.topk * cfg.block_size + (n // cfg.stride if cfg.stride else 0))
    sparse = (row["sparse_graph_fixed_ms" if graphed else "sparse_fixed_ms"]
              + per_key * (budget + 1.5 * n / cfg.block_size))
    dense = row["dense_graph_fixed_ms" if graphed else "dense_fixed_ms"] + per_key * n
    return sparse, dense


def decode_dense_is_faster(cfg: SparseXConfig, n: int, kv_heads: int, head_dim: int, batch: int, gpu: str,
                           graphed: bool) -> bool:
    sparse, dense = decode_predicted_ms(cfg, n, kv_heads, head_dim, batch, gpu, graphed)
    return dense < sparse


def crossover(cfg: SparseXConfig, heads: int, head_dim: int, batch: int = 1, gpu: str = REFERENCE_CARD,
              longest: int = 1 << 24, train: bool = False) -> int:
    """The shortest prefill length (a multiple of 256, at most ``longest``) from which Sparse-X is predicted
    faster."""
    lo, hi = 1, longest // 256
    if dense_is_faster(cfg, longest, heads, head_dim, batch, gpu, train):
        return longest
    while lo < hi:  # dense's cost grows faster than Sparse-X's: one crossing
        mid = (lo + hi) // 2
        if dense_is_faster(cfg, mid * 256, heads, head_dim, batch, gpu, train):
            lo = mid + 1
        else:
            hi = mid
    return lo * 256

"""The decode step as a ``torch.library`` custom op, so that ``torch.compile`` traces a decode step through it.

``sparsex::decode`` takes only tensors and scalars (queries, the cache's key/value buffers, the block summaries,
per-row offsets, the anchor blocks, lengths, the config as JSON) and returns the attention output; its fake
implementation gives the output's shape for tracing. Eager calls skip the dispatcher (the same functions, a few
microseconds less per layer and step); under ``torch.compile`` :func:`sparsex_hf.sparsex_decode_attention` calls
the op.
"""

from __future__ import annotations

import contextlib

import torch

from ...config import SparseXConfig, config_from_json
from .decode import sparsex_decode_torch

try:
    from .decode_kernel import fresh_scratch, sparsex_decode_triton
except ImportError:  # pragma: no cover - Linux CI always has triton
    fresh_scratch = sparsex_decode_triton = None

__all__ = ["decode_op", "run_decode"]


def run_decode(backend: str, q, k_cache, v_cache, summaries, offsets, seq_len: int | torch.Tensor, max_doc_len: int,
               cfg: SparseXConfig, *, scale: float, sliding_window=None, mix_weights=None, anchor=None) -> torch.Tensor:
    """The decode step on ``backend`` (``"triton"`` or ``"torch"``), inputs validated by the caller."""
    args = (q, k_cache, v_cache, summaries, offsets, seq_len, max_doc_len, cfg)
    kw = dict(scale=scale, sliding_window=sliding_window, mix_weights=mix_weights, anchor=anchor)
    if backend == "triton":
        return sparsex_decode_triton(*args, **kw)
    return sparsex_decode_torch(*args, **kw)


@torch.library.custom_op("sparsex::decode", mutates_args=())
def decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
    kmean: torch.Tensor, offsets: torch.Tensor, anchor: torch.Tensor | None, mix_weights: torch.Tensor | None,
    lengths: torch.Tensor | None, seq_len: int, max_doc_len: int, config: str, scale: float, sliding_window: int,
    backend: str,
) -> torch.Tensor:
    """``[B, Hq, Tq, Dv]``: :func:`run_decode` with the config given as ``SparseXConfig.json`` and ``sliding_window =
    0`` for none, and fresh scratch buffers (``decode_kernel.fresh_scratch``: the op runs inside compiled graphs).
    With ``lengths`` (a one-element device tensor, a static cache) the cache length is read from it, and ``seq_len``
    is only the buffers' capacity: the op's arguments stay the same from step to step, so a CUDA graph replays it."""
    with fresh_scratch() if backend == "triton" else contextlib.nullcontext():
        return run_decode(backend, q, k_cache, v_cache, (kmin, kmax, kmean), offsets,
                          lengths if lengths is not None else seq_len, max_doc_len, config_from_json(config),
                          scale=scale, sliding_window=sliding_window or None, mix_weights=mix_weights, anchor=anchor)


@decode_op.register_fake
def _(q, k_cache, v_cache, kmin, kmax, kmean, offsets, anchor, mix_weights, lengths, seq_len, max_doc_len, config,
      scale, sliding_window, backend):
    return q.new_empty((*q.shape[:3], v_cache.shape[-1]))

"""Sparse-X attention: the public entry point, input validation and backend dispatch.

``naive.py`` is the PyTorch reference (the spec); the Triton kernels plug in beside it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch

from ...config import SparseXConfig
from .documents import Document, cu_seqlens_from_position_ids, split_documents
from .naive import SparseXStats, block_summaries, sparsex_attention_naive

logger = logging.getLogger("sparsex_hf")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_logged: set[str] = set()


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_BLOCK_SIZES = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available(device: torch.device) -> bool:
    """The Triton kernels run on CUDA devices, and on the CPU under ``TRITON_INTERPRET=1`` (tests)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available(device):
            raise NotImplementedError(
                f"backend='triton' runs on CUDA devices (or the CPU with TRITON_INTERPRET=1), not on {device.type}; "
                "use backend='torch' (the reference, any device) or backend='auto'."
            )
        return "triton"
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    raise ValueError(f"backend={backend!r} is invalid: allowed are 'auto', 'torch', 'triton'.")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got {getattr(t, 'shape', t)}.")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; Sparse-X supports {[str(d) for d in SUPPORTED_DTYPES]}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    bsz, hq, tq, d = q.shape
    if k.shape[0] != bsz or k.shape[3] != d:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head_dim.")
    hkv, tk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA).")
    if tq > tk:
        raise ValueError(f"more queries ({tq}) than keys ({tk}): queries are the last Tq of the Tk positions.")


def _check_triton(q: torch.Tensor, cfg: SparseXConfig, return_stats: bool) -> None:
    d = q.shape[-1]
    if d not in TRITON_HEAD_DIMS:
        raise ValueError(f"backend='triton' supports head_dim in {TRITON_HEAD_DIMS}, got {d}; use backend='torch'.")
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports {[str(t) for t in TRITON_DTYPES]}, got {q.dtype}; use backend='torch'.")
    if cfg.block_size not in TRITON_BLOCK_SIZES:
        raise ValueError(
            f"backend='triton' supports block_size in {TRITON_BLOCK_SIZES}, got {cfg.block_size}; use backend='torch'."
        )
    if return_stats:
        raise ValueError("return_stats=True (fidelity metrics) is computed by backend='torch' only.")


def sparsex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SparseXConfig | Mapping[str, Any] | None = None,
    *,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    backend: str | None = None,
    layer_idx: int | None = None,
    sliding_window: int | None = None,
    mix_weights: torch.Tensor | None = None,
    return_stats: bool = False,
):
    """Sparse-X attention (SPEC.md): sink + local window + stride + top-k blocks.

    Args:
        q: ``[B, Hq, Tq, D]`` queries, the last ``Tq`` positions of the keys (bottom-right causal).
        k, v: ``[B, Hkv, Tk, D]`` keys and values, ``Hq = G * Hkv`` for any ``G >= 1``.
        config: a :class:`SparseXConfig`, a dict of its fields, or ``None`` for the defaults.
        scale: softmax scale, default ``D ** -0.5``.
        attention_mask: optional ``[B, Tk]`` padding mask (True/1 = real token). Positions count from
            each row's first real token; padding query rows return zeros.
        cu_seqlens: optional ``[num_docs + 1]`` packed layout for ``B == 1`` (documents never see each
            other; each starts at position 0). ``cu_seqlens_q`` gives separate query boundaries when
            ``Tq < Tk``.
        backend: ``"torch"`` (reference), ``"triton"`` (kernels) or ``"auto"``; default ``config.backend``.
        layer_idx: the model layer; layers in ``config.dense_layers`` compute dense causal attention.
        sliding_window: a model's sliding window (Mistral); honoured when ``config.respect_sliding_window``.
        mix_weights: ``[3]`` or ``[Hq, 3]`` branch weights for ``combine="mix"`` (default alpha, beta, gamma).
        return_stats: also return :class:`SparseXStats` (selected blocks, attention mass kept, oracle).
    Returns:
        ``[B, Hq, Tq, D]`` in the dtype of ``q`` (and the stats if asked).
    """
    cfg = SparseXConfig.from_any(config)
    _check_inputs(q, k, v)
    if cu_seqlens_q is not None and cu_seqlens is None:
        raise ValueError("cu_seqlens_q needs cu_seqlens (the key boundaries) as well.")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}.")
    if not cfg.respect_sliding_window:
        sliding_window = None
    dense = layer_idx is not None and layer_idx in cfg.dense_layers
    if not dense and cfg.dense_below and k.shape[2] <= cfg.dense_below:
        log_once(f"sparsex: inputs of at most dense_below={cfg.dense_below} keys use dense causal attention.")
        dense = True
    backend = resolve_backend(backend or cfg.backend, q.device)
    if backend == "triton":
        _check_triton(q, cfg, return_stats)
        from .triton_ops import sparsex_attention_triton

        return sparsex_attention_triton(
            q, k, v, cfg, scale=scale, attention_mask=attention_mask, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens, sliding_window=sliding_window, dense=dense, mix_weights=mix_weights,
        )
    return sparsex_attention_naive(
        q, k, v, cfg, scale=scale, attention_mask=attention_mask,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens,
        sliding_window=sliding_window, dense=dense, mix_weights=mix_weights, return_stats=return_stats,
    )


def sparsex_decode_attention(q, layer, config=None, *, scale=None, backend=None, layer_idx=None,
                             sliding_window=None, mix_weights=None):
    """Sparse-X attention of a decode step: queries ``q [B, Hq, Tq, D]`` (``Tq <= MAX_DECODE_QUERIES``) of the
    last ``Tq`` tokens cached in ``layer`` (a :class:`sparsex_hf.SparseXLayer`, keys already appended).
    Same result as :func:`sparsex_attention` over the whole cache with ``select_tile=1``; reads the block
    summaries and the attended keys only. Dense layers read every key (the general path)."""
    from .decode import MAX_DECODE_QUERIES, sparsex_decode

    cfg = SparseXConfig.from_any(config)
    if q.shape[2] > MAX_DECODE_QUERIES:
        raise ValueError(f"a decode step takes at most {MAX_DECODE_QUERIES} queries per sequence, got {q.shape[2]}.")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not cfg.respect_sliding_window:
        sliding_window = None
    backend = resolve_backend(backend or cfg.backend, q.device)
    if backend == "triton":
        _check_triton(q, cfg, False)
        if layer.offload_kv:
            backend = "torch"  # the offloaded cache is read by gathering on the CPU (documented)
    return sparsex_decode(q, layer, cfg, scale=scale, sliding_window=sliding_window, mix_weights=mix_weights,
                          backend=backend)


__all__ = [
    "Document",
    "sparsex_decode_attention",
    "SparseXStats",
    "block_summaries",
    "cu_seqlens_from_position_ids",
    "sparsex_attention",
    "sparsex_attention_naive",
    "split_documents",
]

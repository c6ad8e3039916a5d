"""The public entry points on tensors: input validation, the dense handoffs (``dense.py``), backend dispatch to
the reference (``reference/``) or the Triton kernels through the custom ops (``custom_ops.py``).

Tensors in, tensors out: nothing here knows Transformers or a cache object.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from ...config import SparseXConfig
from .custom_ops import HAS_TRITON, decode_op, run_decode, select_op, sparsex_attention_triton
from .dense import (
    _dense_handoff,
    _dense_is_faster,
    _faster_message,
    decode_goes_dense,
    decode_is_covered,
    dense_decode,
    log_once,
)
from .flash4 import Documents, flash4_attention, flash4_missing, flash4_refusal
from .gathered import sparsex_attention_gathered
from .kernels.tuning import device_name
from .reference.decode import MAX_DECODE_QUERIES, prompt_anchor
from .reference.naive import SparseXStats, sparsex_attention_naive
from .rules.common import anchor_scores
from .rules.layout import kernel_documents

if HAS_TRITON:
    from .kernels.select import anchor_scores_triton
else:  # pragma: no cover - Linux CI always has triton
    anchor_scores_triton = None


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


TRITON_HEAD_DIMS = (16, 32, 64, 128)


MAX_HEADS = 1024  # more heads than any model has: a [B, T, H, D] tensor passed by mistake


TRITON_BLOCK_SIZES = (16, 32, 64, 128)


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available(device: torch.device) -> bool:
    """The Triton kernels run on CUDA devices, and on the CPU under ``TRITON_INTERPRET=1`` (tests)."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available(device):
            raise NotImplementedError(
                f"backend='triton' runs on CUDA devices with triton installed (or the CPU with TRITON_INTERPRET=1), "
                f"not on {device.type}{'' if HAS_TRITON else ' (triton is not installed)'}; "
                "use backend='torch' (the reference, any device) or backend='auto'."
            )
        return "triton"
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "flash4":
        why = flash4_missing(device)
        if why:
            raise NotImplementedError(flash4_refusal(why))
        return "flash4"
    raise ValueError(f"backend={backend!r} is invalid: allowed are 'auto', 'torch', 'triton' and 'flash4'.")


def kernel_backend(backend: str, device: torch.device) -> str:
    """The backend of the stages that ``"flash4"`` leaves to the Triton kernels (selection, decode, anchor)."""
    resolved = resolve_backend(backend, device)
    return "triton" if resolved == "flash4" else resolved


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
    if d < 1:
        raise ValueError(f"head_dim (the last dim of q, k, v) must be >= 1, got {d}.")
    if hq > MAX_HEADS:
        raise ValueError(f"q has {hq} heads (dim 1): did you pass [batch, seq, heads, head_dim]? Sparse-X takes "
                         "[batch, heads, seq, head_dim] (use .transpose(1, 2)).")
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


def _check_backend(backend: str, q, cfg: SparseXConfig, sliding_window, selected, return_stats) -> None:
    if backend == "triton":
        _check_triton(q, cfg, return_stats)
    elif backend == "flash4":
        _check_flash4(q, cfg, sliding_window, selected, return_stats)


def _run_flash4(q, k, v, cfg: SparseXConfig, scale: float, attention_mask, cu_q, cu_k) -> torch.Tensor:
    """The FlashAttention-4 stage over today's selection (``ops/attention/flash4.py``)."""
    sel = (select_op(q.detach(), k.detach(), attention_mask, cu_q, cu_k, cfg.json, 0) if cfg.topk else
           q.new_full((q.shape[0], k.shape[1], q.shape[2], 0), -1, dtype=torch.int32))
    docs = None
    if attention_mask is not None or cu_k is not None:
        found = kernel_documents(q.shape[0], q.shape[2], k.shape[2], attention_mask, cu_q, cu_k)
        docs = Documents(found, q.shape[0], q.shape[2], k.shape[2], cfg, q.device)
    return flash4_attention(q, k, v, cfg, sel, scale=scale, docs=docs)


FLASH4_HEAD_DIMS = (128,)


def _check_flash4(q, cfg: SparseXConfig, sliding_window, selected, return_stats) -> None:
    others = "use backend='triton' (or 'auto'), which takes them"
    if cfg.combine != "union":
        raise ValueError(f"backend='flash4' computes combine='union' (one softmax), not {cfg.combine!r}; {others}.")
    if sliding_window is not None or selected is not None or return_stats:
        raise ValueError(f"backend='flash4' takes no sliding_window, selected_blocks or return_stats; {others}.")
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in FLASH4_HEAD_DIMS or (
            cfg.topk and cfg.block_size not in TRITON_BLOCK_SIZES):
        raise ValueError(f"backend='flash4' takes float16 or bfloat16, head_dim in {FLASH4_HEAD_DIMS} (the head dims its "
                         f"GPU tests verify against the reference) and block_size in {TRITON_BLOCK_SIZES} (its selection "
                         f"runs on the Triton kernels), got {q.dtype}, {q.shape[-1]} and {cfg.block_size}; {others}.")


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
    selected_blocks: torch.Tensor | None = None,
):
    """Sparse-X attention (``docs/spec.md``): sink + local window + stride + top-k blocks.

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
            ``"flash4"``: the FlashAttention-4 stage (``ops/attention/flash4.py``, the ``flash4`` extra, Hopper or
            Blackwell; ``combine="union"``, float16/bfloat16, no model sliding window).
        layer_idx: the model layer; layers in ``config.dense_layers`` compute dense causal attention.
        sliding_window: a model's sliding window (Mistral); honoured when ``config.respect_sliding_window``.
        mix_weights: ``[3]`` or ``[Hq, 3]`` branch weights for ``combine="mix"`` (default alpha, beta, gamma).
        return_stats: also return :class:`SparseXStats` (selected blocks, attention mass kept, oracle).
        selected_blocks: ``[B, Hkv, Tq, topk]`` integer block indices to attend instead of the selection stage's
            (from :func:`sparsex_select`, edited or not; -1 = none): block ``b`` is the keys ``b * block_size ...
            b * block_size + block_size - 1`` of the query's document; each row may name its own. A block's causal
            keys join the query's key set (one it cannot see, or beyond the keys, adds nothing). Such a call is
            never handed to dense attention by the cost model.
    Returns:
        ``[B, Hq, Tq, D]`` in the dtype of ``q`` (and the stats if asked).
    """
    cfg = SparseXConfig.from_any(config)
    _check_inputs(q, k, v)
    if cu_seqlens_q is not None and cu_seqlens is None:
        raise ValueError("cu_seqlens_q needs cu_seqlens (the key boundaries) as well.")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}.")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}.")
    _check_mix_weights(mix_weights, cfg, q.shape[1])
    _check_selected(selected_blocks, q, k, cfg)
    if q.numel() == 0:  # no batch rows, no queries or zero-width heads: nothing to attend
        out = q.new_zeros(q.shape)
        return (out, _empty_stats(q, k, cfg)) if return_stats else out
    if not cfg.respect_sliding_window:
        sliding_window = None
    dense = layer_idx is not None and layer_idx in cfg.dense_layers
    if not dense and cfg.dense_below and k.shape[2] <= cfg.dense_below:
        log_once(f"sparsex: inputs of at most dense_below={cfg.dense_below} keys use dense causal attention.")
        dense = True
    backend = resolve_backend(backend or cfg.backend, q.device)
    _check_backend(backend, q, cfg, sliding_window, selected_blocks, return_stats)
    if not return_stats:
        out = _handed_to_sdpa(q, k, v, cfg, scale, attention_mask, cu_seqlens_q, cu_seqlens, sliding_window, dense,
                              backend == "triton" and selected_blocks is None)
        if out is not None:
            return out
    if backend == "flash4":
        return _run_flash4(q, k, v, cfg, float(scale), attention_mask, cu_seqlens_q, cu_seqlens)
    if backend == "triton":
        return sparsex_attention_triton(
            q, k, v, cfg, scale=scale, attention_mask=attention_mask, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens, sliding_window=sliding_window, dense=dense, mix_weights=mix_weights,
            selected=selected_blocks,
        )
    # the torch backend: the gathered stage; the reference for stats, mix, dense layers and given selections
    layout = dict(scale=scale, attention_mask=attention_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens,
                  sliding_window=sliding_window)
    if not (return_stats or dense) and cfg.combine == "union" and selected_blocks is None:
        return sparsex_attention_gathered(q, k, v, cfg, **layout)
    return sparsex_attention_naive(q, k, v, cfg, **layout, dense=dense, mix_weights=mix_weights,
                                   return_stats=return_stats, selected=selected_blocks)


def _handed_to_sdpa(q, k, v, cfg, scale, attention_mask, cu_q, cu_k, sliding_window, dense, by_cost: bool):
    """SDPA's answer where it is Sparse-X's (every key set covers all causal keys: a dense layer, short documents;
    either backend) or, on the Triton backend (``by_cost``), where the cost model predicts dense faster; else
    None."""
    faster = by_cost and not dense and _dense_is_faster(q, k, v, cfg)
    out = _dense_handoff(q, k, v, cfg, float(scale), attention_mask, cu_q, cu_k, sliding_window, dense or faster)
    if out is not None:
        log_once(_faster_message(device_name(q.device), cfg, *q.shape[:2], q.shape[3]) if faster else
                 "sparsex: every query's key set is all of its causal keys here (a dense layer, or documents of at "
                 "most sink_tokens + window tokens): computed by SDPA's causal attention.")
    return out


def _check_selected(selected, q, k, cfg: SparseXConfig) -> None:
    if selected is None:
        return
    want = (q.shape[0], k.shape[1], q.shape[2], cfg.topk)
    if (not isinstance(selected, torch.Tensor) or tuple(selected.shape) != want or selected.dtype.is_floating_point
            or selected.dtype == torch.bool or selected.device != q.device):
        raise ValueError(f"selected_blocks must be an integer tensor [B, Hkv, Tq, topk] = {list(want)} on {q.device}, "
                         f"got {getattr(selected, 'dtype', type(selected))} {tuple(getattr(selected, 'shape', ()))}.")


def sparsex_select(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SparseXConfig | Mapping[str, Any] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    backend: str | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The selection stage alone: the ``topk`` blocks each query attends beyond sink, window and stride,
    ``[B, Hkv, Tq, topk]`` int32 (-1 = none; block indices counted from each query's document start; rows of a
    selection tile share theirs). :func:`sparsex_attention` takes it back as ``selected_blocks`` (the same answer as
    without it), or an edited one. Arguments as for :func:`sparsex_attention`."""
    cfg = SparseXConfig.from_any(config)
    _check_inputs(q, k, k)
    if not cfg.respect_sliding_window:
        sliding_window = None
    shape = (q.shape[0], k.shape[1], q.shape[2], cfg.topk)
    if q.numel() == 0 or cfg.topk == 0:
        return torch.full(shape, -1, dtype=torch.int32, device=q.device)
    if kernel_backend(backend or cfg.backend, q.device) == "triton":
        _check_triton(q, cfg, False)
        return select_op(q.detach(), k.detach(), attention_mask, cu_seqlens_q, cu_seqlens, cfg.json,
                         int(sliding_window or 0))
    _, stats = sparsex_attention_naive(q.detach(), k.detach(), k.detach(), cfg, scale=q.shape[-1] ** -0.5,
                                       attention_mask=attention_mask, cu_seqlens_q=cu_seqlens_q,
                                       cu_seqlens_k=cu_seqlens, sliding_window=sliding_window, return_stats=True)
    return stats.selected_blocks.to(torch.int32)


def _check_mix_weights(mix_weights, cfg: SparseXConfig, hq: int) -> None:
    """``mix_weights`` (``combine="mix"``): ``[3]`` or ``[Hq, 3]``, finite, ``>= 0``, the local weight ``> 0`` (the local
    branch is never empty, so the weighted mean is defined), as the config's ``alpha, beta, gamma``. A CPU tensor is
    checked here; a device tensor by the device itself (``torch._assert_async``: no host sync, the error is raised at
    the next synchronisation)."""
    if cfg.combine != "mix" or mix_weights is None:
        return
    w = torch.as_tensor(mix_weights)
    if w.shape not in ((3,), (hq, 3)) or not w.dtype.is_floating_point:
        raise ValueError(f"mix_weights must be a float tensor of shape [3] or [Hq, 3] = [{hq}, 3], got {w.dtype} "
                         f"{tuple(w.shape)}.")
    ok = (torch.isfinite(w) & (w >= 0)).all() & (w[..., 0] > 0).all()
    message = "mix_weights must be finite and >= 0, with the local (first) weight > 0"
    if w.device.type == "cpu":
        if not bool(ok):
            raise ValueError(f"{message}; got {w.tolist()}.")
    else:
        torch._assert_async(ok, message)


def _empty_stats(q: torch.Tensor, k: torch.Tensor, cfg: SparseXConfig) -> SparseXStats:
    bsz, hq, tq, _ = q.shape
    nan = torch.full((bsz, hq, tq), math.nan, device=q.device)
    return SparseXStats(torch.full((bsz, k.shape[1], tq, cfg.topk), -1, dtype=torch.long, device=q.device), nan,
                        nan.clone(), torch.zeros(bsz, tq, dtype=torch.bool, device=q.device))


def sparsex_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    summaries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    offsets: torch.Tensor,
    seq_len: int | torch.Tensor,
    config: SparseXConfig | Mapping[str, Any] | None = None,
    *,
    max_doc_len: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
    sliding_window: int | None = None,
    mix_weights: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse-X attention of a decode step: the queries of the last ``Tq`` tokens of a KV cache.

    Same result as :func:`sparsex_attention` over the whole cached sequence with ``select_tile=1`` (and
    ``anchor=False``); reads the block summaries and the attended keys only.

    Args:
        q: ``[B, Hq, Tq, D]``, ``Tq <= MAX_DECODE_QUERIES`` (16), the queries of cache positions
            ``seq_len - Tq ... seq_len - 1`` (their keys already in the cache).
        k_cache, v_cache: ``[B, Hkv, L, D]`` with ``L >= seq_len``; only columns below ``seq_len`` are read.
            They may live on another device than ``q`` (an offloaded cache: the attended keys are gathered
            there and copied over; this uses the torch backend).
        summaries: ``(kmin, kmax, kmean)``, each ``[B, Hkv, nb, D]``, the key summaries of the complete blocks
            of every row (block ``i`` = the row's positions ``i*block_size ... +block_size-1``), on ``q``'s device;
            with a host ``seq_len``, ``nb >= max_doc_len // block_size``.
        offsets: ``[B]`` integer tensor on ``q``'s device: the column where each row's sequence starts (its
            left padding). Positions count from there.
        seq_len: the cache length: a host int, or a one-element integer tensor on ``q``'s device (a static cache
            whose decode step replays as a CUDA graph: nothing is read on the host; the kernels read it).
        max_doc_len: ``seq_len - min(offsets)``, or an upper bound of it up to ``seq_len`` (host int; default:
            computed from ``offsets`` with one device sync for an int ``seq_len``, which also checks that every
            offset is in ``[0, seq_len - Tq]``; the cache's capacity ``L`` for a tensor). Given, the offsets' range is
            the caller's contract (nothing is read on the host).
        sliding_window, mix_weights, scale, backend: as for :func:`sparsex_attention`.
        anchor: with ``config.anchor``, the prompt's anchor blocks ``[B, Hkv, A]`` (integer, -1 = none; from
            :func:`sparsex_prompt_anchor`), added to every query's shortlist; None: no anchor blocks.
    Returns:
        ``[B, Hq, Tq, D]`` in the dtype of ``q``.
    """
    cfg = SparseXConfig.from_any(config)
    seq_len, max_doc_len = _check_decode(q, k_cache, v_cache, summaries, offsets, seq_len, cfg, max_doc_len, scale,
                                         sliding_window, mix_weights, anchor)
    bsz, d = q.shape[0], q.shape[3]
    if scale is None:
        scale = d**-0.5
    if not cfg.respect_sliding_window:
        sliding_window = None
    backend = kernel_backend(backend or cfg.backend, q.device)
    if backend == "triton" and k_cache.device == q.device:
        _check_triton(q, cfg, False)
        if not isinstance(seq_len, torch.Tensor) and bsz == 1 and decode_goes_dense(q, k_cache, max_doc_len, cfg,
                                                                                    sliding_window):
            return dense_decode(q, k_cache, v_cache, seq_len, max_doc_len, scale=scale)
    else:  # the reference, or an offloaded cache (gathered where it lives)
        backend = "torch"
        if not isinstance(seq_len, torch.Tensor) and bsz == 1 and decode_is_covered(q, k_cache, max_doc_len, cfg,
                                                                                    sliding_window):
            return dense_decode(q, k_cache, v_cache, seq_len, max_doc_len, scale=scale)
    if torch.compiler.is_compiling():  # traced through the custom op (decode_op.py)
        lengths = seq_len if isinstance(seq_len, torch.Tensor) else None
        return decode_op(q, k_cache, v_cache, *summaries, offsets, anchor, mix_weights, lengths,
                         k_cache.shape[2] if lengths is not None else seq_len, max_doc_len,
                         cfg.json, float(scale), int(sliding_window or 0), backend)
    return run_decode(backend, q, k_cache, v_cache, summaries, offsets, seq_len, max_doc_len, cfg, scale=scale,
                      sliding_window=sliding_window, mix_weights=mix_weights, anchor=anchor)


def _check_decode(q, k_cache, v_cache, summaries, offsets, seq_len, cfg: SparseXConfig, max_doc_len, scale,
                  sliding_window, mix_weights, anchor) -> tuple[int | torch.Tensor, int]:
    """:func:`sparsex_decode_attention`'s inputs checked (a clear error for each mistake); returns ``seq_len`` (a
    device length reshaped to ``[1]``) and ``max_doc_len`` (computed from the offsets with one host read when not
    given, which also checks their range)."""
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [B, Hq, Tq, D] and k_cache/v_cache [B, Hkv, L, D] of one shape; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}.")
    bsz, hq, tq, d = q.shape
    if q.dtype not in SUPPORTED_DTYPES or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"q, k_cache, v_cache must share one of {[str(t) for t in SUPPORTED_DTYPES]}, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}.")
    if d < 1:
        raise ValueError(f"head_dim (the last dim of q) must be >= 1, got {d}.")
    if tq > MAX_DECODE_QUERIES:
        raise ValueError(f"a decode step takes at most {MAX_DECODE_QUERIES} queries per sequence, got {tq}.")
    if k_cache.shape[0] != bsz or k_cache.shape[3] != d or k_cache.shape[1] == 0 or hq % k_cache.shape[1]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} (batch, head_dim, GQA).")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}.")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}.")
    _check_mix_weights(mix_weights, cfg, hq)
    if isinstance(seq_len, torch.Tensor):  # a device length (static cache): its range is the caller's contract
        if seq_len.numel() != 1 or seq_len.dtype.is_floating_point or seq_len.device != q.device:
            raise ValueError(f"a tensor seq_len must be one integer on {q.device}, got {seq_len.dtype} "
                             f"{tuple(seq_len.shape)} on {seq_len.device}.")
        if max_doc_len is None:
            max_doc_len = k_cache.shape[2]
        seq_len = seq_len.reshape(1)
    elif not 1 <= seq_len <= k_cache.shape[2] or tq > seq_len:
        raise ValueError(f"seq_len={seq_len} must be in [Tq={tq}, cache length {k_cache.shape[2]}].")
    if tuple(offsets.shape) != (bsz,) or offsets.dtype.is_floating_point:
        raise ValueError(f"offsets must be an integer tensor [B] = [{bsz}], got {offsets.dtype} {tuple(offsets.shape)}.")
    if (len(summaries) != 3 or any(t.shape != summaries[0].shape or t.device != q.device for t in summaries)
            or summaries[0].dim() != 4 or summaries[0].shape[:2] != k_cache.shape[:2] or summaries[0].shape[3] != d):
        raise ValueError(f"summaries must be (kmin, kmax, kmean), each [B, Hkv, nb, D] = [{bsz}, {k_cache.shape[1]}, "
                         f"nb, {d}] on {q.device}; got {[tuple(t.shape) for t in summaries]}.")
    if anchor is not None and (anchor.dim() != 3 or tuple(anchor.shape[:2]) != tuple(k_cache.shape[:2])
                               or anchor.dtype.is_floating_point):
        raise ValueError(f"anchor must be an integer tensor [B, Hkv, A] = [{bsz}, {k_cache.shape[1]}, A], got "
                         f"{anchor.dtype} {tuple(anchor.shape)}.")
    if max_doc_len is None:  # one host read of the offsets, which are checked with it
        lo, hi = (int(x) for x in torch.stack(offsets.aminmax()).tolist())
        if lo < 0 or hi > seq_len - tq:
            raise ValueError(f"offsets must be in [0, seq_len - Tq] = [0, {seq_len - tq}] (each row holds its Tq "
                             f"queries' keys); got values in [{lo}, {hi}].")
        max_doc_len = seq_len - lo
    elif not tq <= max_doc_len <= (k_cache.shape[2] if isinstance(seq_len, torch.Tensor) else seq_len):
        raise ValueError(f"max_doc_len={max_doc_len} must be in [Tq={tq}, seq_len] (the longest row's length, or a "
                         "bound of it no larger than the cache).")
    if not isinstance(seq_len, torch.Tensor) and summaries[0].shape[2] < max_doc_len // cfg.block_size:
        raise ValueError(f"summaries hold {summaries[0].shape[2]} blocks; rows of up to {max_doc_len} tokens need "
                         f"{max_doc_len // cfg.block_size} (block_size={cfg.block_size}).")
    return seq_len, max_doc_len


def sparsex_prompt_anchor(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    offsets: torch.Tensor,
    seq_len: int,
    config: SparseXConfig | Mapping[str, Any] | None = None,
    *,
    sliding_window: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The anchor blocks of a prefill (``config.anchor``), for :func:`sparsex_decode_attention`'s ``anchor``.

    Args:
        q: ``[B, Hq, Tq, D]``, the prefill's queries (cache positions ``seq_len - Tq ... seq_len - 1``).
        k_cache: ``[B, Hkv, L, D]``, ``L >= seq_len``; offsets (read on the host: a CPU tensor avoids a device
            sync), seq_len: as for the decode.
        backend: as for :func:`sparsex_attention` (the Triton kernel scores the blocks; the reference otherwise).
    Returns:
        ``[B, Hkv, topk]`` long: per row, the blocks its last selection tile selects (-1 = none).
    """
    cfg = SparseXConfig.from_any(config)
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape[0] != q.shape[0] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q [B, Hq, Tq, D] and k_cache [B, Hkv, L, D] do not match: {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}.")
    if not q.shape[2] <= seq_len <= k_cache.shape[2]:
        raise ValueError(f"seq_len={seq_len} must be in [Tq={q.shape[2]}, cache length {k_cache.shape[2]}].")
    if not cfg.respect_sliding_window:
        sliding_window = None
    scores = anchor_scores
    if kernel_backend(backend or cfg.backend, q.device) == "triton":
        _check_triton(q, cfg, False)
        scores = anchor_scores_triton
    return prompt_anchor(q, k_cache.to(q.device), offsets, seq_len, cfg, sliding_window, scores)

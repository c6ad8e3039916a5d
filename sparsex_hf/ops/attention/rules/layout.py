"""Kernel layout: documents and query tiles as small integer tables for the Triton kernels.

A document is a run of contiguous key columns of one batch row whose queries are its last ``m``
positions. Query tiles cover ``BM`` positions aligned to the document start (the first tile may be
partial), so a selection tile (``select_tile`` positions, aligned the same way) never straddles two
kernel tiles when ``select_tile >= BM``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .documents import check_layout_args, packed_documents


@dataclass
class KernelLayout:
    """``docs``: host list of ``(b, q_row0, k_col0, m, n)``; ``tiles``: ``[n_tiles, 5]`` int32 on the
    device, rows ``(b, q_row0, k_col0, p0, m)`` (queries ``q_row0 + r`` at positions ``p0 + r``)."""

    docs: list[tuple[int, int, int, int, int]]
    tiles: torch.Tensor
    padded: bool  # some query rows belong to no document (their output is zero)
    block_m: int


def kernel_documents(bsz, tq, tk, attention_mask=None, cu_seqlens_q=None, cu_seqlens_k=None):
    check_layout_args(bsz, tk, attention_mask, cu_seqlens_k)
    offset = tk - tq
    if cu_seqlens_k is not None:
        return packed_documents(bsz, tq, tk, cu_seqlens_q, cu_seqlens_k)
    if attention_mask is None:
        return [(b, 0, 0, tq, tk) for b in range(bsz)]
    real = attention_mask != 0
    n = real.sum(-1)
    first = real.int().argmax(-1)
    idx = torch.arange(tk, device=real.device)
    inside = (idx >= first[:, None]) & (idx < (first + n)[:, None])
    contiguous = (real == inside).all(-1)
    rows = torch.stack([first, n, contiguous.long()], -1).tolist()
    docs = []
    for b, (f, length, ok) in enumerate(rows):
        if not ok:
            raise ValueError(
                f"the kernels (backend='triton' or 'flash4') need the real tokens of each row to be contiguous (left "
                f"or right padding); row {b} of attention_mask has holes. Use backend='torch' for such masks."
            )
        q_start = max(f, offset)
        m = max(0, f + length - q_start)
        if m:
            docs.append((b, q_start - offset, f, m, length))
    return docs


_LAYOUTS: dict = {}  # layouts without a padding mask, by shape and document boundaries (a model's layers share one)
_MAX_LAYOUTS = 16


def kernel_layout(bsz, tq, tk, device, block_m, attention_mask=None, cu_seqlens_q=None, cu_seqlens_k=None) -> KernelLayout:
    key = None
    if attention_mask is None:
        cu = tuple(tuple(c.tolist()) if isinstance(c, torch.Tensor) and c.device.type == "cpu" else c
                   for c in (cu_seqlens_q, cu_seqlens_k))
        if all(c is None or isinstance(c, tuple) for c in cu):
            key = (bsz, tq, tk, str(device), block_m, cu)
            if key in _LAYOUTS:
                return _LAYOUTS[key]
    layout = _build_layout(bsz, tq, tk, device, block_m, attention_mask, cu_seqlens_q, cu_seqlens_k)
    if key is not None:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = layout
    return layout


def _build_layout(bsz, tq, tk, device, block_m, attention_mask, cu_seqlens_q, cu_seqlens_k) -> KernelLayout:
    docs = kernel_documents(bsz, tq, tk, attention_mask, cu_seqlens_q, cu_seqlens_k)
    parts = []
    for b, q_row0, k_col0, m, n in docs:
        first = n - m
        t = torch.arange(first // block_m, (n - 1) // block_m + 1, dtype=torch.int64)
        p0 = torch.clamp(t * block_m, min=first)
        p1 = torch.clamp((t + 1) * block_m, max=n)
        parts.append(torch.stack([
            torch.full_like(t, b), q_row0 + (p0 - first), torch.full_like(t, k_col0), p0, p1 - p0,
        ], -1))
    tiles = torch.cat(parts) if parts else torch.zeros(0, 5, dtype=torch.int64)
    padded = sum(d[3] for d in docs) != bsz * tq
    return KernelLayout(docs, tiles.to(device=device, dtype=torch.int32), padded, block_m)

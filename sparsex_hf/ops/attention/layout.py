"""Kernel layout: documents and query tiles as small integer tables for the Triton kernels.

A document is a run of contiguous key columns of one batch row whose queries are its last ``m``
positions. Query tiles cover ``BM`` positions aligned to the document start (the first tile may be
partial), so a selection tile (``select_tile`` positions, aligned the same way) never straddles two
kernel tiles when ``select_tile >= BM``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .documents import validate_cu_seqlens


@dataclass
class KernelLayout:
    """``docs``: host list of ``(b, q_row0, k_col0, m, n)``; ``tiles``: ``[n_tiles, 5]`` int32 on the
    device, rows ``(b, q_row0, k_col0, p0, m)`` (queries ``q_row0 + r`` at positions ``p0 + r``)."""

    docs: list[tuple[int, int, int, int, int]]
    tiles: torch.Tensor
    padded: bool  # some query rows belong to no document (their output is zero)
    block_m: int


def kernel_documents(bsz, tq, tk, attention_mask=None, cu_seqlens_q=None, cu_seqlens_k=None):
    offset = tk - tq
    if cu_seqlens_k is not None:
        if attention_mask is not None:
            raise ValueError("Pass either attention_mask (padding) or cu_seqlens (packing), not both.")
        if bsz != 1:
            raise ValueError(f"Packed sequences (cu_seqlens) need batch size 1, got {bsz}.")
        cu_k = validate_cu_seqlens(cu_seqlens_k, tk, "cu_seqlens_k").tolist()
        if cu_seqlens_q is None:
            if tq != tk:
                raise ValueError("cu_seqlens alone needs Tq == Tk; pass cu_seqlens_q for chunked packed input.")
            cu_q = cu_k
        else:
            cu_q = validate_cu_seqlens(cu_seqlens_q, tq, "cu_seqlens_q").tolist()
            if len(cu_q) != len(cu_k):
                raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of documents.")
        docs = []
        for d in range(len(cu_k) - 1):
            m, n = cu_q[d + 1] - cu_q[d], cu_k[d + 1] - cu_k[d]
            if m > n:
                raise ValueError(f"Document {d} has more queries ({m}) than keys ({n}).")
            if m:
                docs.append((0, cu_q[d], cu_k[d], m, n))
        return docs
    if attention_mask is None:
        return [(b, 0, 0, tq, tk) for b in range(bsz)]
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (bsz, tk):
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [batch, kv_len] = [{bsz}, {tk}], got shape "
            f"{tuple(attention_mask.shape)}. Sparse-X handles causality itself; 4-D masks are not supported."
        )
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
                f"backend='triton' needs the real tokens of each row to be contiguous (left or right padding); "
                f"row {b} of attention_mask has holes. Use backend='torch' for such masks."
            )
        q_start = max(f, offset)
        m = max(0, f + length - q_start)
        if m:
            docs.append((b, q_start - offset, f, m, length))
    return docs


def kernel_layout(bsz, tq, tk, device, block_m, attention_mask=None, cu_seqlens_q=None, cu_seqlens_k=None) -> KernelLayout:
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

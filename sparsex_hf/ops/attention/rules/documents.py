"""Where each sequence ("document") of a batch lives, and the position of every token in it.

docs/spec.md: positions count from a sequence's first real token. With a 2-D padding mask, pads are not
counted; with packed sequences (``cu_seqlens``) each document starts at position 0. This module turns
those layouts into a list of :class:`Document`, each one a plain causal sequence.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass
class Document:
    """One sequence of the batch.

    Attributes:
        batch: row of the batch it lives in.
        q_rows: ``[m]`` long, indices into the query axis (``Tq``) of its queries.
        q_pos: ``[m]`` long, the position of each of those queries inside the document (ascending).
        k_cols: ``[n]`` long, indices into the key axis (``Tk``) of its keys; the key at document
            position ``p`` is column ``k_cols[p]``.
    """

    batch: int
    q_rows: torch.Tensor
    q_pos: torch.Tensor
    k_cols: torch.Tensor


def validate_cu_seqlens(cu: torch.Tensor, total: int, name: str) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D integer tensor [num_docs + 1] starting at 0.")
    if cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {cu.dtype}.")
    cu = cu.to(device="cpu", dtype=torch.long)
    if cu[0].item() != 0 or cu[-1].item() != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"{name} must start at 0, be non-decreasing and end at the sequence length {total}; got {cu.tolist()}."
        )
    return cu


def packed_documents(batch_size, q_len, k_len, cu_seqlens_q, cu_seqlens_k) -> list[tuple[int, int, int, int, int]]:
    """Documents of a packed row as ``(b, q_row0, k_col0, m, n)``: keys ``k_col0 .. +n``, queries
    ``q_row0 .. +m`` (the document's last ``m`` positions). Documents without queries are left out."""
    if batch_size != 1:
        raise ValueError(f"Packed sequences (cu_seqlens) need batch size 1, got {batch_size}.")
    cu_k = validate_cu_seqlens(cu_seqlens_k, k_len, "cu_seqlens_k").tolist()
    if cu_seqlens_q is None:
        if q_len != k_len:
            raise ValueError("cu_seqlens alone needs Tq == Tk; pass cu_seqlens_q for chunked packed input.")
        cu_q = cu_k
    else:
        cu_q = validate_cu_seqlens(cu_seqlens_q, q_len, "cu_seqlens_q").tolist()
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


def check_layout_args(batch_size, k_len, attention_mask, cu_seqlens_k) -> None:
    """Padding and packing exclude each other; a padding mask is ``[B, Tk]``."""
    if cu_seqlens_k is not None and attention_mask is not None:
        raise ValueError("Pass either attention_mask (padding) or cu_seqlens (packing), not both.")
    if attention_mask is not None and (attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, k_len)):
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [batch, kv_len] = [{batch_size}, {k_len}], "
            f"got shape {tuple(attention_mask.shape)}. Sparse-X handles causality itself; 4-D masks are not supported."
        )
    if attention_mask is not None and attention_mask.is_floating_point() and attention_mask.numel():
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(
                "attention_mask must be a padding mask with 1/True for a real token and 0/False for padding; it holds "
                "other values (an additive mask with 0 = keep and -inf or a large negative number = pad?). Pass "
                "(additive_mask == 0) instead."
            )


def split_documents(
    batch_size: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> list[Document]:
    """List the documents of a batch (bottom-right causal alignment: queries are the last keys).

    Args:
        attention_mask: optional ``[B, Tk]`` (bool or 0/1); ``False``/0 marks a padding key. Query row
            ``r`` is key column ``Tk - Tq + r``. Real tokens need not be contiguous.
        cu_seqlens_q, cu_seqlens_k: optional packed layout (``B == 1``); document ``d`` owns key
            columns ``cu_k[d]:cu_k[d+1]`` and query rows ``cu_q[d]:cu_q[d+1]``, its last queries.
    """
    check_layout_args(batch_size, k_len, attention_mask, cu_seqlens_k)
    offset = k_len - q_len
    arange = lambda a, b: torch.arange(a, b, device=device)  # noqa: E731
    if cu_seqlens_k is not None:
        return [
            Document(b, arange(q0, q0 + m), arange(n - m, n), arange(k0, k0 + n))
            for b, q0, k0, m, n in packed_documents(batch_size, q_len, k_len, cu_seqlens_q, cu_seqlens_k)
        ]
    if attention_mask is None:
        return [Document(b, arange(0, q_len), arange(offset, k_len), arange(0, k_len)) for b in range(batch_size)]

    real = attention_mask.to(device=device) != 0
    rank = real.long().cumsum(-1) - 1  # position of each real key inside its row
    docs = []
    for b in range(batch_size):
        k_cols = real[b].nonzero().flatten()
        q_real = real[b, offset:]
        q_rows = q_real.nonzero().flatten()
        if q_rows.numel() == 0:
            continue
        docs.append(Document(b, q_rows, rank[b, offset:][q_rows], k_cols))
    return docs


# The last position_ids tensor seen and its boundaries: Transformers hands the same tensor to every layer
# (and again to the recomputed forward of gradient checkpointing), and reading it on the host is a
# device sync, so it is read once per forward instead of once per layer. The entry holds a weak
# reference: a new tensor (even at a reused address) or an in-place change (its version) misses.
_last_positions: list = [None, None, None]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document boundaries of a packed row (``[1, T]`` positions restarting for each document).

    Returns ``cu_seqlens`` ``[num_docs + 1]`` or ``None`` when the row is one document
    (positions increase by one everywhere).
    """
    if position_ids.dim() == 2:
        if position_ids.shape[0] != 1:
            return None
    try:
        version = position_ids._version
    except RuntimeError:  # an inference tensor keeps no version counter: an in-place edit would go unseen
        version = None
    ref, cached_version, cached = _last_positions
    if version is not None and ref is not None and ref() is position_ids and cached_version == version:
        return cached
    pos = (position_ids[0] if position_ids.dim() == 2 else position_ids).to("cpu", torch.long)
    starts = ((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist()
    out = torch.tensor([0, *starts, pos.numel()], dtype=torch.long) if starts else None
    _last_positions[:] = [None, None, None]
    if version is not None:
        try:
            _last_positions[:] = [weakref.ref(position_ids), version, out]
        except TypeError:  # not weak-referenceable (e.g. a tensor subclass): no caching
            pass
    return out

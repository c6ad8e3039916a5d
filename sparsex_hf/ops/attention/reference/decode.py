"""Sparse-X decode: a few new queries per sequence against a KV cache given as tensors.

The cache is ``k_cache, v_cache [B, Hkv, L, D]`` (``L >= seq_len``; columns ``>= seq_len`` are never read),
row ``b``'s sequence starting at column ``offsets[b]`` (its left padding), and the per-block key summaries
``(kmin, kmax, kmean)``, each ``[B, Hkv, nb, D]``, block ``i`` of row ``b`` covering that row's positions
``i*block_size ... (i+1)*block_size - 1``. No cache object crosses into this module.

Selection scores the cached block summaries (no key is read), per query (a decode step has no later
queries to share a selection tile with) and shared by the GQA group, as ``naive.select_blocks`` does with
``select_tile=1``. The attention stage reads only the attended keys: sink, window, the stride keys below
the window and the selected blocks below the window, four disjoint sets whose union is the spec's ``S(i)`` (docs/spec.md).

This module is the torch backend (``backend="torch"``, the reference of a decode step): it gathers the attended
keys (any device; the offloaded cache gathers on the CPU and copies only those keys to the GPU).
``backend="triton"`` (``decode_kernel.py``) computes the same in two kernels reading the cache in place.
"""

from __future__ import annotations

import math

import torch

from ....config import SparseXConfig
from ..rules.common import (
    anchor_scores,
    block_scores,
    document_anchor,
    eligible_blocks,
    rerank_blocks,
    resolve_mix_weights,
    select_blocks,
    shortlist_config,
)

# A decode step is at most this many new queries per sequence; longer inputs take the prefill path.
MAX_DECODE_QUERIES = 16


def decode_positions(offsets: torch.Tensor, seq_len: int | torch.Tensor, tq: int) -> torch.Tensor:
    """Document positions ``[B, Tq]`` of the last ``Tq`` cached tokens of each row (``seq_len``: the cache
    length, a host int or a one-element device tensor)."""
    n = seq_len - offsets.long()
    return n[:, None] - tq + torch.arange(tq, device=offsets.device)[None, :]


def decode_select(q: torch.Tensor, pos: torch.Tensor, summaries, cfg: SparseXConfig, sliding_window,
                  k_cache: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                  anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k blocks ``[B, Hkv, Tq, topk]`` (long, -1 where fewer are eligible) of queries ``q [B, Hq, Tq, D]``
    at document positions ``pos [B, Tq]`` from the summaries ``(kmin, kmax, kmean)``, each ``[B, Hkv, nb, D]``;
    with ``cfg.rerank`` the shortlist (with ``anchor [B, Hkv, A]``'s blocks added, see :func:`add_anchor`) is
    ranked again by exact scores read from ``k_cache`` (rows start at ``offsets``)."""
    bsz, hq, tq, d = q.shape
    kmin = summaries[0]
    hkv, nb = kmin.shape[1], kmin.shape[2]
    out = torch.full((bsz, hkv, tq, cfg.topk), -1, dtype=torch.long, device=q.device)
    if nb == 0 or cfg.topk == 0:
        return out
    if cfg.rerank:
        short = decode_select(q, pos, summaries, shortlist_config(cfg), sliding_window)
        short = add_anchor(short, anchor, pos, nb, cfg, sliding_window)
        exact = decode_exact_scores(q, short, k_cache, offsets, cfg.block_size)
        return rerank_blocks(short, exact, cfg.topk)
    eligible = eligible_blocks(pos.flatten(), nb, cfg, sliding_window).view(bsz, 1, tq, nb)
    eligible = eligible.expand(bsz, hkv, tq, nb).flatten(0, 1)
    qf = q.float().reshape(bsz * hkv, hq // hkv, tq, d)
    summ = tuple(s.float().flatten(0, 1) for s in summaries)
    if q.is_cuda:
        # torch.topk instead of the reference's stable sort (1 ms at 1M context): equal unless two blocks tie
        scores = torch.where(eligible, block_scores(qf, summ, cfg.score), float("-inf"))
        val, sel = scores.topk(min(cfg.topk, nb), dim=-1)
        sel = torch.where(val > float("-inf"), sel, -1)
    else:
        sel = select_blocks(qf, None, summ, eligible, cfg.replace(select_tile=1))
    out[..., : sel.shape[-1]] = sel.view(bsz, hkv, tq, -1)
    return out


def add_anchor(short: torch.Tensor, anchor: torch.Tensor | None, pos: torch.Tensor, nb: int, cfg: SparseXConfig,
               sliding_window) -> torch.Tensor:
    """The decode shortlist ``short [B, Hkv, Tq, S]`` with the prompt's anchor blocks ``anchor [B, Hkv, A]``
    (``cfg.anchor``; -1 = none) appended: ``[B, Hkv, Tq, S + A]``, an anchor block listed only where it is
    eligible for the query at ``pos [B, Tq]`` and not already on the shortlist (-1 otherwise)."""
    if anchor is None or not cfg.anchor or anchor.shape[-1] == 0:
        return short
    bsz, hkv, tq, _ = short.shape
    a = anchor.to(short.device, torch.long)[:, :, None, :].expand(bsz, hkv, tq, -1)
    eligible = eligible_blocks(pos.flatten(), nb, cfg, sliding_window).view(bsz, 1, tq, nb).expand(bsz, hkv, tq, nb)
    ok = (a >= 0) & (a < nb)
    ok &= eligible.gather(-1, a.clamp(0, nb - 1)) & ~(a[..., :, None] == short[..., None, :]).any(-1)
    return torch.cat([short, torch.where(ok, a, -1)], -1)


def prompt_anchor(q: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor, seq_len: int, cfg: SparseXConfig,
                  sliding_window=None, scores=anchor_scores) -> torch.Tensor:
    """The anchor blocks a cache keeps after a prefill (``cfg.anchor``): ``[B, Hkv, topk]`` long (-1 = none).

    ``q [B, Hq, Tq, D]`` are the queries of the call (cache positions ``seq_len - Tq ... seq_len - 1``),
    ``keys [B, Hkv, >= seq_len, D]`` the cached keys, rows starting at ``offsets [B]``. Each row's blocks are
    the prefill's choice for its last selection tile (``common.document_anchor``); ``offsets`` are read on the
    host (pass a CPU tensor to avoid a device sync). ``scores``: ``common.anchor_scores`` or the Triton kernel's."""
    bsz, hq, tq, d = q.shape
    hkv = keys.shape[1]
    out = torch.full((bsz, hkv, cfg.topk), -1, dtype=torch.long, device=q.device)
    for b, off in enumerate(offsets.tolist()):
        n = seq_len - int(off)  # the row's length; its queries in this call are positions n - tq ... n - 1
        if n // cfg.block_size == 0 or cfg.topk == 0:
            continue
        rows = min(n, tq)  # (a row shorter than the call starts inside it: its padding queries do not count)
        _, top = document_anchor(q[b, :, tq - rows :].unflatten(0, (hkv, hq // hkv)), n - rows,
                                 keys[b, :, int(off) : seq_len], cfg, sliding_window, scores)
        out[b, :, : top.shape[-1]] = top
    return out


def decode_exact_scores(q, short, k_cache, offsets, block_size: int) -> torch.Tensor:
    """``[B, Hkv, Tq, S]``: the largest logit (max over the GQA group) of each shortlisted block's keys
    (``short [B, Hkv, Tq, S]``, -1 = none -> -inf), read from the cache where it lives."""
    bsz, hq, tq, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    qg = q.float().view(bsz, hkv, hq // hkv, tq, d)
    base = offsets.long().to(short.device)[:, None, None, None] + torch.arange(block_size, device=short.device)
    out = torch.full(short.shape, -math.inf, dtype=torch.float32, device=q.device)
    for s in range(short.shape[-1]):  # one shortlist slot at a time: memory B * Hkv * Tq * block_size * D
        # (an empty slot reads block 0 of its row, clamped into the buffer: a row shorter than a block ends there)
        cols = (short[..., s, None].clamp(min=0) * block_size + base).clamp(max=cap - 1).flatten(2)  # [B, Hkv, Tq*bs]
        keys = torch.gather(k_cache, 2, cols.to(k_cache.device)[..., None].expand(-1, -1, -1, d))
        keys = keys.to(q.device, torch.float32).view(bsz, hkv, tq, block_size, d)
        logits = torch.einsum("bhgtd,bhtkd->bhgtk", qg, keys).amax(-1).amax(2)
        out[..., s] = torch.where(short[..., s] >= 0, logits, out[..., s])
    return out


def key_sets(pos: torch.Tensor, sel: torch.Tensor, cfg: SparseXConfig, sliding_window, n_max: int):
    """The attended keys of each query as padded index lists.

    Returns ``idx [B, Hkv, Tq, NK]`` document positions, ``valid`` (same shape) and ``part`` ``[NK]``
    (0: sink or window, 1: stride, 2: selected) for the ``mix`` combine. Disjoint by construction."""
    bsz, hkv, tq, k = sel.shape
    dev = pos.device
    p = pos[:, :, None]  # [B, Tq, 1]
    w = min(cfg.window, n_max)
    s = min(cfg.sink_tokens, n_max)
    j_sink = torch.arange(s, device=dev).expand(bsz, tq, s)
    ok_sink = j_sink <= p
    j_win = p - w + 1 + torch.arange(w, device=dev)
    ok_win = (j_win >= s) & (j_win >= 0) & (j_win >= p - cfg.window + 1) & (j_win <= p)
    if cfg.stride > 0:
        r = -(-n_max // cfg.stride)
        j_str = (torch.arange(r, device=dev) * cfg.stride).expand(bsz, tq, r)
        ok_str = (j_str >= cfg.sink_tokens) & (j_str <= p - cfg.window) & (j_str <= p)
    else:
        r = 0
        j_str = ok_str = torch.zeros(bsz, tq, 0, dtype=torch.long, device=dev)
    base = torch.cat([j_sink, j_win, j_str], -1)
    ok_base = torch.cat([ok_sink, ok_win, ok_str.bool()], -1)
    bs = cfg.block_size
    j_top = (sel[..., None] * bs + torch.arange(bs, device=dev)).flatten(-2)  # [B, Hkv, Tq, K*bs]
    pp = pos[:, None, :, None]
    ok_top = (sel[..., None] >= 0).expand(-1, -1, -1, -1, bs).flatten(-2)
    ok_top = ok_top & (j_top >= cfg.sink_tokens) & (j_top <= pp - cfg.window) & (j_top <= pp)
    if cfg.stride > 0:
        ok_top &= j_top % cfg.stride != 0
    idx = torch.cat([base[:, None].expand(-1, hkv, -1, -1), j_top], -1)
    valid = torch.cat([ok_base[:, None].expand(-1, hkv, -1, -1), ok_top], -1)
    if sliding_window is not None:
        valid &= (pos[:, None, :, None] - idx) < sliding_window
    part = torch.cat([torch.zeros(s + w, dtype=torch.long), torch.ones(r, dtype=torch.long),
                      torch.full((k * bs,), 2, dtype=torch.long)]).to(dev)
    return idx, valid, part


def decode_attention_torch(q, k_cache, v_cache, offsets, seq_len: int, max_doc_len: int, pos, sel,
                           cfg: SparseXConfig, scale: float, sliding_window, mix_weights=None):
    """Attention stage by gathering the attended keys (on the cache's device, then moved to ``q``'s):
    ``[B, Hq, Tq, D]``."""
    bsz, hq, tq, d = q.shape
    kbuf, vbuf = k_cache, v_cache
    hkv = kbuf.shape[1]
    g = hq // hkv
    idx, valid, part = key_sets(pos, sel, cfg, sliding_window, max_doc_len)
    offs = offsets.long()[:, None, None, None]
    cache_idx = (idx + offs).clamp(min=0).clamp(max=seq_len - 1)  # invalid entries read a valid column (NaN-safe)
    nk = idx.shape[-1]
    flat = cache_idx.reshape(bsz, hkv, tq * nk, 1).to(kbuf.device)
    kg = torch.gather(kbuf, 2, flat.expand(-1, -1, -1, d)).to(q.device, non_blocking=True)
    vg = torch.gather(vbuf, 2, flat.expand(-1, -1, -1, vbuf.shape[-1])).to(q.device, non_blocking=True)
    kg = kg.view(bsz, hkv, tq, nk, d).float()
    # entries outside the key sets read some valid column: zero their values, so that whatever a padding column holds
    # (NaN included) cannot reach the output through a zero probability
    vg = torch.where(valid[..., None], vg.view(bsz, hkv, tq, nk, -1).float(), 0.0)
    qg = q.float().view(bsz, hkv, g, tq, d)
    logits = torch.einsum("bhgtd,bhtnd->bhgtn", qg, kg) * scale
    valid = valid[:, :, None]  # [B, Hkv, 1, Tq, NK]

    def softmax_av(mask):
        nonempty = mask.any(-1, keepdim=True)
        p = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
        p = torch.where(nonempty, p, torch.zeros_like(p))
        return torch.einsum("bhgtn,bhtnd->bhgtd", p, vg), nonempty

    if cfg.combine == "union":
        out, _ = softmax_av(valid)
    else:
        weights = resolve_mix_weights(cfg, mix_weights, hq, q.device, torch.float32).view(hkv, g, 3)
        out = norm = 0
        for i in range(3):
            o_b, nonempty = softmax_av(valid & (part == i))
            wb = weights[None, :, :, None, None, i] * nonempty
            out = out + wb * o_b
            norm = norm + wb
        out = out / norm
    return out.reshape(bsz, hq, tq, -1).to(q.dtype)


def sparsex_decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, summaries,
                         offsets: torch.Tensor, seq_len: int, max_doc_len: int, cfg: SparseXConfig, *, scale: float,
                         sliding_window=None, mix_weights=None, anchor=None) -> torch.Tensor:
    """Sparse-X attention of the last ``Tq`` cached tokens' queries ``q [B, Hq, Tq, D]`` (inputs validated by
    :func:`sparsex_hf.ops.attention.sparsex_decode_attention`): selection from the summaries, then the
    attention stage by gathering (any device; an offloaded cache gathers on its own device)."""
    pos = decode_positions(offsets, seq_len, q.shape[2])
    sel = decode_select(q, pos, summaries, cfg, sliding_window, k_cache, offsets, anchor)
    return decode_attention_torch(q, k_cache, v_cache, offsets, seq_len, max_doc_len, pos, sel, cfg, scale,
                                  sliding_window, mix_weights)

"""Selection stage on the GPU: block summaries, block scores (Triton), top-k per selection tile.

Scores follow ``naive.shared_scores``: the min/max bound ``q+ . kmax + q- . kmin`` (two matrix
products) or ``q . kmean``, max over the GQA group's heads and, with ``select_tile > 1`` and
``select_query="each"``, over the tile's queries, all fused in one kernel; ``select_query="mean"``
scores the tile's mean query. Scores of a chunk of tiles are written once ``[Hkv, tiles, nb]`` (fp32),
masked by eligibility and reduced by ``torch.topk``; chunks bound the memory.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...config import SparseXConfig
from .layout import KernelLayout



@triton.jit
def _block_score_kernel(
    Q, KA, KB, S,
    s_qh, s_qr, s_kh, s_kb, s_sh, s_sr,
    R, NB,
    G: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BNB: tl.constexpr, RED: tl.constexpr,
    MINMAX: tl.constexpr, IEEE: tl.constexpr,
):
    i_r, i_b, i_kh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    o_r = i_r * BQ + tl.arange(0, BQ)
    o_b = i_b * BNB + tl.arange(0, BNB)
    o_d = tl.arange(0, D)
    m_r, m_b = o_r < R, o_b < NB
    p_k = i_kh * s_kh + o_b[:, None] * s_kb + o_d[None, :]
    b_ka = tl.load(KA + p_k, mask=m_b[:, None], other=0.0)
    if MINMAX:
        b_kb = tl.load(KB + p_k, mask=m_b[:, None], other=0.0)
    best = tl.full([BQ, BNB], float("-inf"), tl.float32)
    for g in tl.static_range(G):
        b_q = tl.load(Q + (i_kh * G + g) * s_qh + o_r[:, None] * s_qr + o_d[None, :], mask=m_r[:, None], other=0.0)
        if MINMAX:
            zero = tl.zeros_like(b_q)
            q_pos = tl.maximum(b_q, zero).to(b_ka.dtype)  # (maximum promotes bf16 to fp32 on the GPU)
            q_neg = tl.minimum(b_q, zero).to(b_ka.dtype)
            if IEEE:
                s = tl.dot(q_pos, tl.trans(b_ka), input_precision="ieee")
                s += tl.dot(q_neg, tl.trans(b_kb), input_precision="ieee")
            else:
                s = tl.dot(q_pos, tl.trans(b_ka))
                s += tl.dot(q_neg, tl.trans(b_kb))
        else:
            if IEEE:
                s = tl.dot(b_q, tl.trans(b_ka), input_precision="ieee")
            else:
                s = tl.dot(b_q, tl.trans(b_ka))
        best = tl.maximum(best, s)
    if RED > 1:
        best = tl.max(tl.reshape(best, [BQ // RED, RED, BNB]), axis=1)
    o_out = i_r * (BQ // RED) + tl.arange(0, BQ // RED)
    m_out = o_out < R // RED
    tl.store(S + i_kh * s_sh + o_out[:, None] * s_sr + o_b[None, :], best, mask=m_out[:, None] & m_b[None, :])


def block_scores_triton(qr: torch.Tensor, ka: torch.Tensor, kb: torch.Tensor | None, group: int, reduce: int) -> torch.Tensor:
    """``qr [Hq, R, D]`` (``R`` a multiple of ``reduce``), ``ka/kb [Hkv, nb, D]`` (kmax/kmin, or kmean and
    None) -> scores ``[Hkv, R // reduce, nb]`` fp32: max over the ``group`` heads of a KV head and over
    each run of ``reduce`` consecutive rows."""
    hq, r, d = qr.shape
    hkv, nb, _ = ka.shape
    out = torch.empty(hkv, r // reduce, nb, device=qr.device, dtype=torch.float32)
    if r == 0 or nb == 0:
        return out
    bq = max(32, reduce)
    bnb = 64
    kb_ = ka if kb is None else kb
    grid = (triton.cdiv(r, bq), triton.cdiv(nb, bnb), hkv)
    _block_score_kernel[grid](
        qr, ka, kb_, out,
        qr.stride(0), qr.stride(1), ka.stride(0), ka.stride(1), out.stride(0), out.stride(1),
        r, nb,
        G=group, D=d, BQ=bq, BNB=bnb, RED=reduce, MINMAX=kb is not None, IEEE=qr.dtype == torch.float32,
        num_warps=4 if bq <= 64 else 8,
    )
    return out


def _eligible(p_first, p_last, nb, cfg, sliding_window, device):
    """``[tiles, nb]``: blocks eligible for the first and the last query of each tile (naive.eligible_blocks)."""
    b = torch.arange(nb, device=device)
    start, end = b * cfg.block_size, b * cfg.block_size + cfg.block_size - 1
    ok = torch.ones(p_first.numel(), nb, dtype=torch.bool, device=device)
    for p in (p_first[:, None], p_last[:, None]):
        ok &= (end <= p) & (start <= p - cfg.window) & (end >= cfg.sink_tokens) & (cfg.sink_tokens <= p - cfg.window)
        if sliding_window is not None:
            ok &= end > p - sliding_window
    return ok


def _top(scores, k):
    k = min(k, scores.shape[-1])
    val, idx = torch.topk(scores, k, dim=-1)
    return torch.where(val > -math.inf, idx, torch.full_like(idx, -1))


def _tile_means(qd: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tile: int) -> torch.Tensor:
    """Mean query of each selection tile: ``qd [Hq, m, D]``, consecutive tiles ``[lo, hi)`` of which only
    the first and the last may be partial -> ``[Hq, tiles, D]`` in fp32."""
    a, b = int(lo[0]), int(hi[-1])
    if lo.numel() == 1:
        return qd[:, a:b].float().mean(1, keepdim=True)
    head_end, tail_start = int(hi[0]), int(lo[-1])  # tiles in between are full and aligned
    parts = [qd[:, a:head_end].float().mean(1, keepdim=True)]
    if tail_start > head_end:
        parts.append(qd[:, head_end:tail_start].unflatten(1, (-1, tile)).mean(2, dtype=torch.float32))
    parts.append(qd[:, tail_start:b].float().mean(1, keepdim=True))
    return torch.cat(parts, 1)


def select_blocks_triton(q, k, layout: KernelLayout, cfg: SparseXConfig, sliding_window=None) -> torch.Tensor:
    """Top-k blocks of every query row: ``[B, Hkv, Tq, topk]`` int32, -1 where none (rows of no document too).

    Work is chunked by selection tiles so that scores and query copies of one chunk stay within
    ``max(64 MiB, q bytes / 16)``."""
    bsz, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    bs, tile = cfg.block_size, cfg.select_tile
    sel = torch.full((bsz, hkv, tq, cfg.topk), -1, dtype=torch.int32, device=q.device)
    if cfg.topk == 0:
        return sel
    budget = max(64 << 20, q.numel() * q.element_size() // 16)
    neg = torch.tensor(-math.inf, device=q.device)
    for b, q_row0, k_col0, m, n in layout.docs:
        nb = n // bs
        if nb == 0:
            continue
        kd = k[b, :, k_col0 : k_col0 + nb * bs].unflatten(1, (nb, bs))
        kmax, kmin = kd.amax(2).contiguous(), kd.amin(2).contiguous()
        kmean = kd.mean(2, dtype=torch.float32).to(k.dtype).contiguous() if cfg.score in ("mean", "hybrid") else None
        qd = q[b, :, q_row0 : q_row0 + m]  # [Hq, m, D], positions n-m .. n-1
        first = n - m
        # selection tiles of this document (aligned to its start): rows [lo, hi) of qd
        t_ids = torch.arange(first // tile, (n - 1) // tile + 1)
        lo = torch.clamp(t_ids * tile, min=first) - first
        hi = torch.clamp((t_ids + 1) * tile, max=n) - first
        rows_per_tile = tile if (tile > 1 and cfg.select_query == "each") else 1
        per_chunk = max(1, budget // max(4 * hkv * nb, 4 * hq * d * rows_per_tile))
        for c0 in range(0, t_ids.numel(), per_chunk):
            c_lo, c_hi = lo[c0 : c0 + per_chunk], hi[c0 : c0 + per_chunk]
            nt = c_lo.numel()
            if tile == 1:
                rows, reduce = qd[:, int(c_lo[0]) : int(c_lo[0]) + nt], 1
            elif cfg.select_query == "mean":
                rows, reduce = _tile_means(qd, c_lo, c_hi, tile).to(q.dtype), 1
            else:  # every query of a tile, padded to `tile` rows by repeating the tile's first query
                slot = torch.arange(tile)
                idx = torch.where(slot[None] < (c_hi - c_lo)[:, None], c_lo[:, None] + slot[None], c_lo[:, None])
                rows, reduce = qd[:, idx.flatten().to(q.device)], tile
            rows = rows.contiguous()
            ok = _eligible((c_lo + first).to(q.device), (c_hi - 1 + first).to(q.device), nb, cfg, sliding_window, q.device)
            if cfg.score == "hybrid":
                s_mm = torch.where(ok, block_scores_triton(rows, kmax, kmin, g, reduce), neg)
                top_mm = _top(s_mm, (cfg.topk + 1) // 2)
                s_mean = torch.where(ok, block_scores_triton(rows, kmean, None, g, reduce), neg)
                taken = torch.zeros(*s_mean.shape[:-1], nb + 1, dtype=torch.bool, device=q.device)  # nb: empty slots
                taken.scatter_(-1, torch.where(top_mm >= 0, top_mm, nb).long(), True)
                s_mean = s_mean.masked_fill(taken[..., :nb], -math.inf)
                top = torch.cat([top_mm, _top(s_mean, cfg.topk - (cfg.topk + 1) // 2)], -1)
            else:
                ka, kb = (kmax, kmin) if cfg.score == "minmax" else (kmean, None)
                top = _top(torch.where(ok, block_scores_triton(rows, ka, kb, g, reduce), neg), cfg.topk)
            # each tile's choice, for each of its rows
            r0 = q_row0 + int(c_lo[0])
            if tile == 1:
                row_sel = top
            else:
                row_sel = top.repeat_interleave((c_hi - c_lo).to(q.device), dim=1, output_size=int(c_hi[-1] - c_lo[0]))
            sel[b, :, r0 : r0 + row_sel.shape[1], : row_sel.shape[2]] = row_sel.to(torch.int32)
    return sel

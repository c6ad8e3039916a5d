"""Selection stage on the GPU: block summaries, block scores (Triton), top-k per selection tile.

Scores follow ``naive.shared_scores``: the min/max bound ``q+ . kmax + q- . kmin`` (two matrix
products) or ``q . kmean``, max over the GQA group's heads and, with ``select_tile > 1`` and
``select_query="each"``, over the tile's queries; ``select_query="mean"`` scores the tile's mean query.
One kernel scores the blocks, masks the ineligible ones and keeps a running top-k per row, so no score
tensor reaches memory; chunks of tiles bound the query copies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import empty  # a module-level name: tests poison it (NaN) to catch unwritten elements

from .common import document_anchor, rerank_blocks
from .layout import KernelLayout
from .tuning import rows_per_program, sm_count, tile_shape


class SelectParams(NamedTuple):
    """The config fields the selection reads (a plain tuple: built per call from the custom op's scalars
    without re-validating a :class:`SparseXConfig`)."""

    block_size: int
    sink_tokens: int
    window: int
    topk: int
    score: str
    select_tile: int
    select_query: str
    rerank: int = 0
    anchor: bool | str = False


@triton.jit
def merge_topk(top_v, top_i, best, b0, o_k, K: tl.constexpr, BNB: tl.constexpr):
    """Merge a chunk of block scores ``best [rows, BNB]`` (blocks ``b0 + j``) into each row's running top-K
    ``(top_v, top_i) [rows, KP2]``: K rounds of "take the chunk's best, replace the current minimum if strictly
    greater". Chunks visited in increasing block order thus keep the lower block index on ties."""
    for _ in tl.static_range(K):
        c_v = tl.max(best, 1)
        c_i = tl.argmax(best, 1)
        cur_min = tl.min(top_v, 1)
        slot = tl.argmin(top_v, 1)
        take = c_v > cur_min
        hit = take[:, None] & (o_k[None, :] == slot[:, None])
        top_v = tl.where(hit, c_v[:, None], top_v)
        top_i = tl.where(hit, (b0 + c_i).to(tl.int32)[:, None], top_i)
        best = tl.where(tl.arange(0, BNB)[None, :] == c_i[:, None], float("-inf"), best)
    return top_v, top_i


# The block-score kernel keeps the query tiles of all the group's heads on chip when they take at most this many
# bytes (shared memory of sm_90, compiled for triton 3.9: 139 KB for 64 KB of query tiles, 270 KB for 128 KB,
# over the 227 KB limit); larger groups loop over their heads at run time instead.
UNROLLED_QUERY_BYTES = 64 << 10


@triton.jit
def dot_split(x, w_t, HILO: tl.constexpr, IEEE: tl.constexpr):
    """``x @ w_t`` accumulated in fp32. ``HILO``: ``x`` is fp32 and ``w_t`` half precision, and ``x`` is taken as
    the sum of two half-precision parts (``hi`` = ``x`` rounded, ``lo`` = the rest, rounded), two products on the
    tensor cores, so that ``x`` keeps about 16 bits of mantissa instead of 8 (bf16) -- the reference scores fp32
    queries exactly. ``IEEE``: both fp32, no tf32 rounding."""
    if HILO:
        hi = x.to(w_t.dtype)
        lo = (x - hi.to(tl.float32)).to(w_t.dtype)
        return tl.dot(hi, w_t) + tl.dot(lo, w_t)
    elif IEEE:
        return tl.dot(x, w_t, input_precision="ieee")
    else:
        return tl.dot(x.to(w_t.dtype), w_t)


@triton.jit
def _head_scores(Q, q_off, o_q, o_d, R, s_qr, b_ka, b_kb, MINMAX: tl.constexpr, HILO: tl.constexpr,
                 IEEE: tl.constexpr):
    """Block scores ``[BQ, BNB]`` of one query head's rows (``Q + q_off``) against a chunk of block summaries."""
    b_q = tl.load(Q + q_off + o_q[:, None] * s_qr + o_d[None, :], mask=(o_q < R)[:, None], other=0.0)
    if MINMAX:  # (maximum promotes bf16 to fp32 on the GPU; dot_split rounds back exactly)
        zero = tl.zeros_like(b_q)
        s = dot_split(tl.maximum(b_q, zero), tl.trans(b_ka), HILO, IEEE)
        s += dot_split(tl.minimum(b_q, zero), tl.trans(b_kb), HILO, IEEE)
    else:
        s = dot_split(b_q, tl.trans(b_ka), HILO, IEEE)
    return s


@triton.jit
def _block_topk_kernel(
    Q, KA, KB, PF, PL, EXCL, VAL, IDX,
    s_qh, s_qr, s_kh, s_kb, s_vh, s_vr, s_eh, s_er,
    R, NB, block, sink, window, sliding,
    G: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BNB: tl.constexpr, RED: tl.constexpr,
    K: tl.constexpr, KP2: tl.constexpr, N_EXCL: tl.constexpr, MINMAX: tl.constexpr, HAS_SW: tl.constexpr,
    IEEE: tl.constexpr, HILO: tl.constexpr, UNROLL_G: tl.constexpr,
):
    """Top-K eligible blocks per score row, streaming over the blocks: no score tensor in memory.

    A score row is ``RED`` consecutive query rows (max over them and over the group's ``G`` heads). Block
    ``b`` is eligible for a row whose queries span positions ``[PF, PL]`` if it is eligible for both ends
    (naive.eligible_blocks). Blocks are visited in increasing order and a block replaces the current
    minimum only when strictly greater, so ties keep the lower block index, as the reference does.
    """
    i_r, i_kh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_q = i_r * BQ + tl.arange(0, BQ)  # query rows
    o_out = i_r * (BQ // RED) + tl.arange(0, BQ // RED)  # score rows
    m_out = o_out < R // RED
    o_d = tl.arange(0, D)
    o_k = tl.arange(0, KP2)
    pf = tl.load(PF + o_out, mask=m_out, other=0)
    pl = tl.load(PL + o_out, mask=m_out, other=0)
    top_v = tl.where(o_k[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BQ // RED, KP2], tl.float32)
    top_i = tl.full([BQ // RED, KP2], -1, tl.int32)
    # blocks past the last row's causal bound (start <= pf - window) are ineligible for every row: not visited
    nb_hi = tl.minimum(NB, tl.maximum(tl.max(tl.where(m_out, pf, 0)) - window, -1) // block + 1)
    for b0 in range(0, nb_hi, BNB):
        o_b = b0 + tl.arange(0, BNB)
        m_b = o_b < NB
        p_k = i_kh * s_kh + o_b[:, None] * s_kb + o_d[None, :]
        b_ka = tl.load(KA + p_k, mask=m_b[:, None], other=0.0)
        if MINMAX:
            b_kb = tl.load(KB + p_k, mask=m_b[:, None], other=0.0)
        else:
            b_kb = b_ka
        best = tl.full([BQ, BNB], float("-inf"), tl.float32)
        if UNROLL_G:  # the compiler keeps every head's query tile on chip across the block loop
            for g in tl.static_range(G):
                s = _head_scores(Q, (i_kh * G + g) * s_qh, o_q, o_d, R, s_qr, b_ka, b_kb, MINMAX, HILO, IEEE)
                best = tl.maximum(best, s)
        else:  # too large to keep (many heads per group, fp32 rows): reloaded per chunk, from L2
            for g in range(G):
                s = _head_scores(Q, (i_kh * G + g) * s_qh, o_q, o_d, R, s_qr, b_ka, b_kb, MINMAX, HILO, IEEE)
                best = tl.maximum(best, s)
        if RED > 1:
            best = tl.max(tl.reshape(best, [BQ // RED, RED, BNB]), axis=1)
        b_end = o_b * block + block - 1
        ok = (b_end[None, :] <= pf[:, None]) & ((o_b * block)[None, :] <= (pf - window)[:, None])
        ok &= (b_end >= sink)[None, :] & (sink <= pf - window)[:, None] & m_b[None, :] & m_out[:, None]
        if HAS_SW:
            ok &= b_end[None, :] > (pl - sliding)[:, None]
        for e in tl.static_range(N_EXCL):
            ex = tl.load(EXCL + i_kh * s_eh + o_out * s_er + e, mask=m_out, other=-1)
            ok &= o_b[None, :] != ex[:, None]
        best = tl.where(ok, best, float("-inf"))
        top_v, top_i = merge_topk(top_v, top_i, best, b0, o_k, K, BNB)
    top_i = tl.where(top_v > float("-inf"), top_i, -1)
    m_st = m_out[:, None] & (o_k[None, :] < K)
    tl.store(VAL + i_kh * s_vh + o_out[:, None] * s_vr + o_k[None, :], top_v, mask=m_st)
    tl.store(IDX + i_kh * s_vh + o_out[:, None] * s_vr + o_k[None, :], top_i, mask=m_st)


def block_topk_triton(qr, ka, kb, group: int, reduce: int, p_first, p_last, k: int, cfg, sliding_window=None,
                      exclude=None) -> torch.Tensor:
    """Top-``k`` eligible blocks of every score row: ``qr [Hq, R, D]`` (``R`` a multiple of ``reduce``; fp32 rows
    with half-precision summaries are scored at fp32 precision),
    ``ka/kb [Hkv, nb, D]`` (kmax/kmin, or kmean and None), ``p_first/p_last [R // reduce]`` positions
    spanned by each row, ``exclude [Hkv, R // reduce, e]`` blocks to skip (-1 = none) -> ``[Hkv, R // reduce, k]``
    int32 block indices (-1 where fewer are eligible), unordered."""
    hq, r, d = qr.shape
    hkv, nb, _ = ka.shape
    rows = r // reduce
    kp2 = max(2, triton.next_power_of_2(k))
    val = torch.empty(hkv, rows, kp2, device=qr.device, dtype=torch.float32)
    idx = torch.full((hkv, rows, kp2), -1, device=qr.device, dtype=torch.int32)
    if rows == 0 or k == 0:
        return idx[..., :k]
    excl = exclude if exclude is not None else idx
    shape = tile_shape(qr.device, "select")
    sms = sm_count(qr.device) if qr.is_cuda else None
    bq = max(rows_per_program(shape["rows"], r, hkv, sms), reduce)
    grid = (triton.cdiv(r, bq), hkv)
    _block_topk_kernel[grid](
        qr, ka, ka if kb is None else kb, p_first.to(torch.int32), p_last.to(torch.int32), excl, val, idx,
        qr.stride(0), qr.stride(1), ka.stride(0), ka.stride(1), val.stride(0), val.stride(1),
        excl.stride(0), excl.stride(1),
        r, nb, cfg.block_size, cfg.sink_tokens, cfg.window, sliding_window or 0,
        G=group, D=d, BQ=bq, BNB=64, RED=reduce, K=k, KP2=kp2, N_EXCL=0 if exclude is None else exclude.shape[-1],
        MINMAX=kb is not None, HAS_SW=sliding_window is not None, IEEE=ka.dtype == torch.float32,
        HILO=qr.dtype == torch.float32 and ka.dtype != torch.float32,
        num_warps=shape["num_warps"] if bq <= 64 else max(8, shape["num_warps"]),
        UNROLL_G=group * bq * d * qr.element_size() <= UNROLLED_QUERY_BYTES,
    )
    return idx[..., :k]


def _tile_bounds(first: int, n: int, tile: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ranges ``[lo, hi)`` of a document's selection tiles (aligned to its start) among its query rows,
    which are its positions ``first .. n - 1``."""
    t = torch.arange(first // tile, (n - 1) // tile + 1, device=device)
    return torch.clamp(t * tile, min=first) - first, torch.clamp((t + 1) * tile, max=n) - first


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


def _rerank(rows, k, b: int, k_col0: int, short, g: int, reduce: int, cfg: SelectParams) -> torch.Tensor:
    """The exact second stage (``common.exact_block_scores``) for the kernel's score rows of one document:
    ``rows [Hq, R, D]`` contiguous (``reduce`` consecutive rows share a selection: the max over them), the
    document's keys from column ``k_col0`` of row ``b`` of ``k``, ``short [Hkv, R // reduce, S]`` ->
    ``[Hkv, R // reduce, topk]``."""
    r = rows.shape[1]
    short = short.long()
    listed = short.repeat_interleave(reduce, 1) if reduce > 1 else short
    q_rows = torch.arange(r, device=rows.device, dtype=torch.int64) * rows.stride(1)
    k_rows = torch.full((r,), b * k.stride(0) + k_col0 * k.stride(2), device=rows.device, dtype=torch.int64)
    exact = exact_scores_triton(rows, q_rows, k, k_rows, listed, g, cfg.block_size)
    if reduce > 1:
        exact = exact.view(exact.shape[0], r // reduce, reduce, -1).amax(2)
    return rerank_blocks(short, exact, cfg.topk)


def select_blocks_triton(q, k, layout: KernelLayout, cfg: SelectParams, sliding_window=None) -> torch.Tensor:
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
    for b, q_row0, k_col0, m, n in layout.docs:
        nb = n // bs
        if nb == 0:
            continue
        kd = k[b, :, k_col0 : k_col0 + nb * bs].unflatten(1, (nb, bs))
        kmax, kmin = kd.amax(2).contiguous(), kd.amin(2).contiguous()
        kmean = kd.mean(2, dtype=torch.float32).to(k.dtype).contiguous() if cfg.score in ("mean", "hybrid") else None
        qd = q[b, :, q_row0 : q_row0 + m]  # [Hq, m, D], positions n-m .. n-1
        first = n - m
        # selection tiles of this document (aligned to its start): rows [lo, hi) of qd, on the host (for slicing)
        # and on the device (for the kernels: made there, since a copy from pageable host memory waits for the GPU)
        lo, hi = _tile_bounds(first, n, tile, torch.device("cpu"))
        lo_d, hi_d = _tile_bounds(first, n, tile, q.device)
        rows_per_tile = tile if (tile > 1 and cfg.select_query == "each") else 1
        per_chunk = max(1, budget // (4 * hq * d * rows_per_tile))
        for c0 in range(0, lo.numel(), per_chunk):
            c_lo, c_hi = lo[c0 : c0 + per_chunk], hi[c0 : c0 + per_chunk]
            c_lo_d, c_hi_d = lo_d[c0 : c0 + per_chunk], hi_d[c0 : c0 + per_chunk]
            nt = c_lo.numel()
            if tile == 1:
                rows, reduce = qd[:, int(c_lo[0]) : int(c_lo[0]) + nt], 1
            elif cfg.select_query == "mean":
                rows, reduce = _tile_means(qd, c_lo, c_hi, tile), 1  # fp32, as the reference scores them
            else:  # every query of a tile, padded to `tile` rows by repeating the tile's first query
                slot = torch.arange(tile, device=q.device)
                idx = torch.where(slot[None] < (c_hi_d - c_lo_d)[:, None], c_lo_d[:, None] + slot[None], c_lo_d[:, None])
                rows, reduce = qd[:, idx.flatten()], tile
            rows = rows.contiguous()
            p_first, p_last = c_lo_d + first, c_hi_d - 1 + first
            topk_of = lambda kind, count, exclude=None: block_topk_triton(  # noqa: E731
                rows, kmax if kind == "minmax" else kmean, kmin if kind == "minmax" else None, g, reduce,
                p_first, p_last, count, cfg, sliding_window, exclude)
            if cfg.score == "hybrid":
                top_mm = topk_of("minmax", (cfg.topk + 1) // 2)
                top = torch.cat([top_mm, topk_of("mean", cfg.topk - top_mm.shape[-1], top_mm.contiguous())], -1)
            elif cfg.rerank:  # shortlist by the kernel, the exact second stage on the shortlisted keys
                top = _rerank(rows, k, b, k_col0, topk_of(cfg.score, cfg.rerank * cfg.topk), g, reduce, cfg)
            else:
                top = topk_of(cfg.score, cfg.topk)
            # each tile's choice, for each of its rows
            r0 = q_row0 + int(c_lo[0])
            if tile == 1:
                row_sel = top
            else:
                row_sel = top.repeat_interleave(c_hi_d - c_lo_d, dim=1, output_size=int(c_hi[-1] - c_lo[0]))
            sel[b, :, r0 : r0 + row_sel.shape[1], : row_sel.shape[2]] = row_sel.to(torch.int32)
        if cfg.anchor:  # the last tile: every eligible block ranked by exact scores (common.anchor_blocks)
            a, top = document_anchor(qd.unflatten(0, (hkv, g)), first, k[b, :, k_col0 : k_col0 + n], cfg, sliding_window)
            sel[b, :, q_row0 + a : q_row0 + m] = -1
            sel[b, :, q_row0 + a : q_row0 + m, : top.shape[-1]] = top[:, None].to(torch.int32)
    return sel


@triton.jit
def _exact_scores_kernel(Q, K, ROWQ, ROWK, SHORT, OUT, s_qh, s_kh, s_kt, R,
                         S: tl.constexpr, PER: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                         BS: tl.constexpr, IEEE: tl.constexpr, HILO: tl.constexpr):
    """The exact second stage: for score row ``r`` and KV head ``h``, the largest logit (max over the group's
    ``G`` heads) of the keys of each of its ``S`` shortlisted blocks, ``PER`` slots per program (grid axis 2).
    Row ``r``'s queries start at element ``ROWQ[r]`` of ``Q`` (head ``h*G+g`` at ``+ (h*G+g) * s_qh``), its
    blocks' keys at ``ROWK[r]`` of ``K`` (key ``j`` at ``+ h * s_kh + j * s_kt``); ``SHORT [Hkv, R, S]`` (-1 =
    none) -> ``OUT [Hkv, R, S]`` fp32."""
    i_r, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    s0 = tl.program_id(2) * PER
    o_g = tl.arange(0, GP)
    o_d = tl.arange(0, D)
    o_j = tl.arange(0, BS)
    q_base = tl.load(ROWQ + i_r)
    b_q = tl.load(Q + q_base + (i_h * G + o_g)[:, None] * s_qh + o_d[None, :], mask=(o_g < G)[:, None], other=0.0)
    k_base = K + tl.load(ROWK + i_r) + i_h * s_kh
    p_s = (i_h * R + i_r) * S
    for i in range(PER):
        s = s0 + i
        blk = tl.load(SHORT + p_s + s, mask=s < S, other=-1)
        cols = (tl.maximum(blk, 0) * BS + o_j).to(tl.int64)
        listed = ((o_j >= 0) & (blk >= 0)).to(tl.int32) != 0  # (a fresh boolean: the interpreter keeps some as ints)
        b_k = tl.load(k_base + cols[:, None] * s_kt + o_d[None, :], mask=listed[:, None], other=0.0)
        sc = dot_split(b_q, tl.trans(b_k), HILO, IEEE)
        sc = tl.where((o_g < G)[:, None], sc, float("-inf"))
        best = tl.max(tl.max(sc, 1), 0)
        tl.store(OUT + p_s + s, tl.where(blk >= 0, best, float("-inf")), mask=s < S)


def exact_scores_triton(q, q_rows, k, k_rows, short, group: int, block_size: int) -> torch.Tensor:
    """``[Hkv, R, S]`` fp32 exact scores of the shortlisted blocks ``short [Hkv, R, S]`` (-1 = none -> -inf).

    ``q``: a tensor whose query of head ``hq`` for row ``r`` starts at element ``q_rows[r] + hq * q.stride(-3)``
    (unit stride along the head dim); ``k``: ``[..., Hkv, T, D]`` keys, row ``r``'s block ``b`` at columns
    ``k_rows[r] / k.stride(-2) + b * block_size + j`` (``k_rows`` are element offsets)."""
    hkv, r, s = short.shape
    d = q.shape[-1]
    out = empty(hkv, r, s, dtype=torch.float32, device=q.device)
    if r == 0 or s == 0:
        return out
    # few rows (a decode step): the slots spread over programs too, so that every SM has work; many rows
    # (prefill): one program walks a row's whole shortlist, as before
    per = s if r * hkv >= 512 else max(1, -(-s * r * hkv // 512))
    _exact_scores_kernel[(r, hkv, triton.cdiv(s, per))](
        q, k, q_rows, k_rows, short.to(torch.int32).contiguous(), out, q.stride(-3), k.stride(-3), k.stride(-2), r,
        S=s, PER=per, G=group, GP=max(16, triton.next_power_of_2(group)), D=d, BS=block_size,
        IEEE=k.dtype == torch.float32, HILO=q.dtype == torch.float32 and k.dtype != torch.float32, num_warps=4,
    )
    return out

"""Selection stage on the GPU: block summaries, block scores, the exact second stage and the prompt anchor (Triton).

Scores follow ``common.shared_scores``: the min/max bound ``q+ . kmax + q- . kmin`` (two matrix products) or
``q . kmean``, max over the GQA group's heads, for each query or (``select_tile > 1``) each selection tile's mean
query. One kernel scores the blocks, masks the ineligible ones and keeps a running top-``S`` per row, so no score
tensor reaches memory; with ``rerank`` it keeps ``S = rerank * topk`` and a second kernel, one program per row and
KV head, reads the keys of those shortlisted blocks, ranks them by their exact largest logit and keeps the ``topk``
best (fused into the scan's programs, the same reads ran one block at a time and waited on each: 2.8 ms at 128K on
the H100). A third kernel scores every block exactly for the prompt's anchor tile (``anchor``). Chunks of tiles bound the query copies.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import empty  # a module-level name: tests poison it (NaN) to catch unwritten elements

from ....config import SparseXConfig
from ..rules.common import document_anchor, shortlist_size
from ..rules.layout import KernelLayout
from .tuning import rows_per_program, sm_count, tile_shape


@triton.jit
def merge_topk(top_v, top_i, best, b0, o_k, K: tl.constexpr, BNB: tl.constexpr):
    """Merge a chunk of block scores ``best [rows, BNB]`` (blocks ``b0 + j``) into each row's running top-K
    ``(top_v, top_i) [rows, KP2]``: rounds of "take the chunk's best, replace the current minimum if strictly
    greater". Chunks visited in increasing block order thus keep the lower block index on ties. Only as many rounds
    as the most chunk scores of a row above its current minimum (at most K): later rounds could not replace
    anything."""
    rounds = tl.minimum(tl.max(tl.sum((best > tl.min(top_v, 1)[:, None]).to(tl.int32), 1)), K)
    for _ in range(0, rounds):
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
    Q, KA, KB, PF, PL, IDX,
    s_qh, s_qr, s_kh, s_kb, s_ih, s_ir,
    R, NB, block, sink, window, sliding,
    G: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BNB: tl.constexpr, S: tl.constexpr, SP2: tl.constexpr,
    MINMAX: tl.constexpr, HAS_SW: tl.constexpr, IEEE: tl.constexpr, HILO: tl.constexpr, UNROLL_G: tl.constexpr,
):
    """The ``S`` best eligible blocks per score row (a query, or a selection tile's mean query) by the block
    scores, max over the group's ``G`` heads, streaming over the blocks: no score tensor in memory. ``S`` is the
    top-k with one stage and the shortlist (``rerank * topk``) with two, which ``_exact_topk_kernel`` ranks again.

    Block ``b`` is eligible for a row whose queries span positions ``[PF, PL]`` if it is eligible for both ends
    (common.eligible_blocks). Blocks are visited in increasing order and a block replaces the current minimum only
    when strictly greater, so ties keep the lower block index, as the reference does.
    """
    i_r, i_kh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_q = i_r * BQ + tl.arange(0, BQ)  # score rows
    m_q = o_q < R
    o_d = tl.arange(0, D)
    o_k = tl.arange(0, SP2)
    pf = tl.load(PF + o_q, mask=m_q, other=0)
    pl = tl.load(PL + o_q, mask=m_q, other=0)
    top_v = tl.where(o_k[None, :] < S, float("-inf"), float("inf")) + tl.zeros([BQ, SP2], tl.float32)
    top_i = tl.full([BQ, SP2], -1, tl.int32)
    # blocks past the last row's causal bound (start <= pf - window) are ineligible for every row: not visited
    nb_hi = tl.minimum(NB, tl.maximum(tl.max(tl.where(m_q, pf, 0)) - window, -1) // block + 1)
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
        b_end = o_b * block + block - 1
        ok = (b_end[None, :] <= pf[:, None]) & ((o_b * block)[None, :] <= (pf - window)[:, None])
        ok &= (b_end >= sink)[None, :] & (sink <= pf - window)[:, None] & m_b[None, :] & m_q[:, None]
        if HAS_SW:
            ok &= b_end[None, :] > (pl - sliding)[:, None]
        best = tl.where(ok, best, float("-inf"))
        top_v, top_i = merge_topk(top_v, top_i, best, b0, o_k, S, BNB)
    top_i = tl.where(top_v > float("-inf"), top_i, -1)
    m_st = m_q[:, None] & (o_k[None, :] < S)  # S = TOPK with one stage, the shortlist with two
    tl.store(IDX + i_kh * s_ih + o_q[:, None] * s_ir + o_k[None, :], top_i, mask=m_st)


@triton.jit
def _exact_topk_kernel(Q, KEYS, SHORT, IDX, s_qh, s_qr, s_xh, s_xt, s_sh, s_sr, s_ih, s_ir,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, S: tl.constexpr, SP2: tl.constexpr,
                       TOPK: tl.constexpr, TKP2: tl.constexpr, BS: tl.constexpr, NBI: tl.constexpr,
                       IEEE: tl.constexpr, HILO: tl.constexpr):
    """The exact second stage of one score row and KV head (one program each: many in flight hide the reads of
    the shortlisted keys): ``SHORT [S]`` shortlisted blocks (-1 = none) -> ``IDX [TOPK]``, the ``TOPK`` with the
    largest logit of any of their keys for the row's group of queries, max over the heads (ties: lower block; -1
    where fewer are listed). ``NBI`` blocks' keys are read per step."""
    i_r, i_kh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_g = tl.arange(0, GP)
    o_d = tl.arange(0, D)
    o_k = tl.arange(0, SP2)
    o_n = tl.arange(0, NBI)
    o_j = tl.arange(0, BS)
    b_q = tl.load(Q + (i_kh * G + o_g)[:, None] * s_qh + i_r * s_qr + o_d[None, :], mask=(o_g < G)[:, None],
                  other=0.0)
    p_s = SHORT + i_kh * s_sh + i_r * s_sr
    short = tl.load(p_s + o_k, mask=o_k < S, other=-1)
    p_x = KEYS + i_kh * s_xh
    exact = tl.full([SP2], float("-inf"), tl.float32)
    for s0 in range(0, S, NBI):
        blk = tl.load(p_s + s0 + o_n, mask=s0 + o_n < S, other=-1)  # [NBI]
        cols = (tl.maximum(blk, 0)[:, None] * BS + o_j[None, :]).to(tl.int64)  # [NBI, BS]
        listed = (blk >= 0)[:, None] & (o_j >= 0)[None, :]
        b_k = tl.load(p_x + tl.reshape(cols, [NBI * BS])[:, None] * s_xt + o_d[None, :],
                      mask=tl.reshape(listed, [NBI * BS])[:, None], other=0.0)
        sc = tl.where((o_g < G)[:, None], dot_split(b_q, tl.trans(b_k), HILO, IEEE), float("-inf"))
        ex = tl.max(tl.reshape(tl.max(sc, 0), [NBI, BS]), 1)  # [NBI]
        ex = tl.where(blk >= 0, ex, float("-inf"))
        hit = o_k[None, :] == (s0 + o_n)[:, None]  # [NBI, SP2]
        exact = tl.where((o_k >= s0) & (o_k < s0 + NBI), tl.max(tl.where(hit, ex[:, None], float("-inf")), 0), exact)
    o_o = tl.arange(0, TKP2)
    out = tl.full([TKP2], -1, tl.int32)
    for t in tl.static_range(TOPK):
        c_v = tl.max(exact, 0)
        c_i = tl.min(tl.where(exact == c_v, short, 2147483647), 0)
        out = tl.where(o_o == t, tl.where(c_v > float("-inf"), c_i, -1), out)
        exact = tl.where((short == c_i) & (exact == c_v), float("-inf"), exact)
    tl.store(IDX + i_kh * s_ih + i_r * s_ir + o_o, out, mask=o_o < TOPK)


def block_topk_triton(qr, ka, kb, group: int, p_first, p_last, cfg: SparseXConfig, sliding_window=None,
                      keys=None) -> torch.Tensor:
    """The ``topk`` eligible blocks of every score row: ``qr [Hq, R, D]`` (fp32 rows with half-precision summaries
    are scored at fp32 precision), ``ka/kb [Hkv, nb, D]`` (kmax/kmin, or kmean and None), ``p_first/p_last [R]``
    positions spanned by each row -> ``[Hkv, R, topk]`` int32 block indices (-1 where fewer are eligible). With
    ``cfg.rerank``, ``keys [Hkv, n, D]`` (the document's keys) rank the ``rerank * topk`` best again by exact scores
    (then in that order; with one stage the order is the kernel's)."""
    hq, r, d = qr.shape
    hkv, nb, _ = ka.shape
    k, s = cfg.topk, shortlist_size(cfg)
    idx = empty(hkv, r, k, device=qr.device, dtype=torch.int32)
    if r == 0 or k == 0:
        return idx
    short = empty(hkv, r, s, device=qr.device, dtype=torch.int32) if cfg.rerank else idx
    shape = tile_shape(qr.device, "select", head_dim=d, dtype=ka.dtype, group=group)
    sms = sm_count(qr.device) if qr.is_cuda else None
    bq = rows_per_program(shape["rows"], r, hkv, sms)
    ieee, hilo = ka.dtype == torch.float32, qr.dtype == torch.float32 and ka.dtype != torch.float32
    _block_topk_kernel[(triton.cdiv(r, bq), hkv)](
        qr, ka, ka if kb is None else kb, p_first.to(torch.int32), p_last.to(torch.int32), short,
        qr.stride(0), qr.stride(1), ka.stride(0), ka.stride(1), short.stride(0), short.stride(1),
        r, nb, cfg.block_size, cfg.sink_tokens, cfg.window, sliding_window or 0,
        G=group, D=d, BQ=bq, BNB=64, S=s, SP2=max(2, triton.next_power_of_2(s)),
        MINMAX=kb is not None, HAS_SW=sliding_window is not None, IEEE=ieee, HILO=hilo,
        UNROLL_G=group * bq * d * qr.element_size() <= UNROLLED_QUERY_BYTES,
        num_warps=shape["num_warps"] if bq <= 64 else max(8, shape["num_warps"]),
    )
    if cfg.rerank:
        # blocks of keys read per step: up to 32 KB of keys (half precision, d 128, blocks of 64: 2 blocks)
        nbi = max(1, min(triton.next_power_of_2(s), (32 << 10) // (cfg.block_size * d * keys.element_size())))
        nbi = 1 << (nbi.bit_length() - 1)
        _exact_topk_kernel[(r, hkv)](
            qr, keys, short, idx, qr.stride(0), qr.stride(1), keys.stride(0), keys.stride(1), short.stride(0),
            short.stride(1), idx.stride(0), idx.stride(1),
            G=group, GP=max(16, triton.next_power_of_2(group)), D=d, S=s, SP2=max(2, triton.next_power_of_2(s)),
            TOPK=k, TKP2=max(2, triton.next_power_of_2(k)), BS=cfg.block_size, NBI=nbi, IEEE=ieee, HILO=hilo,
            num_warps=4,
        )
    return idx


@triton.jit
def _anchor_scores_kernel(Q, KEYS, LAST, ANY, s_qh, s_qr, s_xh, s_xt, HKV, R, NB, PER,
                          G: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr):
    """The anchor tile's exact block scores (``common.anchor_scores``): for blocks ``[i_c * PER, +PER)`` of KV head
    ``i_kh``, the largest logit of the block's keys for the tile's last query (``LAST``) and for any of its ``R``
    queries (``ANY``), max over the group's heads, over the program's ``BR`` (head, query) rows: ``[row chunk, Hkv,
    NB]`` each (the host takes the max over the row chunks)."""
    i_c, i_kh, i_rc = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    o_x = i_rc * BR + tl.arange(0, BR)  # rows (head g, query t) = g * R + t
    m_x = o_x < G * R
    r_g, r_t = o_x // R, o_x % R
    o_d = tl.arange(0, D)
    o_j = tl.arange(0, BS)
    b_q = tl.load(Q + (i_kh * G + r_g)[:, None] * s_qh + r_t[:, None] * s_qr + o_d[None, :], mask=m_x[:, None],
                  other=0.0)
    is_last = m_x & (r_t == R - 1)
    p_x = KEYS + i_kh * s_xh
    out = (i_rc * HKV + i_kh) * NB
    for b in range(i_c * PER, tl.minimum(i_c * PER + PER, NB)):
        b_k = tl.load(p_x + (b * BS + o_j).to(tl.int64)[:, None] * s_xt + o_d[None, :])
        if IEEE:
            row_max = tl.max(tl.dot(b_q, tl.trans(b_k), input_precision="ieee"), 1)
        else:
            row_max = tl.max(tl.dot(b_q, tl.trans(b_k)), 1)
        tl.store(ANY + out + b, tl.max(tl.where(m_x, row_max, float("-inf")), 0))
        tl.store(LAST + out + b, tl.max(tl.where(is_last, row_max, float("-inf")), 0))


def anchor_scores_triton(q: torch.Tensor, keys: torch.Tensor, cfg: SparseXConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``common.anchor_scores`` by the kernel: ``q [Hkv, G, r, D]`` the anchor tile's queries, ``keys [Hkv, n, D]``
    -> ``(last, any)``, each ``[Hkv, n // block_size]`` fp32."""
    hkv, g, r, d = q.shape
    bs = cfg.block_size
    nb = keys.shape[1] // bs
    rows = q.reshape(hkv * g, r, d)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    br = min(64, max(16, triton.next_power_of_2(g * r)))
    n_rc = triton.cdiv(g * r, br)
    sms = sm_count(q.device) if q.is_cuda else 4
    per = max(1, triton.cdiv(nb * hkv * n_rc, 4 * sms))  # about four programs per multiprocessor
    last = empty(n_rc, hkv, nb, dtype=torch.float32, device=q.device)
    any_ = empty(n_rc, hkv, nb, dtype=torch.float32, device=q.device)
    if nb:
        _anchor_scores_kernel[(triton.cdiv(nb, per), hkv, n_rc)](
            rows, keys, last, any_, rows.stride(0), rows.stride(1), keys.stride(0), keys.stride(1), hkv, r, nb, per,
            G=g, D=d, BR=br, BS=bs, IEEE=keys.dtype == torch.float32, num_warps=4,
        )
    return last.amax(0), any_.amax(0)


@functools.lru_cache(maxsize=64)
def _tile_bounds(first: int, n: int, tile: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ranges ``[lo, hi)`` of a document's selection tiles (aligned to its start) among its query rows,
    which are its positions ``first .. n - 1``. Cached (a model's layers ask for the same ones; never written)."""
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


def select_blocks_triton(q, k, layout: KernelLayout, cfg: SparseXConfig, sliding_window=None) -> torch.Tensor:
    """Top-k blocks of every query row: ``[B, Hkv, Tq, topk]`` int32, -1 where none (rows of no document too).

    Work is chunked by selection tiles so that the query copies of one chunk stay within ``max(64 MiB, q bytes /
    16)``."""
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
        keys = k[b, :, k_col0 : k_col0 + n]  # [Hkv, n, D]
        kb = keys[:, : nb * bs].unflatten(1, (nb, bs))
        if cfg.score == "minmax":
            ka, kb = kb.amax(2).contiguous(), kb.amin(2).contiguous()
        else:
            ka, kb = kb.mean(2, dtype=torch.float32).to(k.dtype).contiguous(), None
        qd = q[b, :, q_row0 : q_row0 + m]  # [Hq, m, D], positions n-m .. n-1
        first = n - m
        # selection tiles of this document (aligned to its start): rows [lo, hi) of qd, on the host (for slicing)
        # and on the device (for the kernels: made there, since a copy from pageable host memory waits for the GPU)
        lo, hi = _tile_bounds(first, n, tile, torch.device("cpu"))
        lo_d, hi_d = _tile_bounds(first, n, tile, q.device)
        per_chunk = max(1, budget // (4 * hq * d))
        for c0 in range(0, lo.numel(), per_chunk):
            c_lo, c_hi = lo[c0 : c0 + per_chunk], hi[c0 : c0 + per_chunk]
            c_lo_d, c_hi_d = lo_d[c0 : c0 + per_chunk], hi_d[c0 : c0 + per_chunk]
            if tile == 1:
                rows = qd[:, int(c_lo[0]) : int(c_lo[0]) + c_lo.numel()]
            else:
                rows = _tile_means(qd, c_lo, c_hi, tile)  # fp32, as the reference scores them
            top = block_topk_triton(rows.contiguous(), ka, kb, g, c_lo_d + first, c_hi_d - 1 + first, cfg,
                                    sliding_window, keys)
            # each tile's choice, for each of its rows
            r0 = q_row0 + int(c_lo[0])
            if tile == 1:
                row_sel = top
            else:
                row_sel = top.repeat_interleave(c_hi_d - c_lo_d, dim=1, output_size=int(c_hi[-1] - c_lo[0]))
            sel[b, :, r0 : r0 + row_sel.shape[1]] = row_sel
        if cfg.anchor:  # the last tile: every eligible block ranked by exact scores (common.anchor_blocks)
            a, top = document_anchor(qd.unflatten(0, (hkv, g)), first, keys, cfg, sliding_window, anchor_scores_triton)
            sel[b, :, q_row0 + a : q_row0 + m] = -1
            sel[b, :, q_row0 + a : q_row0 + m, : top.shape[-1]] = top[:, None].to(torch.int32)
    return sel

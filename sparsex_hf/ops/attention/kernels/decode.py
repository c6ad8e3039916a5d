"""Triton kernels of a Sparse-X decode step: two launches, reading the cache in place (docs/kernels.md, "Decode").

1. ``_shortlist_kernel``, one program per (sequence, KV head, split of the summary blocks): scores the split's
   block summaries for the step's queries (max over the GQA group), keeps a running top-``S`` per query (``S =
   rerank * topk``, or ``topk`` with one stage) and stores it. The program that finishes last (a per-(sequence, KV
   head) counter) merges the splits' candidates (score order, ties to the lower block), appends the prompt's anchor
   blocks that are eligible for the query and not listed, and writes the shortlist ``[B*Hkv, Tq, S + A]``.
2. ``_attend_kernel``, one program per (sequence, KV head, split of the keys). Its rows are the ``G * Tq`` queries
   of the group (one matrix product serves the group). The attended keys form a list of chunks of ``block_size``
   keys, in four disjoint kinds:

   * sink keys below the window range ``[0, min(sink, lo))``;
   * stride keys below the window range (``j % stride == 0`` in ``[sink, lo)``), gathered ``BN`` at a time;
   * the window range ``[lo, n)`` (``lo``: the block-aligned start of the first query's window), each row's
     local | sink | stride keys;
   * one chunk per (query, shortlisted block): the block's keys that no other set holds (not sink, not stride, not
     in the query's window), for that query's rows.

   A split takes a contiguous share of the first three kinds (one running softmax state) and of the block chunks:
   for each it keeps a state of its own and the block's **exact score**, the largest logit of any of its keys for
   the query's group, taken from the same products (the keys are read once for both stages). The split that
   finishes last merges the split states, then for each query the ``topk`` shortlisted blocks with the best exact
   scores (ties: lower block), and writes the output rows.

With one stage the shortlist is the top-k itself and every listed block is merged: the same two kernels.
``combine="mix"`` runs the second kernel once per branch (``BRANCH`` 0/1/2: local / stride / selected keys only)
and weights the branch outputs as the reference does.

Nothing is read on the host and nothing is zeroed per step: the split counters live in one buffer per device and
stream, and the last program of each (sequence, KV head) sets its counter back to zero. The same launches run
eagerly and inside a CUDA graph.
"""

from __future__ import annotations

import collections
import contextlib

import torch
import triton
import triton.language as tl
from torch import empty  # a module-level name: tests poison it (NaN) to catch unwritten elements

from ....config import SparseXConfig
from ..rules.common import resolve_mix_weights, shortlist_size
from .prefill import _dot
from .select import merge_topk
from .tuning import sm_count, tile_shape


@triton.jit
def _cache_len(LEN, LEN_PTR: tl.constexpr):
    """The cache length: a scalar argument, or (a static cache under CUDA graphs) read from a device tensor."""
    if LEN_PTR:
        ln = tl.load(LEN).to(tl.int32)
    else:
        ln = LEN
    return ln


@triton.jit
def _last_of(CNT, i_bh, NSPLIT):
    """Whether this program is the last of its (sequence, KV head) to finish (then the counter is set back to 0).
    The barrier and the acq_rel atomic order this program's stores before the count, and the count before the last
    program's loads."""
    tl.debug_barrier()
    last = tl.atomic_add(CNT + i_bh, 1, sem="acq_rel", scope="gpu") == NSPLIT - 1
    if last:
        tl.store(CNT + i_bh, 0)
    return last


# ---------------------------------------------------------------------------------------------- the shortlist


@triton.jit
def _shortlist_kernel(
    Q, KA, KB, OFF, LEN, ANC, VAL, IDX, CNT, SHORT,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kn, s_ab, s_ah,
    HKV, NB, block, sink, window, sliding,
    NSPLIT: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TQ: tl.constexpr, TQP: tl.constexpr, D: tl.constexpr,
    BNB: tl.constexpr, S: tl.constexpr, SP2: tl.constexpr, A: tl.constexpr, NSL: tl.constexpr, NSLP2: tl.constexpr,
    MINMAX: tl.constexpr, HAS_SW: tl.constexpr, IEEE: tl.constexpr, LEN_PTR: tl.constexpr,
):
    """The ``S`` eligible blocks with the best summary scores for each of the ``TQ`` queries of one (sequence, KV
    head), over split ``i_s``'s share of the blocks; the last split merges and appends the anchor blocks. The rows of
    one matrix product are the (head, query) pairs of the group, ``g * TQP + t``; a query's score is the max over its
    heads' rows. Blocks are visited in increasing order and replace the current minimum only when strictly greater,
    so ties keep the lower block index (the reference's stable order)."""
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_kh = i_bh // HKV, i_bh % HKV
    n = _cache_len(LEN, LEN_PTR) - tl.load(OFF + i_b)
    o_t = tl.arange(0, TQP)
    m_t = o_t < TQ
    pos = n - TQ + o_t
    o_d = tl.arange(0, D)
    o_k = tl.arange(0, SP2)
    o_x = tl.arange(0, GP * TQP)
    x_g, x_t = o_x // TQP, o_x % TQP
    m_x = (x_g < G) & (x_t < TQ)
    p_q = Q + i_b.to(tl.int64) * s_qb + (i_kh * G + x_g).to(tl.int64) * s_qh + x_t.to(tl.int64) * s_qt
    b_q = tl.load(p_q[:, None] + o_d[None, :], mask=m_x[:, None], other=0.0)
    per = tl.cdiv(tl.cdiv(NB, NSPLIT), BNB) * BNB
    b_lo = i_s * per
    b_hi = tl.minimum(b_lo + per, NB)
    p_ka = KA + i_b.to(tl.int64) * s_kb + i_kh.to(tl.int64) * s_kh
    p_kb = KB + i_b.to(tl.int64) * s_kb + i_kh.to(tl.int64) * s_kh
    top_v = tl.where(o_k[None, :] < S, float("-inf"), float("inf")) + tl.zeros([TQP, SP2], tl.float32)
    top_i = tl.full([TQP, SP2], -1, tl.int32)
    hi = pos - window
    for b0 in range(b_lo, b_hi, BNB):
        o_b = b0 + tl.arange(0, BNB)
        m_b = o_b < b_hi
        p_k = o_b[:, None].to(tl.int64) * s_kn + o_d[None, :]
        b_ka = tl.load(p_ka + p_k, mask=m_b[:, None], other=0.0)
        if MINMAX:
            b_kb = tl.load(p_kb + p_k, mask=m_b[:, None], other=0.0)
            zero = tl.zeros_like(b_q)
            sc = _dot(tl.maximum(b_q, zero).to(b_ka.dtype), tl.trans(b_ka), IEEE)
            sc += _dot(tl.minimum(b_q, zero).to(b_kb.dtype), tl.trans(b_kb), IEEE)
        else:
            sc = _dot(b_q.to(b_ka.dtype), tl.trans(b_ka), IEEE)
        sc = tl.where(m_x[:, None], sc, float("-inf"))
        best = tl.max(tl.reshape(sc, [GP, TQP, BNB]), axis=0)  # max over the group's heads
        b_end = o_b * block + block - 1
        ok = (b_end[None, :] <= pos[:, None]) & ((o_b * block)[None, :] <= hi[:, None])
        ok &= (b_end >= sink)[None, :] & (sink <= hi)[:, None] & m_b[None, :] & m_t[:, None]
        if HAS_SW:
            ok &= b_end[None, :] > (pos - sliding)[:, None]
        best = tl.where(ok, best, float("-inf"))
        top_v, top_i = merge_topk(top_v, top_i, best, b0, o_k, S, BNB)
    top_v = tl.where(o_k[None, :] < S, top_v, float("-inf"))
    # candidates laid out [B*Hkv, TQP, NSPLIT * SP2] for the merge
    p_c = i_bh.to(tl.int64) * TQP * NSPLIT * SP2 + o_t[:, None] * NSPLIT * SP2 + i_s * SP2 + o_k[None, :]
    tl.store(VAL + p_c, top_v)
    tl.store(IDX + p_c, top_i)
    if _last_of(CNT, i_bh, NSPLIT):
        _shortlist_merge(VAL, IDX, ANC, SHORT, i_bh, i_b, i_kh, s_ab, s_ah, pos, NB, block, sink, window, sliding,
                         NSPLIT * SP2, TQ, TQP, S, A, NSL, NSLP2, HAS_SW)


@triton.jit
def _shortlist_merge(VAL, IDX, ANC, SHORT, i_bh, i_b, i_kh, s_ab, s_ah, pos, NB, block, sink, window, sliding,
                     NC: tl.constexpr, TQ: tl.constexpr, TQP: tl.constexpr, S: tl.constexpr, A: tl.constexpr,
                     NSL: tl.constexpr, NSLP2: tl.constexpr, HAS_SW: tl.constexpr):
    """The ``S`` best of the splits' candidates ``[TQP, NC]`` of one (sequence, KV head) (highest score first, ties to
    the lower block index, -1 where fewer are eligible), then the ``A`` anchor blocks (each where it is eligible for
    the query and not listed, else -1): ``SHORT [.., TQ, NSL]`` (loads bypass L1: other programs wrote them)."""
    o_t = tl.arange(0, TQP)
    o_c = tl.arange(0, NC)
    o_l = tl.arange(0, NSLP2)
    base = i_bh.to(tl.int64) * TQP * NC
    v = tl.load(VAL + base + o_t[:, None] * NC + o_c[None, :], cache_modifier=".cg")
    ix = tl.load(IDX + base + o_t[:, None] * NC + o_c[None, :], cache_modifier=".cg")
    short = tl.full([TQP, NSLP2], -1, tl.int32)
    for r in tl.static_range(S):
        c_v = tl.max(v, 1)
        c_i = tl.min(tl.where(v == c_v[:, None], ix, 2147483647), 1)
        short = tl.where(o_l[None, :] == r, tl.where(c_v > float("-inf"), c_i, -1)[:, None], short)
        v = tl.where((ix == c_i[:, None]) & (v == c_v[:, None]), float("-inf"), v)
    hi = pos - window
    for a in tl.static_range(A):
        blk = tl.load(ANC + i_b.to(tl.int64) * s_ab + i_kh.to(tl.int64) * s_ah + a).to(tl.int32)
        b_end = blk * block + block - 1
        ok = (blk >= 0) & (blk < NB) & (b_end <= pos) & (blk * block <= hi) & (b_end >= sink) & (sink <= hi)
        if HAS_SW:
            ok &= b_end > pos - sliding
        listed = tl.sum((short == blk).to(tl.int32), 1) > 0
        short = tl.where(o_l[None, :] == S + a, tl.where(ok & ~listed, blk, -1)[:, None], short)
    p_s = SHORT + i_bh.to(tl.int64) * TQ * NSL + o_t[:, None] * NSL + o_l[None, :]
    tl.store(p_s, short, mask=(o_t[:, None] < TQ) & (o_l[None, :] < NSL))


# ---------------------------------------------------------------------------------------------- the attention


@triton.jit
def _attend_kernel(
    Q, K, V, SHORT, OFF, LEN, OP, MP, LP, EX, SLM, SLL, SLO, CNT, O, L,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
    HKV, NSPLIT, scale, sink, window, stride, sliding,
    G: tl.constexpr, TQ: tl.constexpr, TQP: tl.constexpr, NSL: tl.constexpr, NSLP2: tl.constexpr,
    TOPK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BRANCH: tl.constexpr,
    HAS_SW: tl.constexpr, IEEE: tl.constexpr, LEN_PTR: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_kh = i_bh // HKV, i_bh % HKV
    off = tl.load(OFF + i_b).to(tl.int64)
    n = _cache_len(LEN, LEN_PTR) - tl.load(OFF + i_b)
    o_r = tl.arange(0, BM)
    m_r = o_r < G * TQ
    r_g, r_t = o_r // TQ, o_r % TQ
    pos = n - TQ + r_t
    o_d = tl.arange(0, D)
    q_off = i_b.to(tl.int64) * s_qb + (i_kh * G + r_g).to(tl.int64) * s_qh + r_t.to(tl.int64) * s_qt
    b_q = tl.load(Q + q_off[:, None] + o_d[None, :], mask=m_r[:, None], other=0.0)
    p_k = K + i_b.to(tl.int64) * s_kb + i_kh.to(tl.int64) * s_kh + off * s_kt
    p_v = V + i_b.to(tl.int64) * s_vb + i_kh.to(tl.int64) * s_vh + off * s_vt
    qk_scale = scale * 1.4426950408889634
    stride_safe = tl.maximum(stride, 1)
    o_n = tl.arange(0, BN)

    # the chunk list: sink, stride, window range (one running state) and (query, shortlisted block) chunks
    lo = tl.maximum(n - TQ - window + 1, 0) // BN * BN
    sink_hi = tl.minimum(sink, lo)
    n_s = tl.cdiv(sink_hi, BN)
    s_lo = tl.cdiv(sink, stride_safe)
    s_hi = tl.cdiv(lo, stride_safe)
    n_r = tl.where(stride > 0, tl.cdiv(tl.maximum(s_hi - s_lo, 0), BN), 0)
    n_w = tl.cdiv(n - lo, BN)
    n_t = TQ * NSL
    if BRANCH == 0:  # local keys only (BRANCH 3, the union, keeps every kind)
        n_r = 0
        n_t = 0
    if BRANCH == 1:  # stride keys outside the window only
        n_s = 0
        n_t = 0
    if BRANCH == 2:  # the selected blocks' own keys only
        n_s = 0
        n_r = 0
        n_w = 0
    total = n_s + n_r + n_w
    per = tl.cdiv(total, NSPLIT)
    c0 = i_s * per
    c1 = tl.minimum(c0 + per, total)

    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for c in range(c0, c1):
        is_s = c < n_s
        is_r = (c >= n_s) & (c < n_s + n_r)
        is_w = c >= n_s + n_r
        j_s = c * BN + o_n
        ss = s_lo + (c - n_s) * BN + o_n
        j_r = ss * stride_safe
        j_w = lo + (c - n_s - n_r) * BN + o_n
        j = tl.where(is_s, j_s, tl.where(is_r, j_r, j_w))
        ok_k = (is_s & (j_s < sink_hi)) | (is_r & (ss < s_hi)) | (is_w & (j_w < n))
        ok_k = ok_k.to(tl.int32) != 0  # (a fresh boolean: the interpreter keeps some scalar-derived masks as ints)
        # per-row membership in the window range: the row's local keys (and sink keys there), stride keys
        local = ((j_w[None, :] > (pos - window)[:, None]) | (j_w < sink)[None, :])
        strided = (stride > 0) & (j_w % stride_safe == 0)
        if BRANCH == 0:
            mem_w = local
        elif BRANCH == 1:
            mem_w = strided[None, :] & ~local
        else:
            mem_w = local | strided[None, :]
        mem_w = mem_w & (j_w[None, :] <= pos[:, None]) & (j_w < n)[None, :]
        member = ((~is_w & ok_k)[None, :] & m_r[:, None]) | (is_w & mem_w)
        member = (member & m_r[:, None]).to(tl.int32) != 0
        if HAS_SW:
            member &= (pos[:, None] - j[None, :]) < sliding
        jj = j.to(tl.int64)
        b_k = tl.load(p_k + jj[:, None] * s_kt + o_d[None, :], mask=ok_k[:, None], other=0.0)
        b_v = tl.load(p_v + jj[:, None] * s_vt + o_d[None, :], mask=ok_k[:, None], other=0.0)
        s = _dot(b_q, tl.trans(b_k), IEEE)
        s = tl.where(member, s * qk_scale, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(b_m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        b_l = b_l * alpha + tl.sum(p, 1)
        b_acc = b_acc * alpha[:, None] + _dot(p.to(b_v.dtype), b_v, IEEE)
        b_m = m_new
    out = (i_bh * NSPLIT + i_s).to(tl.int64) * BM
    tl.store(MP + out + o_r, b_m)
    tl.store(LP + out + o_r, b_l)
    tl.store(OP + (out + o_r)[:, None] * D + o_d[None, :], b_acc)

    # this split's share of the (query, shortlisted block) chunks: a state and an exact score each
    per_t = tl.cdiv(n_t, NSPLIT)
    e0 = i_s * per_t
    e1 = tl.minimum(e0 + per_t, n_t)
    for e in range(e0, e1):
        t_e = e // NSL
        blk = tl.load(SHORT + (i_bh.to(tl.int64) * TQ + t_e) * NSL + e % NSL)
        listed = blk >= 0
        j = tl.maximum(blk, 0) * BN + o_n
        m_k = ((o_n >= 0) & listed).to(tl.int32) != 0  # (a fresh boolean, as above)
        jj = j.to(tl.int64)
        b_k = tl.load(p_k + jj[:, None] * s_kt + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_v = tl.load(p_v + jj[:, None] * s_vt + o_d[None, :], mask=m_k[:, None], other=0.0)
        s = _dot(b_q, tl.trans(b_k), IEEE)
        row = m_r & (r_t == t_e)
        exact = tl.max(tl.max(tl.where(row[:, None], s, float("-inf")), 1), 0)  # any key of the block, any head
        tl.store(EX + i_bh.to(tl.int64) * n_t + e, tl.where(listed, exact, float("-inf")))
        own = (j >= sink) & ((stride == 0) | (j % stride_safe != 0))
        member = row[:, None] & own[None, :] & (j[None, :] <= (pos - window)[:, None]) & listed
        if HAS_SW:
            member &= (pos[:, None] - j[None, :]) < sliding
        s = tl.where(member, s * qk_scale, float("-inf"))
        m_e = tl.max(s, 1)
        m_safe = tl.where(m_e == float("-inf"), 0.0, m_e)
        p = tl.exp2(s - m_safe[:, None])
        acc = _dot(p.to(b_v.dtype), b_v, IEEE)
        slot = (i_bh.to(tl.int64) * n_t + e) * G + r_g  # the query's G rows, compactly
        tl.store(SLM + slot, m_e, mask=row)
        tl.store(SLL + slot, tl.sum(p, 1), mask=row)
        tl.store(SLO + slot[:, None] * D + o_d[None, :], acc, mask=row[:, None])
    if _last_of(CNT, i_bh, NSPLIT):
        _merge(OP, MP, LP, EX, SHORT, SLM, SLL, SLO, O, L, s_ob, s_oh, s_ot, i_bh, i_b, i_kh, NSPLIT,
               G, TQ, TQP, NSL, NSLP2, TOPK, BM, D, BRANCH >= 2)


@triton.jit
def _merge_state(b_m, b_l, b_acc, m_s, l_s, o_s):
    m_new = tl.maximum(b_m, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a_old = tl.exp2(b_m - m_safe)
    a_new = tl.exp2(m_s - m_safe)
    return m_new, b_l * a_old + l_s * a_new, b_acc * a_old[:, None] + o_s * a_new[:, None]


@triton.jit
def _merge(OP, MP, LP, EX, SHORT, SLM, SLL, SLO, O, L, s_ob, s_oh, s_ot, i_bh, i_b, i_kh, NSPLIT,
           G: tl.constexpr, TQ: tl.constexpr, TQP: tl.constexpr, NSL: tl.constexpr, NSLP2: tl.constexpr,
           TOPK: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, SLOTS: tl.constexpr):
    """One (sequence, KV head): the splits' states, then per query the ``TOPK`` shortlisted blocks with the best
    exact scores (ties: lower block index; blocks of score -inf are not listed); writes the ``G * Tq`` output rows
    and the softmax denominators (loads bypass L1: other programs wrote the states)."""
    o_r = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for i_s in range(0, NSPLIT):
        base = (i_bh * NSPLIT + i_s).to(tl.int64) * BM
        m_s = tl.load(MP + base + o_r, cache_modifier=".cg")
        l_s = tl.load(LP + base + o_r, cache_modifier=".cg")
        o_s = tl.load(OP + (base + o_r)[:, None] * D + o_d[None, :], cache_modifier=".cg")
        b_m, b_l, b_acc = _merge_state(b_m, b_l, b_acc, m_s, l_s, o_s)
    rows = o_r < G * TQ
    r_g, r_t = o_r // TQ, o_r % TQ
    if SLOTS:
        n_t = TQ * NSL
        o_t = tl.arange(0, TQP)
        o_l = tl.arange(0, NSLP2)
        m_tl = (o_t[:, None] < TQ) & (o_l[None, :] < NSL)
        p_tl = i_bh.to(tl.int64) * n_t + o_t[:, None] * NSL + o_l[None, :]
        ex = tl.load(EX + p_tl, mask=m_tl, other=float("-inf"), cache_modifier=".cg")
        blk = tl.load(SHORT + p_tl, mask=m_tl, other=-1)
        for _ in tl.static_range(TOPK):
            c_v = tl.max(ex, 1)
            c_b = tl.min(tl.where(ex == c_v[:, None], blk, 2147483647), 1)
            c_l = tl.min(tl.where((ex == c_v[:, None]) & (blk == c_b[:, None]), o_l[None, :], NSLP2), 1)
            ex = tl.where(o_l[None, :] == c_l[:, None], float("-inf"), ex)
            # each row's query: its chosen slot, and whether there was one
            of_row = o_t[None, :] == r_t[:, None]
            l_r = tl.sum(tl.where(of_row, c_l[None, :], 0), 1)
            ok = (tl.sum(tl.where(of_row, (c_v > float("-inf")).to(tl.int32)[None, :], 0), 1) > 0) & rows
            slot = (i_bh.to(tl.int64) * n_t + r_t * NSL + l_r) * G + r_g
            m_s = tl.load(SLM + slot, mask=ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(SLL + slot, mask=ok, other=0.0, cache_modifier=".cg")
            o_s = tl.load(SLO + slot[:, None] * D + o_d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
            b_m, b_l, b_acc = _merge_state(b_m, b_l, b_acc, m_s, l_s, o_s)
    out = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    p_o = O + i_b.to(tl.int64) * s_ob + (i_kh * G + r_g).to(tl.int64) * s_oh + r_t.to(tl.int64) * s_ot
    tl.store(p_o[:, None] + o_d[None, :], out.to(O.dtype.element_ty), mask=rows[:, None])
    tl.store(L + i_bh.to(tl.int64) * BM + o_r, b_l)


# ---------------------------------------------------------------------------------------------- host side

# Scratch buffers of a step shape, kept from step to step (the kernels of one stream run in order, so consecutive
# layers and steps can share them); False: fresh buffers at every call (the tests poison them, see conftest.py).
REUSE_SCRATCH = True
_FRESH = False
_SCRATCH: collections.OrderedDict = collections.OrderedDict()
_COUNTERS: dict[tuple, list[torch.Tensor]] = {}


def _stream_key(device: torch.device):
    if device.type != "cuda":
        return (device.type, 0)
    return (device.index, torch.cuda.current_stream(device).cuda_stream)


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The split counters: zero between launches (each kernel's last program resets its own), one buffer per device,
    never released (a CUDA graph may hold its address). The kernels of a decode step run on one stream, one after
    the other. With no buffer yet inside a graph capture or the custom op (``fresh_scratch``: CUDA graph trees warm
    up and record a compiled step in their own memory pool, where no tensor may outlive the call), a buffer of the
    call's own (zeroed at each replay), never kept."""
    key = (device.type, device.index)
    bufs = _COUNTERS.setdefault(key, [])
    if not bufs or bufs[-1].numel() < n:
        if _FRESH or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
        bufs.append(torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device))  # (outgrown ones stay: a
        # graph captured earlier may use them)
    return bufs[-1]


@contextlib.contextmanager
def fresh_scratch():
    """Inside the block the kernels take fresh scratch buffers: the custom op (``decode_op.py``) runs inside compiled
    graphs, whose CUDA graph trees warm up and record in their own memory pool, where no buffer may outlive a call."""
    global _FRESH
    saved, _FRESH = _FRESH, True
    try:
        yield
    finally:
        _FRESH = saved


def _scratch(name: str, device: torch.device, specs: tuple) -> tuple[torch.Tensor, ...]:
    """Buffers of the given ``(shape, dtype)`` specs for the use ``name``: kept per (device, stream, name, specs) in
    eager calls (8 at most), fresh inside a CUDA graph capture (the graph owns them) and inside the custom op."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not REUSE_SCRATCH or _FRESH or capturing:
        return tuple(empty(shape, dtype=dtype, device=device) for shape, dtype in specs)
    key = (_stream_key(device), name, specs)
    bufs = _SCRATCH.get(key)
    if bufs is None:
        bufs = tuple(empty(shape, dtype=dtype, device=device) for shape, dtype in specs)
        _SCRATCH[key] = bufs
        if len(_SCRATCH) > 8:
            _SCRATCH.popitem(last=False)
    else:
        _SCRATCH.move_to_end(key)
    return bufs


def _p2(x: int) -> int:
    """The next power of two (``triton.next_power_of_2`` costs microseconds per call: the decode host path is hot)."""
    return 1 << max(0, x - 1).bit_length()


def _rows(q: torch.Tensor) -> torch.Tensor:
    """``q`` as the kernels read it: any batch / head / token strides, unit stride along the head dim (the
    attention module's transposed query already is, so a decode step copies nothing)."""
    return q if q.stride(-1) == 1 else q.contiguous()


def decode_shortlist_triton(q, summaries, off, seq_len, cfg: SparseXConfig, sliding_window=None,
                            anchor=None) -> torch.Tensor:
    """The first stage of a decode step: ``[B, Hkv, Tq, S + A]`` int32 block indices (-1 = none) of the queries
    ``q [B, Hq, Tq, D]`` from the summaries ``(kmin, kmax, kmean)`` (each ``[B, Hkv, nb, D]``): the ``S`` eligible
    blocks with the best summary scores (score order, ties to the lower block), then the ``A`` blocks of ``anchor
    [B, Hkv, A]`` (with ``cfg.anchor``) where eligible and not listed. ``off [B]`` int32 row offsets."""
    bsz, hq, tq, d = q.shape
    kmin, kmax, kmean = summaries
    _, hkv, nb, _ = kmin.shape
    dev = q.device
    s = shortlist_size(cfg)
    use_anchor = anchor is not None and bool(cfg.anchor)  # (an anchor implies rerank > 0: the config checks)
    a = anchor.shape[-1] if use_anchor else 0
    nsl = s + a
    short = _scratch("shortlist", dev, (((bsz, hkv, tq, nsl), torch.int32),))[0]
    if nb == 0 or s == 0:  # no complete block: nothing is eligible (anchor blocks neither)
        return short.fill_(-1)
    minmax = cfg.score == "minmax"
    ka, kb = (kmax, kmin) if minmax else (kmean, kmean)
    bnb = 64
    sp2 = max(2, _p2(s))
    sms = sm_count(dev) if dev.type == "cuda" else 4
    # splits: enough programs to fill the GPU twice, at least 4 chunks of blocks each, at most 512 candidates to merge
    nsplit = max(1, min(_p2(max(1, (2 * sms) // (bsz * hkv))),
                        _p2(-(-nb // (4 * bnb))), max(1, 512 // sp2)))
    tqp = max(2, _p2(tq))
    gp = max(_p2(hq // hkv), 16 // tqp)  # (head, query) rows: at least 16 for the matrix unit
    val, idx = _scratch("candidates", dev, (((bsz * hkv, tqp, nsplit * sp2), torch.float32),
                              ((bsz * hkv, tqp, nsplit * sp2), torch.int32)))
    anc = anchor if use_anchor else short
    if use_anchor and (anc.stride(-1) != 1 or anc.device != dev):
        anc = anc.to(dev).contiguous()
    qc = _rows(q)
    _shortlist_kernel[(bsz * hkv, nsplit)](
        qc, ka, kb, off, seq_len, anc, val, idx, _counters(dev, bsz * hkv), short,
        qc.stride(0), qc.stride(1), qc.stride(2), ka.stride(0), ka.stride(1), ka.stride(2), anc.stride(0), anc.stride(1),
        hkv, nb, cfg.block_size, cfg.sink_tokens, cfg.window, sliding_window or 0,
        NSPLIT=nsplit, G=hq // hkv, GP=gp, TQ=tq, TQP=tqp, D=d, BNB=bnb, S=s, SP2=sp2, A=a, NSL=nsl,
        NSLP2=max(2, _p2(nsl)), MINMAX=minmax, HAS_SW=sliding_window is not None,
        IEEE=q.dtype == torch.float32, LEN_PTR=isinstance(seq_len, torch.Tensor),
        num_warps=tile_shape(dev, "decode_shortlist", head_dim=d, dtype=q.dtype, group=hq // hkv)["num_warps"],
    )
    return short


def _splits(n_max: int, cfg, tq: int, nsl: int, programs: int, device) -> int:
    chunks = (min(cfg.window, n_max) + cfg.sink_tokens + (n_max // cfg.stride if cfg.stride else 0)) // cfg.block_size
    chunks += tq * nsl + 2
    sms = sm_count(device) if device.type == "cuda" else 4
    want = max(1, (2 * sms) // max(1, programs))
    return int(max(1, min(want, chunks // 4, 64)))


def _attend(q, k, v, short, off, seq_len, n_max, cfg, scale, sliding_window, branch: int, out_dtype):
    """One pass of the second kernel (all kinds, or one ``mix`` branch): output ``[B, Hq, Tq, D]`` and the softmax
    denominators ``[B*Hkv, BM]`` (0 where a row attended nothing)."""
    bsz, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    nsl = short.shape[-1]
    bm = max(16, _p2(g * tq))
    nsplit = _splits(n_max, cfg, tq, nsl, bsz * hkv, q.device)
    dev = q.device
    qc = _rows(q)
    n_t = tq * nsl
    f32 = torch.float32
    op, mp, lp, ex, slm, sll, slo, lsum = _scratch("states", dev, (
        ((bsz * hkv, nsplit, bm, d), f32), ((bsz * hkv, nsplit, bm), f32), ((bsz * hkv, nsplit, bm), f32),
        ((bsz * hkv, max(n_t, 1)), f32), ((bsz * hkv, max(n_t, 1), g), f32), ((bsz * hkv, max(n_t, 1), g), f32),
        ((bsz * hkv, max(n_t, 1), g, d), f32), ((bsz * hkv, bm), f32)))
    out = empty(bsz, hq, tq, d, dtype=out_dtype, device=dev)
    shape = tile_shape(dev, "decode_attend", head_dim=d, dtype=q.dtype, group=g, block_size=cfg.block_size)
    _attend_kernel[(bsz * hkv, nsplit)](
        qc, k, v, short, off, seq_len, op, mp, lp, ex, slm, sll, slo, _counters(dev, bsz * hkv), out, lsum,
        qc.stride(0), qc.stride(1), qc.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hkv, nsplit, scale, cfg.sink_tokens, cfg.window, cfg.stride, sliding_window or 0,
        G=g, TQ=tq, TQP=max(2, _p2(tq)), NSL=nsl, NSLP2=max(2, _p2(nsl)),
        TOPK=cfg.topk, D=d, BM=bm, BN=cfg.block_size, BRANCH=branch, HAS_SW=sliding_window is not None,
        IEEE=q.dtype == torch.float32, LEN_PTR=isinstance(seq_len, torch.Tensor), num_warps=shape["num_warps"],
        # (fp32 tiles of more than 8K elements: one stage, for shared memory)
        num_stages=1 if q.element_size() == 4 and bm * cfg.block_size > 8192 else shape["num_stages"],
    )
    return out, lsum


def decode_attention_triton(q, k, v, short, off, seq_len, n_max, cfg, scale, sliding_window, mix_weights=None):
    """The second kernel: attention over sink + window + stride and, per query, the ``topk`` blocks of its shortlist
    ``short [B, Hkv, Tq, S + A]`` (int32, from :func:`decode_shortlist_triton`) with the best exact scores:
    ``[B, Hq, Tq, D]``; ``off [B]`` int32 row offsets, ``n_max`` the longest row's length (host int)."""
    if cfg.combine == "union":
        return _attend(q, k, v, short, off, seq_len, n_max, cfg, scale, sliding_window, 3, q.dtype)[0]
    bsz, hq, tq, _ = q.shape
    g = hq // k.shape[1]
    weights = resolve_mix_weights(cfg, mix_weights, hq, q.device, torch.float32)
    out = norm = 0
    for i in range(3):
        o_b, lsum = _attend(q, k, v, short, off, seq_len, n_max, cfg, scale, sliding_window, i, torch.float32)
        nonempty = (lsum[:, : g * tq] > 0).view(bsz, k.shape[1], g, tq).reshape(bsz, hq, tq)
        wb = weights[None, :, None, i] * nonempty
        out = out + wb[..., None] * o_b
        norm = norm + wb
    return (out / norm[..., None]).to(q.dtype)


def sparsex_decode_triton(q, k_cache, v_cache, summaries, offsets, seq_len: int, max_doc_len: int,
                          cfg: SparseXConfig, *, scale: float, sliding_window=None, mix_weights=None,
                          anchor=None) -> torch.Tensor:
    """A decode step with the kernels (same contract as ``decode.sparsex_decode_torch``): the shortlist kernel, then
    the attention kernel with the exact stage and the top-k inside: two Triton launches, nothing else on the GPU."""
    off = offsets if offsets.dtype == torch.int32 else offsets.to(torch.int32)
    short = decode_shortlist_triton(q, summaries, off, seq_len, cfg, sliding_window, anchor)
    return decode_attention_triton(q, k_cache, v_cache, short, off, seq_len, max_doc_len, cfg, scale, sliding_window,
                                   mix_weights)

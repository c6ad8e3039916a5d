"""Triton attention stage of a Sparse-X decode step, reading the cache in place (split-K).

One program per (sequence, KV head, split). Its rows are the ``G * Tq`` queries of the KV head's group (one
matrix product serves the whole GQA group). The keys of that (sequence, KV head) form a virtual list of
chunks of ``BN = block_size`` keys, in four disjoint kinds:

* sink keys below the window range, ``[0, min(sink, lo))``;
* stride keys below the window range (``j % stride == 0`` in ``[sink, lo)``), gathered ``BN`` at a time;
* the selected blocks, one chunk per (query, block), keys below ``lo`` that are neither sink nor stride,
  for the rows of that query only;
* the window range ``[lo, n)``, ``lo`` the block-aligned start of the first query's window, with the full
  per-row membership (local | sink | stride | the row's selected blocks, causal, sliding window).

Split ``s`` takes a contiguous share of the chunks and writes its partial softmax state (max, sum, output);
the split that finishes last (a per-(sequence, KV head) counter) merges them and writes the output rows, or,
inside a CUDA graph (where that measured slower at 1M), a separate merge kernel does (``fold_merges``).
``combine="mix"`` runs the kernel once per branch (``BRANCH`` 0/1/2 keeps only the local / stride / selected keys)
and weights the branch outputs as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import empty, empty_like  # module-level names: tests poison them (NaN) to catch unwritten elements

from ...config import SparseXConfig
from .common import rerank_blocks, resolve_mix_weights, shortlist_config
from .decode import add_anchor, decode_positions, decode_select
from .select import exact_scores_triton, merge_topk
from .tuning import sm_count


@triton.jit
def _cache_len(LEN, LEN_PTR: tl.constexpr):
    """The cache length: a scalar argument, or (a static cache under CUDA graphs) read from a device tensor."""
    if LEN_PTR:
        ln = tl.load(LEN).to(tl.int32)
    else:
        ln = LEN
    return ln


@triton.jit
def _decode_kernel(
    Q, K, V, SEL, OFF, LEN, OP, MP, LP, CNT, O, L,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_sb, s_sh, s_st, s_ob, s_oh, s_ot,
    HKV, NSPLIT, scale, sink, window, stride, sliding,
    G: tl.constexpr, TQ: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BRANCH: tl.constexpr, HAS_SW: tl.constexpr, IEEE: tl.constexpr,
    LEN_PTR: tl.constexpr, FOLD: tl.constexpr,
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
    o_s = tl.arange(0, TOPK_P2)
    sel_base = SEL + i_b.to(tl.int64) * s_sb + i_kh * s_sh
    b_sel = tl.load(sel_base + r_t[:, None] * s_st + o_s[None, :], mask=m_r[:, None] & (o_s[None, :] < TOPK), other=-1)
    p_k = K + i_b.to(tl.int64) * s_kb + i_kh.to(tl.int64) * s_kh + off * s_kt
    p_v = V + i_b.to(tl.int64) * s_vb + i_kh.to(tl.int64) * s_vh + off * s_vt
    qk_scale = scale * 1.4426950408889634

    # the chunk list
    lo = tl.maximum(n - TQ - window + 1, 0) // BN * BN
    sink_hi = tl.minimum(sink, lo)
    n_s = tl.cdiv(sink_hi, BN)
    stride_safe = tl.maximum(stride, 1)
    s_lo = tl.cdiv(sink, stride_safe)
    s_hi = tl.cdiv(lo, stride_safe)
    n_r = tl.where(stride > 0, tl.cdiv(tl.maximum(s_hi - s_lo, 0), BN), 0)
    n_t = TQ * TOPK
    n_w = tl.cdiv(n - lo, BN)
    if BRANCH == 1 or BRANCH == 2:  # BRANCH 3 (union) keeps every kind
        n_s = 0
    if BRANCH == 0 or BRANCH == 2:
        n_r = 0
    if BRANCH == 0 or BRANCH == 1:
        n_t = 0
    total = n_s + n_r + n_t + n_w
    per = tl.cdiv(total, NSPLIT)
    c0 = i_s * per
    c1 = tl.minimum(c0 + per, total)

    o_n = tl.arange(0, BN)
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for c in range(c0, c1):
        is_s = c < n_s
        is_r = (c >= n_s) & (c < n_s + n_r)
        is_t = (c >= n_s + n_r) & (c < n_s + n_r + n_t)
        # sink
        j_s = c * BN + o_n
        # stride
        ss = s_lo + (c - n_s) * BN + o_n
        j_r = ss * stride_safe
        # selected block of query t_e
        e = tl.minimum(tl.maximum(c - n_s - n_r, 0), TQ * TOPK - 1)
        t_e = e // TOPK
        blk = tl.load(sel_base + t_e * s_st + e % TOPK)
        j_t = blk * BN + o_n
        # window range
        js_w = lo + (c - n_s - n_r - n_t) * BN
        j_w = js_w + o_n
        j = tl.where(is_s, j_s, tl.where(is_r, j_r, tl.where(is_t, j_t, j_w)))
        ok_s = j_s < sink_hi
        ok_r = ss < s_hi
        ok_t = (blk >= 0) & (j_t < lo) & (j_t >= sink) & ((stride == 0) | (j_t % stride_safe != 0))
        # per-row membership in the window range
        local = ((j_w[None, :] > (pos - window)[:, None]) | (j_w < sink)[None, :]) & (j_w[None, :] <= pos[:, None])
        strided = (stride > 0) & (j_w % stride_safe == 0)
        in_sel = tl.sum((b_sel == js_w // BN).to(tl.int32), 1) > 0
        if BRANCH == 0:
            mem_w = local
        elif BRANCH == 1:
            mem_w = strided[None, :] & ~local
        elif BRANCH == 2:
            mem_w = in_sel[:, None] & ~local & ~strided[None, :]
        else:
            mem_w = local | strided[None, :] | in_sel[:, None]
        mem_w = mem_w & (j_w[None, :] <= pos[:, None]) & (j_w < n)[None, :]
        is_w = (c >= n_s + n_r + n_t)
        ok_k = ((is_s & ok_s) | (is_r & ok_r) | (is_t & ok_t) | (is_w & (j_w < n)))
        ok_k = ok_k.to(tl.int32) != 0  # (a fresh boolean: the interpreter keeps some scalar-derived masks as ints)
        row_ok = (r_t == t_e) | (c < n_s + n_r)
        member = ((~is_w & row_ok)[:, None] & ok_k[None, :]) | (is_w & mem_w)
        member = (member & m_r[:, None]).to(tl.int32) != 0
        if HAS_SW:
            member &= (pos[:, None] - j[None, :]) < sliding
        jj = j.to(tl.int64)
        b_k = tl.load(p_k + jj[:, None] * s_kt + o_d[None, :], mask=ok_k[:, None], other=0.0)
        b_v = tl.load(p_v + jj[:, None] * s_vt + o_d[None, :], mask=ok_k[:, None], other=0.0)
        if IEEE:
            s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            s = tl.dot(b_q, tl.trans(b_k))
        s = tl.where(member, s * qk_scale, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(b_m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        b_l = b_l * alpha + tl.sum(p, 1)
        if IEEE:
            b_acc = b_acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v, input_precision="ieee")
        else:
            b_acc = b_acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
        b_m = m_new
    out = (i_bh * NSPLIT + i_s).to(tl.int64) * BM
    tl.store(MP + out + o_r, b_m)
    tl.store(LP + out + o_r, b_l)
    tl.store(OP + (out + o_r)[:, None] * D + o_d[None, :], b_acc)
    if FOLD:  # the split that finishes last merges every split's state (a counter per (sequence, KV head), zero at
        # launch): the barrier and the acq_rel atomic order this program's stores before the count, and the count
        # before the last program's loads
        tl.debug_barrier()
        if tl.atomic_add(CNT + i_bh, 1, sem="acq_rel", scope="gpu") == NSPLIT - 1:
            _merge_splits(OP, MP, LP, O, L, s_ob, s_oh, s_ot, i_bh, i_b, i_kh, NSPLIT, G, TQ, BM, D)


@triton.jit
def _merge_splits_kernel(OP, MP, LP, O, L, s_ob, s_oh, s_ot, HKV, NSPLIT,
                         G: tl.constexpr, TQ: tl.constexpr, BM: tl.constexpr, D: tl.constexpr):
    """The merge as its own launch, one program per (sequence, KV head) (``FOLD`` off: inside a CUDA graph)."""
    i_bh = tl.program_id(0)
    _merge_splits(OP, MP, LP, O, L, s_ob, s_oh, s_ot, i_bh, i_bh // HKV, i_bh % HKV, NSPLIT, G, TQ, BM, D)


# Whether the last split of each decode kernel merges the splits (two Triton launches per step instead of four). Measured on
# the H200 (2026-12-02, tags dec6 / dec7): eager 0.183 -> 0.151 ms at 64K and 0.273 -> 0.184 ms at 1M; replayed from a
# CUDA graph 0.046 -> 0.045 ms at 64K but 0.089 -> 0.108 ms at 1M. So by default it folds unless a CUDA graph is
# being captured; True / False force it (the tests run both).
FOLD_MERGES: bool | None = None


def fold_merges(device: torch.device) -> bool:
    if FOLD_MERGES is not None:
        return FOLD_MERGES
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _rows(q: torch.Tensor) -> torch.Tensor:
    """``q`` as the kernels read it: any batch / head / token strides, unit stride along the head dim (the
    attention module's transposed query already is, so a decode step copies nothing)."""
    return q if q.stride(-1) == 1 else q.contiguous()


def _splits(n_max: int, cfg, tq: int, programs: int, device) -> int:
    chunks = (min(cfg.window, n_max) + cfg.sink_tokens + (n_max // cfg.stride if cfg.stride else 0)) // cfg.block_size
    chunks += tq * cfg.topk + 2
    sms = sm_count(device) if device.type == "cuda" else 4
    want = max(1, (2 * sms) // max(1, programs))
    return int(max(1, min(want, chunks // 4, 64)))


def _run(q, k, v, sel, off, seq_len, n_max, cfg, scale, sliding_window, branch: int, out_dtype):
    """One attention pass (all kinds, or one ``mix`` branch): output ``[B, Hq, Tq, D]`` and the softmax
    denominators ``[B*Hkv, BM]`` (0 where a row attended nothing)."""
    bsz, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    bm = max(16, triton.next_power_of_2(g * tq))
    nsplit = _splits(n_max, cfg, tq, bsz * hkv, q.device)
    dev = q.device
    qc = _rows(q)
    op = empty(bsz * hkv, nsplit, bm, d, dtype=torch.float32, device=dev)
    mp = empty(bsz * hkv, nsplit, bm, dtype=torch.float32, device=dev)
    lp = empty_like(mp)
    out = empty(bsz, hq, tq, d, dtype=out_dtype, device=dev)
    lsum = empty(bsz * hkv, bm, dtype=torch.float32, device=dev)
    fold = fold_merges(dev)
    done = torch.zeros(bsz * hkv, dtype=torch.int32, device=dev) if fold else lp  # splits finished (FOLD only)
    _decode_kernel[(bsz * hkv, nsplit)](
        qc, k, v, sel, off, seq_len, op, mp, lp, done, out, lsum,
        qc.stride(0), qc.stride(1), qc.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sel.stride(0), sel.stride(1), sel.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        hkv, nsplit, scale, cfg.sink_tokens, cfg.window, cfg.stride, sliding_window or 0,
        G=g, TQ=tq, TOPK=max(cfg.topk, 1), TOPK_P2=max(2, triton.next_power_of_2(max(cfg.topk, 1))), D=d,
        BM=bm, BN=cfg.block_size, BRANCH=branch, HAS_SW=sliding_window is not None, IEEE=q.dtype == torch.float32,
        LEN_PTR=isinstance(seq_len, torch.Tensor), FOLD=fold, num_warps=4, num_stages=2,
    )
    if not fold:
        _merge_splits_kernel[(bsz * hkv,)](op, mp, lp, out, lsum, out.stride(0), out.stride(1), out.stride(2), hkv,
                                           nsplit, G=g, TQ=tq, BM=bm, D=d, num_warps=4)
    return out, lsum


@triton.jit
def _merge_splits(OP, MP, LP, O, L, s_ob, s_oh, s_ot, i_bh, i_b, i_kh, NSPLIT,
                  G: tl.constexpr, TQ: tl.constexpr, BM: tl.constexpr, D: tl.constexpr):
    """Merge the splits' partial softmax states of one (sequence, KV head) and write its ``G * Tq`` rows and the
    softmax denominators (loads bypass L1: other programs wrote the states)."""
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
        m_new = tl.maximum(b_m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_old = tl.exp2(b_m - m_safe)
        a_new = tl.exp2(m_s - m_safe)
        b_l = b_l * a_old + l_s * a_new
        b_acc = b_acc * a_old[:, None] + o_s * a_new[:, None]
        b_m = m_new
    out = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    rows = o_r < G * TQ
    r_g, r_t = o_r // TQ, o_r % TQ
    p_o = O + i_b.to(tl.int64) * s_ob + (i_kh * G + r_g).to(tl.int64) * s_oh + r_t.to(tl.int64) * s_ot
    tl.store(p_o[:, None] + o_d[None, :], out.to(O.dtype.element_ty), mask=rows[:, None])
    tl.store(L + i_bh.to(tl.int64) * BM + o_r, b_l)


def decode_attention_triton(q, k, v, sel, off, seq_len, n_max, cfg, scale, sliding_window, mix_weights=None):
    """Attention stage of a decode step with the kernel: ``[B, Hq, Tq, D]``; ``sel [B, Hkv, Tq, topk]`` int32,
    ``off [B]`` int32 row offsets, ``n_max`` the longest row's length (host int)."""
    if cfg.topk == 0:
        sel = torch.full((*sel.shape[:3], 1), -1, dtype=torch.int32, device=sel.device)
    sel = sel.to(torch.int32).contiguous()
    if cfg.combine == "union":
        out, _ = _run(q, k, v, sel, off, seq_len, n_max, cfg, scale, sliding_window, 3, q.dtype)
        return out
    bsz, hq, tq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    weights = resolve_mix_weights(cfg, mix_weights, hq, q.device, torch.float32)
    out = norm = 0
    for i in range(3):
        o_b, lsum = _run(q, k, v, sel, off, seq_len, n_max, cfg, scale, sliding_window, i, torch.float32)
        nonempty = (lsum[:, : g * tq] > 0).view(bsz, hkv, g, tq).reshape(bsz, hq, tq)
        wb = weights[None, :, None, i] * nonempty
        out = out + wb[..., None] * o_b
        norm = norm + wb
    return (out / norm[..., None]).to(q.dtype)


# ---------------------------------------------------------------------------------------------- selection


@triton.jit
def _decode_select_kernel(
    Q, KA, KB, OFF, LEN, VAL, IDX, CNT, SEL,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kn,
    HKV, NB, NSPLIT: tl.constexpr, block, sink, window, sliding,
    G: tl.constexpr, TQ: tl.constexpr, TQP: tl.constexpr, D: tl.constexpr, BNB: tl.constexpr,
    K: tl.constexpr, KP2: tl.constexpr, MINMAX: tl.constexpr, HAS_SW: tl.constexpr, IEEE: tl.constexpr,
    LEN_PTR: tl.constexpr, FOLD: tl.constexpr,
):
    """Top-K eligible summary blocks of each of the ``TQ`` queries of one (sequence, KV head), over split
    ``i_s``'s share of the blocks: scores (max over the GQA group), eligibility and a running top-K in
    registers. Blocks are visited in increasing order and replace the current minimum only when strictly
    greater, so ties keep the lower block index (the reference's stable order)."""
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_kh = i_bh // HKV, i_bh % HKV
    n = _cache_len(LEN, LEN_PTR) - tl.load(OFF + i_b)
    o_t = tl.arange(0, TQP)
    m_t = o_t < TQ
    pos = n - TQ + o_t
    o_d = tl.arange(0, D)
    o_k = tl.arange(0, KP2)
    per = tl.cdiv(tl.cdiv(NB, NSPLIT), BNB) * BNB
    b_lo = i_s * per
    b_hi = tl.minimum(b_lo + per, NB)
    p_ka = KA + i_b.to(tl.int64) * s_kb + i_kh.to(tl.int64) * s_kh
    p_kb = KB + i_b.to(tl.int64) * s_kb + i_kh.to(tl.int64) * s_kh
    p_q = Q + i_b.to(tl.int64) * s_qb + (i_kh * G).to(tl.int64) * s_qh + o_t[:, None] * s_qt + o_d[None, :]
    top_v = tl.where(o_k[None, :] < K, float("-inf"), float("inf")) + tl.zeros([TQP, KP2], tl.float32)
    top_i = tl.full([TQP, KP2], -1, tl.int32)
    for b0 in range(b_lo, b_hi, BNB):
        o_b = b0 + tl.arange(0, BNB)
        m_b = o_b < b_hi
        p_k = o_b[:, None].to(tl.int64) * s_kn + o_d[None, :]
        b_ka = tl.load(p_ka + p_k, mask=m_b[:, None], other=0.0)
        if MINMAX:
            b_kb = tl.load(p_kb + p_k, mask=m_b[:, None], other=0.0)
        best = tl.full([TQP, BNB], float("-inf"), tl.float32)
        for g in tl.static_range(G):
            b_q = tl.load(p_q + g * s_qh, mask=m_t[:, None], other=0.0)
            if MINMAX:
                zero = tl.zeros_like(b_q)
                q_pos = tl.maximum(b_q, zero).to(b_ka.dtype)
                q_neg = tl.minimum(b_q, zero).to(b_ka.dtype)
                if IEEE:
                    sc = tl.dot(q_pos, tl.trans(b_ka), input_precision="ieee")
                    sc += tl.dot(q_neg, tl.trans(b_kb), input_precision="ieee")
                else:
                    sc = tl.dot(q_pos, tl.trans(b_ka))
                    sc += tl.dot(q_neg, tl.trans(b_kb))
            else:
                if IEEE:
                    sc = tl.dot(b_q.to(b_ka.dtype), tl.trans(b_ka), input_precision="ieee")
                else:
                    sc = tl.dot(b_q.to(b_ka.dtype), tl.trans(b_ka))
            best = tl.maximum(best, sc)
        b_end = o_b * block + block - 1
        hi = pos - window
        ok = (b_end[None, :] <= pos[:, None]) & ((o_b * block)[None, :] <= hi[:, None])
        ok &= (b_end >= sink)[None, :] & (sink <= hi)[:, None] & m_b[None, :] & m_t[:, None]
        if HAS_SW:
            ok &= b_end[None, :] > (pos - sliding)[:, None]
        best = tl.where(ok, best, float("-inf"))
        top_v, top_i = merge_topk(top_v, top_i, best, b0, o_k, K, BNB)
    top_v = tl.where(o_k[None, :] < K, top_v, float("-inf"))
    # candidates laid out [B*Hkv, TQP, NSPLIT * KP2] for the merge
    p_c = i_bh.to(tl.int64) * TQP * NSPLIT * KP2 + o_t[:, None] * NSPLIT * KP2 + i_s * KP2 + o_k[None, :]
    tl.store(VAL + p_c, top_v)
    tl.store(IDX + p_c, top_i)
    if FOLD:  # the split that finishes last merges the candidates (a counter per (sequence, KV head), zero at launch)
        tl.debug_barrier()
        if tl.atomic_add(CNT + i_bh, 1, sem="acq_rel", scope="gpu") == NSPLIT - 1:
            _topk_merge(VAL, IDX, SEL, i_bh, NSPLIT * KP2, TQ, TQP, K)


@triton.jit
def _decode_topk_merge_kernel(VAL, IDX, SEL, NC: tl.constexpr, TQ: tl.constexpr, TQP: tl.constexpr, K: tl.constexpr):
    """The top-k merge as its own launch, one program per (sequence, KV head) (``FOLD`` off)."""
    _topk_merge(VAL, IDX, SEL, tl.program_id(0), NC, TQ, TQP, K)


@triton.jit
def _topk_merge(VAL, IDX, SEL, i_bh, NC: tl.constexpr, TQ: tl.constexpr, TQP: tl.constexpr, K: tl.constexpr):
    """The K best of the splits' candidates ``[TQP, NC]`` of one (sequence, KV head): highest score first,
    ties to the lower block index; ``-1`` where fewer are eligible. Writes ``SEL [.., TQ, K]`` (loads bypass L1:
    other programs wrote the candidates)."""
    o_t = tl.arange(0, TQP)
    o_c = tl.arange(0, NC)
    base = i_bh.to(tl.int64) * TQP * NC
    v = tl.load(VAL + base + o_t[:, None] * NC + o_c[None, :], cache_modifier=".cg")
    ix = tl.load(IDX + base + o_t[:, None] * NC + o_c[None, :], cache_modifier=".cg")
    p_out = SEL + i_bh.to(tl.int64) * TQ * K + o_t * K
    for r in tl.static_range(K):
        c_v = tl.max(v, 1)
        c_i = tl.min(tl.where(v == c_v[:, None], ix, 2147483647), 1)
        tl.store(p_out + r, tl.where(c_v > float("-inf"), c_i, -1), mask=o_t < TQ)
        v = tl.where((ix == c_i[:, None]) & (v == c_v[:, None]), float("-inf"), v)


def decode_select_triton(q, summaries, off, seq_len, cfg, sliding_window) -> torch.Tensor:
    """Top-k blocks ``[B, Hkv, Tq, topk]`` int32 (-1 where fewer are eligible) of the decode queries
    ``q [B, Hq, Tq, D]`` from the summaries ``(kmin, kmax, kmean)`` (each ``[B, Hkv, nb, D]``): the blocks are
    split over ``NSPLIT`` programs per (sequence, KV head), each keeps its top-k, the last to finish merges (or a
    merge kernel: ``fold_merges``)."""
    bsz, hq, tq, d = q.shape
    kmin, kmax, kmean = summaries
    _, hkv, nb, _ = kmin.shape
    dev = q.device
    sel = empty(bsz, hkv, tq, cfg.topk, dtype=torch.int32, device=dev)
    if nb == 0 or cfg.topk == 0:
        return sel.fill_(-1)
    minmax = cfg.score == "minmax"
    ka, kb = (kmax, kmin) if minmax else (kmean, kmean)
    bnb = 64
    sms = sm_count(dev) if dev.type == "cuda" else 4
    nsplit = max(1, min(triton.next_power_of_2(max(1, (2 * sms) // (bsz * hkv))), triton.next_power_of_2(triton.cdiv(nb, 4 * bnb)), 64))
    tqp = max(16, triton.next_power_of_2(tq))
    kp2 = max(2, triton.next_power_of_2(cfg.topk))
    val = empty(bsz * hkv, tqp, nsplit * kp2, dtype=torch.float32, device=dev)
    idx = empty(bsz * hkv, tqp, nsplit * kp2, dtype=torch.int32, device=dev)
    fold = fold_merges(dev)
    done = torch.zeros(bsz * hkv, dtype=torch.int32, device=dev) if fold else idx  # splits finished (FOLD only)
    qc = _rows(q)
    _decode_select_kernel[(bsz * hkv, nsplit)](
        qc, ka, kb, off, seq_len, val, idx, done, sel,
        qc.stride(0), qc.stride(1), qc.stride(2), ka.stride(0), ka.stride(1), ka.stride(2),
        hkv, nb, nsplit, cfg.block_size, cfg.sink_tokens, cfg.window, sliding_window or 0,
        G=hq // hkv, TQ=tq, TQP=tqp, D=d, BNB=bnb, K=cfg.topk, KP2=kp2, MINMAX=minmax,
        HAS_SW=sliding_window is not None, IEEE=q.dtype == torch.float32, LEN_PTR=isinstance(seq_len, torch.Tensor),
        FOLD=fold, num_warps=4,
    )
    if not fold:
        _decode_topk_merge_kernel[(bsz * hkv,)](val, idx, sel, NC=nsplit * kp2, TQ=tq, TQP=tqp, K=cfg.topk, num_warps=4)
    return sel


def decode_exact_scores_triton(q, short, k_cache, off, block_size: int) -> torch.Tensor:
    """``decode.decode_exact_scores`` with the exact-score kernel: ``short [B, Hkv, Tq, S]`` -> same shape, fp32."""
    bsz, hq, tq, _ = q.shape
    hkv = k_cache.shape[1]
    b = torch.arange(bsz, device=q.device, dtype=torch.int64)
    q_rows = (b[:, None] * q.stride(0) + torch.arange(tq, device=q.device)[None, :] * q.stride(2)).flatten()
    k_rows = (b * k_cache.stride(0) + off.long() * k_cache.stride(2))[:, None].expand(bsz, tq).flatten()
    listed = short.permute(1, 0, 2, 3).reshape(hkv, bsz * tq, -1)
    exact = exact_scores_triton(_rows(q), q_rows, k_cache, k_rows, listed, hq // hkv, block_size)
    return exact.view(hkv, bsz, tq, -1).permute(1, 0, 2, 3)


def sparsex_decode_triton(q, k_cache, v_cache, summaries, offsets, seq_len: int, max_doc_len: int,
                          cfg: SparseXConfig, *, scale: float, sliding_window=None, mix_weights=None,
                          anchor=None) -> torch.Tensor:
    """A decode step with the kernels (same contract as ``decode.sparsex_decode_torch``): selection (one kernel whose
    last split merges the top-k; the ``"hybrid"`` score selects with the torch code, same rule) and the split-K
    attention (one kernel whose last split merges the splits): two Triton launches, each after zeroing its
    split counters (four Triton launches inside a CUDA graph, no counters)."""
    off = offsets if offsets.dtype == torch.int32 else offsets.to(torch.int32)
    if cfg.score == "hybrid":
        sel = decode_select(q, decode_positions(off, seq_len, q.shape[2]), summaries, cfg, sliding_window)
    elif cfg.rerank:  # the shortlist by the selection kernels, then the exact second stage on the shortlisted keys
        short = decode_select_triton(q, summaries, off, seq_len, shortlist_config(cfg),
                                     sliding_window).long()
        if anchor is not None and cfg.anchor:
            pos = decode_positions(off, seq_len, q.shape[2])
            short = add_anchor(short, anchor, pos, summaries[0].shape[2], cfg, sliding_window)
        sel = rerank_blocks(short, decode_exact_scores_triton(q, short, k_cache, off, cfg.block_size), cfg.topk)
    else:
        sel = decode_select_triton(q, summaries, off, seq_len, cfg, sliding_window)
    return decode_attention_triton(q, k_cache, v_cache, sel, off, seq_len, max_doc_len, cfg, scale, sliding_window,
                                   mix_weights)

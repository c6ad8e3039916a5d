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
``combine`` merges the splits. ``combine="mix"`` runs the kernel once per branch (``BRANCH`` 0/1/2 keeps
only the local / stride / selected keys) and weights the branch outputs as the reference does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .naive import _resolve_mix_weights


@triton.jit
def _decode_kernel(
    Q, K, V, SEL, OFF, NDOC, OP, MP, LP,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_sb, s_sh, s_st,
    HKV, NSPLIT, scale, sink, window, stride, sliding,
    G: tl.constexpr, TQ: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BRANCH: tl.constexpr, HAS_SW: tl.constexpr, IEEE: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_kh = i_bh // HKV, i_bh % HKV
    off = tl.load(OFF + i_b).to(tl.int64)
    n = tl.load(NDOC + i_b)
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


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(layer, cfg, tq: int, programs: int, device) -> int:
    n_max = max(layer.get_seq_length() - off for off in layer.offsets)
    chunks = (min(cfg.window, n_max) + cfg.sink_tokens + (n_max // cfg.stride if cfg.stride else 0)) // cfg.block_size
    chunks += tq * cfg.topk + 2
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    want = max(1, (2 * sms) // max(1, programs))
    return int(max(1, min(want, chunks // 4, 64)))


def _run(q, layer, sel, cfg, scale, sliding_window, branch: int):
    bsz, hq, tq, d = q.shape
    k, v = layer.keys, layer.values
    hkv = k.shape[1]
    g = hq // hkv
    bm = max(16, triton.next_power_of_2(g * tq))
    nsplit = _splits(layer, cfg, tq, bsz * hkv, q.device)
    dev = q.device
    off64 = layer.offsets_tensor(dev)
    off = off64.to(torch.int32)
    ndoc = (layer.get_seq_length() - off64).to(torch.int32)
    sel32 = sel.to(torch.int32).contiguous()
    qc = q.contiguous()
    op = torch.empty(bsz * hkv, nsplit, bm, d, dtype=torch.float32, device=dev)
    mp = torch.empty(bsz * hkv, nsplit, bm, dtype=torch.float32, device=dev)
    lp = torch.empty_like(mp)
    _decode_kernel[(bsz * hkv, nsplit)](
        qc, k, v, sel32, off, ndoc, op, mp, lp,
        qc.stride(0), qc.stride(1), qc.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sel32.stride(0), sel32.stride(1), sel32.stride(2),
        hkv, nsplit, scale, cfg.sink_tokens, cfg.window, cfg.stride, sliding_window or 0,
        G=g, TQ=tq, TOPK=max(cfg.topk, 1), TOPK_P2=max(2, triton.next_power_of_2(max(cfg.topk, 1))), D=d,
        BM=bm, BN=cfg.block_size, BRANCH=branch, HAS_SW=sliding_window is not None, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    # merge the splits
    m = mp.amax(1, keepdim=True)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w = torch.exp2(mp - m_safe)
    lsum = (lp * w).sum(1)  # [B*Hkv, BM]
    acc = (op * w[..., None]).sum(1)
    rows = g * tq
    acc, lsum = acc[:, :rows], lsum[:, :rows]
    out = acc / lsum.clamp(min=1e-30)[..., None]
    out = out.view(bsz, hkv, g, tq, d).reshape(bsz, hq, tq, d)
    nonempty = (lsum > 0).view(bsz, hkv, g, tq).reshape(bsz, hq, tq)
    return out, nonempty


def decode_attention_triton(q, layer, pos, sel, cfg, scale, sliding_window, mix_weights=None):
    """Attention stage of a decode step with the kernel: ``[B, Hq, Tq, D]``."""
    if cfg.topk == 0:
        sel = torch.full((*sel.shape[:3], 1), -1, dtype=sel.dtype, device=sel.device)
    if cfg.combine == "union":
        out, _ = _run(q, layer, sel, cfg, scale, sliding_window, branch=3)
        return out.to(q.dtype)
    hq = q.shape[1]
    weights = _resolve_mix_weights(cfg, mix_weights, hq, q.device, torch.float32)
    out = norm = 0
    for i in range(3):
        o_b, nonempty = _run(q, layer, sel, cfg, scale, sliding_window, branch=i)
        wb = weights[None, :, None, i] * nonempty
        out = out + wb[..., None] * torch.where(nonempty[..., None], o_b, torch.zeros_like(o_b))
        norm = norm + wb
    return (out / norm[..., None]).to(q.dtype)

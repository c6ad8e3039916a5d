"""Triton prefill kernels: Sparse-X attention forward (output + log-sum-exp) and backward.

One program handles one query tile (``BM`` positions of one document) of one query head; programs are
ordered head-fastest so the ``G`` heads of a KV head read the same keys from L2. The key set of the tile
is visited in four disjoint loops feeding one online softmax (docs/spec.md, 'union'):

  B  sink keys below the window range              (all rows)
  C  stride keys below the window range            (all rows; strided row loads)
  D  the tile's selected blocks below the window   (rows that selected the block; sink/stride keys excluded)
  A  the window range ``[lo, p_last]``, block aligned (per row: local | sink | stride | selected, causal)

Keys below ``lo`` are causal for every row and outside every row's window, so B, C and D need no
causal mask. Branch flags (``USE_LOCAL/STRIDE/TOPK``) restrict membership for ``combine="mix"``, whose
branches are three launches merged outside. The same kernel with ``BACKWARD`` recomputes the scores
and produces dQ, and adds dK, dV into fp32 buffers with atomics.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import empty, empty_like  # module-level names: tests poison them (NaN) to catch unwritten elements
from triton.runtime.errors import OutOfResources

from ..rules.layout import KernelLayout
from .tuning import device_name, overridden, tile_shape

logger = logging.getLogger(__name__)

# (GPU, pass, head dim, dtype, block size) -> the launch shape used where the table's needs more shared memory than
# the card has: found at the first launch that did not fit, then used from the start
_fitted: dict[tuple, dict] = {}


class TileDoesNotFit(Exception):
    """The launch shape asked for more shared memory than the card has; a smaller one is recorded: build the
    layout again (``launch_tile``) and launch again."""


def _fit_key(q: torch.Tensor, block_size: int, kind: str) -> tuple:
    return device_name(q.device), kind, q.shape[-1], q.dtype, block_size


def launch_tile(q: torch.Tensor, block_size: int, backward: bool = False) -> dict:
    """The attention kernel's launch shape for ``q`` (its GPU, head dim and dtype) and ``block_size``: the table's
    (tuning.py), or where that one did not fit the card's shared memory, the smaller one recorded then."""
    kind = "bwd" if backward else "fwd"
    table = tile_shape(q.device, kind, head_dim=q.shape[-1], dtype=q.dtype, block_size=block_size)
    if overridden(kind):
        return table
    return _fitted.get(_fit_key(q, block_size, kind)) or table


def block_m(q: torch.Tensor, block_size: int, backward: bool = False) -> int:
    """Query rows per program for ``q`` and ``block_size`` (``launch_tile``)."""
    return launch_tile(q, block_size, backward)["block_m"]


def smaller_tile(tile: dict, block_size: int) -> dict | None:
    """The next launch shape to try when ``tile`` needs too much shared memory: one pipeline stage fewer, else half
    the unmasked window chunk (while it is wider than a block), else half the query rows (not below 16); None when
    ``tile`` is the smallest."""
    if tile["num_stages"] > 1:
        return dict(tile, num_stages=tile["num_stages"] - 1)
    if tile["window_n"] > max(16, block_size):
        return dict(tile, window_n=tile["window_n"] // 2)
    if tile["block_m"] > 16:
        return dict(tile, block_m=tile["block_m"] // 2)
    return None


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_kv(p_k, p_v, j, m_k, s_kt, s_vt, D: tl.constexpr):
    """Keys and values ``j`` (rows outside ``m_k`` are zeros)."""
    o_d = tl.arange(0, D)
    b_k = tl.load(p_k + j[:, None].to(tl.int64) * s_kt + o_d[None, :], mask=m_k[:, None], other=0.0)
    b_v = tl.load(p_v + j[:, None].to(tl.int64) * s_vt + o_d[None, :], mask=m_k[:, None], other=0.0)
    return b_k, b_v


@triton.jit
def _chunk(b_q, b_k, b_v, j, m_k, member, qk_scale, scale,
           b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv,
           D: tl.constexpr, BACKWARD: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr = True):
    """One chunk of keys ``j`` (tiles ``b_k``, ``b_v``; mask ``m_k``) for the rows of a tile (``member [BM, BN]``;
    ``MASKED=False``: every key is a member of every row, no mask arithmetic)."""
    o_d = tl.arange(0, D)
    s = _dot(b_q, tl.trans(b_k), IEEE) * qk_scale
    if BACKWARD:
        p = tl.exp2(s - b_lse[:, None])
        if MASKED:
            p = tl.where(member, p, 0.0)
        dp = _dot(b_do, tl.trans(b_v), IEEE)
        ds = p * (dp - b_delta[:, None])
        b_dq += _dot(ds.to(b_k.dtype), b_k, IEEE)
        dv = _dot(tl.trans(p.to(b_do.dtype)), b_do, IEEE)
        dk = _dot(tl.trans(ds.to(b_q.dtype)), b_q, IEEE) * scale
        off = j[:, None].to(tl.int64) * D + o_d[None, :]
        tl.atomic_add(p_dv + off, dv, mask=m_k[:, None], sem="relaxed")
        tl.atomic_add(p_dk + off, dk, mask=m_k[:, None], sem="relaxed")
    else:
        if MASKED:
            s = tl.where(member, s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(b_m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        b_l = b_l * alpha + tl.sum(p, 1)
        b_acc = b_acc * alpha[:, None] + _dot(p.to(b_v.dtype), b_v, IEEE)
        b_m = m_new
    return b_m, b_l, b_acc, b_dq


@triton.jit
def _window_chunk(js, b_q, p_k, p_v, pos, m_r, b_sel, p_last, sink, window, stride_safe, has_stride, sliding,
                  s_kt, s_vt, qk_scale, scale, b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv,
                  BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, USE_LOCAL: tl.constexpr,
                  USE_STRIDE: tl.constexpr, USE_TOPK: tl.constexpr, HAS_SW: tl.constexpr, BACKWARD: tl.constexpr,
                  IEEE: tl.constexpr):
    """A chunk of the window range with per-row membership: local | sink | stride | selected, causal."""
    j = js + tl.arange(0, BN)
    m_k = j <= p_last
    local = (j[None, :] > (pos - window)[:, None]) | (j < sink)[None, :]
    strided = has_stride & (j % stride_safe == 0)
    member = tl.zeros([BM, BN], dtype=tl.int1)
    if USE_LOCAL:
        member |= local
    if USE_STRIDE:
        member |= strided[None, :] & ~local
    if USE_TOPK:
        in_sel = tl.sum((b_sel == js // BN).to(tl.int32), 1) > 0
        member |= in_sel[:, None] & ~local & ~strided[None, :]
    member &= (j[None, :] <= pos[:, None]) & m_r[:, None] & m_k[None, :]
    if HAS_SW:
        member &= (pos[:, None] - j[None, :]) < sliding
    b_k, b_v = _load_kv(p_k, p_v, j, m_k, s_kt, s_vt, D)
    return _chunk(b_q, b_k, b_v, j, m_k, member, qk_scale, scale,
                  b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv, D, BACKWARD, IEEE)


@triton.jit
def _sparsex_kernel(
    Q, K, V, O, LSE, DO, DELTA, DQ, DK, DV, SEL, UNION, UCOUNT, TILES,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_lb, s_lh, s_sb, s_sh, s_st, s_ut, s_uh,
    HQ, HKV, TK, scale, sink, window, stride, sliding,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, TOPK: tl.constexpr,
    TOPK_P2: tl.constexpr,
    USE_LOCAL: tl.constexpr, USE_STRIDE: tl.constexpr, USE_TOPK: tl.constexpr, HAS_SW: tl.constexpr,
    BACKWARD: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # offsets reach past 2**31 at 10M tokens: index in int64
    i_t, i_h = pid // HQ, pid % HQ
    i_kh = i_h // G
    i_b = tl.load(TILES + i_t * 5).to(tl.int64)
    q_row0 = tl.load(TILES + i_t * 5 + 1)
    k_col0 = tl.load(TILES + i_t * 5 + 2)
    p0 = tl.load(TILES + i_t * 5 + 3)
    n_q = tl.load(TILES + i_t * 5 + 4)
    qk_scale = scale * 1.4426950408889634

    o_r = tl.arange(0, BM)
    m_r = o_r < n_q
    pos = p0 + o_r
    o_d = tl.arange(0, D)
    rows = (q_row0 + o_r).to(tl.int64)
    q_off = i_b * s_qb + i_h * s_qh + rows[:, None] * s_qt + o_d[None, :]
    b_q = tl.load(Q + q_off, mask=m_r[:, None], other=0.0)
    p_k = K + i_b * s_kb + i_kh * s_kh + k_col0.to(tl.int64) * s_kt
    p_v = V + i_b * s_vb + i_kh * s_vh + k_col0.to(tl.int64) * s_vt
    o_s = tl.arange(0, TOPK_P2)
    b_sel = tl.load(SEL + i_b * s_sb + i_kh * s_sh + rows[:, None] * s_st + o_s[None, :],
                    mask=m_r[:, None] & (o_s[None, :] < TOPK), other=-1)
    p_last = p0 + n_q - 1
    lo = tl.maximum(p0 - window + 1, 0) // BN * BN
    has_stride = stride > 0
    stride_safe = tl.maximum(stride, 1)

    kv_row = (i_b * HKV + i_kh) * TK + k_col0
    p_dk = DK + kv_row * D
    p_dv = DV + kv_row * D
    l_off = i_b * s_lb + i_h * s_lh + rows
    # the accumulators of the pass not taken are [1]-sized dummies
    if BACKWARD:
        b_do = tl.load(DO + q_off, mask=m_r[:, None], other=0.0)
        b_lse = tl.load(LSE + l_off, mask=m_r, other=0.0) * 1.4426950408889634
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)  # rows with no key: p = 0
        b_delta = tl.load(DELTA + l_off, mask=m_r, other=0.0)
        b_dq = tl.zeros([BM, D], dtype=tl.float32)
        b_m = tl.zeros([1], dtype=tl.float32)
        b_l = tl.zeros([1], dtype=tl.float32)
        b_acc = tl.zeros([1, 1], dtype=tl.float32)
    else:
        b_m = tl.full([BM], float("-inf"), tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        b_acc = tl.zeros([BM, D], dtype=tl.float32)
        b_do = tl.zeros([1, 1], dtype=tl.float32)
        b_lse = tl.zeros([1], dtype=tl.float32)
        b_delta = tl.zeros([1], dtype=tl.float32)
        b_dq = tl.zeros([1, 1], dtype=tl.float32)

    o_n = tl.arange(0, BN)
    # B: sink keys below the window range
    if USE_LOCAL:
        hi = tl.minimum(sink, lo)
        for js in range(0, hi, BN):
            j = js + o_n
            m_k = j < hi
            member = m_r[:, None] & m_k[None, :]
            if HAS_SW:
                member &= (pos[:, None] - j[None, :]) < sliding
            b_k, b_v = _load_kv(p_k, p_v, j, m_k, s_kt, s_vt, D)
            b_m, b_l, b_acc, b_dq = _chunk(b_q, b_k, b_v, j, m_k, member, qk_scale, scale,
                                           b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv, D, BACKWARD, IEEE)
    # C: stride keys in [sink, lo)
    if USE_STRIDE:
        if has_stride:
            s_lo = (sink + stride_safe - 1) // stride_safe
            s_hi = (lo + stride_safe - 1) // stride_safe
            for ss in range(s_lo, s_hi, BN):
                idx = ss + o_n
                m_k = idx < s_hi
                j = idx * stride_safe
                member = m_r[:, None] & m_k[None, :]
                if HAS_SW:
                    member &= (pos[:, None] - j[None, :]) < sliding
                b_k, b_v = _load_kv(p_k, p_v, j, m_k, s_kt, s_vt, D)
                b_m, b_l, b_acc, b_dq = _chunk(b_q, b_k, b_v, j, m_k, member, qk_scale, scale,
                                               b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv, D, BACKWARD, IEEE)
    # D: selected blocks below the window range (the union of the tile's rows, sorted)
    if USE_TOPK:
        u_off = i_t * s_ut + i_kh * s_uh
        n_u = tl.load(UCOUNT + i_t * HKV + i_kh)
        for u in range(0, n_u):
            blk = tl.load(UNION + u_off + u)
            j = blk * BN + o_n  # int32 (a block index times 64 stays below 2**31); _load_kv widens the address
            m_k = j >= 0
            in_sel = tl.sum((b_sel == blk).to(tl.int32), 1) > 0
            keep = (j >= sink) & ((stride == 0) | (j % stride_safe != 0))
            member = (m_r & in_sel)[:, None] & keep[None, :]
            if HAS_SW:
                member &= (pos[:, None] - j[None, :]) < sliding
            b_k, b_v = _load_kv(p_k, p_v, j, m_k, s_kt, s_vt, D)
            b_m, b_l, b_acc, b_dq = _chunk(b_q, b_k, b_v, j, m_k, member, qk_scale, scale,
                                           b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv, D, BACKWARD, IEEE)
    # A: the window range [lo, p_last]. Chunks in [full_lo, full_hi) lie in every row's window and are causal
    # for every row: with the local set on, all their keys are members (no mask); without it, none are.
    end = p_last + 1
    full_lo = (tl.maximum(p_last - window + 1, 0) + BN - 1) // BN * BN
    full_hi = (p0 + 1) // BN * BN
    if HAS_SW:
        full_hi = full_lo  # the sliding window cuts into the window: mask everything
    has_full = full_lo < full_hi
    m1_end = tl.where(has_full, full_lo, end)
    m2_start = tl.where(has_full, full_hi, end)
    for js in range(lo, m1_end, BN):
        b_m, b_l, b_acc, b_dq = _window_chunk(
            js, b_q, p_k, p_v, pos, m_r, b_sel, p_last, sink, window, stride_safe, has_stride, sliding,
            s_kt, s_vt, qk_scale, scale, b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv,
            BM, BN, D, USE_LOCAL, USE_STRIDE, USE_TOPK, HAS_SW, BACKWARD, IEEE)
    if USE_LOCAL:  # BW keys per chunk (a multiple of BN), then the rest BN at a time
        full_w = full_lo + tl.maximum(full_hi - full_lo, 0) // BW * BW
        for js in range(full_lo, full_w, BW):
            j = js + tl.arange(0, BW)
            b_k, b_v = _load_kv(p_k, p_v, j, j >= 0, s_kt, s_vt, D)
            b_m, b_l, b_acc, b_dq = _chunk(b_q, b_k, b_v, j, j >= 0, m_r[:, None], qk_scale, scale,
                                           b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv, D, BACKWARD,
                                           IEEE, MASKED=False)
        for js in range(full_w, tl.maximum(full_hi, full_w), BN):
            j = js + o_n
            b_k, b_v = _load_kv(p_k, p_v, j, j >= 0, s_kt, s_vt, D)
            b_m, b_l, b_acc, b_dq = _chunk(b_q, b_k, b_v, j, j >= 0, m_r[:, None], qk_scale, scale,
                                           b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv, D, BACKWARD,
                                           IEEE, MASKED=False)
    for js in range(m2_start, end, BN):
        b_m, b_l, b_acc, b_dq = _window_chunk(
            js, b_q, p_k, p_v, pos, m_r, b_sel, p_last, sink, window, stride_safe, has_stride, sliding,
            s_kt, s_vt, qk_scale, scale, b_m, b_l, b_acc, b_do, b_lse, b_delta, b_dq, p_dk, p_dv,
            BM, BN, D, USE_LOCAL, USE_STRIDE, USE_TOPK, HAS_SW, BACKWARD, IEEE)

    if BACKWARD:
        tl.store(DQ + q_off, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_r[:, None])
    else:
        nonempty = b_l > 0
        b_o = b_acc / tl.where(nonempty, b_l, 1.0)[:, None]
        tl.store(O + q_off, b_o.to(O.dtype.element_ty), mask=m_r[:, None])
        lse = tl.where(nonempty, (b_m + tl.log2(tl.where(nonempty, b_l, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + l_off, lse, mask=m_r)


def tile_union(sel: torch.Tensor, layout: KernelLayout, window: int, block_size: int, select_tile: int):
    """Per kernel tile and KV head, the sorted distinct blocks its rows selected that lie wholly below the
    window range ``lo``: ``union [n_tiles, Hkv, U]`` int32 and ``count [n_tiles, Hkv]`` int32."""
    tiles = layout.tiles.long()
    n_tiles, hkv, topk = tiles.shape[0], sel.shape[1], sel.shape[3]
    bm = layout.block_m
    per_tile = topk * max(1, -(-bm // select_tile))
    if n_tiles == 0 or topk == 0:  # no query row belongs to a document (all padding), or no top-k
        zeros = torch.zeros(n_tiles, hkv, 0, dtype=torch.int32, device=sel.device)
        return zeros, torch.zeros(n_tiles, hkv, dtype=torch.int32, device=sel.device)
    if select_tile >= bm:  # one selection for the whole kernel tile: its first row says it
        rows = tiles[:, 1:2]
    else:
        r = torch.arange(bm, device=sel.device)
        rows = torch.where(r[None] < tiles[:, 4:5], tiles[:, 1:2] + r[None], tiles[:, 1:2])
    picked = sel.permute(0, 2, 1, 3)[tiles[:, 0:1], rows]  # [n_tiles, rows, Hkv, topk]
    lo_blk = torch.clamp(tiles[:, 3] - window + 1, min=0) // block_size  # lo // BN
    sentinel = torch.iinfo(torch.int32).max
    x = picked.permute(0, 2, 1, 3).reshape(n_tiles, hkv, -1).long()
    bad = (x < 0) | (x >= lo_blk[:, None, None])
    x = torch.where(bad, sentinel, x)
    x, _ = torch.sort(x, -1)
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.where(dup, sentinel, x)
    x, _ = torch.sort(x, -1)
    count = (x < sentinel).sum(-1).to(torch.int32)
    width = min(per_tile, x.shape[-1])
    return x[..., :width].to(torch.int32).contiguous(), count.contiguous()


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dimension of size > 1 (what the kernel's offsets use)."""
    return a.shape == b.shape and all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


def attend(q, k, v, sel, layout: KernelLayout, union, count, *, scale, sink, window, stride, sliding_window,
           block_size, flags=(True, True, True)):
    """Forward: ``o [B, Hq, Tq, D]`` (q dtype) and ``lse [B, Hq, Tq]`` (fp32, natural log, -inf = no key)."""
    bsz, hq, tq, d = q.shape
    o = empty_like(q)  # q's strides (the kernel writes o through them)
    assert same_layout(o, q), "q must be a dense permutation of a contiguous layout (see _strided_ok)"
    lse = empty(bsz, hq, tq, device=q.device, dtype=torch.float32)
    if layout.padded:  # rows of no document: zeros (the spec), lse -inf
        o.zero_()
        lse.fill_(float("-inf"))
    _launch(q, k, v, o, lse, None, None, None, None, None, sel, union, count, layout, scale, sink, window, stride,
            sliding_window, block_size, flags, backward=False)
    return o, lse


def attend_backward(q, k, v, o, lse, do, sel, layout, union, count, *, scale, sink, window, stride, sliding_window,
                    block_size, flags=(True, True, True)):
    # q, o, do and dq are read and written through q's strides (a [B, H, T, D] view of [B, T, H, D] is read
    # in place); delta shares lse's contiguous [B, H, T] layout
    if not same_layout(do, q):
        do = empty_like(q).copy_(do)
    if not same_layout(o, q):
        o = empty_like(q).copy_(o)
    delta = (do.float() * o.float()).sum(-1).contiguous()
    dq = torch.zeros_like(q) if layout.padded else empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    _launch(q, k, v, o, lse, do, delta, dq, dk, dv, sel, union, count, layout, scale, sink, window,
            stride, sliding_window, block_size, flags, backward=True)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _launch(q, k, v, o, lse, do, delta, dq, dk, dv, sel, union, count, layout, scale, sink, window, stride,
            sliding_window, block_size, flags, backward):
    bsz, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    n_tiles = layout.tiles.shape[0]
    if n_tiles == 0:
        return
    topk = sel.shape[-1]
    dummy = lse
    grid = (n_tiles * hq,)
    tile = launch_tile(q, block_size, backward)
    if tile["block_m"] != layout.block_m:
        raise ValueError(f"layout built for block_m={layout.block_m}, the {'backward' if backward else 'forward'} tile "
                         f"on {q.device} has block_m={tile['block_m']}: build the layout with prefill.block_m(q, ...)")
    try:
        _sparsex_kernel[grid](
            q, k, v, o, lse, do if backward else q, delta if backward else dummy, dq if backward else q,
            dk if backward else dummy, dv if backward else dummy, sel, union, count, layout.tiles,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), lse.stride(0), lse.stride(1),
            sel.stride(0), sel.stride(1), sel.stride(2), union.stride(0), union.stride(1),
            hq, hkv, tk, scale, sink, window, stride, sliding_window or 0,
            G=hq // hkv, D=d, BM=layout.block_m, BN=block_size, BW=max(tile["window_n"], block_size), TOPK=topk,
            TOPK_P2=max(triton.next_power_of_2(max(topk, 1)), 2),
            USE_LOCAL=flags[0], USE_STRIDE=flags[1], USE_TOPK=flags[2] and topk > 0, HAS_SW=sliding_window is not None,
            BACKWARD=backward, IEEE=q.dtype == torch.float32,
            num_warps=tile["num_warps"], num_stages=tile["num_stages"],
        )
    except OutOfResources as e:
        kind = "bwd" if backward else "fwd"
        smaller = None if overridden(kind) else smaller_tile(tile, block_size)
        if smaller is None:
            raise ValueError(f"the {'backward' if backward else 'forward'} kernel's smallest launch shape {tile} does "
                             f"not fit {device_name(q.device)} (head dim {d}, {q.dtype}, block_size {block_size}): "
                             f"{e}") from e
        _fitted[_fit_key(q, block_size, kind)] = smaller
        logger.warning("sparsex: the %s tile %s needs more shared memory than %s has (head dim %d, %s, block_size "
                       "%d); trying %s", kind, tile, device_name(q.device), d, q.dtype, block_size, smaller)
        raise TileDoesNotFit from e

"""The torch backend's attention stage: each query tile's keys gathered, then one SDPA call per chunk of tiles.

The reference (``reference/naive.py``) evaluates the key sets as predicates over every causal key, so it costs
more than dense attention; this computes the same function (``combine="union"``: one softmax over the union of
sink, window, stride and the selected blocks) over the keys the sets hold. Per tile of ``TILE_ROWS`` queries the
union of its rows' key sets is listed (ascending key positions, at most ``sink + window + rows + keys / stride +
topk * rows * block_size`` of them), the keys and values at those positions are gathered, and SDPA attends with a
``[rows, listed keys]`` mask saying which listed keys each row's own set holds. Memory is bounded by
``tile_elements`` per chunk of tiles, never ``[Tq, Tk]``. Gradients flow through the gather and SDPA.

Used by ``sparsex_attention(backend="torch")`` for calls without stats, with the selection stage's own blocks
(those are complete and causal for their query, so a block's keys are all in the set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...config import SparseXConfig
from .reference.naive import TILE_ELEMENTS, select_document
from .rules.common import block_summaries
from .rules.documents import split_documents

TILE_ROWS = 64


def sparsex_attention_gathered(q, k, v, cfg: SparseXConfig, *, scale: float, attention_mask=None, cu_seqlens_q=None,
                               cu_seqlens_k=None, sliding_window=None, tile_elements: int | None = None):
    """Sparse-X attention (``combine="union"``), the arguments as :func:`reference.naive.sparsex_attention_naive`'s;
    ``[B, Hq, Tq, D]`` in ``q.dtype``, computed in fp32 (fp64 for fp64 inputs)."""
    bsz, hq, tq, d = q.shape
    hkv = k.shape[1]
    tile_elements = TILE_ELEMENTS if tile_elements is None else tile_elements
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(bsz, hq, tq, d, dtype=cdtype)
    docs = split_documents(bsz, tq, k.shape[2], q.device, attention_mask, cu_seqlens_q, cu_seqlens_k)
    if not docs:  # every row is padding: zeros, still differentiable (zero gradients)
        out = out + q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum()
    for doc in docs:
        kd = k[doc.batch].index_select(1, doc.k_cols).to(cdtype)  # [Hkv, n, D]
        vd = v[doc.batch].index_select(1, doc.k_cols).to(cdtype)
        qd = q[doc.batch].index_select(1, doc.q_rows).to(cdtype).reshape(hkv, hq // hkv, -1, d)  # [Hkv, G, m, D]
        with torch.no_grad():
            sel = select_document(qd.detach(), doc.q_pos, block_summaries(kd.detach(), cfg.block_size), cfg,
                                  sliding_window, tile_elements, kd.detach())
        od = _attend_document(qd, kd, vd, doc.q_pos, sel, cfg, scale, sliding_window, tile_elements)
        out[doc.batch][:, doc.q_rows] = od.reshape(hq, -1, d)
    return out.to(q.dtype)


def _attend_document(q, k, v, p, sel, cfg: SparseXConfig, scale, sliding_window, tile_elements):
    """``q [Hkv, G, m, D]`` at positions ``p [m]`` (consecutive), ``k, v [Hkv, n, D]``, ``sel [Hkv, m, topk]`` ->
    ``[Hkv, G, m, D]``."""
    hkv, g, m, d = q.shape
    n, bs, rows = k.shape[1], cfg.block_size, TILE_ROWS
    nt = -(-m // rows)
    pad = nt * rows - m  # the last tile's missing rows repeat its last query; their outputs are dropped
    qp = F.pad(q, (0, 0, 0, pad)).reshape(hkv, g, nt, rows, d)
    pp = torch.cat([p, p[-1:].expand(pad)]).reshape(nt, rows)
    sp = F.pad(sel, (0, 0, 0, pad), value=-1).reshape(hkv, nt, rows, -1)
    nb = n // bs
    longest = min(n, cfg.sink_tokens + cfg.window + rows + (n // cfg.stride + 1 if cfg.stride else 0)
                  + min(rows * cfg.topk, nb) * bs)
    per_tile = hkv * (n + rows * (nb + 1) + longest * (2 * d + (g + 1) * rows))
    chunk = max(1, tile_elements // per_tile)
    outs = [_attend_tiles(qp[:, :, a:a + chunk], k, v, pp[a:a + chunk], sp[:, a:a + chunk], cfg, scale,
                          sliding_window) for a in range(0, nt, chunk)]
    return torch.cat(outs, 2).reshape(hkv, g, nt * rows, d)[:, :, :m]


def _attend_tiles(q, k, v, p, sel, cfg: SparseXConfig, scale, sliding_window):
    """``c`` query tiles: ``q [Hkv, G, c, R, D]``, positions ``p [c, R]``, selections ``sel [Hkv, c, R, topk]`` ->
    ``[Hkv, G, c, R, D]``."""
    hkv, g, c, rows, d = q.shape
    n, bs = k.shape[1], cfg.block_size
    nb = n // bs
    dev = q.device
    with torch.no_grad():
        # each row's selected blocks as flags [Hkv, c, R, nb + 1] (column nb: none, and the partial tail block)
        row_chosen = torch.zeros(hkv, c, rows, nb + 1, dtype=torch.bool, device=dev)
        row_chosen.scatter_(-1, torch.where(sel >= 0, sel, nb), True)
        row_chosen[..., nb] = False
        # the tile's union over all n keys: [Hkv, c, n]
        j = torch.arange(n, device=dev)
        first, last = p[:, :1], p[:, -1:]  # [c, 1]
        keep = (j <= last) & ((j < cfg.sink_tokens) | (j > first - cfg.window)
                              | ((j % cfg.stride == 0) if cfg.stride else False))
        blocks = (j // bs).clamp(max=nb)
        member = keep | row_chosen.any(2).gather(-1, blocks.expand(hkv, c, n))
        if sliding_window is not None:
            member &= j > first - sliding_window  # keys no row of the tile can see
        # compaction: each tile's member keys in ascending order, [Hkv, c, L] (slots past a tile's count: key 0)
        count = member.sum(-1)
        width = max(int(count.max()), 1)  # (one host read per chunk of tiles)
        rank = torch.where(member, member.cumsum(-1) - 1, width)
        idx = torch.zeros(hkv, c, width + 1, dtype=torch.long, device=dev)
        idx.scatter_(-1, rank, j.expand(hkv, c, n))
        idx = idx[..., :width]
        listed = torch.arange(width, device=dev) < count[..., None]  # [Hkv, c, L]
        # each row's own set among the listed keys: [Hkv, c, R, L]
        jj, pr = idx[:, :, None], p[None, :, :, None]
        base = (jj < cfg.sink_tokens) | (jj > pr - cfg.window)
        if cfg.stride:
            base |= jj % cfg.stride == 0
        mask = listed[:, :, None] & (jj <= pr) & (base | row_chosen.gather(-1, blocks[idx][:, :, None].expand(
            -1, -1, rows, -1)))
        if sliding_window is not None:
            mask &= pr - jj < sliding_window
    kg = k.gather(1, idx.reshape(hkv, -1, 1).expand(-1, -1, d)).reshape(hkv * c, 1, width, d)
    vg = v.gather(1, idx.reshape(hkv, -1, 1).expand(-1, -1, d)).reshape(hkv * c, 1, width, d)
    qt = q.permute(0, 2, 1, 3, 4).reshape(hkv * c, g, rows, d)
    o = F.scaled_dot_product_attention(qt, kg.expand(-1, g, -1, -1), vg.expand(-1, g, -1, -1),
                                       attn_mask=mask.reshape(hkv * c, 1, rows, width), scale=scale)
    return o.reshape(hkv, c, g, rows, d).permute(0, 2, 1, 3, 4)

"""Pure-PyTorch reference of Sparse-X attention: the executable form of ``docs/spec.md``.

Every fast path (Triton prefill, decode, chunked prefill) must match this function. It is written
for clarity, not speed: each document is processed on its own, queries in tiles, and for each tile
the four key sets (sink, local window, stride, top-k blocks) are evaluated literally as predicates
on (query position, key position) pairs. Memory is bounded by the tile (``[Hq, tile, keys]``), never
``[Tq, Tk]`` for the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ....config import SparseXConfig
from ..rules.common import block_summaries, document_anchor, eligible_blocks, resolve_mix_weights, select_blocks
from ..rules.documents import Document, split_documents

# Elements of one [Hq, tile, keys] score tile: bounds the reference's working memory (~64 MiB fp32).
TILE_ELEMENTS = 1 << 24


@dataclass
class SparseXStats:
    """What the fidelity metrics need, returned by ``return_stats=True``.

    Attributes:
        selected_blocks: ``[B, Hkv, Tq, topk]`` long, the top-k block indices chosen for every query
            (block ``b`` holds document positions ``b*block_size ... (b+1)*block_size - 1``), sorted by
            score, ``-1`` where fewer than ``topk`` blocks were eligible.
        mass_kept: ``[B, Hq, Tq]`` float, the share of the dense causal softmax mass on ``S(i)``.
        oracle_mass: ``[B, Hq, Tq]`` float, the same for the best possible ``topk`` blocks per head
            (chosen from the dense scores among the same eligible blocks).
        valid: ``[B, Tq]`` bool, False for padding query rows (whose stats are NaN).
    """

    selected_blocks: torch.Tensor
    mass_kept: torch.Tensor
    oracle_mass: torch.Tensor
    valid: torch.Tensor


def select_document(q, p, summaries, cfg: SparseXConfig, sliding_window, tile_elements: int,
                    keys: torch.Tensor | None = None) -> torch.Tensor:
    """Selection stage for one document: ``q [Hkv, G, m, D]``, ``p [m]`` (consecutive positions), ``keys
    [Hkv, n, D]`` (read by the exact second stage) -> ``[Hkv, m, topk]``. Queries are processed in chunks of
    whole selection tiles (bounded memory)."""
    hkv, g, m, d = q.shape
    nb = summaries[0].shape[1]
    out = torch.full((hkv, m, cfg.topk), -1, dtype=torch.long, device=q.device)
    if nb == 0 or cfg.topk == 0 or m == 0:
        return out
    tile = cfg.select_tile
    per_query = hkv * g * nb + (hkv * (g + 1) * cfg.block_size * d if cfg.rerank else 0)  # scores + exact-stage keys
    chunk = max(tile, (tile_elements // max(1, per_query)) // tile * tile)
    first = (tile - int(p[0]) % tile) % tile  # queries before the first tile boundary
    starts = ([0] if first else []) + list(range(first, m, chunk))
    for a, b in zip(starts, starts[1:] + [m]):
        eligible = eligible_blocks(p[a:b], nb, cfg, sliding_window)
        if tile > 1:  # a tile shares one top-k: blocks eligible for all its queries (its first and last)
            _, inv = torch.unique_consecutive(p[a:b] // tile, return_inverse=True)
            shared = torch.ones(int(inv[-1]) + 1, nb, dtype=torch.bool, device=q.device)
            shared = shared.long().scatter_reduce(0, inv[:, None].expand(-1, nb), eligible.long(), "amin").bool()
            eligible = shared[inv]
        sel = select_blocks(q[:, :, a:b], p[a:b], summaries, eligible, cfg, keys)  # fewer columns if nb < topk
        out[:, a:b, : sel.shape[-1]] = sel
    if cfg.anchor:  # the last tile: every eligible block ranked by exact scores (common.anchor_blocks)
        a, sel = document_anchor(q, int(p[0]), keys, cfg, sliding_window)
        out[:, a:] = -1
        out[:, a:, : sel.shape[-1]] = sel[:, None]
    return out


def _masked_softmax_av(logits, mask, v):
    """softmax over the keys where ``mask`` holds, times ``v``; rows with no key give zeros.
    Returns (output, row_nonempty)."""
    nonempty = mask.any(-1, keepdim=True)
    p = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
    p = torch.where(nonempty, p, torch.zeros_like(p))
    return p @ v, nonempty


def _attend_tile(q, k, v, p, selected, cfg, scale, sliding_window, dense, mix_weights, want_stats):
    """Attention stage for one query tile of one document.

    q ``[Hkv, G, m, D]`` (positions ``p [m]``), k/v ``[Hkv, n, D]`` with ``n = p.max() + 1``, the
    tile's selected blocks ``[Hkv, m, topk]``. Returns output ``[Hkv, G, m, D]`` and, if asked,
    (kept, oracle), each ``[Hkv, G, m]``.
    """
    hkv, g, m, _ = q.shape
    n = k.shape[1]
    j = torch.arange(n, device=q.device)
    pc = p[:, None]
    causal = j <= pc  # [m, n]
    if sliding_window is not None:
        causal &= (pc - j) < sliding_window
    logits = (q @ k[:, None].transpose(-1, -2)) * scale  # [Hkv, G, m, n]

    if dense:
        base = causal
        topk_mask = torch.zeros_like(causal)[None]
    else:
        sink = j < cfg.sink_tokens
        local = j > pc - cfg.window
        stride = (j % cfg.stride == 0) if cfg.stride > 0 else torch.zeros_like(sink)
        base = causal & (sink | local | stride)
        nb = n // cfg.block_size  # complete blocks visible to this tile
        topk_mask = torch.zeros(hkv, m, n, dtype=torch.bool, device=q.device)
        if cfg.topk > 0 and nb > 0:
            chosen = torch.zeros(hkv, m, nb + 1, dtype=torch.bool, device=q.device)  # column nb: "none"
            # (a given selection may name any block: one this tile cannot see, or none, is "none")
            chosen.scatter_(-1, torch.where((selected >= 0) & (selected < nb), selected, nb), True)
            key_block = (j // cfg.block_size).clamp(max=nb)  # keys of the partial tail block -> "none"
            topk_mask = chosen.gather(-1, key_block.expand(hkv, m, n)) & (key_block < nb) & causal
    member = base[None] | topk_mask  # [Hkv, m, n]

    if cfg.combine == "union" or dense:
        out, _ = _masked_softmax_av(logits, member[:, None], v[:, None])
    else:
        local_set = causal & ((j < cfg.sink_tokens) | (j > pc - cfg.window))
        stride_set = base & ~local_set
        global_set = topk_mask & ~(local_set | stride_set)[None]
        out = 0
        norm = 0
        for idx, branch in enumerate((local_set[None].expand_as(topk_mask), stride_set[None].expand_as(topk_mask), global_set)):
            o_b, nonempty = _masked_softmax_av(logits, branch[:, None], v[:, None])
            w = mix_weights[..., idx].reshape(hkv, g, 1, 1) * nonempty
            out = out + w * o_b
            norm = norm + w
        out = out / norm

    if not want_stats:
        return out, None
    with torch.no_grad():
        dense_p = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
        kept = (dense_p * member[:, None]).sum(-1)
        oracle = (dense_p * base).sum(-1)
        if cfg.topk > 0 and not dense and n // cfg.block_size > 0:
            nb = n // cfg.block_size
            rest = (dense_p * ~base)[..., : nb * cfg.block_size].reshape(hkv, g, m, nb, cfg.block_size).sum(-1)
            rest = rest.masked_fill(~eligible_blocks(p, nb, cfg, sliding_window), 0.0)
            oracle = oracle + rest.topk(min(cfg.topk, nb), dim=-1).values.sum(-1)
    return out, (kept, oracle)


def sparsex_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SparseXConfig,
    *,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    sliding_window: int | None = None,
    dense: bool = False,
    mix_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    tile_elements: int | None = None,
    selected: torch.Tensor | None = None,
):
    """Reference Sparse-X attention (inputs already validated by :func:`sparsex_attention`).

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` with ``Hq = G * Hkv`` and ``Tq <= Tk``.
        attention_mask: optional ``[B, Tk]`` padding mask; cu_seqlens_q / cu_seqlens_k: packed layout.
        sliding_window: keys at distance ``>= sliding_window`` are invisible (Mistral), or ``None``.
        dense: compute dense causal attention with the same layout handling (dense layers, fallback).
        mix_weights: ``[3]`` or ``[Hq, 3]`` weights of ``combine="mix"`` (default: alpha, beta, gamma).
        tile_elements: size of one ``[Hq, tile, keys]`` score tile (default ``TILE_ELEMENTS``).
        selected: optional ``[B, Hkv, Tq, topk]`` blocks to use instead of the selection stage (tests of
            the attention stage given another implementation's selection).
    Returns:
        ``[B, Hq, Tq, D]`` in ``q.dtype`` (and :class:`SparseXStats` if ``return_stats``).
    """
    bsz, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    tile_elements = TILE_ELEMENTS if tile_elements is None else tile_elements
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    weights = resolve_mix_weights(config, mix_weights, hq, q.device, cdtype) if config.combine == "mix" else None

    out = q.new_zeros(bsz, hq, tq, d, dtype=cdtype)
    if return_stats:
        sel_all = torch.full((bsz, hkv, tq, config.topk), -1, dtype=torch.long, device=q.device)
        kept_all = torch.full((bsz, hq, tq), math.nan, dtype=cdtype, device=q.device)
        oracle_all = kept_all.clone()
        valid = torch.zeros(bsz, tq, dtype=torch.bool, device=q.device)

    docs: list[Document] = split_documents(bsz, tq, tk, q.device, attention_mask, cu_seqlens_q, cu_seqlens_k)
    if not docs:  # every row is padding: zeros, still differentiable (zero gradients), as SDPA's answer is
        out = out + q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum()
    for doc in docs:
        doc_sel = None if selected is None else selected[doc.batch][:, doc.q_rows].long()
        od, doc_sel, stats = _attend_document(q, k, v, doc, config, scale, sliding_window, dense, weights, return_stats,
                                              tile_elements, cdtype, doc_sel)
        # (x[b][:, rows] rather than x[b, :, rows], which would put the indexed dim first)
        out[doc.batch][:, doc.q_rows] = od
        if return_stats:
            rows, m = doc.q_rows, doc.q_rows.numel()
            valid[doc.batch][rows] = True
            kept_all[doc.batch][:, rows] = torch.cat([s[0] for s in stats], 2).reshape(hq, m).to(cdtype)
            oracle_all[doc.batch][:, rows] = torch.cat([s[1] for s in stats], 2).reshape(hq, m).to(cdtype)
            sel_all[doc.batch][:, rows] = doc_sel

    out = out.to(q.dtype)
    if return_stats:
        return out, SparseXStats(sel_all, kept_all.float(), oracle_all.float(), valid)
    return out


def _attend_document(q, k, v, doc: Document, config, scale, sliding_window, dense, weights, want_stats, tile_elements,
                     cdtype, doc_sel=None):
    """One document: its selection (unless given) and its attention, query tile by query tile.
    Returns ``(out [Hq, m, D], selection [Hkv, m, topk], per-tile stats)``."""
    hq, d = q.shape[1], q.shape[3]
    hkv = k.shape[1]
    kd = k[doc.batch].index_select(1, doc.k_cols).to(cdtype)  # [Hkv, n, D]
    vd = v[doc.batch].index_select(1, doc.k_cols).to(cdtype)
    qd = q[doc.batch].index_select(1, doc.q_rows).to(cdtype).reshape(hkv, hq // hkv, -1, d)  # [Hkv, G, m, D]
    m, n = doc.q_pos.numel(), kd.shape[1]
    if dense:
        doc_sel = torch.full((hkv, m, config.topk), -1, dtype=torch.long, device=q.device)
    elif doc_sel is None:
        summaries = block_summaries(kd, config.block_size)
        doc_sel = select_document(qd, doc.q_pos, summaries, config, sliding_window, tile_elements, kd)
    tile = max(1, min(m, tile_elements // max(1, hq * n)))
    outs, stats = [], []
    for t0 in range(0, m, tile):
        p = doc.q_pos[t0 : t0 + tile]
        nt = int(p[-1]) + 1  # positions ascend: the last query sees the most keys
        o, st = _attend_tile(
            qd[:, :, t0 : t0 + tile], kd[:, :nt], vd[:, :nt], p, doc_sel[:, t0 : t0 + tile], config, scale,
            sliding_window, dense, weights, want_stats,
        )
        outs.append(o)
        stats.append(st)
    return torch.cat(outs, 2).reshape(hq, m, d), doc_sel, stats

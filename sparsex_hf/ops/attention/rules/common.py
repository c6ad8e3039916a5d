"""Selection and ``mix`` helpers shared by the reference, the decode path and the Triton kernels' hosts.

Everything here is the spec's selection rule written once (``docs/spec.md``, "top-k global"): block
summaries, the block scores, which blocks a query may select, the top-k order (highest score first, ties to
the lower block), and the ``mix`` branch weights. The reference (``naive.py``), the decode path
(``decode.py``) and the kernel hosts import these; none of them imports another's private helpers.
"""

from __future__ import annotations

import functools
import math

import torch

from ....config import SparseXConfig

__all__ = [
    "block_scores",
    "exact_block_scores",
    "max_block_logits",
    "rerank_blocks",
    "anchor_blocks",
    "anchor_scores",
    "document_anchor",
    "shortlist_config",
    "shortlist_size",
    "block_summaries",
    "eligible_blocks",
    "resolve_mix_weights",
    "select_blocks",
    "shared_scores",
    "tile_mean_queries",
    "top_blocks",
    "top_blocks_besides",
]


def block_summaries(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block min, max and mean of the keys of the complete blocks: ``k [Hkv, n, D]`` -> three
    ``[Hkv, n // block_size, D]`` tensors (the mean accumulated in fp32 at least, returned in ``k.dtype``)."""
    hkv, n, d = k.shape
    nb = n // block_size
    kb = k[:, : nb * block_size].reshape(hkv, nb, block_size, d)
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    return kb.amin(2), kb.amax(2), kb.mean(2, dtype=acc).to(k.dtype)


def block_scores(q: torch.Tensor, summaries, score: str) -> torch.Tensor:
    """Selection score of every block for every query, shared by the GQA group (max over its heads).

    Args:
        q: ``[Hkv, G, m, D]`` queries.
        summaries: ``(kmin, kmax, kmean)``, each ``[Hkv, nb, D]``.
        score: ``"minmax"`` (``sum_d max(q_d*kmin_d, q_d*kmax_d) = q+ . kmax + q- . kmin``) or ``"mean"``.
    Returns:
        ``[Hkv, m, nb]``.
    """
    kmin, kmax, kmean = summaries
    if score == "minmax":
        s = q.clamp(min=0) @ kmax[:, None].transpose(-1, -2) + q.clamp(max=0) @ kmin[:, None].transpose(-1, -2)
    elif score == "mean":
        s = q @ kmean[:, None].transpose(-1, -2)
    else:
        raise ValueError(f"unknown score {score!r}; allowed are 'minmax' and 'mean'.")
    return s.amax(1)


def top_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best finite scores along the last dim (ties: lower block first), -1 if fewer."""
    k = min(k, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    ok = torch.gather(scores, -1, order) > -math.inf
    return torch.where(ok, order, torch.full_like(order, -1))


def top_blocks_besides(scores: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`top_blocks` of ``scores [..., nb]`` among the blocks not in ``chosen [..., c]`` (-1 = empty slot)."""
    nb = scores.shape[-1]
    taken = torch.zeros(*scores.shape[:-1], nb + 1, dtype=torch.bool, device=scores.device)  # column nb: empty slots
    taken.scatter_(-1, torch.where(chosen >= 0, chosen, nb), True)
    return top_blocks(scores.masked_fill(taken[..., :nb], -math.inf), k)


def shared_scores(q: torch.Tensor, p: torch.Tensor | None, summaries, kind: str, cfg: SparseXConfig) -> torch.Tensor:
    """Selection scores ``[Hkv, m, nb]`` for queries ``q [Hkv, G, m, D]`` at positions ``p [m]``.

    Shared by the GQA group (max over its heads) and, when ``select_tile > 1``, by the queries of one
    selection tile ``p // select_tile``: the score of their mean query. Only the queries in ``q`` count, so callers
    pass whole tiles.
    """
    if cfg.select_tile == 1:
        return block_scores(q, summaries, kind)
    means, inv = tile_mean_queries(q, p, cfg.select_tile)
    return block_scores(means, summaries, kind)[:, inv]


def tile_mean_queries(q: torch.Tensor, p: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean query of each selection tile present in ``q [Hkv, G, m, D]`` (positions ``p [m]``, ascending):
    ``([Hkv, G, tiles, D], inv [m])``, ``inv`` the tile of each query."""
    _, inv = torch.unique_consecutive(p // tile, return_inverse=True)
    n_tiles = int(inv[-1]) + 1
    hkv, g, m, d = q.shape
    total = q.new_zeros(hkv, g, n_tiles, d).index_add_(2, inv, q)
    count = torch.bincount(inv, minlength=n_tiles).to(q.dtype)
    return total / count[:, None], inv


def equal_summary_scores(scores: torch.Tensor, summaries, kind: str) -> torch.Tensor:
    """``scores [Hkv, m, nb]`` with every block whose summary equals an earlier block's (same KV head) given that
    block's score, bit for bit: matrix products may round equal columns differently, and the tie rule (equal
    scores: lower block first) must see them equal."""
    kmin, kmax, kmean = summaries
    rows = torch.cat([kmin, kmax], -1) if kind == "minmax" else kmean
    hkv, nb, _ = rows.shape
    if nb < 2:
        return scores
    head = torch.arange(hkv, device=rows.device, dtype=rows.dtype)[:, None, None].expand(hkv, nb, 1)
    _, inv = torch.unique(torch.cat([head, rows], -1).flatten(0, 1), dim=0, return_inverse=True)
    if int(inv.max()) + 1 == hkv * nb:  # no two blocks alike
        return scores
    flat = torch.arange(hkv * nb, device=rows.device)
    first = torch.full((hkv * nb,), hkv * nb, device=rows.device, dtype=torch.long).scatter_reduce(0, inv, flat, "amin")
    rep = (first[inv] % nb).view(hkv, 1, nb).expand_as(scores)
    return scores.gather(-1, rep)


def select_blocks(q, p, summaries, eligible: torch.Tensor, cfg: SparseXConfig, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k block indices per query: ``[Hkv, m, topk]`` (-1 where fewer blocks are eligible).

    ``eligible [m, nb]`` (or ``[Hkv, m, nb]``) marks, per query, the complete causal blocks not fully covered
    by sink or local. ``p`` (positions) is only read when ``select_tile > 1``. ``keys [Hkv, n, D]`` (the
    document's keys) are read by the exact second stage (``cfg.rerank > 0``).
    """
    neg = torch.tensor(-math.inf, dtype=q.dtype, device=q.device)
    s = torch.where(eligible, equal_summary_scores(shared_scores(q, p, summaries, cfg.score, cfg), summaries, cfg.score), neg)
    if cfg.rerank:
        if keys is None:
            raise ValueError("rerank > 0 needs the keys for the exact second stage")
        short = top_blocks(s, cfg.rerank * cfg.topk)
        return rerank_blocks(short, exact_block_scores(q, p, keys, short, cfg), cfg.topk)
    return top_blocks(s, cfg.topk)


def max_block_logits(qr: torch.Tensor, kb: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
    """``qr [Hkv, G, R, D]`` queries of ``R`` rows, ``kb [Hkv, nb, bs, D]`` the blocks' keys, ``short [Hkv, R, S]``
    block indices (-1 = none) -> ``[Hkv, R, S]``: each listed block's largest logit, max over the group's heads
    (-inf for -1). One shortlist slot at a time, so memory stays ``R * bs * D`` per KV head."""
    hkv = kb.shape[0]
    out = torch.full(short.shape, -math.inf, dtype=qr.dtype, device=qr.device)
    heads = torch.arange(hkv, device=qr.device)[:, None]
    for s in range(short.shape[-1]):
        blk = kb[heads, short[..., s].clamp(min=0)]  # [Hkv, R, bs, D]
        logits = torch.einsum("hgrd,hrkd->hgrk", qr, blk).amax(-1).amax(1)
        out[..., s] = torch.where(short[..., s] >= 0, logits, out[..., s])
    return out


def exact_block_scores(q: torch.Tensor, p, keys: torch.Tensor, short: torch.Tensor, cfg: SparseXConfig) -> torch.Tensor:
    """The second stage's exact scores ``[Hkv, m, S]`` of each query's shortlisted blocks ``short [Hkv, m, S]``
    (-1 = none): the largest logit of the block's keys ``keys [Hkv, n, D]``, max over the group's heads, for the
    same query as the first stage (the query, or its tile's mean query)."""
    hkv, g, m, d = q.shape
    bs = cfg.block_size
    nb = keys.shape[1] // bs
    kb = keys[:, : nb * bs].reshape(hkv, nb, bs, d).to(q.dtype)
    if cfg.select_tile == 1:
        return max_block_logits(q, kb, short)
    means, inv = tile_mean_queries(q, p, cfg.select_tile)
    first = torch.zeros(means.shape[2], dtype=torch.long, device=q.device).scatter_reduce(
        0, inv, torch.arange(m, device=q.device), "amin", include_self=False)
    return max_block_logits(means, kb, short[:, first])[:, inv]


def shortlist_size(cfg: SparseXConfig) -> int:
    """Blocks the first stage lists per query (or tile): ``rerank * topk`` with two stages, else ``topk``."""
    return cfg.rerank * cfg.topk if cfg.rerank else cfg.topk


@functools.lru_cache(maxsize=64)
def shortlist_config(cfg: SparseXConfig) -> SparseXConfig:
    """The one-stage config whose top-k is the two-stage selection's shortlist (``rerank * topk`` blocks); cached,
    so that a decode step does not build and validate a config per layer."""
    return cfg.replace(topk=shortlist_size(cfg), rerank=0, anchor=False)


def anchor_scores(q: torch.Tensor, keys: torch.Tensor, cfg: SparseXConfig,
                  budget: int = 64 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor tile's exact block scores: ``q [Hkv, G, r, D]`` the tile's queries (the last one predicts the next
    token), ``keys [Hkv, n, D]`` the document's keys -> ``(last, any)``, each ``[Hkv, n // block_size]``: the largest
    logit of each complete block's keys for the tile's last query, and for any of its queries, max over the group's
    heads, computed in fp32 at least. Keys are read in chunks of blocks so that the logits stay within ``budget``
    bytes."""
    hkv, g, r, d = q.shape
    bs = cfg.block_size
    nb = keys.shape[1] // bs
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.full((hkv, r, nb), -math.inf, dtype=dtype, device=q.device)  # per query of the tile
    qf = q.to(dtype)
    step = max(1, budget // (4 * hkv * g * r * bs))
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        logits = torch.einsum("hgrd,hkd->hgrk", qf, keys[:, b0 * bs : b1 * bs].to(dtype))
        scores[..., b0:b1] = logits.view(hkv, g, r, b1 - b0, bs).amax(-1).amax(1)
    return scores[:, -1], scores.amax(1)


def anchor_blocks(last: torch.Tensor, any_: torch.Tensor, eligible: torch.Tensor, cfg: SparseXConfig) -> torch.Tensor:
    """The anchor tile's selection (``cfg.anchor``) from its :func:`anchor_scores` ``last``, ``any_`` (``[Hkv, nb]``)
    and ``eligible [nb]`` (the blocks eligible for every query of the tile) -> ``[Hkv, <= topk]`` block indices (-1
    where fewer are eligible): the ``topk`` best by ``last`` (``"last"``), or (``"split"``) the ``ceil(topk / 2)``
    best by ``last``, then the best of the others by ``any_`` (ties: lower block first)."""
    eligible = eligible.to(last.device)
    last = last.masked_fill(~eligible, -math.inf)
    if cfg.anchor != "split":
        return top_blocks(last, cfg.topk)
    first = top_blocks(last, (cfg.topk + 1) // 2)
    return torch.cat([first, top_blocks_besides(any_.masked_fill(~eligible, -math.inf), first,
                                                cfg.topk - first.shape[-1])], -1)


def document_anchor(q: torch.Tensor, first: int, keys: torch.Tensor, cfg: SparseXConfig, sliding_window,
                    scores=anchor_scores) -> tuple[int, torch.Tensor]:
    """The anchor of one document's queries in a call: ``q [Hkv, G, m, D]`` at positions ``first ... first + m - 1``,
    ``keys [Hkv, n, D]`` its keys -> ``(a, blocks)``: the last selection tile is ``q``'s rows ``a ...`` (the
    tile's queries present in the call), ``blocks [Hkv, <= topk]`` its :func:`anchor_blocks` among the blocks
    eligible for all of them. ``scores``: :func:`anchor_scores` or the Triton kernel's (``select.py``)."""
    last = first + q.shape[2] - 1
    a = max(last // cfg.select_tile * cfg.select_tile, first) - first
    nb = keys.shape[1] // cfg.block_size
    # the blocks eligible for both ends of the tile form one range: found on the host (no copy to the device, which
    # would make the host wait for the GPU), then made a mask on the device
    ok = eligible_blocks(torch.tensor([first + a, last]), nb, cfg, sliding_window).all(0).nonzero().flatten().tolist()
    b = torch.arange(nb, device=keys.device)
    eligible = (b >= ok[0]) & (b <= ok[-1]) if ok else torch.zeros(nb, dtype=torch.bool, device=keys.device)
    tile = q[:, :, a:] if cfg.anchor == "split" else q[:, :, -1:]
    return a, anchor_blocks(*scores(tile, keys, cfg), eligible, cfg)


def rerank_blocks(short: torch.Tensor, exact: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` shortlisted blocks (``short [..., S]``, -1 = none) with the best ``exact`` scores (equal scores:
    lower block index first), -1 where fewer are listed."""
    big = torch.iinfo(torch.long).max
    by_index = torch.sort(torch.where(short >= 0, short, big), dim=-1).indices  # ascending block index
    short, exact = short.gather(-1, by_index), exact.gather(-1, by_index)
    order = torch.sort(exact, dim=-1, descending=True, stable=True).indices[..., :k]
    best, score = short.gather(-1, order), exact.gather(-1, order)
    return torch.where(score > -math.inf, best, torch.full_like(best, -1))


def eligible_blocks(p: torch.Tensor, nb: int, cfg: SparseXConfig, sliding_window: int | None) -> torch.Tensor:
    """``[m, nb]``: block ``b`` is complete and causal for query position ``p`` and not fully covered
    by sink or local (it meets the uncovered interval ``[sink_tokens, p - window]``)."""
    b = torch.arange(nb, device=p.device)
    start, end = b * cfg.block_size, b * cfg.block_size + cfg.block_size - 1
    p = p[:, None]
    lo, hi = cfg.sink_tokens, p - cfg.window
    ok = (end <= p) & (start <= hi) & (end >= lo) & (lo <= hi)
    if sliding_window is not None:
        ok &= end > p - sliding_window
    return ok


def resolve_mix_weights(cfg: SparseXConfig, mix_weights, hq: int, device, dtype) -> torch.Tensor:
    """The ``combine="mix"`` weights as ``[Hq, 3]`` (local, stride, top-k): ``mix_weights`` (``[3]`` or
    ``[Hq, 3]``) or the config's ``alpha, beta, gamma``."""
    if mix_weights is None:
        mix_weights = torch.tensor([cfg.alpha, cfg.beta, cfg.gamma])
    mix_weights = torch.as_tensor(mix_weights).to(device=device, dtype=dtype)
    if mix_weights.shape not in ((3,), (hq, 3)):
        raise ValueError(f"mix_weights must have shape [3] or [Hq, 3] = [{hq}, 3], got {tuple(mix_weights.shape)}.")
    return mix_weights.expand(hq, 3)

"""Shared test helpers: an independent brute-force Sparse-X oracle and tiny model builders."""

from __future__ import annotations

import torch

from sparsex_hf import SparseXConfig


def brute_force_key_set(p: int, n: int, k: torch.Tensor, qg: torch.Tensor, cfg: SparseXConfig, sliding_window=None,
                        tile_positions=None, anchor_queries=None):
    """S(i) built literally from docs/spec.md for one query at position ``p`` of a document with ``n`` keys.

    k: ``[n, D]`` keys of one KV head; qg: ``[G, D]`` the group's queries (selection is shared);
    anchor_queries: ``([G, D], [G * r, D])`` the group's queries at the anchor tile's last position and at all its
    ``r`` positions, when ``p`` is in that tile.
    Returns (sorted list of key positions, list of the selected blocks).
    """
    B = cfg.block_size
    visible = lambda j: j <= p and (sliding_window is None or p - j < sliding_window)  # noqa: E731
    sink = {j for j in range(n) if j < cfg.sink_tokens and visible(j)}
    local = {j for j in range(n) if p - cfg.window < j <= p and visible(j)}
    stride = {j for j in range(n) if cfg.stride and j % cfg.stride == 0 and visible(j)}

    def candidate(b, pp):
        keys = range(b * B, (b + 1) * B)
        covered = lambda j: j < cfg.sink_tokens or pp - cfg.window < j  # noqa: E731
        if (b + 1) * B - 1 > pp or all(covered(j) for j in keys):
            return False
        return sliding_window is None or any(pp - j < sliding_window for j in keys)

    # a selection tile shares one top-k: its blocks must be candidates for every query of the tile
    candidates = [b for b in range(n // B) if all(candidate(b, pp) for pp in (tile_positions or [p]))]

    blocks = k[: (n // B) * B].reshape(n // B, B, k.shape[-1])
    # literal scores, max over the group's heads: sum_d max(q_d*kmin_d, q_d*kmax_d) and q . mean(K_b)
    qx = qg[:, None, :]
    scores = {
        "minmax": torch.maximum(qx * blocks.min(1).values, qx * blocks.max(1).values).sum(-1).max(0).values.tolist(),
        "mean": (qx * blocks.mean(1)).sum(-1).max(0).values.tolist(),
    }

    def top(kind, count):
        return sorted(candidates, key=lambda b: (-scores[kind][b], b))[:count]

    if cfg.topk == 0:
        chosen = []
    elif anchor_queries is not None:  # the anchor tile: candidates by the largest logit of the last query ...
        last, tile = anchor_queries
        exact = {b: (last @ blocks[b].T).max().item() for b in candidates}
        chosen = sorted(candidates, key=lambda b: (-exact[b], b))[: cfg.topk]
        if cfg.anchor == "split":  # ... for half of them, the rest by the largest logit of any query of the tile
            chosen = chosen[: (cfg.topk + 1) // 2]
            exact = {b: (tile @ blocks[b].T).max().item() for b in candidates}
            chosen += sorted(set(candidates) - set(chosen), key=lambda b: (-exact[b], b))[: cfg.topk - len(chosen)]
    elif cfg.rerank:  # the summary score's shortlist, ranked again by the largest logit of each block's keys
        exact = {b: (qg @ blocks[b].T).max().item() for b in candidates}
        chosen = sorted(top(cfg.score, cfg.rerank * cfg.topk), key=lambda b: (-exact[b], b))[: cfg.topk]
    else:
        chosen = top(cfg.score, cfg.topk)
    topk = {j for b in chosen for j in range(b * B, (b + 1) * B) if visible(j)}
    return sink, local, stride, topk, chosen


def brute_force(q, k, v, cfg: SparseXConfig, scale=None, attention_mask=None, cu_seqlens=None, sliding_window=None, mix_weights=None):
    """Sparse-X by a per-query loop (float64). Same signature as the library function's core inputs."""
    bsz, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(bsz, hq, tq, d, dtype=torch.float64)
    if mix_weights is None:
        mix_weights = torch.tensor([cfg.alpha, cfg.beta, cfg.gamma])
    mix_weights = torch.as_tensor(mix_weights, dtype=torch.float64).expand(hq, 3)

    # documents as (batch, [(query_row, key_col)...], key columns in order)
    docs = []
    if cu_seqlens is not None:
        cu = [int(x) for x in cu_seqlens]
        for s, e in zip(cu[:-1], cu[1:]):
            docs.append((0, list(range(s, e)), list(range(s, e))))  # Tq == Tk
    else:
        for b in range(bsz):
            real = [t for t in range(tk) if attention_mask is None or bool(attention_mask[b, t])]
            docs.append((b, [r for r in range(tq) if (tk - tq + r) in real], real))
    for b, q_rows, cols in docs:
        if cu_seqlens is not None:
            q_cols = q_rows
        else:
            q_cols = [tk - tq + r for r in q_rows]
        kd, vd = k[b][:, cols], v[b][:, cols]
        n = len(cols)
        positions = [cols.index(c) for c in q_cols]
        for r, p in zip(q_rows, positions):
            # queries sharing the selection: the group's heads, and the present queries of p's tile
            mates = [rr for rr, pp in zip(q_rows, positions) if pp // cfg.select_tile == p // cfg.select_tile]
            for h in range(hkv):
                qt = q[b, h * g : (h + 1) * g][:, mates]  # [G, tile queries, D]
                qg = qt.mean(1)
                mate_pos = [pp for pp in positions if pp // cfg.select_tile == p // cfg.select_tile]
                anchored = cfg.anchor and p // cfg.select_tile == positions[-1] // cfg.select_tile
                sink, local, stride, topk, _ = brute_force_key_set(p, n, kd[h], qg, cfg, sliding_window, mate_pos,
                                                                   (qt[:, -1], qt.reshape(-1, d)) if anchored else None)
                for gi in range(g):
                    hh = h * g + gi
                    logits = (kd[h] @ q[b, hh, r]) * scale
                    if cfg.combine == "union":
                        branches, weights = [sorted(sink | local | stride | topk)], [1.0]
                    else:
                        loc = sink | local
                        strd = stride - loc
                        glob = topk - loc - strd
                        branches, weights = [sorted(loc), sorted(strd), sorted(glob)], mix_weights[hh].tolist()
                    acc, norm = 0, 0.0
                    for keys, w in zip(branches, weights):
                        if not keys:
                            continue
                        pr = torch.softmax(logits[keys], 0)
                        acc = acc + w * (pr @ vd[h, keys])
                        norm += w
                    out[b, hh, r] = acc / norm
    return out


def dense_causal(q, k, v, scale=None):
    """Dense attention with bottom-right causal alignment, by an explicit mask (small inputs only)."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, 1)
    v = v.repeat_interleave(hq // hkv, 1)
    tq, tk = q.shape[2], k.shape[2]
    i = torch.arange(tq)[:, None] + tk - tq
    mask = torch.arange(tk)[None] <= i
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def random_qkv(b, hq, hkv, tq, tk, d, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def tiny_config(model_type: str, **overrides):
    """A tiny config of a supported model type (hidden 64, 2 layers, GQA 4/2, head dim 16)."""
    from transformers import AutoConfig

    kw = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=32768, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    if model_type in ("qwen2", "qwen3"):
        kw.update(use_sliding_window=False, head_dim=16)
    if model_type == "phi3":
        kw.update(original_max_position_embeddings=32768)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, attn="sdpa", seed=0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation=attn)
    return model.eval()


def model_pair(model_type: str, **overrides):
    """An sdpa model and a sparsex model with the same weights."""
    dense = tiny_model(model_type, "sdpa", **overrides)
    sparse = tiny_model(model_type, "sparsex", **overrides)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def padded_prompts(batch=2, length=300, pads=(0, 37), seed=0):
    """Random token ids ``[batch, length]``, row ``i`` left-padded by ``pads[i]`` tokens, and the mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
        ids[i, :p] = 0
    return ids, mask


def left_padded(batch=2, length=150, pad=23, seed=0):
    """Random token ids ``[batch, length]`` with the first row left-padded by ``pad`` tokens, and its mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


SPARSE_SMALL = dict(block_size=16, sink_tokens=16, window=64, stride=32, topk=4)
ONE_STAGE = dict(rerank=0, anchor=False)  # the min/max bound's top-k alone (SparseXConfig.preset("one-stage"))


__all__ = ["ONE_STAGE", "SPARSE_SMALL", "brute_force", "dense_causal", "left_padded", "model_pair", "padded_prompts", "random_qkv",
           "tiny_config", "tiny_model"]

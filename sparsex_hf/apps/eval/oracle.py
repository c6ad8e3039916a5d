"""The ``oracle`` evaluation method: Sparse-X's budget with the best possible blocks.

Every query (prefill and decode steps alike) attends to Sparse-X's sink, window and stride keys plus the
``topk`` eligible blocks that hold the most of its dense softmax mass outside those keys, summed over its
GQA group (per query, as ``select_tile=1``; the same eligibility rule, ``common.eligible_blocks``). It is
the upper bound of any block selection at the same number of keys per query: the gap between dense
attention and the oracle is what the budget costs, the gap between the oracle and Sparse-X what the
selection costs. It computes the dense scores (chunks of queries, never ``[Tq, Tk]`` at once), so it is
an analysis tool, as slow as dense attention, not a product path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ...config import SparseXConfig
from ...hf.attention import get_sparsex_config, sparsex_mask
from ...ops.attention.rules.common import eligible_blocks

ORACLE_ATTN = "sparsex_oracle"

# elements of one chunk's logits [rows sharing a padding, Hq, queries, keys] (fp32: 1 GiB; a few such temporaries)
CHUNK_ELEMENTS = 1 << 28


def oracle_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SparseXConfig, *, scale: float,
                     attention_mask: torch.Tensor | None = None, sliding_window: int | None = None,
                     return_selection: bool = False):
    """``q [B, Hq, Tq, D]`` (the last ``Tq`` key positions), ``k/v [B, Hkv, Tk, D]``, ``attention_mask [B, Tk]``
    left padding (True = token) -> ``[B, Hq, Tq, D]`` in ``q.dtype``; padding query rows are zeros. With
    ``return_selection``, also the chosen blocks ``[B, Hkv, Tq, topk]`` (-1 = none), highest mass first."""
    if cfg.combine != "union":
        raise ValueError(f"the oracle is defined for combine='union', got {cfg.combine!r}")
    bsz, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g, bs = hq // hkv, cfg.block_size
    if not cfg.respect_sliding_window:
        sliding_window = None
    out = torch.zeros(bsz, hq, tq, v.shape[-1], dtype=q.dtype, device=q.device)
    chosen_all = torch.full((bsz, hkv, tq, cfg.topk), -1, dtype=torch.long, device=q.device)
    pads = [0] * bsz
    if attention_mask is not None:
        mask = attention_mask.bool()
        pads = (~mask).sum(1).tolist()
        lefts = torch.arange(tk, device=mask.device)[None] >= torch.tensor(pads, device=mask.device)[:, None]
        if not torch.equal(mask, lefts):
            raise ValueError("the oracle takes left padding only (each row's tokens at its end)")
    cd = torch.promote_types(q.dtype, torch.float32)
    for o in sorted(set(pads)):  # rows with the same padding share positions: one batched computation
        rb = torch.tensor([i for i in range(bsz) if pads[i] == o], device=q.device)
        nr, n = rb.numel(), tk - o
        kb, vb = k[rb, :, o:].to(cd), v[rb, :, o:].to(cd)  # [nr, Hkv, n, D]
        nb = n // bs
        j = torch.arange(n, device=q.device)
        rows = max(1, CHUNK_ELEMENTS // max(1, nr * hq * n))
        for r0 in range(max(0, tq - n), tq, rows):  # query rows that are padding come first (and stay zero)
            r1 = min(tq, r0 + rows)
            c = r1 - r0
            p = torch.arange(r0, r1, device=q.device) + (n - tq)  # positions of the queries
            qc = q[rb, :, r0:r1].to(cd).view(nr, hkv, g, c, d)
            logits = torch.einsum("bhgrd,bhkd->bhgrk", qc, kb) * scale  # [nr, Hkv, G, c, n]
            causal = j[None] <= p[:, None]
            if sliding_window is not None:
                causal &= (p[:, None] - j[None]) < sliding_window
            base = causal & ((j[None] < cfg.sink_tokens) | (j[None] > p[:, None] - cfg.window))
            if cfg.stride > 0:
                base |= causal & (j[None] % cfg.stride == 0)
            member = base.expand(nr, hkv, c, n).clone()
            if cfg.topk > 0 and nb > 0:
                dense_p = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
                rest = (dense_p * ~base)[..., : nb * bs].unflatten(-1, (nb, bs)).sum((-1, 2))  # [nr, Hkv, c, nb]
                del dense_p
                rest = rest.masked_fill(~eligible_blocks(p, nb, cfg, sliding_window), -math.inf)
                val, idx = rest.topk(min(cfg.topk, nb), dim=-1)
                idx = torch.where(val > -math.inf, idx, -1)
                chosen_all[rb, :, r0:r1, : idx.shape[-1]] = idx
                pick = torch.zeros(nr, hkv, c, nb + 1, dtype=torch.bool, device=q.device)
                pick.scatter_(-1, torch.where(idx >= 0, idx, nb), True)
                key_block = j // bs
                member |= pick.gather(-1, key_block.clamp(max=nb).expand(nr, hkv, c, n)) & (key_block < nb) & causal
            prob = torch.softmax(logits.masked_fill(~member[:, :, None], -math.inf), dim=-1)
            out[rb, :, r0:r1] = (prob @ vb[:, :, None]).reshape(nr, hq, c, -1).to(q.dtype)
    return (out, chosen_all) if return_selection else out


def oracle_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function of :data:`ORACLE_ATTN` (Transformers' own cache: every step sees all keys)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("the oracle takes the 2-D padding mask of its mask function")
    if kwargs.get("cu_seq_lens_k") is not None:
        raise ValueError("the oracle does not take packed sequences")
    cfg = get_sparsex_config(module.config)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = oracle_attention(query, key, value, cfg, scale=scale, attention_mask=attention_mask,
                           sliding_window=kwargs.get("sliding_window"))
    return out.transpose(1, 2).contiguous(), None


def register_oracle() -> None:
    """Register :data:`ORACLE_ATTN` with Transformers (idempotent)."""
    AttentionInterface.register(ORACLE_ATTN, oracle_attention_forward)
    AttentionMaskInterface.register(ORACLE_ATTN, sparsex_mask)

"""Where Sparse-X loses the needle: per layer and KV head, does a selection keep the block that dense attention
needs? On real-text retrieval prompts of ``sparsex-eval`` (SmolLM2-135M-Instruct, no download), one dense
forward records every layer's queries and keys; then, for the last prompt position (the query that predicts the
first answer token), every selection candidate ranks the blocks, and the needle's block (the one holding the
first token of the needle's value) is looked up:

* ``oracle``: blocks ranked by the dense attention mass they receive (sum over the GQA group's heads), the
  best a selection of ``topk`` blocks can do;
* ``minmax``: the Quest bound of the query against each block's min/max keys, max over the group (the default
  per-query score; decode steps select this way);
* ``minmax-tile64``: the same for the mean query of the last 64 positions (the prefill default);
* ``b32`` / ``b16``: minmax with blocks of 32 / 16 keys and 2x / 4x as many blocks (same keys read);
* ``rerank-R``: minmax shortlists ``R * topk`` blocks, the exact max logit of each block's keys ranks them;
* ``exact``: the exact max logit over every block (rerank with every block on the shortlist);
* ``per-head``: minmax, but each query head selects on its own (counted as kept if any head of the group keeps it);
* ``tile64-rerank-R`` / ``tile64-exact``: the same two-stage / exact scores for the mean query of the last 64 positions;
* ``tile64-exact-each``: the exact max logit over every block, max over the last 64 positions' queries (the anchor tile);
* ``exact-lse`` / ``rerank-4-lse``: blocks scored by the log-sum-exp of their logits (their attention mass) instead
  of the largest logit.

A (layer, KV head) "needs" the needle when its block is in the oracle's top-k and receives at least
``--min-mass`` of the group's attention. The table gives, per candidate, the share of those pairs whose needle
block it keeps, over all samples (with a 95% Wilson interval), and per layer. Rows go to
``selection_study.csv`` in ``--out-dir``.

    python benchmarks/selection_study.py --lengths 4096 8192 --samples 20 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch
import torch.nn.functional as F
from _common import append_csv
from transformers import AttentionInterface

from sparsex_hf.apps.eval.tasks import make_sample
from sparsex_hf.apps.loading import load_model, load_tokenizer

BLOCK, SINK, WINDOW, STRIDE, TOPK = 64, 64, 1024, 64, 12
_RECORD: dict = {}


def _recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense causal attention (SDPA) that keeps the layer's last 64 queries and all keys."""
    _RECORD[module.layer_idx] = (query[0, :, -64:].float(), key[0].float())
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (c - h, c + h)


def eligible(nb: int, block: int, pos: int) -> torch.Tensor:
    b = torch.arange(nb)
    start, end = b * block, b * block + block - 1
    return (end <= pos) & (start <= pos - WINDOW) & (end >= SINK)


def minmax_scores(qv: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """``qv [..., G, D]`` against blocks of ``k [n, D]`` -> ``[..., G, nb]`` Quest bounds."""
    nb = k.shape[0] // block
    kb = k[: nb * block].view(nb, block, -1)
    kmin, kmax = kb.amin(1), kb.amax(1)
    return qv.clamp(min=0) @ kmax.T + qv.clamp(max=0) @ kmin.T


def exact_logits(qv: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    nb = k.shape[0] // block
    return (qv @ k[: nb * block].T).view(*qv.shape[:-1], nb, block)


def exact_scores(qv: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """The largest logit of each block's keys."""
    return exact_logits(qv, k, block).amax(-1)


def _reranked(first: torch.Tensor, second: torch.Tensor, r: int, target: int) -> bool:
    """``r * TOPK`` best blocks by ``first`` (ineligible ones are -inf), the ``TOPK`` best of them by ``second``."""
    short = torch.sort(first, descending=True, stable=True).indices[: r * TOPK]
    short = short[first[short] > -math.inf]
    order = short[torch.sort(second[short], descending=True, stable=True).indices]
    return bool((order[:TOPK] == target).any())


def rank_of(scores: torch.Tensor, ok: torch.Tensor, target: int) -> int:
    """Rank (0 = best) of block ``target`` among the eligible blocks (ties: lower index first), or -1."""
    if not ok[target]:
        return -1
    s = scores.masked_fill(~ok, -math.inf)
    better = (s > s[target]).sum() + ((s == s[target]) & (torch.arange(len(s)) < target)).sum()
    return int(better)


def study_layer(q_last: torch.Tensor, k: torch.Tensor, pos: int, needle: int, scale: float, min_mass: float):
    """One layer: ``q_last [Hq, 64, D]`` (the last 64 positions), ``k [Hkv, n, D]``. Returns, per KV head that
    needs the needle, {candidate: kept?}."""
    hq, hkv = q_last.shape[0], k.shape[0]
    g = hq // hkv
    n = k.shape[1]
    out = []
    for h in range(hkv):
        qg = q_last[h * g : (h + 1) * g]  # [G, 64, D]
        kh = k[h]
        q = qg[:, -1]  # [G, D] the last prompt position
        probs = torch.softmax((q @ kh[: pos + 1].T) * scale, -1)  # [G, pos+1]
        nb = n // BLOCK
        mass = probs[:, : nb * BLOCK].reshape(hq // hkv, nb, BLOCK).sum(-1).sum(0)  # group mass per block
        ok = eligible(nb, BLOCK, pos)
        b_needle = needle // BLOCK
        r_oracle = rank_of(mass, ok, b_needle)
        if r_oracle < 0 or r_oracle >= TOPK or mass[b_needle] < min_mass * g:
            continue
        kept = {"oracle": True}
        kept["minmax"] = 0 <= rank_of(minmax_scores(q, kh, BLOCK).amax(0), ok, b_needle) < TOPK
        kept["minmax-tile64"] = 0 <= rank_of(minmax_scores(qg.mean(1), kh, BLOCK).amax(0), ok, b_needle) < TOPK
        for block, name in ((32, "b32"), (16, "b16")):
            okb = eligible(n // block, block, pos)
            kept[name] = 0 <= rank_of(minmax_scores(q, kh, block).amax(0), okb, needle // block) < TOPK * BLOCK // block
        mm = minmax_scores(q, kh, BLOCK).amax(0).masked_fill(~ok, -math.inf)
        ex = exact_scores(q, kh, BLOCK).amax(0).masked_fill(~ok, -math.inf)
        for r in (2, 4, 8):
            kept[f"rerank-{r}"] = _reranked(mm, ex, r, b_needle)
        kept["exact"] = 0 <= rank_of(ex, ok, b_needle) < TOPK
        qm = qg.mean(1)  # the last 64 positions' mean query, per head
        mm_t = minmax_scores(qm, kh, BLOCK).amax(0).masked_fill(~ok, -math.inf)
        ex_t = exact_scores(qm, kh, BLOCK).amax(0).masked_fill(~ok, -math.inf)
        for r in (2, 4):
            kept[f"tile64-rerank-{r}"] = _reranked(mm_t, ex_t, r, b_needle)
        kept["tile64-exact"] = 0 <= rank_of(ex_t, ok, b_needle) < TOPK
        ex_each = exact_scores(qg, kh, BLOCK).amax(1).amax(0).masked_fill(~ok, -math.inf)  # max over the 64 queries
        kept["tile64-exact-each"] = 0 <= rank_of(ex_each, ok, b_needle) < TOPK
        lse = torch.logsumexp(exact_logits(q, kh, BLOCK), -1).amax(0).masked_fill(~ok, -math.inf)
        kept["exact-lse"] = 0 <= rank_of(lse, ok, b_needle) < TOPK
        kept["rerank-4-lse"] = _reranked(mm, lse, 4, b_needle)
        per_head = minmax_scores(q, kh, BLOCK).masked_fill(~ok, -math.inf)  # [G, nb]
        kept["per-head"] = any(0 <= rank_of(per_head[i], ok, b_needle) < TOPK for i in range(g))
        out.append(kept)
    return out


def needle_position(tok, prompt: str, value: str) -> int:
    """Token index of the first token of the needle's value in the prompt."""
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    char = prompt.index(f"is: {value}.") + 4 if f"is: {value}." in prompt else prompt.index(f" = {value}") + 3
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if a <= char < b or a >= char:
            return i
    raise ValueError("needle not found")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["niah_single_text", "niah_multikey"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--min-mass", type=float, default=0.05, help="group attention mass on the needle block to count")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default="study")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    AttentionInterface.register("sparsex_study", _recording_attention)
    tok = load_tokenizer("smollm2")
    model = load_model("smollm2", attn_implementation="sparsex_study", device=args.device).eval()
    scale = model.config.head_dim**-0.5 if getattr(model.config, "head_dim", None) else None
    rows = []
    for length in args.lengths:
        tally: dict = {}
        by_layer: dict = {}
        for task in args.tasks:
            for i in range(args.samples):
                s = make_sample(task, length, i, tok, seed=0, n_samples=args.samples)
                ids = tok(s.prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(args.device)
                needle = needle_position(tok, s.prompt, s.answers[0])
                with torch.no_grad():
                    model(ids, logits_to_keep=1)
                pos = ids.shape[1] - 1
                for layer, (q_last, k) in sorted(_RECORD.items()):
                    sc = scale or q_last.shape[-1] ** -0.5
                    for kept in study_layer(q_last.cpu(), k.cpu(), pos, needle, sc, args.min_mass):
                        for name, ok in kept.items():
                            tally.setdefault(name, [0, 0])
                            tally[name][0] += ok
                            tally[name][1] += 1
                            by_layer.setdefault((name, layer), [0, 0])
                            by_layer[(name, layer)][0] += ok
                            by_layer[(name, layer)][1] += 1
                _RECORD.clear()
        print(f"--- {length} tokens: needle block kept where dense attention needs it (pairs of layer, KV head)")
        for name, (k, n) in tally.items():
            lo, hi = wilson(k, n)
            layers = sorted({lay for (nm, lay) in by_layer if nm == name})
            worst = min(((by_layer[(name, lay)][0] / by_layer[(name, lay)][1], lay) for lay in layers), default=(None, None))
            print(f"{name:>14}: {k:4d}/{n:<4d} = {k / max(n, 1):.3f} [{lo:.3f}, {hi:.3f}]  worst layer {worst[1]}: {worst[0]}")
            rows.append(dict(date=datetime.date.today().isoformat(), tag=args.tag, device=args.device, length=length,
                             tasks="+".join(args.tasks), samples=args.samples, candidate=name, kept=k, needed=n,
                             share=round(k / max(n, 1), 4), ci_lo=round(lo, 4), ci_hi=round(hi, 4),
                             per_layer=" ".join(f"{lay}:{by_layer[(name, lay)][0]}/{by_layer[(name, lay)][1]}"
                                                for lay in layers)))
    append_csv(os.path.join(args.out_dir, "selection_study.csv"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

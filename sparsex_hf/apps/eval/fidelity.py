"""Fidelity of Sparse-X against dense attention inside the same model on the same input (docs/spec.md, 'Quality').

Per layer, over the queries whose window does not already cover every key (position >= window):

* ``mass_recall``: the share of the dense softmax mass that falls on Sparse-X's key set ``S(i)``,
  averaged over those queries and all heads;
* ``oracle_recall``: the same with the best possible ``topk`` blocks per head (from the dense scores);
  ``oracle_recall - mass_recall`` is what the selection heuristic costs;
* ``output_error``: ``||o_sparse - o_dense|| / ||o_dense||`` of the attention output over those queries.

The layers see the hidden states of the Sparse-X model (errors compound as in real use); each layer's
dense output is computed from the same queries, keys and values. Runs the reference (``backend="torch"``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ...config import SparseXConfig
from ...hf.attention import override_attention_op
from ...hf.model import set_sparsex_config
from ...ops.attention import sparsex_attention

# selection choices compared by `variants`: one stage (the min/max bound or the mean key, per token or per tile),
# the two-stage selection, its anchors, and the same selected keys as whole 128-key tiles chosen per 128 queries
# (the configuration backend="flash4" runs at its full rate: the default's 512 selected keys as 4 blocks of 128)
ONE = dict(rerank=0, anchor=False)
VARIANTS = {
    "config": {},
    "per-token minmax": dict(select_tile=1, score="minmax", **ONE),
    "per-token mean": dict(select_tile=1, score="mean", **ONE),
    "tile64 mean-query minmax": dict(select_tile=64, score="minmax", **ONE),
    "tile64 mean-query mean": dict(select_tile=64, score="mean", **ONE),
    "no top-k": dict(topk=0, **ONE),
    "two-stage x2": dict(rerank=2, anchor=False),
    "two-stage x4": dict(rerank=4, anchor=False),
    "two-stage x2 + anchor": dict(rerank=2, anchor=True),
    "two-stage x2 + split anchor": dict(rerank=2, anchor="split"),
    "tiles of 128": dict(block_size=128, select_tile=128, topk=4),
}


@contextmanager
def _recording(store: list):
    def recording(q, k, v, cfg, **kw):
        kw = dict(kw, backend="torch")
        out, st = sparsex_attention(q, k, v, cfg, return_stats=True, **kw)
        if kw.get("attention_mask") is not None or kw.get("cu_seqlens") is not None:
            raise ValueError("fidelity metrics take one unpadded sequence per forward")
        late = slice(min(cfg.window, q.shape[2]), q.shape[2])
        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                               scale=kw.get("scale"), enable_gqa=True)
        o_s, o_d = out[:, :, late].float(), dense[:, :, late]
        err = (o_s - o_d).norm() / o_d.norm().clamp(min=1e-30)
        store.append(dict(mass=st.mass_kept[:, :, late].double().sum().item(),
                          oracle=st.oracle_mass[:, :, late].double().sum().item(),
                          n=st.mass_kept[:, :, late].numel(), err=err.item(), queries=o_s.shape[2]))
        return out

    with override_attention_op(recording):
        yield


@torch.no_grad()
def fidelity(model, inputs: list[torch.Tensor], cfg: SparseXConfig) -> dict:
    """Per-layer metrics of ``cfg`` on ``inputs`` (each ``[1, T]`` token ids), averaged over the inputs."""
    set_sparsex_config(model, cfg)
    model.set_attn_implementation("sparsex")
    n_layers = model.config.num_hidden_layers
    acc = [dict(mass=0.0, oracle=0.0, n=0, err=0.0, k=0) for _ in range(n_layers)]
    for ids in inputs:
        store: list = []
        with _recording(store):
            model(ids, use_cache=False, logits_to_keep=1)
        if len(store) != n_layers:
            raise RuntimeError(f"recorded {len(store)} attention calls for {n_layers} layers")
        for a, r in zip(acc, store):
            if r["queries"] == 0:
                continue
            a["mass"] += r["mass"]
            a["oracle"] += r["oracle"]
            a["n"] += r["n"]
            a["err"] += r["err"]
            a["k"] += 1
    layers = []
    for i, a in enumerate(acc):
        if a["n"] == 0:
            layers.append(dict(layer=i, mass_recall=None, oracle_recall=None, output_error=None))
            continue
        layers.append(dict(layer=i, mass_recall=a["mass"] / a["n"], oracle_recall=a["oracle"] / a["n"],
                           output_error=a["err"] / a["k"]))
    ok = [x for x in layers if x["mass_recall"] is not None]
    mean = lambda key: sum(x[key] for x in ok) / len(ok) if ok else None  # noqa: E731
    return dict(config=cfg.to_dict(), per_layer=layers, mass_recall=mean("mass_recall"),
                oracle_recall=mean("oracle_recall"), output_error=mean("output_error"),
                min_layer_mass_recall=min((x["mass_recall"] for x in ok), default=None), inputs=len(inputs))

"""The attention methods an evaluation compares, all inside the same model on identical inputs.

* ``sdpa``: dense attention (PyTorch SDPA).
* ``sparsex``: Sparse-X with the given config.
* ``window``: a sliding window (plus the same sink tokens) with the token budget Sparse-X has at the
  longest evaluated length, computed by the same kernels (``stride=0, topk=0``).
* ``stride_window``: Sparse-X without top-k selection; its window grows by the top-k tokens so that the
  budget stays the same (the paper's ablation).
* ``sparsex:NAME``: Sparse-X with the config's fields changed by the variant ``NAME`` (``--variant NAME=JSON``),
  to compare selection choices on the same inputs.
* ``oracle``: Sparse-X's keys with the best possible top-k blocks of every query, chosen from its dense
  attention (``oracle.py``): what the budget allows. As slow as dense attention; not in the default list.
"""

from __future__ import annotations

from ...config import SparseXConfig
from ...hf.model import set_sparsex_config
from .oracle import ORACLE_ATTN, register_oracle

METHODS = ("sdpa", "sparsex", "window", "stride_window", "oracle")
DEFAULT_METHODS = ("sdpa", "sparsex", "window", "stride_window")


def method_config(method: str, cfg: SparseXConfig, max_length: int, variants: dict | None = None) -> SparseXConfig | None:
    """The Sparse-X config that realises ``method`` (None for dense ``sdpa``). The evaluation measures the selection
    rules themselves: prefills the cost model would hand to dense attention stay on the sparse kernels."""
    if method == "sdpa":
        return None
    cfg = cfg.replace(dense_when_faster=False)
    if method in ("sparsex", "oracle"):
        return cfg
    if method.startswith("sparsex:"):
        name = method.split(":", 1)[1]
        if name not in (variants or {}):
            raise ValueError(f"method {method!r} names no variant; variants are {sorted(variants or {})}")
        return cfg.replace(**variants[name])
    budget = cfg.keys_per_query(max_length)
    if method == "window":
        return cfg.replace(window=max(1, budget - cfg.sink_tokens), stride=0, topk=0, rerank=0, anchor=False)
    if method == "stride_window":
        return cfg.replace(window=cfg.window + cfg.topk * cfg.block_size, topk=0, rerank=0, anchor=False)
    raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)} and sparsex:NAME for a variant")


def use_method(model, method: str, cfg: SparseXConfig, max_length: int, variants: dict | None = None) -> SparseXConfig | None:
    """Switch ``model`` (already loaded) to ``method``; returns the Sparse-X config in use (None: dense)."""
    mc = method_config(method, cfg, max_length, variants)
    if mc is None:
        model.set_attn_implementation("sdpa")
    else:
        set_sparsex_config(model, mc)
        if method == "oracle":
            register_oracle()
        model.set_attn_implementation(ORACLE_ATTN if method == "oracle" else "sparsex")
    gen = getattr(model, "generation_config", None)
    if gen is not None:  # evaluated lengths are prefilled in one pass
        gen.prefill_chunk_size = None
    return mc

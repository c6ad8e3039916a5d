"""Hugging Face Transformers integration: the ``"sparsex"`` attention and mask functions.

``import sparsex_hf`` registers both, so ``from_pretrained(..., attn_implementation="sparsex")`` works
with nothing else to call. The mask function never builds a ``[B, 1, Q, KV]`` mask: it returns
``None`` or the 2-D padding mask, and the attention function handles causality, padding, packing and
Mistral's sliding window itself.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from .config import SparseXConfig
from .ops.attention import cu_seqlens_from_position_ids, sparsex_attention
from .patches import TYPE_DEFAULTS, check_model_type

ATTN_NAME = "sparsex"


def get_sparsex_config(obj: Any) -> SparseXConfig:
    """The :class:`SparseXConfig` of a model, a model config, or an attention module
    (``config.sparsex``, a dict or a config; defaults when absent)."""
    config = getattr(obj, "config", obj)
    stored = getattr(config, "sparsex", None)
    if stored is None and getattr(config, "model_type", None) in TYPE_DEFAULTS:
        return TYPE_DEFAULTS[config.model_type]
    return SparseXConfig.from_any(stored)


def set_sparsex_config(model: Any, config: SparseXConfig | Mapping[str, Any] | None = None, **changes: Any) -> SparseXConfig:
    """Store a (validated) Sparse-X config in ``model.config.sparsex``; the next forward uses it.

    ``set_sparsex_config(model, window=1024)`` changes fields of the current config;
    ``set_sparsex_config(model, SparseXConfig(...))`` replaces it.
    """
    base = get_sparsex_config(model) if config is None else SparseXConfig.from_any(config)
    cfg = base.replace(**changes) if changes else base
    model.config.sparsex = cfg.to_dict()
    return cfg


def sparsex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function: ``query [B, Hq, Tq, D]``, ``key/value [B, Hkv, Tk, D]``
    (RoPE applied, cache concatenated, KV heads not repeated) -> ``([B, Tq, Hq, D], None)``."""
    config = module.config
    check_model_type(getattr(config, "model_type", None))
    if not getattr(module, "is_causal", True):
        raise ValueError("Sparse-X attention is causal; it cannot serve a non-causal (bidirectional) attention module.")
    if dropout:
        raise ValueError(
            f"Sparse-X does not implement attention dropout (got dropout={dropout}); set config.attention_dropout=0."
        )
    cfg = get_sparsex_config(config)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"Sparse-X received a {attention_mask.dim()}-D attention mask; it takes only a 2-D padding mask "
            "[batch, kv_len] (its mask function provides that). Do not pass prepared 4-D masks."
        )
    mix = getattr(module, "sparsex_mix", None)  # learned branch weights (training.MixGates), for combine="mix"
    mix_weights = mix() if (mix is not None and cfg.combine == "mix") else None
    layer = getattr(module, "_sparsex_layer", None)  # lent by the attention wrapper (patches/) when cached
    if layer is not None:
        out = _cached_attention(module, layer, query, cfg, scaling, kwargs, mix_weights)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
        if layer.offload_kv:  # a prefill chunk over an offloaded cache reads every past key
            key = layer.keys.to(query.device, non_blocking=True)
            value = layer.values.to(query.device, non_blocking=True)
    cu_k = kwargs.get("cu_seq_lens_k")
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_k is None and attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.shape[-1] == key.shape[2]:
            cu_k = cu_seqlens_from_position_ids(position_ids)
            cu_q = None
    out = sparsex_attention(
        query, key, value, cfg,
        scale=scaling, attention_mask=attention_mask, cu_seqlens=cu_k, cu_seqlens_q=cu_q,
        layer_idx=getattr(module, "layer_idx", None), sliding_window=kwargs.get("sliding_window"),
        mix_weights=mix_weights,
    )
    return out.transpose(1, 2).contiguous(), None


def _cached_attention(module, layer, query, cfg: SparseXConfig, scaling, kwargs, mix_weights=None):
    """The decode path (a few queries, the cache's block summaries), or None where the general path applies:
    dense layers, rows whose padding is not a left prefix, prefill (more queries, or an empty past)."""
    from .ops.attention import sparsex_decode_attention
    from .ops.attention.decode import MAX_DECODE_QUERIES

    tq = query.shape[2]
    layer_idx = getattr(module, "layer_idx", None)
    if (
        layer.offsets is None
        or tq > MAX_DECODE_QUERIES
        or layer.get_seq_length() <= tq
        or (layer_idx is not None and layer_idx in cfg.dense_layers)
        or (cfg.dense_below and layer.get_seq_length() - min(layer.offsets) <= cfg.dense_below)
        or kwargs.get("cu_seq_lens_k") is not None
    ):
        return None
    return sparsex_decode_attention(
        query, layer, cfg, scale=scaling, layer_idx=layer_idx, sliding_window=kwargs.get("sliding_window"),
        mix_weights=mix_weights,
    )


def sparsex_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """``AttentionMaskInterface`` function: ``None`` (no padding) or the 2-D padding mask ``[B, kv_length]``."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def register() -> None:
    """Register ``"sparsex"`` with Transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, sparsex_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sparsex_mask)


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    sparsex: SparseXConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
):
    """``AutoModelForCausalLM.from_pretrained`` with ``attn_implementation="sparsex"`` and a Sparse-X config.

    ``sparsex`` (a config or a dict of fields) overrides the fields stored in the checkpoint's
    ``config.sparsex``; every other keyword goes to ``from_pretrained`` (``gguf_file``, ``dtype``, ...).
    The model type is checked before any weight is loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = kwargs.pop("config", None)
    if config is None:
        config_kwargs = {k: kwargs[k] for k in ("gguf_file", "revision", "trust_remote_code", "cache_dir") if k in kwargs}
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
    check_model_type(getattr(config, "model_type", None))
    stored = get_sparsex_config(config)
    if isinstance(sparsex, SparseXConfig):
        cfg = sparsex
    else:
        cfg = stored.replace(**dict(sparsex or {}))
    config.sparsex = cfg.to_dict()
    kwargs.setdefault("attn_implementation", ATTN_NAME)
    model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
    if getattr(model, "generation_config", None) is not None and kwargs["attn_implementation"] == ATTN_NAME:
        model.generation_config.prefill_chunk_size = cfg.prefill_chunk or None
    return model

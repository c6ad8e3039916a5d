"""The ``"sparsex"`` attention and mask functions that Transformers calls.

``import sparsex_hf`` registers both, so ``from_pretrained(..., attn_implementation="sparsex")`` works with
nothing else to call. The mask function never builds a ``[B, 1, Q, KV]`` mask: it returns ``None`` or the
2-D padding mask, and the attention function handles causality, padding, packing and Mistral's sliding
window itself. With a Sparse-X cache layer lent by the class wrapper (``wrap.py``), a decode step reads
the cache's block summaries and only the attended keys.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..config import SparseXConfig
from ..ops.attention import (
    MAX_DECODE_QUERIES,
    cu_seqlens_from_position_ids,
    decode_goes_dense,
    dense_decode,
    kernel_backend,
    log_once,
    sparsex_attention,
    sparsex_decode_attention,
    sparsex_prompt_anchor,
)
from ..patches import check_model_type
from .configs import TYPE_DEFAULTS, get_sparsex_config
from .static_cache import SparseXStaticLayer
from .wrap import ATTN_NAME, wrap_loaded_classes

__all__ = [
    "ATTN_NAME",
    "TYPE_DEFAULTS",
    "get_sparsex_config",
    "override_attention_op",
    "register",
    "sparsex_attention_forward",
    "sparsex_mask",
]

# The op the attention function calls; evaluation code may observe it through override_attention_op.
_attention_op: Callable[..., torch.Tensor] = sparsex_attention


@contextmanager
def override_attention_op(op: Callable[..., torch.Tensor]):
    """Within the block, the attention function calls ``op(q, k, v, cfg, **kwargs)`` (same contract as
    :func:`sparsex_hf.sparsex_attention`) for its general path; used by the fidelity metrics."""
    global _attention_op
    previous, _attention_op = _attention_op, op
    try:
        yield
    finally:
        _attention_op = previous


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
        raise ValueError(f"Sparse-X does not implement attention dropout (got dropout={dropout}); set "
                         "config.attention_dropout=0.")
    cfg = get_sparsex_config(config)
    _check_mask(attention_mask)
    mix = getattr(module, "sparsex_mix", None)  # learned branch weights (MixGates), for combine="mix"
    mix_weights = mix() if (mix is not None and cfg.combine == "mix") else None
    layer_idx = getattr(module, "layer_idx", None)
    sliding_window = kwargs.get("sliding_window")
    layer = kwargs.pop("sparsex_layer", None)  # the cache's layer, lent by the attention-class wrapper (wrap.py)
    if isinstance(layer, SparseXStaticLayer):
        out = _static_attention(query, key, value, attention_mask, cfg, layer, layer_idx, scaling, sliding_window,
                                mix_weights, kwargs)
        return out.transpose(1, 2).contiguous(), None
    if layer is not None:
        if _decodes(layer, query.shape[2], cfg, layer_idx, kwargs):
            out = _cached_decode(query, layer, cfg, scaling, sliding_window, mix_weights)
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
    out = _attention_op(
        query, key, value, cfg,
        scale=scaling, attention_mask=attention_mask, cu_seqlens=cu_k, cu_seqlens_q=cu_q,
        layer_idx=layer_idx, sliding_window=sliding_window, mix_weights=mix_weights,
    )
    if layer is not None and cfg.anchor and layer.offsets is not None and layer_idx not in cfg.dense_layers:
        # the end of the prompt: blocks that every later decode step adds to its shortlist
        layer.anchor = sparsex_prompt_anchor(query, key, layer.offsets_tensor("cpu"), layer.get_seq_length(), cfg,
                                             sliding_window=sliding_window)  # host offsets: no device sync
    return out.transpose(1, 2).contiguous(), None


def _check_mask(attention_mask) -> None:
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"Sparse-X received a {attention_mask.dim()}-D attention mask; it takes only a 2-D padding mask "
            "[batch, kv_len] (its mask function provides that). Do not pass prepared 4-D masks."
        )


def _static_attention(query, key, value, attention_mask, cfg: SparseXConfig, layer: SparseXStaticLayer, layer_idx,
                      scaling, sliding_window, mix_weights, kwargs) -> torch.Tensor:
    """Attention over a static cache's layer (``key``/``value`` are its full buffers): ``[B, Hq, Tq, D]``.

    A decode step (at most ``MAX_DECODE_QUERIES`` queries after a prefill) reads only tensors, the cache length
    included, so that it compiles into a CUDA graph; a prefill reads the length and the padding on the host and
    runs the general path on the filled columns, eagerly even inside a compiled forward (Transformers compiles
    chunked prefill too)."""
    tq = query.shape[2]
    dense = layer_idx is not None and layer_idx in cfg.dense_layers
    if kwargs.get("cu_seq_lens_k") is not None:
        raise ValueError("packed sequences (cu_seq_lens_k) do not go through a static cache; use the dynamic cache.")
    if cfg.dense_below:
        raise ValueError(f"dense_below={cfg.dense_below} decides per call on the host, which a static cache's compiled "
                         "step cannot; set dense_below=0 (dense layers: dense_layers) or use the dynamic cache.")
    if layer.prefilled and tq <= MAX_DECODE_QUERIES and (torch.compiler.is_compiling() or layer.eager_length > tq):
        return _static_decode(query, cfg, layer, dense, scaling, sliding_window, mix_weights)
    return _static_prefill(query, key, value, attention_mask, cfg, layer, layer_idx, dense, scaling, sliding_window,
                           mix_weights)


@torch.compiler.disable
def _static_prefill(query, key, value, attention_mask, cfg: SparseXConfig, layer: SparseXStaticLayer, layer_idx,
                    dense: bool, scaling, sliding_window, mix_weights) -> torch.Tensor:
    n = layer.length_after_update()  # (read on the host only if the update ran in a compiled forward)
    if not layer.record_offsets(attention_mask, n):
        raise ValueError("a static cache serves rows whose padding is a left prefix of the 2-D attention mask "
                         "(as generate() pads); this mask has padding elsewhere. Use the dynamic cache.")
    # left padding only (checked at the first forward): no row padded, no mask (no device read per layer)
    mask = None if attention_mask is None or not any(layer.offsets) else attention_mask[:, :n]
    out = _attention_op(query, key[:, :, :n], value[:, :, :n], cfg, scale=scaling, attention_mask=mask,
                        layer_idx=layer_idx, sliding_window=sliding_window, mix_weights=mix_weights)
    if not dense:
        layer.refresh(cfg.block_size, query.shape[2], length=n)
        if cfg.anchor:
            layer.set_anchor(sparsex_prompt_anchor(query, key, torch.tensor(layer.offsets), n, cfg,
                                                   sliding_window=sliding_window))
    layer.prefilled = True
    return out


def _static_decode(query, cfg: SparseXConfig, layer: SparseXStaticLayer, dense: bool, scaling, sliding_window,
                   mix_weights) -> torch.Tensor:
    tq = query.shape[2]
    if dense:  # SDPA over the buffer, masked to each row's causal columns (and the model's sliding window)
        cols = torch.arange(layer.max_cache_len, device=query.device)
        off = layer.offsets_tensor(dtype=torch.long)[:, None, None]
        pos_q = layer.cumulative_length - tq + torch.arange(tq, device=query.device)  # cache columns
        ok = (cols >= off) & (cols <= pos_q[None, :, None])
        if sliding_window is not None and cfg.respect_sliding_window:
            ok &= pos_q[None, :, None] - cols < sliding_window
        return torch.nn.functional.scaled_dot_product_attention(query, layer.keys, layer.values, attn_mask=ok[:, None],
                                                                scale=scaling, enable_gqa=True)
    return sparsex_decode_attention(
        query, layer.keys, layer.values, layer.summaries(cfg.block_size, tq), layer.offsets_tensor(),
        layer.cumulative_length, cfg, max_doc_len=layer.max_doc_len(), scale=scaling, sliding_window=sliding_window,
        mix_weights=mix_weights, anchor=layer.anchor if cfg.anchor else None,
    )


def _cached_decode(query, layer, cfg: SparseXConfig, scaling, sliding_window, mix_weights) -> torch.Tensor:
    """A decode step over a :class:`SparseXLayer`: SDPA where its rows share one offset and the cost model says so
    (``dense_when_faster``; the summaries catch up at the next sparse step), else Sparse-X's decode op."""
    n = layer.max_doc_len()
    if (max(layer.offsets) == min(layer.offsets) and kernel_backend(cfg.backend, query.device) == "triton"
            and decode_goes_dense(query, layer.keys, n, cfg, sliding_window)):  # (a GPU's cost model: the kernels')
        return dense_decode(query, layer.keys, layer.values, layer.get_seq_length(), n, scale=scaling)
    return sparsex_decode_attention(
        query, layer.keys, layer.values, layer.summaries(cfg.block_size), layer.offsets_tensor(query.device, torch.int32),
        layer.get_seq_length(), cfg, max_doc_len=n, scale=scaling, sliding_window=sliding_window,
        mix_weights=mix_weights, anchor=layer.anchor,
    )


def _decodes(layer, tq: int, cfg: SparseXConfig, layer_idx, kwargs) -> bool:
    """Whether this call is a decode step over the cache's summaries; the general path serves dense layers,
    rows whose padding is not a left prefix (no offsets recorded), prefill (more queries, or an empty past)."""
    n = layer.get_seq_length()
    return not (
        layer.offsets is None
        or tq > MAX_DECODE_QUERIES
        or n <= tq
        or (layer_idx is not None and layer_idx in cfg.dense_layers)
        or (cfg.dense_below and n - min(layer.offsets) <= cfg.dense_below)
        or kwargs.get("cu_seq_lens_k") is not None
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
    """``AttentionMaskInterface`` function: ``None`` (no padding) or the 2-D padding mask ``[B, kv_length]``.

    Called once per forward of a ``"sparsex"`` model, before its layers run; it also wraps the attention and
    decoder-stack classes of the supported model types that are loaded and not wrapped yet (a model loaded by
    plain Transformers meets Sparse-X here first: ``wrap.wrap_loaded_classes``)."""
    if not torch.compiler.is_compiling():  # (reads sys.modules: a guard that would fail at every import)
        if wrap_loaded_classes() and attention_mask is not None and not bool(attention_mask[:, :1].all()):
            log_once("sparsex: the model classes were wrapped at this model's first forward (loaded without "
                     "sparsex_hf.from_pretrained or apply_sparsex), whose batch is left-padded: unless it passed "
                     "position_ids, this one call counted its positions from column 0, not from each row's first "
                     "token (generate() passes them; later calls count them).")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    if attention_mask.shape[1] < kv_length:  # a static cache (kv_length = its capacity): one shape for every step
        return torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[1]))
    if not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    return attention_mask


def register() -> None:
    """Register ``"sparsex"`` with Transformers' attention and mask registries (idempotent). Nothing else: the
    model classes are wrapped when Sparse-X is asked for (``sparsex_hf.from_pretrained``, ``apply_sparsex``, or a
    ``"sparsex"`` model's first forward, through :func:`sparsex_mask`)."""
    AttentionInterface.register(ATTN_NAME, sparsex_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sparsex_mask)

"""Per-model support for Sparse-X (shipped as ``sparsex_hf.patches``).

Per-model differences are data in ``MODEL_TABLE``, keyed by ``config.model_type``. The attention itself
reaches the models through Transformers' ``AttentionInterface`` registry; what the registry cannot do is
hand the attention the KV cache, so the attention class's ``forward`` is wrapped (no model forward is
copied, no private Transformers helper is touched): for a module whose attention is ``"sparsex"``, the
wrapper turns the cache's layer into a :class:`~sparsex_hf.SparseXLayer` (block summaries for decode),
records each row's left padding, and lends the layer to the attention function for that call. For any
other attention implementation the wrapper calls the original at once.

``import sparsex_hf`` wraps the classes of every supported model type, so ``generate()`` uses the
Sparse-X cache with nothing else to call. ``apply_sparsex`` / ``revert_sparsex`` do (and undo, exactly)
the class wrapping, and for a model instance also the attention implementation, its Sparse-X config
and chunked prefill.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch

from . import llama, mistral

MODEL_TABLE: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (llama, mistral)}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(MODEL_TABLE))
ATTN_NAME = "sparsex"

# model type -> SparseXConfig used when a model's config has no `sparsex` field (apply_sparsex("llama", ...))
TYPE_DEFAULTS: dict[str, Any] = {}


def check_model_type(model_type: str | None) -> ModuleType:
    """The table entry of ``model_type``, or a ``ValueError`` naming the supported ones."""
    entry = MODEL_TABLE.get(model_type)
    if entry is None:
        raise ValueError(
            f"Sparse-X does not support model_type={model_type!r}; supported model types are "
            f"{list(SUPPORTED_MODEL_TYPES)}."
        )
    return entry


def attention_class(model_type: str) -> type:
    """The Transformers attention class of ``model_type`` (imported on demand)."""
    module_name, cls_name = check_model_type(model_type).ATTENTION_CLASS.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def _wrap_forward(original):
    from ..cache import upgrade_layer

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if getattr(self.config, "_attn_implementation", None) != ATTN_NAME or torch.compiler.is_compiling():
            return original(self, *args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = upgrade_layer(cache, self.layer_idx) if cache is not None else None
        if layer is None:
            return original(self, *args, **kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        bsz, tq = hidden.shape[:2]
        layer.set_offsets(kwargs.get("attention_mask"), bsz, layer.get_seq_length() + tq)
        self._sparsex_layer = layer
        try:
            return original(self, *args, **kwargs)
        finally:
            self._sparsex_layer = None

    forward.__sparsex_original__ = original
    return forward


def is_patched(model_type: str) -> bool:
    return hasattr(attention_class(model_type).forward, "__sparsex_original__")


def patch_class(model_type: str) -> None:
    """Wrap the attention class of ``model_type`` (idempotent)."""
    cls = attention_class(model_type)
    if not hasattr(cls.forward, "__sparsex_original__"):
        cls.forward = _wrap_forward(cls.forward)


def unpatch_class(model_type: str) -> None:
    """Put the original ``forward`` back on the attention class of ``model_type`` (idempotent)."""
    cls = attention_class(model_type)
    original = getattr(cls.forward, "__sparsex_original__", None)
    if original is not None:
        cls.forward = original


def apply_sparsex(model_or_model_type, **config: Any):
    """Wire Sparse-X into a model instance or, given a ``model_type`` string, into its classes.

    * ``apply_sparsex(model, window=2048, ...)``: wraps the attention class, stores the (validated) config in
      ``model.config.sparsex``, switches the model to ``attn_implementation="sparsex"`` and sets chunked
      prefill (``generation_config.prefill_chunk_size = config.prefill_chunk``). Returns the model.
    * ``apply_sparsex("mistral", ...)``: wraps the class before any model is loaded; the config becomes the
      default of models of that type whose config has no ``sparsex`` field. Load them with
      ``attn_implementation="sparsex"``.

    Mistral's sliding window is honoured by the attention (``respect_sliding_window``); dense layers come from
    ``dense_layers``. Gradient checkpointing is unaffected (only the attention forward is wrapped).
    """
    from ..config import SparseXConfig

    if isinstance(model_or_model_type, str):
        check_model_type(model_or_model_type)
        patch_class(model_or_model_type)
        if config:
            TYPE_DEFAULTS[model_or_model_type] = SparseXConfig(**config)
        return None
    model = model_or_model_type
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_model_type(model_type)
    from ..integration import get_sparsex_config, set_sparsex_config

    if not hasattr(model, "_sparsex_saved"):
        gen = getattr(model, "generation_config", None)
        model._sparsex_saved = {
            "class_patched": is_patched(model_type),
            "attn": model.config._attn_implementation,
            "sparsex": getattr(model.config, "sparsex", None),
            "has_sparsex": hasattr(model.config, "sparsex"),
            "prefill_chunk_size": getattr(gen, "prefill_chunk_size", None),
        }
    patch_class(model_type)
    cfg = set_sparsex_config(model, get_sparsex_config(model).replace(**config))
    model.set_attn_implementation(ATTN_NAME)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.prefill_chunk_size = cfg.prefill_chunk or None
    return model


def revert_sparsex(model_or_model_type) -> None:
    """Undo :func:`apply_sparsex` exactly. ``revert_sparsex("llama")``: the attention class gets its original
    ``forward`` back (the function object itself; models of that type in ``"sparsex"`` mode then decode by
    the general path, which reads every key, until the class is wrapped again). ``revert_sparsex(model)``: the
    model gets back its attention implementation, config and generation config, and the class is unwrapped
    if that ``apply_sparsex`` call wrapped it (``import sparsex_hf`` wraps the supported classes itself)."""
    if isinstance(model_or_model_type, str):
        check_model_type(model_or_model_type)
        unpatch_class(model_or_model_type)
        TYPE_DEFAULTS.pop(model_or_model_type, None)
        return
    model = model_or_model_type
    model_type = model.config.model_type
    saved = getattr(model, "_sparsex_saved", None)
    if saved is None:
        return
    if not saved["class_patched"]:  # apply_sparsex wrapped the class: unwrap it (import wraps it otherwise)
        unpatch_class(model_type)
    if saved["has_sparsex"]:
        model.config.sparsex = saved["sparsex"]
    elif hasattr(model.config, "sparsex"):
        delattr(model.config, "sparsex")
    model.set_attn_implementation(saved["attn"])
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.prefill_chunk_size = saved["prefill_chunk_size"]
    del model._sparsex_saved


__all__ = [
    "MODEL_TABLE",
    "SUPPORTED_MODEL_TYPES",
    "apply_sparsex",
    "attention_class",
    "check_model_type",
    "patch_class",
    "revert_sparsex",
    "unpatch_class",
]

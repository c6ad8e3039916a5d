"""Lending the KV cache to the attention: the one patch Sparse-X makes to a model class.

Transformers' attention registry hands the attention function the keys and values but not the cache, which
holds what a decode step needs (the block summaries, each row's left padding). So the ``forward`` of each
supported attention class is wrapped: for a module whose attention is ``"sparsex"``, the wrapper turns the
cache's layer into a :class:`~sparsex_hf.SparseXLayer`, records each row's left padding, and lends the layer to
the attention function for that call (``module._sparsex_layer``). For any other attention the wrapper calls the
original at once. No model forward is copied and no private Transformers helper is touched; gradient
checkpointing is unaffected (only the attention forward is wrapped).

Classes are wrapped lazily, so that ``import sparsex_hf`` does not import any model module: by
:func:`wrap_loaded_classes`, which the ``"sparsex"`` mask function calls at the start of every forward (a set
lookup once all are wrapped), and by ``apply_sparsex`` / ``sparsex_hf.from_pretrained``.
"""

from __future__ import annotations

import functools
import sys

import torch

from ..patches import MODEL_TABLE, attention_class, check_model_type
from .cache import upgrade_layer

ATTN_NAME = "sparsex"

__all__ = ["ATTN_NAME", "is_wrapped", "unwrap_class", "wrap_class", "wrap_loaded_classes"]

# model types wrapped automatically once their modeling module is loaded; revert_sparsex("llama") removes one
_AUTO: set[str] = set(MODEL_TABLE)
_DONE: set[str] = set()


def _wrap_forward(original):
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


def is_wrapped(model_type: str) -> bool:
    return hasattr(attention_class(model_type).forward, "__sparsex_original__")


def wrap_class(model_type: str) -> None:
    """Wrap the attention class of ``model_type`` (idempotent); imports its modeling module."""
    cls = attention_class(model_type)
    if not hasattr(cls.forward, "__sparsex_original__"):
        cls.forward = _wrap_forward(cls.forward)
    _DONE.add(model_type)
    _AUTO.add(model_type)


def unwrap_class(model_type: str, keep_auto: bool = False) -> None:
    """Put the original ``forward`` back on the attention class of ``model_type`` (idempotent). Unless
    ``keep_auto``, it is no longer wrapped automatically either (until :func:`wrap_class` is called again)."""
    check_model_type(model_type)
    if not keep_auto:
        _AUTO.discard(model_type)
    _DONE.discard(model_type)
    cls = attention_class(model_type)
    original = getattr(cls.forward, "__sparsex_original__", None)
    if original is not None:
        cls.forward = original


def wrap_loaded_classes() -> None:
    """Wrap the attention classes of supported model types whose modeling module is already imported."""
    if _AUTO <= _DONE:
        return
    for model_type in _AUTO - _DONE:
        if MODEL_TABLE[model_type].attention_module in sys.modules:
            wrap_class(model_type)

"""Lending the KV cache to the attention, and positions to a left-padded batch: the patches Sparse-X makes.

Transformers' attention registry hands the attention function the keys and values but not the cache, which
holds what a decode step needs (the block summaries, each row's left padding). So the ``forward`` of each
supported attention class is wrapped: for a module whose attention is ``"sparsex"``, the wrapper turns the
cache's layer into a :class:`~sparsex_hf.hf.SparseXLayer`, records each row's left padding, and lends the layer to
the attention function for that call through the attention keywords (``sparsex_layer=``, a static cache's
:class:`~sparsex_hf.hf.SparseXStaticLayer` alike: one protocol, ``record_offsets`` / ``offsets_tensor`` /
``summaries`` / ``max_doc_len``). For any other attention the wrapper calls the
original at once. No model forward is copied and no private Transformers helper is touched; gradient
checkpointing is unaffected (only the attention forward is wrapped).

Classes are wrapped when Sparse-X is asked for, never by ``import sparsex_hf``: by ``sparsex_hf.from_pretrained``
and ``apply_sparsex`` before the model's first forward, and otherwise (a model loaded by plain Transformers with
``attn_implementation="sparsex"``) by the ``"sparsex"`` mask function at the model's first forward, before its
layers run (:func:`wrap_loaded_classes`: a set comparison once all are wrapped).
"""

from __future__ import annotations

import functools
import sys

import torch

from ..ops.attention import MAX_DECODE_QUERIES
from ..patches import MODEL_TABLE, attention_class, check_model_type, model_class
from .cache import upgrade_layer
from .generation import wrap_generation
from .static_cache import convertible_static_layer, stamp_lengths, static_layer

ATTN_NAME = "sparsex"

__all__ = ["ATTN_NAME", "is_wrapped", "unwrap_class", "wrap_class", "wrap_loaded_classes"]

# model types wrapped automatically once their modeling module is loaded; revert_sparsex("llama") removes one
_AUTO: set[str] = set(MODEL_TABLE)
_DONE: set[str] = set()


def _wrap_forward(original):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if getattr(self.config, "_attn_implementation", None) != ATTN_NAME:
            return original(self, *args, **kwargs)
        cache = _cache_of(kwargs)
        static = static_layer(cache, self.layer_idx)  # (traceable: a compiled step finds it with no graph break)
        if static is None and convertible_static_layer(cache, self.layer_idx):  # Transformers' own static layer
            static = _upgrade_eagerly(cache, self.layer_idx, self.config)
        if static is not None:  # a static cache's layer goes through the attention kwargs
            return original(self, *args, sparsex_layer=static, **kwargs)
        if torch.compiler.is_compiling():
            return original(self, *args, **kwargs)
        layer = upgrade_layer(cache, self.layer_idx) if cache is not None else None
        if layer is None:
            return original(self, *args, **kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        bsz, tq = hidden.shape[:2]
        layer.record_offsets(kwargs.get("attention_mask"), layer.get_seq_length() + tq, bsz)
        return original(self, *args, sparsex_layer=layer, **kwargs)

    forward.__sparsex_original__ = original
    return forward


def _cache_of(kwargs):
    """The cache a forward was given (``cache`` in Transformers 5.2x, ``past_key_values`` before)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


@torch.compiler.disable
def _upgrade_eagerly(cache, layer_idx: int, config):
    """``upgrade_layer`` for a Transformers static layer, outside any trace (a compiled chunked prefill meets them
    first); the model's sliding window tells whether a sliding-window layer holds the whole capacity."""
    return upgrade_layer(cache, layer_idx, getattr(config, "sliding_window", None))


def _wrap_model_forward(original):
    """The decoder stack's ``forward``, for a ``"sparsex"`` model:

    - called with a 2-D padding mask and no ``position_ids``, the positions count from each row's first real token,
      as ``generate()`` makes them (RoPE is relative, so dense attention gives the same logits either way; Sparse-X's
      block summaries of rotated keys are not shift-invariant, so a left-padded row would otherwise differ from the
      same row alone);
    - a prefill (more than ``MAX_DECODE_QUERIES`` queries) inside a compiled forward (``generate()`` runs a static
      cache's prompt chunks through the compiled decode step) runs the whole stack eagerly: one graph break per
      chunk instead of one at every layer's attention, whose prefill is eager anyway."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if getattr(self.config, "_attn_implementation", None) != ATTN_NAME:
            return original(self, *args, **kwargs)
        mask = kwargs.get("attention_mask")
        hidden = kwargs.get("inputs_embeds")
        ids = args[0] if args else kwargs.get("input_ids")
        q_len = None if ids is None and hidden is None else (ids if ids is not None else hidden).shape[1]
        if kwargs.get("position_ids") is None and len(args) <= 1 and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        if torch.compiler.is_compiling():
            if q_len is not None and q_len > MAX_DECODE_QUERIES:
                return _eager_call(_stamped, original, self, *args, **kwargs)
            return original(self, *args, **kwargs)
        return _stamped(original, self, *args, **kwargs)

    forward.__sparsex_original__ = original
    return forward


@torch.compiler.disable
def _eager_call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _stamped(original, self, *args, **kwargs):
    """An eager forward of the stack: a static cache's length read once for all its layers (``stamp_lengths``)."""
    stamp_lengths(_cache_of(kwargs))
    return original(self, *args, **kwargs)


def _wrap(cls, wrapper) -> None:
    if not hasattr(cls.forward, "__sparsex_original__"):
        cls.forward = wrapper(cls.forward)


def _unwrap(cls) -> None:
    original = getattr(cls.forward, "__sparsex_original__", None)
    if original is not None:
        cls.forward = original


def is_wrapped(model_type: str) -> bool:
    return hasattr(attention_class(model_type).forward, "__sparsex_original__")


def wrap_class(model_type: str) -> None:
    """Wrap the attention and decoder-stack classes of ``model_type`` (idempotent; imports its modeling module),
    and let ``generate()`` choose the cache of Sparse-X models (:mod:`sparsex_hf.hf.generation`)."""
    _wrap(attention_class(model_type), _wrap_forward)
    _wrap(model_class(model_type), _wrap_model_forward)
    wrap_generation()
    _DONE.add(model_type)
    _AUTO.add(model_type)


def unwrap_class(model_type: str, keep_auto: bool = False) -> None:
    """Put the original ``forward`` back on the attention class of ``model_type`` (idempotent). Unless
    ``keep_auto``, it is no longer wrapped automatically either (until :func:`wrap_class` is called again)."""
    check_model_type(model_type)
    if not keep_auto:
        _AUTO.discard(model_type)
    _DONE.discard(model_type)
    _unwrap(attention_class(model_type))
    _unwrap(model_class(model_type))


def wrap_loaded_classes() -> bool:
    """Wrap the classes of supported model types whose modeling module is imported and that are not wrapped yet
    (a set comparison once all are); returns whether any was wrapped now."""
    if _AUTO <= _DONE:
        return False
    wrapped = False
    for model_type in _AUTO - _DONE:
        if MODEL_TABLE[model_type].attention_module in sys.modules:
            wrap_class(model_type)
            wrapped = True
    return wrapped

"""Lending the KV cache to the attention, and positions to a left-padded batch: the patches Sparse-X makes.

Transformers' attention registry hands the attention function the keys and values but not the cache, which
holds what a decode step needs (the block summaries, each row's left padding). So the ``forward`` of each
supported attention class is wrapped: for a module whose attention is ``"sparsex"``, the wrapper turns the
cache's layer into a :class:`~sparsex_hf.hf.SparseXLayer`, records each row's left padding, and lends the layer to
the attention function for that call (``module._sparsex_layer``). For any other attention the wrapper calls the
original at once. No model forward is copied and no private Transformers helper is touched; gradient
checkpointing is unaffected (only the attention forward is wrapped).

Classes are wrapped when their modeling module is imported, so that ``import sparsex_hf`` imports no model module
and a model is wrapped before its first forward: ``install()`` (run by ``import sparsex_hf``) wraps the modules
already imported and puts a finder on ``sys.meta_path`` that wraps a supported model's module right after it
executes. The ``"sparsex"`` mask function calls :func:`wrap_loaded_classes` as a fallback (a set lookup once all
are wrapped).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

import torch

from ..patches import MODEL_TABLE, attention_class, check_model_type, model_class
from .cache import upgrade_layer
from .static_cache import convertible_static_layer, static_layer

ATTN_NAME = "sparsex"

__all__ = ["ATTN_NAME", "install", "is_wrapped", "unwrap_class", "wrap_class", "wrap_loaded_classes"]

# model types wrapped automatically once their modeling module is loaded; revert_sparsex("llama") removes one
_AUTO: set[str] = set(MODEL_TABLE)
_DONE: set[str] = set()


def _wrap_forward(original):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if getattr(self.config, "_attn_implementation", None) != ATTN_NAME:
            return original(self, *args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
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
        layer.set_offsets(kwargs.get("attention_mask"), bsz, layer.get_seq_length() + tq)
        self._sparsex_layer = layer
        try:
            return original(self, *args, **kwargs)
        finally:
            self._sparsex_layer = None

    forward.__sparsex_original__ = original
    return forward


@torch.compiler.disable
def _upgrade_eagerly(cache, layer_idx: int, config):
    """``upgrade_layer`` for a Transformers static layer, outside any trace (a compiled chunked prefill meets them
    first); the model's sliding window tells whether a sliding-window layer holds the whole capacity."""
    return upgrade_layer(cache, layer_idx, getattr(config, "sliding_window", None))


def _wrap_model_forward(original):
    """The decoder stack's ``forward``: for a ``"sparsex"`` model called with a 2-D padding mask and no
    ``position_ids``, the positions count from each row's first real token, as ``generate()`` makes them (RoPE is
    relative, so dense attention gives the same logits either way; Sparse-X's block summaries of rotated keys
    are not shift-invariant, so a left-padded row would otherwise differ from the same row alone)."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        if (getattr(self.config, "_attn_implementation", None) == ATTN_NAME and kwargs.get("position_ids") is None
                and len(args) <= 1 and isinstance(mask, torch.Tensor) and mask.dim() == 2):
            hidden = kwargs.get("inputs_embeds")
            ids = args[0] if args else kwargs.get("input_ids")
            q_len = (ids if ids is not None else hidden).shape[1]
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        return original(self, *args, **kwargs)

    forward.__sparsex_original__ = original
    return forward


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
    """Wrap the attention and decoder-stack classes of ``model_type`` (idempotent); imports its modeling module."""
    _wrap(attention_class(model_type), _wrap_forward)
    _wrap(model_class(model_type), _wrap_model_forward)
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


class _Loader(importlib.abc.Loader):
    """The modeling module's own loader, then the wrapping of its classes."""

    def __init__(self, loader, model_type: str):
        self.loader, self.model_type = loader, model_type

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        if self.model_type in _AUTO:
            spec = MODEL_TABLE[self.model_type]
            _wrap(getattr(module, spec.attention_class), _wrap_forward)
            _wrap(getattr(module, spec.model_class), _wrap_model_forward)
            _DONE.add(self.model_type)


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a supported model's modeling module it returns the regular spec with a loader
    that wraps the module's classes after executing it."""

    def find_spec(self, fullname, path, target=None):
        model_type = next((t for t, s in MODEL_TABLE.items() if s.attention_module == fullname), None)
        if model_type is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, model_type)
        return spec


def install() -> None:
    """Wrap the supported modeling modules already imported, and those imported later (idempotent)."""
    if not any(isinstance(f, _WrapOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _WrapOnImport())
    wrap_loaded_classes()


def wrap_loaded_classes() -> None:
    """Wrap the attention classes of supported model types whose modeling module is already imported."""
    if _AUTO <= _DONE:
        return
    for model_type in _AUTO - _DONE:
        if MODEL_TABLE[model_type].attention_module in sys.modules:
            wrap_class(model_type)

"""The cache ``generate()`` builds for a Sparse-X model when the call names none.

Transformers builds a dynamic cache and runs every decode step eagerly, one Python call per layer: on a GPU that
host work, not the attention, sets the speed. A static cache lets Transformers compile the decode step into one
CUDA graph. So for a ``"sparsex"`` model on a CUDA device (``SparseXConfig.generate_cache="auto"``) a call that
names no cache (no ``cache_implementation``, no cache object, ``use_cache`` on, ``disable_compile`` off) gets a
:class:`~sparsex_hf.SparseXStaticCache`. Its capacity is the call's prompt + new tokens rounded up to a multiple of
a quarter of the largest power of two not above it (at most a quarter more memory), and never less than the largest
capacity this model has used: a new capacity compiles the step again, so lengths share a few. Whatever the call
names wins; the choice is logged once per model.

The hook wraps ``GenerationMixin._prepare_cache_for_generation`` when Sparse-X is asked for (with the model
classes, :func:`~sparsex_hf.hf.wrap.wrap_class`); for any other model it calls the original at once.
"""

from __future__ import annotations

import functools
import logging

from transformers import GenerationMixin

from .cache import CACHE_KWARG
from .configs import get_sparsex_config
from .static_cache import SparseXStaticCache

logger = logging.getLogger("sparsex_hf")

_CAPACITY = "_sparsex_static_capacity"  # the largest capacity a model's automatic static cache had


def static_capacity(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of a quarter of the largest power of two <= ``tokens`` (256 at least):
    four capacities per doubling, at most a quarter more than asked."""
    step = max(256, (1 << (max(tokens, 1).bit_length() - 1)) // 4)
    return -(-tokens // step) * step


# the generation modes that take the automatic static cache: not assisted generation (its draft model and rollback)
# nor the rarer searches, which keep Transformers' own cache
STATIC_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")


def automatic_cache(model, generation_config, model_kwargs: dict, max_cache_length: int,
                    generation_mode=None) -> SparseXStaticCache | None:
    """The static cache to give a call of ``model.generate`` that names no cache, or None for Transformers' own
    choice (see the module docstring)."""
    if getattr(model.config, "_attn_implementation", None) != "sparsex":
        return None
    mode = get_sparsex_config(model.config).generate_cache
    if (mode == "dynamic" or model_kwargs.get(CACHE_KWARG) is not None
            or generation_config.cache_implementation is not None or generation_config.use_cache is False
            or getattr(generation_config, "is_assistant", False)
            or (generation_mode is not None and getattr(generation_mode, "value", generation_mode) not in STATIC_MODES)
            or (mode == "auto" and (model.device.type != "cuda" or generation_config.disable_compile))):
        return None
    capacity = max(static_capacity(max_cache_length), getattr(model, _CAPACITY, 0))
    setattr(model, _CAPACITY, capacity)
    if not getattr(model, "_sparsex_cache_logged", False):
        model._sparsex_cache_logged = True
        logger.warning("sparsex: generate() uses a Sparse-X static cache (%d tokens; a longer call grows it) so "
                       "that Transformers compiles the decode step; the first call of each capacity compiles. "
                       "cache_implementation='dynamic' (or SparseXConfig.generate_cache='dynamic') keeps the "
                       "dynamic cache.", capacity)
    return SparseXStaticCache(model.config, max_cache_len=capacity)


def _wrap_prepare(original):
    @functools.wraps(original)
    def prepare(self, generation_config, model_kwargs, *args, **kwargs):
        mode, max_cache_length = (args[0], args[2]) if len(args) > 2 else (kwargs["generation_mode"],
                                                                          kwargs["max_cache_length"])
        cache = automatic_cache(self, generation_config, model_kwargs, max_cache_length, mode)
        if cache is None:
            return original(self, generation_config, model_kwargs, *args, **kwargs)
        model_kwargs[CACHE_KWARG] = cache

    prepare.__sparsex_original__ = original
    return prepare


def wrap_generation() -> None:
    """Let ``generate()`` choose the cache for Sparse-X models (idempotent)."""
    current = GenerationMixin._prepare_cache_for_generation
    if not hasattr(current, "__sparsex_original__"):
        GenerationMixin._prepare_cache_for_generation = _wrap_prepare(current)

"""The cache ``generate()`` builds for a Sparse-X model when the call names none.

Transformers builds a dynamic cache and runs every decode step eagerly, one Python call per layer: on a GPU that
host work, not the attention, sets the speed. A static cache lets Transformers compile the decode step into one
CUDA graph. So for a ``"sparsex"`` model on a CUDA device (``SparseXConfig.generate_cache="auto"``) a call that
names no cache (no ``cache_implementation``, no cache object, ``use_cache`` on, ``disable_compile`` off) gets a
:class:`~sparsex_hf.SparseXStaticCache`. Its capacity is the call's prompt + new tokens rounded up to a multiple of
a quarter of the largest power of two not above it (at most a quarter more memory), and never less than the largest
capacity this model has used: a new capacity compiles the step again, so lengths share a few. Whatever the call
names wins; the choice is logged once per model.

A call that does not return its cache (no ``return_dict_in_generate``) leaves it on the model, and the next call of
the same capacity and batch empties and reuses it: the buffers keep their addresses, so the compiled step's CUDA
graph replays at once instead of being recorded again, and nothing is allocated. The price is that the cache's
memory stays allocated between calls; ``release_generation_cache(model)`` frees it.

Transformers runs a chunked prefill (``prefill_chunk_size``, which Sparse-X sets) through the same compiled call as
the decode steps. A Sparse-X prefill is eager anyway (its lengths are read on the host), so for a ``"sparsex"``
model the compiled call hands any forward of more than ``MAX_DECODE_QUERIES`` tokens to the eager model: no graph
break and no CUDA-graph bookkeeping per prompt chunk, and the prefill costs what the dynamic cache's does.

Each step of Transformers' decoding loop asks the GPU whether every row has stopped (``StopCheck``: a device read),
so the host waits for each step to finish before it prepares the next, and the GPU idles while it does (on an H200
a compiled 1B-shaped step was busy about half of its 4 ms). Transformers has a check that reads the answer one
step late (``DeferredStopCheck``: an early stop costs one extra forward, which it undoes) but uses it on ``"mps"``
only. For a Sparse-X cache on a device of ``DEFER_STOP_DEVICES`` whose cache the call does not return, it is used
too: the host queues step ``n + 1`` while the GPU runs step ``n``.

The hooks wrap ``GenerationMixin._prepare_cache_for_generation``, ``get_compiled_call`` and
``DeferredStopCheck.is_supported`` when Sparse-X is asked for (with the model classes,
:func:`~sparsex_hf.hf.wrap.wrap_class`); for any other model they call the originals at once.
"""

from __future__ import annotations

import functools
import logging

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import utils as generation_utils

from ..ops.attention import MAX_DECODE_QUERIES
from .cache import CACHE_KWARG, SparseXLayer
from .configs import get_sparsex_config
from .static_cache import SparseXStaticCache, SparseXStaticLayer

logger = logging.getLogger("sparsex_hf")

_CAPACITY = "_sparsex_static_capacity"  # the largest capacity a model's automatic static cache had
_KEPT = "_sparsex_static_cache"  # the last automatic cache that no call returned, for the next call to reuse


def static_capacity(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of a quarter of the largest power of two <= ``tokens`` (256 at least):
    four capacities per doubling, at most a quarter more than asked."""
    step = max(256, (1 << (max(tokens, 1).bit_length() - 1)) // 4)
    return -(-tokens // step) * step


# the generation modes that take the automatic static cache: not assisted generation (its draft model and rollback)
# nor the rarer searches, which keep Transformers' own cache
STATIC_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")


def automatic_cache(model, generation_config, model_kwargs: dict, max_cache_length: int,
                    generation_mode=None, batch_size: int = 1) -> SparseXStaticCache | None:
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
    rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
    kept = getattr(model, _KEPT, None)
    setattr(model, _KEPT, None)  # (dropped first: its memory is free for a new one)
    if kept is not None and _fits(kept, capacity, rows, model):
        kept.reset()
        cache = kept
    else:
        cache = SparseXStaticCache(model.config, max_cache_len=capacity)
    if not generation_config.return_dict_in_generate:  # the call returns no cache: the next call may reuse it
        setattr(model, _KEPT, cache)
    if not getattr(model, "_sparsex_cache_logged", False):
        model._sparsex_cache_logged = True
        logger.warning("sparsex: generate() uses a Sparse-X static cache (%d tokens; a longer call grows it) so "
                       "that Transformers compiles the decode step; the first call of each capacity compiles. "
                       "cache_implementation='dynamic' (or SparseXConfig.generate_cache='dynamic') keeps the "
                       "dynamic cache.", capacity)
    return cache


def _fits(cache: SparseXStaticCache, capacity: int, rows: int, model) -> bool:
    """Whether a kept cache serves a call of ``rows`` rows and this capacity on the model's device and dtype."""
    layer = cache.layers[0]
    return (layer.max_cache_len == capacity and layer.is_initialized and layer.keys.shape[0] == rows
            and layer.keys.device == model.device and layer.keys.dtype == model.dtype)


def _wrap_prepare(original):
    @functools.wraps(original)
    def prepare(self, generation_config, model_kwargs, *args, **kwargs):
        mode, batch_size, max_cache_length = args[:3] if len(args) > 2 else (
            kwargs["generation_mode"], kwargs["batch_size"], kwargs["max_cache_length"])
        cache = automatic_cache(self, generation_config, model_kwargs, max_cache_length, mode, batch_size)
        if cache is None:
            return original(self, generation_config, model_kwargs, *args, **kwargs)
        model_kwargs[CACHE_KWARG] = cache

    prepare.__sparsex_original__ = original
    return prepare


def eager_prefill(eager, compiled):
    """A forward that runs ``compiled`` for a decode step (at most ``MAX_DECODE_QUERIES`` tokens a row) and
    ``eager`` for anything longer (a prompt chunk)."""
    def call(*args, **kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        return (eager if x is not None and x.shape[1] > MAX_DECODE_QUERIES else compiled)(*args, **kwargs)

    return call


def _wrap_compiled_call(original):
    @functools.wraps(original)
    def get_compiled_call(self, *args, **kwargs):
        compiled = original(self, *args, **kwargs)
        if getattr(self.config, "_attn_implementation", None) != "sparsex" or compiled == self.__call__:
            return compiled
        return eager_prefill(self.__call__, compiled)

    get_compiled_call.__sparsex_original__ = original
    return get_compiled_call


# devices where generate() over a Sparse-X cache reads whether to stop one step late (see the module docstring)
DEFER_STOP_DEVICES = ("cuda",)


def _wrap_stop_check(original):
    @functools.wraps(original)
    def is_supported(device, cache, cache_is_returned, is_assistant=False):
        if original(device, cache, cache_is_returned, is_assistant=is_assistant):
            return True
        return (torch.device(device).type in DEFER_STOP_DEVICES and not is_assistant and not cache_is_returned
                and any(isinstance(layer, (SparseXLayer, SparseXStaticLayer)) for layer in getattr(cache, "layers", ())))

    is_supported.__sparsex_original__ = original
    return staticmethod(is_supported)


def wrap_generation() -> None:
    """Let ``generate()`` choose the cache for Sparse-X models, run their prompt chunks eagerly and read whether to
    stop one step late (idempotent)."""
    check = getattr(generation_utils, "DeferredStopCheck", None)  # (Transformers 5.17+)
    if check is not None and not hasattr(check.is_supported, "__sparsex_original__"):
        check.is_supported = _wrap_stop_check(check.is_supported)
    current = GenerationMixin._prepare_cache_for_generation
    if not hasattr(current, "__sparsex_original__"):
        GenerationMixin._prepare_cache_for_generation = _wrap_prepare(current)
    for owner in (GenerationMixin, PreTrainedModel):  # (PreTrainedModel defines it in Transformers 5.x)
        current = vars(owner).get("get_compiled_call")
        if current is not None:
            if not hasattr(current, "__sparsex_original__"):
                owner.get_compiled_call = _wrap_compiled_call(current)
            break


def release_generation_cache(model) -> None:
    """Free the static cache that ``generate()`` left on ``model`` for its next call (see the module docstring)."""
    setattr(model, _KEPT, None)

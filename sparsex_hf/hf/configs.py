"""A model's :class:`~sparsex_hf.SparseXConfig`: read from ``config.sparsex`` (parsed once per stored value), or the
model type's default (``apply_sparsex("<type>", ...)``)."""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

from ..config import SparseXConfig

# model type -> SparseXConfig used when a model's config has no `sparsex` field (apply_sparsex("llama", ...))
TYPE_DEFAULTS: dict[str, SparseXConfig] = {}

# parsed configs by model config: (the stored dict as parsed, the SparseXConfig). Validation runs when the
# stored value changes, not at every layer of every forward.
_PARSED: weakref.WeakKeyDictionary[Any, tuple[Any, SparseXConfig]] = weakref.WeakKeyDictionary()


def get_sparsex_config(obj: Any) -> SparseXConfig:
    """The :class:`SparseXConfig` of a model, a model config, or an attention module (``config.sparsex``, a
    dict or a config; the model type's default from ``apply_sparsex("<type>", ...)``, else the defaults)."""
    config = getattr(obj, "config", obj)
    stored = getattr(config, "sparsex", None)
    if stored is None and getattr(config, "model_type", None) in TYPE_DEFAULTS:
        return TYPE_DEFAULTS[config.model_type]
    if torch.compiler.is_compiling():
        return _config_constant(stored)
    if isinstance(stored, SparseXConfig):
        return SparseXConfig.from_any(stored)
    try:
        hit = _PARSED.get(config)
    except TypeError:  # not weak-referenceable: parse every time
        return SparseXConfig.from_any(stored)
    if hit is not None and hit[0] == stored:
        return hit[1]
    cfg = SparseXConfig.from_any(stored)
    _PARSED[config] = (copy.deepcopy(dict(stored)), cfg)  # deep: an in-place edit of a list field is seen too
    return cfg


@torch.compiler.assume_constant_result
def _config_constant(stored) -> SparseXConfig:
    """The stored config parsed when a compiled forward is traced (a constant of the graph: a changed
    ``config.sparsex`` takes effect in eager calls, and in compiled ones after ``torch.compiler.reset()``)."""
    return SparseXConfig.from_any(stored)

"""A model's :class:`~sparsex_hf.SparseXConfig`: read from ``config.sparsex`` (parsed once per stored value), or the
model type's default (``apply_sparsex("<type>", ...)``)."""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

from ..config import SparseXConfig, StoredConfig, config_from_json

# model type -> SparseXConfig used when a model's config has no `sparsex` field (apply_sparsex("llama", ...))
TYPE_DEFAULTS: dict[str, SparseXConfig] = {}

# parsed configs by id(model config): (a weak reference to it, the stored dict as parsed, the SparseXConfig).
# Validation runs when the stored value changes, not at every layer of every forward. (Keyed by id: Transformers
# 5's model configs are dataclasses with __eq__, so they are not hashable.)
_PARSED: dict[int, tuple[weakref.ref, Any, SparseXConfig]] = {}


def get_sparsex_config(obj: Any) -> SparseXConfig:
    """The :class:`SparseXConfig` of a model, a model config, or an attention module (``config.sparsex``, a
    dict or a config; the model type's default from ``apply_sparsex("<type>", ...)``, else the defaults)."""
    config = getattr(obj, "config", obj)
    stored = getattr(config, "sparsex", None)
    if stored is None and getattr(config, "model_type", None) in TYPE_DEFAULTS:
        return TYPE_DEFAULTS[config.model_type]
    if torch.compiler.is_compiling():
        # a StoredConfig (a dict subclass) is no constant to torch.compile 2.11: the JSON of its last eager parse is
        parsed = getattr(stored, "parsed_json", None) if isinstance(stored, StoredConfig) else None
        return _config_constant(stored if parsed is None else parsed)
    if isinstance(stored, SparseXConfig):
        return SparseXConfig.from_any(stored)
    cfg = _parse(config, stored)
    if isinstance(stored, StoredConfig):
        stored.parsed_json = cfg.json
    return cfg


def _parse(config, stored) -> SparseXConfig:
    key = id(config)
    hit = _PARSED.get(key)
    if hit is not None and hit[0]() is config and hit[1] == stored:
        return hit[2]
    cfg = SparseXConfig.from_any(stored)
    try:
        ref = weakref.ref(config, lambda _, key=key: _PARSED.pop(key, None))
    except TypeError:  # not weak-referenceable: parsed every time
        return cfg
    _PARSED[key] = (ref, copy.deepcopy(dict(stored)) if stored is not None else None, cfg)  # deep: list edits seen
    return cfg


@torch.compiler.assume_constant_result
def _config_constant(stored) -> SparseXConfig:
    """The stored config (or its JSON) parsed when a compiled forward is traced (a constant of the graph: a changed
    ``config.sparsex`` takes effect in eager calls, and in compiled ones after ``torch.compiler.reset()``)."""
    return config_from_json(stored) if isinstance(stored, str) else SparseXConfig.from_any(stored)

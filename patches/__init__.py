"""Per-model support for Sparse-X (shipped as ``sparsex_hf.patches``).

Per-model differences are data in ``MODEL_TABLE``, keyed by ``config.model_type``; the attention
itself reaches the models through Transformers' ``AttentionInterface`` registry, so nothing here
replaces a model's forward.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from . import llama, mistral

MODEL_TABLE: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (llama, mistral)}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(MODEL_TABLE))


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


__all__ = ["MODEL_TABLE", "SUPPORTED_MODEL_TYPES", "attention_class", "check_model_type"]

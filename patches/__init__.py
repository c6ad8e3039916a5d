"""Per-model support for Sparse-X (shipped as ``sparsex_hf.patches``): one table row per ``model_type``.

The attention reaches a model through Transformers' ``AttentionInterface`` registry, so a model family is
supported when its attention class goes through that registry and nothing in its attention is beyond what
Sparse-X expresses. What differs between families is data, kept here; the code that uses it (wrapping the
attention class so the attention can reach the KV cache, the config checks) is in ``sparsex_hf.hf``.
This is the only place that names ``transformers.models.*``; the modules are imported on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["MODEL_TABLE", "SUPPORTED_MODEL_TYPES", "ModelSpec", "attention_class", "check_model_type", "model_class"]


@dataclass(frozen=True)
class ModelSpec:
    """What Sparse-X needs to know about one model family.

    Attributes:
        model_type: ``config.model_type``.
        attention_module: the module holding the attention class (``transformers.models.<x>.modeling_<x>``).
        attention_class: the attention class's name; its ``forward`` is wrapped to lend the attention the cache.
        model_class: the decoder stack's class (below the LM head); its ``forward`` is wrapped to give a left-padded
            batch without ``position_ids`` the positions ``generate()`` gives it (counted from each row's first
            real token), so that such a row gets the same result as alone.
        lora_targets: the attention projections the fine-tuning recipe puts LoRA on by default.
    """

    model_type: str
    attention_module: str
    attention_class: str
    model_class: str
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


MODEL_TABLE: dict[str, ModelSpec] = {
    spec.model_type: spec
    for spec in (
        ModelSpec("llama", "transformers.models.llama.modeling_llama", "LlamaAttention", "LlamaModel"),
        # Mistral passes config.sliding_window (4096 by default; None from v0.2) to the attention function as
        # the `sliding_window` kwarg, which Sparse-X honours (SparseXConfig.respect_sliding_window)
        ModelSpec("mistral", "transformers.models.mistral.modeling_mistral", "MistralAttention", "MistralModel"),
        # Qwen2 / Qwen2.5: biases on q/k/v; layers of type "sliding_attention" pass their window as the kwarg
        ModelSpec("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2Attention", "Qwen2Model"),
        # Qwen3: per-head RMSNorm on q and k, applied before the attention function
        ModelSpec("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3Attention", "Qwen3Model"),
        # Phi-3: fused qkv projection, split before the attention function; config.sliding_window as the kwarg
        ModelSpec("phi3", "transformers.models.phi3.modeling_phi3", "Phi3Attention", "Phi3Model", ("qkv_proj", "o_proj")),
    )
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(MODEL_TABLE))


def check_model_type(model_type: str | None) -> ModelSpec:
    """The table row of ``model_type``, or a ``ValueError`` naming the supported ones."""
    spec = MODEL_TABLE.get(model_type)
    if spec is None:
        raise ValueError(
            f"Sparse-X does not support model_type={model_type!r}; supported model types are "
            f"{list(SUPPORTED_MODEL_TYPES)}."
        )
    return spec


def attention_class(model_type: str) -> type:
    """The Transformers attention class of ``model_type`` (its module imported on demand)."""
    spec = check_model_type(model_type)
    return getattr(importlib.import_module(spec.attention_module), spec.attention_class)


def model_class(model_type: str) -> type:
    """The Transformers decoder-stack class of ``model_type`` (its module imported on demand)."""
    spec = check_model_type(model_type)
    return getattr(importlib.import_module(spec.attention_module), spec.model_class)

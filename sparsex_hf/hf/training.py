"""Library pieces of long-context fine-tuning with Sparse-X: RoPE extension, packing with document
boundaries, learned ``mix`` gates, and saving a model loaded from GGUF.

The fine-tuning command (``sparsex-finetune``, ``sparsex_hf.apps.finetune``) is built from these.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SparseXConfig
from ..patches import attention_class

__all__ = ["MixGates", "ROPE_TYPES", "attach_mix_gates", "drop_gguf_marker", "extend_rope", "labels_for",
           "original_length", "pack"]

ROPE_TYPES = ("linear", "yarn", "dynamic", "llama3", "none")


def original_length(config) -> int:
    """The context length the model was trained for (``original_max_position_embeddings`` if already scaled)."""
    rp = getattr(config, "rope_parameters", None) or {}
    return int(rp.get("original_max_position_embeddings") or config.max_position_embeddings)


def extend_rope(config, rope: str, target_length: int) -> dict:
    """Set ``config.rope_parameters`` (transformers v5) for ``target_length`` tokens; the factor is
    ``target_length / original length`` (``rope="none"``: unchanged, any length). ``dynamic`` keeps
    ``max_position_embeddings`` at the original length (its scaling starts beyond it); the others move it to
    ``target_length``. Returns the new parameters."""
    if rope not in ROPE_TYPES:
        raise ValueError(f"rope={rope!r} is not supported; choose one of {', '.join(ROPE_TYPES)}")
    orig = original_length(config)
    rp = dict(getattr(config, "rope_parameters", None) or {})
    if rope == "none":  # the model's own RoPE, at any length (a fine-tune within its context, or a short trial run)
        return rp
    if target_length < orig:
        raise ValueError(f"target_length={target_length} is below the model's own context length {orig}; "
                         f"context extension needs a target >= the original length (rope={rope!r}; rope='none' keeps "
                         "the model's RoPE and takes any length, e.g. a short trial run on a CPU)")
    theta = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if target_length == orig:
        return rp
    factor = target_length / orig
    params = {"rope_type": rope, "factor": factor, "rope_theta": theta, "original_max_position_embeddings": orig}
    if rope == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    config.rope_parameters = params
    if rope != "dynamic":
        config.max_position_embeddings = target_length
    return params


class MixGates(nn.Module):
    """Learned ``combine="mix"`` weights of one attention layer, ``[Hq, 3]`` (local, stride, top-k), kept
    positive as ``exp(log_weights)``. Attached as ``self_attn.sparsex_mix``; the attention function calls it."""

    def __init__(self, num_heads: int, alpha: float, beta: float, gamma: float):
        super().__init__()
        init = torch.tensor([alpha, beta, gamma], dtype=torch.float32).clamp(min=1e-3).log()
        self.log_weights = nn.Parameter(init.expand(num_heads, 3).clone())

    def forward(self) -> torch.Tensor:
        return self.log_weights.float().exp()


def attach_mix_gates(model, cfg: SparseXConfig) -> list[MixGates]:
    """A :class:`MixGates` on every attention module of ``model`` that has none (returned)."""
    cls = attention_class(model.config.model_type)
    gates = []
    for mod in model.modules():
        if isinstance(mod, cls) and not hasattr(mod, "sparsex_mix"):
            mod.sparsex_mix = MixGates(model.config.num_attention_heads, cfg.alpha, cfg.beta, cfg.gamma).to(
                next(mod.parameters()).device)
            gates.append(mod.sparsex_mix)
    return gates


def pack(docs: list[list[int]], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Documents concatenated and cut into ``(input_ids, position_ids)`` of ``length`` tokens; positions restart
    at 0 at every document start (and at every sequence start); the tail that does not fill a sequence is dropped."""
    ids, pos = [], []
    for d in docs:
        ids += d
        pos += list(range(len(d)))
    out = []
    for s in range(0, len(ids) - length + 1, length):
        p = torch.tensor(pos[s : s + length])
        if p[0] != 0:  # a document continued from the previous sequence starts again at 0 here
            first_start = (p == 0).nonzero()
            cut = int(first_start[0]) if len(first_start) else length
            p[:cut] = torch.arange(cut)
        out.append((torch.tensor(ids[s : s + length]), p))
    return out


def labels_for(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Labels with the first token of each document masked (never predicted from another document)."""
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    return labels


def drop_gguf_marker(model) -> None:
    """A model loaded from GGUF holds dequantized float weights but keeps a GGUF quantizer marker, which makes
    ``save_pretrained`` refuse; the merged weights are plain tensors, so the marker is dropped."""
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    if q is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

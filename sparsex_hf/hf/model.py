"""Model-level helpers: loading with Sparse-X, changing its config, wiring it into a model and undoing that."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..config import SparseXConfig
from ..ops.attention.flash4 import flash4_missing, flash4_refusal
from ..patches import check_model_type
from .attention import TYPE_DEFAULTS, get_sparsex_config
from .generation import release_generation_cache
from .training import drop_gguf_marker
from .wrap import ATTN_NAME, unwrap_class, wrap_class

__all__ = ["apply_sparsex", "from_pretrained", "install_load_hooks", "revert_sparsex", "save_pretrained",
           "set_sparsex_config"]


def set_sparsex_config(model: Any, config: SparseXConfig | Mapping[str, Any] | str | None = None,
                       **changes: Any) -> SparseXConfig:
    """Store a (validated) Sparse-X config in ``model.config.sparsex``; the next forward uses it.

    ``set_sparsex_config(model, window=1024)`` changes fields of the current config;
    ``set_sparsex_config(model, SparseXConfig(...))`` (or a preset's name, ``"one-stage"``) replaces it.
    """
    check_model_type(getattr(getattr(model, "config", None), "model_type", None))
    base = get_sparsex_config(model) if config is None else SparseXConfig.from_any(config)
    cfg = base.replace(**changes) if changes else base
    check_for_model(cfg, model.config)
    model.config.sparsex = cfg.stored()
    return cfg


def check_for_model(cfg: SparseXConfig, config) -> None:
    """What a config alone cannot check, against the model and the machine: ``dense_layers`` name layers the model
    has, ``backend="triton"`` has a GPU (or the interpreter) to run on and ``backend="flash4"`` its GPU and
    packages."""
    n = getattr(config, "num_hidden_layers", None)
    if n is not None and any(i >= n for i in cfg.dense_layers):
        raise ValueError(f"dense_layers={list(cfg.dense_layers)} names layers the model does not have: it has {n} "
                         f"(0 to {n - 1}).")
    if (cfg.backend == "triton" and not torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ValueError("backend='triton' runs the Triton kernels, which need a CUDA GPU (none is visible here) or "
                         "TRITON_INTERPRET=1 (slow, for tests); use backend='auto' (the kernels on a GPU, the "
                         "reference elsewhere) or 'torch'.")
    if cfg.backend == "flash4":
        why = flash4_missing(torch.device("cuda")) if torch.cuda.is_available() else "no CUDA GPU is visible here"
        if why:
            raise ValueError(flash4_refusal(why))


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    sparsex: SparseXConfig | Mapping[str, Any] | str | None = None,
    **kwargs: Any,
):
    """``AutoModelForCausalLM.from_pretrained`` with ``attn_implementation="sparsex"`` and a Sparse-X config.

    ``sparsex`` (a config or a dict of fields) overrides the fields stored in the checkpoint's
    ``config.sparsex``; every other keyword goes to ``from_pretrained`` (``gguf_file``, ``dtype``, ...).
    The model type is checked before any weight is loaded. A model read from a GGUF file (dequantized floats) saves
    with ``model.save_pretrained`` like any other (Transformers' own loaders keep a marker that refuses to save:
    :func:`save_pretrained` drops it).
    """
    config = kwargs.pop("config", None)
    if config is None:
        config_kwargs = {k: kwargs[k] for k in ("gguf_file", "revision", "trust_remote_code", "cache_dir") if k in kwargs}
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
    model_type = getattr(config, "model_type", None)
    check_model_type(model_type)
    stored = get_sparsex_config(config)
    sparsex = None if sparsex is None else _check_fields(sparsex)
    cfg = sparsex if isinstance(sparsex, SparseXConfig) else stored.replace(**dict(sparsex or {}))
    check_for_model(cfg, config)
    config.sparsex = cfg.stored()
    kwargs.setdefault("attn_implementation", ATTN_NAME)
    if kwargs["attn_implementation"] == ATTN_NAME:
        wrap_class(model_type)
    model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
    drop_gguf_marker(model)  # GGUF weights load dequantized: model.save_pretrained then works as for any model
    if getattr(model, "generation_config", None) is not None and kwargs["attn_implementation"] == ATTN_NAME:
        model.generation_config.prefill_chunk_size = cfg.prefill_chunk or None
    return model


def apply_sparsex(model_or_model_type, **config: Any):
    """Wire Sparse-X into a model instance or, given a ``model_type`` string, into its classes.

    * ``apply_sparsex(model, window=2048, ...)``: wraps the attention class, stores the (validated) config in
      ``model.config.sparsex``, switches the model to ``attn_implementation="sparsex"`` and sets chunked
      prefill (``generation_config.prefill_chunk_size = config.prefill_chunk``). Returns the model.
    * ``apply_sparsex("mistral", ...)``: wraps the class before any model is loaded; the config becomes the
      default of models of that type whose config has no ``sparsex`` field. Load them with
      ``attn_implementation="sparsex"``.

    Mistral's sliding window is honoured by the attention (``respect_sliding_window``); dense layers come from
    ``dense_layers``. Gradient checkpointing is unaffected (only the attention forward is wrapped).
    """
    if isinstance(model_or_model_type, str):
        check_model_type(model_or_model_type)
        wrap_class(model_or_model_type)
        if config:
            TYPE_DEFAULTS[model_or_model_type] = SparseXConfig(**config)
        return None
    model = model_or_model_type
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_model_type(model_type)
    if not hasattr(model, "_sparsex_saved"):
        gen = getattr(model, "generation_config", None)
        model._sparsex_saved = {
            "attn": model.config._attn_implementation,
            "sparsex": getattr(model.config, "sparsex", None),
            "has_sparsex": hasattr(model.config, "sparsex"),
            "prefill_chunk_size": getattr(gen, "prefill_chunk_size", None),
        }
    wrap_class(model_type)
    cfg = set_sparsex_config(model, get_sparsex_config(model).replace(**config))
    model.set_attn_implementation(ATTN_NAME)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.prefill_chunk_size = cfg.prefill_chunk or None
    return model


def revert_sparsex(model_or_model_type) -> None:
    """Undo :func:`apply_sparsex` exactly.

    ``revert_sparsex("llama")``: the attention and decoder-stack classes get their original ``forward`` back (the
    function objects themselves) and are no longer wrapped automatically; models of that type in ``"sparsex"`` mode
    then decode by the general path, which reads every key, until the classes are wrapped again.
    ``revert_sparsex(model)``: the model gets back its attention implementation, config and generation config (the
    classes stay wrapped: the wrappers step aside for every attention but ``"sparsex"``)."""
    if isinstance(model_or_model_type, str):
        unwrap_class(model_or_model_type)
        TYPE_DEFAULTS.pop(model_or_model_type, None)
        return
    model = model_or_model_type
    saved = getattr(model, "_sparsex_saved", None)
    if saved is None:
        return
    if saved["has_sparsex"]:
        model.config.sparsex = saved["sparsex"]
    elif hasattr(model.config, "sparsex"):
        delattr(model.config, "sparsex")
    model.set_attn_implementation(saved["attn"])
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.prefill_chunk_size = saved["prefill_chunk_size"]
    release_generation_cache(model)
    del model._sparsex_saved


def save_pretrained(model, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` that also works for a model loaded from a GGUF file (its
    weights are dequantized floats, but Transformers keeps a GGUF quantizer marker that refuses to save; it is
    dropped). The Sparse-X config is saved in ``config.json``; the saved model loads with Sparse-X when asked:
    ``from_pretrained(dir, attn_implementation="sparsex")`` or ``sparsex_hf.from_pretrained(dir)``."""
    drop_gguf_marker(model)
    model.save_pretrained(save_directory, **kwargs)


# ---------------------------------------------------------------------------------------------- load hooks
def _check_fields(sparsex) -> SparseXConfig | Mapping[str, Any]:
    """The ``sparsex=`` argument of a load, validated before anything is loaded (fields over the defaults)."""
    if isinstance(sparsex, str):  # a preset by name
        sparsex = SparseXConfig.preset(sparsex)
    if isinstance(sparsex, SparseXConfig):
        return sparsex
    if not isinstance(sparsex, Mapping):
        raise TypeError(f"sparsex= takes a SparseXConfig, a dict of its fields or a preset's name, got "
                        f"{type(sparsex).__name__}.")
    SparseXConfig().replace(**dict(sparsex))
    return dict(sparsex)


def _attn_of(kwargs: Mapping[str, Any], config=None):
    return kwargs.get("attn_implementation") or getattr(config, "_attn_implementation", None)


def _sparsex_kwarg(kwargs: dict, config=None):
    """Pop ``sparsex=`` from a load's keywords; it needs ``attn_implementation="sparsex"``."""
    sparsex = kwargs.pop("sparsex", None)
    if sparsex is not None and _attn_of(kwargs, config) != ATTN_NAME:
        raise ValueError(f"sparsex=... configures Sparse-X attention; load with attn_implementation={ATTN_NAME!r} "
                         f"(got {_attn_of(kwargs, config)!r}).")
    return None if sparsex is None else _check_fields(sparsex)


def _merge_into(config, sparsex) -> SparseXConfig:
    """Check the model type, merge ``sparsex`` over the config's stored fields, validate, store."""
    check_model_type(getattr(config, "model_type", None))
    stored = get_sparsex_config(config)
    if sparsex is None:
        return stored
    cfg = sparsex if isinstance(sparsex, SparseXConfig) else stored.replace(**sparsex)
    check_for_model(cfg, config)
    config.sparsex = cfg.stored()
    return cfg


def _hook(original, before):
    def load(cls, first, *args, **kwargs):
        sparsex = _sparsex_kwarg(kwargs, first if before else None)
        if before and _attn_of(kwargs, first) == ATTN_NAME:  # from_config: check the config before building
            _merge_into(first, sparsex)
            sparsex = None
        model = original(cls, first, *args, **kwargs)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == ATTN_NAME:
            cfg = _merge_into(config, sparsex)
            wrap_class(config.model_type)  # before the model's first forward
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.prefill_chunk_size = cfg.prefill_chunk or None
        return model

    load._sparsex_original = original
    return classmethod(load)


def install_load_hooks() -> None:
    """An opt-in (``import sparsex_hf`` does not call it): make Transformers' loaders follow the package's rule
    (idempotent): ``from_pretrained(..., attn_implementation="sparsex", sparsex={...})`` and ``from_config(...)`` on
    the auto classes and the model classes merge ``sparsex`` over the stored config (the fields are validated
    before loading), refuse a model type without Sparse-X support at load, and set chunked prefill, as
    :func:`from_pretrained` does. This rewires the loaders of every auto class; ``sparsex_hf.from_pretrained`` does
    the same for one load without changing Transformers."""
    for owner, name, before in _loaders():
        current = owner.__dict__.get(name)
        if isinstance(current, classmethod) and not hasattr(current.__func__, "_sparsex_original"):
            setattr(owner, name, _hook(current.__func__, before))


def remove_load_hooks() -> None:
    """Undo :func:`install_load_hooks`: every loader gets its original function back (idempotent)."""
    for owner, name, _ in _loaders():
        current = owner.__dict__.get(name)
        if isinstance(current, classmethod) and hasattr(current.__func__, "_sparsex_original"):
            setattr(owner, name, classmethod(current.__func__._sparsex_original))


def _loaders() -> list[tuple[type, str, bool]]:
    """``(owner, loader name, checks the config before building)`` of every loader the hooks rewire."""
    base = next(c for c in AutoModelForCausalLM.__mro__ if c.__name__ == "_BaseAutoModelClass")
    autos, todo = [], [base]
    while todo:  # every auto class keeps its own copy of the loaders
        autos.append(todo.pop())
        todo.extend(autos[-1].__subclasses__())
    targets = [(PreTrainedModel, "from_pretrained", False), (PreTrainedModel, "_from_config", True)]
    return targets + [(c, name, name == "from_config") for c in autos for name in ("from_pretrained", "from_config")]

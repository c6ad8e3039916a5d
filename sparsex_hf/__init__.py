"""sparsex-hf: Sparse-X hierarchical sparse attention for Hugging Face Transformers.

``import sparsex_hf`` registers ``attn_implementation="sparsex"`` (the attention and mask functions) and changes
nothing else: it imports no model module, wraps no class and patches no loader. The attention and decoder-stack
classes of a supported model type are wrapped when Sparse-X is asked for: by ``sparsex_hf.from_pretrained`` (also
checks the model type and the ``sparsex=`` fields before loading, and sets chunked prefill) and ``apply_sparsex``,
or at the first forward of a model loaded by plain Transformers with ``attn_implementation="sparsex"``.
``sparsex_hf.hf.install_load_hooks()`` makes plain Transformers loaders take ``sparsex=`` too (an opt-in).

Floors, each importing only downwards: ``sparsex_hf.ops`` (tensors in, tensors out) -> the Transformers wing
``sparsex_hf.hf`` with the per-model table ``sparsex_hf.patches`` -> the applications ``sparsex_hf.apps``.
"""

from . import _checkout  # noqa: F401  (first: a source checkout used without installing)
from .config import SparseXConfig
from .hf.attention import get_sparsex_config
from .hf.attention import register as _register
from .hf.cache import SparseXCache
from .hf.generation import release_generation_cache
from .hf.model import (
    apply_sparsex,
    from_pretrained,
    revert_sparsex,
    save_pretrained,
    set_sparsex_config,
)
from .hf.static_cache import SparseXStaticCache
from .ops.attention import SparseXStats, sparsex_attention, sparsex_decode_attention, sparsex_select
from .patches import SUPPORTED_MODEL_TYPES

__version__ = "0.3.0"

_register()  # the attention and mask functions; nothing else changes in Transformers

# what a user calls; the Transformers plumbing (the registered functions, cache layers, MixGates, ...) lives in
# sparsex_hf.hf
__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SparseXCache",
    "SparseXConfig",
    "SparseXStaticCache",
    "SparseXStats",
    "apply_sparsex",
    "from_pretrained",
    "get_sparsex_config",
    "release_generation_cache",
    "revert_sparsex",
    "save_pretrained",
    "set_sparsex_config",
    "sparsex_attention",
    "sparsex_decode_attention",
    "sparsex_select",
]

_MOVED = {"CACHE_KWARG", "MixGates", "SparseXLayer", "SparseXStaticLayer", "install_load_hooks", "register",
          "remove_load_hooks", "sparsex_attention_forward", "sparsex_mask"}


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(f"sparsex_hf.{name} is plumbing, not public API: import it from sparsex_hf.hf "
                             f"(from sparsex_hf.hf import {name}).")
    raise AttributeError(f"module 'sparsex_hf' has no attribute {name!r}")

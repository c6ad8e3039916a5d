"""sparsex-hf: Sparse-X hierarchical sparse attention for Hugging Face Transformers.

``import sparsex_hf`` registers ``attn_implementation="sparsex"`` (it imports no model module: the attention
classes of the supported model types are wrapped when a ``"sparsex"`` model first runs, or by
``from_pretrained`` / ``apply_sparsex``).

Floors, each importing only downwards: ``sparsex_hf.ops`` (tensors in, tensors out) -> the Transformers wing
``sparsex_hf.hf`` with the per-model table ``sparsex_hf.patches`` -> the applications ``sparsex_hf.apps``.
"""

from . import _checkout  # noqa: F401  (first: a source checkout used without installing)
from .config import SparseXConfig
from .hf.attention import get_sparsex_config
from .hf.attention import register as _register
from .hf.cache import SparseXCache
from .hf.model import (
    apply_sparsex,
    from_pretrained,
    revert_sparsex,
    save_pretrained,
    set_sparsex_config,
)
from .hf.model import install_load_hooks as _install_load_hooks
from .hf.static_cache import SparseXStaticCache
from .ops.attention import SparseXStats, sparsex_attention, sparsex_decode_attention
from .patches import SUPPORTED_MODEL_TYPES

__version__ = "0.3.0"

_register()
_install_load_hooks()

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
    "revert_sparsex",
    "save_pretrained",
    "set_sparsex_config",
    "sparsex_attention",
    "sparsex_decode_attention",
]

_MOVED = {"CACHE_KWARG", "MixGates", "SparseXLayer", "SparseXStaticLayer", "register", "sparsex_attention_forward",
          "sparsex_mask"}


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(f"sparsex_hf.{name} is plumbing, not public API: import it from sparsex_hf.hf "
                             f"(from sparsex_hf.hf import {name}).")
    raise AttributeError(f"module 'sparsex_hf' has no attribute {name!r}")

"""sparsex-hf: Sparse-X hierarchical sparse attention for Hugging Face Transformers.

``import sparsex_hf`` registers ``attn_implementation="sparsex"`` (it imports no model module: the attention
classes of the supported model types are wrapped when a ``"sparsex"`` model first runs, or by
``from_pretrained`` / ``apply_sparsex``).

Floors, each importing only downwards: ``sparsex_hf.ops`` (tensors in, tensors out) -> the Transformers wing
``sparsex_hf.hf`` with the per-model table ``sparsex_hf.patches`` -> the applications ``sparsex_hf.apps``.
"""

from .config import SparseXConfig
from .hf.attention import get_sparsex_config, register, sparsex_attention_forward, sparsex_mask
from .hf.cache import CACHE_KWARG, SparseXCache, SparseXLayer
from .hf.model import (
    apply_sparsex,
    from_pretrained,
    install_load_hooks,
    revert_sparsex,
    save_pretrained,
    set_sparsex_config,
)
from .hf.static_cache import SparseXStaticCache, SparseXStaticLayer
from .hf.training import MixGates
from .ops.attention import SparseXStats, sparsex_attention, sparsex_decode_attention
from .patches import SUPPORTED_MODEL_TYPES

__version__ = "0.3.0"

register()
install_load_hooks()

__all__ = [
    "CACHE_KWARG",
    "MixGates",
    "SUPPORTED_MODEL_TYPES",
    "SparseXCache",
    "SparseXConfig",
    "SparseXLayer",
    "SparseXStaticCache",
    "SparseXStaticLayer",
    "SparseXStats",
    "apply_sparsex",
    "from_pretrained",
    "get_sparsex_config",
    "register",
    "revert_sparsex",
    "save_pretrained",
    "set_sparsex_config",
    "sparsex_attention",
    "sparsex_attention_forward",
    "sparsex_decode_attention",
    "sparsex_mask",
]

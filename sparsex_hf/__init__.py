"""sparsex-hf: Sparse-X hierarchical sparse attention for Hugging Face Transformers.

``import sparsex_hf`` registers ``attn_implementation="sparsex"``.
"""

from .config import SparseXConfig
from .integration import (
    from_pretrained,
    get_sparsex_config,
    register,
    set_sparsex_config,
    sparsex_attention_forward,
    sparsex_mask,
)
from .ops.attention import SparseXStats, sparsex_attention
from .patches import SUPPORTED_MODEL_TYPES

__version__ = "0.1.0"

register()

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SparseXConfig",
    "SparseXStats",
    "from_pretrained",
    "get_sparsex_config",
    "register",
    "set_sparsex_config",
    "sparsex_attention",
    "sparsex_attention_forward",
    "sparsex_mask",
]

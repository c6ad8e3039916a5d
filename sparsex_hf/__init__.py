"""sparsex-hf: Sparse-X hierarchical sparse attention for Hugging Face Transformers.

``import sparsex_hf`` registers ``attn_implementation="sparsex"``.
"""

from .cache import SparseXCache, SparseXLayer
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
from .patches import SUPPORTED_MODEL_TYPES, apply_sparsex, patch_class, revert_sparsex

__version__ = "0.1.0"

register()
for _model_type in SUPPORTED_MODEL_TYPES:  # lend the KV cache to the attention (inert for other attentions)
    patch_class(_model_type)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SparseXCache",
    "SparseXLayer",
    "apply_sparsex",
    "revert_sparsex",
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

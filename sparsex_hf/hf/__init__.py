"""The Transformers wing: the registered ``"sparsex"`` attention and mask functions (``attention``), the KV
cache (``cache``), the attention-class wrapper that lends it the cache (``wrap``), model-level helpers
(``model``: ``from_pretrained``, ``apply_sparsex``, ``revert_sparsex``, ``set_sparsex_config``) and the
library pieces of fine-tuning (``training``: RoPE extension, packing, ``MixGates``).

Imports ``sparsex_hf.ops`` and the per-model table ``sparsex_hf.patches``; the applications import it.
"""

from .attention import register, sparsex_attention_forward, sparsex_mask
from .cache import CACHE_KWARG, SparseXLayer
from .model import install_load_hooks, remove_load_hooks
from .static_cache import SparseXStaticLayer
from .training import MixGates

__all__ = ["CACHE_KWARG", "MixGates", "SparseXLayer", "SparseXStaticLayer", "install_load_hooks", "register", "remove_load_hooks",
           "sparsex_attention_forward", "sparsex_mask"]

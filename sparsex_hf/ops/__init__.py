"""Operations: the Sparse-X attention reference and kernels (no transformers imports here)."""

from .attention import SparseXStats, sparsex_attention

__all__ = ["SparseXStats", "sparsex_attention"]

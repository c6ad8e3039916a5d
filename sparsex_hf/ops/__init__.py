"""Operations on tensors: Sparse-X attention's reference and Triton kernels, prefill and decode.

Nothing here imports Transformers or takes a framework object."""

from .attention import SparseXStats, sparsex_attention, sparsex_decode_attention

__all__ = ["SparseXStats", "sparsex_attention", "sparsex_decode_attention"]

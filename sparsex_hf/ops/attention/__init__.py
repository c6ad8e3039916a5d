"""Sparse-X attention on tensors, grouped by role:

* ``api``: the public entry points (prefill, decode, the prompt anchor): input validation and backend dispatch;
* ``dense``: the handoffs to SDPA (where the key sets cover everything, or where the cost model says dense is
  faster);
* ``rules/``: the shared rules (selection rules, documents and padding, the kernels' layout, the cost model);
* ``reference/``: the PyTorch reference (the executable form of ``docs/spec.md``, and the CPU backend);
* ``kernels/``: the Triton kernels and their launch shapes per GPU;
* ``custom_ops``: the kernels as ``torch.library`` custom ops (what ``torch.compile`` traces).

Tensors in, tensors out: nothing here knows Transformers or a cache object.
"""

from .api import (
    MAX_HEADS,
    SUPPORTED_DTYPES,
    TRITON_BLOCK_SIZES,
    TRITON_DTYPES,
    TRITON_HEAD_DIMS,
    kernel_backend,
    resolve_backend,
    sparsex_attention,
    sparsex_decode_attention,
    sparsex_prompt_anchor,
    sparsex_select,
    triton_available,
)
from .custom_ops import HAS_TRITON
from .dense import decode_goes_dense, dense_decode, log_once, sparse_kernels_only
from .reference.decode import MAX_DECODE_QUERIES
from .reference.naive import SparseXStats, sparsex_attention_naive
from .rules.common import block_summaries
from .rules.documents import Document, cu_seqlens_from_position_ids, split_documents

__all__ = [
    "Document",
    "HAS_TRITON",
    "MAX_DECODE_QUERIES",
    "MAX_HEADS",
    "SUPPORTED_DTYPES",
    "SparseXStats",
    "TRITON_BLOCK_SIZES",
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "block_summaries",
    "cu_seqlens_from_position_ids",
    "decode_goes_dense",
    "dense_decode",
    "kernel_backend",
    "log_once",
    "resolve_backend",
    "sparse_kernels_only",
    "sparsex_attention",
    "sparsex_attention_naive",
    "sparsex_decode_attention",
    "sparsex_prompt_anchor",
    "sparsex_select",
    "split_documents",
    "triton_available",
]

"""Applications built on the library: ``sparsex-eval`` (``apps.eval``) and ``sparsex-finetune`` (``apps.finetune``).

They sit on top: nothing in ``sparsex_hf.ops`` or ``sparsex_hf.hf`` imports them. ``apps.loading`` holds what
the commands share (local model loading, the Sparse-X flag group, optional dependencies with an install hint).
"""

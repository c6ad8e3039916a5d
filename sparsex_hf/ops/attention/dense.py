"""Dense where dense is the answer or the faster way to it: the handoffs to SDPA.

* The cover handoff: where every query's Sparse-X key set is all of its causal keys (a dense layer, documents of
  at most ``sink_tokens + window`` tokens), the result is dense causal attention by definition (``_dense_handoff``).
* The cost model's (``config.dense_when_faster``, ``rules/cost.py``): prefills and decode steps that SDPA computes
  faster on this GPU go to it (``_dense_is_faster``, :func:`decode_goes_dense`, :func:`dense_decode`).

``DENSE_HANDOFF`` turns both off (the kernel tests, so that small inputs still test the kernels;
:func:`sparse_kernels_only`, so that a training run sees the sparse function at every length).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...config import SparseXConfig
from .kernels.tuning import device_name
from .rules import cost
from .rules.documents import validate_cu_seqlens
from .rules.layout import kernel_documents

logger = logging.getLogger("sparsex_hf")
_logged: set[str] = set()


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


# Where every query's Sparse-X key set is all of its causal keys, the Triton backend hands the input to SDPA
# (_dense_handoff); the kernel tests turn this off so that small inputs still test the kernels.
DENSE_HANDOFF = True


@contextlib.contextmanager
def sparse_kernels_only():
    """Inside, the Triton backend computes every call with the sparse kernels: no handoff to SDPA, neither where the
    budget covers every key nor where the cost model predicts dense faster (a training run's held-out loss)."""
    global DENSE_HANDOFF
    saved, DENSE_HANDOFF = DENSE_HANDOFF, False
    try:
        yield
    finally:
        DENSE_HANDOFF = saved


def _dense_is_faster(q, k, v, cfg: SparseXConfig) -> bool:
    """``config.dense_when_faster``: a prefill call (``Tq == Tk``) for which the cost model predicts SDPA's dense
    attention faster than Sparse-X on this GPU (``cost.py``; a call that needs gradients is judged on the forward and
    the backward); ``_dense_handoff`` then takes it wherever it can (not: a model sliding window shorter than the
    input, chunks)."""
    if not (DENSE_HANDOFF and cfg.dense_when_faster) or q.shape[2] != k.shape[2]:
        return False
    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    bsz, hq, n, d = q.shape
    return cost.dense_is_faster(cfg, n, hq, d, bsz, device_name(q.device), train)


@functools.lru_cache(maxsize=64)
def _faster_message(gpu: str, cfg: SparseXConfig, bsz: int, hq: int, d: int) -> str:
    return (f"sparsex: on {gpu}, dense attention (SDPA) is predicted faster than Sparse-X below about "
            f"{cost.crossover(cfg, hq, d, bsz, gpu)} tokens ({cost.crossover(cfg, hq, d, bsz, gpu, train=True)} "
            f"with the backward) for {hq} heads of dim {d}, batch {bsz}: such prefills use it "
            "(dense_when_faster=False keeps the sparse kernels).")


def _dense_handoff(q, k, v, cfg: SparseXConfig, scale: float, attention_mask, cu_q, cu_k, sliding_window, dense):
    """Dense causal attention by SDPA (its fastest kernel) where Sparse-X's key set of every query is all of its
    causal keys by definition: a dense layer, or documents of at most ``sink_tokens + window`` tokens (the window
    and the sink cover everything). ``Tq == Tk`` only: an unpadded batch is one SDPA call, packed documents and
    the rows of a padded batch one per document (padding rows are zeros, as the spec says); anything else returns
    None and runs the kernels."""
    tq, tk = q.shape[2], k.shape[2]
    if not DENSE_HANDOFF or tq != tk or cu_q is not None or not (dense or cfg.combine == "union"):
        return None
    if sliding_window is not None and sliding_window < tk:
        return None
    if attention_mask is not None and cu_k is not None:
        return None
    cover = cfg.sink_tokens + cfg.window
    parts = 1 if cu_k is None else cu_k.numel() - 1
    if not dense and attention_mask is None and tk > cover * parts:
        return None  # some document is longer than the window covers (decided without reading cu_k on the host)
    if attention_mask is not None:  # (b, first, length) of each row's real tokens, read on the host
        docs = [(b, f, n) for b, _, f, _, n in kernel_documents(q.shape[0], tq, tk, attention_mask)]
    else:
        bounds = [0, tk] if cu_k is None else validate_cu_seqlens(cu_k, tk, "cu_seqlens").tolist()
        docs = [(None, a, e - a) for a, e in zip(bounds, bounds[1:]) if e > a]
    if not dense and max((n for *_, n in docs), default=0) > cover:
        return None

    def sdpa(rows, a, n):
        if rows == slice(None) and a == 0 and n == tk:  # the whole batch (the common call): no views
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q[rows, :, a:a + n], k[rows, :, a:a + n], v[rows, :, a:a + n],
                                              is_causal=True, scale=scale, enable_gqa=True)

    if attention_mask is not None and len(docs) == q.shape[0] and all(n == tk for *_, n in docs):
        return sdpa(slice(None), 0, tk)  # a mask without padding
    if attention_mask is None:
        return sdpa(slice(None), 0, tk) if len(docs) == 1 else torch.cat([sdpa(slice(None), a, n) for _, a, n in docs], 2)
    out = q.new_zeros(q.shape)
    for b, a, n in docs:
        out[b:b + 1, :, a:a + n] = sdpa(slice(b, b + 1), a, n)
    return out


def decode_goes_dense(q: torch.Tensor, k_cache: torch.Tensor, max_doc_len: int, cfg: SparseXConfig,
                      sliding_window: int | None = None) -> bool:
    """``config.dense_when_faster`` for a Triton decode step of one query per row (keys on ``q``'s device,
    ``combine="union"``, no model sliding window shorter than the cache): the cost model predicts SDPA reading all
    ``max_doc_len`` cached keys faster than Sparse-X's selection and key sets, for this batch, heads and head dim,
    as issued by the host or (inside a CUDA graph capture or ``torch.compile``) replayed from a graph. The caller
    makes sure the rows are not padded (:func:`dense_decode` reads every column from ``seq_len - max_doc_len``)."""
    if not (cfg.dense_when_faster and _dense_step_possible(q, k_cache, max_doc_len, cfg, sliding_window)):
        return False
    graphed = torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    bsz, hkv, _, d = k_cache.shape
    gpu = device_name(q.device)
    if not cost.decode_dense_is_faster(cfg, max_doc_len, hkv, d, bsz, gpu, graphed):
        return False
    log_once(_decode_message(gpu, cfg, bsz, hkv, d))
    return True


def decode_is_covered(q: torch.Tensor, k_cache: torch.Tensor, max_doc_len: int, cfg: SparseXConfig,
                      sliding_window: int | None = None) -> bool:
    """A decode step of one query whose key set is every cached key of its row (rows of at most ``sink_tokens +
    window`` tokens, ``combine="union"``, no model sliding window shorter than the cache): dense attention by
    definition, so any backend hands it to SDPA (:func:`dense_decode`)."""
    return _dense_step_possible(q, k_cache, max_doc_len, cfg, sliding_window) and (
        max_doc_len <= cfg.sink_tokens + cfg.window)


def _dense_step_possible(q, k_cache, max_doc_len: int, cfg: SparseXConfig, sliding_window) -> bool:
    """What both decode handoffs need: the handoff on, ``combine="union"``, the keys on ``q``'s device, one query
    per row, and no model sliding window shorter than the cache (``dense_decode`` takes no mask)."""
    if not (DENSE_HANDOFF and cfg.combine == "union") or k_cache.device != q.device or q.shape[2] != 1:
        return False
    return not (sliding_window is not None and cfg.respect_sliding_window and sliding_window < max_doc_len)


@functools.lru_cache(maxsize=64)
def _decode_message(gpu: str, cfg: SparseXConfig, bsz: int, hkv: int, d: int) -> str:
    def longest(graphed):
        n = 256
        while n < 1 << 24 and cost.decode_dense_is_faster(cfg, 2 * n, hkv, d, bsz, gpu, graphed):
            n *= 2
        return n
    return (f"sparsex: on {gpu}, a decode step reads a short cache faster with dense attention (SDPA) than with "
            f"Sparse-X's selection: unpadded steps over fewer than about {longest(False)} cached tokens "
            f"({longest(True)} in a CUDA graph) for {hkv} key/value heads of dim {d}, batch {bsz}, use it "
            "(dense_when_faster=False keeps the sparse kernels).")


# SDPA's backends in the order of their measured decode speed on Hopper (e2e.csv: cuDNN, then flash)
_DECODE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]
_DECODE_ORDER = [int(b) for b in _DECODE_BACKENDS]


def dense_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_len: int, max_doc_len: int, *,
                 scale: float | None = None) -> torch.Tensor:
    """Dense attention of a decode step by SDPA (cuDNN first, then flash): the query ``q [B, Hq, 1, D]`` of cache
    position ``seq_len - 1`` attends to the cached keys ``seq_len - max_doc_len ... seq_len - 1`` of its row, the
    whole row (not padded: no mask, so SDPA's fastest kernels take it, GQA without repeating the keys)."""
    start = seq_len - max_doc_len
    k, v = k_cache[:, :, start:seq_len], v_cache[:, :, start:seq_len]
    if torch.compiler.is_compiling():
        with sdpa_kernel(_DECODE_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    # eager: only the priority order changes (sdpa_kernel also sets every backend's flag: 14 us of host time per call
    # on the CPU machine, against 1 us for this); a backend the user turned off stays off
    previous = torch._C._get_sdp_priority_order()
    torch._C._set_sdp_priority_order(_DECODE_ORDER + [b for b in previous if b not in _DECODE_ORDER])
    try:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    finally:
        torch._C._set_sdp_priority_order(previous)

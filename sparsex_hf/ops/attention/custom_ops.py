"""The custom ops: Sparse-X's Triton backend and decode step as ``torch.library`` custom ops (with fake
implementations, and autograd for the attention), so that ``torch.compile`` traces through them.

Every op takes its parameters the same way: the config as ``SparseXConfig.json`` (a constant when traced), then the
call's own scalars (scale, ``sliding_window``: 0 for none) and, for the attention passes, which sets they attend.

* ``sparsex::select``, ``sparsex::attend``, ``sparsex::attend_backward``: the prefill's selection and attention
  (host-side layout work -- documents, tiles, the per-tile union of selected blocks -- happens inside the ops).
* ``sparsex::decode``: a decode step (queries, the cache's key/value buffers, the block summaries, per-row offsets,
  the anchor blocks, lengths); eager calls skip the dispatcher (:func:`run_decode`, the same functions, a few
  microseconds less per layer and step), ``torch.compile`` traces the op.
"""

from __future__ import annotations

import contextlib

import torch

from ...config import SparseXConfig, config_from_json
from .reference.decode import sparsex_decode_torch
from .rules.common import resolve_mix_weights
from .rules.layout import kernel_layout

try:  # Triton is a Linux dependency; elsewhere only the reference runs (the ops below are then never called)
    from .kernels.decode import fresh_scratch, sparsex_decode_triton
    from .kernels.prefill import TileDoesNotFit, attend, attend_backward, block_m, tile_union
    from .kernels.select import select_blocks_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Linux CI always has triton
    HAS_TRITON = False


def _layout(q, k, attention_mask, cu_q, cu_k, block_size, backward=False):
    return kernel_layout(q.shape[0], q.shape[2], k.shape[2], q.device, block_m(q, block_size, backward), attention_mask,
                         cu_q, cu_k)


def _fitting(run):
    """``run()``, again with the smaller launch shape recorded each time the kernel did not fit the card's shared
    memory (prefill.TileDoesNotFit; at most a few times: each try takes a stage, a chunk or rows off)."""
    for _ in range(12):
        try:
            return run()
        except TileDoesNotFit:
            continue
    raise RuntimeError("sparsex: no launch shape of the attention kernel fitted after 12 tries")


@torch.library.custom_op("sparsex::select", mutates_args=())
def select_op(
    q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor | None, cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None, config: str, sliding_window: int,
) -> torch.Tensor:
    """Top-k block indices ``[B, Hkv, Tq, topk]`` int32 (-1 = none); ``config``: the config as ``SparseXConfig.json``
    (a constant when traced), ``sliding_window``: 0 for none."""
    layout = _layout(q, k, attention_mask, cu_q, cu_k, config_from_json(config).block_size)
    return select_blocks_triton(q, k, layout, config_from_json(config), sliding_window or None)


@select_op.register_fake
def _(q, k, attention_mask, cu_q, cu_k, config, sliding_window):
    return q.new_empty((q.shape[0], k.shape[1], q.shape[2], config_from_json(config).topk), dtype=torch.int32)


def _prepare(q, k, sel, attention_mask, cu_q, cu_k, cfg: SparseXConfig, backward=False):
    layout = _layout(q, k, attention_mask, cu_q, cu_k, cfg.block_size, backward)
    union, count = tile_union(sel, layout, cfg.window, cfg.block_size, cfg.select_tile)
    return layout, union, count


def _attend_kw(cfg: SparseXConfig, scale: float, sliding_window: int, flags) -> dict:
    return dict(scale=scale, sink=cfg.sink_tokens, window=cfg.window, stride=cfg.stride,
                sliding_window=sliding_window or None, block_size=cfg.block_size, flags=flags)


# Every custom op takes its parameters the same way: the config as ``SparseXConfig.json`` (a constant when traced),
# then the call's own scalars (scale, ``sliding_window``: 0 for none) and, for the attention passes, which sets they
# attend (``use_local, use_stride, use_topk``: all three for ``union``, one at a time for ``mix``'s branches).
@torch.library.custom_op("sparsex::attend", mutates_args=())
def attend_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, attention_mask: torch.Tensor | None,
    cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, config: str, scale: float, sliding_window: int,
    use_local: bool, use_stride: bool, use_topk: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention over the given selection: ``(o [B, Hq, Tq, D], lse [B, Hq, Tq] fp32)``."""
    cfg = config_from_json(config)

    def run():
        layout, union, count = _prepare(q, k, sel, attention_mask, cu_q, cu_k, cfg)
        return attend(q, k, v, sel, layout, union, count, **_attend_kw(cfg, scale, sliding_window,
                                                                       (use_local, use_stride, use_topk)))

    return _fitting(run)


@attend_op.register_fake
def _(q, k, v, sel, attention_mask, cu_q, cu_k, config, scale, sliding_window, use_local, use_stride, use_topk):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sparsex::attend_backward", mutates_args=())
def attend_backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    sel: torch.Tensor, attention_mask: torch.Tensor | None, cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None, config: str, scale: float, sliding_window: int, use_local: bool, use_stride: bool,
    use_topk: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = config_from_json(config)

    def run():
        layout, union, count = _prepare(q, k, sel, attention_mask, cu_q, cu_k, cfg, True)
        return attend_backward(q, k, v, o, lse, do, sel, layout, union, count,
                               **_attend_kw(cfg, scale, sliding_window, (use_local, use_stride, use_topk)))

    return _fitting(run)


@attend_backward_op.register_fake
def _(q, k, v, o, lse, do, sel, attention_mask, cu_q, cu_k, config, scale, sliding_window, use_local, use_stride,
      use_topk):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_ATTEND_ARGS = ("attention_mask", "cu_q", "cu_k", "config", "scale", "sliding_window", "use_local", "use_stride",
                "use_topk")


def _setup_context(ctx, inputs, output):
    q, k, v, sel = inputs[:4]
    ctx.save_for_backward(q, k, v, sel, output[0], output[1])
    ctx.args = inputs[4:]


def _backward(ctx, do, dlse):
    q, k, v, sel, o, lse = ctx.saved_tensors
    dq, dk, dv = attend_backward_op(q, k, v, o, lse, do, sel, *ctx.args)
    return (dq, dk, dv) + (None,) * (1 + len(_ATTEND_ARGS))


attend_op.register_autograd(_backward, setup_context=_setup_context)


def _strided_ok(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels can read it in place: unit stride on the head dim and a dense permutation
    of a contiguous layout (Transformers' ``[B, H, T, D]`` views of ``[B, T, H, D]`` projections are), so that
    ``empty_like`` gives outputs and gradients the same strides; otherwise a contiguous copy."""
    if t.stride(-1) != 1:
        return t.contiguous()
    expected = 1
    for size, st in sorted(zip(t.shape, t.stride()), key=lambda x: x[1]):
        if size > 1 and st != expected:
            return t.contiguous()
        expected *= size
    return t


def sparsex_attention_triton(q, k, v, cfg: SparseXConfig, *, scale, attention_mask=None, cu_seqlens_q=None,
                             cu_seqlens_k=None, sliding_window=None, dense=False, mix_weights=None, selected=None):
    """Sparse-X with the Triton kernels; same contract as ``naive.sparsex_attention_naive`` (``selected``: a given
    selection, which may differ from row to row: the tiles take the union of their rows', ``select_tile=1``)."""
    q, k, v = _strided_ok(q), _strided_ok(k), _strided_ok(v)
    if dense:  # dense causal through the same kernels: a window that covers every supported length (a constant
        cfg = cfg.replace(window=1 << 30, topk=0, stride=0, sink_tokens=0, combine="union")  # config when traced)
    sw = int(sliding_window or 0)
    if selected is not None and cfg.topk > 0 and not dense:
        sel = selected.to(torch.int32).contiguous()
        cfg = cfg.replace(select_tile=1)
    elif cfg.topk > 0:
        sel = select_op(q.detach(), k.detach(), attention_mask, cu_seqlens_q, cu_seqlens_k, cfg.json, sw)
    else:
        sel = q.new_full((q.shape[0], k.shape[1], q.shape[2], 0), -1, dtype=torch.int32)
    common = (attention_mask, cu_seqlens_q, cu_seqlens_k, cfg.json, float(scale), sw)
    if cfg.combine == "union":
        return attend_op(q, k, v, sel, *common, True, True, True)[0]
    hq = q.shape[1]
    weights = resolve_mix_weights(cfg, mix_weights, hq, q.device, torch.float32)
    out, norm = 0.0, 0.0
    for i, flags in enumerate(((True, False, False), (False, True, False), (False, False, True))):
        o_b, lse_b = attend_op(q, k, v, sel, *common, *flags)
        w = weights[:, i].view(1, hq, 1, 1) * (lse_b > float("-inf")).unsqueeze(-1)
        out = out + w * o_b.float()
        norm = norm + w
    return (out / torch.where(norm > 0, norm, 1.0)).to(q.dtype)




def run_decode(backend: str, q, k_cache, v_cache, summaries, offsets, seq_len: int | torch.Tensor, max_doc_len: int,
               cfg: SparseXConfig, *, scale: float, sliding_window=None, mix_weights=None, anchor=None) -> torch.Tensor:
    """The decode step on ``backend`` (``"triton"`` or ``"torch"``), inputs validated by the caller."""
    args = (q, k_cache, v_cache, summaries, offsets, seq_len, max_doc_len, cfg)
    kw = dict(scale=scale, sliding_window=sliding_window, mix_weights=mix_weights, anchor=anchor)
    if backend == "triton":
        return sparsex_decode_triton(*args, **kw)
    return sparsex_decode_torch(*args, **kw)


@torch.library.custom_op("sparsex::decode", mutates_args=())
def decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
    kmean: torch.Tensor, offsets: torch.Tensor, anchor: torch.Tensor | None, mix_weights: torch.Tensor | None,
    lengths: torch.Tensor | None, seq_len: int, max_doc_len: int, config: str, scale: float, sliding_window: int,
    backend: str,
) -> torch.Tensor:
    """``[B, Hq, Tq, Dv]``: :func:`run_decode` with the config given as ``SparseXConfig.json`` and ``sliding_window =
    0`` for none, and fresh scratch buffers (``decode_kernel.fresh_scratch``: the op runs inside compiled graphs).
    With ``lengths`` (a one-element device tensor, a static cache) the cache length is read from it, and ``seq_len``
    is only the buffers' capacity: the op's arguments stay the same from step to step, so a CUDA graph replays it."""
    with fresh_scratch() if backend == "triton" else contextlib.nullcontext():
        return run_decode(backend, q, k_cache, v_cache, (kmin, kmax, kmean), offsets,
                          lengths if lengths is not None else seq_len, max_doc_len, config_from_json(config),
                          scale=scale, sliding_window=sliding_window or None, mix_weights=mix_weights, anchor=anchor)


@decode_op.register_fake
def _(q, k_cache, v_cache, kmin, kmax, kmean, offsets, anchor, mix_weights, lengths, seq_len, max_doc_len, config,
      scale, sliding_window, backend):
    return q.new_empty((*q.shape[:3], v_cache.shape[-1]))

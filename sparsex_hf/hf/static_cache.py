"""The Sparse-X static cache: fixed buffers, so that a decode step compiles and replays as one CUDA graph.

``SparseXStaticLayer`` holds, like Transformers' ``StaticLayer``, key and value buffers ``[B, Hkv, L, D]`` of a fixed
capacity ``L`` and the cache length as a device tensor (``cumulative_length``); beside them the block summaries
(``kmin/kmax/kmean [B, Hkv, L // block_size + 3, D]``), each row's left padding (``offsets_t [B]`` int32) and the
prompt's anchor blocks. Every tensor keeps its address for the cache's life (``torch._dynamo.mark_static_address``)
and a decode step changes them in place: it writes its keys at the device length, summarises the blocks its
tokens touched (complete or not: an incomplete block is never eligible, and it is summarised again by the step
that completes it), and calls the decode op with the length as a tensor. Nothing in a decode step reads a value
on the host, so ``torch.compile(mode="reduce-overhead")`` captures the whole model step.

The prefill runs eagerly, also inside a compiled forward (Transformers compiles chunked prefill): it records the
rows' left padding from the 2-D mask, summarises the prompt's blocks and keeps the anchor, with host reads as in the
dynamic cache.

``generate(..., cache_implementation="static")`` works with no cache argument (the attention wrapper turns the
layers of Transformers' ``StaticCache`` into these before their first update) and compiles the decode step on a
CUDA device; :class:`SparseXStaticCache` builds one directly (any model type, sliding-window layers included:
Sparse-X applies the model's sliding window itself).
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, StaticLayer

__all__ = ["SparseXStaticCache", "SparseXStaticLayer"]

# the last mask that left_padding read, the columns it read and what it found: every layer of a forward is given
# its forward's mask, so the first layer's host read serves the others
_PADDING_MEMO: list = []


def left_padding(attention_mask: torch.Tensor, kv_length: int, last: bool = False):
    """Each row's left padding in ``kv_length`` columns of a 2-D mask (its last ones if ``last``, else its first):
    ``(offsets as a host list, the same as an int32 tensor on the mask's device)``, or None if some row's padding
    is not a left prefix. One host read per mask, not per layer: a read at every layer of a prefill would stop the
    host from queueing the next layer's work while the GPU runs this one's."""
    if attention_mask.shape[-1] < kv_length:
        raise ValueError(f"the attention mask covers {attention_mask.shape[-1]} columns, fewer than the "
                         f"{kv_length} tokens in the cache.")
    key = (kv_length, last, attention_mask._version)
    if _PADDING_MEMO and _PADDING_MEMO[0]() is attention_mask and _PADDING_MEMO[1] == key:
        return _PADDING_MEMO[2]
    found = _read_padding(attention_mask[:, -kv_length:] if last else attention_mask[:, :kv_length])
    _PADDING_MEMO[:] = [weakref.ref(attention_mask), key, found]
    return found


def _read_padding(cols: torch.Tensor):
    """:func:`left_padding`'s host read of the mask columns ``cols`` (a device sync)."""
    mask = cols.bool().cpu()
    off = torch.where(mask.any(1), mask.int().argmax(1), mask.shape[1])
    if not bool((mask == (torch.arange(mask.shape[1])[None, :] >= off[:, None])).all()):
        return None
    return [int(x) for x in off.tolist()], off.to(device=cols.device, dtype=torch.int32)


# summary rows past the capacity's complete blocks (never eligible); the last one absorbs the writes of the blocks
# past the buffer that a step touches (see summarise)
_SPARE_BLOCKS = 3


def _static(*tensors: torch.Tensor) -> None:
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class SparseXStaticLayer(CacheLayerMixin):
    """One layer of the static cache (see the module docstring).

    Attributes: ``keys/values`` (the full buffers), ``cumulative_length`` (0-d int64 device tensor), ``offsets_t``
    (``[B]`` int32, each row's left padding), ``offsets`` (the same as a host list, for the eager prefill),
    ``block_size`` and ``kmin/kmax/kmean`` (set by the first prefill), ``anchor`` (``[B, Hkv, topk]`` with
    ``SparseXConfig.anchor``), ``prefilled`` (a forward has run since the last reset).
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False
    offload_kv = False

    def __init__(self, max_cache_len: int, **kwargs) -> None:
        super().__init__()
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}.")
        self.max_cache_len = max_cache_len
        self.cumulative_length = torch.tensor(0, dtype=torch.long)
        self._clear()

    def _clear(self) -> None:
        self.offsets: list[int] | None = None
        self.prefilled = False
        self.eager_length = 0  # the length after the last eager update, read on the host there (see update)
        self.eager_updated = False  # the last update was eager: eager_length is the device length
        self.forward_length: int | None = None  # the length at the start of this eager forward (stamp_lengths)

    @classmethod
    def adopt(cls, layer: StaticLayer) -> SparseXStaticLayer:
        """A Sparse-X layer in place of an empty Transformers ``StaticLayer`` (its buffers reused if allocated)."""
        new = cls(layer.max_cache_len)
        if layer.is_initialized:
            if int(layer.get_seq_length()):
                raise ValueError("a Transformers static layer that already holds tokens cannot become a Sparse-X layer "
                                 "(its rows' padding is unknown); start from an empty cache.")
            new.lazy_initialization(layer.keys[:, :, :0], layer.values[:, :, :0], buffers=(layer.keys, layer.values))
        return new

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, buffers=None) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.max_batch_size, self.num_heads = key_states.shape[:2]
        b, h, cap = self.max_batch_size, self.num_heads, self.max_cache_len
        if buffers is not None:
            self.keys, self.values = buffers
        else:
            self.keys = torch.zeros(b, h, cap, key_states.shape[-1], dtype=key_states.dtype, device=self.device)
            self.values = torch.zeros(b, h, cap, value_states.shape[-1], dtype=value_states.dtype, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.offsets_t = torch.zeros(b, dtype=torch.int32, device=self.device)
        self.block_size: int | None = None
        self.kmin = self.kmax = self.kmean = None
        self.anchor: torch.Tensor | None = None
        _static(self.keys, self.values, self.cumulative_length, self.offsets_t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new states at the cache length (a device tensor); returns the full buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if tuple(key_states.shape[:2]) != tuple(self.keys.shape[:2]):
            raise ValueError(f"this static cache holds batch {self.keys.shape[0]} with {self.keys.shape[1]} KV heads; "
                             f"got keys {tuple(key_states.shape)}. Build a new cache for another batch size.")
        n = key_states.shape[-2]
        if not torch.compiler.is_compiling():  # eager: the length on the host, kept for this forward's attention (a
            # compiled step trusts generate()'s capacity and reads nothing); stamped once per forward, else read
            base, self.forward_length, self.eager_updated = self.forward_length, None, True
            self.eager_length = (self.host_length() if base is None else base) + n
            if self.eager_length > self.max_cache_len:
                raise ValueError(f"the static cache holds {self.max_cache_len} tokens; this call brings it to "
                                 f"{self.eager_length}. Build it with a larger max_cache_len (prompt + new tokens).")
        cols = torch.arange(n, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(n)
        self.keys.index_copy_(2, cols, key_states)
        self.values.index_copy_(2, cols, value_states)
        return self.keys, self.values

    def host_length(self) -> int:
        """The cache length read on the host (a device sync: eager prefill only)."""
        return int(self.cumulative_length) if self.is_initialized else 0

    def length_after_update(self) -> int:
        """The cache length after this forward's update: kept on the host by an eager update (once: the next call
        reads it again), else read (a sync)."""
        kept, self.eager_updated = self.eager_updated, False
        return self.eager_length if kept else self.host_length()

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    # ------------------------------------------------------------------ padding and summaries
    def record_offsets(self, attention_mask: torch.Tensor | None, kv_length: int, batch_size: int | None = None) -> bool:
        """At the first forward, record each row's left padding from the 2-D mask's first ``kv_length`` columns (one
        host read for all the layers: :func:`left_padding`). Returns False (and records nothing) if some row's
        padding is not a left prefix: a static cache serves left-padded batches only."""
        if self.offsets is not None:
            return True
        if attention_mask is None:
            self.offsets = [0] * self.keys.shape[0]
            self.offsets_t.zero_()
            return True
        found = left_padding(attention_mask, kv_length)
        if found is None:
            return False
        self.offsets = list(found[0])
        self.offsets_t.copy_(found[1])
        return True

    def max_doc_len(self) -> int:
        """An upper bound of the longest row's length that needs no host read: the capacity."""
        return self.max_cache_len

    def offsets_tensor(self, device=None, dtype=torch.int32) -> torch.Tensor:
        """Each row's left padding as the device tensor the compiled step reads (``[B]`` int32), or a copy in
        another dtype or on another device."""
        t = self.offsets_t
        if dtype == t.dtype and (device is None or torch.device(device) == t.device):
            return t
        return t.to(device=device if device is not None else t.device, dtype=dtype)

    def summaries(self, block_size: int, tq: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kmin, kmax, kmean)`` brought up to date after ``tq`` new tokens (default: every cached one): the
        blocks they touch (tensor ops), or, at the first use or with another block size, every cached token into
        newly allocated summaries (eager)."""
        self.refresh(block_size, self.host_length() if tq is None else tq)
        return self.kmin, self.kmax, self.kmean

    def refresh(self, block_size: int, tq: int, length: int | None = None) -> None:
        """:meth:`summaries` without the return; ``length``: the cache length if the caller knows it on the host
        (at the first use it is read otherwise: a device sync)."""
        if self.block_size == block_size:
            self.summarise(tq)
            return
        if torch.compiler.is_compiling():
            raise ValueError(f"the static cache was summarised with block_size={self.block_size}, the compiled "
                             f"step asks for {block_size}: change the Sparse-X config before the prefill, not after.")
        b, h, _, d = self.keys.shape
        nb = self.max_cache_len // block_size + _SPARE_BLOCKS
        self.kmin, self.kmax, self.kmean = (torch.zeros(b, h, nb, d, dtype=self.dtype, device=self.device)
                                            for _ in range(3))
        _static(self.kmin, self.kmax, self.kmean)
        self.block_size = block_size
        n = self.host_length() if length is None else length
        if n and self.offsets is not None:
            self.summarise(n)

    def summarise(self, tq: int) -> None:
        """Summarise the blocks that the last ``tq`` cached tokens of each row fall in (tensor ops; no host read)."""
        bs = self.block_size
        nb = self.kmin.shape[2]
        off = self.offsets_t.long()
        first = ((self.cumulative_length - tq - off).clamp(min=0)) // bs  # [B]
        count = (tq - 1) // bs + 2
        b, h, cap, d = self.keys.shape
        step = max(1, (1 << 26) // max(1, b * h * bs * d))  # blocks per pass: bounded fp32 scratch in a long prefill
        for c0 in range(0, count, step):
            c = min(step, count - c0)
            blk = first[:, None] + c0 + torch.arange(c, device=self.device)  # [B, c]
            cols = (off[:, None, None] + blk[..., None] * bs + torch.arange(bs, device=self.device)).clamp(max=cap - 1)
            kb = self.keys.gather(2, cols.view(b, 1, c * bs, 1).expand(b, h, c * bs, d))
            kb = kb.view(b, h, c, bs, d).float()
            dest = torch.where(blk < nb - 1, blk, nb - 1).view(b, 1, c, 1).expand(b, h, c, d)  # past the end: row nb-1
            for t, v in ((self.kmin, kb.amin(3)), (self.kmax, kb.amax(3)), (self.kmean, kb.mean(3))):
                t.scatter_(2, dest, v.to(self.dtype))

    def set_anchor(self, anchor: torch.Tensor) -> None:
        if self.anchor is None or self.anchor.shape != anchor.shape:
            self.anchor = anchor.to(self.device).clone()
            _static(self.anchor)
        else:
            self.anchor.copy_(anchor)

    # ------------------------------------------------------------------ consistency
    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-n)`` removes the last ``n`` tokens; ``crop(n > 0)`` keeps the first ``n`` (the older convention);
        ``crop(0)`` does nothing (Transformers' ``DeferredStopCheck`` calls it at every step). In place: the buffers
        keep their addresses, the blocks that become incomplete are summarised again when they complete."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        if tokens_to_remove < 0:
            self.cumulative_length.sub_(-tokens_to_remove).clamp_(min=0)
        else:
            self.cumulative_length.clamp_(max=tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes row ``beam_idx[i]``, in place."""
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        for t in (self.keys, self.values, self.kmin, self.kmax, self.kmean, self.anchor, self.offsets_t):
            if t is not None:
                t.copy_(t.index_select(0, idx))
        if self.offsets is not None:
            self.offsets = [self.offsets[i] for i in beam_idx.tolist()]

    def _fixed_batch(self, *args, **kwargs) -> None:
        raise NotImplementedError("a static cache has a fixed batch size: batch_select_indices / "
                                  "batch_repeat_interleave (contrastive search) need the dynamic cache (the default).")

    batch_select_indices = batch_repeat_interleave = _fixed_batch

    def reset(self) -> None:
        """Empty the cache in place (the buffers keep their addresses, so compiled steps stay valid)."""
        if self.is_initialized:
            for t in (self.keys, self.values, self.kmin, self.kmax, self.kmean, self.offsets_t):
                if t is not None:
                    t.zero_()
            if self.anchor is not None:
                self.anchor.fill_(-1)
            self.cumulative_length.zero_()
        self._clear()

    def offload(self):
        pass

    def prefetch(self):
        pass


class SparseXStaticCache(Cache):
    """A static cache of :class:`SparseXStaticLayer` for a Sparse-X model.

    Args:
        config: the model config (for the number of layers).
        max_cache_len: the capacity in tokens (prompt + new tokens).

    ``model.generate(ids, past_key_values=SparseXStaticCache(model.config, max_cache_len=n))`` (Transformers 5.2x:
    ``cache=``) compiles the decode step on a CUDA device, as ``cache_implementation="static"`` does.
    """

    def __init__(self, config, max_cache_len: int, **kwargs) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        super().__init__(layers=[SparseXStaticLayer(max_cache_len) for _ in range(text.num_hidden_layers)])


def stamp_lengths(cache) -> None:
    """Before an eager forward over a static cache: its length read on the host once (one device sync) and given to
    every Sparse-X static layer, whose updates would otherwise each read it (a sync per layer stalls the GPU)."""
    layers = [layer for layer in getattr(cache, "layers", ()) if isinstance(layer, SparseXStaticLayer)]
    if layers:
        n = layers[0].host_length()
        for layer in layers:
            layer.forward_length = n


def convertible_static_layer(cache, layer_idx: int) -> bool:
    """Whether the cache's layer ``layer_idx`` is one of Transformers' static layers (to become a Sparse-X one)."""
    layers = getattr(cache, "layers", None)
    return layers is not None and layer_idx < len(layers) and isinstance(layers[layer_idx], StaticLayer)


def static_layer(cache, layer_idx: int) -> SparseXStaticLayer | None:
    """The cache's layer ``layer_idx`` if it is a :class:`SparseXStaticLayer` (traceable: no conversion)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if isinstance(layer, SparseXStaticLayer) else None


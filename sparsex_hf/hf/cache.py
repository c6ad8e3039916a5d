"""The Sparse-X KV cache: a Transformers v5 cache layer that also keeps per-block key summaries.

``SparseXLayer`` is a ``DynamicLayer`` whose keys and values live in buffers that grow by a quarter
(``DynamicLayer`` concatenates, copying the whole cache at every decode step), and which keeps, per
sequence and KV head, the min / max / mean key of every complete block of ``block_size`` tokens,
counted from the sequence's first real token (left padding is skipped, as the reference does). The
summaries are filled in as blocks complete: a decode step summarises at most the block it completes.
``crop``, ``reorder_cache`` (beam search), ``batch_select_indices`` and ``batch_repeat_interleave``
keep them consistent.

``SparseXCache`` is a ``DynamicCache`` made of such layers; with ``offload=True`` the keys and values
live in (pinned) CPU memory and a decode step copies to the GPU only the keys it attends (sink, window,
stride and the selected blocks), chosen from the summaries, which stay on the GPU.

Generation needs no cache argument: the attention wrapper installed by ``import sparsex_hf`` turns the
plain layers of the cache that ``generate()`` builds into ``SparseXLayer`` before their first update.
"""

from __future__ import annotations

import inspect

import torch
from transformers import masking_utils
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

from .static_cache import SparseXStaticLayer, left_padding

__all__ = ["CACHE_KWARG", "SparseXCache", "SparseXLayer", "upgrade_layer"]

# the name under which a model's forward and generate() take the cache: "cache" (Transformers 5.2x, which
# deprecates "past_key_values") or "past_key_values" (5.17). Read off the mask builder's signature, which
# renamed it in the same release, so that no model module is imported to find out.
CACHE_KWARG = "cache" if "cache" in inspect.signature(masking_utils.create_causal_mask).parameters else "past_key_values"


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


class SparseXLayer(DynamicLayer):
    """One layer of the Sparse-X cache (see the module docstring).

    Attributes beyond ``DynamicLayer``'s: ``offsets`` (host list: left padding of each row, or None until
    the first forward), ``counts`` (host list: summarised blocks of each row), ``kmin/kmax/kmean``
    (``[B, Hkv, nb, D]``, valid for block ``i < counts[b]``), ``anchor`` (``[B, Hkv, topk]``: the last
    prefill's anchor blocks with ``SparseXConfig.anchor``, else None), ``offload`` and ``device`` (the compute
    device; with ``offload`` the key/value buffers are on the CPU).
    """

    is_compileable = False

    def __init__(self, offload: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self._init_sparsex(offload)

    def _init_sparsex(self, offload: bool = False) -> None:
        self.offload_kv = offload
        self.offsets: list[int] | None = None
        self._off_t = None  # device copies of offsets by (device, dtype), dropped whenever they change
        self.counts: list[int] = []
        self.block_size: int | None = None
        self.kmin = self.kmax = self.kmean = None
        self.anchor: torch.Tensor | None = None
        self._kbuf = self._vbuf = None
        self._len = 0

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def _storage_device(self) -> torch.device:
        return torch.device("cpu") if self.offload_kv else self.device

    def _ensure_capacity(self, n: int, like: torch.Tensor, like_v: torch.Tensor) -> None:
        cap = 0 if self._kbuf is None else self._kbuf.shape[-2]
        if n <= cap:
            return
        # grow by a quarter (amortised O(1) appends) and not by doubling: a cache filled by one long prefill would
        # otherwise take twice its size on the first decode step
        new_cap = max(n, cap + max(cap // 4, 256))
        b, h, _, d = like.shape
        dev = self._storage_device()
        kb = torch.empty(b, h, new_cap, d, dtype=like.dtype, device=dev)
        vb = torch.empty(b, h, new_cap, like_v.shape[-1], dtype=like_v.dtype, device=dev)
        if self.offload_kv:
            kb, vb = _pin(kb), _pin(vb)
        if self._len:
            kb[:, :, : self._len] = self._kbuf[:, :, : self._len]
            vb[:, :, : self._len] = self._vbuf[:, :, : self._len]
        self._kbuf, self._vbuf = kb, vb

    def _set_views(self) -> None:
        self.keys = self._kbuf[:, :, : self._len]
        self.values = self._vbuf[:, :, : self._len]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new states; returns all keys and values (with ``offload``: only the new ones, since
        the attention reads the offloaded cache through this layer)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._ensure_capacity(self._len + n, key_states, value_states)
        self._kbuf[:, :, self._len : self._len + n] = key_states
        self._vbuf[:, :, self._len : self._len + n] = value_states
        self._len += n
        self._set_views()
        if self.offload_kv:
            return key_states, value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len

    # ------------------------------------------------------------------ summaries
    def record_offsets(self, attention_mask: torch.Tensor | None, kv_length: int, batch_size: int | None = None) -> bool:
        """Record each row's left padding from the 2-D mask of the first forward (one host read for all the layers:
        :func:`~sparsex_hf.hf.static_cache.left_padding`; without a mask, ``batch_size`` rows of none). Returns False
        (and records nothing) if some row's padding is not a left prefix."""
        if self.offsets is not None:
            return True
        self._off_t = None
        if attention_mask is None:
            self.offsets = [0] * batch_size
        else:
            found = left_padding(attention_mask, kv_length, last=True)
            if found is None:
                return False
            self.offsets = list(found[0])
            self._off_t = {(found[1].device, torch.int32): found[1]}
        self.counts = [0] * len(self.offsets)
        return True

    def max_doc_len(self) -> int:
        """The longest row's length (host int): the cache length minus the smallest left padding."""
        return self._len - min(self.offsets)

    def offsets_tensor(self, device, dtype=torch.long) -> torch.Tensor:
        """``offsets`` as a tensor on ``device`` (kept, so a decode step copies nothing from the host)."""
        key = (torch.device(device), dtype)
        if self._off_t is None or key not in self._off_t:
            self._off_t = {} if self._off_t is None else self._off_t
            self._off_t[key] = torch.tensor(self.offsets, dtype=dtype, device=device)
        return self._off_t[key]

    def summaries(self, block_size: int, tq: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kmin, kmax, kmean)``, each ``[B, Hkv, nb, D]`` in the key dtype on the compute device, up to date
        with the cached keys: blocks that completed since the last call are summarised, nothing else."""
        assert self.offsets is not None
        if self.block_size != block_size:  # first use, or the config changed: summarise from scratch
            self.block_size = block_size
            self.counts = [0] * len(self.offsets)
            self.kmin = self.kmax = self.kmean = None
        bs = block_size
        want = [(self._len - off) // bs for off in self.offsets]
        todo = [(b, i) for b, (c, w) in enumerate(zip(self.counts, want)) for i in range(c, w)]
        nb = max(want) if want else 0
        b_, h, _, d = self._kbuf.shape if self._kbuf is not None else (len(self.offsets), 0, 0, 0)
        if self.kmin is None or self.kmin.shape[2] < nb:
            cap = max(nb, 2 * (0 if self.kmin is None else self.kmin.shape[2]), 16)
            new = [torch.zeros(b_, h, cap, d, dtype=self.dtype, device=self.device) for _ in range(3)]
            if self.kmin is not None:
                for t_new, t_old in zip(new, (self.kmin, self.kmax, self.kmean)):
                    t_new[:, :, : t_old.shape[2]] = t_old
            self.kmin, self.kmax, self.kmean = new
        if todo:
            rows = torch.tensor([b for b, _ in todo])
            blocks = torch.tensor([i for _, i in todo])
            starts = torch.tensor([self.offsets[b] for b, _ in todo]) + blocks * bs
            idx = starts[:, None] + torch.arange(bs)[None, :]  # [n, bs] cache positions
            kb = self._kbuf[rows.to(self._kbuf.device)[:, None], :, idx.to(self._kbuf.device)]  # [n, bs, Hkv, D]
            kb = kb.to(self.device, torch.float32)
            rows_d, blocks_d = rows.to(self.device), blocks.to(self.device)
            self.kmin[rows_d, :, blocks_d] = kb.amin(1).to(self.dtype)
            self.kmax[rows_d, :, blocks_d] = kb.amax(1).to(self.dtype)
            self.kmean[rows_d, :, blocks_d] = kb.mean(1).to(self.dtype)
            self.counts = want
        return self.kmin[:, :, :nb], self.kmax[:, :, :nb], self.kmean[:, :, :nb]

    def summary_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kmin, self.kmax, self.kmean) if t is not None)

    # ------------------------------------------------------------------ consistency
    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-n)`` removes the last ``n`` tokens; ``crop(n >= 0)`` keeps the first ``n`` (the older convention)."""
        if not self.is_initialized:
            return
        new_len = min(self._len, tokens_to_remove) if tokens_to_remove >= 0 else max(0, self._len + tokens_to_remove)
        if tokens_to_remove == 0 or new_len == self._len:
            return
        self._len = new_len
        self._set_views()
        if self.offsets is not None and self.block_size:
            # blocks that are no longer complete are summarised again when they complete
            self.counts = [min(c, max(0, (self._len - off) // self.block_size)) for c, off in zip(self.counts, self.offsets)]

    def _index_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        host = index.tolist()
        kidx = index.to(self._kbuf.device)
        self._kbuf, self._vbuf = self._kbuf[kidx], self._vbuf[kidx]
        if self.offload_kv:
            self._kbuf, self._vbuf = _pin(self._kbuf), _pin(self._vbuf)
        self._set_views()
        if self.kmin is not None:
            didx = index.to(self.device)
            self.kmin, self.kmax, self.kmean = self.kmin[didx], self.kmax[didx], self.kmean[didx]
        if self.anchor is not None:
            self.anchor = self.anchor[index.to(self.anchor.device)]
        if self.offsets is not None:
            self.offsets = [self.offsets[i] for i in host]
            self._off_t = None
            self.counts = [self.counts[i] for i in host] if self.counts else self.counts

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._index_batch(idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._index_batch(torch.arange(self._kbuf.shape[0]).repeat_interleave(repeats))

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._init_sparsex(self.offload_kv)

    def offload(self):  # Cache(offloading=True) moves layers around; this layer manages its own placement
        pass

    def prefetch(self):
        pass


class SparseXCache(DynamicCache):
    """A ``DynamicCache`` of :class:`SparseXLayer` (block summaries for Sparse-X decode).

    Args:
        config: the model config (for the number of layers); without it, layers are added as needed.
        offload: keep keys and values in pinned CPU memory; a decode step copies only the keys it attends.

    ``generate()`` builds a plain ``DynamicCache`` whose layers the attention wrapper converts, so passing
    this cache is only needed for ``offload=True`` or to keep a handle on it.
    """

    def __init__(self, config=None, offload: bool = False) -> None:
        layer = (lambda: SparseXLayer(offload=True)) if offload else SparseXLayer
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            layers = [layer() for _ in range(text.num_hidden_layers)]
            super(DynamicCache, self).__init__(layers=layers)
        elif offload:
            raise ValueError("SparseXCache(offload=True) needs the model config (config=model.config).")
        else:
            super(DynamicCache, self).__init__(layer_class_to_replicate=SparseXLayer)
        self.offload_kv = offload


def upgrade_layer(cache, layer_idx: int, model_window: int | None = None):
    """Return the cache's layer ``layer_idx`` as a :class:`SparseXLayer`, converting a plain ``DynamicLayer``
    in place (its tensors are copied into growable buffers) and an empty sliding-window layer (Sparse-X needs
    absolute positions; it applies the sliding window itself); an empty ``StaticLayer`` becomes a
    :class:`~sparsex_hf.hf.static_cache.SparseXStaticLayer` of the same capacity (a sliding-window static layer
    only when it holds the whole capacity: shorter than ``model_window``, the model's ``sliding_window``). Returns
    None for other layer types (their attention then runs the general path on the keys the layer returns)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    while len(layers) <= layer_idx and getattr(cache, "layer_class_to_replicate", None) is not None:
        layers.append(cache.layer_class_to_replicate())
    if layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if isinstance(layer, (SparseXLayer, SparseXStaticLayer)):
        return layer
    if isinstance(layer, StaticLayer):
        # the sliding-window kind holds min(window, capacity) tokens: the whole capacity when it is the smaller
        window = getattr(layer, "sliding_window", None) or model_window or 0
        whole = type(layer) is StaticLayer or getattr(layer, "_is_croppable", False) or layer.max_cache_len < window
        if not whole:
            raise ValueError(
                f"layer {layer_idx} of this static cache is a {type(layer).__name__} shorter than the capacity asked for "
                "(it keeps only the model's sliding window); Sparse-X needs every position (it applies the window "
                "itself). Pass "
                "SparseXStaticCache(model.config, max_cache_len=...) instead of cache_implementation='static'."
            )
        layers[layer_idx] = new = SparseXStaticLayer.adopt(layer)
        return new
    if type(layer) is DynamicSlidingWindowLayer and not layer.is_initialized:
        layers[layer_idx] = new = SparseXLayer()
        return new
    if type(layer) is not DynamicLayer:
        return None
    new = SparseXLayer()
    if layer.is_initialized and layer.keys is not None and layer.keys.numel():
        new.update(layer.keys, layer.values)
    layers[layer_idx] = new
    return new

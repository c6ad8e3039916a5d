"""`SparseXConfig`: the budget and behaviour of Sparse-X attention.

The config is a frozen, validated dataclass. Inside a Transformers model it lives in
``model.config.sparsex`` as a plain dict (so it survives ``save_pretrained`` /
``from_pretrained``) and is re-read at every forward, so changing it changes the next call.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

COMBINE_MODES = ("union", "mix")
SELECTION_SCORES = ("minmax", "mean")
BACKENDS = ("auto", "torch", "triton", "flash4")
GENERATE_CACHES = ("auto", "static", "dynamic")
ANCHORS = (False, "last", "split")

# Settings of how a config runs here, not of what it computes: never written into a saved checkpoint.
RUNTIME_FIELDS = ("backend",)

# Options that are gone, with the one value that is still accepted (what every config now computes): a checkpoint
# saved with it loads; any other value raises an error that says what replaced it.
REMOVED_FIELDS: dict[str, tuple[Any, str]] = {
    "select_query": ("mean", "a selection tile is always scored by its mean query ('each' was never better: "
                             "docs/evaluation.md)"),
}

# Named configs (``SparseXConfig.preset``): fields over the defaults. The defaults are the faithful rule (two-stage
# selection with the split anchor); "retrieval" is its earlier name; "one-stage" is the min/max bound's top-k alone
# (the default before 0.3: the same speed, loses real-text retrieval).
PRESETS: dict[str, dict[str, Any]] = {"default": {}, "retrieval": {}, "one-stage": {"rerank": 0, "anchor": False}}


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True)
class SparseXConfig:
    """Hyper-parameters of Sparse-X attention (see docs/spec.md for the exact semantics).

    Args:
        block_size: tokens per key block used by top-k selection; a power of two in [1, 4096].
        sink_tokens: the first ``sink_tokens`` keys of every sequence are always attended (>= 0).
        window: local window; query ``i`` sees keys ``i - window < j <= i`` (>= 1).
        stride: keys with ``j % stride == 0`` are always attended; 0 turns the stride off (>= 0).
        topk: number of key blocks chosen per query by the selection score (>= 0).
        combine: ``"union"`` (one softmax over the union of all sets; equals dense attention when the
            budget covers every key) or ``"mix"`` (``alpha*O_local + beta*O_stride + gamma*O_global``,
            one softmax per branch, weights renormalised over the branches that are non-empty).
        alpha, beta, gamma: ``mix`` weights of the local (sink + window), stride and top-k branches;
            ``alpha > 0``, ``beta, gamma >= 0``.
        score: block score of the first selection stage: ``"minmax"`` (Quest bound
            ``sum_d max(q_d*kmin_d, q_d*kmax_d)``) or ``"mean"`` (``q . mean(K_b)``).
        select_tile: consecutive query positions (aligned to the sequence start, ``p // select_tile``)
            that share one top-k selection, scored by their mean query (a power of two in [1, 256]); 1 = every
            query selects alone, strictly causally. With a tile, the selection of ``p`` also looks at the queries
            after ``p`` in its tile (at most ``select_tile - 1`` positions ahead); the attention itself stays causal.
        rerank: two-stage selection when > 0 (default 2): the ``rerank * topk`` blocks with the best ``score`` are
            ranked again by their exact score, the largest logit of the block's keys for the selection's query (max
            over the GQA group; with tiles, the tile's mean query), and the ``topk`` best are kept; 0 = one stage
            (then ``anchor=False`` too). An integer in [0, 16].
        anchor: with ``rerank > 0``, the last selection tile of each document's queries in a call (the end of the
            prompt) selects its ``topk`` blocks over every eligible block (not a shortlist) by exact scores; a cache
            keeps those blocks and every later decode step adds them to its shortlist. ``"split"`` (default): half
            of the blocks by the exact score of the tile's last query (the one that predicts the next token), the
            rest by the largest exact logit of any query of the tile (the question's tokens). ``True`` or
            ``"last"``: all of them by the last query. ``False``: no anchor. Decode steps score ``topk`` more
            blocks.
        dense_layers: layer indices that keep dense causal attention (e.g. ``(0,)``).
        dense_below: inputs with at most this many keys use dense causal attention (0 = never).
            Logged once at INFO when it triggers.
        dense_when_faster: on the Triton backend, a call is computed by SDPA's dense causal attention where the cost
            model (``ops/attention/rules/cost.py``: measured per GPU) predicts dense attention faster than Sparse-X for
            its length, heads and head dim: prefills (a call that needs gradients judged on forward + backward) and
            unpadded decode steps of one query per row; its answer is then dense attention's own. ``False`` keeps
            the sparse kernels always (to train or measure the selection rule itself). Logged once at INFO.
        respect_sliding_window: when the model passes a ``sliding_window`` (Mistral), keys further
            than the window are excluded from every set, as the model was trained. ``False`` lets
            Sparse-X reach beyond it.
        backend: ``"auto"`` (by device), ``"torch"`` (the reference), ``"triton"`` (the kernels) or ``"flash4"``
            (prefill on the FlashAttention-4 stage, ``ops/attention/flash4.py``, the ``flash4`` extra on a Hopper or
            Blackwell GPU; the selection and decode steps on the Triton kernels). A setting of the machine, not of
            the model: never saved with a checkpoint (``RUNTIME_FIELDS``).
        prefill_chunk: ``generate()`` prefills a longer prompt chunk by chunk into the cache (Transformers'
            ``prefill_chunk_size``), so activation memory stays bounded; 0 turns chunking off. Set on the
            model's generation config by ``sparsex_hf.from_pretrained`` and ``apply_sparsex``.
        generate_cache: the cache ``generate()`` builds when the call names none (no ``cache_implementation``, no
            cache object). ``"auto"`` (default): on a CUDA device, for greedy, sampling and beam search (not assisted
            generation), a :class:`~sparsex_hf.SparseXStaticCache` whose capacity is the call's length rounded up (at
            most a quarter more; a later call reuses the largest), and Transformers compiles the decode step into a CUDA
            graph; on other devices Transformers' default. ``"static"``: the static cache on every device (compiled
            where Transformers compiles). ``"dynamic"``: Transformers' default, the dynamic cache (made a Sparse-X cache
            at the first forward). Logged once.
    """

    block_size: int = 64
    sink_tokens: int = 64
    window: int = 4096
    stride: int = 256
    topk: int = 8
    combine: str = "union"
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    score: str = "minmax"
    select_tile: int = 64
    rerank: int = 2
    anchor: bool | str = "split"
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    dense_below: int = 0
    dense_when_faster: bool = True
    respect_sliding_window: bool = True
    backend: str = "auto"
    prefill_chunk: int = 32768
    generate_cache: str = "auto"

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"SparseXConfig.{name}={getattr(self, name)!r} is invalid: allowed is {allowed}.")

        for name in ("block_size", "sink_tokens", "window", "stride", "topk", "dense_below", "select_tile",
                     "prefill_chunk", "rerank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "an integer")
        if not (_is_power_of_two(self.block_size) and self.block_size <= 4096):
            raise bad("block_size", "a power of two in [1, 4096]")
        if not (_is_power_of_two(self.select_tile) and self.select_tile <= 256):
            raise bad("select_tile", "a power of two in [1, 256]")
        self._check_two_stage(bad)
        if self.sink_tokens < 0:
            raise bad("sink_tokens", "an integer >= 0")
        if self.window < 1:
            raise bad("window", "an integer >= 1 (a query always sees itself)")
        if self.stride < 0:
            raise bad("stride", "an integer >= 0 (0 turns the stride off)")
        if self.topk < 0:
            raise bad("topk", "an integer >= 0 (0 turns top-k selection off)")
        if self.prefill_chunk < 0:
            raise bad("prefill_chunk", "an integer >= 0 (0 prefills in one pass)")
        if self.dense_below < 0:
            raise bad("dense_below", "an integer >= 0 (0 never falls back to dense)")
        if self.combine not in COMBINE_MODES:
            raise bad("combine", f"one of {COMBINE_MODES}")
        if self.score not in SELECTION_SCORES:
            raise bad("score", f"one of {SELECTION_SCORES} ('hybrid' was removed: never better, docs/evaluation.md)")
        if self.backend not in BACKENDS:
            raise bad("backend", f"one of {BACKENDS}")
        if self.generate_cache not in GENERATE_CACHES:
            raise bad("generate_cache", f"one of {GENERATE_CACHES}")
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise bad(name, "a real number")
            object.__setattr__(self, name, float(value))
        if self.alpha <= 0:
            raise bad("alpha", "a number > 0 (the local branch is never empty)")
        if self.beta < 0:
            raise bad("beta", "a number >= 0")
        if self.gamma < 0:
            raise bad("gamma", "a number >= 0")
        if not isinstance(self.respect_sliding_window, bool):
            raise bad("respect_sliding_window", "True or False")
        if not isinstance(self.dense_when_faster, bool):
            raise bad("dense_when_faster", "True or False")
        layers = self.dense_layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        try:
            layers = tuple(sorted(set(layers)))
        except TypeError:
            raise bad("dense_layers", "a list of non-negative layer indices") from None
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise bad("dense_layers", "a list of non-negative layer indices")
        object.__setattr__(self, "dense_layers", layers)
        object.__setattr__(self, "_json", json.dumps(self.to_dict(), sort_keys=True))

    def _check_two_stage(self, bad) -> None:
        if not 0 <= self.rerank <= 16:
            raise bad("rerank", "an integer in [0, 16] (0: one-stage selection)")
        if self.anchor is True:
            object.__setattr__(self, "anchor", "last")
        if self.anchor not in ANCHORS:
            raise bad("anchor", f"False, True (= 'last') or one of {ANCHORS[1:]}")
        if self.anchor and not self.rerank:
            raise bad("anchor", "False when rerank=0 (the exact second stage ranks the anchor blocks): pass "
                                "rerank=0, anchor=False together, or SparseXConfig.preset('one-stage')")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> SparseXConfig:
        """A named configuration, with ``changes`` on top: ``"default"`` (the defaults: two-stage selection with the
        split anchor, dense attention's answers on real-text retrieval; ``docs/evaluation.md``), ``"retrieval"``
        (its earlier name, the same config) or ``"one-stage"`` (``rerank=0, anchor=False``: the min/max bound's
        top-k alone, which loses needles in real text)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **changes})

    # -- conversion ---------------------------------------------------------------------------
    @property
    def json(self) -> str:
        """The config as sorted JSON (computed when the config is made: a compiled step reads it as a constant)."""
        return self._json

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        out = dataclasses.asdict(self)
        out["dense_layers"] = list(self.dense_layers)
        return out

    def stored(self) -> StoredConfig:
        """What ``model.config.sparsex`` holds: :meth:`to_dict` as a :class:`StoredConfig`, whose copies (the ones
        Transformers serialises when it saves a model config) leave out the runtime fields."""
        return StoredConfig(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparseXConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        for name, (kept, why) in REMOVED_FIELDS.items():
            if name in data and data.pop(name) != kept:
                raise ValueError(f"SparseXConfig.{name} was removed: {why}; drop the field.")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"Unknown SparseXConfig field(s) {unknown}; allowed fields are {sorted(allowed)}.")
        return cls(**data)

    @classmethod
    def from_any(cls, value: SparseXConfig | Mapping[str, Any] | str | None) -> SparseXConfig:
        """Accept a config, a dict of fields, a preset's name (``"default"``, ``"retrieval"``, ``"one-stage"``) or
        ``None`` (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if isinstance(value, str):
            return cls.preset(value)
        raise TypeError(f"Expected a SparseXConfig, a dict of its fields, a preset name {sorted(PRESETS)} or None, "
                        f"got {type(value).__name__}.")

    def replace(self, **changes: Any) -> SparseXConfig:
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})

    def keys_per_query(self, num_keys: int) -> int:
        """Upper bound on the keys one query at position ``num_keys - 1`` attends (docs/spec.md, 'Complexity')."""
        stride_keys = num_keys // self.stride + 1 if self.stride else 0
        budget = self.sink_tokens + self.window + stride_keys + self.topk * self.block_size
        return min(num_keys, budget)


@functools.lru_cache(maxsize=64)
def config_from_json(text: str) -> SparseXConfig:
    """The config of a ``SparseXConfig.json`` string (how the custom ops take it), parsed once per string."""
    return SparseXConfig.from_dict(json.loads(text))


class StoredConfig(dict):
    """A config's fields as ``model.config.sparsex`` stores them: a plain dict to read and edit, whose (deep) copies
    drop :data:`RUNTIME_FIELDS`. Transformers serialises a model config from a deep copy of its attributes, so a
    saved checkpoint never records how it ran here (``backend``); the loaded model runs with the default."""

    def __deepcopy__(self, memo) -> dict[str, Any]:
        return {k: copy.deepcopy(v, memo) for k, v in self.items() if k not in RUNTIME_FIELDS}

"""`SparseXConfig`: the budget and behaviour of Sparse-X attention.

The config is a frozen, validated dataclass. Inside a Transformers model it lives in
``model.config.sparsex`` as a plain dict (so it survives ``save_pretrained`` /
``from_pretrained``) and is re-read at every forward, so changing it changes the next call.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

COMBINE_MODES = ("union", "mix")
SELECTION_SCORES = ("minmax", "mean", "hybrid")
SELECT_QUERIES = ("each", "mean")
BACKENDS = ("auto", "torch", "triton")
ANCHORS = (False, "last", "split")


PRESETS: dict[str, dict[str, Any]] = {"default": {}, "retrieval": {"rerank": 2, "anchor": "split"}}


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
        score: block score used for selection: ``"minmax"`` (Quest bound
            ``sum_d max(q_d*kmin_d, q_d*kmax_d)``), ``"mean"`` (``q . mean(K_b)``) or ``"hybrid"``
            (half of the blocks by ``minmax``, the rest by ``mean``).
        select_tile: consecutive query positions (aligned to the sequence start, ``p // select_tile``)
            that share one top-k selection (a power of two in [1, 256]); 1 = every query selects alone,
            strictly causally. With a tile, the selection of ``p`` also looks at the queries after ``p`` in
            its tile (at most ``select_tile - 1`` positions ahead); the attention itself stays causal.
        rerank: two-stage selection when > 0: the ``rerank * topk`` blocks with the best ``score`` are ranked again by
            their exact score, the largest logit of the block's keys for the selection's queries (max over the GQA
            group; with tiles, the tile's mean query, or with ``select_query="each"`` every query of the tile), and
            the ``topk`` best are kept; 0 = one stage. An integer in [0, 16]; not with ``score="hybrid"``.
        anchor: with ``rerank > 0``, the last selection tile of each document's queries in a call (the end of the
            prompt) selects its ``topk`` blocks over every eligible block (not a shortlist) by exact scores; a cache
            keeps those blocks and every later decode step adds them to its shortlist. ``True`` or ``"last"``: the
            best exact score of the tile's last query (the one that predicts the next token; one query reads
            every key once per call). ``"split"`` (the ``"retrieval"`` preset): half of the blocks that way, the
            rest by the largest exact logit of any query of the tile (the question's tokens; the tile's queries
            read every key). Decode steps score ``topk`` more blocks.
        select_query: with ``select_tile > 1``, ``"mean"`` scores the tile's mean query
            (``1/select_tile`` of the selection work; best recall measured on SmolLM2) and ``"each"``
            scores every query and takes the max over the tile.
        dense_layers: layer indices that keep dense causal attention (e.g. ``(0,)``).
        dense_below: inputs with at most this many keys use dense causal attention (0 = never).
            Logged once at INFO when it triggers.
        respect_sliding_window: when the model passes a ``sliding_window`` (Mistral), keys further
            than the window are excluded from every set, as the model was trained. ``False`` lets
            Sparse-X reach beyond it.
        backend: ``"auto"`` (by device), ``"torch"`` (the reference) or ``"triton"`` (the kernels).
        prefill_chunk: ``generate()`` prefills a longer prompt chunk by chunk into the cache (Transformers'
            ``prefill_chunk_size``), so activation memory stays bounded; 0 turns chunking off. Set on the
            model's generation config by ``sparsex_hf.from_pretrained`` and ``apply_sparsex``.
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
    select_query: str = "mean"
    rerank: int = 0
    anchor: bool | str = False
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    dense_below: int = 0
    respect_sliding_window: bool = True
    backend: str = "auto"
    prefill_chunk: int = 32768

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
        if self.select_query not in SELECT_QUERIES:
            raise bad("select_query", f"one of {SELECT_QUERIES}")
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
            raise bad("score", f"one of {SELECTION_SCORES}")
        if self.backend not in BACKENDS:
            raise bad("backend", f"one of {BACKENDS}")
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
        if self.rerank and self.score == "hybrid":
            raise bad("rerank", "0 with score='hybrid' (the exact second stage ranks one score's shortlist)")
        if self.anchor is True:
            object.__setattr__(self, "anchor", "last")
        if self.anchor not in ANCHORS:
            raise bad("anchor", f"False, True (= 'last') or one of {ANCHORS[1:]}")
        if self.anchor and not self.rerank:
            raise bad("anchor", "False when rerank=0 (the exact second stage ranks the anchor blocks)")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> SparseXConfig:
        """A named configuration, with ``changes`` on top: ``"default"`` (the defaults) or ``"retrieval"``
        (two-stage selection with the split anchor, ``rerank=2, anchor="split"``: SmolLM2's real-text retrieval
        within 0-7 points of dense attention at 2K-8K where the default loses up to 40; measured cost on the H200:
        +16% prefill at 128K, +26% at 1M, a 4.6x slower decode attention step at 1M; ``docs/evaluation.md``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **changes})

    # -- conversion ---------------------------------------------------------------------------
    @property
    def json(self) -> str:
        """The config as sorted JSON (computed when the config is made: a compiled step reads it as a constant)."""
        return self._json

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what ``model.config.sparsex`` stores)."""
        out = dataclasses.asdict(self)
        out["dense_layers"] = list(self.dense_layers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparseXConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"Unknown SparseXConfig field(s) {unknown}; allowed fields are {sorted(allowed)}.")
        return cls(**dict(data))

    @classmethod
    def from_any(cls, value: SparseXConfig | Mapping[str, Any] | None) -> SparseXConfig:
        """Accept a config, a dict of fields, or ``None`` (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(f"Expected a SparseXConfig, a dict of its fields or None, got {type(value).__name__}.")

    def replace(self, **changes: Any) -> SparseXConfig:
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})

    def keys_per_query(self, num_keys: int) -> int:
        """Upper bound on the keys one query at position ``num_keys - 1`` attends (docs/spec.md, 'Complexity')."""
        stride_keys = num_keys // self.stride + 1 if self.stride else 0
        budget = self.sink_tokens + self.window + stride_keys + self.topk * self.block_size
        return min(num_keys, budget)

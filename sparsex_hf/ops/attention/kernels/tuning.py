"""Launch shapes of the Sparse-X kernels per GPU, from a table measured once (not tuned at every launch).

``tiles.json`` maps a GPU's name (``torch.cuda.get_device_name``) to the shapes ``benchmarks/sweep_prefill.py``
measured fastest on it, one per kernel: ``fwd`` and ``bwd`` (the attention passes: ``block_m`` query rows per
program, ``window_n`` keys per chunk of the unmasked window range, a power of two of which at least the block size
is used, ``num_warps``, ``num_stages``), ``select`` (the block-score kernel: ``rows`` score rows per program,
``num_warps``), and the decode step's ``decode_shortlist`` (``num_warps``) and ``decode_attend`` (``num_warps``,
``num_stages``; an entry without them takes the ``"default"`` entry's). GPUs not in the table, and the Triton
interpreter, use ``"default"`` (said once in the log). ``sweep_prefill.py --save`` writes a GPU's entry.

What changes the answer besides the card can key a shape too: ``"<kind>@<qualifiers>"`` with qualifiers among
``d<head dim>``, ``fp16`` / ``bf16`` / ``fp32``, ``g<GQA group>`` and ``b<block size>``, comma-separated in that
order (``"bwd@d128,fp32"``). A launch takes the most specific key of its entry that matches it (most qualifiers
first, then in that order), else the kind's plain shape.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import re

import torch

logger = logging.getLogger(__name__)

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tiles.json")
_ATTENTION = ("block_m", "window_n", "num_warps", "num_stages")
FIELDS = {"fwd": _ATTENTION, "bwd": _ATTENTION, "select": ("rows", "num_warps"), "decode_shortlist": ("num_warps",),
          "decode_attend": ("num_warps", "num_stages")}
OPTIONAL = ("decode_shortlist", "decode_attend")  # an entry without them takes the "default" entry's
_QUALIFIER = re.compile(r"^(d\d+|fp16|bf16|fp32|g\d+|b\d+)$")
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_override: dict[str, dict] = {}


@functools.cache
def _table() -> dict:
    with open(TABLE_PATH) as f:
        table = json.load(f)
    for gpu, entry in table.items():
        for kind in FIELDS:
            if kind in entry or gpu == "default" or kind not in OPTIONAL:
                check_tile(entry[kind], kind, f"{TABLE_PATH}: {gpu!r} {kind}")
        for key in entry:
            if key in FIELDS or key in ("measured", "fitted"):
                continue
            if not _qualified(key):
                raise ValueError(f"{TABLE_PATH}: {gpu!r} has key {key!r}; keys are a kernel {list(FIELDS)}, optionally "
                                 "'@' and qualifiers among d<head dim>, fp16/bf16/fp32, g<group>, b<block size>")
            check_tile(entry[key], key.partition("@")[0], f"{TABLE_PATH}: {gpu!r} {key}")
    return table


def _qualified(key: str) -> bool:
    """Whether ``key`` is ``"<kind>@<qualifiers>"`` with a known kernel and valid qualifiers."""
    kind, _, quals = key.partition("@")
    return kind in FIELDS and bool(quals) and all(_QUALIFIER.match(x) for x in quals.split(","))


def check_tile(tile: dict, kind: str = "fwd", where: str = "tile") -> dict:
    """``tile`` itself if it names every field of ``kind`` with an allowed value, else a ValueError saying what is
    wrong and what is allowed."""
    fields = FIELDS[kind]
    wrong = sorted(set(fields) ^ set(tile))
    if wrong:
        raise ValueError(f"{where}: fields {wrong} missing or unknown; a {kind} tile names exactly {list(fields)}")
    for f in ("block_m", "window_n", "rows"):
        v = tile.get(f, 16)
        if not (isinstance(v, int) and v >= 16 and v & (v - 1) == 0):
            raise ValueError(f"{where}: {f}={v!r}; allowed are powers of two >= 16")
    if tile["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"{where}: num_warps={tile['num_warps']!r}; allowed are 1, 2, 4, 8, 16")
    if not (isinstance(tile.get("num_stages", 1), int) and 1 <= tile.get("num_stages", 1) <= 8):
        raise ValueError(f"{where}: num_stages={tile['num_stages']!r}; allowed are 1 to 8")
    return tile


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` of a CUDA ``device``; ``"default"`` for other devices and the interpreter."""
    device = torch.device(device)
    return _device_name(device.type, device.index if device.index is not None else torch.cuda.current_device()
                        if device.type == "cuda" else None)


@functools.cache
def _device_name(kind: str, index: int | None) -> str:
    if kind != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "default"
    return torch.cuda.get_device_name(index)


@functools.cache
def _entry(name: str) -> dict:
    table = _table()
    if name not in table:
        logger.warning("sparsex: tiles.json has no launch shapes for %r: using its \"default\" entry (shapes that "
                       "do not fit this card's shared memory are made smaller at their first launch); "
                       "benchmarks/sweep_prefill.py --save measures this card's", name)
        return table["default"]
    return table[name]


def tile_shape(device: torch.device, kind: str = "fwd", *, head_dim: int | None = None,
               dtype: torch.dtype | None = None, group: int | None = None, block_size: int | None = None) -> dict:
    """The launch shape of kernel ``kind`` (a key of ``FIELDS``) on ``device`` for a launch of this head dim, dtype,
    GQA group and block size (those given): the most specific matching key of the table's entry for its GPU, else
    the default entry's (said once in the log)."""
    if kind in _override:
        return _override[kind]
    quals = tuple(q for q in (None if head_dim is None else f"d{head_dim}", _DTYPES.get(dtype),
                              None if group is None else f"g{group}", None if block_size is None else f"b{block_size}")
                  if q is not None)
    return _lookup(device_name(device), kind, quals)


@functools.cache
def _lookup(name: str, kind: str, quals: tuple) -> dict:
    entry = _entry(name) if name != "default" else _table()["default"]
    for n in range(len(quals), 0, -1):
        for subset in itertools.combinations(quals, n):
            key = f"{kind}@{','.join(subset)}"
            if key in entry:
                return entry[key]
    if kind not in entry:  # an optional kind this entry does not set
        return _lookup("default", kind, quals)
    return entry[kind]


def overridden(kind: str) -> bool:
    """Whether ``override`` sets kernel ``kind``'s shape now (then it is used as given, never made smaller)."""
    return kind in _override


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (the current one when it names no index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def rows_per_program(most: int, rows: int, heads: int, sms: int | None, least: int = 32) -> int:
    """Score rows per program of the block-score kernel: the table's ``most``, halved (not below ``least``) while
    the grid (``ceil(rows / r) * heads`` programs) would not fill ``sms`` multiprocessors twice -- short inputs
    keep the GPU busy, long ones read the summaries fewer times. ``sms=None`` (the interpreter): ``most``."""
    r = most
    while sms and r > least and -(-rows // r) * heads < 2 * sms:
        r //= 2
    return r


@contextlib.contextmanager
def override(**tiles: dict):
    """Use these shapes (``fwd=``, ``bwd=``, ``select=``) instead of the table's inside the block (the sweep)."""
    saved = dict(_override)
    for kind, tile in tiles.items():
        if kind not in FIELDS:
            raise ValueError(f"override: unknown kernel {kind!r}; allowed are {list(FIELDS)}")
        _override[kind] = check_tile(dict(tile), kind, f"override {kind}")
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def save_entry(gpu: str, tiles: dict, measured: str, path: str = TABLE_PATH) -> None:
    """Write ``gpu``'s entry (``tiles``: one shape per kernel) into the table at ``path`` (the sweep's ``--save``)."""
    with open(path) as f:
        table = json.load(f)
    kept = {key: value for key, value in table.get(gpu, {}).items() if "@" in key or key == "fitted"}
    table[gpu] = ({kind: check_tile(dict(tiles[kind]), kind, kind) for kind in FIELDS if kind in tiles}
                  | {"measured": measured} | kept)
    missing = [kind for kind in FIELDS if kind not in table[gpu] and kind not in OPTIONAL]
    if missing:
        raise ValueError(f"save_entry: {gpu!r} needs a shape for {missing}")
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    clear_caches()


def save_keys(gpu: str, keys: dict, measured: str, path: str = TABLE_PATH) -> None:
    """Merge qualified shapes (``{"bwd@d128,fp32,b128": tile}``) into ``gpu``'s entry of the table at ``path``
    (``benchmarks/save_fitted.py``: the shapes a matrix run had to make smaller); a GPU without an entry gets the
    ``"default"`` entry's plain shapes beside them. ``measured`` says where the keys come from."""
    with open(path) as f:
        table = json.load(f)
    entry = table.setdefault(gpu, {kind: dict(table["default"][kind]) for kind in FIELDS if kind not in OPTIONAL}
                             | {"measured": "plain shapes: the \"default\" entry's (not swept on this card)"})
    for key, tile in keys.items():
        if not _qualified(key):
            raise ValueError(f"save_keys: {key!r} is not a qualified key (kind@qualifiers)")
        entry[key] = check_tile(dict(tile), key.partition("@")[0], key)
    entry["fitted"] = measured
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    clear_caches()


def clear_caches() -> None:
    """Forget the table and every lookup (after the table file changed)."""
    _table.cache_clear()
    _entry.cache_clear()
    _lookup.cache_clear()

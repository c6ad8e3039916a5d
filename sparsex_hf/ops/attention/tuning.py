"""Tile shapes of the prefill kernels per GPU, from a table measured once (not tuned at every launch).

``tiles.json`` maps a GPU's name (``torch.cuda.get_device_name``) to the shapes ``benchmarks/sweep_prefill.py``
measured fastest on it, one per pass: ``block_m`` query rows per program, ``window_n`` keys per chunk of the
unmasked window range (a power of two; at least the block size is used), ``num_warps``, ``num_stages`` and,
optionally, ``tma`` (keys and values through tensor descriptors, the bulk copy engine of sm_90 and later). GPUs
not in the table, and the Triton interpreter, use ``"default"``. ``sweep_prefill.py --save`` writes a GPU's entry.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import torch

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tiles.json")
FIELDS = ("block_m", "window_n", "num_warps", "num_stages")
_override: dict[str, dict] = {}


@functools.cache
def _table() -> dict:
    with open(TABLE_PATH) as f:
        table = json.load(f)
    for gpu, entry in table.items():
        for name in ("fwd", "bwd"):
            check_tile(entry[name], f"{TABLE_PATH}: {gpu!r} {name}")
    return table


def check_tile(tile: dict, where: str = "tile") -> dict:
    """``tile`` itself if it names every field with an allowed value, else a ValueError saying which is wrong."""
    missing = [f for f in FIELDS if f not in tile]
    if missing:
        raise ValueError(f"{where}: missing {missing}; a tile names {list(FIELDS)}")
    for f in ("block_m", "window_n"):
        v = tile[f]
        if not (isinstance(v, int) and v >= 16 and v & (v - 1) == 0):
            raise ValueError(f"{where}: {f}={v!r}; allowed are powers of two >= 16")
    if tile["num_warps"] not in (1, 2, 4, 8, 16) or not (isinstance(tile["num_stages"], int) and 1 <= tile["num_stages"] <= 8):
        raise ValueError(f"{where}: num_warps={tile['num_warps']!r}, num_stages={tile['num_stages']!r}; "
                         "allowed are num_warps in 1, 2, 4, 8, 16 and num_stages in 1..8")
    if not isinstance(tile.get("tma", False), bool):
        raise ValueError(f"{where}: tma={tile['tma']!r}; allowed are true and false")
    return tile


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "default"
    return torch.cuda.get_device_name(device)


def tile_shape(device: torch.device, backward: bool = False) -> dict:
    """The tile of the forward (or backward) pass on ``device``: the table's entry for its GPU, else the default."""
    name = "bwd" if backward else "fwd"
    if name in _override:
        return _override[name]
    table = _table()
    return table.get(_device_name(torch.device(device)), table["default"])[name]


@contextlib.contextmanager
def override(fwd: dict | None = None, bwd: dict | None = None):
    """Use these tiles instead of the table's inside the block (how the sweep times its variants)."""
    saved = dict(_override)
    for name, tile in (("fwd", fwd), ("bwd", bwd)):
        if tile is not None:
            _override[name] = check_tile(dict(tile), f"override {name}")
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def save_entry(gpu: str, fwd: dict, bwd: dict, measured: str, path: str = TABLE_PATH) -> None:
    """Write ``gpu``'s entry into the table at ``path`` (the sweep's ``--save``)."""
    with open(path) as f:
        table = json.load(f)
    table[gpu] = dict(fwd=check_tile(dict(fwd), "fwd"), bwd=check_tile(dict(bwd), "bwd"), measured=measured)
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    _table.cache_clear()

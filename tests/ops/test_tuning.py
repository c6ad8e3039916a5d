"""The per-GPU tile table: what it holds, how a GPU's entry is found, and what a bad entry says."""

import json

import pytest
import torch

from sparsex_hf.ops.attention import prefill, tuning


def test_table_entries_are_valid_and_default_applies_off_the_table():
    table = tuning._table()
    assert "default" in table
    for gpu, entry in table.items():
        for name in ("fwd", "bwd"):
            assert tuning.check_tile(entry[name]) is entry[name]
        if gpu != "default":
            assert entry["measured"]  # where the shapes were measured
    assert tuning.tile_shape(torch.device("cpu")) == table["default"]["fwd"]
    assert prefill.block_m(torch.device("cpu"), backward=True) == table["default"]["bwd"]["block_m"]


def test_override_is_scoped():
    tile = dict(block_m=32, window_n=128, num_warps=4, num_stages=3)
    before = tuning.tile_shape(torch.device("cpu"))
    with tuning.override(fwd=tile):
        assert tuning.tile_shape(torch.device("cpu")) == tile
        assert tuning.tile_shape(torch.device("cpu"), backward=True) == tuning._table()["default"]["bwd"]
    assert tuning.tile_shape(torch.device("cpu")) == before


@pytest.mark.parametrize("bad, words", [
    (dict(block_m=48, window_n=64, num_warps=4, num_stages=2), "block_m=48"),
    (dict(block_m=64, window_n=8, num_warps=4, num_stages=2), "window_n=8"),
    (dict(block_m=64, window_n=64, num_warps=3, num_stages=2), "num_warps=3"),
    (dict(block_m=64, window_n=64, num_warps=4), "missing ['num_stages']"),
])
def test_bad_tiles_say_what_is_allowed(bad, words):
    with pytest.raises(ValueError, match="allowed|a tile names") as e:
        tuning.check_tile(bad)
    assert words in str(e.value)


def test_save_entry_round_trips(tmp_path, monkeypatch):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(tuning._table()))
    fwd = dict(block_m=128, window_n=128, num_warps=8, num_stages=2)
    bwd = dict(block_m=64, window_n=64, num_warps=4, num_stages=3)
    monkeypatch.setattr(tuning, "TABLE_PATH", str(path))
    tuning._table.cache_clear()
    try:
        tuning.save_entry("Some GPU", fwd, bwd, "a sweep", path=str(path))
        assert tuning._table()["Some GPU"] == dict(fwd=fwd, bwd=bwd, measured="a sweep")
        monkeypatch.setattr(tuning, "_device_name", lambda device: "Some GPU")
        assert tuning.tile_shape(torch.device("cuda")) == fwd
        assert tuning.tile_shape(torch.device("cuda"), backward=True) == bwd
    finally:
        monkeypatch.undo()
        tuning._table.cache_clear()

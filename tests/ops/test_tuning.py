"""The per-GPU tile table: what it holds, how a GPU's entry is found, and what a bad entry says."""

import json

import pytest
import torch

from sparsex_hf.ops.attention import prefill, tuning


def test_table_entries_are_valid_and_default_applies_off_the_table():
    table = tuning._table()
    assert "default" in table
    for gpu, entry in table.items():
        for kind in ("fwd", "bwd", "select"):
            assert tuning.check_tile(entry[kind], kind) is entry[kind]
        if gpu != "default":
            assert entry["measured"]  # where the shapes were measured
    assert tuning.tile_shape(torch.device("cpu")) == table["default"]["fwd"]
    assert tuning.tile_shape(torch.device("cpu"), "select") == table["default"]["select"]
    assert prefill.block_m(torch.zeros(1, 1, 1, 64), 64, backward=True) == table["default"]["bwd"]["block_m"]


def test_override_is_scoped():
    tile = dict(block_m=32, window_n=128, num_warps=4, num_stages=3)
    before = tuning.tile_shape(torch.device("cpu"))
    with tuning.override(fwd=tile):
        assert tuning.tile_shape(torch.device("cpu")) == tile
        assert tuning.tile_shape(torch.device("cpu"), "bwd") == tuning._table()["default"]["bwd"]
    assert tuning.tile_shape(torch.device("cpu")) == before


@pytest.mark.parametrize("bad, kind, words", [
    (dict(block_m=48, window_n=64, num_warps=4, num_stages=2), "fwd", "block_m=48"),
    (dict(block_m=64, window_n=8, num_warps=4, num_stages=2), "bwd", "window_n=8"),
    (dict(block_m=64, window_n=64, num_warps=3, num_stages=2), "fwd", "num_warps=3"),
    (dict(block_m=64, window_n=64, num_warps=4, num_stages=0), "fwd", "num_stages=0"),
    (dict(block_m=64, window_n=64, num_warps=4), "fwd", "['num_stages']"),
    (dict(rows=32, num_warps=4, num_stages=2), "select", "['num_stages']"),
    (dict(rows=24, num_warps=4), "select", "rows=24"),
])
def test_bad_tiles_say_what_is_allowed(bad, kind, words):
    with pytest.raises(ValueError, match="allowed|names exactly") as e:
        tuning.check_tile(bad, kind)
    assert words in str(e.value)
    with pytest.raises(ValueError, match="unknown kernel 'attn'"):
        with tuning.override(attn=bad):
            pass


def test_save_entry_round_trips(tmp_path, monkeypatch):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(tuning._table()))
    fwd = dict(block_m=128, window_n=128, num_warps=8, num_stages=2)
    bwd = dict(block_m=64, window_n=64, num_warps=4, num_stages=3)
    monkeypatch.setattr(tuning, "TABLE_PATH", str(path))
    tuning._table.cache_clear()
    try:
        select = dict(rows=64, num_warps=8)
        tuning.save_entry("Some GPU", dict(fwd=fwd, bwd=bwd, select=select), "a sweep", path=str(path))
        assert tuning._table()["Some GPU"] == dict(fwd=fwd, bwd=bwd, select=select, measured="a sweep")
        monkeypatch.setattr(tuning, "device_name", lambda device: "Some GPU")
        assert tuning.tile_shape(torch.device("cuda")) == fwd
        assert tuning.tile_shape(torch.device("cuda"), "bwd") == bwd
        assert tuning.tile_shape(torch.device("cuda"), "select") == select
    finally:
        monkeypatch.undo()
        tuning._table.cache_clear()
        tuning._entry.cache_clear()


def test_a_gpu_off_the_table_gets_the_default_and_a_line_in_the_log(monkeypatch, caplog):
    monkeypatch.setattr(tuning, "device_name", lambda device: "Some Unlisted GPU")
    tuning._entry.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            shapes = [tuning.tile_shape(torch.device("cuda"), kind) for kind in ("fwd", "bwd", "select", "fwd")]
        assert shapes[:3] == [tuning._table()["default"][k] for k in ("fwd", "bwd", "select")]
        said = [r.getMessage() for r in caplog.records if "Some Unlisted GPU" in r.getMessage()]
        assert len(said) == 1 and "default" in said[0] and "sweep_prefill.py --save" in said[0]
    finally:
        tuning._entry.cache_clear()


def test_smaller_tiles_take_a_stage_then_a_window_chunk_then_rows():
    tile = dict(block_m=64, window_n=128, num_warps=8, num_stages=2)
    seen = []
    while tile is not None:
        seen.append((tile["block_m"], tile["window_n"], tile["num_stages"]))
        tile = prefill.smaller_tile(tile, block_size=32)
    assert seen == [(64, 128, 2), (64, 128, 1), (64, 64, 1), (64, 32, 1), (32, 32, 1), (16, 32, 1)]


@pytest.mark.parametrize("rows, heads, want", [(16384, 2, 64), (2048, 8, 32), (128, 8, 32), (16384, 8, 64)])
def test_selection_rows_per_program_shrink_on_short_inputs(rows, heads, want):
    """The table's 64 rows per program where the grid fills a 132-SM GPU twice (1M tokens, 2 KV heads: 512
    programs), halved to 32 where it would not (128K with 8 KV heads: 256 programs; 8K); never below 32."""
    assert tuning.rows_per_program(64, rows, heads, sms=132) == want
    assert tuning.rows_per_program(64, rows, heads, sms=None) == 64  # the interpreter: the table's value

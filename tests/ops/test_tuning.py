"""The per-GPU tile table: what it holds, how a GPU's entry is found, and what a bad entry says."""

import json

import pytest
import torch

from sparsex_hf.ops.attention.kernels import prefill, tuning


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
    tuning.clear_caches()
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
        tuning.clear_caches()


def test_fitted_shapes_merge_into_an_entry_and_survive_a_new_sweep(tmp_path, monkeypatch):
    """``save_keys`` (``save_fitted.py``) adds qualified shapes beside an entry's plain ones and keeps its other
    keys, gives a GPU off the table the default's plain shapes, and a later ``save_entry`` (a new sweep) keeps
    them; a launch of that shape takes the fitted one."""
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(tuning._table()))
    monkeypatch.setattr(tuning, "TABLE_PATH", str(path))
    tuning.clear_caches()
    small = dict(block_m=64, window_n=64, num_warps=8, num_stages=1)
    try:
        tuning.save_keys("New GPU", {"bwd@d128,fp32,b16": dict(small, block_m=32), "fwd@d64,b128": small}, "a fit",
                         path=str(path))
        tuning.save_keys("New GPU", {"bwd@d128,fp32,b128": small}, "a second fit", path=str(path))
        entry = tuning._table()["New GPU"]
        assert entry["bwd"] == tuning._table()["default"]["bwd"] and entry["fitted"] == "a second fit"
        assert entry["bwd@d128,fp32,b16"] == dict(small, block_m=32) and entry["fwd@d64,b128"] == small
        monkeypatch.setattr(tuning, "device_name", lambda device: "New GPU")
        dev = torch.device("cuda")
        assert tuning.tile_shape(dev, "bwd", head_dim=128, dtype=torch.float32, block_size=128) == small
        assert tuning.tile_shape(dev, "bwd", head_dim=128, dtype=torch.bfloat16, block_size=128) == entry["bwd"]
        sweep = dict(fwd=small, bwd=small, select=dict(rows=32, num_warps=4))
        tuning.save_entry("New GPU", sweep, "a sweep", path=str(path))
        assert tuning._table()["New GPU"]["bwd@d128,fp32,b128"] == small
        with pytest.raises(ValueError, match="not a qualified key"):
            tuning.save_keys("New GPU", {"bwd": small}, "plain", path=str(path))
    finally:
        monkeypatch.undo()
        tuning.clear_caches()


def test_a_gpu_off_the_table_gets_the_default_and_a_line_in_the_log(monkeypatch, caplog):
    monkeypatch.setattr(tuning, "device_name", lambda device: "Some Unlisted GPU")
    tuning.clear_caches()
    try:
        with caplog.at_level("WARNING"):
            shapes = [tuning.tile_shape(torch.device("cuda"), kind) for kind in ("fwd", "bwd", "select", "fwd")]
        assert shapes[:3] == [tuning._table()["default"][k] for k in ("fwd", "bwd", "select")]
        said = [r.getMessage() for r in caplog.records if "Some Unlisted GPU" in r.getMessage()]
        assert len(said) == 1 and "default" in said[0] and "sweep_prefill.py --save" in said[0]
    finally:
        tuning.clear_caches()


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


def _with_table(tmp_path, monkeypatch, entry):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(dict(tuning._table(), **{"Some GPU": entry})))
    monkeypatch.setattr(tuning, "TABLE_PATH", str(path))
    monkeypatch.setattr(tuning, "device_name", lambda device: "Some GPU")
    tuning.clear_caches()


def test_shapes_keyed_by_head_dim_dtype_group_and_block_size(tmp_path, monkeypatch):
    """An entry's ``kind@qualifiers`` keys: a launch takes the most specific one that matches it (more qualifiers
    first), else the kind's plain shape; an entry without the decode kinds takes the default entry's."""
    plain = dict(block_m=64, window_n=64, num_warps=4, num_stages=2)
    d128 = dict(plain, num_stages=3)
    d128_fp32 = dict(plain, block_m=32, num_stages=1)
    d128_b16 = dict(plain, window_n=16)
    entry = {"fwd": plain, "bwd": plain, "select": dict(rows=64, num_warps=4), "fwd@d128": d128,
             "fwd@d128,fp32": d128_fp32, "fwd@d128,b16": d128_b16, "select@g8": dict(rows=32, num_warps=8),
             "measured": "a test"}
    _with_table(tmp_path, monkeypatch, entry)
    try:
        dev = torch.device("cuda")
        assert tuning.tile_shape(dev, "fwd") == plain
        assert tuning.tile_shape(dev, "fwd", head_dim=64, dtype=torch.bfloat16) == plain
        assert tuning.tile_shape(dev, "fwd", head_dim=128, dtype=torch.bfloat16, block_size=64) == d128
        assert tuning.tile_shape(dev, "fwd", head_dim=128, dtype=torch.float32, block_size=64) == d128_fp32
        assert tuning.tile_shape(dev, "fwd", head_dim=128, dtype=torch.bfloat16, block_size=16) == d128_b16
        assert tuning.tile_shape(dev, "bwd", head_dim=128, dtype=torch.float32) == plain
        assert tuning.tile_shape(dev, "select", head_dim=64, group=8) == dict(rows=32, num_warps=8)
        assert tuning.tile_shape(dev, "decode_attend", head_dim=64) == tuning._table()["default"]["decode_attend"]
        q = torch.zeros(1, 1, 1, 128, dtype=torch.float32)
        monkeypatch.setattr(prefill, "device_name", lambda device: "Some GPU")
        assert prefill.launch_tile(q, 64) == d128_fp32  # the prefill kernels ask with their head dim and dtype
    finally:
        monkeypatch.undo()
        tuning.clear_caches()


@pytest.mark.parametrize("key", ["fwd@d128,xl", "attn@d128", "fwd@"])
def test_bad_table_keys_say_what_is_allowed(tmp_path, monkeypatch, key):
    tile = dict(block_m=64, window_n=64, num_warps=4, num_stages=2)
    _with_table(tmp_path, monkeypatch, {"fwd": tile, "bwd": tile, "select": dict(rows=64, num_warps=4), key: tile})
    try:
        with pytest.raises(ValueError, match="qualifiers among d<head dim>, fp16/bf16/fp32, g<group>, b<block size>"):
            tuning._table()
    finally:
        monkeypatch.undo()
        tuning.clear_caches()


def test_the_decode_kernels_read_the_table(monkeypatch):
    """A Triton decode step asks the table for both of its kernels' shapes, with its head dim, dtype and group."""
    from sparsex_hf import SparseXConfig, sparsex_decode_attention
    from sparsex_hf.ops.attention.kernels import decode as decode_kernel
    from sparsex_hf.ops.attention.rules.common import block_summaries

    asked = []
    real = decode_kernel.tile_shape
    monkeypatch.setattr(decode_kernel, "tile_shape", lambda dev, kind, **kw: asked.append((kind, kw)) or real(dev, kind, **kw))
    cfg = SparseXConfig(block_size=16, sink_tokens=16, window=32, stride=16, topk=2)
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 100, 32)
    summ = tuple(t[None] for t in block_summaries(k[0], 16))
    sparsex_decode_attention(q, k, k, summ, torch.zeros(1, dtype=torch.int32), 100, cfg, backend="triton")
    kinds = {kind for kind, _ in asked}
    assert kinds == {"decode_shortlist", "decode_attend"}
    assert all(kw["head_dim"] == 32 and kw["dtype"] == torch.float32 and kw["group"] == 2 for _, kw in asked)

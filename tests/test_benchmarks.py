"""Smoke runs of the benchmark scripts that have a CPU mode (their GPU numbers come from the H200 runs)."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_bench_devices_splits_the_layers_and_writes_a_row(tmp_path):
    """bench_devices.py on two (CPU) devices and with the offloaded cache: one row per run, the decode rate and
    the peak memory filled in."""
    for extra in (["--devices", "cpu,cpu"], ["--devices", "cpu", "--offload"]):
        res = subprocess.run([sys.executable, "benchmarks/bench_devices.py", "--tiny", "--context", "600", "--steps", "1",
                              "--out-dir", str(tmp_path), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "devices.csv")))
    assert [(r["devices"], r["offload"]) for r in rows] == [("cpu+cpu", "False"), ("cpu", "True")]
    assert all(int(r["tokens"]) == 600 and float(r["tok_per_s"]) > 0 and r["peak_gib"].startswith("cpu=") for r in rows)


def test_save_fitted_merges_a_matrix_runs_shapes_into_the_table(tmp_path):
    """save_fitted.py: the shapes a matrix run logged become qualified keys of that GPU's entry (its other keys
    kept); one key fitted two ways is refused."""
    import json

    from sparsex_hf.ops.attention.kernels import tuning

    table = tmp_path / "tiles.json"
    table.write_text(json.dumps(tuning._table()))
    gpu = next(g for g in tuning._table() if g != "default")
    before = json.loads(table.read_text())[gpu]
    tile = dict(block_m=64, window_n=64, num_warps=8, num_stages=1)
    log = tmp_path / "fitted.jsonl"
    log.write_text("".join(json.dumps(dict(gpu=g, key="bwd@d128,bf16,b128", tile=tile)) + "\n" for g in (gpu, gpu)))
    res = subprocess.run([sys.executable, "benchmarks/save_fitted.py", str(log), "--note", "a test",
                          "--table", str(table)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    after = json.loads(table.read_text())[gpu]
    assert after["bwd@d128,bf16,b128"] == tile and after["fitted"] == "benchmarks/save_fitted.py: a test"
    assert all(after[k] == v for k, v in before.items() if k not in ("fitted", "bwd@d128,bf16,b128"))
    log.write_text(log.read_text() + json.dumps(dict(gpu=gpu, key="bwd@d128,bf16,b128", tile=dict(tile, block_m=32))))
    res = subprocess.run([sys.executable, "benchmarks/save_fitted.py", str(log), "--note", "x", "--table", str(table)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "fitted as" in res.stderr


@pytest.mark.parametrize("window, block", [(64, 16), (256, 16), (64, 128)])
def test_exact_sets_give_sparsex_attention_through_flex_attention(window, block):
    """bench_candidates.exact_sets: FlexAttention over K + the appended stride keys, with its block lists and
    membership test, gives the reference's answer (sink, window, stride and the selected blocks, each key once);
    the appended keys carry the stride set (zeroing their values changes the answer). A window of 256 makes full
    tiles (no membership test), a window of 64 none; blocks of 128 keys selected per 128 queries (the tiles' own
    size) are full tiles too."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_candidates import exact_sets

    from sparsex_hf import SparseXConfig, sparsex_attention

    cfg = SparseXConfig(window=window, block_size=block, sink_tokens=16, stride=32, topk=3 if block < 128 else 1,
                        select_tile=block, dense_when_faster=False)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 512, 32, generator=gen) for h in (4, 2, 2))
    k2, v2, mask = exact_sets(q, k, v, cfg)
    assert (int(mask.full_kv_num_blocks.sum()) > 0) == (window == 256 or block == 128)
    flex = torch.compile(flex_attention, dynamic=False)  # (a dynamic recompile breaks the CPU backend)
    out = flex(q, k2, v2, block_mask=mask, enable_gqa=True)
    ref = sparsex_attention(q, k, v, cfg, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    v2[:, :, 512:] = 0
    assert (flex(q, k2, v2, block_mask=mask, enable_gqa=True) - ref).abs().max() > 1e-2


def test_one_pass_tiles_and_the_candidates_check_with_gradients():
    """bench_candidates.one_pass_tiles: the tile pattern over [stride keys; K], causal from the end of K' (as
    FlashAttention aligns it), keeps exactly the two-pass keys: ``check`` (forward and gradients against fp32 over
    the pattern's mask and the stride keys) finds a PyTorch one-pass candidate within bf16 rounding, and finds a
    candidate that drops the stride keys wrong."""
    import re

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_candidates import TILE, check, one_pass_tiles

    def one_pass(q, k, v, pattern, stride, with_stride=True):
        t, g = q.shape[2], q.shape[1] // k.shape[1]
        ns = t // stride if with_stride else 0
        full, masked = one_pass_tiles(pattern, t, ns)
        assert not (full & masked).any()
        keep = (full | masked)[0].repeat_interleave(pattern.q_tile, 1).repeat_interleave(TILE, 2)
        keep &= torch.arange(ns + t)[None] <= torch.arange(t)[:, None] + ns
        k2, v2 = (torch.cat([x[:, :, ::stride][:, :, :ns], x], 2).repeat_interleave(g, 1) for x in (k, v))
        return F.scaled_dot_product_attention(q, k2, v2, attn_mask=keep[None])

    def errors(note):
        return [float(x) for x in re.findall(r"\d\.\d+e[-+]\d+", note)]

    dev = torch.device("cpu")
    note = check(one_pass, dev, t=1024, window_tiles=2, stride=8, grad=True)
    assert "dq / dk / dv" in note and len(errors(note)) == 4, note
    assert max(errors(note)) < 2e-2, note
    without = check(lambda *a: one_pass(*a, with_stride=False), dev, t=1024, window_tiles=2, stride=8)
    assert errors(without)[0] > 5e-2, without
    with pytest.raises(ValueError, match="multiple of 128 stride keys"):
        check(one_pass, dev, t=1024, window_tiles=2, stride=16)

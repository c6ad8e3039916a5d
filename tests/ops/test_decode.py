"""Decode steps over a SparseXLayer against the reference applied to the whole sequence."""

import pytest
import torch

from sparsex_hf import SparseXConfig, SparseXLayer
from sparsex_hf.ops.attention import sparsex_attention, sparsex_decode_attention
from sparsex_hf.ops.attention.naive import block_summaries
from utils import SPARSE_SMALL, random_qkv

BACKENDS = ["torch", "triton"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(k, v, mask=None, offload=False):
    layer = SparseXLayer(offload=offload)
    assert layer.set_offsets(mask, k.shape[0], k.shape[2])
    layer.update(k, v)
    return layer


def _case(b=2, hq=4, hkv=2, t=300, tq=1, d=32, pad=(0, 37), dtype=torch.float32, seed=0):
    q, k, v = (x.to(DEV) for x in random_qkv(b, hq, hkv, t, t, d, dtype=dtype, seed=seed))
    mask = torch.ones(b, t, dtype=torch.bool, device=DEV)
    for i, p in enumerate(pad[:b]):
        mask[i, :p] = False
    return q, k, v, mask


def _check(cfg, backend, b=2, hq=4, hkv=2, t=300, tq=1, d=32, pad=(0, 37), sliding_window=None, mix=None,
           dtype=torch.float32, tol=2e-5, seed=0):
    q, k, v, mask = _case(b, hq, hkv, t, tq, d, pad, dtype, seed)
    ref = sparsex_attention(q, k, v, cfg.replace(select_tile=1), attention_mask=mask, backend="torch",
                            sliding_window=sliding_window, mix_weights=mix)
    # the cache holds everything; the decode step is the last tq queries
    layer = _layer(k, v, None if all(p == 0 for p in pad[:b]) else mask)
    out = sparsex_decode_attention(q[:, :, -tq:], layer, cfg, backend=backend, sliding_window=sliding_window,
                                   mix_weights=mix)
    torch.testing.assert_close(out.float(), ref[:, :, -tq:].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("g", [1, 2, 3])
def test_decode_union_matches_reference(backend, tq, g):
    cfg = SparseXConfig(**SPARSE_SMALL)
    _check(cfg, backend, hq=2 * g, hkv=2, tq=tq)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["minmax", "mean", "hybrid"])
def test_decode_scores_match_reference(backend, score):
    _check(SparseXConfig(**SPARSE_SMALL, score=score), backend, t=257, tq=2, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_mix_and_sliding_window(backend):
    cfg = SparseXConfig(**SPARSE_SMALL, combine="mix", alpha=1.0, beta=0.5, gamma=2.0)
    _check(cfg, backend, t=280, tq=2, mix=torch.rand(4, 3, device=DEV) + 0.1)
    _check(SparseXConfig(**SPARSE_SMALL), backend, t=280, sliding_window=150)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_no_stride_no_topk_and_short_rows(backend):
    _check(SparseXConfig(**SPARSE_SMALL).replace(stride=0), backend, t=200)
    _check(SparseXConfig(**SPARSE_SMALL).replace(topk=0), backend, t=200)
    _check(SparseXConfig(**SPARSE_SMALL), backend, t=120, pad=(0, 100))  # a row shorter than the window


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_head_dim_128_and_fp16(backend):
    _check(SparseXConfig(**SPARSE_SMALL), backend, d=128, t=200, tq=2)
    if backend == "torch" or torch.cuda.is_available():  # the interpreter's low-precision dot is unreliable
        _check(SparseXConfig(**SPARSE_SMALL), backend, t=260, tq=2, dtype=torch.float16, tol=2e-3)


def test_offloaded_layer_matches():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v, mask = _case(t=260)
    a = sparsex_decode_attention(q[:, :, -1:], _layer(k, v, mask), cfg, backend="torch")
    b = sparsex_decode_attention(q[:, :, -1:], _layer(k, v, mask, offload=True), cfg, backend="torch")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_decode_reads_only_its_keys():
    """Keys outside sink, window, stride and the selected blocks do not influence the output."""
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v, _ = _case(b=1, t=400, pad=(0,))
    layer = _layer(k, v)
    out = sparsex_decode_attention(q[:, :, -1:], layer, cfg, backend="torch")
    from sparsex_hf.ops.attention.decode import decode_positions, decode_select

    pos = decode_positions(layer, 1, q.device)
    sel = decode_select(q[:, :, -1:], pos, layer.summaries(16), cfg, None)
    p = int(pos[0, 0])
    keep = torch.zeros(400, dtype=torch.bool, device=DEV)
    keep[:16] = True
    keep[p - 63 :] = True
    keep[::32] = True
    for blk in sel.flatten().tolist():
        if blk >= 0:
            keep[blk * 16 : blk * 16 + 16] = True
    v2 = v.clone()
    v2[:, :, ~keep] = 1e3  # values no query may see
    out2 = sparsex_decode_attention(q[:, :, -1:], _layer(k, v2), cfg, backend="torch")
    torch.testing.assert_close(out, out2)


def _check_summaries(layer, bs):
    kmin, kmax, kmean = layer.summaries(bs)
    for b, off in enumerate(layer.offsets):
        keys = layer.keys[b, :, off:]
        ref = block_summaries(keys.float(), bs)
        nb = ref[0].shape[1]
        assert layer.counts[b] == nb
        torch.testing.assert_close(kmin[b, :, :nb].float(), ref[0])
        torch.testing.assert_close(kmax[b, :, :nb].float(), ref[1])
        torch.testing.assert_close(kmean[b, :, :nb].float(), ref[2], atol=1e-6, rtol=1e-5)


def test_summaries_stay_consistent_under_growth_crop_reorder_select_repeat():
    q, k, v, mask = _case(t=150, pad=(5, 40))
    layer = SparseXLayer()
    layer.set_offsets(mask, 2, 150)
    layer.update(k[:, :, :100], v[:, :, :100])
    _check_summaries(layer, 16)
    for t in range(100, 150):  # one token at a time: a block completes now and then
        layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        _check_summaries(layer, 16)
    layer.crop(-30)
    assert layer.get_seq_length() == 120
    _check_summaries(layer, 16)
    layer.update(k[:, :, 120:140].flip(2), v[:, :, 120:140])  # different keys where the cropped ones were
    _check_summaries(layer, 16)
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.offsets == [40, 5]
    _check_summaries(layer, 16)
    layer.batch_repeat_interleave(2)
    assert layer.offsets == [40, 40, 5, 5]
    _check_summaries(layer, 16)
    layer.batch_select_indices(torch.tensor([1, 2]))
    assert layer.offsets == [40, 5]
    _check_summaries(layer, 16)
    _check_summaries(layer, 32)  # another block size: summarised from scratch


def test_summaries_are_at_most_a_32nd_of_the_cache():
    _, k, v, _ = _case(b=1, t=4096, pad=(0,), dtype=torch.bfloat16)
    layer = _layer(k, v)
    layer.summaries(64)
    kv = layer.keys.numel() * 2 * 2
    assert layer.summary_bytes() <= kv / 32


@pytest.mark.parametrize("score", ["minmax", "mean"])
@pytest.mark.parametrize("ties", [False, True])
def test_select_kernel_matches_reference_over_many_splits(score, ties):
    """The split selection kernel + merge picks the reference's blocks in the reference's order (ties: lower
    block first), with enough blocks for several splits per (sequence, KV head) and rows of different length."""
    pytest.importorskip("triton")
    if DEV == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")
    from sparsex_hf.ops.attention.decode import decode_positions, decode_select
    from sparsex_hf.ops.attention.decode_kernel import decode_select_triton

    cfg = SparseXConfig(**SPARSE_SMALL, score=score).replace(block_size=4, topk=6)
    t = 1100  # 275 blocks of 4: two splits of 256 blocks
    q, k, v, mask = _case(b=2, hq=4, hkv=2, t=t, d=16, pad=(0, 70), seed=3)
    if ties:  # 8 small-integer keys repeated along the sequence: many blocks with exactly equal scores
        gen = torch.Generator().manual_seed(4)
        q = torch.randint(-2, 3, q.shape, generator=gen).float().to(DEV)
        k = torch.randint(-2, 3, (*k.shape[:2], 8, k.shape[3]), generator=gen).float().to(DEV)
        k = k[:, :, torch.arange(t, device=DEV) % 8]
    layer = _layer(k, v, mask)
    for tq in (1, 3):
        qq = q[:, :, -tq:]
        summ = layer.summaries(cfg.block_size)
        ref = decode_select(qq, decode_positions(layer, tq, qq.device), summ, cfg.replace(score=score), None)
        if DEV == "cuda":  # the CUDA reference path takes torch.topk (unordered ties): compare the CPU rule
            ref = decode_select(qq.cpu(), decode_positions(layer, tq, "cpu"), tuple(s.cpu() for s in summ), cfg, None)
        got = decode_select_triton(qq, layer, summ, cfg, None)
        assert got.dtype == torch.int32 and got.shape == ref.shape
        assert torch.equal(got.long().cpu(), ref.cpu()), (got, ref)

"""The PyTorch reference against docs/spec.md, written out independently in tests/utils.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from utils import ONE_STAGE, SPARSE_SMALL, brute_force, dense_causal, random_qkv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention.reference.naive import sparsex_attention_naive

# (id, batch, Hq, Hkv, Tq, Tk, D)
SHAPES = [
    ("T1", 1, 2, 2, 1, 1, 64),
    ("T63-gqa1-d64", 1, 2, 2, 63, 63, 64),
    ("T111-gqa3-d128", 1, 3, 1, 111, 111, 128),
    ("T200-gqa4-b2", 2, 4, 1, 200, 200, 64),
    ("T515-gqa3", 1, 3, 1, 515, 515, 64),
    ("Tq37<Tk200-gqa4", 1, 8, 2, 37, 200, 64),
    ("decode-Tq1<Tk300", 2, 4, 2, 1, 300, 64),
]
CONFIGS = {
    "union-minmax": dict(SPARSE_SMALL),
    "one-stage": dict(SPARSE_SMALL, **ONE_STAGE),
    "union-mean": dict(SPARSE_SMALL, score="mean", stride=0),
    "unaligned-sink": dict(SPARSE_SMALL, sink_tokens=5, topk=3),
    "mix": dict(SPARSE_SMALL, combine="mix", beta=0.5, gamma=2.0),
    "tile16": dict(SPARSE_SMALL, select_tile=16),
    "tile8-one-stage-mean": dict(SPARSE_SMALL, select_tile=8, score="mean", **ONE_STAGE),
    "rerank2-per-query": dict(SPARSE_SMALL, select_tile=1, rerank=2, topk=3, anchor=False),
    "tile16-rerank3": dict(SPARSE_SMALL, select_tile=16, rerank=3, topk=2, anchor=False),
    "tile8-mean-rerank2": dict(SPARSE_SMALL, select_tile=8, score="mean", rerank=2, topk=2),
    "tile16-mean-anchor": dict(SPARSE_SMALL, select_tile=16, rerank=1, anchor=True, topk=2),
    "per-query-anchor": dict(SPARSE_SMALL, select_tile=1, rerank=2, anchor=True, topk=3),
    "tile16-split-anchor": dict(SPARSE_SMALL, select_tile=16, rerank=1, anchor="split", topk=3),
}


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_reference_matches_brute_force(shape, cfg):
    _, b, hq, hkv, tq, tk, d = shape
    if tk in (515, 1) and cfg is not CONFIGS["union-minmax"]:
        pytest.skip("the long brute-force case runs once")
    cfg = SparseXConfig(**cfg)
    q, k, v = random_qkv(b, hq, hkv, tq, tk, d, seed=tk + hq)
    out = sparsex_attention(q, k, v, cfg)
    torch.testing.assert_close(out, brute_force(q, k, v, cfg), atol=1e-10, rtol=1e-10)


def test_budget_is_really_sparse():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(1, 2, 1, 300, 300, 32)
    assert (sparsex_attention(q, k, v, cfg) - dense_causal(q, k, v)).abs().max() > 1e-2


@pytest.mark.parametrize("shape", [(1, 4, 4, 257, 257, 64), (2, 12, 4, 100, 333, 128), (1, 9, 3, 1, 77, 64)])
def test_full_budget_equals_sdpa_fp32(shape):
    b, hq, hkv, tq, tk, d = shape
    q, k, v = random_qkv(b, hq, hkv, tq, tk, d, dtype=torch.float32, seed=1)
    out = sparsex_attention(q, k, v, SparseXConfig(window=tk, topk=8, stride=7))
    assert (out - dense_causal(q, k, v)).abs().max() <= 1e-5


def _masked_reference(q, k, v, allowed):
    """softmax over an explicit [Tq, Tk] key mask (tiny inputs only), by SDPA."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allowed)


@pytest.mark.parametrize(
    "name, cfg, rule",
    [
        ("window-only", dict(window=17, sink_tokens=0, stride=0, topk=0), lambda i, j: (j <= i) & (j > i - 17)),
        ("stride-only", dict(window=1, sink_tokens=0, stride=10, topk=0), lambda i, j: (j <= i) & ((j % 10 == 0) | (j == i))),
        ("sink-only", dict(window=1, sink_tokens=6, stride=0, topk=0), lambda i, j: (j <= i) & ((j < 6) | (j == i))),
    ],
)
def test_single_set_configs_match_mask(name, cfg, rule):
    q, k, v = random_qkv(2, 4, 2, 90, 130, 64, seed=3)
    i = torch.arange(90)[:, None] + 40
    j = torch.arange(130)[None]
    out = sparsex_attention(q, k, v, SparseXConfig(**cfg))
    torch.testing.assert_close(out, _masked_reference(q, k, v, rule(i, j)))


def test_planted_needle_block_is_selected():
    torch.manual_seed(0)
    b, hq, hkv, t, d, bs = 1, 4, 2, 1024, 64, 32
    q = torch.randn(b, hq, t, d) * 0.3
    k = torch.randn(b, hkv, t, d) * 0.3
    v = torch.randn(b, hkv, t, d)
    needle_block = 7  # keys 224..255, far outside the window of the last queries
    direction = torch.randn(d)
    direction /= direction.norm()
    k[:, :, needle_block * bs : (needle_block + 1) * bs] += 12 * direction
    q[:, :, -16:] += 12 * direction  # logit ~18 on the needle block, ~0 elsewhere
    cfg = SparseXConfig(block_size=bs, sink_tokens=32, window=128, stride=0, topk=2)
    out, stats = sparsex_attention(q, k, v, cfg, return_stats=True)
    assert (stats.selected_blocks[0, :, -16:, 0] == needle_block).all()
    ref = dense_causal(q, k, v)
    assert (out[:, :, -16:] - ref[:, :, -16:]).abs().max() <= 1e-3
    without = sparsex_attention(q, k, v, cfg.replace(topk=0))
    assert (without[:, :, -16:] - ref[:, :, -16:]).abs().max() > 1e-1


def test_padding_positions_count_from_first_real_token():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(2, 4, 2, 200, 200, 64, seed=5)
    alone = sparsex_attention(q[:1, :, :150], k[:1, :, :150], v[:1, :, :150], cfg)
    # row 0 = the same sequence left-padded by 50 junk tokens; row 1 unpadded
    qb, kb, vb = (torch.cat([t[1:], t[:1]]) for t in (q, k, v))
    for t, src in ((qb, q), (kb, k), (vb, v)):
        t[1, :, 50:] = src[0, :, :150]
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[1, :50] = False
    out = sparsex_attention(qb, kb, vb, cfg, attention_mask=mask)
    torch.testing.assert_close(out[1, :, 50:], alone[0], atol=1e-12, rtol=0)
    assert (out[1, :, :50] == 0).all() and not out.isnan().any()
    torch.testing.assert_close(out, brute_force(qb, kb, vb, cfg, attention_mask=mask), atol=1e-10, rtol=1e-10)


def test_packed_documents_are_independent():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(1, 4, 2, 300, 300, 64, seed=6)
    cu = torch.tensor([0, 110, 111, 300])
    out = sparsex_attention(q, k, v, cfg, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = sparsex_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], cfg)
        torch.testing.assert_close(out[:, :, s:e], alone, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, brute_force(q, k, v, cfg, cu_seqlens=cu), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("select_tile, first_rows", [(1, (150, 270)), (64, (128, 244))])
def test_packed_chunk_with_separate_query_boundaries(select_tile, first_rows):
    """A chunked prefill equals one pass when chunks start on selection-tile boundaries (any row if 1)."""
    cfg = SparseXConfig(**SPARSE_SMALL, select_tile=select_tile)
    q, k, v = random_qkv(1, 4, 2, 300, 300, 64, seed=7)
    cu_k = torch.tensor([0, 180, 300])
    full = sparsex_attention(q, k, v, cfg, cu_seqlens=cu_k)
    a, b = first_rows  # document 0 from row a (position a), document 1 from row b (position b - 180)
    rows = torch.cat([torch.arange(a, 180), torch.arange(b, 300)])
    cu_q = torch.tensor([0, 180 - a, 180 - a + 300 - b])
    out = sparsex_attention(q[:, :, rows], k, v, cfg, cu_seqlens=cu_k, cu_seqlens_q=cu_q)
    torch.testing.assert_close(out, full[:, :, rows], atol=1e-12, rtol=0)


def test_sliding_window_limits_every_set():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(1, 4, 2, 200, 200, 64, seed=8)
    out = sparsex_attention(q, k, v, cfg, sliding_window=40)
    torch.testing.assert_close(out, brute_force(q, k, v, cfg, sliding_window=40), atol=1e-10, rtol=1e-10)
    i, j = torch.arange(200)[:, None], torch.arange(200)[None]
    torch.testing.assert_close(out, _masked_reference(q, k, v, (j <= i) & (i - j < 40)))  # window 64 > 40
    ignored = sparsex_attention(q, k, v, cfg.replace(respect_sliding_window=False), sliding_window=40)
    torch.testing.assert_close(ignored, sparsex_attention(q, k, v, cfg))


def test_per_head_mix_weights():
    cfg = SparseXConfig(**SPARSE_SMALL, combine="mix")
    q, k, v = random_qkv(1, 4, 2, 160, 160, 64, seed=9)
    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.5, 0.1], [1.0, 3.0, 0.0]])
    out = sparsex_attention(q, k, v, cfg, mix_weights=w)
    torch.testing.assert_close(out, brute_force(q, k, v, cfg, mix_weights=w), atol=1e-10, rtol=1e-10)


def test_gradients_match_brute_force():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(1, 4, 2, 100, 100, 16, seed=10, requires_grad=True)
    grad_out = torch.randn(1, 4, 100, 16, dtype=torch.float64)
    got = torch.autograd.grad((sparsex_attention(q, k, v, cfg) * grad_out).sum(), (q, k, v))
    want = torch.autograd.grad((brute_force(q, k, v, cfg) * grad_out).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(dtype):
    cfg = SparseXConfig(**SPARSE_SMALL)
    # the same (rounded) inputs in fp32: rounding the inputs may legitimately flip near-tied blocks
    q, k, v = (t.to(dtype).float() for t in random_qkv(1, 4, 2, 200, 200, 64, dtype=torch.float32, seed=11))
    ref = sparsex_attention(q, k, v, cfg)
    out = sparsex_attention(q.to(dtype), k.to(dtype), v.to(dtype), cfg)
    assert out.dtype == dtype
    # error against fp32 at most ~2x that of a low-precision PyTorch dense run
    base_err = (dense_causal(q.to(dtype), k.to(dtype), v.to(dtype)).float() - dense_causal(q, k, v)).abs().max()
    assert (out.float() - ref).abs().max() <= 2 * base_err + 1e-3


def test_stats_mass_and_oracle():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(1, 4, 2, 300, 300, 32, seed=12)
    mask = torch.ones(1, 300, dtype=torch.bool)
    mask[0, :20] = False
    _, st = sparsex_attention(q, k, v, cfg, attention_mask=mask, return_stats=True)
    assert st.selected_blocks.shape == (1, 2, 300, cfg.topk)
    assert not st.valid[0, :20].any() and st.valid[0, 20:].all()
    kept, oracle = st.mass_kept[:, :, 20:], st.oracle_mass[:, :, 20:]
    assert st.mass_kept[:, :, :20].isnan().all()
    assert (kept <= 1 + 1e-6).all() and (kept > 0).all() and (oracle >= kept - 1e-6).all()
    assert kept.mean() < 0.999  # the budget is sparse here
    # early queries see everything: mass 1
    torch.testing.assert_close(kept[..., :60], torch.ones_like(kept[..., :60]))
    _, full = sparsex_attention(q, k, v, cfg.replace(window=300), return_stats=True)
    torch.testing.assert_close(full.mass_kept, torch.ones_like(full.mass_kept))


def test_tiles_do_not_change_the_result():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(1, 4, 2, 257, 257, 32, seed=13)
    whole = sparsex_attention_naive(q, k, v, cfg, scale=32**-0.5)
    tiny_tiles = sparsex_attention_naive(q, k, v, cfg, scale=32**-0.5, tile_elements=1)
    torch.testing.assert_close(whole, tiny_tiles, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(q=torch.zeros(1, 3, 4, 8), k=torch.zeros(1, 2, 4, 8)), ValueError, "multiple"),
        (dict(q=torch.zeros(1, 2, 5, 8), k=torch.zeros(1, 2, 4, 8)), ValueError, "more queries"),
        (dict(q=torch.zeros(1, 2, 4, 8, dtype=torch.int32)), TypeError, "supports"),
        (dict(q=torch.zeros(2, 4, 8)), ValueError, "4-D"),
        (dict(attention_mask=torch.ones(1, 1, 4, 4)), ValueError, "2-D padding mask"),
        (dict(cu_seqlens=torch.tensor([0, 3])), ValueError, "end at the sequence length 4"),
        (dict(cu_seqlens=torch.tensor([0, 2, 4]), attention_mask=torch.ones(1, 4)), ValueError, "not both"),
        (dict(backend="cuda"), ValueError, "allowed"),
        (dict(sliding_window=0), ValueError, "sliding_window"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, error, match):
    args = dict(q=torch.zeros(1, 2, 4, 8), k=torch.zeros(1, 2, 4, 8))
    args.update(kwargs)
    q, k = args.pop("q"), args.pop("k")
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    with pytest.raises(error, match=match):
        sparsex_attention(q, k, k.clone(), SparseXConfig(**SPARSE_SMALL), **args)


def test_triton_backend_off_gpu_is_refused(monkeypatch):
    from sparsex_hf.ops.attention import resolve_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.gpu
def test_reference_on_gpu_matches_cpu():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(2, 8, 2, 300, 300, 64, dtype=torch.float32, seed=14)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, :33] = False
    cpu = sparsex_attention(q, k, v, cfg, attention_mask=mask, backend="torch")
    gpu = sparsex_attention(q.cuda(), k.cuda(), v.cuda(), cfg, attention_mask=mask.cuda(), backend="torch")
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-5, rtol=1e-4)
    assert math.isfinite(gpu.abs().sum().item())


@pytest.mark.parametrize("case", ["padding", "packed", "sliding", "split"])
def test_anchor_tile_matches_brute_force(case):
    """With ``anchor``, each document's last selection tile ranks every eligible block exactly: padded rows,
    packed documents (each document's own last tile), a sliding window and the ``"split"`` rule, against the
    brute force."""
    cfg = SparseXConfig(**dict(SPARSE_SMALL, select_tile=16, rerank=1, anchor="split" if case == "split" else True,
                               topk=3 if case == "split" else 2))
    q, k, v = random_qkv(2, 4, 2, 300, 300, 64, seed=11)
    kw = {}
    if case == "padding":
        kw["attention_mask"] = torch.arange(300)[None] >= torch.tensor([[0], [37]])
    elif case == "packed":
        q, k, v = q[:1], k[:1], v[:1]
        kw["cu_seqlens"] = torch.tensor([0, 150, 300])
    else:
        kw["sliding_window"] = 200
    out = sparsex_attention(q, k, v, cfg, **kw)
    torch.testing.assert_close(out, brute_force(q, k, v, cfg, **kw), atol=1e-10, rtol=1e-10)
    assert (out - sparsex_attention(q, k, v, cfg.replace(anchor=False), **kw)).abs().amax() > 1e-3  # it does change

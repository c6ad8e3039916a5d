"""The op's input contract: empty inputs, all-padding rows and the mistakes a caller is likely to make get the
right answer or a clear error, on both backends."""

import math

import pytest
import torch
from utils import SPARSE_SMALL

from sparsex_hf import SparseXConfig, sparsex_attention

BACKENDS = ["torch", "triton"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CFG = SparseXConfig(**SPARSE_SMALL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_shape,k_shape", [((0, 4, 10, 32), (0, 2, 10, 32)), ((1, 4, 0, 32), (1, 2, 10, 32)),
                                             ((1, 4, 0, 32), (1, 2, 0, 32))], ids=["B=0", "Tq=0", "T=0"])
def test_empty_inputs_give_empty_outputs(backend, q_shape, k_shape):
    q, k = torch.randn(q_shape, device=DEV), torch.randn(k_shape, device=DEV)
    out = sparsex_attention(q, k, k, CFG, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    if backend == "torch":
        out, stats = sparsex_attention(q, k, k, CFG, backend=backend, return_stats=True)
        assert stats.selected_blocks.shape == (q_shape[0], k_shape[1], q_shape[2], CFG.topk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_rows_give_zeros(backend):
    gen = torch.Generator().manual_seed(31)
    q = torch.randn(2, 4, 90, 32, generator=gen).to(DEV)
    k = torch.randn(2, 2, 90, 32, generator=gen).to(DEV)
    mask = torch.ones(2, 90, dtype=torch.bool, device=DEV)
    mask[1] = False
    out = sparsex_attention(q, k, k, CFG, attention_mask=mask, backend=backend)
    assert (out[1] == 0).all() and not out.isnan().any()
    alone = sparsex_attention(q[:1], k[:1], k[:1], CFG, backend=backend)
    torch.testing.assert_close(out[:1], alone)
    out = sparsex_attention(q, k, k, CFG, attention_mask=torch.zeros_like(mask), backend=backend)
    assert (out == 0).all()


def test_additive_float_masks_are_refused_with_the_convention():
    q, k = torch.randn(1, 2, 20, 32), torch.randn(1, 2, 20, 32)
    additive = torch.zeros(1, 20)
    additive[0, :5] = -math.inf
    with pytest.raises(ValueError, match="1/True for a real token"):
        sparsex_attention(q, k, k, CFG, attention_mask=additive)
    with pytest.raises(ValueError, match="additive"):
        sparsex_attention(q, k, k, CFG, attention_mask=torch.full((1, 20), -1e9))
    ones = torch.ones(1, 20)  # a float 0/1 mask is a padding mask
    torch.testing.assert_close(sparsex_attention(q, k, k, CFG, attention_mask=ones), sparsex_attention(q, k, k, CFG))


@pytest.mark.parametrize("scale", [math.nan, math.inf, 0.0, -1.0])
def test_bad_scale_is_refused(scale):
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="scale"):
        sparsex_attention(q, q, q, CFG, scale=scale)


def test_sequence_first_layout_is_caught():
    q = torch.randn(1, 2048, 4, 32)  # [B, T, H, D] by mistake
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        sparsex_attention(q, q, q, CFG)


def test_anchor_inputs_are_checked():
    """The decode op's ``anchor`` must be an integer ``[B, Hkv, A]``; the prompt-anchor op checks its shapes."""
    from sparsex_hf.ops.attention import sparsex_decode_attention, sparsex_prompt_anchor
    from sparsex_hf.ops.attention.rules.common import block_summaries

    cfg = SparseXConfig(**dict(SPARSE_SMALL, rerank=1, anchor=True))
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 100, 16)
    summ = tuple(t[None] for t in block_summaries(k[0], 16))
    off = torch.zeros(1, dtype=torch.int32)
    for bad in (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"anchor must be an integer tensor \[B, Hkv, A\] = \[1, 2, A\]"):
            sparsex_decode_attention(q, k, k, summ, off, 100, cfg, anchor=bad)
    ok = sparsex_decode_attention(q, k, k, summ, off, 100, cfg, anchor=torch.full((1, 2, 4), -1))
    assert ok.shape == q.shape and not ok.isnan().any()
    with pytest.raises(ValueError, match="do not match"):
        sparsex_prompt_anchor(torch.randn(1, 3, 8, 16), k, off, 100, cfg)
    with pytest.raises(ValueError, match=r"seq_len=101 must be in \[Tq=8, cache length 100\]"):
        sparsex_prompt_anchor(torch.randn(1, 4, 8, 16), k, off, 101, cfg)
    got = sparsex_prompt_anchor(torch.randn(1, 4, 8, 16), k, off, 100, cfg)
    assert got.shape == (1, 2, cfg.topk) and got.dtype == torch.long


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_width_heads_are_refused(backend):
    from sparsex_hf.ops.attention import sparsex_decode_attention

    q = torch.randn(1, 2, 8, 0, device=DEV)
    with pytest.raises(ValueError, match=r"head_dim .* must be >= 1, got 0"):
        sparsex_attention(q, q, q, CFG, backend=backend)
    summ = tuple(torch.zeros(1, 2, 0, 0, device=DEV) for _ in range(3))
    with pytest.raises(ValueError, match=r"head_dim .* must be >= 1, got 0"):
        sparsex_decode_attention(q[:, :, :1], q, q, summ, torch.zeros(1, dtype=torch.int32, device=DEV), 8, CFG,
                                 backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, math.nan, 1.0]])
def test_bad_mix_weights_are_refused(backend, weights):
    """Weights that make the weighted mean undefined (zero local weight: 0/0 where the other branches are empty) or
    negative or NaN are refused by both ops, as the config's alpha, beta, gamma are."""
    from sparsex_hf.ops.attention import sparsex_decode_attention
    from sparsex_hf.ops.attention.rules.common import block_summaries

    cfg = CFG.replace(combine="mix")
    q, k = torch.randn(1, 4, 40, 32), torch.randn(1, 2, 40, 32)
    w = torch.tensor(weights)
    with pytest.raises(ValueError, match="mix_weights must be finite and >= 0"):
        sparsex_attention(q, k, k, cfg, backend=backend, mix_weights=w)
    summ = tuple(t[None] for t in block_summaries(k[0], 16))
    with pytest.raises(ValueError, match="mix_weights must be finite and >= 0"):
        sparsex_decode_attention(q[:, :, -1:], k, k, summ, torch.zeros(1, dtype=torch.int32), 40, cfg,
                                 backend=backend, mix_weights=w)
    ok = sparsex_attention(q, k, k, cfg, backend=backend, mix_weights=torch.tensor([1.0, 0.0, 2.0]))
    assert not ok.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_impossible_decode_inputs_are_refused(backend):
    """Offsets beyond the cache's length or negative, a max_doc_len outside [Tq, seq_len], summaries with too few
    blocks or another head dim, mixed dtypes, a bad scale or sliding window: one clear error on both backends (the
    Triton kernels used to raise raw errors on some, the torch backend to answer others)."""
    from sparsex_hf.ops.attention import sparsex_decode_attention
    from sparsex_hf.ops.attention.rules.common import block_summaries

    q, k = torch.randn(1, 4, 1, 32, device=DEV), torch.randn(1, 2, 100, 32, device=DEV)
    summ = tuple(t[None] for t in block_summaries(k[0], 16))
    off = torch.zeros(1, dtype=torch.int32, device=DEV)

    def step(q=q, k=k, summ=summ, off=off, **kw):
        return sparsex_decode_attention(q, k, k, summ, off, 100, CFG, backend=backend, **kw)

    offsets = r"offsets must be in \[0, seq_len - Tq\] = \[0, 99\]"
    cases = [
        (dict(off=torch.tensor([150], dtype=torch.int32, device=DEV)), ValueError, offsets),
        (dict(off=torch.tensor([-5], dtype=torch.int32, device=DEV)), ValueError, offsets),
        (dict(max_doc_len=500), ValueError, r"max_doc_len=500 must be in \[Tq=1, seq_len\]"),
        (dict(max_doc_len=0), ValueError, r"max_doc_len=0 must be in"),
        (dict(summ=tuple(s[:, :, :2] for s in summ)), ValueError, "summaries hold 2 blocks; rows of up to 100"),
        (dict(summ=tuple(s[..., :16] for s in summ)), ValueError, r"summaries must be \(kmin, kmax, kmean\)"),
        (dict(k=k.half()), TypeError, "must share one of"),
        (dict(scale=math.nan), ValueError, "scale must be a finite number > 0"),
        (dict(sliding_window=0), ValueError, "sliding_window must be >= 1 or None"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            step(**kw)
    assert not step().isnan().any()


def test_the_torch_decode_ignores_what_padding_columns_hold():
    """A left-padded row whose padding columns hold NaN (never written, or poisoned): the torch decode's answer is
    the one with clean padding, as the Triton decode's and the whole-sequence op's are."""
    from sparsex_hf.ops.attention import sparsex_decode_attention
    from sparsex_hf.ops.attention.rules.common import block_summaries

    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(2, 4, 1, 32, generator=gen), torch.randn(2, 2, 200, 32, generator=gen)
    v = torch.randn(2, 2, 200, 32, generator=gen)
    off = torch.tensor([0, 37], dtype=torch.int32)
    summ = [torch.zeros(2, 2, 12, 32) for _ in range(3)]
    for b, p in enumerate(off.tolist()):
        for s, r in zip(summ, block_summaries(k[b, :, p:], 16)):
            s[b, :, : r.shape[1]] = r
    clean = sparsex_decode_attention(q, k, v, tuple(summ), off, 200, CFG, backend="torch")
    kp, vp = k.clone(), v.clone()
    kp[1, :, :37] = math.nan
    vp[1, :, :37] = math.nan
    poisoned = sparsex_decode_attention(q, kp, vp, tuple(summ), off, 200, CFG, backend="torch")
    assert not poisoned.isnan().any()
    torch.testing.assert_close(poisoned, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_rows_are_differentiable_zeros(backend):
    """With every query row padding the output is zeros with a gradient (zero), as SDPA's answer is: backward()
    runs and gives zero gradients."""
    q, k, v = (torch.randn(1, 4 if i == 0 else 2, 40, 32, device=DEV, requires_grad=True) for i in range(3))
    out = sparsex_attention(q, k, v, CFG, attention_mask=torch.zeros(1, 40, dtype=torch.bool, device=DEV),
                            backend=backend)
    assert (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and (t.grad == 0).all()

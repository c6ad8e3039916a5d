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
    from sparsex_hf.ops.attention.common import block_summaries

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

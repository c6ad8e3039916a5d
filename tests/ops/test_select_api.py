"""The selection seam: ``sparsex_select`` computes the selection stage alone, and ``sparsex_attention(...,
selected_blocks=...)`` attends a given one (as fla's ``block_indices=`` and NSA's ``topk_idx`` do)."""

import pytest
import torch
from utils import SPARSE_SMALL, random_qkv

from sparsex_hf import SparseXConfig, sparsex_attention, sparsex_select

BACKENDS = ["torch", "triton"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CFG = SparseXConfig(**SPARSE_SMALL)


def _inputs(seed=0):
    q, k, v = (x.to(DEV) for x in random_qkv(2, 4, 2, 300, 300, 32, dtype=torch.float32, seed=seed))
    mask = torch.ones(2, 300, dtype=torch.bool, device=DEV)
    mask[1, :37] = False
    return q, k, v, mask


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_given_its_own_selection_is_the_same_call(backend):
    q, k, v, mask = _inputs()
    sel = sparsex_select(q, k, CFG, attention_mask=mask, backend=backend)
    assert sel.shape == (2, 2, 300, CFG.topk) and sel.dtype == torch.int32
    assert (sel[1, :, :37] == -1).all() and (sel[0, :, -1] >= 0).all()  # padding rows select nothing
    want = sparsex_attention(q, k, v, CFG, attention_mask=mask, backend=backend)
    got = sparsex_attention(q, k, v, CFG, attention_mask=mask, backend=backend, selected_blocks=sel)
    assert _rel(got, want) < 1e-5


def test_both_backends_select_the_same_blocks():
    q, k, _, mask = _inputs(seed=3)
    a = sparsex_select(q.double(), k.double(), CFG, attention_mask=mask, backend="torch")
    b = sparsex_select(q, k, CFG, attention_mask=mask, backend="triton")
    assert (a == b).float().mean().item() > 0.99  # (fp32 against fp64 scores: a near-tie may flip)


def test_any_selection_is_attended_alike_on_both_backends():
    """A selection that differs from row to row and names any block (-1, inside the window, not yet causal,
    beyond the keys): the kernels give the reference's output and gradients."""
    q, k, v, mask = _inputs(seed=5)
    gen = torch.Generator().manual_seed(1)
    sel = torch.randint(-3, 300 // 16 + 4, (2, 2, 300, CFG.topk), generator=gen).to(DEV)
    outs, grads = [], []
    for backend in BACKENDS:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = sparsex_attention(*leaves, CFG, attention_mask=mask, backend=backend, selected_blocks=sel)
        g = torch.autograd.grad(out.square().sum(), leaves)
        outs.append(out.detach())
        grads.append(g)
    assert _rel(outs[1], outs[0]) < 1e-5
    for a, b in zip(grads[1], grads[0]):
        assert _rel(a, b) < 1e-4
    plain = sparsex_attention(q, k, v, CFG, attention_mask=mask, backend="torch")
    assert _rel(outs[0], plain) > 1e-3  # the given selection was used


@pytest.mark.parametrize("bad", [torch.zeros(2, 2, 300, 3, dtype=torch.int32), torch.zeros(2, 2, 300, 4),
                                 torch.zeros(1, 2, 300, 4, dtype=torch.long)])
def test_a_wrong_selection_is_refused(bad):
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match=r"selected_blocks must be an integer tensor \[B, Hkv, Tq, topk\]"):
        sparsex_attention(q, k, v, CFG, attention_mask=mask, selected_blocks=bad.to(DEV))

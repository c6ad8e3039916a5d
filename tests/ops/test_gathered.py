"""The torch backend's gathered attention stage (``gathered.py``) against the reference, forward and backward."""

import pytest
import torch
from utils import random_qkv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention import api
from sparsex_hf.ops.attention.gathered import sparsex_attention_gathered
from sparsex_hf.ops.attention.reference.naive import sparsex_attention_naive

BASE = dict(block_size=16, sink_tokens=16, window=32, stride=16, topk=3)
CASES = {
    "plain": (4, 2, 300, 300, {}, None, None),
    "one-query-tile-short": (2, 1, 40, 40, {}, None, None),
    "chunked-prefill": (6, 2, 777, 500, dict(block_size=32, sink_tokens=8, window=50, stride=0, topk=4), None, "pad"),
    "sliding-window": (3, 3, 513, 513, dict(stride=7, topk=2, select_tile=16), 100, "pad"),
    "no-sink-window-1": (8, 1, 400, 400, dict(sink_tokens=0, window=1, topk=5, anchor=False, select_tile=1), None,
                         None),
    "rerank-split-anchor": (4, 2, 600, 600, dict(rerank=2, anchor="split"), None, "pad"),
    "no-topk": (4, 2, 300, 300, dict(topk=0), None, None),
    "packed": (4, 2, 450, 450, {}, None, "packed"),
    "blocks-of-64": (4, 2, 1000, 1000, dict(block_size=64, sink_tokens=64, window=128, stride=64, topk=4), None,
                     None),
}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _layout(kind, t, bsz):
    if kind == "pad":
        mask = torch.ones(bsz, t, dtype=torch.bool)
        mask[1, :37] = False
        mask[0, t // 2 : t // 2 + 5] = False  # a hole inside a row: positions skip it
        return dict(attention_mask=mask)
    if kind == "packed":
        return dict(cu_seqlens=torch.tensor([0, 70, 71, 300, t], dtype=torch.int32))
    return {}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gathered_matches_the_reference(case, dtype):
    """Same output and gradients as the reference on fresh random inputs: fp64 to rounding, fp32 and bf16 inputs
    (computed in fp32 by both) to fp32 rounding and the output's rounding; every chunk size of tiles gives the same answer."""
    hq, hkv, tk, tq, fields, sw, layout = CASES[case]
    bsz = 1 if layout == "packed" else 2
    cfg = SparseXConfig(**(BASE | fields))
    q, k, v = random_qkv(bsz, hq, hkv, tq, tk, 16, dtype=torch.float64, seed=list(CASES).index(case))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    kw = dict(scale=0.25, sliding_window=sw, **_layout(layout, tk, bsz))
    if "cu_seqlens" in kw:
        kw = dict(kw, cu_seqlens_k=kw.pop("cu_seqlens"))
    want = sparsex_attention_naive(q, k, v, cfg, **kw)
    do = torch.randn(want.shape, dtype=torch.float64).to(dtype)
    grads_want = torch.autograd.grad((want * do).sum(), (q, k, v))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-3}[dtype]  # bf16: a last-bit flip
    for tile_elements in (None, 1 << 12):  # one chunk of tiles, or one tile per chunk
        got = sparsex_attention_gathered(q, k, v, cfg, tile_elements=tile_elements, **kw)
        assert got.dtype == dtype and got.shape == want.shape
        assert _rel(got, want) <= tol
        grads = torch.autograd.grad((got * do).sum(), (q, k, v))
        for g, w in zip(grads, grads_want):
            assert _rel(g, w) <= tol


def test_the_torch_backend_computes_union_calls_gathered(monkeypatch):
    """``backend="torch"`` without stats runs the gathered stage; stats, ``combine="mix"`` and given selections
    run the reference (the gathered stage computes the union's one softmax with the selection stage's blocks)."""
    cfg = SparseXConfig(**BASE)
    q, k, v = random_qkv(1, 4, 2, 200, 200, 16, seed=3)
    calls = []
    real = api.sparsex_attention_gathered
    monkeypatch.setattr(api, "sparsex_attention_gathered", lambda *a, **kw: calls.append("gathered") or real(*a, **kw))
    out = sparsex_attention(q, k, v, cfg, backend="torch")
    assert calls == ["gathered"]
    ref, _ = sparsex_attention(q, k, v, cfg, backend="torch", return_stats=True)
    assert calls == ["gathered"] and _rel(out, ref) < 1e-6
    sparsex_attention(q, k, v, cfg.replace(combine="mix"), backend="torch")
    sel = torch.zeros(1, 2, 200, 3, dtype=torch.long)
    sparsex_attention(q, k, v, cfg, backend="torch", selected_blocks=sel)
    assert calls == ["gathered"]

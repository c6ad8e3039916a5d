"""Property-based: random shapes, GQA groups, padding and configs, the reference against the brute-force oracle
of docs/spec.md (tests/utils.py), and the Triton kernels against the reference; bounded in time."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import brute_force, random_qkv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention import HAS_TRITON

CASES = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def cases(draw, max_t=96):
    hkv = draw(st.integers(1, 2))
    g = draw(st.integers(1, 3))
    b = draw(st.integers(1, 2))
    tk = draw(st.integers(1, max_t))
    tq = draw(st.integers(1, tk))
    d = draw(st.sampled_from([16, 32]))
    rerank = draw(st.integers(0, 2))
    cfg = SparseXConfig(
        block_size=draw(st.sampled_from([16, 32])), sink_tokens=draw(st.integers(0, 20)),
        window=draw(st.integers(1, 60)), stride=draw(st.integers(0, 30)), topk=draw(st.integers(0, 3)),
        score=draw(st.sampled_from(["minmax", "mean"])), select_tile=draw(st.sampled_from([1, 16])),
        combine=draw(st.sampled_from(["union", "mix"])), rerank=rerank,
        anchor=draw(st.sampled_from([False, "last", "split"])) if rerank else False,
    )
    pads = [draw(st.integers(0, tk - 1)) for _ in range(b)] if draw(st.booleans()) else None
    return b, hkv * g, hkv, tq, tk, d, cfg, pads, draw(st.integers(0, 10_000))


def _mask(b, tk, pads):
    if pads is None:
        return None
    mask = torch.ones(b, tk, dtype=torch.bool)
    for i, p in enumerate(pads):
        mask[i, :p] = False
    return mask


@settings(**CASES)
@given(cases())
def test_reference_equals_the_brute_force_oracle(case):
    b, hq, hkv, tq, tk, d, cfg, pads, seed = case
    q, k, v = random_qkv(b, hq, hkv, tq, tk, d, seed=seed)
    mask = _mask(b, tk, pads)
    got = sparsex_attention(q, k, v, cfg, attention_mask=mask, backend="torch")
    want = brute_force(q, k, v, cfg, attention_mask=mask)
    rows = torch.ones(b, tq, dtype=torch.bool) if mask is None else mask[:, tk - tq:]
    torch.testing.assert_close(got.permute(0, 2, 1, 3)[rows], want.permute(0, 2, 1, 3)[rows], atol=1e-9, rtol=1e-9)
    assert (got.permute(0, 2, 1, 3)[~rows] == 0).all()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@settings(**CASES)
@given(cases(max_t=80))
def test_triton_equals_the_reference(case):
    b, hq, hkv, tq, tk, d, cfg, pads, seed = case
    q, k, v = random_qkv(b, hq, hkv, tq, tk, d, dtype=torch.float32, seed=seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(dev) for t in (q, k, v))
    mask = _mask(b, tk, pads)
    mask = None if mask is None else mask.to(dev)
    got = sparsex_attention(q, k, v, cfg, attention_mask=mask, backend="triton")
    want = sparsex_attention(q, k, v, cfg, attention_mask=mask, backend="torch")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)

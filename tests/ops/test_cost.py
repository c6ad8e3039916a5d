"""The dense/sparse cost model (ops/attention/cost.py) and the handoff it drives (``dense_when_faster``)."""

import csv
import os

import pytest
import torch
import torch.nn.functional as F
from utils import SPARSE_SMALL, random_qkv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention import cost

CSV = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "prefill.csv")


def _measured(gpu, tags):
    with open(CSV) as f:
        return [r for r in csv.DictReader(f) if r["gpu"] == gpu and r["tag"] in tags and r["phase"] == "fwd"]


def test_the_h100_row_predicts_the_forwards_it_was_fitted_to():
    """The H100's row against the committed forwards of that card (the default config and cuDNN, 8K-128K): within
    12% at every measured length (the model is two lines; its job is the crossover, not the milliseconds)."""
    rows = _measured(cost.REFERENCE_CARD, {"new27d", "exact28"})
    cfg = SparseXConfig()
    checked = 0
    for r in rows:
        n, hq, d = int(r["tokens"]), int(r["hq"]), int(r["d"])
        if r["impl"] not in ("sparsex", "sdpa_cudnn") or n > 131072:
            continue
        sparse, dense = cost.predicted_ms(cfg, n, hq, d, 1, cost.REFERENCE_CARD)
        want = float(r["ms"])
        got = sparse if r["impl"] == "sparsex" else dense
        assert abs(got - want) / want < 0.12, (r["tag"], r["impl"], n, got, want)
        checked += 1
    assert checked >= 5


def test_mean_keys_per_query_counts_the_key_set():
    """The closed form against counting ``min(p + 1, sink + window + topk * block + p // stride + 1)`` per
    position (and the 3338 keys per query the benchmark counted at 8K with the defaults)."""
    for cfg in (SparseXConfig(), SparseXConfig(**SPARSE_SMALL), SparseXConfig(stride=0)):
        base = cfg.sink_tokens + cfg.window + cfg.topk * cfg.block_size
        for n in (1, 100, 5000, 70000):
            count = sum(min(p + 1, base + (p // cfg.stride + 1 if cfg.stride else 0)) for p in range(n)) / n
            assert cost.mean_keys_per_query(cfg, n) == pytest.approx(count, rel=0.01)
    assert cost.mean_keys_per_query(SparseXConfig(), 8192) == pytest.approx(3338, rel=0.01)


@pytest.mark.parametrize("heads, d", [(32, 128), (9, 64), (8, 128)])
def test_the_crossover_is_where_the_choice_flips(heads, d):
    cfg = SparseXConfig()
    n = cost.crossover(cfg, heads, d)
    assert 4096 < n < 65536  # SDPA below some length, Sparse-X above it: 20K for 32 heads of dim 128
    assert cost.dense_is_faster(cfg, n - 256, heads, d, 1, cost.REFERENCE_CARD)
    assert not cost.dense_is_faster(cfg, n, heads, d, 1, cost.REFERENCE_CARD)
    assert not cost.dense_is_faster(cfg, 1 << 20, heads, d, 1, cost.REFERENCE_CARD)


def test_a_card_off_the_table_uses_the_h100_row_and_says_so(caplog):
    cost.card.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert cost.card("Some Unlisted GPU") is cost.CARDS[cost.REFERENCE_CARD]
            cost.card("Some Unlisted GPU")
        assert sum("Some Unlisted GPU" in r.getMessage() for r in caplog.records) == 1
    finally:
        cost.card.cache_clear()


def test_inference_prefills_go_to_sdpa_where_dense_is_faster(monkeypatch, caplog):
    """With the model saying dense is faster: an inference prefill is SDPA's causal attention (padded rows too);
    a call that needs gradients, a chunk (Tq < Tk) and ``dense_when_faster=False`` stay on the kernels."""
    monkeypatch.setattr("sparsex_hf.ops.attention.DENSE_HANDOFF", True)
    monkeypatch.setattr(cost, "dense_is_faster", lambda *a: True)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(1, 4, 2, 300, 300, 32, dtype=torch.float32, seed=1)
    want = sdpa(q, k, v, is_causal=True, enable_gqa=True)

    def run(conf=cfg, grad=False, tq=300, **kw):
        calls.clear()
        qq, kk, vv = (x.clone().requires_grad_(grad) for x in (q[:, :, -tq:], k, v))
        return sparsex_attention(qq, kk, vv, conf, backend="triton", **kw), bool(calls)

    with caplog.at_level("INFO"):
        out, used = run()
    assert used and torch.allclose(out, want, atol=1e-6)
    assert any("predicted faster" in r.getMessage() for r in caplog.records)
    mask = torch.ones(1, 300, dtype=torch.bool)
    mask[0, :40] = False
    out, used = run(attention_mask=mask)
    assert used and (out[:, :, :40] == 0).all()
    torch.testing.assert_close(out[:, :, 40:], sdpa(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], is_causal=True,
                                                    enable_gqa=True), atol=1e-6, rtol=1e-6)
    from sparsex_hf.ops.attention import sparse_kernels_only

    with sparse_kernels_only():  # a training run's held-out loss: the kernels
        assert not run()[1]
    assert run()[1]
    for kw in (dict(grad=True), dict(tq=77), dict(conf=cfg.replace(dense_when_faster=False))):
        out, used = run(**kw)
        assert not used, kw
        ref = sparsex_attention(q[:, :, -kw.get("tq", 300):], k, v, cfg, backend="torch")
        assert ((out.detach() - ref).norm() / ref.norm()).item() < 1e-5


def test_the_real_model_hands_short_prefills_to_sdpa(monkeypatch):
    """Unpatched: a 300-token inference prefill is far below every crossover, so SDPA computes it."""
    monkeypatch.setattr("sparsex_hf.ops.attention.DENSE_HANDOFF", True)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    cfg = SparseXConfig(**dict(SPARSE_SMALL, window=32, sink_tokens=0))  # sink + window cover only 32 keys
    q, k, v = random_qkv(1, 4, 2, 300, 300, 32, dtype=torch.float32, seed=2)
    with torch.no_grad():
        out = sparsex_attention(q, k, v, cfg, backend="triton")
    assert calls and torch.allclose(out, sdpa(q, k, v, is_causal=True, enable_gqa=True), atol=1e-6)

"""The dense/sparse cost model (ops/attention/rules/cost.py) and the handoff it drives (``dense_when_faster``)."""

import csv
import os

import pytest
import torch
import torch.nn.functional as F
from utils import SPARSE_SMALL, model_pair, padded_prompts, random_qkv

import sparsex_hf
from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention.rules import cost

CSV = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "prefill.csv")


def _measured(gpu, tags):
    with open(CSV) as f:
        return [r for r in csv.DictReader(f) if r["gpu"] == gpu and r["tag"] in tags]


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
def test_the_h100_rows_predict_the_calls_they_were_fitted_to(phase):
    """The H100's rows against the committed measurements of that card (the default config and cuDNN, 8K-256K,
    forward and forward + backward): within 20% at every length (the model is two lines), and the choice it makes
    is the measured faster one wherever the two differ by more than 5%."""
    rows = _measured(cost.REFERENCE_CARD, {"t28"})
    cfg = SparseXConfig()
    train = phase == "fwd+bwd"
    times = {}
    for r in rows:
        n, hq, d = int(r["tokens"]), int(r["hq"]), int(r["d"])
        if r["phase"] != phase or r["impl"] not in ("sparsex", "sdpa_cudnn") or not 8192 <= n <= 262144:
            continue
        sparse, dense = cost.predicted_ms(cfg, n, hq, d, 1, cost.REFERENCE_CARD, train)
        want = float(r["ms"])
        got = sparse if r["impl"] == "sparsex" else dense
        assert abs(got - want) / want < 0.2, (r["impl"], n, got, want)
        times.setdefault(n, {})[r["impl"]] = want
    pairs = [(n, t["sparsex"], t["sdpa_cudnn"]) for n, t in times.items() if len(t) == 2]
    assert len(pairs) >= 3
    for n, sparse, dense in pairs:
        if abs(sparse - dense) > 0.05 * min(sparse, dense):
            assert cost.dense_is_faster(cfg, n, 32, 128, 1, cost.REFERENCE_CARD, train) == (dense < sparse), n


@pytest.mark.parametrize("graphed", [False, True])
def test_the_h100_decode_row_picks_the_measured_faster_step(graphed):
    """One layer's decode step (e2e.csv tag t28d, 1K-1M): the model picks the faster of Sparse-X and SDPA's fastest
    backend wherever they differ by more than 10%."""
    with open(os.path.join(os.path.dirname(CSV), "e2e.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["tag"] == "t28d" and r["gpu"] == cost.REFERENCE_CARD]
    phase = "attn_graph" if graphed else "attn"
    times = {}
    for r in rows:
        if r["what"] == phase and (r["impl"] == "sparsex" or r["impl"].startswith("sdpa_")):
            kind = "sparse" if r["impl"] == "sparsex" else "dense"
            n = int(r["tokens"])
            times.setdefault(n, {}).setdefault(kind, []).append(float(r["ms"]))
    assert len(times) >= 8
    cfg = SparseXConfig()
    for n, t in times.items():
        sparse, dense = t["sparse"][0], min(t["dense"])
        if abs(sparse - dense) > 0.1 * min(sparse, dense):
            assert cost.decode_dense_is_faster(cfg, n, 8, 64, 1, cost.REFERENCE_CARD, graphed) == (dense < sparse), n


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


def test_prefills_go_to_sdpa_where_dense_is_faster(monkeypatch, caplog):
    """With the model saying dense is faster: an inference prefill is SDPA's causal attention (padded rows too);
    a call that needs gradients too (its gradients are SDPA's); a chunk (Tq < Tk) and ``dense_when_faster=False``
    stay on the kernels."""
    monkeypatch.setattr("sparsex_hf.ops.attention.dense.DENSE_HANDOFF", True)
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
    # a training call too (judged on forward + backward): its gradients are SDPA's
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    calls.clear()
    grads = torch.autograd.grad(sparsex_attention(*leaves, cfg, backend="triton").square().sum(), leaves)
    assert calls
    dense_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want_grads = torch.autograd.grad(sdpa(*dense_leaves, is_causal=True, enable_gqa=True).square().sum(), dense_leaves)
    for got, want_g in zip(grads, want_grads):
        torch.testing.assert_close(got, want_g, atol=1e-5, rtol=1e-5)
    for kw in (dict(tq=77), dict(conf=cfg.replace(dense_when_faster=False))):
        out, used = run(**kw)
        assert not used, kw
        ref = sparsex_attention(q[:, :, -kw.get("tq", 300):], k, v, cfg, backend="torch")
        assert ((out.detach() - ref).norm() / ref.norm()).item() < 1e-5


def test_the_real_model_hands_short_prefills_to_sdpa(monkeypatch):
    """Unpatched: a 300-token inference prefill is far below every crossover, so SDPA computes it."""
    monkeypatch.setattr("sparsex_hf.ops.attention.dense.DENSE_HANDOFF", True)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    cfg = SparseXConfig(**dict(SPARSE_SMALL, window=32, sink_tokens=0))  # sink + window cover only 32 keys
    q, k, v = random_qkv(1, 4, 2, 300, 300, 32, dtype=torch.float32, seed=2)
    with torch.no_grad():
        out = sparsex_attention(q, k, v, cfg, backend="triton")
    assert calls and torch.allclose(out, sdpa(q, k, v, is_causal=True, enable_gqa=True), atol=1e-6)


def _row_summaries(k, offsets, seq_len, block_size):
    """The block summaries of each row's cached keys, counted from its offset (zeros beyond its blocks)."""
    from sparsex_hf.ops.attention.rules.common import block_summaries

    bsz, hkv, _, d = k.shape
    nb = (seq_len - int(offsets.min())) // block_size
    summ = [torch.zeros(bsz, hkv, nb, d, dtype=k.dtype) for _ in range(3)]
    for b, p in enumerate(offsets.tolist()):
        for s, r in zip(summ, block_summaries(k[b, :, p:seq_len], block_size)):
            s[b, :, : r.shape[1]] = r
    return tuple(summ)


def _dense_step_reference(q, k, v, offsets, seq_len):
    """Each row's last position attending to that row's keys from its offset, one head at a time."""
    bsz, hq, _, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(bsz):
        lo = int(offsets[b])
        for h in range(hq):
            w = torch.softmax(q[b, h, 0] @ k[b, h // g, lo:seq_len].T * d**-0.5, -1)
            out[b, h, 0] = w @ v[b, h // g, lo:seq_len]
    return out


@pytest.mark.parametrize("bsz, offset", [(1, 0), (3, 0), (2, 7)])
def test_dense_decode_is_each_rows_attention(bsz, offset):
    """``dense_decode`` (the decode step's handoff): rows sharing one offset, GQA without repeated keys, a cache with
    spare capacity; equal to attending head by head, and to Sparse-X's own decode step where the budget covers every
    key."""
    from sparsex_hf.ops.attention import dense_decode, sparsex_decode_attention

    gen = torch.Generator().manual_seed(bsz * 10 + offset)
    hq, hkv, d, cap, seq_len = 6, 2, 16, 70, 61
    q = torch.randn(bsz, hq, 1, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(bsz, hkv, cap, d, generator=gen, dtype=torch.float64) for _ in range(2))
    offsets = torch.full((bsz,), offset)
    out = dense_decode(q, k, v, seq_len, seq_len - offset)
    torch.testing.assert_close(out, _dense_step_reference(q, k, v, offsets, seq_len))
    cfg = SparseXConfig(block_size=16, sink_tokens=16, window=128, stride=32, topk=2)  # the window covers all
    summ = _row_summaries(k, offsets, seq_len, 16)
    sparse = sparsex_decode_attention(q, k, v, summ, offsets, seq_len, cfg, backend="torch")
    torch.testing.assert_close(out, sparse, atol=1e-6, rtol=1e-6)  # (the torch decode computes in fp32)


def test_dense_decode_puts_cudnn_first_for_its_call_only(monkeypatch):
    """The handoff's SDPA call runs with cuDNN, then flash, first in SDPA's priority order (the fastest decode on
    Hopper); the order before it is back afterwards, also when the call raises."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from sparsex_hf.ops.attention import dense as dense_mod

    before = torch._C._get_sdp_priority_order()
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order())
        if len(seen) == 2:
            raise RuntimeError("no kernel")
        return real(*args, **kwargs)

    monkeypatch.setattr(dense_mod.F, "scaled_dot_product_attention", spy)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    dense_mod.dense_decode(q, k, v, 12, 12)
    with pytest.raises(RuntimeError, match="no kernel"):
        dense_mod.dense_decode(q, k, v, 12, 12)
    assert seen[0][:2] == [int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)]
    assert sorted(seen[0]) == sorted(before)
    assert torch._C._get_sdp_priority_order() == before


def test_decode_steps_go_to_sdpa_where_dense_is_faster(monkeypatch, caplog):
    """With the decode row saying dense is faster: a Triton decode step of one row and one query is
    ``dense_decode`` (SDPA called, said once in the log); ``dense_when_faster=False``, ``combine="mix"``, a device
    length (a static cache's graph), a batch (its padding unknown on the host), several queries and a model sliding
    window shorter than the cache keep the kernels."""
    from sparsex_hf.ops.attention import sparsex_decode_attention

    monkeypatch.setattr("sparsex_hf.ops.attention.dense.DENSE_HANDOFF", True)
    faster = []
    monkeypatch.setattr(cost, "decode_dense_is_faster", lambda *a: faster.append(a[-1]) or True)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    cfg = SparseXConfig(**SPARSE_SMALL)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 2, 32, generator=gen)
    k, v = (torch.randn(2, 2, 200, 32, generator=gen) for _ in range(2))
    offsets = torch.zeros(2, dtype=torch.int32)

    def step(conf=cfg, seq_len=200, rows=1, tq=1, **kw):
        calls.clear()
        summ = _row_summaries(k[:rows], offsets[:rows], 200, 16)
        out = sparsex_decode_attention(q[:rows, :, :tq], k[:rows], v[:rows], summ, offsets[:rows], seq_len, conf,
                                       backend="triton", max_doc_len=200, **kw)
        return out, bool(calls)

    with caplog.at_level("INFO"):
        out, used = step()
    assert used and faster[0] is False  # judged as issued by the host (no graph capture, not compiling)
    assert any("decode step reads a short cache faster" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, _dense_step_reference(q[:1, :, :1], k[:1], v[:1], offsets, 200))
    for kw in (dict(conf=cfg.replace(dense_when_faster=False)), dict(conf=cfg.replace(combine="mix")),
               dict(seq_len=torch.tensor([200])), dict(rows=2), dict(tq=2), dict(sliding_window=100)):
        out, used = step(**kw)
        assert not used, kw


def test_generate_hands_short_decode_steps_to_sdpa_and_keeps_dense_tokens(monkeypatch):
    """Through the model: with the cost model choosing dense everywhere, an unpadded batch generates dense
    attention's tokens from a prompt longer than the window (prefill and every decode step by SDPA); a left-padded
    batch keeps the kernels in its decode steps, and its tokens are the ones the kernels give."""
    monkeypatch.setattr("sparsex_hf.ops.attention.dense.DENSE_HANDOFF", True)
    monkeypatch.setattr(cost, "dense_is_faster", lambda *a: True)
    monkeypatch.setattr(cost, "decode_dense_is_faster", lambda *a: True)
    dense, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, backend="triton")
    ids = torch.randint(3, 256, (2, 200), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(ids, **kw), sparse.generate(ids, **kw))
    ids, mask = padded_prompts(length=200, pads=(0, 37))
    handed = sparse.generate(ids, attention_mask=mask, **kw)
    monkeypatch.setattr(cost, "decode_dense_is_faster", lambda *a: False)
    assert torch.equal(handed, sparse.generate(ids, attention_mask=mask, **kw))


def test_the_reference_hands_covered_calls_to_sdpa_too(monkeypatch):
    """On the torch backend (the CPU's): a prefill whose every key set is all of its causal keys, and a decode step
    over a row the window covers, are SDPA's (the same answer as the reference's, faster); a longer row, stats and
    a given selection keep the reference."""
    from sparsex_hf.ops.attention import sparsex_decode_attention, sparsex_select

    monkeypatch.setattr("sparsex_hf.ops.attention.dense.DENSE_HANDOFF", True)
    calls = []
    sdpa = F.scaled_dot_product_attention
    # (dense attention: no mask; the torch backend's gathered stage calls SDPA too, with its key-set mask)
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: (kw.get("attn_mask") is None and calls.append(1)) or sdpa(*a, **kw))
    cfg = SparseXConfig(**SPARSE_SMALL)  # sink 16 + window 64: rows of up to 80 tokens
    for t, covered in ((80, True), (200, False)):
        q, k, v = random_qkv(1, 4, 2, t, t, 32, dtype=torch.float64, seed=t)
        calls.clear()
        out = sparsex_attention(q, k, v, cfg, backend="torch")
        assert bool(calls) == covered, t
        monkeypatch.setattr("sparsex_hf.ops.attention.dense.DENSE_HANDOFF", False)
        torch.testing.assert_close(out, sparsex_attention(q, k, v, cfg, backend="torch"))
        monkeypatch.setattr("sparsex_hf.ops.attention.dense.DENSE_HANDOFF", True)
        off = torch.zeros(1, dtype=torch.int32)
        calls.clear()
        step = sparsex_decode_attention(q[:, :, -1:], k, v, _row_summaries(k, off, t, 16), off, t, cfg, backend="torch")
        assert bool(calls) == covered, t
        if covered:  # dense attention both ways (beyond the cover, a step selects per query, the prefill per tile)
            torch.testing.assert_close(step, out[:, :, -1:])
    calls.clear()
    q, k, v = random_qkv(1, 4, 2, 80, 80, 32, dtype=torch.float64, seed=1)
    sparsex_attention(q, k, v, cfg, backend="torch", return_stats=True)
    sparsex_attention(q, k, v, cfg, backend="torch", selected_blocks=sparsex_select(q, k, cfg, backend="torch"))
    assert len(calls) == 1  # (the covered call with a given selection: SDPA, as the selection adds nothing there)

"""The decode op (tensors: cache buffers, summaries, row offsets) against the reference applied to the whole
sequence."""

import pytest
import torch
from utils import SPARSE_SMALL, random_qkv

from sparsex_hf import SparseXConfig
from sparsex_hf.ops.attention import HAS_TRITON, sparsex_attention, sparsex_decode_attention, sparsex_prompt_anchor
from sparsex_hf.ops.attention.reference.decode import decode_positions, decode_select
from sparsex_hf.ops.attention.rules.common import block_summaries

BACKENDS = ["torch", "triton"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


class Cache:
    """What a cache layer hands the decode op, built directly from tensors: ``k/v [B, Hkv, L, D]`` in buffers
    longer than the sequence (poisoned beyond it), per-row offsets from a left-padding mask, and the block
    summaries of every row (zeros beyond a row's complete blocks)."""

    def __init__(self, k, v, mask=None, block_size=16, spare=37, device=None):
        bsz, hkv, t, d = k.shape
        device = device or k.device
        self.k = torch.full((bsz, hkv, t + spare, d), float("nan"), dtype=k.dtype, device=device)
        self.v = torch.full_like(self.k, float("nan"))
        self.k[:, :, :t], self.v[:, :, :t] = k, v
        self.seq_len = t
        pad = [0] * bsz if mask is None else (t - mask.long().sum(-1)).tolist()
        self.offsets = torch.tensor(pad, dtype=torch.int32, device=k.device)
        nb = max((t - p) // block_size for p in pad)
        summ = [torch.zeros(bsz, hkv, nb, d, dtype=k.dtype, device=k.device) for _ in range(3)]
        for b, p in enumerate(pad):
            for s, r in zip(summ, block_summaries(k[b, :, p:].float(), block_size)):
                s[b, :, : r.shape[1]] = r.to(k.dtype)
        self.summaries = tuple(summ)

    def __call__(self, q, cfg, **kw):
        return sparsex_decode_attention(q, self.k, self.v, self.summaries, self.offsets, self.seq_len, cfg, **kw)


def _case(b=2, hq=4, hkv=2, t=300, tq=1, d=32, pad=(0, 37), dtype=torch.float32, seed=0):
    q, k, v = (x.to(DEV) for x in random_qkv(b, hq, hkv, t, t, d, dtype=dtype, seed=seed))
    mask = torch.ones(b, t, dtype=torch.bool, device=DEV)
    for i, p in enumerate(pad[:b]):
        mask[i, :p] = False
    return q, k, v, mask


def _check(cfg, backend, b=2, hq=4, hkv=2, t=300, tq=1, d=32, pad=(0, 37), sliding_window=None, mix=None,
           dtype=torch.float32, tol=2e-5, seed=0):
    q, k, v, mask = _case(b, hq, hkv, t, tq, d, pad, dtype, seed)
    # a step given no anchor blocks selects as re-running the sequence per query without the prompt anchor does
    ref = sparsex_attention(q, k, v, cfg.replace(select_tile=1, anchor=False), attention_mask=mask, backend="torch",
                            sliding_window=sliding_window, mix_weights=mix)
    # the cache holds everything; the decode step is the last tq queries
    cache = Cache(k, v, None if all(p == 0 for p in pad[:b]) else mask, cfg.block_size)
    out = cache(q[:, :, -tq:], cfg, backend=backend, sliding_window=sliding_window, mix_weights=mix)
    torch.testing.assert_close(out.float(), ref[:, :, -tq:].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("g", [1, 2, 3])
def test_decode_union_matches_reference(backend, tq, g):
    cfg = SparseXConfig(**SPARSE_SMALL)
    _check(cfg, backend, hq=2 * g, hkv=2, tq=tq)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [{}, {"rerank": 2, "anchor": "split"}, {"combine": "mix"}])
def test_decode_length_as_a_device_tensor_equals_the_host_int(backend, extra):
    """A static cache passes the cache length as a one-element device tensor (nothing read on the host): the
    kernels and the reference read it there and give what the host length gives, with buffers and summaries
    longer than the sequence (poisoned past it), padding, several queries, the two-stage selection."""
    cfg = SparseXConfig(**SPARSE_SMALL, **extra)
    q, k, v, mask = _case(t=290, tq=3)
    cache = Cache(k, v, mask, cfg.block_size)
    spare = torch.full((2, 2, 5, 32), float("nan"), device=DEV)  # summary rows past the complete blocks
    summaries = tuple(torch.cat([s, spare], 2) for s in cache.summaries)
    anchor = torch.tensor([[[3, 5, -1, -1]] * 2, [[1, -1, -1, -1]] * 2], device=DEV) if cfg.anchor else None
    q3 = q[:, :, -3:]
    want = sparsex_decode_attention(q3, cache.k, cache.v, summaries, cache.offsets, 290, cfg, backend=backend,
                                    anchor=anchor)
    for length in (torch.tensor(290, device=DEV), torch.tensor([290], dtype=torch.int32, device=DEV)):
        got = sparsex_decode_attention(q3, cache.k, cache.v, summaries, cache.offsets, length, cfg, backend=backend,
                                       anchor=anchor)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)  # (bounds from the capacity: other splits)
        assert not got.isnan().any()
    with pytest.raises(ValueError, match="one integer"):
        sparsex_decode_attention(q3, cache.k, cache.v, summaries, cache.offsets, torch.tensor([290.0], device=DEV), cfg)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("extra", [{}, {"combine": "mix"}, {"rerank": 0, "anchor": False}])
def test_decode_kernels_reuse_their_scratch_and_reset_their_counters(monkeypatch, extra):
    """The kernels keep their scratch buffers from call to call and their split counters in one buffer that each
    launch's last programs set back to zero: calls of two shapes, alternating, give bit for bit what fresh buffers
    give, equal to the reference, and leave every counter at zero."""
    from sparsex_hf.ops.attention.kernels import decode as decode_kernel

    monkeypatch.setattr(decode_kernel, "REUSE_SCRATCH", True)
    cfg = SparseXConfig(**SPARSE_SMALL, **extra)
    q, k, v, mask = _case(t=333, tq=3, seed=4)
    cache = Cache(k, v, mask, cfg.block_size)
    ref = sparsex_attention(q, k, v, cfg.replace(select_tile=1, anchor=False), attention_mask=mask, backend="torch")
    for _ in range(2):
        for tq in (3, 1):
            got = cache(q[:, :, -tq:], cfg, backend="triton")
            torch.testing.assert_close(got, ref[:, :, -3:][:, :, -tq:], atol=2e-5, rtol=2e-5)
    monkeypatch.setattr(decode_kernel, "REUSE_SCRATCH", False)
    assert torch.equal(cache(q[:, :, -1:], cfg, backend="triton"), got)
    assert all(int(c.abs().sum()) == 0 for bufs in decode_kernel._COUNTERS.values() for c in bufs)
    # the custom op (what compiled graphs call) keeps no buffer past its call
    from sparsex_hf.ops.attention.custom_ops import decode_op

    # (a compiled step's CUDA graph trees warm up in their own memory pool: a counter buffer kept from there fails
    # the first compiled step of a process that has run no eager decode step)
    monkeypatch.setattr(decode_kernel, "REUSE_SCRATCH", True)
    monkeypatch.setattr(decode_kernel, "_COUNTERS", {})
    decode_kernel._SCRATCH.clear()
    out = decode_op(q[:, :, -1:], cache.k, cache.v, *cache.summaries, cache.offsets, None, None, None, cache.seq_len,
                    cache.seq_len, cfg.json, 32**-0.5, 0, "triton")
    assert torch.equal(out, got) and not decode_kernel._SCRATCH and not any(decode_kernel._COUNTERS.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["minmax", "mean"])
def test_decode_scores_match_reference(backend, score):
    _check(SparseXConfig(**SPARSE_SMALL, score=score), backend, t=257, tq=2, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["minmax", "mean"])
def test_decode_two_stage_selection_matches_reference(backend, score):
    """rerank: the summary shortlist ranked again by the exact scores of the shortlisted keys, per query."""
    _check(SparseXConfig(**dict(SPARSE_SMALL, score=score, rerank=3, topk=3)), backend, t=300, tq=3, seed=5)


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
def test_decode_head_dim_128(backend):
    _check(SparseXConfig(**SPARSE_SMALL), backend, d=128, t=200, tq=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_fp16(backend):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter's fp16 tl.dot is unreliable; the fp16 kernel path is tested on the GPU")
    _check(SparseXConfig(**SPARSE_SMALL), backend, t=260, tq=2, dtype=torch.float16, tol=2e-3)


def test_offloaded_cache_matches():
    """Cache buffers on the CPU with the queries on the GPU (or the same device here): gathered where they live."""
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v, mask = _case(t=260)
    a = Cache(k, v, mask)(q[:, :, -1:], cfg, backend="torch")
    b = Cache(k, v, mask, device=torch.device("cpu"))(q[:, :, -1:], cfg, backend="triton" if DEV == "cuda" else "torch")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_reads_only_its_keys(backend):
    """Keys outside sink, window, stride and the selected blocks (and buffer columns past the sequence, NaN
    here) do not influence the output."""
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v, _ = _case(b=1, t=400, pad=(0,))
    cache = Cache(k, v)
    out = cache(q[:, :, -1:], cfg, backend=backend)
    pos = decode_positions(cache.offsets, cache.seq_len, 1)
    sel = decode_select(q[:, :, -1:], pos, cache.summaries, cfg, None, cache.k, cache.offsets)
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
    out2 = Cache(k, v2)(q[:, :, -1:], cfg, backend=backend)
    assert not out.isnan().any()
    torch.testing.assert_close(out, out2)


def test_decode_errors_are_clear():
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v, _ = _case(b=1, t=100, pad=(0,))
    cache = Cache(k, v)
    with pytest.raises(ValueError, match="at most 16 queries"):
        cache(q[:, :, -17:], cfg)
    with pytest.raises(ValueError, match="seq_len"):
        sparsex_decode_attention(q[:, :, -1:], cache.k, cache.v, cache.summaries, cache.offsets, 1000, cfg)
    with pytest.raises(ValueError, match="offsets"):
        sparsex_decode_attention(q[:, :, -1:], cache.k, cache.v, cache.summaries, cache.offsets.float(), 100, cfg)


@pytest.mark.parametrize("score", ["minmax", "mean"])
@pytest.mark.parametrize("ties", [False, True])
def test_shortlist_kernel_matches_reference_over_many_splits(score, ties):
    """The shortlist kernel (split over the summary blocks, the last split merges) lists the reference's blocks in the
    reference's order (ties: lower block first), with enough blocks for several splits per (sequence, KV head) and
    rows of different length: the top-k with one stage, the ``rerank * topk`` shortlist with the anchor blocks that
    are eligible and not listed appended with two."""
    if not HAS_TRITON:
        pytest.skip("needs triton")
    from sparsex_hf.ops.attention.kernels.decode import decode_shortlist_triton
    from sparsex_hf.ops.attention.reference.decode import add_anchor
    from sparsex_hf.ops.attention.rules.common import shortlist_config

    t = 1100  # 275 blocks of 4: two splits of 256 blocks
    q, k, v, mask = _case(b=2, hq=4, hkv=2, t=t, d=16, pad=(0, 70), seed=3)
    if ties:  # 8 small-integer keys repeated along the sequence: many blocks with exactly equal scores
        gen = torch.Generator().manual_seed(4)
        q = torch.randint(-2, 3, q.shape, generator=gen).float().to(DEV)
        k = torch.randint(-2, 3, (*k.shape[:2], 8, k.shape[3]), generator=gen).float().to(DEV)
        k = k[:, :, torch.arange(t, device=DEV) % 8]
    one = SparseXConfig(**SPARSE_SMALL, score=score, rerank=0, anchor=False).replace(block_size=4, topk=6)
    two = one.replace(topk=3, rerank=2, anchor="split")
    cache = Cache(k, v, mask, 4)
    summ, off = cache.summaries, cache.offsets
    cpu = lambda x: x.cpu()  # noqa: E731  (the CUDA reference path takes torch.topk, unordered ties: the CPU rule)
    anchor = torch.tensor([[[200, 3, 1, -1]] * 2, [[180, 250, 0, 2]] * 2], device=DEV)  # eligible or not, listed or not
    for cfg in (one, two):
        for tq in (1, 3):
            qq = q[:, :, -tq:]
            pos = decode_positions(off.cpu(), t, tq)
            want = decode_select(cpu(qq), pos, tuple(map(cpu, summ)), shortlist_config(cfg) if cfg.rerank else cfg, None)
            if cfg.anchor:
                want = add_anchor(want, anchor.cpu(), pos, summ[0].shape[2], cfg, None)
                assert ((want[..., -4:] >= 0) & (want[..., -4:] < 250)).any() and (want[..., -4:] == -1).any()
            got = decode_shortlist_triton(qq, summ, off, t, cfg, None, anchor if cfg.anchor else None)
            assert got.dtype == torch.int32 and got.shape == want.shape
            assert torch.equal(got.long().cpu(), want), (got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_anchor_blocks_join_the_shortlist(backend):
    """``anchor``: the prompt's anchor blocks join every query's shortlist. Given the blocks an exact selection
    over every block picks (``rerank`` large enough to list them all), a one-block-per-slot shortlist plus that
    anchor reaches the same selection, so the step equals the reference with the exact selection; an anchor of
    -1 changes nothing."""
    q, k, v, mask = _case(t=300, seed=9)
    cfg = SparseXConfig(**dict(SPARSE_SMALL, rerank=1, topk=3, anchor=True))
    exact_cfg = cfg.replace(select_tile=1, rerank=16, anchor=False)
    ref, stats = sparsex_attention(q, k, v, exact_cfg, attention_mask=mask, backend="torch", return_stats=True)
    cache = Cache(k, v, mask, cfg.block_size)
    anchor = stats.selected_blocks[:, :, -1]  # [B, Hkv, topk]
    out = cache(q[:, :, -1:], cfg, backend=backend, anchor=anchor)
    torch.testing.assert_close(out, ref[:, :, -1:], atol=2e-5, rtol=2e-5)
    plain = sparsex_attention(q, k, v, cfg.replace(select_tile=1, anchor=False), attention_mask=mask, backend="torch")
    assert (plain[:, :, -1:] - ref[:, :, -1:]).abs().amax() > 1e-3  # the anchor is what makes the difference
    out = cache(q[:, :, -1:], cfg, backend=backend, anchor=torch.full_like(anchor, -1))
    torch.testing.assert_close(out, plain[:, :, -1:], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("anchor", ["last", "split"])
def test_prompt_anchor_is_the_prefill_choice_for_the_last_tile(anchor):
    """``sparsex_prompt_anchor``: the blocks the prefill (with ``anchor``) selects for each row's last tile, for
    left-padded rows, a prefill of the last queries only, and a sliding window."""
    q, k, v, mask = _case(t=300, seed=10)
    cfg = SparseXConfig(**dict(SPARSE_SMALL, select_tile=16, rerank=1, topk=3, anchor=anchor))
    offsets = (300 - mask.long().sum(-1)).to(DEV)
    for tq, sw in ((300, None), (40, None), (300, 120)):
        _, stats = sparsex_attention(q[:, :, -tq:], k, v, cfg, attention_mask=mask, backend="torch",
                                     return_stats=True, sliding_window=sw)
        got = sparsex_prompt_anchor(q[:, :, -tq:], k, offsets, 300, cfg, sliding_window=sw)
        want = stats.selected_blocks[:, :, -1]
        assert torch.equal(got.sort(-1).values, want.sort(-1).values.to(got.device)), (tq, sw)
        assert (got >= 0).any()


def test_decode_custom_op_schema_fake_and_compile():
    """The decode step is the custom op ``sparsex::decode`` under torch.compile: its schema and fake
    implementation pass ``torch.library.opcheck``, and a compiled step (one graph, no break) equals the eager one,
    with the anchor and the two-stage selection."""
    from sparsex_hf.ops.attention.custom_ops import decode_op

    cfg = SparseXConfig(**SPARSE_SMALL, rerank=2, anchor="split", backend="torch")
    q, k, v, mask = _case(t=260)
    cache = Cache(k, v, mask)
    anchor = torch.tensor([[[3, 5, -1, -1]] * 2, [[1, -1, -1, -1]] * 2], device=DEV)
    q1 = q[:, :, -1:]
    for lengths in (None, torch.tensor([cache.seq_len], device=DEV)):  # a host length, or a static cache's tensor
        args = (q1, cache.k, cache.v, *cache.summaries, cache.offsets, anchor, None, lengths, cache.seq_len, 260 - 0,
                cfg.json, 32**-0.5, 0, "torch")
        torch.library.opcheck(decode_op, args, test_utils=("test_schema", "test_faketensor"))

    def step(q1, k, v, kmin, kmax, kmean, offsets, anchor):
        return sparsex_decode_attention(q1, k, v, (kmin, kmax, kmean), offsets, 260, cfg, max_doc_len=260,
                                        anchor=anchor)

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    eager = step(q1, cache.k, cache.v, *cache.summaries, cache.offsets, anchor)
    compiled = torch.compile(step, fullgraph=True, backend=recording)
    torch.testing.assert_close(compiled(q1, cache.k, cache.v, *cache.summaries, cache.offsets, anchor), eager)
    assert len(graphs) == 1 and "sparsex.decode" in graphs[0]
    torch.testing.assert_close(eager, cache(q1, cfg, anchor=anchor))

    def static_step(q1, k, v, kmin, kmax, kmean, offsets, anchor, length):  # the length as a device tensor
        return sparsex_decode_attention(q1, k, v, (kmin, kmax, kmean), offsets, length, cfg, anchor=anchor)

    length = torch.tensor(260, device=DEV)
    compiled = torch.compile(static_step, fullgraph=True, backend=recording)
    torch.testing.assert_close(compiled(q1, cache.k, cache.v, *cache.summaries, cache.offsets, anchor, length), eager)
    assert len(graphs) == 2 and "sparsex.decode" in graphs[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_stage_decode_with_a_row_shorter_than_a_block(backend):
    """A left-padded batch whose short row has no complete block yet, in buffers exactly as long as the cache (as
    the dynamic cache keeps them): the exact stage reads no column past the buffer (the torch backend indexed out of
    bounds), and the step equals the reference."""
    cfg = SparseXConfig(**SPARSE_SMALL)
    for tq in (1, 3):
        q, k, v, mask = _case(t=40, pad=(0, 30), seed=12)
        cache = Cache(k, v, mask, cfg.block_size, spare=0)
        ref = sparsex_attention(q, k, v, cfg.replace(select_tile=1, anchor=False), attention_mask=mask, backend="torch")
        out = cache(q[:, :, -tq:], cfg, backend=backend)
        torch.testing.assert_close(out, ref[:, :, -tq:], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchored_decode_before_any_block_is_complete(backend):
    """Prompts shorter than a block (``generate()`` with a short prompt): the prompt anchor lists nothing, no block
    is eligible, and the step is the reference's (the Triton decode indexed an empty tensor)."""
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v, mask = _case(t=12, pad=(0, 5), seed=13)
    cache = Cache(k, v, mask, cfg.block_size, spare=0)
    anchor = sparsex_prompt_anchor(q[:, :, :-1], k, cache.offsets.cpu(), 12, cfg, backend=backend)
    assert anchor.shape == (2, 2, cfg.topk) and (anchor == -1).all()
    ref = sparsex_attention(q, k, v, cfg.replace(select_tile=1, anchor=False), attention_mask=mask, backend="torch")
    for tq in (1, 2):
        out = cache(q[:, :, -tq:], cfg, backend=backend, anchor=anchor)
        torch.testing.assert_close(out, ref[:, :, -tq:], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tq", [2, 5, 16])
def test_two_stage_decode_of_one_sequence_with_several_queries(backend, tq):
    """Batch 1 with 2-16 queries per step (speculative decoding, multi-token steps): every query's shortlist reads
    its own keys (the Triton exact stage read per-row offsets through a stride-0 view, out of bounds), with and
    without the anchor blocks."""
    cfg = SparseXConfig(**SPARSE_SMALL)
    q, k, v, _ = _case(b=1, t=300, pad=(0,), seed=14)
    cache = Cache(k, v, None, cfg.block_size, spare=0)
    ref = sparsex_attention(q, k, v, cfg.replace(select_tile=1, anchor=False), backend="torch")
    out = cache(q[:, :, -tq:], cfg, backend=backend)
    torch.testing.assert_close(out, ref[:, :, -tq:], atol=2e-5, rtol=2e-5)
    anchor = sparsex_prompt_anchor(q[:, :, :-tq], k[:, :, :-tq], cache.offsets.cpu(), 300 - tq, cfg, backend=backend)
    ref_anchor = sparsex_prompt_anchor(q[:, :, :-tq], k[:, :, :-tq], cache.offsets.cpu(), 300 - tq, cfg, backend="torch")
    assert (anchor >= 0).any() and torch.equal(anchor.sort(-1).values, ref_anchor.sort(-1).values.to(anchor.device))
    got = cache(q[:, :, -tq:], cfg, backend=backend, anchor=anchor)
    torch.testing.assert_close(got, cache(q[:, :, -tq:], cfg, backend="torch", anchor=ref_anchor), atol=2e-5, rtol=2e-5)

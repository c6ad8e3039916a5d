"""The FlashAttention-4 stage (``backend="flash4"``, ``ops/attention/flash4.py``) against the reference.

On the CPU the stage's block mask runs through FlexAttention's own lowering (``kernel="default"``; FlexAttention has
no CPU backward), and the backward is checked on the same exact sets materialised as a dense mask over ``K'`` (the
appended stride keys' gradients flow back into ``dK``, ``dV``). On a GPU with the ``flash4`` extra the FlashAttention-4
kernels themselves run forward and backward against the reference and today's Triton kernels."""

import pytest
import torch
import torch.nn.functional as F
from utils import random_qkv

from sparsex_hf import SparseXConfig, sparsex_attention, sparsex_select
from sparsex_hf.ops.attention import api
from sparsex_hf.ops.attention.flash4 import (
    TILE,
    Documents,
    Layout,
    _bits,
    _tiles,
    flash4_attention,
    flash4_missing,
    list_bound,
    prepare,
    tile_lists,
)
from sparsex_hf.ops.attention.rules.layout import kernel_documents

BASE = dict(block_size=16, sink_tokens=16, window=64, stride=32, topk=3, select_tile=16, dense_when_faster=False)
CASES = {  # hq, hkv, tq, tk, config changes
    "odd-length-gqa-2": (4, 2, 300, 300, {}),
    "chunk-tq-below-tk-gqa-3": (3, 1, 100, 300, {}),
    "one-stage": (2, 2, 260, 260, dict(rerank=0, anchor=False)),
    "tile-aligned-blocks": (4, 2, 512, 512, dict(block_size=128, select_tile=128, topk=1, window=128)),
    "blocks-over-tiles-no-stride": (4, 1, 700, 700, dict(block_size=256, select_tile=64, topk=1, window=200,
                                                         stride=0)),
    "no-topk": (2, 1, 200, 200, dict(topk=0)),
}


DOC_CASES = {  # batch, hq, hkv, tq, tk, config changes, layout: pads per row or packed document lengths
    "left-padding-gqa-2": (3, 4, 2, 300, 300, {}, dict(pads=[0, 37, 170])),
    "right-padding": (2, 2, 1, 260, 260, {}, dict(pads=[-21, 0])),
    "left-padding-chunk-tq-below-tk": (2, 3, 1, 90, 300, {}, dict(pads=[5, 131])),
    "packed-gqa-3": (1, 3, 1, 420, 420, {}, dict(docs=[70, 1, 200, 149])),
    "packed-chunk": (1, 2, 2, 120, 400, {}, dict(docs=[150, 50, 200], queries=[30, 50, 40])),
    "packed-tile-aligned-blocks": (1, 4, 2, 640, 640, dict(block_size=128, select_tile=128, topk=1, window=256),
                                   dict(docs=[384, 256])),
    "packed-wide-window-tiles-across-documents": (1, 2, 1, 512, 512, dict(window=512), dict(docs=[200, 312])),
    "packed-no-stride-no-topk": (1, 2, 1, 300, 300, dict(stride=0, topk=0), dict(docs=[100, 200])),
}


def _doc_inputs(name, requires_grad=False, dtype=torch.float64):
    """Inputs of a padded or packed case: (config, q, k, v, layout keywords of sparsex_attention, selection)."""
    bsz, hq, hkv, tq, tk, changes, spec = DOC_CASES[name]
    cfg = SparseXConfig(**{**BASE, **changes})
    q, k, v = random_qkv(bsz, hq, hkv, tq, tk, 32, dtype=dtype, requires_grad=requires_grad)
    if "pads" in spec:  # > 0: left padding, < 0: right padding
        mask = torch.ones(bsz, tk, dtype=torch.bool)
        for row, pad in enumerate(spec["pads"]):
            mask[row, : max(pad, 0)] = False
            mask[row, tk + min(pad, 0):] = False
        kw = dict(attention_mask=mask)
    else:
        kw = dict(cu_seqlens=torch.tensor([0, *spec["docs"]]).cumsum(0))
        if "queries" in spec:
            kw["cu_seqlens_q"] = torch.tensor([0, *spec["queries"]]).cumsum(0)
    return cfg, q, k, v, kw, sparsex_select(q, k, cfg, backend="torch", **kw)


def _documents(q, k, cfg, kw):
    found = kernel_documents(q.shape[0], q.shape[2], k.shape[2], kw.get("attention_mask"), kw.get("cu_seqlens_q"),
                             kw.get("cu_seqlens"))
    return Documents(found, q.shape[0], q.shape[2], k.shape[2], cfg, q.device)


def _inputs(name, requires_grad=False):
    hq, hkv, tq, tk, changes = CASES[name]
    cfg = SparseXConfig(**{**BASE, **changes})
    q, k, v = random_qkv(1, hq, hkv, tq, tk, 32, dtype=torch.float64, requires_grad=requires_grad)
    return cfg, q, k, v, sparsex_select(q, k, cfg, backend="torch")


@pytest.mark.parametrize("name", list(CASES))
def test_the_block_mask_gives_the_reference_forward(name):
    """FlexAttention over the stage's block mask (its own lowering, fp32) equals the reference."""
    cfg, q, k, v, sel = _inputs(name)
    q, k, v = (x.float() for x in (q, k, v))
    out = flash4_attention(q, k, v, cfg, sel, scale=0.2, kernel="default")
    ref = sparsex_attention(q, k, v, cfg, scale=0.2, backend="torch")
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def _dense_keep(mask) -> torch.Tensor:
    """The block mask as a dense ``[B, Hq, Tq', Tk']`` boolean: its full tiles whole, its masked tiles through its
    ``mask_mod``."""
    q_len, kv_len = mask.seq_lengths

    def tiles(count, idx):
        cols = kv_len // TILE
        listed = torch.arange(idx.shape[-1]) < count[..., None]
        dense = torch.zeros(*idx.shape[:-1], cols + 1, dtype=torch.bool)
        dense.scatter_(-1, torch.where(listed, idx.long(), cols), True)
        return dense[..., :cols].repeat_interleave(TILE, 2).repeat_interleave(TILE, 3)

    masked, full = tiles(mask.kv_num_blocks, mask.kv_indices), tiles(mask.full_kv_num_blocks, mask.full_kv_indices)
    idx = [torch.arange(n).view(*([1] * i), n, *([1] * (3 - i))) for i, n in enumerate(masked.shape)]
    return full | (masked & mask.mask_mod(*idx))


def _dense_sets(q, k, v, cfg, sel, docs=None, cut_stride_grads=False):
    """The stage's exact sets (``prepare``: its padded queries, ``K'``, ``V'`` and block mask) attended by SDPA over a
    dense mask: the stage's answer, with gradients, in fp64. ``cut_stride_grads`` detaches the appended stride keys
    and values (their gradients then never reach dK, dV)."""
    g, tq = q.shape[1] // k.shape[1], q.shape[2]
    qp, k2, v2, mask = prepare(q, k, v, cfg, sel, docs)
    keep = _dense_keep(mask)
    keep[..., 0] |= ~keep.any(-1)  # rows that attend nothing (padding, sliced off or zeroed) attend one key: no NaN
    tk_p = _ceil(k.shape[2])

    def keys(x2):
        if cut_stride_grads:
            x2 = torch.cat([x2[:, :, :tk_p], x2[:, :, tk_p:].detach()], 2)
        return x2.repeat_interleave(g, 1)

    out = F.scaled_dot_product_attention(qp, keys(k2), keys(v2), attn_mask=keep, scale=0.2)[:, :, :tq]
    return out if docs is None else torch.where((docs.qdoc[:, :tq] >= 0)[:, None, :, None], out, 0)


def _ceil(n):
    return -(-n // TILE) * TILE


@pytest.mark.parametrize("name", ["odd-length-gqa-2", "chunk-tq-below-tk-gqa-3", "tile-aligned-blocks"])
def test_the_exact_sets_give_the_reference_gradients(name):
    """Forward and backward over the stage's sets (K' with the appended stride keys; fp64) equal the reference's;
    with the appended keys' gradient path cut, dK and dV do not."""
    cfg, q, k, v, sel = _inputs(name, requires_grad=True)
    out = _dense_sets(q, k, v, cfg, sel)
    ref = sparsex_attention(q, k, v, cfg, scale=0.2, backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    do = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    cut = torch.autograd.grad(_dense_sets(q, k, v, cfg, sel, cut_stride_grads=True), (k, v), do)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(cut, want[1:]))


def test_tile_aligned_blocks_make_full_tiles():
    """Blocks of 128 keys selected per 128 queries are whole tiles: every selected tile below the diagonal is full
    (the kernel's dense rate), and the masked tiles are only the diagonal, the window's edge and the stride tiles."""
    cfg, q, k, v, sel = _inputs("tile-aligned-blocks")
    lay = Layout(q.shape[2], k.shape[2], cfg)
    masked, full = _tiles(lay, cfg, sel, _bits(lay, cfg, sel))
    assert not (masked & full).any()
    tiles = (sel[:, :, ::TILE].long() * cfg.block_size // TILE)  # [B, Hkv, m, topk]
    rows = torch.arange(lay.m).view(1, 1, -1, 1).expand_as(tiles)
    below = tiles < rows
    assert below.any()
    assert full[0, :, :, : lay.nk].gather(2, tiles[0].clamp(min=0))[below[0] & (tiles[0] >= 0)].all()


@pytest.mark.parametrize("name", list(DOC_CASES))
def test_documents_give_the_reference_forward(name):
    """Padded rows (left, right, a later chunk) and packed documents (a later chunk, GQA 3, tile-aligned blocks, no
    stride or top-k): FlexAttention over the stage's block mask (its own lowering, fp32) equals the reference, rows
    of no document are zeros."""
    cfg, q, k, v, kw, sel = _doc_inputs(name, dtype=torch.float32)
    docs = _documents(q, k, cfg, kw)
    out = flash4_attention(q, k, v, cfg, sel, scale=0.2, kernel="default", docs=docs)
    ref = sparsex_attention(q, k, v, cfg, scale=0.2, backend="torch", **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    if "attention_mask" in kw:
        assert (out[(docs.qdoc[:, : q.shape[2]] < 0)[:, None].expand(-1, q.shape[1], -1)] == 0).all()


@pytest.mark.parametrize("name", ["left-padding-gqa-2", "packed-chunk", "packed-tile-aligned-blocks"])
def test_documents_give_the_reference_gradients(name):
    """Backward over a padded or packed call's sets (the stride keys gathered per document; fp64) equals the
    reference's; with the gathered keys' gradient path cut, dK and dV do not."""
    cfg, q, k, v, kw, sel = _doc_inputs(name, requires_grad=True)
    docs = _documents(q, k, cfg, kw)
    out = _dense_sets(q, k, v, cfg, sel, docs)
    ref = sparsex_attention(q, k, v, cfg, scale=0.2, backend="torch", **kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    do = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    cut = torch.autograd.grad(_dense_sets(q, k, v, cfg, sel, docs, cut_stride_grads=True), (k, v), do)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(cut, want[1:]))


@pytest.mark.parametrize("name", list(DOC_CASES))
def test_document_tile_lists_fit_their_bound(name):
    """A padded or packed forward's lists are ``list_bound(..., docs_per_tile)`` long (found on the host, no device
    sync): the bound holds every query tile's listed tiles."""
    cfg, q, k, v, kw, sel = _doc_inputs(name)
    docs = _documents(q, k, cfg, kw)
    masked, full = docs.tiles(cfg, sel)
    bound = list_bound(docs.lay, cfg, docs.docs_per_tile)
    assert max(masked.sum(-1).max(), full.sum(-1).max()) <= bound
    per_tile = [len(set(t.tolist()) - {-2}) for t in docs.qdoc.view(-1, TILE)]  # documents met by each query tile
    assert docs.docs_per_tile == max(per_tile)


def test_documents_keep_full_tiles_inside_one_document():
    """Full tiles (the dense rate) appear in a padded call, and each lies inside one document, below its queries."""
    cfg, q, k, v, kw, sel = _doc_inputs("packed-tile-aligned-blocks")
    docs = _documents(q, k, cfg, kw)
    masked, full = docs.tiles(cfg, sel)
    assert full.any() and not (masked & full).any()
    _, hkv, m, cols = full.nonzero().T
    qdoc = docs.qdoc[0, :m.max() * TILE + TILE].view(-1, TILE)
    kdoc = docs.kdoc[0, : (cols.max() + 1) * TILE].view(-1, TILE)
    assert (qdoc[m] == kdoc[cols][:, :1]).all() and (kdoc[cols] == kdoc[cols][:, :1]).all()
    assert (cols * TILE + TILE - 1 <= m * TILE).all()


def test_lengths_of_one_padded_shape_compile_once(monkeypatch):
    """Lengths enter the block mask as tables: lengths that pad to one shape reuse one compiled graph; past
    ``MAX_SHAPES`` shapes a new one is refused with an error (never FlexAttention's unfused O(T^2) fallback)."""
    from torch._dynamo.utils import counters

    from sparsex_hf.ops.attention import flash4

    cfg = SparseXConfig(**BASE)

    def run(t):
        q, k, v = random_qkv(1, 2, 1, t, t, 32, dtype=torch.float32, seed=t)
        sel = sparsex_select(q, k, cfg, backend="torch")
        out = flash4_attention(q, k, v, cfg, sel, scale=0.2, kernel="default")
        torch.testing.assert_close(out, sparsex_attention(q, k, v, cfg, scale=0.2, backend="torch"), atol=2e-5,
                                   rtol=1e-4)

    run(260)
    graphs = counters["stats"]["unique_graphs"]
    run(300)
    run(384)
    assert counters["stats"]["unique_graphs"] == graphs
    monkeypatch.setattr(flash4, "MAX_SHAPES", len(flash4._SHAPES))
    run(260)
    with pytest.raises(RuntimeError, match="compiled .* input shapes in this process"):
        run(500)


@pytest.mark.parametrize("name", list(CASES))
def test_compact_tile_lists_hold_every_listed_tile(name):
    """A forward's lists on FlashAttention-4 are ``list_bound`` long (O(T) memory): the bound holds every query
    tile's listed tiles, and the compact lists are the whole lists' first entries."""
    cfg, q, k, v, sel = _inputs(name)
    lay = Layout(q.shape[2], k.shape[2], cfg)
    for x in _tiles(lay, cfg, sel, _bits(lay, cfg, sel)):
        cnt, idx = tile_lists(x)
        bound = list_bound(lay, cfg)
        assert cnt.max() <= bound
        small_cnt, small = tile_lists(x, bound)
        assert torch.equal(small_cnt, cnt) and small.shape[-1] == min(bound, lay.cols)
        assert torch.equal(small, idx[..., : small.shape[-1]])


def test_flash4_is_refused_clearly_where_it_cannot_run():
    cfg = SparseXConfig(**BASE)
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, dtype=torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="backend='flash4' cannot run here: it runs on CUDA GPUs"):
            sparsex_attention(q, k, v, cfg, backend="flash4")
    for kw, msg in ((dict(sliding_window=8), "no sliding_window"), (dict(selected=q), "selected_blocks"),
                    (dict(return_stats=True), "no sliding_window, selected_blocks or return_stats")):
        args = {**dict(sliding_window=None, selected=None, return_stats=False), **kw}
        with pytest.raises(ValueError, match=msg):
            api._check_flash4(q.bfloat16(), cfg, *args.values())
    with pytest.raises(ValueError, match="combine='union'"):
        api._check_flash4(q.bfloat16(), cfg.replace(combine="mix"), None, None, False)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        api._check_flash4(q, cfg, None, None, False)
    with pytest.raises(ValueError, match=r"head_dim in \(128,\) \(the head dims its GPU tests verify"):
        api._check_flash4(q.bfloat16(), cfg, None, None, False)
    holes = torch.tensor([[True, False, True, True]])
    with pytest.raises(ValueError, match="'flash4'\\) need the real tokens of each row to be contiguous"):
        kernel_documents(1, 4, 4, holes)
    with pytest.raises(ValueError, match="'flash4'"):
        api.resolve_backend("flash5", q.device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flash4_missing(torch.device("cuda")) is not None,
                    reason="needs a Hopper or Blackwell GPU with the flash4 extra")
@pytest.mark.parametrize("changes, tq, layout", [
    ({}, 4096, None), (dict(block_size=128, select_tile=128, topk=4), 1000, None), ({}, 4096, "left-padded"),
    (dict(block_size=128, select_tile=128, topk=4), 4096, "packed")],
    ids=["default-4096", "tiles-1000", "default-left-padded", "tiles-packed"])
def test_flash4_gpu_forward_backward_against_the_reference(changes, tq, layout):
    """FlashAttention-4 (bf16, 8/2 heads, d 128, 4096 keys; 1000 queries = a later prefill chunk; a batch of two
    rows, one left-padded by 700; three packed documents) forward and backward within the Triton kernels' own
    error against the fp32 reference, times 2."""
    cfg = SparseXConfig.preset("default", window=512, stride=64, topk=changes.get("topk", 8), sink_tokens=64,
                               dense_when_faster=False, **{k: v for k, v in changes.items() if k != "topk"})
    gen = torch.Generator(device="cuda").manual_seed(0)
    bsz = 2 if layout == "left-padded" else 1
    q = torch.randn(bsz, 8, tq, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(bsz, 2, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    kw = {}
    if layout == "left-padded":
        kw["attention_mask"] = torch.arange(4096, device="cuda") >= torch.tensor([[0], [700]], device="cuda")
    elif layout == "packed":
        kw["cu_seqlens"] = torch.tensor([0, 1500, 1700, 4096], device="cuda")
    do = torch.randn_like(q)
    ref_in = [x.float().requires_grad_() for x in (q, k, v)]
    ref = sparsex_attention(*ref_in, cfg, backend="torch", **kw)
    want = torch.autograd.grad(ref, ref_in, do.float())
    errors = {}
    for backend in ("flash4", "triton"):
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out = sparsex_attention(*x, cfg, backend=backend, **kw)
        got = torch.autograd.grad(out, x, do)
        errors[backend] = [(out.float() - ref).abs().max().item()] + [(a.float() - b).abs().max().item()
                                                                      for a, b in zip(got, want)]
    with torch.no_grad():  # a forward alone: FlashAttention-4 on the compact tile lists
        errors["flash4"].append((sparsex_attention(q, k, v, cfg, backend="flash4", **kw).float() - ref).abs().max().item())
    errors["triton"].append(errors["triton"][0])
    for mine, theirs in zip(errors["flash4"], errors["triton"]):
        assert mine <= 2 * theirs + 1e-3, errors

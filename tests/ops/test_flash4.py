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
    Layout,
    _bits,
    _tiles,
    block_mask,
    extended,
    flash4_attention,
    flash4_missing,
)

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


def _dense_sets(q, k, v, cfg, sel, cut_stride_grads=False):
    """The stage's exact sets as a dense [B, Hq, Tq', Tk'] mask over ``K'`` (listed tiles: full ones whole, masked
    ones through ``mask_mod``), attended by SDPA: the stage's answer, with gradients, in fp64. ``cut_stride_grads``
    detaches the appended stride keys and values (their gradients then never reach dK, dV)."""
    hq, tq = q.shape[1], q.shape[2]
    g = hq // k.shape[1]
    lay = Layout(tq, k.shape[2], cfg)
    mask = block_mask(lay, cfg, sel, g, backward=False)
    masked, full = (x.repeat_interleave(g, 1).repeat_interleave(TILE, 2).repeat_interleave(TILE, 3)
                    for x in _tiles(lay, cfg, sel, _bits(lay, cfg, sel)))
    idx = [torch.arange(n).view(*([1] * i), n, *([1] * (3 - i))) for i, n in enumerate(masked.shape)]
    keep = full | (masked & mask.mask_mod(*idx))
    keep[:, :, tq:, 0] = True  # padding query rows (sliced off) attend something: no NaN in their backward
    qp = F.pad(q, (0, 0, 0, lay.tq_p - tq))

    def keys(x):
        x2 = extended(x, lay, cfg)
        if cut_stride_grads:
            x2 = torch.cat([x2[:, :, : lay.tk_p], x2[:, :, lay.tk_p :].detach()], 2)
        return x2.repeat_interleave(g, 1)

    return F.scaled_dot_product_attention(qp, keys(k), keys(v), attn_mask=keep, scale=0.2)[:, :, :tq]


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


def test_flash4_is_refused_clearly_where_it_cannot_run():
    cfg = SparseXConfig(**BASE)
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, dtype=torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="backend='flash4' cannot run here: it runs on CUDA GPUs"):
            sparsex_attention(q, k, v, cfg, backend="flash4")
    mask = torch.ones(1, 64, dtype=torch.bool)
    for kw, msg in ((dict(attention_mask=mask), "one unpadded document"), (dict(sliding_window=8), "no sliding_window"),
                    (dict(return_stats=True), "no sliding_window, selected_blocks or return_stats")):
        args = {**dict(attention_mask=None, cu_seqlens=None, sliding_window=None, selected=None, return_stats=False),
                **{("selected" if key == "selected_blocks" else key): val for key, val in kw.items()}}
        with pytest.raises(ValueError, match=msg):
            api._check_flash4(q.bfloat16(), cfg, *args.values())
    with pytest.raises(ValueError, match="combine='union'"):
        api._check_flash4(q.bfloat16(), cfg.replace(combine="mix"), None, None, None, None, False)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        api._check_flash4(q, cfg, None, None, None, None, False)
    with pytest.raises(ValueError, match="'flash4'"):
        api.resolve_backend("flash5", q.device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flash4_missing(torch.device("cuda")) is not None,
                    reason="needs a Hopper or Blackwell GPU with the flash4 extra")
@pytest.mark.parametrize("changes, tq", [({}, 4096), (dict(block_size=128, select_tile=128, topk=4), 1000)],
                         ids=["default-4096", "tiles-1000"])
def test_flash4_gpu_forward_backward_against_the_reference(changes, tq):
    """FlashAttention-4 (bf16, 8/2 heads, d 128, 4096 keys; 1000 queries = a later prefill chunk) forward and
    backward within the Triton kernels' own error against the fp32 reference, times 2."""
    cfg = SparseXConfig.preset("default", window=512, stride=64, topk=changes.get("topk", 8), sink_tokens=64,
                               dense_when_faster=False, **{k: v for k, v in changes.items() if k != "topk"})
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, tq, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    do = torch.randn_like(q)
    ref_in = [x.float().requires_grad_() for x in (q, k, v)]
    ref = sparsex_attention(*ref_in, cfg, backend="torch")
    want = torch.autograd.grad(ref, ref_in, do.float())
    errors = {}
    for backend in ("flash4", "triton"):
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out = sparsex_attention(*x, cfg, backend=backend)
        got = torch.autograd.grad(out, x, do)
        errors[backend] = [(out.float() - ref).abs().max().item()] + [(a.float() - b).abs().max().item()
                                                                      for a, b in zip(got, want)]
    for mine, theirs in zip(errors["flash4"], errors["triton"]):
        assert mine <= 2 * theirs + 1e-3, errors

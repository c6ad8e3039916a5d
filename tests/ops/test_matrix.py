"""The GPU matrix (``bash benchmarks/run_gpu.sh matrix``): every supported head dim x block size x dtype, with the
default rule and the one-stage preset and GQA groups 1-8 spread over the cells, through the prefill forward, its
backward and a decode step, each against the reference. A cell is a small padded batch: what it checks on a card is
that the kernels compile and fit its shared memory at that shape (a launch shape that does not fit is made smaller,
never a crash) and compute the reference's answer."""

import itertools
import json
import os

import pytest
import torch
from test_decode import Cache
from utils import random_qkv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention import TRITON_BLOCK_SIZES, TRITON_DTYPES, TRITON_HEAD_DIMS
from sparsex_hf.ops.attention.custom_ops import select_op
from sparsex_hf.ops.attention.reference.naive import sparsex_attention_naive

PRESETS = ("default", "one-stage")
GROUPS = (1, 2, 4, 8)
# every (head dim, block size, dtype); the (preset, group) pairs cycle over them, so each pair meets every dtype
CELLS = [(d, bs, dt, PRESETS[i % 2], GROUPS[(i // 2) % 4])
         for i, (d, bs, dt) in enumerate(itertools.product(TRITON_HEAD_DIMS, TRITON_BLOCK_SIZES, TRITON_DTYPES))]
# the largest cells first: they compile longest, and a run stopped at its time limit has then finished them
CELLS.sort(key=lambda c: (-c[0] * c[1], c[2] != torch.float32))
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def cell_inputs(d, bs, dtype, group, device, seed=0):
    """Two rows of ``5 * bs + 37`` tokens (the second left-padded by 29), 2 KV heads, a budget of about half the
    keys: sink and window of a block or two, the stride, 3 selected blocks."""
    t = 5 * bs + 37
    q, k, v = (x.to(device) for x in random_qkv(2, 2 * group, 2, t, t, d, dtype=torch.float32, seed=seed))
    mask = torch.ones(2, t, dtype=torch.bool, device=device)
    mask[1, :29] = False
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def cell_config(preset, bs):
    return SparseXConfig.preset(preset).replace(block_size=bs, sink_tokens=bs, window=2 * bs, stride=bs, topk=3)


def check_cell(d, bs, dtype, preset, group, device):
    cfg = cell_config(preset, bs)
    q, k, v, mask = cell_inputs(d, bs, dtype, group, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = sparsex_attention(q, k, v, cfg, backend="triton", attention_mask=mask)
    assert out.dtype == dtype and not out.isnan().any()
    # the attention on the kernels' own selection, in fp64 (near-tied block scores may round either way in half
    # precision: the selection is compared with the fp64 reference's separately)
    sel = select_op(q.detach(), k.detach(), mask, None, None, cfg.json, 0)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = sparsex_attention_naive(q64, k64, v64, cfg, scale=d**-0.5, attention_mask=mask, selected=sel)
    rounded = sparsex_attention_naive(q.detach().float(), k.detach().float(), v.detach().float(), cfg,
                                      scale=d**-0.5, attention_mask=mask, selected=sel).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2 * _rel(rounded, ref) + 2e-3
    assert _rel(out, ref) <= tol, f"forward {_rel(out, ref):.2e} > {tol:.2e}"
    _, stats = sparsex_attention(q64.detach(), k64.detach(), v64.detach(), cfg, backend="torch", attention_mask=mask,
                                 return_stats=True)
    real = mask[:, None, :, None].expand_as(sel)
    agree = (sel.long() == stats.selected_blocks)[real].float().mean().item()
    # fp32 sums in another order can flip a near-tie too (one slot in thousands on the H100)
    assert agree >= (0.999 if dtype == torch.float32 else 0.9), f"selections agree on {agree:.3%} of the slots"
    do = torch.randn_like(out)
    got = torch.autograd.grad((out * do).sum(), (q, k, v))
    want = torch.autograd.grad((ref * do.double()).sum(), (q64, k64, v64))
    gtol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype and not a.isnan().any()
        assert _rel(a, b) <= gtol, f"d{name} {_rel(a, b):.2e} > {gtol:.0e}"
    # a decode step of 3 queries over the cached rows: the reference re-running the sequence per query
    cache = Cache(k.detach(), v.detach(), mask, bs)
    step = cache(q.detach()[:, :, -3:], cfg, backend="triton")
    want = sparsex_attention(q64.detach(), k64.detach(), v64.detach(), cfg.replace(select_tile=1, anchor=False),
                             attention_mask=mask, backend="torch")[:, :, -3:]
    dtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert not step.isnan().any() and _rel(step, want) <= dtol, f"decode {_rel(step, want):.2e} > {dtol:.0e}"


def _record_fitted():
    """Launch shapes the kernels made smaller on this card (``prefill._fitted``), appended as JSON lines to
    ``$SPARSEX_FITTED_LOG`` when set (``run_gpu.sh matrix`` sets it): what the card's table entry should say."""
    from sparsex_hf.ops.attention.kernels import prefill

    path = os.environ.get("SPARSEX_FITTED_LOG")
    if path and prefill._fitted:
        with open(path, "a") as f:
            for (gpu, kind, d, dtype, bs), tile in prefill._fitted.items():
                f.write(json.dumps(dict(gpu=gpu, key=f"{kind}@d{d},{NAMES[dtype]},b{bs}", tile=tile)) + "\n")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS, ids=[f"d{d}-b{bs}-{NAMES[dt]}-{p}-g{g}" for d, bs, dt, p, g in CELLS])
def test_matrix_cell(cell):
    try:
        check_cell(*cell, device="cuda")
    finally:
        _record_fitted()


def test_the_matrix_covers_every_supported_shape():
    """Every head dim x block size x dtype the kernels accept is a cell, and every (preset, group) pair meets every
    dtype; one small cell runs here (the interpreter on a CPU, the kernels on a GPU)."""
    assert {(d, bs, dt) for d, bs, dt, _, _ in CELLS} == set(
        itertools.product(TRITON_HEAD_DIMS, TRITON_BLOCK_SIZES, TRITON_DTYPES))
    pairs = {(p, g, dt) for _, _, dt, p, g in CELLS}
    assert pairs == set(itertools.product(PRESETS, GROUPS, TRITON_DTYPES))
    check_cell(16, 16, torch.float32, "default", 2, device="cuda" if torch.cuda.is_available() else "cpu")

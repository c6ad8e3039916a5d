"""Candidate attention stages for Sparse-X's key sets, measured on the headline shapes beside SDPA and today's kernels.

Each candidate runs the key sets mapped onto 128-key tiles: per 128-query tile, the sink tile, the window's tiles
(the diagonal tile causally masked) and 4 selected tiles below the window (the same 512 keys as top-8 blocks of 64;
random here, Sparse-X's selection costs the same for every candidate and is timed in ``bench_prefill.py``), plus
the stride keys as a compact second pass (every 256th key gathered, attended without a mask: an upper bound of its
cost) merged by log-sum-exp. Rows:

- ``fa4_block_sparse``: FlashAttention-4's CuTe DSL forward (``flash_attn.cute``) with per-query-tile lists of full
  and masked key tiles, the stride pass by the same kernel, the merge in PyTorch;
- ``fa4_one_pass``: the same kernel over ``[stride keys; K]`` in one pass (one softmax, no merge; the stride tiles
  full), forward and, with ``--backward``, backward from the transposed lists;
- ``flex`` / ``flex_flash``: FlexAttention with the same tile lists (``BlockMask.from_kv_blocks``), on its Triton
  backend and on its FlashAttention-4 backend (``kernel_options={"BACKEND": "FLASH"}``);
- ``flex_exact`` / ``flex_exact_flash``: Sparse-X's exact sets from its own selection (``exact_sets``: one pass
  over the keys plus the appended stride keys, tile lists and a membership ``mask_mod``) on FlexAttention's Triton
  and FlashAttention-4 backends, each compared with today's forward at every length;
- ``sparsex``: today's Triton forward (selection included), ``sdpa_flash`` / ``sdpa_cudnn``: dense causal.

Correctness: at 4K tokens each candidate's tile-pattern output against fp32 attention under the same boolean mask.
A candidate whose package is missing or whose call fails is a row with the error, never a stop. Effective TFLOP/s
count the keys Sparse-X's headline configuration attends (``bench_prefill.attended_keys``) so rates compare with
``bench_prefill.py``'s rows.

    python benchmarks/bench_candidates.py --lengths 32768 131072 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
import traceback
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
from _common import append_csv
from bench_prefill import HEADLINE, attended_keys, bench
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparsex_hf
from sparsex_hf import SparseXConfig, sparsex_attention, sparsex_select
from sparsex_hf.ops.attention import flash4

TILE = 128


class Pattern(NamedTuple):
    """Per query head and query tile: the masked (diagonal) and full key tiles as (count, index) tensors
    ``[1, hq, M]`` / ``[1, hq, M, N]``, and the query tile (a multiple of the 128-key tile)."""

    mask_cnt: torch.Tensor
    mask_idx: torch.Tensor
    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    q_tile: int


def tile_pattern(t: int, window_tiles: int, selected: int, hq: int, hkv: int, device, q_tile: int = TILE,
                 seed: int = 0) -> Pattern:
    """Per 128-query row of tiles: the sink tile, the window's tiles below the diagonal and ``selected`` random tiles
    below the window are full, the diagonal tile masked (causal). A query tile of ``q_tile`` rows takes the union of
    its 128-row tiles' lists (the diagonal tiles masked). The same lists for every head of a group."""
    m, r = t // TILE, q_tile // TILE
    gen = torch.Generator().manual_seed(seed)
    full_idx = torch.zeros(hkv, m // r, m, dtype=torch.int32)
    full_cnt = torch.zeros(hkv, m // r, dtype=torch.int32)
    for h in range(hkv):
        for i in range(m // r):
            tiles = set()
            for row in range(i * r, (i + 1) * r):
                lo = max(0, row - window_tiles)
                tiles.update(range(lo, row))
                if lo > 1:
                    tiles.add(0)
                    tiles.update((torch.randperm(lo - 1, generator=gen)[:selected] + 1).tolist())
            tiles = sorted(tiles - set(range(i * r, (i + 1) * r)))
            full_cnt[h, i] = len(tiles)
            full_idx[h, i, :len(tiles)] = torch.tensor(tiles, dtype=torch.int32)
    mask_cnt = torch.full((hkv, m // r), r, dtype=torch.int32)
    mask_idx = torch.zeros(hkv, m // r, m, dtype=torch.int32)
    mask_idx[:, :, :r] = torch.arange(m, dtype=torch.int32).view(m // r, r)
    g = hq // hkv
    expand = lambda x: x.repeat_interleave(g, 0)[None].contiguous().to(device)  # noqa: E731
    return Pattern(expand(mask_cnt), expand(mask_idx), expand(full_cnt), expand(full_idx), q_tile)


def listed(cnt: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``flash4.tile_lists``: a boolean ``[..., M, n]``."""
    out = torch.zeros(*cnt.shape, n + 1, dtype=torch.bool, device=cnt.device)
    valid = torch.arange(idx.shape[-1], device=cnt.device) < cnt[..., None]
    return out.scatter_(-1, torch.where(valid, idx.long(), n), True)[..., :n]


def exact_sets(q, k, v, cfg: SparseXConfig):
    """Sparse-X's exact key sets (one document, no padding, ``combine="union"``) as the FlashAttention-4 stage
    builds them (``sparsex_hf/ops/attention/flash4.py``): ``(k2, v2, block_mask)`` over ``K' = [K; pad;
    K[:, :, ::stride]; pad]`` from Sparse-X's own selection, its full tiles where every query of a 128-query tile
    attends a tile whole and a membership ``mask_mod`` on the others. (Rows up to tag ``t31g`` were measured with
    an earlier copy of this construction in the benchmark, which listed tiles by ``argsort``.)"""
    lay = flash4.Layout(q.shape[2], k.shape[2], cfg)
    mask = flash4.block_mask(lay, cfg, sparsex_select(q, k, cfg), q.shape[1] // k.shape[1], backward=True)
    return flash4.extended(k, lay, cfg), flash4.extended(v, lay, cfg), mask


def dense_mask(pattern: Pattern, t: int) -> torch.Tensor:
    """The boolean [hq, t, t] mask of a tile pattern (for the 4K correctness check only)."""
    mask_cnt, mask_idx, full_cnt, full_idx = (x[0].cpu() for x in pattern[:4])
    hq, m = full_cnt.shape
    allowed = torch.zeros(hq, m, t // TILE, dtype=torch.bool)
    for h in range(hq):
        for i in range(m):
            allowed[h, i, full_idx[h, i, :full_cnt[h, i]].long()] = True
            allowed[h, i, mask_idx[h, i, :mask_cnt[h, i]].long()] = True
    mask = allowed.repeat_interleave(pattern.q_tile, 1).repeat_interleave(TILE, 2)
    return mask & torch.ones(t, t, dtype=torch.bool).tril()


def stride_keys(k, v, stride):
    return k[:, :, ::stride].contiguous(), v[:, :, ::stride].contiguous()


def merge(o1, lse1, o2, lse2):
    """Two partial softmaxes over disjoint key sets merged by log-sum-exp (o: [B, T, H, D], lse: [B, H, T])."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).transpose(1, 2)[..., None]
    w2 = torch.exp(lse2 - lse).transpose(1, 2)[..., None]
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype)


def fa4_call(q, k, v, pattern, stride, with_stride=True):
    """FlashAttention-4 block-sparse forward over [B, H, T, D] inputs; returns [B, H, T, D]."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import flash_attn_func

    mask_cnt, mask_idx, full_cnt, full_idx, q_tile = pattern
    bst = BlockSparseTensorsTorch(mask_cnt, mask_idx, full_cnt, full_idx, block_size=(q_tile, TILE))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    o, lse = flash_attn_func(qt, kt, vt, causal=True, block_sparse_tensors=bst, return_lse=True)[:2]
    if with_stride:
        ks, vs = stride_keys(k, v, stride)
        o2, lse2 = flash_attn_func(qt, ks.transpose(1, 2), vs.transpose(1, 2), return_lse=True)[:2]
        o = merge(o, lse, o2, lse2)
    return o.transpose(1, 2)


def one_pass_tiles(pattern: Pattern, t: int, ns: int):
    """A tile pattern over ``K' = [stride keys; K]`` as booleans ``(full, masked)`` ``[1, H, M, ns / 128 + T / 128]``:
    the ``ns / 128`` stride tiles full for every query tile, the pattern's tiles shifted past them. With
    ``causal=True`` and ``ns`` more keys than queries, FlashAttention aligns the causal diagonal to the end of
    ``K'``, so the main keys stay causal and every stride key is visible (the same upper bound of the stride
    pass's cost as the two-pass rows)."""
    if ns % TILE:
        raise ValueError(f"the one-pass stride tiles need a multiple of {TILE} stride keys; got {ns}")
    n = t // TILE
    full, mask = listed(pattern.full_cnt, pattern.full_idx, n), listed(pattern.mask_cnt, pattern.mask_idx, n)
    pre = torch.ones(*full.shape[:-1], ns // TILE, dtype=torch.bool, device=full.device)
    return torch.cat([pre, full], -1), torch.cat([torch.zeros_like(pre), mask], -1)


def one_pass_lists(pattern: Pattern, t: int, ns: int):
    """FlashAttention-4's forward and backward (transposed) tile lists of ``one_pass_tiles``."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    full, mask = one_pass_tiles(pattern, t, ns)
    size = (pattern.q_tile, TILE)
    fwd = BlockSparseTensorsTorch(*flash4.tile_lists(mask), *flash4.tile_lists(full), block_size=size)
    bwd = BlockSparseTensorsTorch(*flash4.tile_lists(mask.transpose(-1, -2).contiguous()),
                                  *flash4.tile_lists(full.transpose(-1, -2).contiguous()), block_size=size)
    return fwd, bwd


def fa4_one_pass():
    """FlashAttention-4 block-sparse forward (and backward) over the stride keys and the pattern's tiles in one pass,
    one softmax, no merge; ``[B, H, T, D]`` in and out. The lists are built once per pattern."""
    from flash_attn.cute.interface import flash_attn_func

    cache = {}

    def call(q, k, v, pattern, stride, with_stride=True):
        if not with_stride:
            return fa4_call(q, k, v, pattern, stride, with_stride=False)
        t = q.shape[2]
        key = (id(pattern), t, stride)
        if key not in cache:
            cache[key] = one_pass_lists(pattern, t, -(-t // stride))
        fwd, bwd = cache[key]
        k2, v2 = (torch.cat([x[:, :, ::stride], x], 2).transpose(1, 2) for x in (k, v))
        o = flash_attn_func(q.transpose(1, 2), k2, v2, causal=True, block_sparse_tensors=fwd,
                            block_sparse_tensors_bwd=bwd)
        return (o[0] if isinstance(o, tuple) else o).transpose(1, 2)

    return call


def compiled_flex(backend: str):
    """``flex_attention`` compiled, on its ``"TRITON"`` or ``"FLASH"`` (FlashAttention-4) backend, GQA on."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)  # the FLASH backend takes no symbolic sizes
    opts = {"BACKEND": backend} if backend != "TRITON" else None
    return lambda q, k, v, **kw: compiled(q, k, v, enable_gqa=True, kernel_options=opts, **kw)


def flex_call(backend: str):
    from torch.nn.attention.flex_attention import BlockMask

    compiled = compiled_flex(backend)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def call(q, k, v, pattern, stride, with_stride=True):
        mask_cnt, mask_idx, full_cnt, full_idx, q_tile = pattern
        bm = BlockMask.from_kv_blocks(mask_cnt, mask_idx, full_cnt, full_idx, BLOCK_SIZE=(q_tile, TILE),
                                      mask_mod=causal)
        o, aux = compiled(q, k, v, block_mask=bm, return_aux=_lse_aux())
        if not with_stride:
            return o
        ks, vs = stride_keys(k, v, stride)
        o2, aux2 = compiled(q, ks, vs, return_aux=_lse_aux())
        # flex returns o as [B, H, T, D] and lse as [B, H, T] in natural log
        return merge(o.transpose(1, 2), aux.lse, o2.transpose(1, 2), aux2.lse).transpose(1, 2)

    return call


def _lse_aux():
    from torch.nn.attention.flex_attention import AuxRequest

    return AuxRequest(lse=True)


def check(call, dev, q_tile: int = TILE, window_tiles=8, t=4096, stride=32, grad=False) -> str:
    """The forward's max abs error (tile pattern + the stride keys) against fp32 attention over the same keys: the
    pattern under its boolean mask and the gathered stride keys appended, unmasked (4K tokens, 128 stride keys, so
    that a one-pass candidate's stride keys fill whole tiles). With ``grad``, also the gradients' largest error
    relative to the reference gradient's largest value (a failing backward is reported, not raised)."""
    hq, hkv, d = 8, 2, 128
    gen = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(1, h, t, d, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_(grad)
               for h in (hq, hkv, hkv))
    pattern = tile_pattern(t, window_tiles, 4, hq, hkv, dev, q_tile)
    out = call(q, k, v, pattern, stride)
    mask = torch.cat([dense_mask(pattern, t), torch.ones(hq, t, t // stride, dtype=torch.bool)], -1).to(dev)
    q32, k32, v32 = (x.detach().float().requires_grad_(grad) for x in (q, k, v))
    kr, vr = (torch.cat([x, x[:, :, ::stride]], 2).repeat_interleave(hq // hkv, 1) for x in (k32, v32))
    ref = F.scaled_dot_product_attention(q32, kr, vr, attn_mask=mask[None])
    note = f"max abs err vs fp32 over the same keys: {(out.float() - ref).abs().max().item():.2e}"
    if not grad:
        return note
    do = torch.randn(out.shape, device=dev, generator=gen)
    try:
        got = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    except Exception as e:
        return f"{note}; backward {_failure(e)}"
    want = torch.autograd.grad(ref, (q32, k32, v32), do)
    errs = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
    return f"{note}; dq / dk / dv max err {' / '.join(f'{e:.1e}' for e in errs)} of the largest"


def _failure(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def build_candidates(names, dev, record, backward=False) -> dict:
    """``{name: (call, query tile, backward checked)}`` of the candidates whose 4K check ran (each check is a row,
    with the gradients' errors when ``backward``). A kernel that needs larger query tiles than 128 (a block-sparse
    forward whose tile is 2 x 128 rows) is checked again with 256."""
    makers = {"fa4_block_sparse": lambda: fa4_call, "fa4_one_pass": fa4_one_pass, "flex": lambda: flex_call("TRITON"),
              "flex_flash": lambda: flex_call("FLASH")}
    built = {}
    for name in names:
        try:
            call = makers[name]()
            for q_tile in (TILE, 2 * TILE):
                try:
                    note = check(call, dev, q_tile, grad=backward)
                    break
                except ValueError as e:
                    if q_tile != TILE or "multiple of" not in str(e):
                        raise
                    print(f"{name}: {e}; trying {2 * TILE}-query tiles", flush=True)
            built[name] = (call, q_tile, backward and "backward failed" not in note)
            record(name, 4096, "", 0, f"{note} ({q_tile}-query tiles)")
        except Exception as e:  # a missing package or a failing call is a row, not a stop
            traceback.print_exc()
            record(name, 4096, "", 0, _failure(e))
    return built


def fwd_bwd(fn, *inputs):
    """A call of ``fn(*inputs)`` and its backward (gradients of every input, a fixed random output gradient)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    do = torch.randn_like(inputs[0])
    return lambda: torch.autograd.grad(fn(*leaves), leaves, do)


def time_backward(t: int, q, k, v, cfg: SparseXConfig, record) -> None:
    """Forward + backward of today's Triton kernels and of SDPA flash (the 15x target's baseline)."""
    record("sparsex_fwd_bwd", t, bench(fwd_bwd(lambda *x: sparsex_attention(*x, cfg, backend="triton"), q, k, v), 400),
           0, "today's Triton forward + backward, selection included")
    g = q.shape[1] // k.shape[1]

    def dense(q, kr, vr):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    record("sdpa_flash_fwd_bwd", t, bench(fwd_bwd(dense, q, *(x.repeat_interleave(g, 1) for x in (k, v))), 400), 0,
           "dense causal forward + backward")


def time_exact(names, t: int, q, k, v, cfg: SparseXConfig, keys: float, record, backward=False, label="") -> None:
    """Each exact candidate at length ``t``: its error against today's Triton forward, and its time (the block
    mask built once, selection included, timed apart); with ``backward``, also forward + backward. A ``label``
    names a configuration other than the headline's: its rows are ``NAME@label``, beside today's forward on it."""
    ref = sparsex_attention(q, k, v, cfg, backend="triton")
    if label:
        record(f"sparsex@{label}", t, bench(lambda: sparsex_attention(q, k, v, cfg, backend="triton"), 400), keys,
               f"today's Triton forward, selection included; {label}")
        names = [f"{n}@{label}" for n in names]
    t0 = time.time()
    k2, v2, bm = exact_sets(q, k, v, cfg)
    torch.cuda.synchronize()
    build = time.time() - t0
    at = f"@{label}" if label else ""
    record(f"select{at}", t, bench(lambda: sparsex_select(q, k, cfg), 400), 0, "Sparse-X's selection alone")
    record(f"exact_sets{at}", t, bench(lambda: exact_sets(q, k, v, cfg), 400), 0,
           "the exact stage's set-up: selection, bitmap, tile lists, appended stride keys")
    for name in names:
        try:
            call = compiled_flex("FLASH" if name.split("@")[0].endswith("_flash") else "TRITON")
            err = (call(q, k2, v2, block_mask=bm).float() - ref.float()).abs().max().item()
            record(name, t, bench(lambda: call(q, k2, v2, block_mask=bm), 400), keys,
                   f"exact sets, one pass over K + stride keys; max abs diff vs today's forward {err:.2e}; "
                   f"block mask + selection built in {build:.2f} s (not in the time)")
            if backward:
                record(f"{name}_fwd_bwd", t, bench(fwd_bwd(lambda *x: call(*x, block_mask=bm), q, k2, v2), 400), 0,
                       "exact sets, forward + backward (the stride keys' gradients not yet added back into dK, dV)")
        except Exception as e:
            traceback.print_exc()
            record(name, t, "", 0, _failure(e))


def time_length(t: int, built: dict, cfg: SparseXConfig, dev, record, exact=(), backward=False,
                exact_cfg: tuple = ()) -> None:
    """Today's forward, SDPA flash and cuDNN, and each candidate (its tile pass alone and with the stride pass)."""
    hq, hkv, d = 32, 8, 128
    gen = torch.Generator(device=dev).manual_seed(t)
    q, k, v = (torch.randn(1, h, t, d, device=dev, dtype=torch.bfloat16, generator=gen) for h in (hq, hkv, hkv))
    keys = attended_keys(t, cfg)
    record("sparsex", t, bench(lambda: sparsex_attention(q, k, v, cfg, backend="triton"), 400), keys,
           "today's Triton forward, selection included")
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def dense(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

        record(name, t, bench(dense, 400), t * (t + 1) / 2, "dense causal (rate: all keys)")
    kr = vr = None  # free before the candidates run
    if backward:
        time_backward(t, q, k, v, cfg, record)
    if exact:
        time_exact(exact, t, q, k, v, cfg, keys, record, backward)
    for label, other in exact_cfg:
        time_exact(exact, t, q, k, v, other, attended_keys(t, other), record, backward, label)
    patterns = {}
    for name, (call, q_tile, grads) in built.items():
        if q_tile not in patterns:
            t0 = time.time()
            pattern = tile_pattern(t, HEADLINE["window"] // TILE, 4, hq, hkv, dev, q_tile)
            tile_keys = float(pattern.full_cnt.float().sum() / hq * q_tile * TILE + t * q_tile / 2)
            patterns[q_tile] = pattern, tile_keys
            print(f"{q_tile}-query tile lists built in {time.time() - t0:.1f} s; {tile_keys / t:.0f} keys/query on "
                  f"tiles (Sparse-X attends {keys / t:.0f})", flush=True)
        pattern, tile_keys = patterns[q_tile]
        try:
            ms_tiles = bench(lambda: call(q, k, v, pattern, cfg.stride, with_stride=False), 400)
            ms_all = bench(lambda: call(q, k, v, pattern, cfg.stride), 400)
            record(name, t, ms_all, keys, f"{q_tile}-query tiles alone {ms_tiles:.3f} ms = "
                   f"{4 * hq * d * tile_keys / ms_tiles / 1e9:.0f} TFLOP/s on the tiles' own keys")
            if grads:
                record(f"{name}_fwd_bwd", t, bench(fwd_bwd(lambda *x: call(*x, pattern, cfg.stride), q, k, v), 400),
                       0, "tile pattern + stride keys, forward + backward (selection not included)")
        except Exception as e:
            traceback.print_exc()
            record(name, t, "", 0, _failure(e))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--candidates", nargs="+", default=["fa4_block_sparse", "fa4_one_pass", "flex", "flex_flash",
                                                         "flex_exact", "flex_exact_flash"],
                    help="tile-pattern candidates (fa4_block_sparse, fa4_one_pass, flex, flex_flash) and exact-set ones "
                         "(flex_exact, flex_exact_flash: Sparse-X's own sets through exact_sets)")
    ap.add_argument("--backward", action="store_true", help="also forward + backward: today's kernels, SDPA flash, "
                    "the exact-set candidates and each tile-pattern candidate whose 4K gradients were checked")
    ap.add_argument("--exact-config", nargs="*", default=[], metavar="K=V,K=V",
                    help="also the exact-set candidates on these changes of the headline config, each with today's "
                         "forward on it, e.g. block_size=128,topk=4,select_tile=128")
    ap.add_argument("--tag", default="candidates")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = SparseXConfig.preset("default", **HEADLINE).replace(dense_when_faster=False)
    meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, sparsex=sparsex_hf.__version__, tag=args.tag)
    rows = []

    def record(impl, t, ms, keys, note=""):
        hq, d = 32, 128
        rate = round(4 * hq * d * keys / ms / 1e9, 1) if ms else ""
        rows.append(dict(meta, impl=impl, tokens=t, ms=ms, eff_tflops=rate, note=note))
        print(f"{impl:>18} T={t:>8} {ms if ms == '' else f'{ms:9.3f} ms'} {rate:>7} TFLOP/s {note}", flush=True)

    exact = [n for n in args.candidates if n.startswith("flex_exact")]
    exact_cfg = [(c, cfg.replace(**{kv.split("=")[0]: int(kv.split("=")[1]) for kv in c.split(",")}))
                 for c in args.exact_config]
    built = build_candidates([n for n in args.candidates if n not in exact], dev, record, args.backward)
    for t in args.lengths:
        time_length(t, built, cfg, dev, record, exact, args.backward, exact_cfg)
        append_csv(os.path.join(args.out_dir, "candidates.csv"), rows)
        rows.clear()
    append_csv(os.path.join(args.out_dir, "candidates.csv"), rows)  # the checks' rows when no length ran


if __name__ == "__main__":
    main()

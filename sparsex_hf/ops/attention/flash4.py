"""The FlashAttention-4 stage (``backend="flash4"``): Sparse-X's exact key sets as a FlexAttention block mask, run by
FlexAttention's FlashAttention-4 backend (the CuTe DSL kernels of the optional ``flash-attn-4`` package, Hopper and
Blackwell GPUs), forward and backward.

One pass of one softmax over ``K' = [K; pad; K[:, :, ::stride]; pad]`` (the stride keys appended, so the union needs
no merge and autograd adds their gradients back into ``dK``, ``dV``). Per 128-query tile the block mask lists the key
tiles that the sink, the window, the selected blocks and the visible stride keys touch. Tiles that every query of
the tile attends whole (below the diagonal and inside the window or the sink, or selected whole by every selection
group of the tile) are *full*: the kernel runs them at its dense rate. The others are masked by ``mask_mod``, the
exact membership test: a main key counts where sink, window or a selected block holds it, an appended stride key
only where none does (each key once), and every key only where causal. So the stage gives the reference's answer
for every configuration, and its rate depends on how much of the sets is whole tiles: a configuration whose blocks
are 128 keys chosen per 128 queries (``block_size=128, select_tile=128``) is nearly all full tiles; 64-key blocks
chosen per 64 queries are masked tiles (measured: ``docs/kernels.md``).

Padded rows and packed documents (``Documents``): per-token tables give each query and key its document and
position in it, the stride keys are gathered per document, ``mask_mod`` compares documents, and only tiles inside
one document are full. Scope: ``combine="union"``, no model sliding window, head dim 128 (other inputs raise and
name the backends that take them). The selection is today's (``sparsex_select``). Lengths are padded to 128 and
enter ``mask_mod`` as tables, so each padded shape compiles once (FlexAttention's graph and FlashAttention-4's
kernels: tens of seconds); past ``MAX_SHAPES`` shapes a new one raises (Dynamo's recompile limit, raised to it for
these calls, would otherwise send FlexAttention to its unfused O(T^2) path). A forward's tile lists are compact
(``list_bound``); the tile booleans they come from are still O((T / 128)^2), which keeps 10M tokens on the Triton
kernels.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ...config import SparseXConfig

TILE = 128
MAX_SHAPES = 64  # input shapes one process compiles (Dynamo's recompile limit is raised to this for the calls)
_SHAPES: set = set()


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.cache
def _packages_missing() -> str | None:
    for module, package in (("flash_attn.cute", "flash-attn-4"), ("cutlass.cute", "nvidia-cutlass-dsl")):
        try:
            if importlib.util.find_spec(module) is None:
                return f"the package {package} is not installed"
        except ModuleNotFoundError:
            return f"the package {package} is not installed"
    return None


def flash4_missing(device: torch.device) -> str | None:
    """Why ``backend="flash4"`` cannot run on ``device`` (``None`` when it can): a CUDA GPU of compute capability 9
    or 10 and the ``flash4`` extra's packages."""
    if device.type != "cuda":
        return f"it runs on CUDA GPUs, not on {device.type}"
    major = torch.cuda.get_device_capability(device)[0]
    if major not in (9, 10):
        return f"FlashAttention-4 runs on compute capability 9.x (Hopper) and 10.x (Blackwell), not {major}.x"
    return _packages_missing()


def flash4_refusal(why: str) -> str:
    return (f"backend='flash4' cannot run here: {why} (pip install 'sparsex-hf[flash4]' on a Hopper or Blackwell "
            "GPU); use backend='triton' or 'auto'.")


@functools.cache
def _compiled(backend: str):
    # the FLASH backend takes no symbolic sizes in mask_mod: one compiled graph per padded shape
    compiled = torch.compile(flex_attention, dynamic=False)
    options = None if backend == "default" else {"BACKEND": backend}
    return functools.partial(compiled, enable_gqa=True, kernel_options=options)


def tile_lists(x: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean ``[..., N]`` of listed tiles as (count ``[...]``, the listed columns first in increasing order
    ``[..., width]``, ``width`` >= every count, default ``N``), int32: a prefix sum, no sort."""
    n = x.shape[-1]
    width = n if width is None else min(width, n)
    cnt = x.sum(-1, dtype=torch.int32)
    if width < n:  # (checked on the device: no host sync)
        torch._assert_async((cnt <= width).all(), "sparsex flash4: a tile list is longer than its bound")
    slot = torch.where(x, torch.cumsum(x, -1, dtype=torch.int32) - 1, width).clamp_(max=width)
    cols = torch.arange(n, dtype=torch.int32, device=x.device).expand(x.shape)
    idx = torch.zeros(*x.shape[:-1], width + 1, dtype=torch.int32, device=x.device)
    return cnt, idx.scatter_(-1, slot.long(), cols)[..., :width].contiguous()


class Layout:
    """Sizes of one call: ``tq``/``tk`` queries and keys (the queries the last ``tq`` positions), padded to tiles;
    ``ns`` stride keys; selection groups ``g0 ...`` (group ``p // select_tile`` of position ``p``), ``rows`` of the
    selection bitmap and ``wide`` blocks in a row (sizes of the padded shape only, so that one compiled graph serves
    every length of a padded shape). A call of documents (``Documents``) gives its own ``ns`` (the most stride keys
    of a row)."""

    def __init__(self, tq: int, tk: int, cfg: SparseXConfig, ns: int | None = None):
        self.tq, self.tk, self.off = tq, tk, tk - tq
        self.tq_p, self.tk_p = _ceil(tq, TILE), _ceil(tk, TILE)
        self.ns = ns if ns is not None else -(-tk // cfg.stride) if cfg.stride else 0
        self.ns_p = _ceil(self.ns, TILE)
        self.nk, self.m = self.tk_p // TILE, self.tq_p // TILE
        self.cols = self.nk + self.ns_p // TILE
        self.g0 = self.off // cfg.select_tile
        self.groups = (tk - 1) // cfg.select_tile - self.g0 + 1
        self.rows = self.tq_p // cfg.select_tile + TILE // cfg.select_tile + 3  # >= groups of the padded queries
        span = max(self.tk_p, self.ns_p * max(cfg.stride, 1))  # every key position mask_mod may look up
        self.wide = -(-span // cfg.block_size) + 1


def _bits(lay: Layout, cfg: SparseXConfig, sel: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, rows, wide]``: block ``n`` selected by selection group ``g0 + r`` (row ``r``), from the selection
    of each group's first query in the call; the rows past ``groups`` (padding queries' groups) stay empty."""
    b, hkv, _, topk = sel.shape
    rows = ((torch.arange(lay.groups, device=sel.device) + lay.g0) * cfg.select_tile - lay.off).clamp(min=0)
    bits = torch.zeros(b, hkv, lay.rows, lay.wide + 1, dtype=torch.bool, device=sel.device)
    if topk:
        s = sel[:, :, rows].long()
        bits[:, :, : lay.groups].scatter_(3, torch.where(s < 0, lay.wide, s), True)
    return bits[..., : lay.wide].contiguous()


def _whole(lay: Layout, cfg: SparseXConfig, bits: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, m, nk]``: main key tiles that every selection group of a query tile's real rows selected whole."""
    b, hkv = bits.shape[:2]
    bs, dev = cfg.block_size, bits.device
    grp = bits[:, :, : lay.groups]
    if TILE % bs == 0:
        per = grp[..., : lay.nk * (TILE // bs)].reshape(b, hkv, lay.groups, lay.nk, TILE // bs).all(-1)
    elif bs % TILE == 0:
        per = grp[..., torch.arange(lay.nk, device=dev) * TILE // bs]
    else:  # pragma: no cover - block sizes are powers of two
        per = grp.new_zeros(b, hkv, lay.groups, lay.nk)
    cs = torch.nn.functional.pad(torch.cumsum(per.to(torch.int32), 2), (0, 0, 1, 0))
    first = lay.off + torch.arange(lay.m, device=dev) * TILE
    last = (first + TILE - 1).clamp(max=lay.tk - 1)
    ga, gb = first // cfg.select_tile - lay.g0, last // cfg.select_tile - lay.g0
    return (cs[:, :, gb + 1] - cs[:, :, ga]) == (gb - ga + 1)[:, None]


def _tiles(lay: Layout, cfg: SparseXConfig, sel: torch.Tensor, bits: torch.Tensor):
    """(masked, full) booleans ``[B, Hkv, m, cols]`` of the key tiles each 128-query tile lists."""
    dev, b, hkv = sel.device, sel.shape[0], sel.shape[1]
    col = torch.arange(lay.cols, device=dev)[None]
    first = (lay.off + torch.arange(lay.m, device=dev) * TILE)[:, None]
    last, real = first + TILE - 1, (first + TILE - 1).clamp(max=lay.tk - 1)
    main, a = col < lay.nk, col * TILE
    need = main & (col >= (first - cfg.window + 1).clamp(min=0) // TILE) & (col <= real // TILE)
    need |= main & (a < cfg.sink_tokens)
    if cfg.stride:
        need |= ~main & ((col - lay.nk) * TILE <= real // cfg.stride)
    need = need.expand(b, hkv, lay.m, lay.cols).clone()
    if sel.shape[-1]:
        per = max(cfg.block_size // TILE, 1)  # tiles a block covers
        tile = ((sel.long() * cfg.block_size // TILE)[..., None] + torch.arange(per, device=dev)).clamp(max=lay.cols)
        row = torch.arange(sel.shape[2], device=dev)[:, None, None] // TILE
        flat = torch.where(sel[..., None] >= 0, row * (lay.cols + 1) + tile, lay.cols).flatten(2)
        wide = torch.zeros(b, hkv, lay.m * (lay.cols + 1), dtype=torch.bool, device=dev).scatter_(2, flat, True)
        need |= wide.view(b, hkv, lay.m, lay.cols + 1)[..., : lay.cols]
    below = main & (a + TILE - 1 <= first)
    full = below & (((last - a) < cfg.window) | (a + TILE <= cfg.sink_tokens))
    whole = torch.nn.functional.pad(_whole(lay, cfg, bits), (0, lay.cols - lay.nk))
    full = full[None, None] | (below[None, None] & whole)
    return need & ~full, full


def block_mask(lay: Layout, cfg: SparseXConfig, sel: torch.Tensor, group: int, backward: bool, compact: bool = False):
    """The FlexAttention block mask of the exact sets (``group`` query heads per KV head; ``compact``: lists as long
    as ``list_bound``, for a forward on FlashAttention-4)."""
    bits = _bits(lay, cfg, sel)
    masked, full = _tiles(lay, cfg, sel, bits)
    dev, tk_p, stride, bs = sel.device, lay.tk_p, cfg.stride, cfg.block_size
    sink, window = cfg.sink_tokens, cfg.window
    # lengths enter as tables, never as numbers in mask_mod: one compiled graph per padded shape
    pos = torch.arange(lay.tq_p, dtype=torch.int32, device=dev) + lay.off
    qrow = pos // cfg.select_tile - lay.g0
    kv = torch.arange(lay.tk_p + lay.ns_p, device=dev)
    real = torch.where(kv < lay.tk_p, kv < lay.tk, kv - lay.tk_p < lay.ns)

    def member(bi, h, qi, kv):
        p = pos[qi]
        main = kv < tk_p
        j = torch.where(main, kv, (kv - tk_p) * stride)
        held = (j < sink) | (p - j < window) | bits[bi, h // group, qrow[qi], j // bs]
        return torch.where(main, held, ~held) & (j <= p) & real[kv]

    return _from_tiles(lay, masked, full, member, group, backward, list_bound(lay, cfg) if compact else None)


def list_bound(lay: Layout, cfg: SparseXConfig, docs_per_tile: int = 0) -> int:
    """The most key tiles a query tile lists (a bound of the padded shape and the layout, never of the data): the
    window's, every stride tile, the sink's and the selected blocks' tiles of each selection group it meets. With
    ``docs_per_tile`` (a padded or packed call: the most documents a query tile meets) each document adds its sink
    tiles, a selection group and a tile per block, since its start need not be tile-aligned."""
    k = docs_per_tile
    window = -(-(cfg.window + TILE - 1) // TILE) + 1
    sink = (k or 1) * -(-cfg.sink_tokens // TILE) + k
    blocks = (-(-TILE // cfg.select_tile) + max(2 * k, 1)) * cfg.topk * (max(cfg.block_size // TILE, 1) + (k > 0))
    return window + lay.ns_p // TILE + sink + blocks


def _segments(lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment, offset inside it) of every element of segments of ``lengths`` laid end to end (``total`` of them,
    known on the host: no device sync)."""
    dev = lengths.device
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths, output_size=total)
    start = torch.cumsum(lengths, 0) - lengths
    return seg, torch.arange(total, device=dev) - start[seg]


class Documents:
    """The tables of a padded or packed call, from its documents ``(b, q_row0, k_col0, m, n)``
    (``rules/layout.kernel_documents``: keys ``k_col0 ...`` of row ``b``, queries its last ``m`` positions).

    ``qdoc``, ``qrel``, ``qrow`` ``[B, tq_p]`` int32: each query row's document (-2: none), position in it and
    selection row (one per document and ``select_tile`` group, ``bits``' row); ``kdoc``, ``krel`` ``[B, tk_p + ns_p]``
    over ``K'`` (-1: padding); ``sidx`` ``[B, ns_p]``: the key column of each appended stride key (each row's
    documents' stride keys in order). ``qb``, ``qi``, ``qk0``, ``qbase`` per real query: batch row, query row, its
    document's first key column, the first of its stride keys in ``K'``'s appended part, and its position."""

    def __init__(self, docs: list, bsz: int, tq: int, tk: int, cfg: SparseXConfig, device: torch.device):
        b, q0, k0, m, n = torch.tensor(docs, dtype=torch.long).reshape(-1, 5).T.contiguous()
        cnt = -(-n // cfg.stride) if cfg.stride else torch.zeros_like(n)
        cum = torch.cumsum(cnt, 0) - cnt
        base = cum - cum[torch.searchsorted(b, b)]  # each document's stride keys after its row's earlier ones'
        per_row = torch.zeros(bsz, dtype=torch.long).index_add_(0, b, cnt)
        self.lay = lay = Layout(tq, tk, cfg, ns=int(per_row.max()) if len(docs) else 0)
        st, first = cfg.select_tile, n - m
        rows = (n - 1) // st - first // st + 1
        sizes = {name: int(x.sum()) for name, x in (("n", n), ("cnt", cnt), ("m", m), ("rows", rows))}
        tiles = torch.zeros(bsz, lay.m + 1, dtype=torch.long)  # documents per query tile: a difference array
        tiles.index_put_((b, q0 // TILE), torch.ones_like(b), accumulate=True)
        tiles.index_put_((b, (q0 + m - 1) // TILE + 1), -torch.ones_like(b), accumulate=True)
        self.docs_per_tile = int(tiles.cumsum(1).max()) if len(docs) else 1
        b, q0, k0, m, n, cnt, base, first, rows = (x.to(device) for x in (b, q0, k0, m, n, cnt, base, first, rows))
        i32 = dict(dtype=torch.int32, device=device)
        self.kdoc, self.krel = torch.full((bsz, lay.tk_p + lay.ns_p), -1, **i32), torch.zeros(bsz, lay.tk_p + lay.ns_p, **i32)
        seg, r = _segments(n, sizes["n"])
        self.kdoc[b[seg], k0[seg] + r], self.krel[b[seg], k0[seg] + r] = seg.int(), r.int()
        seg, u = _segments(cnt, sizes["cnt"])
        col = base[seg] + u
        self.kdoc[b[seg], lay.tk_p + col], self.krel[b[seg], lay.tk_p + col] = seg.int(), (u * cfg.stride).int()
        self.sidx = torch.zeros(bsz, lay.ns_p, dtype=torch.long, device=device)
        self.sidx[b[seg], col] = k0[seg] + u * cfg.stride
        seg, r = _segments(m, sizes["m"])
        rel, rbase = first[seg] + r, (torch.cumsum(rows, 0) - rows)[seg]
        self.qb, self.qi, self.qk0, self.qbase, self.qpos = b[seg], q0[seg] + r, k0[seg], base[seg], rel
        self.qdoc, self.qrel, self.qrow = torch.full((bsz, lay.tq_p), -2, **i32), *torch.zeros(2, bsz, lay.tq_p, **i32)
        self.qdoc[self.qb, self.qi], self.qrel[self.qb, self.qi] = seg.int(), rel.int()
        self.qrow[self.qb, self.qi] = (rbase + rel // st - first[seg] // st).int()
        seg, j = _segments(rows, sizes["rows"])  # each selection row's first query
        rel = torch.maximum(first[seg], (first[seg] // st + j) * st)
        self.rows = (b[seg], q0[seg] + rel - first[seg])

    def bits(self, sel: torch.Tensor) -> torch.Tensor:
        """``[Hkv, rows, wide]``: block ``n`` (of its document) selected by selection row ``r``."""
        s = sel[self.rows[0], :, self.rows[1]].transpose(0, 1).long()  # [Hkv, rows, topk]
        wide = self.lay.wide
        rows = self.lay.rows if s.shape[1] < self.lay.rows else 1 << s.shape[1].bit_length()  # (few sizes)
        bits = torch.zeros(sel.shape[1], rows, wide + 1, dtype=torch.bool, device=sel.device)
        if s.shape[-1]:
            bits[:, : s.shape[1]].scatter_(2, torch.where(s < 0, wide, s), True)
        return bits[..., :wide].contiguous()

    def tiles(self, cfg: SparseXConfig, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked, full) ``[B, Hkv, m, cols]``: each query tile lists the key tiles of its queries' column ranges
        (window, sink, stride keys, selected blocks: +1 / -1 at the ends, a prefix sum); full tiles only where the
        query tile and the key tile lie in one document, below the diagonal, inside the window or the sink."""
        lay, dev, (bsz, hkv) = self.lay, sel.device, sel.shape[:2]
        w, t, pcol = lay.cols + 1, self.qi // TILE, lay.off + self.qi
        ranges = [(torch.maximum(self.qk0, pcol - cfg.window + 1), pcol)]
        if cfg.sink_tokens:
            ranges.append((self.qk0, torch.minimum(self.qk0 + cfg.sink_tokens - 1, pcol)))
        if cfg.stride:
            ranges.append((lay.tk_p + self.qbase, lay.tk_p + self.qbase + self.qpos // cfg.stride))
        diff = torch.zeros(bsz * hkv * lay.m * w, dtype=torch.int32, device=dev)
        row = ((self.qb * hkv)[:, None] + torch.arange(hkv, device=dev)) * lay.m + t[:, None]  # [Nq, Hkv]
        for lo, hi in ranges:
            _mark(diff, row, lo[:, None] // TILE, hi[:, None] // TILE, None, w)
        if sel.shape[-1]:
            s = sel[self.qb, :, self.qi].long()  # [Nq, Hkv, topk]
            lo = self.qk0[:, None, None] + s * cfg.block_size
            hi = torch.minimum(lo + cfg.block_size - 1, pcol[:, None, None])
            ok = (s >= 0) & (lo <= hi)
            _mark(diff, row[..., None], lo.clamp(min=0) // TILE, hi.clamp(min=0) // TILE, ok, w)
        need = torch.cumsum(diff.view(bsz, hkv, lay.m, w), -1)[..., : lay.cols] > 0
        first = torch.arange(lay.m, device=dev) * TILE
        a = torch.arange(lay.nk, device=dev) * TILE
        qa, ka = self.qdoc[:, first], self.kdoc[:, a]
        one = (qa == self.qdoc[:, first + TILE - 1]) & (qa >= 0)
        same = one[..., None] & (ka == self.kdoc[:, a + TILE - 1])[:, None] & (ka[:, None] == qa[..., None])
        below = (a + TILE - 1)[None] <= (lay.off + first)[:, None]
        near = ((lay.off + first + TILE - 1)[:, None] - a[None]) < cfg.window
        full = same & below & (near | (self.krel[:, a + TILE - 1] < cfg.sink_tokens)[:, None])
        full = torch.nn.functional.pad(full, (0, lay.cols - lay.nk))[:, None] & need
        return need & ~full, full


def _mark(diff: torch.Tensor, row: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ok, w: int) -> None:
    """Add the tile ranges ``[lo, hi]`` of rows ``row`` (a difference array of rows of ``w``) where ``ok``."""
    row, lo, hi = torch.broadcast_tensors(row, lo, hi)
    val = torch.ones_like(lo, dtype=torch.int32) if ok is None else ok.to(torch.int32).expand_as(lo)
    diff.index_add_(0, (row * w + lo).flatten(), val.flatten())
    diff.index_add_(0, (row * w + hi + 1).flatten(), -val.flatten())


def document_mask(docs: Documents, cfg: SparseXConfig, sel: torch.Tensor, group: int, backward: bool,
                  compact: bool = False):
    """The block mask of a padded or packed call: positions, sinks, strides and blocks counted from each document's
    start; keys of another document or padding never held."""
    lay, bits = docs.lay, docs.bits(sel)
    masked, full = docs.tiles(cfg, sel)
    qdoc, qrel, qrow, kdoc, krel = docs.qdoc, docs.qrel, docs.qrow, docs.kdoc, docs.krel
    tk_p, bs, sink, window = lay.tk_p, cfg.block_size, cfg.sink_tokens, cfg.window

    def member(bi, h, qi, kv):
        pr, jr = qrel[bi, qi], krel[bi, kv]
        held = (jr < sink) | (pr - jr < window) | bits[h // group, qrow[bi, qi], jr // bs]
        return torch.where(kv < tk_p, held, ~held) & (jr <= pr) & (qdoc[bi, qi] == kdoc[bi, kv])

    width = list_bound(lay, cfg, docs.docs_per_tile) if compact else None
    return _from_tiles(lay, masked, full, member, group, backward, width)


def _from_tiles(lay: Layout, masked, full, mask_mod, group: int, backward: bool, width: int | None) -> BlockMask:
    """The block mask of the tile booleans. With ``width`` a forward's lists are that long (at least the most tiles
    a query tile lists: O(T) memory; FlashAttention-4 takes such lists, FlexAttention's own lowerings do not); a
    backward's are whole rows (FlexAttention transposes them into the backward's lists)."""
    def lists(x):
        return [y.repeat_interleave(group, 1).contiguous() for y in tile_lists(x, None if backward else width)]

    return BlockMask.from_kv_blocks(*lists(masked), *lists(full), BLOCK_SIZE=(TILE, TILE), mask_mod=mask_mod,
                                    seq_lengths=(lay.tq_p, lay.tk_p + lay.ns_p), compute_q_blocks=backward)


def prepare(q, k, v, cfg: SparseXConfig, sel: torch.Tensor, docs: Documents | None = None, backward: bool = False,
            compact: bool = False):
    """The inputs of the FlexAttention call: (queries padded to tiles, ``K'``, ``V'``, the block mask)."""
    group = q.shape[1] // k.shape[1]
    if docs is None:
        lay = Layout(q.shape[2], k.shape[2], cfg)
        mask, sidx = block_mask(lay, cfg, sel, group, backward, compact), None
    else:
        lay, sidx = docs.lay, docs.sidx
        mask = document_mask(docs, cfg, sel, group, backward, compact)
    qp = q if lay.tq_p == lay.tq else torch.nn.functional.pad(q, (0, 0, 0, lay.tq_p - lay.tq))
    return qp, extended(k, lay, cfg, sidx), extended(v, lay, cfg, sidx), mask


def flash4_attention(q, k, v, cfg: SparseXConfig, sel: torch.Tensor, *, scale: float, kernel: str = "FLASH",
                     docs: Documents | None = None) -> torch.Tensor:
    """Sparse-X over ``[B, Hq, Tq, D]`` queries (the last ``Tq`` of the ``Tk`` keys) with the selection ``sel``
    ``[B, Hkv, Tq, topk]``, through FlexAttention on ``kernel`` (``"FLASH"``: FlashAttention-4; ``"default"``:
    FlexAttention's own lowering, which the CPU tests run); ``docs``: the tables of a padded or packed call (rows of
    no document return zeros). Inputs validated by the caller."""
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    qp, k2, v2, mask = prepare(q, k, v, cfg, sel, docs, backward, compact=kernel == "FLASH")
    cells = mask.mask_mod.__closure__  # the tables' shapes are guarded on as well
    shape = (kernel, qp.shape, k2.shape, mask.kv_indices.shape, qp.dtype, str(qp.device), backward, docs is None,
             tuple(c.cell_contents.shape for c in cells if isinstance(c.cell_contents, torch.Tensor)))
    if shape not in _SHAPES and len(_SHAPES) >= MAX_SHAPES:
        raise RuntimeError(
            f"backend='flash4' has compiled {MAX_SHAPES} input shapes in this process (each new shape, lengths padded "
            "to 128, compiles FlexAttention's graph and FlashAttention-4's kernels); past Dynamo's recompile limit "
            "FlexAttention would run unfused with O(T^2) memory. Use backend='triton' for inputs of many lengths, or "
            "raise sparsex_hf.ops.attention.flash4.MAX_SHAPES.")
    _SHAPES.add(shape)
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, MAX_SHAPES + 8)):
        out = _compiled(kernel)(qp, k2, v2, block_mask=mask, scale=scale)[:, :, : q.shape[2]]
    if docs is None:
        return out
    return torch.where((docs.qdoc[:, : q.shape[2]] >= 0)[:, None, :, None], out, 0)


def extended(x: torch.Tensor, lay: Layout, cfg: SparseXConfig, sidx: torch.Tensor | None = None) -> torch.Tensor:
    """``K' = [K; pad; K[:, :, ::stride]; pad]``, or with ``sidx`` ``[B, ns_p]`` the stride keys of each row's
    documents (autograd adds the stride keys' gradients back into ``K``'s). Written by copies into one buffer
    (``torch.cat`` with the strided view took 0.82 ms a tensor at 128K on the H100, ``t31i``)."""
    b, h, _, d = x.shape
    out = x.new_empty(b, h, lay.tk_p + lay.ns_p, d)
    out[:, :, : lay.tk].copy_(x)
    out[:, :, lay.tk : lay.tk_p].zero_()
    if sidx is not None:
        out[:, :, lay.tk_p :].copy_(x.gather(2, sidx[:, None, :, None].expand(-1, h, -1, d)))
    else:
        out[:, :, lay.tk_p : lay.tk_p + lay.ns].copy_(x[:, :, :: cfg.stride] if lay.ns else x[:, :, :0])
        out[:, :, lay.tk_p + lay.ns :].zero_()
    return out

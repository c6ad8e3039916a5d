"""Where the time of ``backend="flash4"`` goes: each stage of one forward timed alone (CUDA events, median), and the
GPU kernels of the whole call (torch.profiler), on one GPU.

Stages: the selection (``select_op``), the block mask (the selection bitmap, the tile booleans, the tile lists,
FlexAttention's ``BlockMask``), the extended keys and values (``K' = [K; pad; K[::stride]; pad]``) and the padded
queries, the attention call alone (FlexAttention's FLASH backend on a ready mask), and the whole
``sparsex_attention(..., backend="flash4")``. Rows go to ``flash4_profile.csv``; the profiler tables to
``flash4_profile_<len>_<tag>.txt``.

    python benchmarks/profile_flash4.py --lengths 32768 131072 --config block_size=128,select_tile=128,topk=4
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import triton
from _common import append_csv

import sparsex_hf
from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention import flash4
from sparsex_hf.ops.attention.custom_ops import select_op

HEADLINE = dict(window=4096, stride=256, topk=8, block_size=64, sink_tokens=64)


def overrides(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def stages(q, k, v, cfg: SparseXConfig, scale: float) -> dict:
    """Callables of each stage of one forward, on inputs made ready by the stages before it."""
    group = q.shape[1] // k.shape[1]
    lay = flash4.Layout(q.shape[2], k.shape[2], cfg)
    sel = select_op(q, k, None, None, None, cfg.json, 0)
    bits = flash4._bits(lay, cfg, sel)
    masked, full = flash4._tiles(lay, cfg, sel, bits)
    mask = flash4.block_mask(lay, cfg, sel, group, False)
    qp = torch.nn.functional.pad(q, (0, 0, 0, lay.tq_p - lay.tq))
    k2, v2 = flash4.extended(k, lay, cfg), flash4.extended(v, lay, cfg)
    attend = flash4._compiled("FLASH")
    return {
        "selection": lambda: select_op(q, k, None, None, None, cfg.json, 0),
        "bitmap": lambda: flash4._bits(lay, cfg, sel),
        "tiles": lambda: flash4._tiles(lay, cfg, sel, bits),
        "tile_lists": lambda: [y.repeat_interleave(group, 1).contiguous() for x in (masked, full)
                               for y in flash4.tile_lists(x)],
        "block_mask": lambda: flash4.block_mask(lay, cfg, sel, group, False),
        "extend_kv_pad_q": lambda: (flash4.extended(k, lay, cfg), flash4.extended(v, lay, cfg),
                                    torch.nn.functional.pad(q, (0, 0, 0, lay.tq_p - lay.tq))),
        "attention": lambda: attend(qp, k2, v2, block_mask=mask, scale=scale),
        "whole": lambda: sparsex_attention(q, k, v, cfg, backend="flash4"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8])
    ap.add_argument("--config", default="block_size=128,select_tile=128,topk=4", help="SparseXConfig overrides")
    ap.add_argument("--rep", type=float, default=200.0, help="ms of timed repetitions per stage")
    ap.add_argument("--tag", default="profile")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    cfg = SparseXConfig(**{**HEADLINE, **overrides(args.config)})
    gpu, hq, hkv, d = torch.cuda.get_device_name(), *args.heads, 128
    rows = []
    for t in args.lengths:
        g = torch.Generator(device="cuda").manual_seed(t)
        q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv))
        fns = stages(q, k, v, cfg, d ** -0.5)
        for name, fn in fns.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")
            print(f"{t:>8} {name:<18} {ms:8.3f} ms", flush=True)
            rows.append(dict(gpu=gpu, torch=torch.__version__, sparsex=sparsex_hf.__version__,
                             date=datetime.date.today().isoformat(), tag=args.tag, seq_len=t, heads=f"{hq}/{hkv}",
                             config=args.config, stage=name, ms=round(ms, 3)))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fns["whole"]()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
        with open(os.path.join(args.out_dir, f"flash4_profile_{t}_{args.tag}.txt"), "w") as f:
            f.write(f"{gpu}, {t} tokens, {hq}/{hkv} heads, {args.config}, 3 calls\n{table}\n")
        print(table, flush=True)
        del q, k, v, fns
        torch.cuda.empty_cache()
    append_csv(os.path.join(args.out_dir, "flash4_profile.csv"), rows)


if __name__ == "__main__":
    main()

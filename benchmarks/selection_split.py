"""Where the answer is lost: the prompt (prefill) or the answer tokens (decode)? On prompts that dense attention
answers and Sparse-X does not, the prompt is prefilled with one attention and the answer generated with the other
(greedy, the same cache), and the answers are scored like ``sparsex-eval``'s. Runs anywhere (the reference on
the CPU); rows go to ``selection_split.csv`` in ``--out-dir``.

    python benchmarks/selection_split.py --task niah_code --length 4096 --indices 5 6 7 --samples 100 \\
        --config '{"block_size": 64, "sink_tokens": 64, "window": 1024, "stride": 64, "topk": 12, "rerank": 2}'
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
from _common import append_csv

from sparsex_hf import SparseXCache, set_sparsex_config
from sparsex_hf.apps.eval.tasks import TASKS, make_sample, score
from sparsex_hf.apps.loading import load_model, load_tokenizer
from sparsex_hf.hf import CACHE_KWARG

MODES = {"dense/sparse": ("sdpa", "sparsex"), "sparse/dense": ("sparsex", "sdpa"), "sparse/sparse": ("sparsex", "sparsex"),
         "dense/dense": ("sdpa", "sdpa")}


@torch.no_grad()
def answer(model, ids: torch.Tensor, prefill: str, decode: str, new_tokens: int) -> list[int]:
    """Greedy answer: the prompt through ``prefill`` attention, each answer token through ``decode``."""
    cache = SparseXCache(model.config)
    model.set_attn_implementation(prefill)
    logits = model(ids, use_cache=True, **{CACHE_KWARG: cache}).logits[:, -1]
    out = []
    model.set_attn_implementation(decode)
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits = model(nxt, use_cache=True, **{CACHE_KWARG: cache}).logits[:, -1]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="niah_code", choices=list(TASKS))
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=100, help="the sample count of the evaluation (spreads the depths)")
    ap.add_argument("--indices", type=int, nargs="+", required=True, help="sample indices to run")
    ap.add_argument("--modes", nargs="+", default=["dense/sparse", "sparse/dense"], choices=list(MODES))
    ap.add_argument("--config", default="{}", help="Sparse-X config fields (JSON)")
    ap.add_argument("--tag", default="split")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    tok = load_tokenizer("smollm2")
    model = load_model("smollm2", attn_implementation="sparsex").eval()
    set_sparsex_config(model, **json.loads(args.config), backend="torch")
    rows, hits = [], {m: 0 for m in args.modes}
    for i in args.indices:
        s = make_sample(args.task, args.length, i, tok, seed=0, n_samples=args.samples)
        ids = tok(s.prompt, return_tensors="pt", add_special_tokens=False).input_ids
        for mode in args.modes:
            text = tok.decode(answer(model, ids, *MODES[mode], s.max_new_tokens), skip_special_tokens=True)
            sc = score(text, s.answers)
            hits[mode] += sc == 100
            rows.append(dict(date=datetime.date.today().isoformat(), tag=args.tag, task=args.task, length=args.length,
                             index=i, depth=s.depth, mode=mode, score=sc, output=text.strip()[:40], config=args.config))
            print(f"{i:3d} depth {s.depth:.3f} {mode:>13}: {sc:5.1f} {text.strip()[:30]!r}", flush=True)
    print(" ".join(f"{m}: {k}/{len(args.indices)}" for m, k in hits.items()))
    append_csv(os.path.join(args.out_dir, "selection_split.csv"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

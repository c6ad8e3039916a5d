"""Generation speed through ``generate()`` as a user runs it, against the strongest Transformers setup.

Same 1B-shaped model as ``bench_e2e.py`` (random bf16 weights). For each prompt length T (batch 1, random ids):

* ``sdpa_static_<backend>``: SDPA with ``cache_implementation="static"``, whose decode step Transformers compiles
  (CUDA graphs), with one SDPA backend forced (cuDNN, flash, efficient: each that runs is reported);
* ``sdpa_dynamic``: SDPA with the default dynamic cache, eager;
* ``sparsex``: Sparse-X with its dynamic cache, eager (``--sparsex-config`` for a variant, e.g. the
  ``"retrieval"`` preset).

Decode tokens/s = ``--new-tokens`` / (time of ``generate`` with 1 + N new tokens - time with 1), so the prefill
cancels; a warm-up run first (compilation included there, not in the timing). Rows go to ``generate.csv``.

    python benchmarks/bench_generate.py --lengths 32768 131072 --new-tokens 64 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import transformers
from _common import append_csv
from bench_e2e import build, events
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparsex_hf

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def decode_rate(model, ids, new_tokens: int, **kw) -> tuple[float, float]:
    """(decode tokens/s, prefill + first token ms) of ``model.generate`` on ``ids``."""
    def run(n):
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)

    run(1 + new_tokens)()  # warm-up: compiles where asked
    one = min(events(run(1), 2, 0))
    many = min(events(run(1 + new_tokens), 2, 0))
    return 1000 * new_tokens / (many - one), one


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sparsex-config", default="{}", help="SparseXConfig fields as JSON, e.g. '{\"rerank\": 2}'")
    ap.add_argument("--tag", default="generate")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, sparsex=sparsex_hf.__version__, tag=args.tag)
    path = os.path.join(args.out_dir, "generate.csv")

    def record(impl, t, rate, prefill_ms, note=""):
        append_csv(path, [dict(meta, impl=impl, tokens=t, decode_tok_s=round(rate, 2), prefill_ms=round(prefill_ms, 1),
                               note=note)])
        print(f"{impl:>20} T={t:>8} {rate:8.1f} tok/s  prefill {prefill_ms:9.1f} ms {note}", flush=True)

    for attn in ("sdpa", "sparsex"):
        model = build(attn)
        if attn == "sparsex":
            sparsex_hf.set_sparsex_config(model, **json.loads(args.sparsex_config))
        for t in args.lengths:
            ids = torch.randint(3, 1000, (1, t), device="cuda")
            with torch.no_grad():
                if attn == "sparsex":
                    record("sparsex", t, *decode_rate(model, ids, args.new_tokens), note=args.sparsex_config)
                    continue
                record("sdpa_dynamic", t, *decode_rate(model, ids, args.new_tokens))
                for name, backend in BACKENDS.items():
                    try:
                        with sdpa_kernel(backend):
                            rate = decode_rate(model, ids, args.new_tokens, cache_implementation="static")
                    except Exception as e:  # a backend that refuses the static cache's masked shapes
                        print(f"sdpa_static_{name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    record(f"sdpa_static_{name}", t, *rate, note="static cache, compiled decode")
            torch.cuda.empty_cache()
        model = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

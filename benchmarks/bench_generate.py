"""Generation speed through ``generate()`` as a user runs it, against the strongest Transformers setup.

Same 1B-shaped model as ``bench_e2e.py`` (random bf16 weights). For each prompt length T and batch B (random ids):

* ``sdpa_dynamic``: SDPA with the default dynamic cache, eager, Transformers' default SDPA backend choice;
* ``sdpa_dynamic_<backend>``: the same with one SDPA backend forced;
* ``sdpa_static_<backend>``: SDPA with ``cache_implementation="static"``, whose decode step Transformers compiles
  (``mode="reduce-overhead"``: CUDA graphs), one backend forced: the strongest Transformers setup;
* ``sparsex_dynamic``: Sparse-X with its dynamic cache, eager;
* ``sparsex_static``: Sparse-X with ``cache_implementation="static"``, decode step compiled the same way.

Decode tokens/s is timed on the GPU's own clock: a logits processor records a CUDA event at every step, and the rate
is (steps - 1) / (time from the first step's event to the last's), so the prefill is outside it and any host time
that starves the GPU is inside it. Each setup runs once to warm up (compilation there) and once timed; the prefill
column is the timed run's start to its first step. Rows go to ``generate.csv``.

    python benchmarks/bench_generate.py --lengths 32768 131072 --new-tokens 64 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os

import torch
import transformers
from _common import append_csv
from bench_e2e import build
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LogitsProcessor, LogitsProcessorList

import sparsex_hf

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


class StepClock(LogitsProcessor):
    """Records a CUDA event each time ``generate()`` scores a step (after that step's forward was enqueued)."""

    def __init__(self):
        self.events: list[torch.cuda.Event] = []

    def __call__(self, input_ids, scores):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.events.append(e)
        return scores


def decode_rate(model, ids, new_tokens: int, **kw) -> tuple[float, float]:
    """(decode tokens/s, prefill ms: start to the first step) of ``model.generate`` on ``ids``."""
    def run():
        clock = StepClock()
        start = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]), **kw)
        torch.cuda.synchronize()
        return start, clock.events

    run()  # warm-up: compiles where asked
    start, ev = run()
    decode_ms = ev[0].elapsed_time(ev[-1])
    return 1000 * (len(ev) - 1) / decode_ms, start.elapsed_time(ev[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--impls", nargs="+", default=["sdpa_dynamic", "sdpa_dynamic_flash", "sdpa_static_cudnn",
                                                    "sdpa_static_flash", "sparsex_dynamic", "sparsex_static"],
                    help="which setups to run (sdpa_dynamic[_BACKEND], sdpa_static_BACKEND, sparsex_dynamic, "
                         "sparsex_static)")
    ap.add_argument("--sparsex-config", default="{}", help="SparseXConfig fields as JSON, e.g. '{\"rerank\": 2}'")
    ap.add_argument("--tag", default="generate")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, sparsex=sparsex_hf.__version__, tag=args.tag)
    path = os.path.join(args.out_dir, "generate.csv")

    def record(impl, t, rate, prefill_ms, note=""):
        append_csv(path, [dict(meta, impl=impl, tokens=t, batch=args.batch, new_tokens=args.new_tokens,
                               decode_tok_s=round(rate, 2), ms_per_step=round(1000 / rate, 3),
                               prefill_ms=round(prefill_ms, 1), note=note)])
        print(f"{impl:>20} T={t:>8} B={args.batch} {rate:9.1f} tok/s ({1000 / rate:7.2f} ms/step)  "
              f"prefill {prefill_ms:9.1f} ms {note}", flush=True)

    for attn in ("sdpa", "sparsex"):
        impls = [i for i in args.impls if i.startswith(attn)]
        if not impls:
            continue
        model = build(attn)
        if attn == "sparsex":
            sparsex_hf.set_sparsex_config(model, **json.loads(args.sparsex_config))
        for t in args.lengths:
            ids = torch.randint(3, 1000, (args.batch, t), device="cuda")
            for impl in impls:
                backend = impl.split("_")[2] if impl.count("_") == 2 else None
                kw = dict(cache_implementation="static") if "_static" in impl else {}
                note = ("static cache, compiled decode" if kw else "dynamic cache, eager") + (
                    f", {args.sparsex_config}" if attn == "sparsex" and args.sparsex_config != "{}" else "")
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                try:
                    with torch.no_grad(), (sdpa_kernel(BACKENDS[backend]) if backend else contextlib.nullcontext()):
                        rate = decode_rate(model, ids, args.new_tokens, **kw)
                except Exception as e:  # a backend that refuses a shape, or memory
                    print(f"{impl} T={t}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                if kw:  # one graph per step and no break is what CUDA graphs need: say so in the row
                    c = torch._dynamo.utils.counters
                    note += f"; graphs {c['stats']['unique_graphs']}, breaks {sum(c['graph_break'].values())}"
                    for reason, n in list(c["graph_break"].items())[:3]:
                        print(f"  graph break x{n}: {reason[:200]}", flush=True)
                record(impl, t, *rate, note=note)
                torch.cuda.empty_cache()
        model = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

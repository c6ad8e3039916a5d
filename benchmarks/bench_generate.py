"""Generation speed through ``generate()`` as a user runs it, against the strongest Transformers setup.

Same 1B-shaped model as ``bench_e2e.py`` (random bf16 weights). For each prompt length T and batch B (random ids):

* ``sdpa_dynamic``: SDPA with the default dynamic cache, eager, Transformers' default SDPA backend choice;
* ``sdpa_dynamic_<backend>``: the same with one SDPA backend forced;
* ``sdpa_static_<backend>``: SDPA with ``cache_implementation="static"``, whose decode step Transformers compiles
  (``mode="reduce-overhead"``: CUDA graphs), one backend forced: the strongest Transformers setup;
* ``sparsex_plain``: Sparse-X through the plain call ``model.generate(ids, max_new_tokens=...)``: on CUDA the
  package gives it a Sparse-X static cache and Transformers compiles the decode step (``generate_cache="auto"``);
* ``sparsex_dynamic``: Sparse-X with ``cache_implementation="dynamic"``, eager (the plain call before 0.3);
* ``sparsex_static``: Sparse-X with ``cache_implementation="static"``, decode step compiled the same way.

Decode tokens/s is timed on the GPU's own clock: a logits processor records a CUDA event at every step, and the rate
is (steps - 1) / (time from the first step's event to the last's), so the prefill is outside it and any host time
that starves the GPU is inside it. Each setup runs once to warm up (compilation there: its wall time is the row's
``first call`` note) and once timed; the prefill column is the timed run's start to its first step (the time to
the first token), and the note holds the timed run's peak GPU memory. Rows go to ``generate.csv``.

    python benchmarks/bench_generate.py --lengths 32768 131072 --new-tokens 64 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import json
import os
import pstats
import statistics
import time

import torch
import transformers
from _common import append_csv
from bench_e2e import build
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
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


def decode_rate(model, ids, new_tokens: int, host_profile: str | None = None, **kw) -> tuple:
    """(decode tokens/s, prefill ms: start to the first step, the first call's wall seconds, the timed call's peak
    GPU memory in GiB: weights, cache and transients, the step times: the first three and the median) of
    ``model.generate`` on ``ids``; ``host_profile``: a file for the Python profile of one more call (top 30 by own
    time)."""
    def run():
        clock = StepClock()
        start = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]), **kw)
        torch.cuda.synchronize()
        return start, clock.events

    first = time.perf_counter()
    run()  # warm-up: compiles where asked
    first = time.perf_counter() - first
    torch.cuda.reset_peak_memory_stats()
    start, ev = run()
    peak = torch.cuda.max_memory_allocated() / 2**30
    decode_ms = ev[0].elapsed_time(ev[-1])
    steps = [a.elapsed_time(b) for a, b in zip(ev, ev[1:])]
    steps_note = (f"steps {', '.join(f'{s:.2f}' for s in steps[:3])} ... median {statistics.median(steps):.2f} ms"
                  if steps else "")
    if host_profile:
        prof = cProfile.Profile()
        prof.runcall(run)
        with open(host_profile, "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(30)
    return 1000 * (len(ev) - 1) / decode_ms, start.elapsed_time(ev[0]), first, peak, steps_note


def profile_steps(model, ids, steps: int = 16, **kw) -> str:
    """One line: per decode step, the CUDA graph replays and kernel launches the host made and the GPU's busy time
    (the sum of kernel times), from a profile of a generate() of 1 + ``steps`` tokens minus one of 1 token."""
    def one(n):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
            torch.cuda.synchronize()
        ev = prof.key_averages()
        graphs = sum(e.count for e in ev if e.key == "cudaGraphLaunch")
        launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                        "cudaLaunchKernelExC"))
        return graphs, launches, gpu_busy_ms(ev)

    g1, l1, b1 = one(1)
    g2, l2, b2 = one(1 + steps)
    return (f"per step: {(g2 - g1) / steps:.1f} graph replays, {(l2 - l1) / steps:.0f} kernel launches, "
            f"GPU busy {(b2 - b1) / steps:.3f} ms")


def gpu_busy_ms(events) -> float:
    """The GPU's busy time in a profile: the sum of its kernels' times (device events only; an operator's own
    device time would count its kernels a second time)."""
    return sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1000


def profile_prefill(model, ids, path: str, **kw) -> str:
    """Profile of a ``generate()`` of one token (the prefill, warm): the operators with the most GPU time and those
    with the most host time go to ``path``; returns one line (GPU busy, wall)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, **kw)
        torch.cuda.synchronize()
    wall = 1000 * (time.perf_counter() - t0)
    ev = prof.key_averages()
    busy = gpu_busy_ms(ev)
    with open(path, "w") as f:
        f.write(f"prefill (generate of 1 token) under the profiler: wall {wall:.1f} ms, GPU busy {busy:.1f} ms\n\n")
        f.write(ev.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70) + "\n")
        f.write(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70) + "\n")
    return f"prefill profile: GPU busy {busy:.1f} ms of {wall:.1f} ms wall (profiled)"


def report(path: str, tags: list[str]) -> None:
    """Markdown table (ms per step and tokens/s per setup and length) and ``generate.png`` from the CSV."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["tag"] in tags]
    best = {(r["impl"], int(r["tokens"]), int(r["batch"])): r for r in rows}  # later rows win
    lengths = sorted({k[1] for k in best})
    impls = [i for i in ("sdpa_dynamic", "sdpa_dynamic_flash", "sdpa_static_cudnn", "sdpa_static_flash",
                         "sparsex_plain", "sparsex_dynamic", "sparsex_static") if any(k[0] == i for k in best)]
    print("| setup | " + " | ".join(f"{t // 1024}K" for t in lengths) + " |")
    print("|---" * (len(lengths) + 1) + "|")
    for impl in impls:
        cells = [best.get((impl, t, 1)) for t in lengths]
        print(f"| {impl} | " + " | ".join(f"{float(c['decode_tok_s']):.0f} tok/s ({float(c['ms_per_step']):.2f} ms)"
                                           if c else "-" for c in cells) + " |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in impls:
        pts = [(t, float(best[(impl, t, 1)]["decode_tok_s"])) for t in lengths if (impl, t, 1) in best]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens (batch 1)")
    ax.set_ylabel("decode tokens/s through generate()")
    ax.set_title(f"1B-shaped Llama, bf16, {rows[0]['gpu'] if rows else ''}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(path), "generate.png"), dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--left-pad", type=int, default=0, help="row i of a batch is left-padded by "
                    "i * LEFT_PAD // (batch - 1) tokens (the last row by LEFT_PAD)")
    ap.add_argument("--impls", nargs="+", default=["sdpa_dynamic", "sdpa_dynamic_flash", "sdpa_static_cudnn",
                                                    "sdpa_static_flash", "sparsex_plain", "sparsex_dynamic",
                                                    "sparsex_static"],
                    help="which setups to run (sdpa_dynamic[_BACKEND], sdpa_static_BACKEND, sparsex_plain, "
                         "sparsex_dynamic, sparsex_static)")
    ap.add_argument("--sparsex-config", default="{}", help="SparseXConfig fields as JSON, e.g. '{\"rerank\": 2}'")
    ap.add_argument("--profile", action="store_true", help="also profile 16 decode steps of each setup: host calls "
                    "that launch work (graph replays vs single kernels) and the GPU's busy time per step")
    ap.add_argument("--host-profile", action="store_true", help="also write the Python profile of one more call "
                    "of each setup (host_IMPL_T_bB.txt: the 30 functions with the most own time)")
    ap.add_argument("--prefill-profile", action="store_true", help="also profile one prefill of each setup "
                    "(prefill_IMPL_T_bB.txt: the operators with the most GPU time and with the most host time)")
    ap.add_argument("--report", nargs="+", metavar="TAG", help="no timing: the table and generate.png from the CSV "
                    "rows of these tags (the latest row of each setup, length and batch)")
    ap.add_argument("--tag", default="generate")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.report:
        report(os.path.join(args.out_dir, "generate.csv"), args.report)
        return 0
    meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, sparsex=sparsex_hf.__version__, tag=args.tag)
    path = os.path.join(args.out_dir, "generate.csv")

    def record(impl, t, rate, prefill_ms, first_s, peak_gib, steps, note=""):
        note = f"{note}; first call {first_s:.1f} s; peak GPU memory {peak_gib:.1f} GiB; {steps}"
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
            mask = torch.ones_like(ids)
            for i in range(args.batch):  # row i left-padded by i / (batch - 1) of --left-pad tokens
                mask[i, : i * args.left_pad // max(1, args.batch - 1)] = 0
            for impl in impls:
                backend = impl.split("_")[2] if impl.count("_") == 2 else None
                kw = {} if impl.endswith("_plain") else dict(
                    cache_implementation="static" if "_static" in impl else "dynamic")
                note = ("plain call" if not kw else "static cache, compiled decode" if "_static" in impl
                        else "dynamic cache, eager") + (
                    f", {args.sparsex_config}" if attn == "sparsex" and args.sparsex_config != "{}" else "") + (
                    f", left-padded up to {args.left_pad}" if args.left_pad else "")
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                try:
                    with torch.no_grad(), (sdpa_kernel(BACKENDS[backend]) if backend else contextlib.nullcontext()):
                        prof = (os.path.join(args.out_dir, f"host_{impl}_{t}_b{args.batch}.txt")
                                if args.host_profile else None)
                        rate = decode_rate(model, ids, args.new_tokens, prof, attention_mask=mask, **kw)
                except Exception as e:  # a backend that refuses a shape, or memory
                    print(f"{impl} T={t}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                if kw.get("cache_implementation") != "dynamic":  # one graph per step, no break: CUDA graphs' needs
                    c = torch._dynamo.utils.counters
                    note += f"; graphs {c['stats']['unique_graphs']}, breaks {sum(c['graph_break'].values())}"
                    for reason, n in list(c["graph_break"].items())[:3]:
                        print(f"  graph break x{n}: {reason[:200]}", flush=True)
                if args.profile:
                    note += "; " + profile_steps(model, ids, attention_mask=mask, **kw)
                if args.prefill_profile:
                    with torch.no_grad():
                        note += "; " + profile_prefill(model, ids, os.path.join(
                            args.out_dir, f"prefill_{impl}_{t}_b{args.batch}.txt"), attention_mask=mask, **kw)
                record(impl, t, *rate, note=note)
                torch.cuda.empty_cache()
        model = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end long-context inference with a Llama-3.2-1B-shaped model (random weights): Sparse-X vs SDPA.

Model: 16 layers, hidden 2048, 32 query / 8 KV heads, head dim 64, MLP 8192, vocab 128256, bf16, random
initialisation (no weights can be downloaded). Sparse-X runs its default config (window 4096, stride 256,
top-8 blocks of 64, sink 64, selection tile 64) and chunked prefill (32K).

Measured, each with CUDA events:

* ``prefill``: ``generate(max_new_tokens=1)`` from a random prompt of T tokens (prefill + one step), and
  its peak memory; SDPA where ``--dense-prefill-max`` allows (dense 1M would take minutes of GPU time).
* ``decode``: tokens/s of greedy decode steps (``model(next_token, cache=...)``) with a cache of T tokens,
  batch 1 and 8, median of the steps. The cache is filled with random keys/values (a decode step's cost
  depends on the cache size, not on its contents); SDPA uses Transformers' default ``DynamicCache``.
* ``attn``: one layer's attention alone for one new token per sequence against a cache of T tokens:
  Sparse-X (selection from the summaries + the Triton split-K kernel) and SDPA (``enable_gqa``; every
  backend that runs, the fastest reported).

    python benchmarks/bench_e2e.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import time

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
import transformers
import triton
from _common import append_csv
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import sparsex_hf
from sparsex_hf import SparseXCache, SparseXConfig
from sparsex_hf.hf import CACHE_KWARG, SparseXLayer
from sparsex_hf.ops.attention import sparsex_decode_attention, sparsex_prompt_anchor
from sparsex_hf.ops.attention.kernels.decode import decode_shortlist_triton
from sparsex_hf.ops.attention.rules import cost

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=1 << 24,
             rope_theta=500000.0, tie_word_embeddings=True)


def build(attn: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPE)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    model.eval()
    model.generation_config.pad_token_id = 0
    if attn == "sparsex":
        sparsex_hf.apply_sparsex(model)
    return model


def events(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return out


def graphed(fn, reps: int = 200) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (launch overhead removed)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return float(np.median(events(g.replay, reps, 10)))


def profile_step(step, label: str, out_dir: str) -> None:
    """Where one decode step's host time goes: the top operators by self CPU time."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
    print(f"--- profile: {label}\n{table}")
    with open(os.path.join(out_dir, f"profile_{label}.txt"), "w") as fh:
        fh.write(table)


def layer_device(model, i: int) -> torch.device:
    """Where decoder layer ``i`` runs (its parameters' device; Accelerate may have placed the layers apart)."""
    return next(model.model.layers[i].parameters()).device


def filled_cache(model, attn: str, bsz: int, t: int, offload: bool = False):
    """A cache of ``t`` random keys/values per layer (offsets 0: no padding), each layer's on the device its layer
    runs on (with ``offload``: a Sparse-X cache whose keys and values are kept on the CPU)."""
    n_layers = model.config.num_hidden_layers
    cache = SparseXCache(model.config, offload=offload) if attn == "sparsex" else DynamicCache(config=model.config)
    kv_heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
    for i in range(n_layers):
        dev = layer_device(model, i)
        gen = torch.Generator(device=dev).manual_seed(t + i)
        k = torch.randn(bsz, kv_heads, t, head_dim, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(bsz, kv_heads, t, head_dim, device=dev, dtype=torch.bfloat16, generator=gen)
        layer = cache.layers[i]
        if attn == "sparsex":
            layer.record_offsets(None, t, bsz)
        layer.update(k, v)
        del k, v
        if attn == "sparsex":
            layer.summaries(64)
    return cache


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = "(default 32768 131072 1048576 when none of --prefill/--decode/--attn is given, else none)"
    ap.add_argument("--prefill", type=int, nargs="*", default=None, help=f"contexts {parts}")
    ap.add_argument("--dense-prefill-max", type=int, default=131072)
    ap.add_argument("--decode", type=int, nargs="*", default=None, help=f"contexts {parts}")
    ap.add_argument("--decode-batch8-max", type=int, default=131072, help="batch 8 caches beyond this do not fit")
    ap.add_argument("--attn", type=int, nargs="*", default=None,
                    help="contexts of the attention step alone (default 131072 1048576 when none of the three is given)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tag", default="e2e")
    ap.add_argument("--configs", nargs="+", default=["default", "one-stage"],
                    help="presets timed by --attn, in the same run (the model rows run the default config)")
    ap.add_argument("--config", default="", help="SparseXConfig overrides of the --attn presets, e.g. rerank=4")
    ap.add_argument("--profile", type=int, default=0, help="profile one decode step at this context (0: off)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.prefill is None and args.decode is None and args.attn is None:  # the whole benchmark
        args.prefill, args.decode, args.attn = [32768, 131072, 1048576], [32768, 131072, 1048576], [131072, 1048576]
    args.prefill, args.decode, args.attn = args.prefill or [], args.decode or [], args.attn or []
    meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, transformers=transformers.__version__, sparsex=sparsex_hf.__version__,
                tag=args.tag)
    path = os.path.join(args.out_dir, "e2e.csv")

    def record(impl, what, tokens, batch, ms, peak_gb="", note=""):
        row = dict(meta, impl=impl, what=what, tokens=tokens, batch=batch, ms=round(ms, 3),
                   tok_per_s=round(batch * 1000 / ms, 2) if what == "decode" else "", peak_gb=peak_gb, note=note)
        append_csv(path, [row])
        print(f"{impl:>8} {what:>8} T={tokens:>8} B={batch} {ms:10.3f} ms {row['tok_per_s']} tok/s "
              f"peak {peak_gb} GB {note}", flush=True)

    # attention alone: one decode step of one layer, for each config (presets, with --config on top)
    fields = dict(kv.split("=") for kv in filter(None, args.config.split(",")))
    fields = {k: (v if v in ("last", "split") else bool(int(v))) if k == "anchor" else int(v) for k, v in fields.items()}
    # the "sparsex" rows time the kernels (cost-model handoff off); "sparsex_auto" rows time what the default does
    # (SDPA where the cost model predicts dense faster)
    configs = {name: SparseXConfig.preset(name, **fields, dense_when_faster=False) for name in args.configs}
    for t in args.attn:
        layer = SparseXLayer()
        gen = torch.Generator(device="cuda").manual_seed(1)
        k = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        layer.record_offsets(None, t, 1)
        layer.update(k, v)
        layer.summaries(64)
        q = torch.randn(1, 32, 1, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        q_tile = torch.randn(1, 32, 64, 64, device="cuda", dtype=torch.bfloat16, generator=gen)  # a prompt's last tile
        summ, off = layer.summaries(64), layer.offsets_tensor("cuda", torch.int32)
        for name, cfg in configs.items():
            impl = "sparsex" if name == "default" else f"sparsex_{name}"
            anchor = None
            if cfg.anchor:  # the blocks of a prompt's last tile (random queries), added to every step's shortlist
                anchor = sparsex_prompt_anchor(q_tile, layer.keys, off, t, cfg)
                ms_anchor = float(np.median(events(lambda: sparsex_prompt_anchor(q_tile, layer.keys, off, t, cfg), 20, 2)))
                record(impl, "prompt_anchor", t, 1, ms_anchor, note="once per prefill and layer")
            step_args = (q, layer.keys, layer.values, summ, off, t, cfg)
            sparse = lambda: sparsex_decode_attention(*step_args, max_doc_len=t, backend="triton", anchor=anchor)  # noqa: E731
            ms = float(np.median(events(sparse, 200, 10)))
            record(impl, "attn", t, 1, ms, note="eager: shortlist kernel + attention kernel (exact stage inside)")
            short = lambda: decode_shortlist_triton(q, summ, off, t, cfg, None, anchor)  # noqa: E731
            record(impl, "attn_select", t, 1, float(np.median(events(short, 200, 10))), note="the shortlist kernel alone")
            record(impl, "attn_graph", t, 1, graphed(sparse), note="same step replayed from a CUDA graph")
            record(impl, "attn_select_graph", t, 1, graphed(short), note="the shortlist kernel alone, CUDA graph")
            if name == "default":
                auto_cfg = cfg.replace(dense_when_faster=True)
                auto = lambda: sparsex_decode_attention(*step_args[:-1], auto_cfg, max_doc_len=t, backend="triton",  # noqa: E731
                                                        anchor=anchor)
                for what, graph in (("attn", False), ("attn_graph", True)):
                    ms_auto = graphed(auto) if graph else float(np.median(events(auto, 200, 10)))
                    chose = cost.decode_dense_is_faster(auto_cfg, t, 8, 64, 1, meta["gpu"], graph)
                    record("sparsex_auto", what, t, 1, ms_auto,
                           note="the default: " + ("SDPA by the cost model" if chose else "the kernels"))
        best = None
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
            if name == "math" and t > 131072:
                continue
            try:
                def dense():
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, layer.keys, layer.values, enable_gqa=True)

                ms_d = float(np.median(events(dense, 50, 3)))
            except Exception as e:  # a backend that refuses these shapes
                print(f"sdpa {name}: {type(e).__name__}: {str(e)[:100]}")
                continue
            record(f"sdpa_{name}", "attn", t, 1, ms_d)
            if name in ("flash", "cudnn"):
                record(f"sdpa_{name}", "attn_graph", t, 1, graphed(dense), note="CUDA graph")
            best = ms_d if best is None else min(best, ms_d)
        if best is not None:
            print(f"attention step at {t}: {best / ms:.1f}x the fastest SDPA backend")
        k = v = layer = None  # free the cache before the next length
        torch.cuda.empty_cache()

    for attn in ("sparsex", "sdpa") if args.decode or args.prefill else ():
        model = build(attn)
        for t in args.decode:
            for bsz in (1, 8):
                if bsz == 8 and t > args.decode_batch8_max:
                    continue
                torch.cuda.empty_cache()
                cache = filled_cache(model, attn, bsz, t)
                tok = torch.randint(3, 1000, (bsz, 1), device="cuda")

                @torch.no_grad()
                def step():
                    out = model(tok, **{CACHE_KWARG: cache}, use_cache=True)
                    return out.logits[:, -1].argmax(-1)

                times = events(step, args.steps, 2)
                record(attn, "decode", t, bsz, float(np.median(times)))
                if t == args.profile and bsz == 1:
                    profile_step(step, f"{attn}_{t}", args.out_dir)
                cache = None
        with torch.no_grad():  # compile / warm up before timing
            model.generate(torch.randint(3, 1000, (1, 4096), device="cuda"), max_new_tokens=1, do_sample=False)
        for t in args.prefill:
            if attn == "sdpa" and t > args.dense_prefill_max:
                continue
            torch.cuda.empty_cache()
            ids = torch.randint(3, 1000, (1, t), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            with torch.no_grad():
                ms = events(lambda: model.generate(ids, max_new_tokens=1, do_sample=False), 1, 0)[0]
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            chunk = model.generation_config.prefill_chunk_size
            record(attn, "prefill", t, 1, ms, peak, f"chunk {chunk}" if chunk else "one pass")
            print(f"  (wall {time.time() - t0:.1f}s)")
        model = None
        torch.cuda.empty_cache()
    report(path, args.tag, args.out_dir)


def report(path, tag, out_dir):
    rows = [r for r in csv.DictReader(open(path)) if r["tag"] == tag]
    by = {(r["impl"], r["what"], int(r["tokens"]), int(r["batch"])): float(r["ms"]) for r in rows}
    lines = ["| context | Sparse-X prefill | SDPA prefill | speed-up | Sparse-X decode B=1 | SDPA decode B=1 | speed-up | "
             "Sparse-X decode B=8 | SDPA decode B=8 | speed-up |", "|---" * 10 + "|"]
    for t in sorted({int(r["tokens"]) for r in rows if r["what"] in ("prefill", "decode")}):
        def f(impl, what, b=1, rate=False):
            ms = by.get((impl, what, t, b))
            if ms is None:
                return None, "-"
            return ms, (f"{b * 1000 / ms:.1f} tok/s" if rate else f"{ms / 1000:.2f} s")

        cells = []
        for what, b, rate in (("prefill", 1, False), ("decode", 1, True), ("decode", 8, True)):
            (a, sa), (d, sd) = f("sparsex", what, b, rate), f("sdpa", what, b, rate)
            ratio = f"{d / a:.1f}x" if a and d else "-"
            cells += [sa, sd, ratio]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for impl in ("sparsex", "sdpa"):
        pts = sorted((int(r["tokens"]), float(r["ms"]) / 1000) for r in rows if r["impl"] == impl and r["what"] == "prefill")
        if pts:
            axes[0].plot(*zip(*pts), "o-", label=impl)
        for b in (1, 8):
            pts = sorted((int(r["tokens"]), float(r["tok_per_s"])) for r in rows
                         if r["impl"] == impl and r["what"] == "decode" and int(r["batch"]) == b)
            if pts:
                axes[1].plot(*zip(*pts), "o-" if b == 1 else "s--", label=f"{impl} B={b}")
    for ax, title, unit in ((axes[0], "prefill (1B-shaped model)", "s"), (axes[1], "decode", "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "e2e.png"), dpi=120)


if __name__ == "__main__":
    main()

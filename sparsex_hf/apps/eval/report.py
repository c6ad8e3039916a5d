"""Writing an evaluation: ``results.json`` (every sample), ``table.md`` (like the paper's Table 1) and
``accuracy.png`` (accuracy against length, like its Figure 2)."""

from __future__ import annotations

import json
import math
import os

from ...config import SparseXConfig

try:  # the plot is optional: without matplotlib, write_all writes the JSON and the table and says so
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

NAMES = {"sdpa": "dense (sdpa)", "sparsex": "Sparse-X", "window": "sliding window", "stride_window": "stride + window"}


def wilson(share: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval (in %) of a proportion measured as ``share`` (0..1) over ``n`` samples."""
    if n <= 0:
        return [float("nan"), float("nan")]
    d = 1 + z * z / n
    c = (share + z * z / (2 * n)) / d
    h = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / d
    return [round(100 * max(0.0, c - h), 1), round(100 * min(1.0, c + h), 1)]


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def _acc(x, ci) -> str:
    """An accuracy with its 95% interval."""
    return "-" if x is None else (f"{x:.1f} [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else f"{x:.1f}")


def display_name(method: str) -> str:
    if method.startswith("sparsex:"):
        return f"Sparse-X {method[8:]}"
    return NAMES.get(method, method)


def tables(results: dict) -> str:
    s = results["summary"]
    methods = results["settings"]["methods"]
    lengths = [str(n) for n in results["settings"]["lengths"]]
    tasks = results["settings"]["tasks"]
    ci, mean_ci = s.get("ci", {}), s.get("mean_ci", {})
    lines = [f"Model: `{results['meta']['model']}` ({results['meta']['dtype']}, {results['meta']['device']}), "
             f"{results['settings']['samples']} samples per task and length, seed {results['meta']['seed']}; "
             "accuracies in % with their 95% Wilson interval.", ""]
    lines += ["Mean accuracy over tasks (%):", "",
              "| method | keys/query at the longest length | " + " | ".join(lengths) + " |",
              "|---|---|" + "---|" * len(lengths)]
    longest = int(lengths[-1])
    for m in methods:
        cfg = results["configs"].get(m)
        budget = "all" if cfg is None else _budget(cfg, longest)
        lines.append(f"| {display_name(m)} | {budget} | " + " | ".join(
            _acc(s["mean"].get(m, {}).get(n), mean_ci.get(m, {}).get(n)) for n in lengths) + " |")
    for n in lengths:
        lines += ["", f"Per task at {n} tokens (%):", "", "| task | " + " | ".join(display_name(m) for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(
                _acc(s["accuracy"].get(m, {}).get(n, {}).get(t), ci.get(m, {}).get(n, {}).get(t)) for m in methods) + " |")
    if s.get("ppl"):
        lines += ["", "Perplexity of real text (Python documentation):", "", "| method | " + " | ".join(lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for m in methods:
            lines.append(f"| {display_name(m)} | " + " | ".join(_fmt(s["ppl"].get(m, {}).get(n), 3) for n in lengths) + " |")
    fid = results.get("fidelity") or {}
    if fid:
        lines += ["", "Fidelity of Sparse-X against dense attention (mean over layers; queries past the window):", "",
                  "| selection variant | length | attention-mass recall | oracle recall | worst layer recall | output error |",
                  "|---|---|---|---|---|---|"]
        for name, by_len in fid.items():
            for n, f in by_len.items():
                lines.append(f"| {name} | {n} | {_fmt(f['mass_recall'], 4)} | {_fmt(f['oracle_recall'], 4)} | "
                             f"{_fmt(f['min_layer_mass_recall'], 4)} | {_fmt(f['output_error'], 4)} |")
        first = next(iter(fid))
        n = lengths[-1] if lengths[-1] in fid[first] else next(iter(fid[first]))
        lines += ["", f"Per layer, `{first}` at {n} tokens:", "", "| layer | mass recall | oracle recall | output error |",
                  "|---|---|---|---|"]
        for x in fid[first][n]["per_layer"]:
            lines.append(f"| {x['layer']} | {_fmt(x['mass_recall'], 4)} | {_fmt(x['oracle_recall'], 4)} | {_fmt(x['output_error'], 4)} |")
    return "\n".join(lines) + "\n"


def _budget(cfg: dict, n: int) -> str:
    k = SparseXConfig(**cfg).keys_per_query(n)
    return f"{k} ({100 * k / n:.0f}%)"


def plot(results: dict, path: str) -> bool:
    """Accuracy against length per method (False, and nothing written, without matplotlib)."""
    if plt is None:
        return False
    s = results["summary"]["mean"]
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":")]
    lengths = sorted({int(n) for v in s.values() for n in v})
    for i, m in enumerate(results["settings"]["methods"]):
        pts = sorted((int(n), v) for n, v in s.get(m, {}).items())
        if pts:  # distinct markers and dashes: methods with equal accuracies stay visible
            marker, dash = styles[i % len(styles)]
            ax.plot(*zip(*pts), marker=marker, linestyle=dash, label=display_name(m), alpha=0.85)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("mean accuracy over tasks (%)")
    ax.set_ylim(-3, 103)  # points at 0 and 100 are not clipped
    ax.set_title(os.path.basename(str(results["meta"]["model"])) or "accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save_json(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)


def compact(results: dict) -> dict:
    """A small copy of ``results`` to keep beside the code: everything but the samples' texts; per (method, length,
    task) the samples' scores in index order (``scores``) and their needle depths (``depths``)."""
    out = {k: v for k, v in results.items() if k != "samples"}
    scores: dict = {}
    depths: dict = {}
    for r in sorted(results["samples"], key=lambda r: r["index"]):
        key = f"{r['method']}|{r['length']}|{r['task']}"
        scores.setdefault(key, []).append(r["score"])
        depths.setdefault(f"{r['length']}|{r['task']}", {})[r["index"]] = r["depth"]
    out["scores"] = scores
    out["depths"] = {k: [v[i] for i in sorted(v)] for k, v in depths.items()}
    return out


def write_all(results: dict, output_dir: str, figure: bool = True) -> list[str]:
    """``results.json`` (every sample), ``summary.json`` (:func:`compact`), ``table.md`` and (with matplotlib and
    ``figure``) ``accuracy.png`` in ``output_dir``; returns the names of the files written."""
    os.makedirs(output_dir, exist_ok=True)
    save_json(results, os.path.join(output_dir, "results.json"))
    with open(os.path.join(output_dir, "summary.json"), "w") as fh:
        json.dump(compact(results), fh, separators=(",", ":"))
    with open(os.path.join(output_dir, "table.md"), "w") as fh:
        fh.write(tables(results))
    written = ["results.json", "summary.json", "table.md"]
    if figure and plot(results, os.path.join(output_dir, "accuracy.png")):
        written.append("accuracy.png")
    return written

"""Write the launch shapes a GPU matrix run had to make smaller into the table, so the kernels start from them.

``bash benchmarks/run_gpu.sh matrix`` appends to ``OUT/fitted.jsonl`` one line per shape whose table entry needed
more shared memory than the card has (``{"gpu", "key": "bwd@d128,fp32,b128", "tile"}``: the smaller shape the
kernels found by compiling one candidate after another). This merges them into ``tiles.json`` as qualified keys of
that GPU's entry, so a user's first call compiles one shape, not a chain of them.

    python benchmarks/save_fitted.py benchmarks/results/fitted.jsonl --note "matrix, H100, 2026-12-06"
"""

from __future__ import annotations

import argparse
import json

from sparsex_hf.ops.attention.kernels import tuning


def read_fitted(path: str) -> dict[str, dict[str, dict]]:
    """``{gpu: {key: tile}}`` from a ``fitted.jsonl``; a key seen twice with different shapes is an error."""
    out: dict[str, dict[str, dict]] = {}
    with open(path) as f:
        for line in filter(str.strip, f):
            row = json.loads(line)
            seen = out.setdefault(row["gpu"], {}).setdefault(row["key"], row["tile"])
            if seen != row["tile"]:
                raise SystemExit(f"{path}: {row['gpu']} {row['key']} fitted as {seen} and as {row['tile']}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fitted", help="a fitted.jsonl from run_gpu.sh matrix")
    ap.add_argument("--note", required=True, help="where and when the shapes were found (kept in the entry)")
    ap.add_argument("--table", default=tuning.TABLE_PATH)
    args = ap.parse_args(argv)
    for gpu, keys in read_fitted(args.fitted).items():
        tuning.save_keys(gpu, keys, f"benchmarks/save_fitted.py: {args.note}", path=args.table)
        print(f"{gpu}: {len(keys)} shapes: {keys}")


if __name__ == "__main__":
    main()

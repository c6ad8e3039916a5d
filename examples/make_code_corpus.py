"""A long-context training corpus available offline: the Python source of installed packages, one document
per package (its ``.py`` files in sorted order, each preceded by a ``# file:`` line), written as text files.

    python examples/make_code_corpus.py --packages transformers torch peft accelerate --out corpus/

Repository-level code is a real long-context use case: definitions and their uses lie far apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import os


def package_source(name: str, max_bytes: int) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed (or is a single module)")
    root = spec.submodule_search_locations[0]
    parts, size = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            try:
                text = open(path, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            chunk = f"# file: {os.path.relpath(path, os.path.dirname(root))}\n{text}\n"
            parts.append(chunk)
            size += len(chunk)
            if max_bytes and size >= max_bytes:
                return "".join(parts)
    return "".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", nargs="+", default=["transformers", "torch", "peft", "accelerate"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-mb", type=float, default=20, help="per package (0: all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.packages:
        text = package_source(name, int(args.max_mb * 2**20))
        path = os.path.join(args.out, f"{name}.py.txt")
        with open(path, "w") as fh:
            fh.write(text)
        print(f"{path}: {len(text) / 2**20:.1f} MB")


if __name__ == "__main__":
    main()

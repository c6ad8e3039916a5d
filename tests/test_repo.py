"""The house rules, checked: floors import only downwards, no import cycles, no unexplained function-level
imports, short functions, a clean ruff run, runnable benchmark scripts and small committed results."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparsex_hf"


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``patches/`` ships as ``sparsex_hf.patches``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "patches").rglob("*.py")):
        parts = ["sparsex_hf", "patches", *path.relative_to(ROOT / "patches").with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_pkg = MODULES[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, top_level_only: bool = False) -> list[tuple[str, ast.stmt]]:
    """``(imported module, node)`` of every import of ``module`` (module-level ones only, if asked)."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module-level try/if blocks count as module level
        nodes = [n for stmt in tree.body for n in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef))]
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            out += [(f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target, node) for a in node.names]
    return out


def _floor(module: str) -> int:
    """0: config and the checkout bootstrap; 1: ops and the per-model table; 2: the Transformers wing; 3:
    applications; 4: the package root."""
    if module == "sparsex_hf":
        return 4
    if module == "sparsex_hf._checkout":
        return 0
    for prefix, floor in (("sparsex_hf.apps", 3), ("sparsex_hf.hf", 2), ("sparsex_hf.ops", 1),
                          ("sparsex_hf.patches", 1), ("sparsex_hf.config", 0)):
        if module == prefix or module.startswith(prefix + "."):
            return floor
    raise AssertionError(f"{module} belongs to no floor")


def test_floors_import_only_downwards():
    bad = []
    for module in MODULES:
        for target, _ in _imports(module):
            if target.startswith("sparsex_hf") and target in MODULES and _floor(target) > _floor(module):
                bad.append(f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})")
    assert not bad, "\n".join(bad)


def test_lower_floors_import_no_application_libraries_and_ops_no_transformers():
    apps_only = ("argparse", "tqdm", "accelerate", "datasets")
    bad = []
    for module in MODULES:
        floor = _floor(module)
        for target, _ in _imports(module):
            root = target.split(".")[0]
            if floor <= 2 and root in apps_only:
                bad.append(f"{module} imports {target}")
            if floor == 1 and root == "transformers":
                bad.append(f"{module} imports {target}")
            if floor < 4 and target.startswith("transformers.models."):
                bad.append(f"{module} imports a model module {target} (the table in patches/ names them)")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _ in _imports(m, top_level_only=True) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ importing its own submodules is not a cycle of concern; edges into a package are
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_function_level_imports_say_why():
    """An import inside a function is allowed only with a comment on its line or the line above."""
    bad = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2]
                    if "#" not in here and not above.strip().startswith("#"):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not bad, "\n".join(bad)


def test_non_kernel_functions_are_short():
    """No function outside the Triton kernels is over ~60 lines (docstrings not counted)."""
    bad = []
    for path in MODULES.values():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if any("jit" in ast.unparse(d) for d in fn.decorator_list):
                continue
            doc = fn.body[0] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
                getattr(fn.body[0], "value", None), ast.Constant) else None
            n = fn.end_lineno - fn.lineno + 1 - ((doc.end_lineno - doc.lineno + 1) if doc else 0)
            if n > 60:
                bad.append(f"{path.relative_to(ROOT)}: {fn.name} has {n} lines")
    assert not bad, "\n".join(bad)


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    res = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")))
def test_benchmark_scripts_start(script):
    """Every benchmark script imports and parses its arguments (``--help``), so a refactor cannot break one
    silently; the GPU runs are documented in docs/benchmarks.md."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout


def test_committed_results_are_small():
    files = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    sizes = {f: (ROOT / f).stat().st_size for f in files if (ROOT / f).exists()}
    assert sum(sizes.values()) < 1 << 20, sorted(sizes.items(), key=lambda x: -x[1])[:5]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    weights = [f for f in tracked if f.endswith((".safetensors", ".bin", ".pt", ".gguf", ".whl"))]
    assert not weights, weights


@pytest.mark.slow
def test_part_option_splits_a_test_run_into_disjoint_shares_that_cover_it():
    """``pytest --part K/N`` (conftest.py) runs the K-th contiguous share: the GPU test set is split into calls that
    fit the device's time limit, and the N shares together are the whole run."""
    def ids(*extra):
        res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "tests/test_config.py", *extra], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        return [line for line in res.stdout.splitlines() if "::" in line]

    whole = ids()
    shares = [ids("--part", f"{k}/3") for k in (1, 2, 3)]
    assert len(whole) > 3 and all(shares) and sum(shares, []) == whole
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_config.py", "--part", "4/3"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "1 <= K <= N" in res.stdout + res.stderr


def test_the_public_surface_is_what_a_user_calls():
    """``sparsex_hf`` exports the user API only; the Transformers plumbing is reachable under ``sparsex_hf.hf``, and
    its old top-level names say where it went."""
    import sparsex_hf
    import sparsex_hf.hf

    assert sorted(sparsex_hf.__all__) == sorted([
        "SUPPORTED_MODEL_TYPES", "SparseXCache", "SparseXConfig", "SparseXStaticCache", "SparseXStats",
        "apply_sparsex", "from_pretrained", "get_sparsex_config", "release_generation_cache", "revert_sparsex",
        "save_pretrained",
        "set_sparsex_config", "sparsex_attention", "sparsex_decode_attention", "sparsex_select"])
    for name in sparsex_hf.__all__:
        assert getattr(sparsex_hf, name) is not None
    for name in sparsex_hf.hf.__all__:
        assert getattr(sparsex_hf.hf, name) is not None
        with pytest.raises(AttributeError, match=f"from sparsex_hf.hf import {name}"):
            getattr(sparsex_hf, name)
    public = {n for n in dir(sparsex_hf) if not n.startswith("_")}
    assert public - set(sparsex_hf.__all__) <= {"config", "hf", "ops", "patches", "apps"}, public


def test_a_source_checkout_imports_without_installing(tmp_path):
    """``python -c "import sparsex_hf"`` from a checkout nobody installed: the per-model table (top-level
    ``patches/``, shipped as ``sparsex_hf.patches``) is found there (this machine's install is hidden)."""
    for part in ("sparsex_hf", "patches"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            "sys.path.insert(0, '.')\n"
            "import sparsex_hf, sparsex_hf.patches\n"
            "print(sparsex_hf.__file__, sparsex_hf.patches.__file__, len(sparsex_hf.SUPPORTED_MODEL_TYPES))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    here, patches, n = res.stdout.split()
    assert here.startswith(str(tmp_path)) and patches.startswith(str(tmp_path)) and int(n) >= 5


def test_the_import_changes_nothing_in_transformers():
    """``import sparsex_hf`` registers the attention and mask functions and nothing else: no class's ``forward`` or
    loader replaced (a model module imported before it, or after it), no import hook, no model module imported."""
    code = r"""
import sys, transformers
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.llama import modeling_llama
def state():
    out = [modeling_llama.LlamaAttention.forward, modeling_llama.LlamaModel.forward,
           PreTrainedModel.__dict__['from_pretrained'], PreTrainedModel.__dict__['_from_config']]
    out += [AutoModelForCausalLM.__dict__.get(n) for n in ('from_pretrained', 'from_config')]
    return out, list(sys.meta_path)
before, finders = state()
modules = set(sys.modules)
import sparsex_hf
new = [m for m in set(sys.modules) - modules if m.startswith('transformers.models.') and '.modeling_' in m]
after, finders_after = state()
import transformers.models.mistral.modeling_mistral as mm
wrapped = [hasattr(f, '__sparsex_original__') for f in (mm.MistralAttention.forward, mm.MistralModel.forward)]
print(all(a is b for a, b in zip(before, after)), finders == finders_after, not new, not any(wrapped))
from transformers import AttentionInterface
print('sparsex' in AttentionInterface._global_mapping)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True"] * 5, res.stdout

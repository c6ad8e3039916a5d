import os
import sys

import torch

# without a GPU the Triton kernels are tested in the interpreter; it must be on before they are defined
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

import sparsex_hf  # noqa: E402,F401  (registers "sparsex")
from sparsex_hf.ops.attention import HAS_TRITON  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--part", default=None, metavar="K/N",
                     help="run only the K-th of N contiguous shares of the collected tests (K in 1..N), so that a test "
                          "run too long for one call splits into N calls that together run every test once")


def _take_part(config, items) -> None:
    spec = config.getoption("--part")
    if spec is None:
        return
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--part takes K/N with integers 1 <= K <= N, got {spec!r}") from None
    if not 1 <= k <= n:
        raise pytest.UsageError(f"--part takes K/N with integers 1 <= K <= N, got {spec!r}")
    lo, hi = (k - 1) * len(items) // n, k * len(items) // n  # contiguous: a test's parametrizations stay together
    config.hook.pytest_deselected(items=items[:lo] + items[hi:])
    items[:] = items[lo:hi]


def pytest_collection_modifyitems(config, items):
    _take_part(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _poisoned(alloc):
    def make(*args, **kwargs):
        out = alloc(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-(2**30))

    return make


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every buffer the Triton kernels write starts as NaN (integers: a large negative number), so an
    element a kernel leaves unwritten fails the comparison instead of passing by luck."""
    if not HAS_TRITON:
        return
    from sparsex_hf.ops.attention.kernels import decode as decode_kernel
    from sparsex_hf.ops.attention.kernels import prefill, select

    for mod in (prefill, decode_kernel, select):
        for name in ("empty", "empty_like"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, _poisoned(getattr(torch, name)))


@pytest.fixture(autouse=True)
def _kernels_even_where_dense(monkeypatch):
    """Small inputs that Sparse-X's window covers entirely would go to SDPA (ops.attention.DENSE_HANDOFF); the
    tests keep them on the kernels. test_prefill.py's handoff test turns it back on."""
    monkeypatch.setattr("sparsex_hf.ops.attention.dense.DENSE_HANDOFF", False)


@pytest.fixture(autouse=True)
def _give_back_gpu_memory():
    """On a GPU, each test returns its cached memory when it ends: the GPU tests run in parallel processes
    (benchmarks/run_gpu.sh), and one process's cache kept from a realistic-size test left the others out of memory
    on an 80 GB card."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def load_hooks():
    """Transformers' loaders taking ``sparsex=`` (the opt-in ``sparsex_hf.hf.install_load_hooks()``), for one test."""
    from sparsex_hf.hf import install_load_hooks, remove_load_hooks

    install_load_hooks()
    try:
        yield
    finally:
        remove_load_hooks()

import os
import sys

import torch

# without a GPU the Triton kernels are tested in the interpreter; it must be on before they are defined
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SPARSEX_POISON", "1")  # kernel outputs start as NaN: an unwritten element fails

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

import sparsex_hf  # noqa: E402,F401  (registers "sparsex")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

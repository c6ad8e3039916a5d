"""A source checkout used without installing (``python -c "import sparsex_hf"`` from the repository root).

An install ships the top-level ``patches/`` folder (the per-model table) as ``sparsex_hf.patches``; in a checkout
that nobody installed there is no such package, so it is loaded from ``patches/`` under that name here. Nothing
happens when the package is installed (normally or editable) or when ``sparsex_hf.patches`` is found otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
_PATCHES = os.path.join(_ROOT, "patches")

if ("sparsex_hf.patches" not in sys.modules and not os.path.isdir(os.path.join(_HERE, "patches"))
        and os.path.isfile(os.path.join(_PATCHES, "__init__.py")) and os.path.isfile(os.path.join(_ROOT, "pyproject.toml"))
        and importlib.util.find_spec("sparsex_hf.patches") is None):
    _spec = importlib.util.spec_from_file_location("sparsex_hf.patches", os.path.join(_PATCHES, "__init__.py"),
                                                   submodule_search_locations=[_PATCHES])
    _module = sys.modules["sparsex_hf.patches"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    sys.modules["sparsex_hf"].patches = _module  # as the import system sets a loaded submodule on its parent

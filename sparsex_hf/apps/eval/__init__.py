"""Long-context evaluation: RULER-style tasks, passkey, perplexity and fidelity metrics, comparing dense
attention, Sparse-X, a sliding window and stride+window inside one model. Command line: ``sparsex-eval``
(or ``python -m sparsex_hf.apps.eval``); see ``sparsex-eval --help``."""

from .fidelity import VARIANTS, fidelity
from .methods import METHODS, method_config, use_method
from .runner import EvalSettings, evaluate, summarize
from .tasks import TASKS, Sample, make_sample, score

__all__ = ["EvalSettings", "METHODS", "Sample", "TASKS", "VARIANTS", "evaluate", "fidelity", "make_sample",
           "method_config", "score", "summarize", "use_method"]

"""Mistral: what Sparse-X needs to know about the model family (data, not copied forwards)."""

MODEL_TYPE = "mistral"
ATTENTION_CLASS = "transformers.models.mistral.modeling_mistral:MistralAttention"
# Mistral passes config.sliding_window (default 4096; None in v0.2+) to the attention function;
# Sparse-X honours it unless SparseXConfig.respect_sliding_window is False.
SLIDING_WINDOW_ATTR = "sliding_window"

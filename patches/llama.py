"""Llama: what Sparse-X needs to know about the model family (data, not copied forwards)."""

MODEL_TYPE = "llama"
# attention class, as "module:Class", reached by the patch layer only
ATTENTION_CLASS = "transformers.models.llama.modeling_llama:LlamaAttention"
# the config attribute the attention receives as the `sliding_window` kwarg (None: not used)
SLIDING_WINDOW_ATTR = None

"""A model with ``SparseXConfig(backend="flash4")``: prefills on the FlashAttention-4 stage, decodes on the Triton
kernels, and gives the Triton backend's answers (GPU with the ``flash4`` extra)."""

import pytest
import torch
from utils import model_pair, padded_prompts

from sparsex_hf import set_sparsex_config
from sparsex_hf.ops.attention import flash4

CONFIG = dict(block_size=64, sink_tokens=64, window=512, stride=64, topk=4, dense_when_faster=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flash4.flash4_missing(torch.device("cuda")) is not None,
                    reason="needs a Hopper or Blackwell GPU with the flash4 extra")
def test_gpu_flash4_model_prefills_on_flash4_and_matches_triton(monkeypatch):
    """A tiny Llama (head dim 128, 4/2 heads), a left-padded batch of two 2500-token prompts: the bf16 logits of
    ``backend="flash4"`` are within 2x the Triton backend's own error against the fp32 reference model's, its
    prefill runs the stage (on the padded batch's document tables) and ``generate()`` decodes after it."""
    _, model = model_pair("llama", hidden_size=512, num_attention_heads=4, num_key_value_heads=2, sparsex=CONFIG)
    model = model.cuda()
    ids, mask = (t.cuda() for t in padded_prompts(length=2500, pads=(0, 300)))
    real_rows = mask.bool()
    set_sparsex_config(model, **CONFIG, backend="torch")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits.float()[real_rows]
    model = model.to(torch.bfloat16)
    calls, real = [], flash4.flash4_attention
    monkeypatch.setattr("sparsex_hf.ops.attention.api.flash4_attention",
                        lambda *a, **kw: calls.append(kw.get("docs") is not None) or real(*a, **kw))
    errors = {}
    for backend in ("triton", "flash4"):
        set_sparsex_config(model, **CONFIG, backend=backend)
        with torch.no_grad():
            errors[backend] = (model(ids, attention_mask=mask).logits.float()[real_rows] - ref).abs().max().item()
    assert calls == [True, True]  # both layers, on the padded batch's document tables
    assert errors["flash4"] <= 2 * errors["triton"] + 1e-3, errors
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 2508) and len(calls) >= 4

"""What the families added beside Llama and Mistral need on their own, on tiny random configs; the checks every
family gets (full budget == SDPA, decode == one pass, padded batch == each row alone, chunked prefill) are
parametrized over all supported types in test_attention.py and test_cache.py."""

import json

import pytest
import torch
from utils import SPARSE_SMALL, left_padded, model_pair, tiny_model

import sparsex_hf
from sparsex_hf import SUPPORTED_MODEL_TYPES, apply_sparsex, revert_sparsex
from sparsex_hf.apps import finetune
from sparsex_hf.apps.eval import fidelity, use_method
from sparsex_hf.patches import attention_class, model_class

NEW = ["qwen2", "qwen3", "phi3"]


def test_the_table_lists_the_families():
    assert set(NEW) | {"llama", "mistral"} == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", NEW)
def test_apply_and_revert_restore_the_classes_and_the_model(model_type):
    apply_sparsex(model_type)
    attn, stack = attention_class(model_type), model_class(model_type)
    originals = attn.forward.__sparsex_original__, stack.forward.__sparsex_original__
    revert_sparsex(model_type)
    try:
        assert (attn.forward, stack.forward) == originals
        model = tiny_model(model_type, "sdpa")
        apply_sparsex(model, window=64)
        assert model.config._attn_implementation == "sparsex"
        assert hasattr(attn.forward, "__sparsex_original__")
        revert_sparsex(model)
        assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "sparsex")
    finally:
        apply_sparsex(model_type)


def test_qwen2_sliding_layers_are_honoured_and_cached():
    """Qwen2 with sliding-window layers: those layers get the window as the kwarg (respected by default), and
    generate() still equals SDPA at full budget (the sliding cache layers become Sparse-X layers)."""
    kw = dict(use_sliding_window=True, sliding_window=48, max_window_layers=1)
    dense, sparse = model_pair("qwen2", **kw)
    assert dense.config.layer_types == ["full_attention", "sliding_attention"]
    ids, mask = left_padded(length=120)
    with torch.no_grad():
        a, b = dense(ids, attention_mask=mask).logits, sparse(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-4
    gkw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(ids, **gkw), sparse.generate(ids, **gkw))


@pytest.mark.parametrize("model_type", NEW)
def test_evaluation_methods_and_fidelity_run(model_type):
    model = tiny_model(model_type, "sparsex")
    small = sparsex_hf.SparseXConfig(**SPARSE_SMALL, backend="torch")
    assert use_method(model, "window", small, 512).topk == 0 and model.config._attn_implementation == "sparsex"
    assert use_method(model, "sdpa", small, 512) is None and model.config._attn_implementation == "sdpa"
    f = fidelity(model, [torch.randint(3, 250, (1, 300))], small)
    assert len(f["per_layer"]) == 2 and 0 < f["mass_recall"] <= f["oracle_recall"] + 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("model_type", NEW)
def test_a_recipe_step_runs(tmp_path, model_type):
    base = tmp_path / "base"
    tiny_model(model_type, "sdpa", max_position_embeddings=128).save_pretrained(base)
    data = tmp_path / "data.jsonl"
    g = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"input_ids": torch.randint(3, 250, (70,), generator=g).tolist()}) + "\n"
                            for _ in range(10)))
    out = tmp_path / "run"
    res = finetune.train(finetune.build_parser().parse_args(
        ["--model", str(base), "--data", str(data), "--target-length", "256", "--output-dir", str(out),
         "--max-steps", "2", "--bf16", "no", "--no-progress", "--block-size", "16", "--sink-tokens", "16",
         "--window", "32", "--stride", "16", "--topk", "2"]))
    assert res["last"]["step"] == 2 and res["final"]["eval_loss"] > 0
    adapter = json.load(open(out / "adapter_config.json"))
    want = {"qkv_proj", "o_proj"} if model_type == "phi3" else {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(adapter["target_modules"]) == want

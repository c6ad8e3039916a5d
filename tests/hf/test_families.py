"""Every supported model family, on tiny random configs: the same checks Llama and Mistral get elsewhere."""

import json

import pytest
import torch
from utils import SPARSE_SMALL, model_pair, tiny_model

import sparsex_hf
from sparsex_hf import CACHE_KWARG, SUPPORTED_MODEL_TYPES, apply_sparsex, revert_sparsex
from sparsex_hf.apps import finetune
from sparsex_hf.apps.eval import fidelity, use_method
from sparsex_hf.patches import attention_class, model_class

NEW = ["qwen2", "qwen3", "phi3"]


def _left_padded(batch=2, length=150, pad=23, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def test_the_table_lists_the_families():
    assert set(NEW) | {"llama", "mistral"} == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", NEW)
def test_full_budget_equals_sdpa_logits_and_greedy_tokens_left_padded(model_type):
    dense, sparse = model_pair(model_type)
    ids, mask = _left_padded()
    with torch.no_grad():
        a, b = dense(ids, attention_mask=mask).logits, sparse(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-4
    kw = dict(attention_mask=mask[:, :60], max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(ids[:, :60], **kw), sparse.generate(ids[:, :60], **kw))


@pytest.mark.parametrize("model_type", NEW)
def test_sparse_decode_equals_one_pass_with_per_query_selection(model_type):
    _, sparse = model_pair(model_type)
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, select_tile=1)
    ids = torch.randint(3, 256, (1, 520))
    n = 510
    with torch.no_grad():
        full = sparse(ids).logits
        dense_cmp = model_pair(model_type)[0](ids).logits
        out = sparse(ids[:, :n], use_cache=True)
        cache = out.past_key_values
        steps = []
        for t in range(n, ids.shape[1]):
            out = sparse(ids[:, t : t + 1], **{CACHE_KWARG: cache}, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert (full - dense_cmp).abs().max() > 1e-3  # the budget is sparse
    torch.testing.assert_close(torch.stack(steps, 1), full[:, n:], atol=1e-4, rtol=1e-4)
    assert type(cache.layers[0]).__name__ == "SparseXLayer"


@pytest.mark.parametrize("model_type", NEW)
def test_padded_batch_equals_each_row_alone(model_type):
    _, sparse = model_pair(model_type)
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL)
    gen = torch.Generator().manual_seed(5)
    long, short = torch.randint(3, 256, (1, 360), generator=gen), torch.randint(3, 256, (1, 290), generator=gen)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 70, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :70] = 0
    with torch.no_grad():
        batched = sparse(ids, attention_mask=mask).logits
        torch.testing.assert_close(batched[0], sparse(long).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1, 70:], sparse(short).logits[0], atol=1e-5, rtol=1e-5)


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
    ids, mask = _left_padded(length=120)
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

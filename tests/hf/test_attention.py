"""attn_implementation="sparsex" inside tiny random Llama and Mistral models."""

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from utils import SPARSE_SMALL, brute_force, left_padded, model_pair, tiny_config, tiny_model

import sparsex_hf
from sparsex_hf import SparseXConfig
from sparsex_hf.hf import CACHE_KWARG
from sparsex_hf.hf import attention as attention_mod

MODEL_TYPES = ["llama", "mistral"]
ALL_TYPES = list(sparsex_hf.SUPPORTED_MODEL_TYPES)  # the checks every supported family gets


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_full_budget_logits_match_sdpa(model_type):
    dense, sparse = model_pair(model_type)
    ids, mask = left_padded()
    with torch.no_grad():
        a = dense(ids, attention_mask=mask).logits
        b = sparse(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a - b)[real].abs().max() <= 1e-4


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_generate_matches_sdpa_left_padded(model_type):
    dense, sparse = model_pair(model_type)
    ids, mask = left_padded(length=60, pad=11)
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(ids, **kw), sparse.generate(ids, **kw))


class _Recorder:
    """Wraps the library's attention call to keep layer 0's inputs and output."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, q, k, v, cfg, **kw):
        out = self.fn(q, k, v, cfg, **kw)
        if kw.get("layer_idx") == 0:
            self.calls.append((q.detach(), k.detach(), v.detach(), cfg, kw, out.detach()))
        return out


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sparse_budget_is_real_and_matches_reference(model_type, monkeypatch):
    dense, sparse = model_pair(model_type)
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL)
    ids = torch.randint(3, 256, (1, 1500))
    rec = _Recorder(sparsex_hf.sparsex_attention)
    with torch.no_grad(), attention_mod.override_attention_op(rec):
        a = dense(ids).logits
        b = sparse(ids).logits
    assert (a - b).abs().max() > 1e-2  # the sparsity is real
    (q, k, v, cfg, kw, out), = rec.calls
    assert cfg == SparseXConfig(**SPARSE_SMALL)
    last = ids.shape[1] % cfg.select_tile or cfg.select_tile  # the last selection tile, whole (bottom-right aligned)
    want = brute_force(q[:, :, -last:], k, v, cfg, scale=kw["scale"], sliding_window=kw["sliding_window"])
    torch.testing.assert_close(out[:, :, -last:].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_positions_count_from_first_real_token(model_type):
    _, sparse = model_pair(model_type)
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL)
    gen = torch.Generator().manual_seed(1)
    doc_a = torch.randint(3, 256, (1, 400), generator=gen)
    doc_b = torch.randint(3, 256, (1, 300), generator=gen)
    with torch.no_grad():
        alone_a = sparse(doc_a).logits
        alone_b = sparse(doc_b).logits
        # doc_b left-padded inside a batch with doc_a
        ids = torch.cat([doc_a, torch.cat([torch.zeros(1, 100, dtype=torch.long), doc_b], 1)])
        mask = torch.ones_like(ids)
        mask[1, :100] = 0
        # RoPE positions from the mask, as generate() makes them (min/max block summaries of rotated
        # keys are not shift-invariant, so the caller's positions must start at the first real token too)
        batched = sparse(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        # packed: both documents in one row, positions restart at the boundary
        packed_ids = torch.cat([doc_a, doc_b], 1)
        pos = torch.cat([torch.arange(400), torch.arange(300)])[None]
        packed = sparse(packed_ids, position_ids=pos).logits
        cu = torch.tensor([0, 400, 700], dtype=torch.int32)
        packed_cu = sparse(
            packed_ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=400, max_length_k=400
        ).logits
        # the same row again with other boundaries in a reused position tensor (edited in place), then in
        # inference mode: the boundaries are never stale
        pos[0, 400:] = torch.arange(400, 700)
        one_doc = sparse(packed_ids, position_ids=pos).logits
        pos[0, 400:] = torch.arange(300)
    with torch.inference_mode():
        packed_inf = sparse(packed_ids, position_ids=torch.cat([torch.arange(400), torch.arange(300)])[None]).logits
    torch.testing.assert_close(one_doc, sparse(packed_ids).logits.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[0], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, 100:], alone_b[0], atol=1e-5, rtol=1e-5)
    for p in (packed, packed_cu, packed_inf):
        torch.testing.assert_close(p[0, :400], alone_a[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p[0, 400:], alone_b[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_left_padded_batch_without_positions_equals_each_row_alone(model_type):
    """A plain forward (no position_ids) and generate() of a left-padded batch give each row what it gets alone:
    the positions count from each row's first real token, as generate() makes them."""
    _, sparse = model_pair(model_type)
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL)
    gen = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, 256, (1, 400), generator=gen), torch.randint(3, 256, (1, 310), generator=gen)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 90, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :90] = 0
    with torch.no_grad():
        batched = sparse(ids, attention_mask=mask).logits
        alone_long, alone_short = sparse(long).logits, sparse(short).logits
    torch.testing.assert_close(batched[0], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, 90:], alone_short[0], atol=1e-5, rtol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = sparse.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out[1, 90:], sparse.generate(short, **kw)[0])


def test_config_is_read_at_each_forward():
    _, sparse = model_pair("llama")
    ids = torch.randint(3, 256, (1, 700))
    with torch.no_grad():
        full = sparse(ids).logits
        sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL)
        small = sparse(ids).logits
        sparse.config.sparsex = dict(SPARSE_SMALL, dense_layers=[0, 1])
        dense_layers = sparse(ids).logits
    assert (full - small).abs().max() > 1e-2
    torch.testing.assert_close(dense_layers, full, atol=1e-5, rtol=1e-5)


def test_dense_below_falls_back_and_logs_once(caplog):
    dense, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, dense_below=1000)
    ids = torch.randint(3, 256, (1, 700))
    integration_logger = logging.getLogger("sparsex_hf")
    from sparsex_hf.ops.attention import dense as ops_attention

    ops_attention._logged.clear()
    with caplog.at_level(logging.INFO, logger=integration_logger.name), torch.no_grad():
        a = dense(ids).logits
        b = sparse(ids).logits
        sparse(ids)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert sum("dense_below=1000" in r.getMessage() for r in caplog.records) == 1


def test_mistral_sliding_window_is_respected():
    dense, sparse = model_pair("mistral", sliding_window=100)
    ids = torch.randint(3, 256, (1, 300))
    with torch.no_grad():
        a = dense(ids).logits
        b = sparse(ids).logits
        sparsex_hf.set_sparsex_config(sparse, respect_sliding_window=False)
        c = sparse(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - c).abs().max() > 1e-3  # reaching past the window changes the result


def test_save_load_keeps_config_and_switching_implementations(tmp_path, load_hooks):
    import json

    dense, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, window=48, topk=2, block_size=16, sink_tokens=8, stride=0, backend="torch")
    sparse.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    saved = json.loads((tmp_path / "config.json").read_text())["sparsex"]
    assert saved["window"] == 48 and "backend" not in saved  # how it ran here is not part of the checkpoint
    assert sparsex_hf.get_sparsex_config(sparse).backend == "torch"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparsex")
    assert sparsex_hf.get_sparsex_config(loaded) == sparsex_hf.get_sparsex_config(sparse).replace(backend="auto")
    assert loaded.config._attn_implementation == "sparsex"
    override = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparsex", sparsex={"window": 32})
    assert sparsex_hf.get_sparsex_config(override) == sparsex_hf.get_sparsex_config(loaded).replace(window=32)
    ids = torch.randint(3, 256, (1, 200))
    with torch.no_grad():
        s1 = loaded(ids).logits
        loaded.set_attn_implementation("sdpa")
        d = loaded(ids).logits
        loaded.set_attn_implementation("sparsex")
        s2 = loaded(ids).logits
        ref = dense(ids).logits
    torch.testing.assert_close(d, ref)
    assert (s1 - d).abs().max() > 1e-3
    torch.testing.assert_close(s1, s2)


def test_from_pretrained_helper_sets_config_on_a_plain_checkpoint(tmp_path):
    dense, _ = model_pair("mistral")
    dense.save_pretrained(tmp_path)
    model = sparsex_hf.from_pretrained(tmp_path, sparsex={"window": 99, "topk": 1})
    assert model.config._attn_implementation == "sparsex"
    cfg = sparsex_hf.get_sparsex_config(model)
    assert (cfg.window, cfg.topk, cfg.stride) == (99, 1, SparseXConfig().stride)
    with pytest.raises(ValueError, match="window"):
        sparsex_hf.from_pretrained(tmp_path, sparsex={"window": -5})


def test_unsupported_model_type_is_refused(tmp_path, load_hooks):
    from transformers import AutoModelForCausalLM, Gemma2Config

    # Gemma 2 soft-caps its attention logits, which Sparse-X does not express: out of the table
    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=128)
    supported = r"supported model types are \['llama', 'mistral', 'phi3', 'qwen2', 'qwen3'\]"
    with pytest.raises(ValueError, match=supported):  # at once, not at the first forward
        AutoModelForCausalLM.from_config(cfg, attn_implementation="sparsex")
    with pytest.raises(ValueError, match=supported):
        AutoModelForCausalLM.from_config(cfg, attn_implementation="sparsex", sparsex={"window": 64})
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gemma2"):
        sparsex_hf.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gemma2"):  # at load
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparsex")


def test_without_the_loader_hooks_an_unsupported_model_fails_at_its_first_forward():
    """Plain Transformers (no opt-in hooks) builds a model of a type Sparse-X does not support with
    ``attn_implementation="sparsex"``; its first forward refuses it, naming the supported types."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=128)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sparsex")
    with pytest.raises(ValueError, match=r"supported model types are \['llama', 'mistral', 'phi3', 'qwen2', 'qwen3'\]"):
        model(torch.randint(3, 128, (1, 10)))


def test_transformers_loaders_merge_sparsex_over_the_stored_config(tmp_path, load_hooks):
    """With the opt-in loader hooks, ``from_pretrained(..., attn_implementation="sparsex", sparsex={...})`` on the
    auto and the model classes: the fields given replace the stored ones, the others stay; bad values and a missing
    ``"sparsex"`` attention are refused; ``from_config`` takes ``sparsex=`` too; the classes are wrapped at load."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sparsex", sparsex={"window": 99})
    assert sparsex_hf.get_sparsex_config(model).window == 99
    sparsex_hf.set_sparsex_config(model, window=128, topk=3)
    model.save_pretrained(tmp_path)
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):
        loaded = cls.from_pretrained(tmp_path, attn_implementation="sparsex", sparsex={"topk": 5})
        cfg = sparsex_hf.get_sparsex_config(loaded)
        assert (cfg.window, cfg.topk) == (128, 5) and loaded.config.sparsex["window"] == 128
        assert loaded.generation_config.prefill_chunk_size == cfg.prefill_chunk
    with pytest.raises(ValueError, match="topk=-1 is invalid"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparsex", sparsex={"topk": -1})
    with pytest.raises(ValueError, match="load with attn_implementation='sparsex'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa", sparsex={"topk": 1})
    with pytest.raises(TypeError, match="a SparseXConfig, a dict of its fields or a preset.s name, got list"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparsex", sparsex=[1])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # without Sparse-X: untouched
    assert plain.config._attn_implementation != "sparsex" and plain.config.sparsex["window"] == 128


def test_attention_dropout_and_4d_masks_are_refused():
    _, sparse = model_pair("llama", attention_dropout=0.1)
    sparse.train()
    with pytest.raises(ValueError, match="dropout"):
        sparse(torch.randint(3, 256, (1, 8)))
    module = sparse.model.layers[0].self_attn
    q = torch.zeros(1, 4, 8, 16)
    k = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="2-D padding mask"):
        attention_mod.sparsex_attention_forward(module, q, k, k, torch.zeros(1, 1, 8, 8))


def test_training_step_with_gradient_checkpointing():
    dense, sparse = model_pair("llama")
    for m in (dense, sparse):
        m.train()
        # 5.24 renamed it; 5.17 has only the old name
        (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    ids = torch.randint(3, 256, (2, 96))
    grads = []
    for m in (dense, sparse):
        loss = m(ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.op = t.numel(), func
        return out


def test_no_quadratic_tensor_at_8k(monkeypatch):
    """No op in a Sparse-X forward at T = 8192 (padding included) makes a tensor anywhere near T^2."""
    from sparsex_hf.ops.attention.reference import naive

    t = 8192
    monkeypatch.setattr(naive, "TILE_ELEMENTS", 1 << 20)
    dense, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, window=1024, stride=256, topk=4, block_size=64, sink_tokens=64)
    ids = torch.randint(3, 256, (1, t))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    limit = 1 << 21  # 2M elements; T^2 = 67M
    with torch.no_grad():
        with _MaxNumel() as probe:
            sparse(ids, attention_mask=mask, logits_to_keep=1)
        assert probe.max_numel <= limit, (probe.max_numel, probe.op)
        with _MaxNumel() as control:  # the instrument does catch a quadratic mask
            dense(ids, attention_mask=mask, logits_to_keep=1)
        assert control.max_numel >= t * t


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_budget_logits_match_sdpa_on_gpu(model_type):
    dense, sparse = model_pair(model_type)
    dense, sparse = dense.cuda(), sparse.cuda()
    ids, mask = left_padded(length=300, pad=41)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        a = dense(ids, attention_mask=mask).logits
        b = sparse(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-4
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(ids, **kw), sparse.generate(ids, **kw))


@pytest.mark.gpu
def test_torch_compile_model_on_gpu():
    dense, sparse = model_pair("llama", head_dim=32)
    dense, sparse = dense.cuda(), sparse.cuda()
    sparsex_hf.set_sparsex_config(sparse, window=256, stride=64, topk=2, block_size=32, sink_tokens=32)
    ids = torch.randint(3, 256, (1, 1024), device="cuda")
    with torch.no_grad():
        eager = sparse(ids).logits
        compiled = torch.compile(sparse)(ids).logits
        full = dense(ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert (eager - full).abs().max() > 1e-3  # the Triton path really is sparse here


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_cached_decode_steps_equal_the_full_forward_with_per_query_selection(model_type):
    _, sparse = model_pair(model_type)
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, select_tile=1, anchor=False)  # (docs/spec.md, "Decoding")
    ids = torch.randint(3, 256, (1, 700))
    n = 690
    with torch.no_grad():
        full = sparse(ids).logits
        out = sparse(ids[:, :n], use_cache=True)
        cache = out.past_key_values
        steps = []
        for t in range(n, ids.shape[1]):
            out = sparse(ids[:, t : t + 1], **{CACHE_KWARG: cache}, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, n:], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert (full - model_pair(model_type)[0](ids).logits).abs().max() > 1e-3  # the budget is sparse
    assert type(cache.layers[0]).__name__ == "SparseXLayer"


def test_set_sparsex_config_refuses_an_unsupported_model_type():
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=128)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="supported model types"):
        sparsex_hf.set_sparsex_config(model, window=64)
    assert not hasattr(model.config, "sparsex")


def test_parsed_config_sees_in_place_edits_of_the_stored_dict():
    model = tiny_model("llama", "sparsex")
    sparsex_hf.set_sparsex_config(model, dense_layers=[])
    assert sparsex_hf.get_sparsex_config(model).dense_layers == ()
    model.config.sparsex["dense_layers"].append(1)  # in place, a list inside the stored dict
    assert sparsex_hf.get_sparsex_config(model).dense_layers == (1,)
    model.config.sparsex["window"] = 77
    assert sparsex_hf.get_sparsex_config(model).window == 77

"""The Sparse-X KV cache inside generate(): decode path, chunked prefill, crop, beam search, class wrapping,
the layer's block summaries."""

import subprocess
import sys

import pytest
import torch
from utils import SPARSE_SMALL, model_pair, padded_prompts, random_qkv, tiny_model

import sparsex_hf
from sparsex_hf import SparseXCache, apply_sparsex, revert_sparsex
from sparsex_hf.hf import CACHE_KWARG, SparseXLayer
from sparsex_hf.hf import attention as attention_mod
from sparsex_hf.ops.attention.rules.common import block_summaries
from sparsex_hf.patches import attention_class

MODEL_TYPES = ["llama", "mistral"]



def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture
def count_decode(monkeypatch):
    calls = []
    real = attention_mod.sparsex_decode_attention

    def spy(q, *a, **kw):
        calls.append(q.shape[2])
        return real(q, *a, **kw)

    monkeypatch.setattr(attention_mod, "sparsex_decode_attention", spy)
    return calls


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_budget_generate_equals_sdpa_through_the_decode_path(model_type, count_decode):
    dense, sparse = model_pair(model_type)
    ids, mask = padded_prompts()
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    a, b = dense.generate(ids, **kw), sparse.generate(ids, **kw)
    assert torch.equal(a, b)
    assert len(count_decode) == 39 * 2 and set(count_decode) == {1}  # every step, both layers


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sparse_decode_steps_equal_the_reference_on_the_whole_sequence(model_type, count_decode):
    _, sparse = model_pair(model_type)
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, select_tile=1, anchor=False)  # (docs/spec.md, "Decoding")
    ids, mask = padded_prompts()
    out = sparse.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    assert count_decode
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(2, 40, dtype=mask.dtype)], 1)
    with torch.no_grad():
        # no cache: the reference path on the whole sequence (positions as generate() gives them)
        full = sparse(seq, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
    steps = torch.stack(out.logits, 1)
    torch.testing.assert_close(steps, full[:, 299:-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", sparsex_hf.SUPPORTED_MODEL_TYPES)
def test_chunked_prefill_equals_one_pass(model_type):
    _, sparse = model_pair(model_type)
    # select_tile 64: chunks are multiples of 64; without the anchor (each call's end is anchored: docs/spec.md)
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, anchor=False)
    ids = torch.randint(3, 256, (1, 700))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    one = sparse.generate(ids, **kw)
    chunked = sparse.generate(ids, prefill_chunk_size=128, **kw)
    assert torch.equal(one.sequences, chunked.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(one.logits), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_keeps_the_prompt_ends_anchor():
    """With the anchor (the default), each chunk's end is anchored, and the cache keeps the last chunk's: the
    prompt's end, as a one-pass prefill keeps (same inputs to the layer: the first layer)."""
    _, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL)
    ids = torch.randint(3, 256, (1, 700))
    anchors = []
    for chunk in (None, 128):
        cache = SparseXCache(sparse.config)
        sparse.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, prefill_chunk_size=chunk,
                        **{CACHE_KWARG: cache})
        anchors.append(cache.layers[0].anchor)
    assert anchors[0] is not None and (anchors[0] >= 0).any()
    assert torch.equal(anchors[0], anchors[1])


BACKENDS = ["torch", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton backend: a GPU, or the CPU's interpreter


def _pair_on(backend):
    """The sdpa and sparsex llama pair with the default selection on ``backend``, on the device it runs on."""
    dense, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, backend=backend)
    return dense.to(DEVICE), sparse.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_from_a_prompt_shorter_than_a_block(backend, count_decode):
    """The default selection (two stages, the prompt anchor) from a prompt of fewer tokens than a block, with a
    batch mixing it with a longer row: no block is complete at first, the anchor lists nothing, blocks complete as
    tokens come; within the budget the tokens are dense attention's."""
    dense, sparse = _pair_on(backend)
    for ids, mask in ((torch.randint(3, 256, (1, 5)), None), padded_prompts(length=30, pads=(25, 0))):
        ids, mask = ids.to(DEVICE), None if mask is None else mask.to(DEVICE)
        kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
        assert torch.equal(dense.generate(ids, **kw), sparse.generate(ids, **kw))  # at most 70 < sink + window tokens
    assert count_decode


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_of_short_and_long_rows_equals_each_row_alone(backend):
    """The default selection in a left-padded batch of a long row and a row shorter than a block: each row's tokens
    and step logits are what it gets alone (positions, blocks and the prompt anchor count from its first token)."""
    _, sparse = _pair_on(backend)
    ids, mask = (x.to(DEVICE) for x in padded_prompts(length=300, pads=(0, 290), seed=3))
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    both = sparse.generate(ids, attention_mask=mask, **kw)
    for row, pad in ((0, 0), (1, 290)):
        alone = sparse.generate(ids[row : row + 1, pad:], **kw)
        assert torch.equal(both.sequences[row, 300:], alone.sequences[0, 300 - pad :])
        torch.testing.assert_close(torch.stack(both.logits)[:, row], torch.stack(alone.logits)[:, 0], atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_token_decode_steps_equal_single_token_steps(backend, count_decode):
    """Decode steps of several tokens (speculative decoding's verification) select per query, with the prompt anchor:
    the same logits as one token per step, on both backends."""
    _, sparse = _pair_on(backend)
    ids = torch.randint(3, 256, (1, 312)).to(DEVICE)
    logits = []
    for step in (1, 4):
        cache = SparseXCache(sparse.config)
        with torch.no_grad():
            sparse(ids[:, :300], **{CACHE_KWARG: cache}, use_cache=True)
            logits.append(torch.cat([sparse(ids[:, t : t + step], **{CACHE_KWARG: cache}, use_cache=True).logits
                                     for t in range(300, 312, step)], 1))
        assert cache.layers[0].anchor is not None and (cache.layers[0].anchor >= 0).any()
    assert set(count_decode) == {1, 4}
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_crop_then_continue_equals_the_whole_sequence():
    _, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, select_tile=1, anchor=False)
    ids = torch.randint(3, 256, (1, 400))
    cache = SparseXCache(sparse.config)
    with torch.no_grad():
        sparse(ids[:, :380], **{CACHE_KWARG: cache}, use_cache=True)
        cache.crop(-30)  # drop 30 tokens, then feed different ones
        alt = torch.randint(3, 256, (1, 50))
        steps = []
        for t in range(50):
            steps.append(sparse(alt[:, t : t + 1], **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1])
        full = sparse(torch.cat([ids[:, :350], alt], 1)).logits[:, 350:]
    assert all(isinstance(layer, SparseXLayer) for layer in cache.layers)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_beam_search_matches_sdpa_at_full_budget_and_runs_sparse():
    dense, sparse = model_pair("llama")
    ids, mask = padded_prompts(length=200, pads=(0, 21))
    kw = dict(attention_mask=mask, max_new_tokens=20, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(ids, **kw), sparse.generate(ids, **kw))
    # sparse budget: beams reorder the cache every step; the result must equal decoding each final beam again
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, select_tile=1)
    out = sparse.generate(ids, **kw, output_scores=True, return_dict_in_generate=True, num_return_sequences=3)
    seq = out.sequences
    full_mask = torch.cat([mask.repeat_interleave(3, 0), (seq[:, 200:] != -1).long()], 1)
    with torch.no_grad():
        full = sparse(seq, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
        full = torch.log_softmax(full.float(), -1)
    chosen = full[:, 199:-1].gather(-1, seq[:, 200:, None])[..., 0].sum(-1)
    torch.testing.assert_close(chosen / 20, out.sequences_scores, atol=1e-3, rtol=1e-3)


def test_explicit_offloaded_cache_gives_the_same_tokens():
    _, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, select_tile=1)
    ids, mask = padded_prompts()
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    a = sparse.generate(ids, **kw)
    cache = SparseXCache(sparse.config, offload=True)
    b = sparse.generate(ids, **{CACHE_KWARG: cache}, **kw)
    assert torch.equal(a, b)
    assert all(layer.offload_kv and layer.keys.device.type == "cpu" for layer in cache.layers)


def test_apply_and_revert_on_classes_restore_the_functions():
    apply_sparsex("llama")  # wrapped (as the first "sparsex" forward would do)
    cls = attention_class("llama")
    wrapped = cls.forward
    original = wrapped.__sparsex_original__
    revert_sparsex("llama")
    assert cls.forward is original
    apply_sparsex("llama", window=128)
    try:
        assert cls.forward.__sparsex_original__ is original
        model = tiny_model("llama", "sparsex")
        assert sparsex_hf.get_sparsex_config(model).window == 128  # the type default
    finally:
        revert_sparsex("llama")
        assert cls.forward is original
        apply_sparsex("llama")  # wrapped again, as the package keeps it


def test_apply_and_revert_on_an_instance():
    model = tiny_model("mistral", "sdpa")
    chunk_before = model.generation_config.prefill_chunk_size
    apply_sparsex(model, window=256, prefill_chunk=1024)
    assert model.config._attn_implementation == "sparsex"
    assert sparsex_hf.get_sparsex_config(model).window == 256
    assert model.generation_config.prefill_chunk_size == 1024
    ids = torch.randint(3, 256, (1, 50))
    model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    revert_sparsex(model)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "sparsex")
    assert model.generation_config.prefill_chunk_size == chunk_before


def test_classes_unwrapped_by_hand_are_wrapped_again_at_the_next_sparsex_forward():
    from sparsex_hf.hf.wrap import is_wrapped, unwrap_class

    unwrap_class("mistral", keep_auto=True)
    assert not is_wrapped("mistral")
    model = tiny_model("mistral", "sparsex")
    model(torch.randint(3, 256, (1, 20)))
    assert is_wrapped("mistral")


@pytest.mark.slow
def test_a_model_loaded_by_plain_transformers_is_wrapped_at_its_first_forward():
    """``import sparsex_hf`` wraps nothing (tests/test_repo.py checks the import); a model loaded by plain
    Transformers with ``attn_implementation="sparsex"`` gets its classes wrapped at its first forward, before its
    layers run, so that its first decode step already reads the summaries."""
    code = ("import sys, torch, sparsex_hf\n"
            "from transformers import AutoModelForCausalLM, LlamaConfig\n"
            "from transformers.models.llama import modeling_llama as m\n"
            "print(hasattr(m.LlamaAttention.forward, '__sparsex_original__'))\n"
            "cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,\n"
            "                  num_key_value_heads=1, vocab_size=64)\n"
            "model = AutoModelForCausalLM.from_config(cfg, attn_implementation='sparsex')\n"
            "print(hasattr(m.LlamaAttention.forward, '__sparsex_original__'))\n"
            "model.generate(torch.randint(3, 64, (1, 12)), max_new_tokens=2, do_sample=False, pad_token_id=0)\n"
            "print(hasattr(m.LlamaAttention.forward, '__sparsex_original__'), "
            "hasattr(m.LlamaModel.forward, '__sparsex_original__'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert [x.strip() for x in out[:3]] == ["False", "False", "True True"], out


def test_apply_refuses_other_model_types():
    with pytest.raises(ValueError, match="supported model types are \\['llama', 'mistral', 'phi3', 'qwen2', 'qwen3'\\]"):
        apply_sparsex("gpt2")


def test_gradient_checkpointing_after_patching():
    model = tiny_model("llama", "sparsex")
    apply_sparsex(model, **SPARSE_SMALL)
    model.train()
    # 5.24 renamed it; 5.17 has only the old name
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    ids = torch.randint(3, 256, (1, 200))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- the layer's block summaries


def _layer_of(t=150, pads=(5, 40), b=2, dtype=torch.float32):
    _, k, v = random_qkv(b, 4, 2, t, t, 32, dtype=dtype, seed=0)
    mask = torch.ones(b, t, dtype=torch.bool)
    for i, p in enumerate(pads[:b]):
        mask[i, :p] = False
    layer = SparseXLayer()
    assert layer.record_offsets(mask if any(pads) else None, t, b)
    return layer, k, v


def _check_summaries(layer, bs):
    kmin, kmax, kmean = layer.summaries(bs)
    for b, off in enumerate(layer.offsets):
        keys = layer.keys[b, :, off:]
        ref = block_summaries(keys.float(), bs)
        nb = ref[0].shape[1]
        assert layer.counts[b] == nb
        torch.testing.assert_close(kmin[b, :, :nb].float(), ref[0])
        torch.testing.assert_close(kmax[b, :, :nb].float(), ref[1])
        torch.testing.assert_close(kmean[b, :, :nb].float(), ref[2], atol=1e-6, rtol=1e-5)


def test_summaries_stay_consistent_under_growth_crop_reorder_select_repeat():
    layer, k, v = _layer_of()
    layer.update(k[:, :, :100], v[:, :, :100])
    _check_summaries(layer, 16)
    for t in range(100, 150):  # one token at a time: a block completes now and then
        layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        _check_summaries(layer, 16)
    layer.crop(-30)
    assert layer.get_seq_length() == 120
    _check_summaries(layer, 16)
    layer.update(k[:, :, 120:140].flip(2), v[:, :, 120:140])  # different keys where the cropped ones were
    _check_summaries(layer, 16)
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.offsets == [40, 5]
    _check_summaries(layer, 16)
    layer.batch_repeat_interleave(2)
    assert layer.offsets == [40, 40, 5, 5]
    _check_summaries(layer, 16)
    layer.batch_select_indices(torch.tensor([1, 2]))
    assert layer.offsets == [40, 5]
    _check_summaries(layer, 16)
    _check_summaries(layer, 32)  # another block size: summarised from scratch


def test_summaries_are_at_most_a_32nd_of_the_cache():
    layer, k, v = _layer_of(t=4096, pads=(0,), b=1, dtype=torch.bfloat16)
    layer.update(k, v)
    layer.summaries(64)
    kv = layer.keys.numel() * 2 * 2
    assert layer.summary_bytes() <= kv / 32


def test_buffers_grow_by_a_quarter_so_a_long_prefill_does_not_double_on_decode():
    layer = SparseXLayer()
    layer.record_offsets(None, 4096, 1)
    layer.update(torch.zeros(1, 2, 4096, 8), torch.zeros(1, 2, 4096, 8))
    assert layer._kbuf.shape[-2] == 4096  # exactly the prefill
    layer.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))  # the first decode step
    assert layer._kbuf.shape[-2] == 4096 + 1024 and layer.keys.shape[-2] == 4097
    assert layer.keys[..., :4096, :].eq(0).all() and layer.keys[..., 4096, :].eq(1).all()  # copied, then appended
    for _ in range(1023):
        layer.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))
    assert layer._kbuf.shape[-2] == 5120  # no reallocation inside the capacity


def test_offloaded_layer_decodes_like_a_resident_one():
    cfg = sparsex_hf.SparseXConfig(**SPARSE_SMALL)
    q, k, v = random_qkv(2, 4, 2, 260, 260, 32, dtype=torch.float32, seed=2)
    mask = torch.ones(2, 260, dtype=torch.bool)
    mask[1, :37] = False
    outs = []
    for offload in (False, True):
        layer = SparseXLayer(offload=offload)
        layer.record_offsets(mask, 260, 2)
        layer.update(k, v)
        outs.append(sparsex_hf.sparsex_decode_attention(
            q[:, :, -1:], layer.keys, layer.values, layer.summaries(16), layer.offsets_tensor("cpu", torch.int32),
            layer.get_seq_length(), cfg, max_doc_len=layer.max_doc_len(), backend="torch"))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_anchor_is_kept_by_the_cache_and_follows_the_rows(count_decode):
    """``anchor``: the prefill leaves each layer the blocks of every row's last tile; decode steps read them; a
    padded batch equals each row alone, in either order, and beam search (the cache reordered every step) runs."""
    _, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, rerank=1, anchor=True)
    ids, mask = padded_prompts(length=300, pads=(0, 37))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = SparseXCache(sparse.config)
    out = sparse.generate(ids, attention_mask=mask, **{CACHE_KWARG: cache}, **kw).sequences
    assert count_decode
    for layer in cache.layers:
        assert layer.anchor is not None and layer.anchor.shape == (2, 2, SPARSE_SMALL["topk"])
        # both rows' last tile starts at position 256: eligible blocks start at or below 256 - window
        assert (layer.anchor >= 0).all() and (layer.anchor <= (256 - 64) // 16).all()
    rows = [sparse.generate(ids[i : i + 1, p:], **kw).sequences for i, p in enumerate((0, 37))]
    assert torch.equal(out[0], rows[0][0]) and torch.equal(out[1, 37:], rows[1][0])
    swapped = sparse.generate(ids.flip(0), attention_mask=mask.flip(0), **kw).sequences
    assert torch.equal(swapped.flip(0), out)
    beams = sparse.generate(ids, attention_mask=mask, num_beams=3, **kw).sequences
    assert beams.shape == (2, 312)


def _split_map(n_layers: int, first: str | int, rest: str) -> dict:
    """Embedding and the first half of the layers on ``first``, the rest (and the head) on ``rest``."""
    out = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": rest, "lm_head": rest}
    out.update({f"model.layers.{i}": first if i < n_layers // 2 else rest for i in range(n_layers)})
    return out


@pytest.mark.parametrize("split", ["cpu+disk", pytest.param("cuda+cpu", marks=pytest.mark.gpu)])
def test_generate_with_layers_placed_by_device_map(tmp_path, split):
    """``from_pretrained(..., device_map=...)``: Accelerate places the layers (``cpu+disk``: half of them offloaded
    to disk, run on the CPU; ``cuda+cpu``: half on the GPU, half offloaded to the CPU and run on the GPU). Sparse-X
    attends through its cache on each layer's device, summaries included, and generates what the same model on one
    device generates."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if split == "cuda+cpu" else "cpu"
    model = tiny_model("llama", "sparsex", num_hidden_layers=4, head_dim=32, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "m")
    first, rest = (0, "cpu") if split == "cuda+cpu" else ("cpu", "disk")
    placed = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="sparsex", dtype=torch.float32,
                                                  device_map=_split_map(4, first, rest), offload_folder=str(tmp_path / "off"))
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="sparsex", dtype=torch.float32).to(device)
    for m in (placed, whole):
        sparsex_hf.set_sparsex_config(m, **SPARSE_SMALL)
    assert {str(p.device) for n, p in placed.named_parameters() if ".layers.3." in n} == {"meta"}  # offloaded
    ids = torch.randint(3, 256, (1, 700), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        a, b = placed.generate(ids, **kw), whole.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    cache = getattr(a, "cache", None) or a.past_key_values  # renamed in Transformers 5.2x
    assert cache.get_seq_length() == 700 + 11 and all(isinstance(x, SparseXLayer) for x in cache.layers)
    for layer in cache.layers:  # keys, values and block summaries where the layer ran
        assert layer.keys.device.type == device and layer.values.device.type == device
        assert all(t.device.type == device for t in layer.summaries(SPARSE_SMALL["block_size"]))


def test_the_cpu_reference_never_consults_the_gpu_cost_model(monkeypatch):
    """On the torch backend a decode step is Sparse-X's (or SDPA's where the window covers the row), never handed
    to dense attention by the GPU cost model."""
    from sparsex_hf.ops.attention.rules import cost

    monkeypatch.setattr("sparsex_hf.ops.attention.dense.DENSE_HANDOFF", True)
    asked = []
    monkeypatch.setattr(cost, "decode_dense_is_faster", lambda *a: asked.append(a) or True)
    monkeypatch.setattr(cost, "dense_is_faster", lambda *a: asked.append(a) or True)
    _, sparse = model_pair("llama")
    sparsex_hf.set_sparsex_config(sparse, **SPARSE_SMALL, backend="torch")
    sparse.generate(torch.randint(3, 256, (1, 200)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert not asked

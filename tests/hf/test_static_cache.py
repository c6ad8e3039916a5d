"""The Sparse-X static cache: the same tokens as the dynamic cache in generate() (padding, chunked prefill, beam
search, crop), a decode step that compiles into one graph with the length as a tensor, the summaries kept in
place, and clear errors where a static cache cannot serve."""

import sys

import pytest
import torch
from utils import SPARSE_SMALL, model_pair, padded_prompts

from sparsex_hf import SparseXCache, SparseXStaticCache, set_sparsex_config
from sparsex_hf.hf import CACHE_KWARG, SparseXStaticLayer
from sparsex_hf.ops.attention.rules.common import block_summaries

MODEL_TYPES = ["llama", "mistral", "qwen2"]
CONFIGS = {"small": dict(SPARSE_SMALL), "retrieval": dict(SPARSE_SMALL, rerank=2, anchor="split"),
           "mix": dict(SPARSE_SMALL, combine="mix", dense_layers=[1])}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_static_generate_gives_the_dynamic_caches_tokens(model_type, config):
    _, sparse = model_pair(model_type, sparsex=CONFIGS[config])
    ids, mask = padded_prompts()
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    dynamic = sparse.generate(ids, **kw)
    static = sparse.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)
    cache = SparseXStaticCache(sparse.config, max_cache_len=345)
    assert torch.equal(sparse.generate(ids, **{CACHE_KWARG: cache}, **kw), dynamic)
    layer = cache.layers[0]
    assert isinstance(layer, SparseXStaticLayer) and int(layer.cumulative_length) == 339
    assert layer.offsets == [0, 37] and layer.offsets_tensor().tolist() == [0, 37]


def test_full_budget_static_generate_equals_sdpa():
    dense, sparse = model_pair("llama")
    ids, mask = padded_prompts()
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(sparse.generate(ids, cache_implementation="static", **kw), dense.generate(ids, **kw))


def test_static_chunked_prefill_and_beam_search_match_the_dynamic_cache():
    _, sparse = model_pair("llama", sparsex=dict(SPARSE_SMALL, rerank=2, anchor="split"))
    ids, mask = padded_prompts(length=260)
    for extra in (dict(prefill_chunk_size=64), dict(num_beams=3)):
        kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, **extra)
        assert torch.equal(sparse.generate(ids, cache_implementation="static", **kw), sparse.generate(ids, **kw)), extra


def test_static_summaries_are_the_blocks_of_the_cached_keys_and_crop_resummarises():
    _, sparse = model_pair("llama", sparsex=dict(SPARSE_SMALL))
    ids, mask = padded_prompts(length=150, pads=(0, 21))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = SparseXStaticCache(sparse.config, max_cache_len=200)
    dyn = SparseXCache()
    with torch.no_grad():
        for c in (cache, dyn):
            sparse(ids, attention_mask=mask, position_ids=pos, **{CACHE_KWARG: c})
        layer = cache.layers[1]
        cache.crop(-30)  # 120 left: blocks 6..8 of row 0 are incomplete again
        dyn.crop(-30)
        step_ids = torch.randint(3, 256, (2, 1))
        for i in range(40):  # complete them again one token at a time
            m = torch.cat([mask[:, :120 + i], torch.ones(2, 1, dtype=mask.dtype)], 1)
            p = pos[:, 119:120] + 1 + i
            a = sparse(step_ids, attention_mask=m, position_ids=p, **{CACHE_KWARG: cache}).logits
            b = sparse(step_ids, attention_mask=m, position_ids=p, **{CACHE_KWARG: dyn}).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert int(layer.cumulative_length) == 160
    for row, off in enumerate((0, 21)):
        keys = layer.keys[row, :, off:160]
        want = block_summaries(keys.float(), 16)
        nb = want[0].shape[1]
        for got, w in zip((layer.kmin, layer.kmax, layer.kmean), want):
            torch.testing.assert_close(got[row, :, :nb], w.to(got.dtype))


@pytest.mark.parametrize("stored", ["loaded", "set"])
def test_a_decode_step_compiles_into_one_graph_with_no_recompile(stored):
    """The decode step traces with fullgraph=True (no graph break: the length, offsets and summaries are tensors, the
    decode is the custom op), compiles once for all the steps, and gives the eager dynamic cache's logits; with the
    config as a loaded model stores it (a dict) or as ``set_sparsex_config`` / ``apply_sparsex`` store it."""
    fields = dict(SPARSE_SMALL, rerank=2, anchor="split", dense_layers=[0])
    _, sparse = model_pair("llama", sparsex=fields)
    if stored == "set":
        set_sparsex_config(sparse, **fields)
    ids, mask = padded_prompts()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    step = torch.compile(sparse, fullgraph=True, backend=recording)
    cache = SparseXStaticCache(sparse.config, max_cache_len=320)
    dyn = SparseXCache()
    full = torch.nn.functional.pad(mask, (0, 20))
    with torch.no_grad():
        tok = sparse(ids, attention_mask=mask, position_ids=pos, **{CACHE_KWARG: dyn}).logits[:, -1:].argmax(-1)
        sparse(ids, attention_mask=mask, position_ids=pos, **{CACHE_KWARG: cache})
        for i in range(12):
            full[:, 300 + i] = 1
            p = pos[:, -1:] + 1 + i
            want = sparse(tok, attention_mask=full[:, : 301 + i], position_ids=p, **{CACHE_KWARG: dyn}).logits
            got = step(tok, attention_mask=full, position_ids=p, **{CACHE_KWARG: cache}).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            tok = want[:, -1:].argmax(-1)
    assert len(graphs) == 1 and "sparsex.decode" in graphs[0]


def test_a_compiled_prefill_runs_the_stack_eagerly_with_one_break_whatever_the_layers():
    """A prompt through a compiled forward over a static cache (as ``generate()`` runs its prefill chunks through
    the compiled decode step) leaves the graph once, at the decoder stack, for the whole stack: the graphs and breaks
    do not grow with the layers (they were one break at every layer's attention), and the logits and the cache are
    the eager run's; the decode step after it still compiles into one graph."""
    counts = []
    for layers in (2, 4):
        _, sparse = model_pair("llama", sparsex=dict(SPARSE_SMALL, rerank=2, anchor="split"), num_hidden_layers=layers)
        ids, mask = padded_prompts()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            eager_cache = SparseXStaticCache(sparse.config, max_cache_len=320)
            want = sparse(ids, attention_mask=mask, position_ids=pos, **{CACHE_KWARG: eager_cache}).logits
            graphs = []

            def recording(gm, example_inputs):
                graphs.append(gm)
                return gm.forward

            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            cache = SparseXStaticCache(sparse.config, max_cache_len=320)
            got = torch.compile(sparse, backend=recording)(ids, attention_mask=mask, position_ids=pos,
                                                           **{CACHE_KWARG: cache}).logits
        torch.testing.assert_close(got, want)
        for a, b in zip(cache.layers, eager_cache.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.kmax, b.kmax) and torch.equal(a.anchor, b.anchor)
        counts.append((len(graphs), sum(torch._dynamo.utils.counters["graph_break"].values())))
    assert counts[0] == counts[1] and counts[0][0] <= 2, counts


def test_static_cache_errors_say_what_is_wrong():
    _, sparse = model_pair("llama", sparsex=dict(SPARSE_SMALL))
    ids, mask = padded_prompts(length=100)
    with pytest.raises(ValueError, match="max_cache_len"):
        with torch.no_grad():
            sparse(ids, attention_mask=mask, **{CACHE_KWARG: SparseXStaticCache(sparse.config, max_cache_len=64)})
    bad = mask.clone()
    bad[0, 50] = 0  # padding in the middle of a row
    with pytest.raises(ValueError, match="left prefix"):
        with torch.no_grad():
            sparse(ids, attention_mask=bad, **{CACHE_KWARG: SparseXStaticCache(sparse.config, max_cache_len=128)})
    sparse.config.sparsex = dict(SPARSE_SMALL, dense_below=512)
    with pytest.raises(ValueError, match="dense_below"):
        with torch.no_grad():
            sparse(ids, attention_mask=mask, **{CACHE_KWARG: SparseXStaticCache(sparse.config, max_cache_len=128)})
    with pytest.raises(NotImplementedError, match="fixed batch size"):
        SparseXStaticCache(sparse.config, max_cache_len=128).layers[0].batch_select_indices(torch.tensor([0]))
    with pytest.raises(ValueError, match="max_cache_len must be"):
        SparseXStaticLayer(0)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["small", "retrieval"])
def test_gpu_compiled_static_generate_gives_the_dynamic_caches_tokens(config):
    """On CUDA, generate() compiles the static cache's decode step (mode "reduce-overhead": CUDA graphs) with the
    Triton kernels inside; the tokens are the eager dynamic cache's, and a second call reuses the compiled step."""
    _, sparse = model_pair("llama", sparsex=CONFIGS[config])
    sparse = sparse.cuda()
    ids, mask = (t.cuda() for t in padded_prompts(length=700))
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    dynamic = sparse.generate(ids, **kw)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    static = sparse.generate(ids, cache_implementation="static", **kw)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert torch.equal(static, dynamic)
    assert torch.equal(sparse.generate(ids, cache_implementation="static", **kw), dynamic)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile


def test_a_sliding_window_model_longer_than_its_window_needs_the_sparsex_static_cache():
    """Transformers' static cache keeps only the window of a sliding-window layer: refused with what to do instead;
    SparseXStaticCache keeps every position and gives the dynamic cache's tokens (Sparse-X applies the window)."""
    _, sparse = model_pair("mistral", sliding_window=128, sparsex=dict(SPARSE_SMALL))
    ids, mask = padded_prompts(length=200)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="SparseXStaticCache"):
        sparse.generate(ids, cache_implementation="static", **kw)
    cache = SparseXStaticCache(sparse.config, max_cache_len=212)
    assert torch.equal(sparse.generate(ids, **{CACHE_KWARG: cache}, **kw), sparse.generate(ids, **kw))


def test_a_decode_step_past_the_capacity_is_refused():
    _, sparse = model_pair("llama", sparsex=dict(SPARSE_SMALL))
    ids, mask = padded_prompts(length=100, pads=(0, 0))
    cache = SparseXStaticCache(sparse.config, max_cache_len=101)
    with torch.no_grad():
        sparse(ids, **{CACHE_KWARG: cache})
        sparse(ids[:, :1], position_ids=torch.full((2, 1), 100), **{CACHE_KWARG: cache})  # the last column
        with pytest.raises(ValueError, match="holds 101 tokens"):
            sparse(ids[:, :1], position_ids=torch.full((2, 1), 101), **{CACHE_KWARG: cache})


def test_both_cache_layers_speak_one_protocol():
    """The dynamic and the static layer answer the same calls with the same parameters (record_offsets,
    offsets_tensor, summaries, max_doc_len), and both reach the attention through one keyword (sparsex_layer)."""
    import inspect

    from sparsex_hf.hf import SparseXLayer

    for name in ("record_offsets", "offsets_tensor", "summaries", "max_doc_len", "get_seq_length"):
        a, b = getattr(SparseXLayer, name), getattr(SparseXStaticLayer, name)
        assert list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters), name
    wrap_src = inspect.getsource(__import__("sparsex_hf.hf.wrap", fromlist=["x"]))
    assert wrap_src.count("original(self, *args, sparsex_layer=") == 2 and "_sparsex_layer" not in wrap_src


def test_an_eager_prefill_reads_the_static_caches_length_once_per_forward(monkeypatch):
    """A prompt's chunks run eagerly; each forward reads the cache length on the host once, for all the layers (a
    read is a device sync: one per layer stalled the GPU at every layer), and the logits are the dynamic cache's."""
    from sparsex_hf.hf.wrap import wrap_class

    wrap_class("llama")
    _, sparse = model_pair("llama", sparsex=dict(SPARSE_SMALL), num_hidden_layers=4)
    ids, mask = padded_prompts(length=300)
    reads = []
    real = SparseXStaticLayer.host_length
    monkeypatch.setattr(SparseXStaticLayer, "host_length", lambda self: reads.append(self.is_initialized) or real(self))
    static, dynamic = SparseXStaticCache(sparse.config, max_cache_len=320), SparseXCache()
    with torch.no_grad():
        for (a, b), syncs in (((0, 200), 0), ((200, 300), 1)):
            got = sparse(ids[:, a:b], attention_mask=mask[:, :b], **{CACHE_KWARG: static}).logits
            assert sum(reads) == syncs, (a, reads)
            reads.clear()
            want = sparse(ids[:, a:b], attention_mask=mask[:, :b], **{CACHE_KWARG: dynamic}).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("static", [True, False])
def test_a_prefill_reads_the_padding_once_for_all_the_layers(monkeypatch, static):
    """Each row's left padding is read on the host once per mask, not at every layer (a read per layer stalled the
    GPU at every layer of the plain call's prefill); every layer records the same offsets, and the logits are those
    of a cache that read them per layer."""
    from sparsex_hf.hf import static_cache

    _, sparse = model_pair("llama", sparsex=dict(SPARSE_SMALL), num_hidden_layers=4)
    ids, mask = padded_prompts(length=200, pads=(0, 37))
    reads = []
    real = static_cache._read_padding
    monkeypatch.setattr(static_cache, "_read_padding", lambda cols: reads.append(cols.shape) or real(cols))

    def run():
        cache = SparseXStaticCache(sparse.config, max_cache_len=256) if static else SparseXCache()
        with torch.no_grad():
            logits = sparse(ids, attention_mask=mask, **{CACHE_KWARG: cache}).logits
        return logits, cache

    got, cache = run()
    assert len(reads) == 1
    assert all(layer.offsets == [0, 37] for layer in cache.layers)
    if static:
        assert all(layer.offsets_t.tolist() == [0, 37] for layer in cache.layers)
    monkeypatch.setattr(static_cache, "_PADDING_MEMO", [])
    monkeypatch.setattr(static_cache, "left_padding", lambda m, n, last=False: real(
        m[:, -n:] if last else m[:, :n]))  # no memo: a read per layer, as before
    monkeypatch.setattr(sys.modules["sparsex_hf.hf.cache"], "left_padding", static_cache.left_padding)
    want, _ = run()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)

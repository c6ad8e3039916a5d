"""The cache generate() builds for a Sparse-X model that names none: a Sparse-X static cache on CUDA (compiled decode
step), Transformers' default elsewhere; the same tokens as the eager dynamic cache; what the call names wins."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode
from utils import SPARSE_SMALL, model_pair, padded_prompts

import sparsex_hf
from sparsex_hf import SparseXConfig, SparseXStaticCache
from sparsex_hf.hf import CACHE_KWARG, SparseXLayer
from sparsex_hf.hf.generation import automatic_cache, static_capacity
from sparsex_hf.hf.wrap import wrap_class

KW = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, return_dict_in_generate=True)


def _model(mode, model_type="llama", **overrides):
    wrap_class(model_type)  # as sparsex_hf.from_pretrained does before the first forward
    _, sparse = model_pair(model_type, sparsex=dict(SPARSE_SMALL, generate_cache=mode), **overrides)
    return sparse


def _cache(out):
    return out.cache if "cache" in out else out.past_key_values


def _dynamic(cache) -> bool:
    """Transformers' dynamic cache, its layers made Sparse-X layers at the first forward."""
    return not isinstance(cache, SparseXStaticCache) and isinstance(cache.layers[0], SparseXLayer)


def test_capacities_round_up_by_at_most_a_quarter():
    assert [static_capacity(n) for n in (1, 256, 257, 1024, 1025, 4097, 1 << 20, (1 << 20) + 1)] == [
        256, 256, 512, 1024, 1280, 5120, 1 << 20, 1310720]
    for n in range(1, 70000, 997):
        c = static_capacity(n)
        assert n <= c <= max(256, 1.25 * n)


def test_the_plain_call_takes_the_static_cache_and_gives_the_dynamic_caches_tokens(caplog):
    sparse = _model("static")
    ids, mask = padded_prompts()
    dynamic = sparse.generate(ids, attention_mask=mask, cache_implementation="dynamic", **KW)
    assert _dynamic(_cache(dynamic))
    with caplog.at_level(logging.WARNING, logger="sparsex_hf"):
        plain = sparse.generate(ids, attention_mask=mask, **KW)
        again = sparse.generate(ids[:, :100], attention_mask=mask[:, :100], **KW)
    cache = _cache(plain)
    assert isinstance(cache, SparseXStaticCache) and cache.layers[0].max_cache_len == static_capacity(300 + 20)
    assert torch.equal(plain.sequences, dynamic.sequences)
    # a shorter call reuses the largest capacity (no new compile); the choice is logged once
    assert _cache(again).layers[0].max_cache_len == static_capacity(320)
    assert torch.equal(again.sequences, sparse.generate(ids[:, :100], attention_mask=mask[:, :100],
                                                        cache_implementation="dynamic", **KW).sequences)
    logged = [r.getMessage() for r in caplog.records if "static cache" in r.getMessage()]
    assert len(logged) == 1 and "cache_implementation='dynamic'" in logged[0]


def test_the_plain_call_with_beams_and_chunks_gives_the_dynamic_caches_tokens():
    sparse = _model("static")
    ids, mask = padded_prompts(length=260)
    for extra in (dict(num_beams=3), dict(prefill_chunk_size=64)):
        kw = dict(KW, attention_mask=mask, **extra)
        plain = sparse.generate(ids, **kw)
        assert isinstance(_cache(plain), SparseXStaticCache), extra
        assert torch.equal(plain.sequences, sparse.generate(ids, cache_implementation="dynamic", **kw).sequences)


def test_what_the_call_names_wins():
    sparse = _model("static")
    ids, mask = padded_prompts(length=120)
    kw = dict(KW, attention_mask=mask)
    assert _dynamic(_cache(sparse.generate(ids, cache_implementation="dynamic", **kw)))
    mine = SparseXStaticCache(sparse.config, max_cache_len=150)
    assert _cache(sparse.generate(ids, **{CACHE_KWARG: mine}, **kw)) is mine
    assert _cache(sparse.generate(ids, use_cache=False, **kw)) is None
    sparse.config.sparsex = dict(sparse.config.sparsex, generate_cache="dynamic")
    assert _dynamic(_cache(sparse.generate(ids, **kw)))


def test_auto_takes_the_static_cache_on_cuda_only():
    sparse = _model("auto")
    ids, mask = padded_prompts(length=120)
    assert _dynamic(_cache(sparse.generate(ids, attention_mask=mask, **KW)))  # a CPU model

    def choice(mode, device, generation_mode="greedy_search", **gen):
        config = SimpleNamespace(_attn_implementation="sparsex", sparsex=SparseXConfig(generate_cache=mode).to_dict())
        model = SimpleNamespace(config=SimpleNamespace(**vars(config), num_hidden_layers=2,
                                                       get_text_config=lambda decoder: model.config),
                                device=torch.device(device))
        generation = GenerationConfig(**gen)
        generation.is_assistant = gen.get("is_assistant", False)
        return automatic_cache(model, generation, {}, 5000, GenerationMode(generation_mode))

    assert isinstance(choice("auto", "cuda"), SparseXStaticCache)
    assert choice("auto", "cuda").layers[0].max_cache_len == static_capacity(5000) == 5120
    assert choice("auto", "cpu") is None
    assert choice("auto", "cuda", disable_compile=True) is None  # no compile: the eager dynamic cache is faster
    assert choice("dynamic", "cuda") is None
    assert choice("auto", "cuda", cache_implementation="static") is None  # Transformers builds what was named
    assert isinstance(choice("static", "cpu"), SparseXStaticCache)
    assert isinstance(choice("auto", "cuda", "beam_search"), SparseXStaticCache)
    assert choice("auto", "cuda", "assisted_generation") is None  # the draft model's rollback: Transformers' cache
    assert choice("auto", "cuda", is_assistant=True) is None


def test_a_call_that_returns_no_cache_leaves_it_for_the_next_call():
    """Same capacity and batch: the next call empties and reuses the cache (its buffers keep their addresses, so a
    compiled step replays its CUDA graph), with the dynamic cache's tokens; a call that returns its cache, another
    batch size or release_generation_cache leave none behind to reuse."""
    sparse = _model("static")
    ids, mask = padded_prompts(length=200)
    kw = dict(KW, attention_mask=mask, return_dict_in_generate=False)
    want = sparse.generate(ids, cache_implementation="dynamic", **kw)
    first = sparse.generate(ids, **kw)
    kept = sparse._sparsex_static_cache
    assert isinstance(kept, SparseXStaticCache)
    address = kept.layers[0].keys.data_ptr()
    second = sparse.generate(ids, **kw)
    assert sparse._sparsex_static_cache is kept and kept.layers[0].keys.data_ptr() == address
    assert torch.equal(first, want) and torch.equal(second, want)
    assert torch.equal(sparse.generate(ids[1:], **dict(kw, attention_mask=mask[1:])), want[1:])  # another batch
    assert sparse._sparsex_static_cache is not kept
    returned = _cache(sparse.generate(ids, **dict(kw, return_dict_in_generate=True)))
    assert sparse._sparsex_static_cache is None and isinstance(returned, SparseXStaticCache)
    sparse.generate(ids, **kw)
    sparsex_hf.release_generation_cache(sparse)
    assert sparse._sparsex_static_cache is None


def test_the_compiled_call_runs_prompt_chunks_eagerly():
    """generate() runs chunked prefill through its compiled call: for a Sparse-X model a forward of more than
    MAX_DECODE_QUERIES tokens goes to the eager model, a decode step to the compiled one; other models unchanged."""
    from sparsex_hf.ops.attention import MAX_DECODE_QUERIES

    sparse = _model("static")
    seen = []
    sparse._compiled_call = lambda **kw: seen.append(sorted(kw)) or "compiled"
    call = sparse.get_compiled_call(None)
    ids = torch.randint(3, 100, (2, MAX_DECODE_QUERIES + 1))
    out = call(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert seen == [] and torch.equal(out.logits, sparse(input_ids=ids).logits)
    assert call(input_ids=ids[:, :MAX_DECODE_QUERIES]) == "compiled" and seen == [["input_ids"]]
    assert call(input_ids=None, inputs_embeds=torch.zeros(2, 1, 8)) == "compiled" and len(seen) == 2
    dense = model_pair("llama")[0]
    dense._compiled_call = sparse._compiled_call
    assert dense.get_compiled_call(None) is sparse._compiled_call


def test_a_compiled_decode_on_the_cpu_gives_the_dynamic_caches_tokens_with_one_graph():
    """Transformers' compiled call on the CPU (``CompileConfig._compile_all_devices``): the prompt's chunks run
    eagerly outside it (no graph break), the decode step compiles into one graph, a second call reuses the cache
    without compiling again, and the tokens are the eager dynamic cache's, chunked the same way."""
    from transformers import CompileConfig

    sparse = _model("static")
    ids, mask = padded_prompts(length=300)
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=mask, prefill_chunk_size=128)
    want = sparse.generate(ids, cache_implementation="dynamic", **kw)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        first = sparse.generate(ids, compile_config=compile_config, **kw)
        kept = sparse._sparsex_static_cache
        second = sparse.generate(ids, compile_config=compile_config, **kw)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        assert sparse._sparsex_static_cache is kept
        assert torch.equal(first, want) and torch.equal(second, want)
    finally:
        torch._dynamo.reset()


def test_a_sliding_window_model_gets_a_cache_that_keeps_every_position():
    """Transformers' static cache would keep only the window of a Mistral-style layer; the automatic cache is a
    Sparse-X static cache, which keeps every position (Sparse-X applies the window)."""
    sparse = _model("static", "mistral", sliding_window=128)
    ids, mask = padded_prompts(length=200)
    kw = dict(KW, attention_mask=mask, max_new_tokens=12)
    plain = sparse.generate(ids, **kw)
    assert isinstance(_cache(plain), SparseXStaticCache)
    assert torch.equal(plain.sequences, sparse.generate(ids, cache_implementation="dynamic", **kw).sequences)


@pytest.mark.gpu
def test_gpu_the_plain_call_compiles_the_decode_step_and_gives_the_dynamic_caches_tokens(monkeypatch):
    """First in the process (no eager decode step has run: the kernels keep no buffer yet, as in a fresh session),
    the plain call compiles its decode step into CUDA graphs and gives the eager dynamic cache's tokens."""
    from sparsex_hf.ops.attention.kernels import decode as decode_kernel

    monkeypatch.setattr(decode_kernel, "_COUNTERS", {})
    decode_kernel._SCRATCH.clear()
    sparse = _model("auto").cuda()
    ids, mask = (t.cuda() for t in padded_prompts(length=700))
    kw = dict(KW, attention_mask=mask, max_new_tokens=24)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain = sparse.generate(ids, **kw)
    assert isinstance(_cache(plain), SparseXStaticCache)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]  # the prompt ran eagerly, outside the compiled call
    assert torch.equal(plain.sequences, sparse.generate(ids, cache_implementation="dynamic", **kw).sequences)


def test_the_stop_check_is_read_one_step_late_for_a_sparsex_cache_not_returned():
    """Transformers' deferred stop check (the host queues the next step while the GPU runs this one) is taken for a
    Sparse-X cache on CUDA that the call does not return; a returned cache, an assistant, another device or a
    cache with no Sparse-X layer keep Transformers' own choice."""
    from transformers import DynamicCache
    from transformers.generation.utils import DeferredStopCheck

    sparse = _model("static")
    cache, cuda = SparseXStaticCache(sparse.config, max_cache_len=64), torch.device("cuda")
    assert DeferredStopCheck.is_supported(cuda, cache, False, is_assistant=False)
    assert not DeferredStopCheck.is_supported(cuda, cache, True, is_assistant=False)
    assert not DeferredStopCheck.is_supported(cuda, cache, False, is_assistant=True)
    assert not DeferredStopCheck.is_supported(torch.device("cpu"), cache, False, is_assistant=False)
    assert not DeferredStopCheck.is_supported(cuda, DynamicCache(), False, is_assistant=False)


class _HostEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_stop_read_one_step_late_gives_the_same_tokens(monkeypatch, mode):
    """With the deferred stop check forced on for the CPU: a call that stops at its end-of-sequence token runs one
    more forward, which Transformers undoes; the tokens are those of the check read at every step, and a call
    that runs to max_new_tokens runs no extra forward."""
    from transformers.generation import utils as generation_utils

    from sparsex_hf.hf import generation

    sparse = _model(mode)
    ids = padded_prompts(length=150)[0][:1]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    full = sparse.generate(ids, eos_token_id=None, **kw)  # no end-of-sequence token: 12 new tokens
    eos = int(full[0, 150 + 5])  # its 6th new token, as the end-of-sequence token
    stop_at = 150 + int((full[0, 150:] == eos).nonzero()[0]) + 1
    undone = []
    finish = generation_utils.DeferredStopCheck.finish
    monkeypatch.setattr(generation_utils.DeferredStopCheck, "finish",
                        lambda self: undone.append(finish(self)) or undone[-1])
    monkeypatch.setattr(generation, "DEFER_STOP_DEVICES", ())
    want = sparse.generate(ids, eos_token_id=eos, **kw)
    assert not undone and want.shape[1] == stop_at
    monkeypatch.setattr(generation, "DEFER_STOP_DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "Event", _HostEvent)  # (the CPU has no events; its work is done when queued)
    assert torch.equal(sparse.generate(ids, eos_token_id=eos, **kw), want) and undone == [1]
    assert torch.equal(sparse.generate(ids, eos_token_id=None, **kw), full) and undone == [1, 0]

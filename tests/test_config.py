import pytest

from sparsex_hf import SparseXConfig


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("window", -1, "window"),
        ("window", 0, ">= 1"),
        ("block_size", 48, "power of two"),
        ("block_size", 0, "power of two"),
        ("block_size", 8192, "[1, 4096]"),
        ("topk", -1, "topk"),
        ("stride", -2, "stride"),
        ("sink_tokens", -3, "sink_tokens"),
        ("dense_below", -1, "dense_below"),
        ("combine", "sum", "union"),
        ("score", "l2", "minmax"),
        ("backend", "cuda", "triton"),
        ("alpha", 0.0, "alpha"),
        ("gamma", -1.0, "gamma"),
        ("dense_layers", [-1], "layer indices"),
        ("window", 2.5, "integer"),
        ("respect_sliding_window", "yes", "True or False"),
    ],
)
def test_invalid_field_names_field_and_range(field, value, allowed):
    with pytest.raises(ValueError) as err:
        SparseXConfig(**{field: value})
    assert f"SparseXConfig.{field}=" in str(err.value)
    assert allowed in str(err.value)


def test_round_trip_and_replace():
    cfg = SparseXConfig(window=128, topk=3, dense_layers=[2, 0, 2], combine="mix", gamma=0.5)
    assert cfg.dense_layers == (0, 2)
    data = cfg.to_dict()
    assert data["dense_layers"] == [0, 2]
    assert SparseXConfig.from_dict(data) == cfg
    assert SparseXConfig.from_any(None) == SparseXConfig()
    assert cfg.replace(window=64).window == 64
    with pytest.raises(ValueError, match="window"):
        cfg.replace(window=0)


def test_unknown_field_is_rejected_with_the_allowed_list():
    with pytest.raises(ValueError, match="allowed fields"):
        SparseXConfig.from_dict({"windw": 5})


def test_keys_per_query_matches_spec_budget():
    # docs/spec.md, 'Complexity': window + T/stride + topk*B + sink at 1M tokens is about 8.7K keys
    cfg = SparseXConfig()
    assert cfg.keys_per_query(1 << 20) == 64 + 4096 + (1 << 20) // 256 + 1 + 512
    assert cfg.keys_per_query(1000) == 1000


def test_the_default_is_the_faithful_rule_and_the_presets_name_configs():
    cfg = SparseXConfig()
    assert (cfg.rerank, cfg.anchor) == (2, "split")
    assert SparseXConfig.preset("retrieval") == SparseXConfig.preset("default") == cfg  # the earlier name
    one = SparseXConfig.preset("one-stage", window=128)
    assert (one.rerank, one.anchor, one.window) == (0, False, 128)
    with pytest.raises(ValueError, match="presets are"):
        SparseXConfig.preset("fast")


def test_rerank_is_validated():
    for bad in (-1, 17, 1.5, True):
        with pytest.raises(ValueError, match="rerank"):
            SparseXConfig(rerank=bad)


def test_anchor_needs_the_exact_stage():
    assert SparseXConfig(rerank=1, anchor=True).anchor == "last"
    assert SparseXConfig.from_dict(SparseXConfig(rerank=1, anchor="split").to_dict()).anchor == "split"
    with pytest.raises(ValueError, match="anchor='first' is invalid"):
        SparseXConfig(rerank=1, anchor="first")
    # the default anchor with one stage: the error names the way out
    with pytest.raises(ValueError, match="anchor='split' is invalid: allowed is False when rerank=0.*one-stage"):
        SparseXConfig(rerank=0)
    with pytest.raises(ValueError, match="anchor"):
        SparseXConfig(rerank=1, anchor=1)


def test_removed_options_are_refused_with_what_replaced_them():
    with pytest.raises(ValueError, match="'hybrid' was removed"):
        SparseXConfig(score="hybrid")
    with pytest.raises(ValueError, match="select_query was removed"):
        SparseXConfig.from_dict({"select_query": "each"})
    # a checkpoint saved with the value every config now computes still loads
    assert SparseXConfig.from_dict({"select_query": "mean", "window": 64}) == SparseXConfig(window=64)


def test_the_stored_config_leaves_runtime_fields_out_of_copies():
    """``model.config.sparsex`` keeps ``backend`` to run with; Transformers saves a deep copy, which has none."""
    import copy
    import json

    stored = SparseXConfig(backend="torch", window=64).stored()
    assert stored["backend"] == "torch" and SparseXConfig.from_any(stored).backend == "torch"
    saved = copy.deepcopy(stored)
    assert "backend" not in saved and json.loads(json.dumps(saved))["window"] == 64
    assert SparseXConfig.from_dict(saved) == SparseXConfig(window=64)


def test_a_preset_name_is_accepted_wherever_a_config_is(tmp_path):
    """``"one-stage"`` (or any preset's name) where a config goes: ``from_any``, ``sparsex_hf.from_pretrained(...,
    sparsex=...)``, ``set_sparsex_config(model, ...)`` and the commands' ``--preset``; an unknown name is refused
    with the list."""
    import argparse

    from utils import model_pair

    import sparsex_hf
    from sparsex_hf.apps.loading import add_sparsex_arguments, sparsex_config_from_args

    one = SparseXConfig.preset("one-stage")
    assert SparseXConfig.from_any("one-stage") == one and SparseXConfig.from_any("retrieval") == SparseXConfig()
    with pytest.raises(ValueError, match=r"presets are \['default', 'one-stage', 'retrieval'\]"):
        SparseXConfig.from_any("fast")
    dense, _ = model_pair("llama")
    dense.save_pretrained(tmp_path)
    model = sparsex_hf.from_pretrained(tmp_path, sparsex="one-stage")
    assert sparsex_hf.get_sparsex_config(model) == one
    sparsex_hf.set_sparsex_config(model, "default")
    assert sparsex_hf.get_sparsex_config(model) == SparseXConfig()
    ap = argparse.ArgumentParser()
    add_sparsex_arguments(ap)
    cfg = sparsex_config_from_args(ap.parse_args(["--preset", "one-stage", "--window", "512"]), model.config)
    assert cfg == one.replace(window=512)
    with pytest.raises(SystemExit):
        ap.parse_args(["--preset", "fast"])


def test_what_only_the_model_or_the_machine_can_tell_is_refused_at_load(tmp_path, monkeypatch):
    """``dense_layers`` beyond the model's layers, and ``backend="triton"`` on a machine with no GPU and no
    interpreter: refused when the config meets the model (load, ``set_sparsex_config``), not at the first forward."""
    import torch
    from utils import model_pair

    import sparsex_hf

    dense, _ = model_pair("llama")  # 2 layers
    dense.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"dense_layers=\[99\] names layers the model does not have: it has 2"):
        sparsex_hf.from_pretrained(tmp_path, sparsex={"dense_layers": [99]})
    model = sparsex_hf.from_pretrained(tmp_path, sparsex={"dense_layers": [1]})
    with pytest.raises(ValueError, match="dense_layers"):
        sparsex_hf.set_sparsex_config(model, dense_layers=[2])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' runs the Triton kernels, which need a CUDA GPU"):
        sparsex_hf.from_pretrained(tmp_path, sparsex={"backend": "triton"})
    with pytest.raises(ValueError, match="backend='triton'"):
        sparsex_hf.set_sparsex_config(model, backend="triton")
    with pytest.raises(ValueError, match="backend='flash4' cannot run here: no CUDA GPU is visible here"):
        sparsex_hf.from_pretrained(tmp_path, sparsex={"backend": "flash4"})


@pytest.mark.parametrize("stored", ["dict", "set"])
def test_a_models_config_is_parsed_once_per_stored_value(monkeypatch, stored):
    """Every layer of every forward asks for the model's config: it is parsed (validated) once per stored value,
    for a dict in the model config or the one ``set_sparsex_config`` stores (Transformers 5's configs are not
    hashable, so the cache is keyed by identity); an in-place edit, a new value and ``None`` are seen at once."""
    from utils import tiny_config

    import sparsex_hf

    config = tiny_config("llama")
    model = type("Model", (), {"config": config})()
    if stored == "set":
        sparsex_hf.set_sparsex_config(model, window=64)
    else:
        config.sparsex = dict(window=64)
    parses = []
    real = SparseXConfig.from_any
    monkeypatch.setattr(SparseXConfig, "from_any", classmethod(lambda cls, v: parses.append(1) or real(v)))
    assert all(sparsex_hf.get_sparsex_config(config).window == 64 for _ in range(5)) and len(parses) == 1
    config.sparsex["window"] = 32
    assert sparsex_hf.get_sparsex_config(config).window == 32 and len(parses) == 2
    config.sparsex = None
    assert sparsex_hf.get_sparsex_config(config) == SparseXConfig()

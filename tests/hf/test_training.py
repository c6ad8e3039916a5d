"""Library pieces of fine-tuning: RoPE extension, packing with document boundaries, mix gates."""

import pytest
import torch
from transformers import LlamaConfig
from utils import tiny_model

from sparsex_hf import SparseXConfig
from sparsex_hf.hf import training


def test_rope_extension_and_bad_inputs():
    c = LlamaConfig(max_position_embeddings=8192)
    p = training.extend_rope(c, "yarn", 32768)
    assert p["factor"] == 4.0 and p["original_max_position_embeddings"] == 8192 and c.max_position_embeddings == 32768
    assert training.original_length(c) == 8192
    c2 = LlamaConfig(max_position_embeddings=8192)
    training.extend_rope(c2, "dynamic", 16384)
    assert c2.rope_parameters["rope_type"] == "dynamic" and c2.max_position_embeddings == 8192
    with pytest.raises(ValueError, match="below the model's own.*rope='none' keeps the model's RoPE"):
        training.extend_rope(LlamaConfig(max_position_embeddings=8192), "linear", 4096)
    c3 = LlamaConfig(max_position_embeddings=8192)
    before = dict(c3.rope_parameters or {})
    assert training.extend_rope(c3, "none", 1024) == before  # a short trial run: the model's RoPE, unchanged
    assert c3.max_position_embeddings == 8192 and dict(c3.rope_parameters or {}) == before


def test_packing_keeps_documents_apart():
    seqs = training.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], 4)
    assert [s[0].tolist() for s in seqs] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [s[1].tolist() for s in seqs] == [[0, 1, 2, 0], [0, 0, 1, 2]]
    lab = training.labels_for(seqs[1][0], seqs[1][1])
    assert lab.tolist() == [-100, -100, 7, 8]


def test_mix_gates_attach_once_and_start_at_the_config_weights():
    model = tiny_model("llama", "sparsex")
    gates = training.attach_mix_gates(model, SparseXConfig(combine="mix", alpha=1.0, beta=0.5, gamma=2.0))
    assert len(gates) == 2 and training.attach_mix_gates(model, SparseXConfig()) == []
    torch.testing.assert_close(gates[0](), torch.tensor([1.0, 0.5, 2.0]).expand(4, 3))


def test_fsdp2_on_two_cpu_processes_trains_like_one(tmp_path):
    """LoRA on a Sparse-X model sharded by PyTorch FSDP2 (``fully_shard`` per decoder layer, gloo, two CPU
    processes, half of the global batch each) gives the loss curve of one process on the whole batch."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, worker, str(one)], env=env, check=True, capture_output=True, timeout=300)
    res = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", worker, str(two)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world"], a["sharded"], b["world"], b["sharded"]) == (1, False, 2, True)
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    assert a["losses"][-1] < a["losses"][0] - 0.02  # it trains


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_accelerate_configs_in_examples_launch_as_documented(name, monkeypatch):
    """examples/accelerate/*.yaml as `accelerate launch --config_file` reads them: two processes, bf16, and for
    FSDP the FSDP2 plugin wrapping each decoder layer with a full state dict for the one save."""
    import os

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "accelerate", f"{name}.yaml")
    args = launch_command_parser().parse_args(["--config_file", path, "examples/finetune_long_context.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 2 and args.mixed_precision == "bf16" and args.use_fsdp == (name == "fsdp")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if name == "ddp":
        assert args.multi_gpu and "ACCELERATE_USE_FSDP" not in env
        return
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.activation_checkpointing is False

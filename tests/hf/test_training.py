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
    with pytest.raises(ValueError, match="below the model's own"):
        training.extend_rope(LlamaConfig(max_position_embeddings=8192), "linear", 4096)


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

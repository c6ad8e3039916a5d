"""The ``oracle`` evaluation method: Sparse-X's budget with the blocks of most dense attention mass."""

import pytest
import torch
from utils import SPARSE_SMALL, left_padded, random_qkv, tiny_model

import sparsex_hf
from sparsex_hf.apps.eval import method_config
from sparsex_hf.apps.eval.methods import use_method
from sparsex_hf.apps.eval.oracle import oracle_attention
from sparsex_hf.ops.attention.reference.naive import sparsex_attention_naive

CFG = sparsex_hf.SparseXConfig(**SPARSE_SMALL, select_tile=1, backend="torch")


@pytest.mark.parametrize("hq, hkv, tq", [(4, 2, 150), (3, 3, 37)], ids=["gqa-prefill", "mha-last-37"])
def test_oracle_is_the_reference_attention_with_the_best_blocks(hq, hkv, tq):
    """The oracle's output is the reference attention given the oracle's blocks, and no other eligible block
    holds more of the group's dense mass (outside the sink, window and stride keys) than a chosen one."""
    q, k, v = random_qkv(2, hq, hkv, tq, 150, 32, dtype=torch.float64, seed=3)
    scale = 32**-0.5
    out, sel = oracle_attention(q, k, v, CFG, scale=scale, return_selection=True)
    ref = sparsex_attention_naive(q, k, v, CFG, scale=scale, selected=sel)
    torch.testing.assert_close(out, ref)
    assert (sel >= 0).any()
    # brute force for one query: the chosen blocks' mass is the top of every eligible block's mass
    b, h, r = 1, hkv - 1, tq - 1
    p, g = 149, hq // hkv
    probs = torch.softmax((q[b, h * g : (h + 1) * g, r] @ k[b, h].T) * scale, -1).sum(0)  # [150]
    j = torch.arange(150)
    base = (j < CFG.sink_tokens) | (j > p - CFG.window) | (j % CFG.stride == 0)
    nb = 150 // CFG.block_size
    mass = (probs * ~base)[: nb * CFG.block_size].view(nb, -1).sum(-1)
    eligible = [x for x in range(nb) if (x + 1) * CFG.block_size - 1 <= p - 0 and x * CFG.block_size <= p - CFG.window
                and (x + 1) * CFG.block_size - 1 >= CFG.sink_tokens]
    best = sorted(eligible, key=lambda x: -mass[x].item())[: CFG.topk]
    assert sorted(sel[b, h, r].tolist()) == sorted(best)


def test_oracle_padding_rows_chunks_and_batch_invariance(monkeypatch):
    q, k, v = random_qkv(3, 4, 2, 150, 150, 32, dtype=torch.float64, seed=4)
    mask = torch.ones(3, 150, dtype=torch.bool)
    mask[0, :23] = False
    out = oracle_attention(q, k, v, CFG, scale=0.2, attention_mask=mask)
    monkeypatch.setattr("sparsex_hf.apps.eval.oracle.CHUNK_ELEMENTS", 20000)  # a few query rows per chunk
    torch.testing.assert_close(oracle_attention(q, k, v, CFG, scale=0.2, attention_mask=mask), out)
    alone = oracle_attention(q[:1, :, 23:], k[:1, :, 23:], v[:1, :, 23:], CFG, scale=0.2)
    torch.testing.assert_close(out[:1, :, 23:], alone)
    assert out[0, :, :23].abs().max() == 0
    with pytest.raises(ValueError, match="left padding"):
        oracle_attention(q, k, v, CFG, scale=0.2, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="union"):
        oracle_attention(q, k, v, CFG.replace(combine="mix"), scale=0.2)


def test_oracle_method_in_a_model():
    """As an evaluation method: a padded batch generates what its rows generate alone, and with a window that
    covers every key the oracle model gives dense attention's logits."""
    model = tiny_model("llama", "sdpa")
    ids, mask = left_padded(batch=2, length=150, pad=23)
    with torch.no_grad():
        dense = model(ids[1:]).logits
        assert method_config("oracle", CFG, 150) == CFG.replace(dense_when_faster=False)
        use_method(model, "oracle", CFG.replace(window=4096), 150)
        torch.testing.assert_close(model(ids[1:]).logits, dense, atol=1e-4, rtol=1e-4)
        use_method(model, "oracle", CFG, 150)
        assert model.config._attn_implementation == "sparsex_oracle"
        both = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        for row in range(2):
            prompt = ids[row : row + 1, 23 if row == 0 else 0 :]
            alone = model.generate(prompt, max_new_tokens=5, do_sample=False)[0, prompt.shape[1] :]
            assert both[row, 150 : 150 + alone.numel()].tolist() == alone.tolist()
        sparse = model(ids[1:]).logits
        assert (sparse - dense).abs().max() > 1e-3  # the budget is really applied

"""Padding a step (engine/batch.py ``BatchStager.stage`` ``pad_seqs``/``pad_tokens``), as
the CUDA-graph replays of engine/runner.py do, changes neither the real rows' logits nor
any KV but the real tokens': checked on the CPU with the torch backend, where the same
staging and forward run eagerly."""

from __future__ import annotations

import pytest
import torch

from engine.batch import BatchStager, build_batch
from engine.config import ModelConfig
from engine.model import CausalLM
from engine.runner import MIXED_GRAPH_ROWS, MIXED_GRAPH_TOKENS, mixed_graph_key

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
          "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
          "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
          "max_position_embeddings": 2048}
BS = 16


@pytest.fixture(scope="module")
def model() -> CausalLM:
    torch.manual_seed(0)
    m = CausalLM.empty(ModelConfig.from_hf_dict(CONFIG), dtype=torch.float32, device="cpu",
                       backend="torch")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def _pool(model: CausalLM, slots: int) -> torch.Tensor:
    c = model.config
    g = torch.Generator().manual_seed(1)
    return torch.randn((slots, c.num_layers, 2, BS, c.num_kv_heads, c.head_dim), generator=g)


def test_mixed_graph_keys() -> None:
    assert mixed_graph_key(33, 1, 17) == (2, 64)  # 32-token question + 1 padding query
    assert mixed_graph_key(31, 1, 17) == (2, 32)
    assert mixed_graph_key(40, 3, 17) == (4, 64)  # a chunk beside two decodes
    assert mixed_graph_key(300, 1, 17) is None  # too many tokens: eager
    assert mixed_graph_key(10, 8, 17) is None  # 8 rows leave no padding row in 8
    assert mixed_graph_key(10, 3, 3) is None  # no more rows than the runner allows
    assert max(MIXED_GRAPH_ROWS) <= min(MIXED_GRAPH_TOKENS)


@pytest.mark.parametrize("steps", [
    [(40, 32)],  # a 32-token question after 8 cached tokens
    [(100, 7), (20, 1), (65, 1)],  # a chunk beside two decodes
    [(17, 17), (1, 1)],
], ids=["question", "chunk+decodes", "prefill+first"])
def test_padded_step_equals_the_unpadded_one(model: CausalLM, steps) -> None:
    seq_lens = [s for s, _ in steps]
    query_lens = [n for _, n in steps]
    tables, at = [], 1  # slot 0 is the padding rows' block
    for s in seq_lens:
        k = -(-s // BS)
        tables.append(list(range(at, at + k)))
        at += k
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 512, (sum(query_lens),), generator=g).tolist()
    key = mixed_graph_key(len(ids), len(steps), 9)
    assert key is not None
    rows, tokens = key

    plain = _pool(model, at + 4)
    batch, pos = build_batch(tables, query_lens, seq_lens, BS)
    want = model(torch.tensor(ids), pos, batch, plain)

    padded = _pool(model, at + 4)
    stager = BatchStager(BS, "cpu", 256, 16, 16 * 64)
    input_ids, positions, pbatch = stager.stage(ids, tables, query_lens, seq_lens,
                                                pad_seqs=rows, pad_tokens=tokens, width=64)
    assert input_ids.shape[0] == tokens and pbatch.num_seqs == rows
    assert pbatch.query_start_loc[-1].item() == tokens
    got = model(input_ids, positions, pbatch, padded)
    assert got.shape[0] == rows
    torch.testing.assert_close(got[:len(steps)], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)  # no KV from padding
    assert torch.equal(padded[0], _pool(model, at + 4)[0])  # block 0 untouched


def test_pad_tokens_need_a_padding_row() -> None:
    stager = BatchStager(BS, "cpu", 64, 4, 64)
    with pytest.raises(ValueError, match="padding row"):
        stager.stage([1, 2], [[1]], [2], [2], pad_seqs=1, pad_tokens=8, width=4)


def test_graph_width_covers_the_context_the_pool_and_the_model_allow(model: CausalLM) -> None:
    """Graph-replayed steps reach any context the model and the pool allow (up to
    GRAPH_MAX_CONTEXT): the graphs' block tables are that wide. (Capped at 8k tokens,
    multi-turn chats past their fourth turn decoded eagerly on the GPU.)"""
    from engine.runner import GRAPH_MAX_CONTEXT, ModelRunner

    assert GRAPH_MAX_CONTEXT >= 128 * 1024
    big = ModelRunner(model, _pool(model, 256), BS, 4, 64)  # 4,096 pool tokens
    assert big.graph_width * BS == CONFIG["max_position_embeddings"]  # the model's 2,048
    small = ModelRunner(model, _pool(model, 40), BS, 4, 64)  # 640 pool tokens
    assert small.graph_width == 40
    capped = ModelRunner(model, _pool(model, 256), BS, 4, 64, graph_max_context=1000)
    assert capped.graph_width == -(-1000 // BS)

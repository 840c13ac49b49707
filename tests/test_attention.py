"""The torch paged-attention reference against dense causal attention.

Every case builds each sequence's full K/V and queries as dense tensors, scatters the K/V
into a real pool ``[slots, layers, 2, block_size, kv_heads, head_dim]`` through random,
non-contiguous block tables (slots the sequences do not own are NaN), and compares
:func:`engine.attention.paged_attention` with attention computed directly in float64.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.attention import (
    TORCH_BACKEND,
    AttentionBackend,
    paged_attention,
    select_backend,
    self_check,
    write_kv,
)
from engine.batch import build_batch

NUM_LAYERS = 2
LAYER = 1
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 attention of the last ``n`` positions of one sequence.

    ``q`` ``[n, H, D]``, ``k``/``v`` ``[L, KVH, D]``: query ``i`` sees keys ``0..L-n+i``.
    """
    n, heads, _ = q.shape
    length, kv_heads, _ = k.shape
    group = heads // kv_heads
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), kk) * scale
    allowed = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), vv)


def run_case(seq_lens: list[int], query_lens: list[int], heads: int, kv_heads: int,
             head_dim: int, block_size: int, dtype: torch.dtype, seed: int) -> None:
    """Scatter random K/V through shuffled block tables, attend, compare with dense."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_needed = [-(-length // block_size) for length in seq_lens]
    num_slots = sum(blocks_needed) + 5
    pool = torch.full((num_slots, NUM_LAYERS, 2, block_size, kv_heads, head_dim), float("nan"),
                      dtype=dtype)
    k_cache, v_cache = pool[:, LAYER, 0], pool[:, LAYER, 1]
    slots = list(range(num_slots))
    rng.shuffle(slots)
    tables = []
    for n in blocks_needed:
        tables.append(slots[:n])
        slots = slots[n:]
    keys = [torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype) for length in seq_lens]
    values = [torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype) for length in seq_lens]
    queries = [torch.randn(n, heads, head_dim, generator=gen).to(dtype) for n in query_lens]

    # The cached prefix of each sequence goes in first, then the step's own tokens, as
    # the engine does it (prefix from earlier steps, then write_kv inside the forward).
    prefix_batch, _ = build_batch(tables, [length for length in seq_lens], seq_lens, block_size)
    all_k, all_v = torch.cat(keys), torch.cat(values)
    cached = torch.cat([torch.arange(length) < length - n
                        for length, n in zip(seq_lens, query_lens, strict=True)])
    prefix_slots = torch.where(cached, prefix_batch.slot_mapping, -1)
    write_kv(k_cache, v_cache, all_k, all_v, prefix_slots)
    batch, _ = build_batch(tables, query_lens, seq_lens, block_size)
    new_k = torch.cat([k[-n:] for k, n in zip(keys, query_lens, strict=True)])
    new_v = torch.cat([v[-n:] for v, n in zip(values, query_lens, strict=True)])
    write_kv(k_cache, v_cache, new_k, new_v, batch.slot_mapping)

    scale = 1.0 / math.sqrt(head_dim)
    out = paged_attention(torch.cat(queries), k_cache, v_cache, batch.block_tables,
                          batch.query_start_loc, batch.seq_lens, scale)
    assert out.dtype == dtype and out.shape == (sum(query_lens), heads, head_dim)
    expected = torch.cat([dense_attention(q, k, v, scale)
                          for q, k, v in zip(queries, keys, values, strict=True)])
    assert torch.isfinite(out).all()
    err = (out.double() - expected).abs().max().item()
    assert err < TOL[dtype] * max(1.0, expected.abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("seq_lens", "query_lens"), [
    ([1], [1]),                                   # first token
    ([40], [40]),                                 # plain prefill across blocks
    ([37, 16, 20, 9], [5, 1, 20, 1]),             # cached prefix, decodes, prefill
    ([33, 64, 17], [1, 1, 1]),                    # decode-only batch (batched path)
    ([100], [3]),                                 # small chunk after a long prefix
])
def test_matches_dense_attention(dtype: torch.dtype, seq_lens: list[int],
                                 query_lens: list[int]) -> None:
    run_case(seq_lens, query_lens, heads=6, kv_heads=2, head_dim=32, block_size=16,
             dtype=dtype, seed=len(seq_lens) * 1000 + sum(seq_lens))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_matches_dense_attention_random(data: st.DataObject, dtype: torch.dtype) -> None:
    kv_heads = data.draw(st.sampled_from([1, 2, 4]))
    group = data.draw(st.sampled_from([1, 2, 3]))
    head_dim = data.draw(st.sampled_from([8, 16, 64]))
    block_size = data.draw(st.sampled_from([1, 4, 16]))
    num_seqs = data.draw(st.integers(1, 5))
    seq_lens = data.draw(st.lists(st.integers(1, 70), min_size=num_seqs, max_size=num_seqs))
    decode_only = data.draw(st.booleans())
    query_lens = [1 if decode_only else data.draw(st.integers(1, length)) for length in seq_lens]
    run_case(seq_lens, query_lens, heads=kv_heads * group, kv_heads=kv_heads,
             head_dim=head_dim, block_size=block_size, dtype=dtype,
             seed=data.draw(st.integers(0, 2**31)))


def test_write_kv_writes_only_its_slots() -> None:
    block_size, kv_heads, head_dim = 4, 2, 8
    pool = torch.zeros(6, NUM_LAYERS, 2, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    k_cache, v_cache = pool[:, LAYER, 0], pool[:, LAYER, 1]
    k = torch.randn(3, kv_heads, head_dim)  # fp32 in, bf16 stored
    v = torch.randn(3, kv_heads, head_dim)
    slot_mapping = torch.tensor([5 * block_size + 3, -1, 0 * block_size + 1])
    write_kv(k_cache, v_cache, k, v, slot_mapping)
    assert torch.equal(pool[5, LAYER, 0, 3], k[0].bfloat16())
    assert torch.equal(pool[5, LAYER, 1, 3], v[0].bfloat16())
    assert torch.equal(pool[0, LAYER, 0, 1], k[2].bfloat16())
    assert torch.equal(pool[0, LAYER, 1, 1], v[2].bfloat16())
    touched = torch.zeros_like(pool, dtype=torch.bool)
    touched[5, LAYER, :, 3] = True
    touched[0, LAYER, :, 1] = True
    assert not pool[~touched].any()  # the skipped token and other layers stay untouched


def test_write_kv_rejects_mismatched_shapes() -> None:
    pool = torch.zeros(2, 1, 2, 4, 2, 8)
    with pytest.raises(ValueError, match="heads/dim"):
        write_kv(pool[:, 0, 0], pool[:, 0, 1], torch.zeros(1, 3, 8), torch.zeros(1, 3, 8),
                 torch.tensor([0]))
    with pytest.raises(ValueError, match="agree on T"):
        write_kv(pool[:, 0, 0], pool[:, 0, 1], torch.zeros(2, 2, 8), torch.zeros(2, 2, 8),
                 torch.tensor([0]))


def test_select_backend_on_cpu() -> None:
    assert select_backend("cpu") is TORCH_BACKEND
    assert select_backend("cpu", "torch") is TORCH_BACKEND
    with pytest.raises(RuntimeError, match="Triton"):
        select_backend("cpu", "triton")
    with pytest.raises(ValueError, match="prefer"):
        select_backend("cpu", "fast")


def _non_causal(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """A wrong attention: every query sees the whole context (no causal mask)."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for b in range(len(starts) - 1):
        n = starts[b + 1] - starts[b]
        ones = torch.ones(n, dtype=torch.int32)
        out[starts[b]:starts[b + 1]] = paged_attention(
            q[starts[b]:starts[b + 1]], k_cache, v_cache,
            block_tables[b:b + 1].expand(n, -1).contiguous(),
            torch.arange(n + 1, dtype=torch.int32), ones * seq_lens[b], scale)
    return out


def test_self_check_accepts_reference_and_rejects_wrong_attention() -> None:
    self_check(TORCH_BACKEND, "cpu", torch.float32)
    with pytest.raises(AssertionError, match="paged_attention"):
        self_check(AttentionBackend("non-causal", write_kv, _non_causal), "cpu", torch.float32)


def test_chunked_paths_match_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunk bounds force the query-chunked prefill and the chunked decode paths."""
    import engine.attention as attention

    monkeypatch.setattr(attention, "_SCORE_CHUNK_ELEMENTS", 200)
    monkeypatch.setattr(attention, "_DECODE_CHUNK_ELEMENTS", 2000)
    run_case([50, 33], [20, 33], heads=4, kv_heads=2, head_dim=8, block_size=4,
             dtype=torch.float32, seed=7)
    run_case([50, 33, 9, 70], [1, 1, 1, 1], heads=4, kv_heads=2, head_dim=8, block_size=4,
             dtype=torch.float32, seed=8)

"""The attention kernels' launch heuristic (engine/triton_attention.choose_config): a pure
function of host-known shapes, checked on any machine."""

from __future__ import annotations

import torch

from engine.triton_attention import choose_config

CPU = torch.device("cpu")  # choose_config counts 8 SMs off CUDA


def test_decode_batches_split_when_the_grid_is_small() -> None:
    cfg = choose_config(1, 1, 32, 8, 128, 8192, CPU)
    assert cfg.block_m == 16 and cfg.num_splits > 1


def test_long_prefill_never_splits() -> None:
    cfg = choose_config(8000, 1, 32, 8, 128, 8192, CPU)
    assert cfg.block_m == 128 and cfg.num_splits == 1


def test_short_chunk_over_a_long_context_splits() -> None:
    # 32 queries x 4 heads a kv head is prefill-like, but only 2 programs per kv head
    # would run: the KV is split, with 128-row tiles (each reads the context once).
    cfg = choose_config(32, 1, 4, 1, 128, 8032, CPU)
    assert cfg.block_m == 128 and cfg.num_splits > 1
    # A short context keeps the old rule (64-row tiles) and splits only with >= 4 KV
    # tiles a split.
    assert choose_config(32, 1, 4, 1, 128, 1024, CPU).block_m == 64
    assert choose_config(32, 1, 4, 1, 128, 64, CPU).num_splits == 1

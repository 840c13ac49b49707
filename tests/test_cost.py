"""Cost-aware reuse: the cost model's decisions with injected rates (exact), its online
fits, the store acting on them (declined blocks are recomputed, counted per tier), and
the real SmolLM2 engine giving the same greedy tokens when part of a hit is declined.
"""

from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from kvstore.config import StoreConfig
from kvstore.cost import CostModel, LoadRate, PrefillRate
from kvstore.store import KVStore
from radix import Namespace, hash_blocks
from tests.test_engine import model, prompts, reference, run, smollm2  # noqa: F401
from tests.test_store import BS, LAYOUT, NS, make_store, serve, tokens
from tiers.layout import KVLayout

MIB = 1 << 20


def fixed(**rates: LoadRate) -> CostModel:
    """1 MiB blocks of 16 tokens; recompute 10 us a token (160 us a block)."""
    return CostModel(block_bytes=MIB, block_size=16, load_rates=rates,
                     prefill=PrefillRate(per_token_s=1e-5), learn=False)


# ------------------------------------------------------------------ decisions


def test_slow_tier_is_declined_and_fast_tier_taken():
    cm = fixed(disk=LoadRate(bytes_per_s=1e9, latency_s=1e-3), host=LoadRate(50e9))
    # disk: 1.05 ms a block + 1 ms once, against 0.16 ms to recompute: never pays.
    plan = cm.plan(["gpu", "gpu", "disk", "disk"])
    assert plan.blocks == 2
    assert plan.taken == {"gpu": 2} and plan.declined == {"disk": 2}
    assert plan.load_s == 0.0 and plan.recompute_s == pytest.approx(2 * 16 * 1e-5)
    # host: 21 us a block: always pays.
    plan = cm.plan(["gpu", "host", "host", "host"])
    assert plan.blocks == 4 and plan.declined == {}
    assert plan.load_s == pytest.approx(3 * MIB / 50e9)
    # A slow block before fast ones: loading the fast ones needs it loaded too.
    # 2.05 ms + 4 x 21 us to load all five against 0.8 ms to recompute them.
    plan = cm.plan(["disk", "host", "host", "host", "host"])
    assert plan.blocks == 0 and plan.declined == {"disk": 1, "host": 4}


def test_prefix_decision_is_exact_at_the_break_even_length():
    # Attention only: recomputing n blocks costs 1e-8 * 16^2 * n^2 / 2 s, loading them
    # from disk 1 MiB / 1 GB/s each. Loading all pays from n = 819.2 blocks on.
    cm = CostModel(block_bytes=MIB, block_size=16, load_rates={"disk": LoadRate(1e9)},
                   prefill=PrefillRate(per_token_s=0.0, per_token_context_s=1e-8),
                   learn=False)
    short = cm.plan(["disk"] * 819)
    assert short.blocks == 0 and short.declined == {"disk": 819}
    long = cm.plan(["disk"] * 820)
    assert long.blocks == 820 and long.declined == {}
    # Cached context before the match makes recompute dearer: 100 blocks now pay.
    assert cm.plan(["disk"] * 100, context=16 * 1000).blocks == 100


def test_mixed_prefix_keeps_cheap_head_and_declines_expensive_tail():
    cm = fixed(host=LoadRate(50e9), disk=LoadRate(1e9, 5e-3))
    plan = cm.plan(["gpu"] * 3 + ["host"] * 2 + ["disk"] * 4)
    assert plan.blocks == 5
    assert plan.taken == {"gpu": 3, "host": 2} and plan.declined == {"disk": 4}


def test_unknown_rates_take_every_hit():
    cm = CostModel(block_bytes=MIB, block_size=16)
    assert cm.plan(["disk", "redis", "host"]).blocks == 3
    cm = CostModel(block_bytes=MIB, block_size=16, prefill=PrefillRate(1e-5), learn=False)
    # Prefill known, tier never measured: loading it is free until measured.
    assert cm.plan(["redis"] * 4).blocks == 4


def test_ties_go_to_the_longer_hit():
    # Loading a block costs exactly what recomputing it does (16 x 1 us = 16 us).
    cm = CostModel(block_bytes=16_000, block_size=16, load_rates={"disk": LoadRate(1e9)},
                   prefill=PrefillRate(per_token_s=1e-6), learn=False)
    assert cm.plan(["disk"] * 8).blocks == 8


def test_online_fits_recover_exact_linear_rates():
    cm = CostModel(block_bytes=MIB, block_size=16)
    for nbytes in (MIB, 4 * MIB, 16 * MIB, 2 * MIB):
        cm.observe_load("disk", nbytes, 2e-3 + nbytes / 2e9)
    rate = cm.load_rate("disk")
    assert rate is not None
    assert rate.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert rate.latency_s == pytest.approx(2e-3, rel=1e-6)
    truth = PrefillRate(per_token_s=3e-5, per_token_context_s=2e-9, per_step_s=4e-3)
    steps = (([512], [512]), ([256, 256], [1024, 300]), ([2048], [4096]), ([64], [64]),
             ([32], [8032]))
    for q, s in steps:
        ctx = sum(t * (n - t + (t + 1) / 2) for t, n in zip(q, s))
        cm.observe_prefill(q, s, truth.per_step_s + truth.per_token_s * sum(q)
                           + truth.per_token_context_s * ctx)
    learned = cm.prefill_rate()
    assert learned is not None
    assert learned.per_token_s == pytest.approx(truth.per_token_s, rel=1e-5)
    assert learned.per_token_context_s == pytest.approx(truth.per_token_context_s, rel=1e-5)
    assert learned.per_step_s == pytest.approx(truth.per_step_s, rel=1e-5)
    # Decode steps (one token a sequence) do not teach the prefill rate.
    cm.observe_prefill([1] * 8, [100] * 8, 1.0)
    assert cm.prefill_rate() == learned


def test_one_step_size_is_read_as_per_token_cost():
    # A single prefill size cannot separate the per-step cost from the per-token one:
    # the model charges it all per token (recompute looks dearer: hits are taken).
    cm = CostModel(block_bytes=MIB, block_size=16)
    for _ in range(3):
        cm.observe_prefill([1000], [1000], 0.025)
    rate = cm.prefill_rate()
    assert rate is not None and rate.per_step_s == 0.0
    assert rate.seconds(1000, 0) == pytest.approx(0.025, rel=1e-6)


def test_decide_off_takes_every_hit_and_still_learns():
    cm = fixed(disk=LoadRate(1.0))
    cm.decide = False
    assert cm.plan(["disk"] * 4).blocks == 4
    learner = CostModel(block_bytes=MIB, block_size=16, decide=False)
    learner.observe_load("disk", MIB, 1e-3)
    assert learner.load_rate("disk") is not None


def test_injected_rates_are_not_overwritten_by_measurements():
    cm = fixed(disk=LoadRate(1e9))
    cm.observe_load("disk", MIB, 1.0)
    cm.observe_prefill([512], [512], 10.0)
    assert cm.load_rate("disk") == LoadRate(1e9)
    assert cm.prefill_rate() == PrefillRate(per_token_s=1e-5)


def test_bad_rates_are_clear_errors():
    with pytest.raises(ValueError, match="bytes_per_s"):
        LoadRate(0.0)
    with pytest.raises(ValueError, match="PrefillRate"):
        PrefillRate(-1.0)


# ------------------------------------------------------------------ the store


def test_store_declines_slow_disk_tail_and_counts_it(tmp_path):
    slow = CostModel(LAYOUT.block_bytes, BS, load_rates={"disk": LoadRate(1.0)},
                     prefill=PrefillRate(1e-3), learn=False)
    cfg = StoreConfig(layout=LAYOUT, block_size=BS, gpu_blocks=16,
                      disk_path=str(tmp_path / "disk"), disk_bytes=64 * LAYOUT.block_bytes)
    store = KVStore(cfg, cost=slow)
    toks = tokens(21, 6 * BS)
    serve(store, toks)
    store.flush()
    assert store.stats().index.blocks["disk"] == 6  # published at commit
    assert store.drop("gpu", 2) == 2  # the two deepest blocks now live on disk only
    chain = hash_blocks(NS.root(), toks, BS)
    assert store.match(chain).sources == ["gpu"] * 4 + ["disk"] * 2
    assert serve(store, toks) == {"gpu": 4 * BS}
    store.flush()
    s = store.stats()
    assert s.blocks_declined == {"disk": 2} and s.blocks_loaded == {}
    assert s.blocks_moved["gpu->disk"] == 6  # the recomputed blocks were not written again
    store.close()
    fast = CostModel(LAYOUT.block_bytes, BS, load_rates={"disk": LoadRate(1e12)},
                     prefill=PrefillRate(1e-3), learn=False)
    again = KVStore(cfg, cost=fast)  # a new process: every block comes from disk
    assert serve(again, toks) == {"disk": 6 * BS}
    s = again.stats()
    assert s.blocks_loaded == {"disk": 6} and s.blocks_declined == {}
    again.close()


def test_store_learns_load_rates_from_its_own_loads(tmp_path):
    store = make_store(tmp_path, gpu_blocks=16, disk=True, publish=False, host_blocks=16)
    toks = tokens(22, 5 * BS)
    serve(store, toks)
    store.drop("gpu")
    assert serve(store, toks) == {"host": 5 * BS}
    rate = store.cost.load_rate("host")
    assert rate is not None and rate.bytes_per_s > 0
    store.drop("gpu")
    store.drop("host")
    assert serve(store, toks) == {"disk": 5 * BS}
    assert store.cost.load_rate("disk") is not None
    store.close()


# ----------------------------------------------------------------- the engine


def _layout(c) -> KVLayout:
    return KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, 16, "float32")


def _engine(smollm2, model, cost: CostModel, **kw) -> Engine:  # noqa: F811
    store = KVStore(StoreConfig(layout=_layout(smollm2.config), block_size=16, gpu_blocks=256,
                                **kw), cost=cost)
    return Engine(model, smollm2.tokenizer, store, Namespace(smollm2.fingerprint, "float32", 16),
                  smollm2.stop_token_ids, SchedulerConfig(max_num_seqs=8))


def test_declined_hit_tail_equals_cache_off(smollm2, model, reference, tmp_path):  # noqa: F811
    block_bytes = _layout(smollm2.config).block_bytes
    slow_disk = CostModel(block_bytes, 16, load_rates={"disk": LoadRate(1.0)},
                          prefill=PrefillRate(1e-3), learn=False)
    engine = _engine(smollm2, model, slow_disk, disk_path=str(tmp_path / "disk"),
                     disk_bytes=1 << 30)
    ps = prompts(smollm2)
    run(engine, ps[:1], tag="warm")
    store = engine.store
    store.flush()
    blocks = (len(ps[0]) - 1) // 16
    store.drop("gpu", 3)  # the LRU leaves: the request's deepest blocks
    outs = run(engine, ps[:1], tag="again")
    assert tokens_of(outs) == reference[:1]
    cached = outs[0].cached_tokens
    assert set(cached) == {"gpu"} and 0 < cached["gpu"] < blocks * 16
    assert store.stats().blocks_declined.get("disk", 0) > 0
    store.check_integrity()
    store.close()


def tokens_of(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def test_timed_step_feeds_the_prefill_rate():
    cm = CostModel(block_bytes=MIB, block_size=16)

    def step(ids, tables, query_lens, seq_lens):
        x = torch.randn(256, 256)
        for _ in range(20):
            x = x @ x / 16
        return len(ids)

    assert cm.timed(step, list(range(64)), [[0]], [64], [64]) == 64
    rate = cm.prefill_rate()
    assert rate is not None and rate.per_token_s + rate.per_token_context_s > 0

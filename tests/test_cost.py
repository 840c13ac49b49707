"""Cost-aware reuse: the cost model's decisions with injected rates (exact), its online
fits, the store acting on them (declined blocks are recomputed, counted per tier), and
the real SmolLM2 engine giving the same greedy tokens when part of a hit is declined.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from kvstore.config import StoreConfig
from kvstore.cost import (
    DEFAULT_LOAD_LATENCY_FLOOR_S,
    LOAD_LATENCY_FLOOR_S,
    CostModel,
    LoadRate,
    PrefillRate,
)
from kvstore.store import KVStore
from radix import Namespace, hash_blocks
from tests.test_engine import prompts, reference, run  # noqa: F401
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


def test_one_step_size_is_read_as_per_token_cost_and_not_trusted():
    # A single prefill size cannot separate the per-step cost from the per-token one:
    # the estimate charges it all per token, and the plan does not use it (every hit is
    # taken, and the plan says why) until the steps span MIN_PREFILL_SPAN x.
    cm = CostModel(block_bytes=MIB, block_size=16, load_rates={"disk": LoadRate(1e6)})
    for _ in range(3):
        cm.observe_prefill([1000], [1000], 0.025)
    rate = cm.prefill_rate()
    assert rate is not None and rate.per_step_s == 0.0
    assert rate.seconds(1000, 0) == pytest.approx(0.025, rel=1e-6)
    assert not cm.prefill_trusted()
    plan = cm.plan(["disk"] * 8)  # 8 s to load against 25 ms to recompute: taken anyway
    assert plan.blocks == 8 and "span" in plan.basis
    assert plan.all_recompute_s == pytest.approx(rate.seconds(128, 0))
    cm.observe_prefill([250], [250], 0.01)  # now 4x apart: trusted, the load declined
    assert cm.prefill_trusted()
    plan = cm.plan(["disk"] * 8)
    assert plan.blocks == 0 and plan.basis == "predicted"


# --------------------------------------------- the learned model on real data


# The H200 sweep of issue 10 (`kvstore bench engine --shape llama3-8b --prefixes
# 1000,4000,8000,max --repeat 3`): Llama-3-8B blocks (16 tokens, 2 MiB), a 32-token
# question after each prefix. Cold TTFT (one step of prefix + question), the question
# after a GPU hit (about 20 ms: the engine's per-step cost) and the achieved load GB/s
# per tier, as measured; the replays below feed them to a learning model in the order
# the bench produces them, with a little noise, and a compilation on the first step.
H200_BLOCK = 2 * MIB
H200_COLD_MS = {1000: 30.7, 4000: 116.9, 8000: 251.6, 8158: 257.9}
H200_GBPS = {"host": {1000: 47.0, 4000: 48.0, 8000: 49.3, 8158: 49.0},
             "disk": {1000: 8.2, 4000: 11.2, 8000: 11.1, 8158: 11.1}}
H200_QUESTION_MS = [19.9, 21.4, 20.5, 19.6, 35.0, 20.2, 28.2, 20.0, 19.8, 20.6]
NOISE = [1.0, 1.03, 0.98, 1.01, 0.97, 1.02]


class _H200:
    """Feeds a model what the bench's runs would: steps and loads."""

    def __init__(self) -> None:
        self.cm = CostModel(H200_BLOCK, 16)
        self.i = 0
        self.compiled = False
        self.decisions: dict[tuple[int, str], object] = {}

    def _noise(self) -> float:
        self.i += 1
        return NOISE[self.i % len(NOISE)]

    def cold(self, n: int) -> None:
        ms = H200_COLD_MS[n] * self._noise() if self.compiled else 3000.0  # JIT compile
        self.compiled = True
        self.cm.observe_prefill([n + 32], [n + 32], ms / 1e3)

    def question(self, n: int, hit_blocks: int) -> None:
        """The step after a hit of ``hit_blocks``: the question plus declined blocks."""
        new = n + 32 - 16 * hit_blocks
        ms = H200_QUESTION_MS[self.i % len(H200_QUESTION_MS)]
        ms += (H200_COLD_MS[n] - 20.0) * (new - 32 - n % 16) / n  # recomputed blocks
        self._noise()
        self.cm.observe_prefill([new], [n + 32], ms / 1e3)

    def rows(self, n: int, repeat: int = 3) -> None:
        """The forced and cost-aware rows of prefix ``n`` from each tier."""
        blocks = n // 16
        for source in ("gpu", "host", "disk"):
            for mode in ("forced", "cost-aware"):
                self.cm.decide = mode == "cost-aware"
                for r in range(repeat + 1):
                    plan = self.cm.plan([source] * blocks)
                    if mode == "cost-aware" and r == 0:
                        self.decisions[(n, source)] = plan
                    if source != "gpu" and plan.blocks:
                        nbytes = plan.blocks * H200_BLOCK
                        gbps = H200_GBPS[source][n] * self._noise()
                        self.cm.observe_load(source, nbytes, nbytes / gbps / 1e9)
                    self.question(n, plan.blocks)

    def sweep(self, cold_first: bool, prefixes=(1000, 4000, 8000, 8158), repeat: int = 3):
        if cold_first:  # the bench now: cold runs and a question per prefix, then the rows
            for n in prefixes:
                for _ in range(repeat + 1):
                    self.cold(n)
                self.cold(n)  # the prefix computed in the tiered engine
                self.question(n, n // 16)
            for n in prefixes:
                self.rows(n, repeat)
        else:  # the bench as it ran: each prefix's cold runs, then its rows
            for n in prefixes:
                for _ in range(repeat + 1):
                    self.cold(n)
                self.cold(n)
                self.rows(n, repeat)
        return self


@pytest.mark.parametrize("cold_first", [True, False], ids=["cold-first", "as-run"])
def test_h200_sweep_replayed_declines_disk_at_1000_and_takes_it_from_4000(cold_first):
    h = _H200().sweep(cold_first)
    # 1000 tokens: 62 blocks from disk take ~16 ms, recomputing them ~11 ms (cold 30.7 ms
    # against ~20 ms for the question alone): declined. From 4000 on, disk pays.
    at_1000 = h.decisions[(1000, "disk")]
    assert at_1000.blocks == 0 and at_1000.declined == {"disk": 62}
    assert at_1000.basis == "predicted"
    assert at_1000.all_load_s == pytest.approx(62 * H200_BLOCK / 8.2e9, rel=0.1)
    assert at_1000.all_recompute_s < at_1000.all_load_s
    for n in (4000, 8000, 8158):
        plan = h.decisions[(n, "disk")]
        assert plan.blocks == n // 16 and plan.declined == {}, n
    for n in (1000, 4000, 8000, 8158):
        assert h.decisions[(n, "host")].blocks == n // 16
        assert h.decisions[(n, "gpu")].blocks == n // 16
    # The model at the end predicts the cold prefills and the questions within 15%.
    rate = h.cm.prefill_rate()
    assert rate is not None and h.cm.prefill_trusted()
    assert rate.per_step_s > 0.015 and rate.per_token_s > 0 and rate.per_token_context_s > 0
    for n, cold_ms in H200_COLD_MS.items():
        assert rate.step_seconds(n + 32, 0) == pytest.approx(cold_ms / 1e3, rel=0.15), n
        question = rate.step_seconds(32 + n % 16, n - n % 16)
        assert question == pytest.approx(0.0205, rel=0.15), n
    # Loads of several sizes: a real latency, and the bandwidth of the long loads.
    disk = h.cm.load_rate("disk")
    assert disk is not None and 2e-3 < disk.latency_s < 8e-3
    assert disk.bytes_per_s == pytest.approx(11.5e9, rel=0.1)
    host = h.cm.load_rate("host")
    assert host is not None and host.bytes_per_s == pytest.approx(49e9, rel=0.05)


def _synthetic_steps(truth: PrefillRate, seed: int, n: int = 400):
    """Steps of mixed sizes (prompts from scratch or after a cached prefix, short
    questions after long contexts, batches of chunks) with 3% noise and 5% of them
    slowed 2-10x (compilations, pauses)."""
    rng = random.Random(seed)
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            t = int(2 ** rng.uniform(4, 13))
            q, s = [t], [t + rng.choice([0, 0, int(2 ** rng.uniform(4, 13))])]
        elif kind < 0.7:
            t = rng.randint(16, 64)
            q, s = [t], [t + int(2 ** rng.uniform(8, 13))]
        else:
            q = [int(2 ** rng.uniform(4, 11)) for _ in range(rng.randint(2, 4))]
            s = [t + rng.choice([0, int(2 ** rng.uniform(4, 12))]) for t in q]
        attention = sum(t * (c - t + (t + 1) / 2) for t, c in zip(q, s))
        y = truth.per_step_s + truth.per_token_s * sum(q) + truth.per_token_context_s * attention
        y *= math.exp(rng.gauss(0, 0.03))
        if rng.random() < 0.05:
            y *= rng.uniform(2, 10)
        yield q, s, y


@pytest.mark.parametrize("truth", [
    PrefillRate(per_token_s=11e-6, per_token_context_s=4.6e-9, per_step_s=20e-3),
    PrefillRate(per_token_s=25e-6, per_token_context_s=1.2e-9, per_step_s=5e-3),
    PrefillRate(per_token_s=60e-6, per_token_context_s=3e-9, per_step_s=1e-3),
], ids=["h200-now", "h200-fixed-cost-cut", "slow-device"])
def test_fit_recovers_known_coefficients_from_noisy_mixed_steps(truth):
    cm = CostModel(block_bytes=MIB, block_size=16)
    for q, s, y in _synthetic_steps(truth, seed=7):
        cm.observe_prefill(q, s, y)
    got = cm.prefill_rate()
    assert got is not None and cm.prefill_trusted()
    assert got.per_step_s == pytest.approx(truth.per_step_s, rel=0.05)
    assert got.per_token_s == pytest.approx(truth.per_token_s, rel=0.05)
    assert got.per_token_context_s == pytest.approx(truth.per_token_context_s, rel=0.15)
    for new, context in ((32, 8000), (1000, 0), (4000, 0), (8000, 0), (512, 2048)):
        assert got.step_seconds(new, context) == pytest.approx(
            truth.step_seconds(new, context), rel=0.03), (new, context)


def test_a_burst_of_one_size_does_not_erase_the_others():
    # Plain exponential forgetting would leave 0.95^300 of the long prefills after 300
    # questions; forgetting within a size class keeps them.
    truth = PrefillRate(per_token_s=11e-6, per_token_context_s=4.6e-9, per_step_s=20e-3)
    cm = CostModel(block_bytes=MIB, block_size=16)
    for q, s, y in _synthetic_steps(truth, seed=3, n=200):
        cm.observe_prefill(q, s, y)
    for i in range(300):
        cm.observe_prefill([32], [8032], truth.step_seconds(32, 8000) * (1 + 0.02 * (i % 3)))
    got = cm.prefill_rate()
    assert got is not None
    assert got.step_seconds(8032, 0) == pytest.approx(truth.step_seconds(8032, 0), rel=0.05)
    assert got.step_seconds(1032, 0) == pytest.approx(truth.step_seconds(1032, 0), rel=0.05)


def test_outlier_steps_do_not_move_the_fit():
    truth = PrefillRate(per_token_s=25e-6, per_token_context_s=1.2e-9, per_step_s=5e-3)
    sizes = [32, 128, 512, 1024, 2048, 4096, 8192] * 4

    def fit(spoil: float | None) -> PrefillRate:
        cm = CostModel(block_bytes=MIB, block_size=16)
        for i, t in enumerate(sizes):
            y = truth.step_seconds(t, 0) * (1 + 0.01 * (i % 3))
            if spoil is not None and i in (0, 9):
                y *= spoil  # a compilation (slow) or a bad timer (fast)
            cm.observe_prefill([t], [t], y)
        rate = cm.prefill_rate()
        assert rate is not None
        return rate

    clean = fit(None)
    for spoil in (100.0, 0.01):
        got = fit(spoil)
        for t in (32, 1000, 8000):
            assert got.step_seconds(t, 0) == pytest.approx(clean.step_seconds(t, 0),
                                                           rel=0.02), (spoil, t)


def test_cuts_beyond_the_steps_seen_are_not_considered():
    # Steps of 64..1024 tokens seen: a cut recomputing more than 2048 tokens would be an
    # extrapolation, so a slow tier's 500-block hit is trimmed at the tail only.
    cm = CostModel(block_bytes=MIB, block_size=16, load_rates={"disk": LoadRate(1e6)})
    truth = PrefillRate(per_token_s=1e-5, per_step_s=5e-3)
    for t in (64, 256, 1024):
        cm.observe_prefill([t], [t], truth.step_seconds(t, 0))
    plan = cm.plan(["disk"] * 500)
    assert plan.blocks == 500 - 2048 // 16 and "not considered" in plan.basis
    assert cm.plan(["disk"] * 100).blocks == 0  # 1600 tokens: within reach


def test_load_latency_is_a_floor_until_two_sizes_are_seen():
    # The disk: 4 ms a load and 11.4 GB/s; 62 blocks of 2 MiB take 15.4 ms.
    def disk_s(nbytes: int) -> float:
        return 4e-3 + nbytes / 11.4e9

    cm = CostModel(block_bytes=MIB, block_size=16)
    nbytes = 62 * 2 * MIB
    cm.observe_load("disk", nbytes, disk_s(nbytes))
    cm.observe_load("host", nbytes, 0.0028)
    disk, host = cm.load_rate("disk"), cm.load_rate("host")
    assert disk is not None and host is not None
    assert disk.latency_s == pytest.approx(DEFAULT_LOAD_LATENCY_FLOOR_S)
    assert host.latency_s == pytest.approx(LOAD_LATENCY_FLOOR_S["host"])
    # Exact at the size measured, dearer than "all per byte" for smaller loads.
    assert disk.seconds(nbytes) == pytest.approx(disk_s(nbytes), rel=1e-6)
    assert disk.seconds(nbytes // 8) > disk_s(nbytes) / 8
    # A second size 8x larger: the latency comes from the data.
    cm.observe_load("disk", 8 * nbytes, disk_s(8 * nbytes))
    disk = cm.load_rate("disk")
    assert disk is not None
    assert disk.latency_s == pytest.approx(4e-3, rel=1e-6)
    assert disk.bytes_per_s == pytest.approx(11.4e9, rel=1e-6)
    # A load quicker than the floor: the floor shrinks to half of it.
    quick = CostModel(block_bytes=MIB, block_size=16)
    quick.observe_load("redis", MIB, 1e-3)
    rate = quick.load_rate("redis")
    assert rate is not None and rate.latency_s == pytest.approx(0.5e-3)


def test_plan_reports_both_extremes_and_is_kept():
    cm = fixed(disk=LoadRate(bytes_per_s=1e9, latency_s=1e-3))
    plan = cm.plan(["gpu", "disk", "disk"])
    assert cm.last_plan == plan and plan.basis == "predicted"
    assert plan.all_load_s == pytest.approx(1e-3 + 2 * MIB / 1e9)
    assert plan.all_recompute_s == pytest.approx(3 * 16 * 1e-5)
    plan = cm.plan(["gpu", "redis"])  # redis unmeasured: loading it is free, and said
    assert plan.blocks == 2 and plan.all_load_s is None and "redis" in plan.basis
    cm.decide = False
    plan = cm.plan(["disk"] * 3)
    assert plan.blocks == 3 and plan.basis.startswith("decide off")
    assert plan.all_recompute_s == pytest.approx(3 * 16 * 1e-5)


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

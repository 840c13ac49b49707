"""Scheduling under memory pressure: admission control, parking preemption, accounting.

Real parts throughout: CPU slot pools for the store tests; the real SmolLM2 (float32)
for the engine tests, whose reference outputs come from the same engine with a pool
large enough that nothing is ever preempted.
"""

from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from engine.loader import LoadedModel
from engine.model import CausalLM
from engine.sampling import SamplingParams
from engine.scheduler import SchedulerConfig
from engine.sequence import Status
from kvstore.config import StoreConfig
from kvstore.store import Allocated, KVStore, Lease, Parked
from radix import Namespace, hash_blocks
from tiers.layout import KVLayout

# ------------------------------------------------------------ store: park

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
NS = Namespace("scheduling-test-model", dtype="float32", block_size=4)


def _kv(key: bytes) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))
    return torch.randn(LAYOUT.block_shape, generator=g)


def _serve(store: KVStore, toks: list[int]) -> Lease:
    """Match, acquire, compute the rest (each block's KV derived from its key), commit;
    the lease stays held."""
    chain = hash_blocks(NS.root(), toks, 4)
    lease = store.acquire(store.match(chain))
    store.wait(lease)
    assert isinstance(store.allocate(lease, len(toks)), Allocated)
    for i in range(lease.committed, len(lease.slots)):
        key = chain.keys[i] if i < len(chain.keys) else bytes([i]) * 16
        store.gpu.block(lease.slots[i]).copy_(_kv(key))
    store.commit(lease, len(toks))
    store.check_integrity()
    return lease


def test_park_moves_the_lease_down_in_one_batch_and_promotion_brings_it_back():
    store = KVStore(StoreConfig(layout=LAYOUT, block_size=4, gpu_blocks=12, host_blocks=16))
    prefix = list(range(100, 108))  # 2 blocks shared with another live lease
    a_toks = prefix + list(range(200, 210))  # + 2 full blocks of its own + 2 tokens
    a = _serve(store, a_toks)
    b = _serve(store, prefix + list(range(300, 304)))
    free = store.gpu.num_free
    parked = store.park(a)
    store.check_integrity()
    # Its own full blocks moved; the prefix b still locks stayed; the partial block freed.
    assert parked == Parked("host", 2, 0)
    assert store.gpu.num_free == free + 3 and a.released
    assert store.stats().blocks_moved["gpu->host"] == 2
    chain = hash_blocks(NS.root(), a_toks, 4)
    m = store.match(chain)
    assert m.sources == ["gpu", "gpu", "host", "host"]
    again = store.acquire(m)
    store.wait(again)
    assert again.cached_tokens == {"gpu": 8, "host": 8}
    for i, slot in enumerate(again.slots):
        assert torch.equal(store.gpu.block(slot), _kv(chain.keys[i])), i
    store.release(again)
    store.release(b)
    store.check_integrity()


def test_park_without_a_lower_tier_keeps_the_blocks_cached_on_the_gpu():
    store = KVStore(StoreConfig(layout=LAYOUT, block_size=4, gpu_blocks=8))
    toks = list(range(100, 112))
    assert store.park(_serve(store, toks)) == Parked(None, 0, 0)
    store.check_integrity()
    assert store.match(hash_blocks(NS.root(), toks, 4)).sources == ["gpu"] * 3


def test_park_with_write_through_drops_the_gpu_copy_only():
    store = KVStore(StoreConfig(layout=LAYOUT, block_size=4, gpu_blocks=8, host_blocks=8,
                                policy="write-through"))
    parked = store.park(_serve(store, list(range(100, 112))))
    store.check_integrity()
    assert parked == Parked("host", 0, 3)  # already on the host: nothing copied again
    assert store.gpu.num_free == 8


# ---------------------------------------------------------- engine (SmolLM2)

TEXTS = ["The history of bread begins in the Neolithic era, when people first ground grain",
         "A croissant is a buttery, flaky pastry of Austrian origin, named for its shape",
         "Rye bread is made with various proportions of flour from rye grain and is dense",
         "Sourdough is bread made by the fermentation of dough using wild lactobacilli"]


@pytest.fixture(scope="module")
def prompts(smollm2: LoadedModel) -> list[list[int]]:
    tok = smollm2.tokenizer
    assert tok is not None
    return [tok.encode(t) for t in TEXTS]  # distinct: no prefix shared between them


def make_engine(smollm2: LoadedModel, model: CausalLM, *, gpu_blocks: int,
                host_blocks: int = 0, step_tokens: int = 2048, max_num_seqs: int = 8,
                park: bool = True) -> Engine:
    c = smollm2.config
    layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, 16, "float32")
    store = KVStore(StoreConfig(layout=layout, block_size=16, gpu_blocks=gpu_blocks,
                                host_blocks=host_blocks))
    return Engine(model, None, store, Namespace(smollm2.fingerprint, "float32", 16),
                  smollm2.stop_token_ids,
                  SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=step_tokens,
                                  park=park))


def run_all(engine: Engine, batch: list[list[int]], params: SamplingParams) -> list:
    for i, p in enumerate(batch):
        engine.add_request(f"r{i}", p, params)
    done = {}
    for out in engine.run():
        engine.store.check_integrity()
        if out.finished:
            done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(batch))]


LONG = SamplingParams(max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(smollm2, model, prompts) -> list[list[int]]:
    engine = make_engine(smollm2, model, gpu_blocks=256)
    outs = run_all(engine, prompts, LONG)
    assert engine.scheduler.preemptions == 0
    return [o.token_ids for o in outs]


def _blocks(n_tokens: int) -> int:
    return -(-n_tokens // 16)


@pytest.mark.parametrize("host", [True, False], ids=["parked-on-host", "recomputed"])
def test_greedy_tokens_identical_with_and_without_preemption(smollm2, model, prompts,
                                                             reference, host):
    # Two prompts fit, their 40-token replies do not: decoding forces preemptions.
    # Small steps: prefill is chunked too.
    final = max(_blocks(len(p) + LONG.max_tokens) for p in prompts)
    engine = make_engine(smollm2, model, gpu_blocks=2 * final - 2,
                         host_blocks=64 if host else 0, step_tokens=24)
    outs = run_all(engine, prompts, LONG)
    assert [o.token_ids for o in outs] == reference
    st = engine.stats()
    assert st.preemptions > 0 and st.preemptions == sum(o.preemptions for o in outs)
    assert st.requests_finished == len(prompts)
    # Accounting: nothing is shared between these prompts, so no token is a cache hit;
    # a preempted request's own blocks come back as "resumed".
    assert all(o.cached_tokens == {} for o in outs)
    assert st.cached_tokens == {}
    preempted = [o for o in outs if o.preemptions]
    resumed = sum(sum(o.resumed_tokens.values()) for o in preempted)
    if host:
        assert st.parked_blocks > 0
        assert sum(o.resumed_tokens.get("host", 0) for o in preempted) > 0
    assert resumed == sum(st.resumed_tokens.values())
    # Tokens fed through the model = needed once + recomputed; needed = every prompt
    # token (no hits) + every generated token fed back (all but the last).
    needed = sum(len(p) + len(o.token_ids) - 1 for p, o in zip(prompts, outs))
    assert st.needed_tokens == needed
    assert st.computed_tokens == sum(o.computed_tokens for o in outs)
    assert st.recomputed_tokens == sum(o.recomputed_tokens for o in outs)
    # Each preemption recomputes at most the tail past the last full block it resumed.
    span = max(len(p) for p in prompts) + LONG.max_tokens
    assert st.recomputed_tokens <= st.preemptions * (15 if host else span)
    assert not engine.has_unfinished and engine.store.stats().index.locked == 0


def test_no_livelock_under_a_pool_that_holds_two_sequences(smollm2, model, prompts):
    # 8 requests, a pool for about two: without admission control the scheduler admitted
    # all of them and preempted the newest over and over (180 preemptions in 71 steps).
    batch = prompts * 2
    final = max(_blocks(len(p) + 24) for p in batch)
    engine = make_engine(smollm2, model, gpu_blocks=2 * final + 1, host_blocks=64)
    outs = run_all(engine, batch, SamplingParams(max_tokens=24, ignore_eos=True))
    assert all(len(o.token_ids) == 24 for o in outs)
    st = engine.stats()
    assert st.preemptions <= len(batch) // 2
    assert st.recomputed_tokens <= st.preemptions * 15
    assert st.deferred_admissions > 0  # the queue's head did wait for room
    engine.store.check_integrity()


def test_admission_keeps_the_watermark_and_admits_in_arrival_order(smollm2, model, prompts):
    a, b, c = prompts[0], prompts[1], prompts[2]
    wm = 1  # one block per live sequence, at most 1% of this small pool
    ba, bb = _blocks(len(a)), _blocks(len(b))
    # b fits next to a only by eating the watermark: it waits for a to finish.
    engine = make_engine(smollm2, model, gpu_blocks=ba + bb + wm - 1)
    assert engine.scheduler.watermark(2) == wm
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i, p in enumerate((a, b, c)):
        engine.add_request(f"r{i}", p, params)
    sa, sb, _ = engine.scheduler.waiting
    order: list[str] = []
    waited = 0
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
        if sa.status is not Status.FINISHED:
            assert sb.status is Status.WAITING
            waited += 1
    assert waited > 0 and order[0] == "r0" and sorted(order) == ["r0", "r1", "r2"]
    assert engine.stats().preemptions == 0
    # One block more and a and b run together (c still waits: arrival order).
    engine = make_engine(smollm2, model, gpu_blocks=ba + bb + wm)
    for i, p in enumerate((a, b, c)):
        engine.add_request(f"r{i}", p, params)
    seqs = list(engine.scheduler.waiting)
    engine.step()
    assert [s.status for s in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING]


def test_a_request_larger_than_the_pool_still_ends_with_length(smollm2, model, prompts):
    engine = make_engine(smollm2, model, gpu_blocks=2)
    long_prompt = prompts[0] + prompts[1]
    assert len(long_prompt) > 2 * 16
    # A prompt that can never fit is refused up front (it used to end with "length" and
    # no token: an empty completion).
    with pytest.raises(ValueError, match="KV pool holds 32"):
        engine.add_request("long", long_prompt, SamplingParams(max_tokens=4))
    assert not engine.has_unfinished
    # One whose reply outgrows the pool ends with "length" and does not block the next.
    engine.add_request("r0", long_prompt[:31], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add_request("r1", prompts[2][:20], SamplingParams(max_tokens=4))
    done = {o.request_id: o for o in engine.run() if o.finished}
    assert done["r0"].outputs[0].finish_reason == "length"
    assert len(done["r0"].token_ids) == 2  # 31 + 2 tokens: the 33rd has no slot
    assert len(done["r1"].token_ids) > 0
    assert not engine.has_unfinished
    engine.store.check_integrity()


def test_pressure_bench_runs_on_cpu_and_its_counts_agree(smollm2, model, capsys,
                                                         tmp_path_factory):
    """``kvstore bench pressure`` on a tiny pool: the tokens it counts at the model
    runner equal the engine's own accounting (needed once + recomputed)."""
    import argparse

    from bench.pressure_bench import Workload, main, run_config

    block = 737_280  # SmolLM2's float32 KV block (16 tokens)
    wl = Workload(clients=3, rounds=2, new_tokens=40, output_tokens=4, seed=1)
    args = argparse.Namespace(gpu_kv_bytes=8 * block, host_bytes=32 * block, max_num_seqs=3,
                              max_num_batched_tokens=64)
    r = run_config(model, "host", wl, args)
    assert r.requests == 6 and len(r.ttft_s) == 6
    assert r.hit_tokens.get("host", 0) > 0  # round 2 reloads round 1's history
    assert r.recomputed_tokens is not None
    assert r.computed_tokens == r.needed_tokens + r.recomputed_tokens
    assert main(["--device", "cpu", "--clients", "2", "--rounds", "2", "--new-tokens", "24",
                 "--output-tokens", "2", "--gpu-kv-bytes", str(6 * block), "--host-bytes",
                 str(16 * block), "--model-cache-dir",
                 str(tmp_path_factory.getbasetemp() / "models")]) == 0
    out = capsys.readouterr().out
    for label in ("cache off", "GPU only", "GPU + host", "GPU + host vs GPU only"):
        assert label in out

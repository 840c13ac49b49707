"""Overlapped greedy decode (engine/engine.py): the host reads a step's picks one step
late while the next step runs on them. On the CPU the same code runs synchronously
(``overlap=True``), so these tests check every path of it token for token against the
synchronous engine: different lengths, stop tokens, aborts in flight, preemption,
sampled requests beside greedy ones, and new arrivals."""

from __future__ import annotations

import pytest

from engine.engine import Engine
from engine.loader import LoadedModel
from engine.model import CausalLM
from engine.sampling import SamplingParams
from engine.scheduler import SchedulerConfig
from kvstore.config import StoreConfig
from kvstore.store import KVStore
from radix import Namespace
from tiers.layout import KVLayout

QUESTIONS = ["What time do you open on Sunday?", "Do you sell rye bread?",
             "How much is a croissant?", "Can I order a birthday cake?"]


@pytest.fixture(scope="module")
def prompts(smollm2: LoadedModel) -> list[list[int]]:
    tok = smollm2.tokenizer
    assert tok is not None
    return [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


def make_engine(smollm2: LoadedModel, model: CausalLM, overlap: bool,
                gpu_blocks: int = 256, host_blocks: int = 0) -> Engine:
    c = smollm2.config
    layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, 16, "float32")
    store = KVStore(StoreConfig(layout=layout, block_size=16, gpu_blocks=gpu_blocks,
                                host_blocks=host_blocks))
    return Engine(model, smollm2.tokenizer, store, Namespace(smollm2.fingerprint, "float32", 16),
                  smollm2.stop_token_ids,
                  SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
                  overlap=overlap)


def run(engine: Engine, batch: list[list[int]], params: list[SamplingParams],
        abort_after: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Run ``batch``; ``abort_after[rid] = k`` aborts request ``rid`` at the first step
    it has >= k tokens. Returns the token ids by request id (aborted: those seen)."""
    for i, (p, sp) in enumerate(zip(batch, params)):
        engine.add_request(f"r{i}", p, sp)
    got: dict[str, list[int]] = {}
    abort_after = dict(abort_after or {})
    while engine.has_unfinished:
        for out in engine.step():
            got[out.request_id] = out.token_ids
            k = abort_after.get(out.request_id)
            if k is not None and len(out.token_ids) >= k and not out.finished:
                engine.abort(out.request_id)
                del abort_after[out.request_id]
    engine.store.check_integrity()
    return got


def both(smollm2, model, batch, params, **kw) -> tuple[dict, dict, Engine]:
    plain = make_engine(smollm2, model, False, **kw)
    sync = run(plain, batch, params)
    eng = make_engine(smollm2, model, True, **kw)
    over = run(eng, batch, params)
    # Accounting: the overlapped engine computed what the synchronous one did, plus
    # one token for each sequence that stopped on a token while the next step ran.
    a, b = plain.stats(), eng.stats()
    assert b.computed_tokens - b.discarded_tokens == a.computed_tokens
    assert b.needed_tokens == a.needed_tokens and a.discarded_tokens == 0
    return sync, over, eng


def test_different_lengths_equal_the_synchronous_engine(smollm2, model, prompts) -> None:
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 17, 9, 30)]
    sync, over, eng = both(smollm2, model, prompts, params)
    assert over == sync
    assert [len(sync[f"r{i}"]) for i in range(4)] == [5, 17, 9, 30]
    assert eng.overlapped_steps > 0 and eng.stats().requests_finished == 4


def test_stop_tokens_in_flight(smollm2, model, prompts) -> None:
    # Stop each request on a token its greedy reply really produces, mid-reply: the
    # overlapped engine has already run one more step when it reads the stop.
    free = run(make_engine(smollm2, model, False), prompts,
               [SamplingParams(max_tokens=24, ignore_eos=True)] * 4)
    params = [SamplingParams(max_tokens=24, ignore_eos=True,
                             stop_token_ids=[free[f"r{i}"][6 + i]]) for i in range(4)]
    sync, over, eng = both(smollm2, model, prompts, params)
    assert over == sync
    assert all(len(sync[f"r{i}"]) < 24 for i in range(4))
    assert eng.overlapped_steps > 0 and eng.stats().discarded_tokens > 0


def test_eos_and_a_sampled_request_beside_greedy_ones(smollm2, model, prompts) -> None:
    params = [SamplingParams(max_tokens=40),  # may stop at EOS
              SamplingParams(max_tokens=20, temperature=0.7, seed=3),
              SamplingParams(max_tokens=25, ignore_eos=True),
              SamplingParams(max_tokens=12, ignore_eos=True)]
    sync, over, eng = both(smollm2, model, prompts, params)
    assert over == sync
    assert eng.overlapped_steps > 0  # once the sampled request is done


def test_abort_in_flight(smollm2, model, prompts) -> None:
    params = [SamplingParams(max_tokens=30, ignore_eos=True)] * 3
    sync = run(make_engine(smollm2, model, False), prompts[:3], params)
    eng = make_engine(smollm2, model, True)
    over = run(eng, prompts[:3], params, abort_after={"r1": 8})
    assert over["r0"] == sync["r0"] and over["r2"] == sync["r2"]
    assert over["r1"] == sync["r1"][:len(over["r1"])] and len(over["r1"]) < 30
    assert eng.scheduler.running == [] and eng.store.stats() is not None


def test_preemption_under_overlap(smollm2, model, prompts) -> None:
    # Replies outgrow a tiny pool: steps that cannot allocate drain and preempt.
    params = [SamplingParams(max_tokens=48, ignore_eos=True)] * 3
    longest = max(len(p) for p in prompts[:3]) + 48
    blocks = 2 * (-(-longest // 16)) + 1
    sync, over, eng = both(smollm2, model, prompts[:3], params, gpu_blocks=blocks,
                           host_blocks=64)
    assert over == sync
    assert eng.scheduler.preemptions > 0 and eng.overlapped_steps > 0


def test_arrivals_while_decoding(smollm2, model, prompts) -> None:
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    want = run(make_engine(smollm2, model, False), prompts, [params] * 4)
    eng = make_engine(smollm2, model, True)
    eng.add_request("r0", prompts[0], params)
    got: dict[str, list[int]] = {}
    steps = 0
    while eng.has_unfinished:
        steps += 1
        if steps in (4, 9, 10):  # arrivals while the first decodes (overlapped)
            i = {4: 1, 9: 2, 10: 3}[steps]
            eng.add_request(f"r{i}", prompts[i], params)
        for out in eng.step():
            got[out.request_id] = out.token_ids
    assert got == want and eng.overlapped_steps > 0

"""Engine correctness with the real SmolLM2: cache on == cache off, token for token.

Every path that can serve a prefix is covered: GPU hits, promotion from host, disk and
Redis, chunked prefill, preemption under a tiny pool, and forked sequences (n > 1).
The reference outputs come from the same engine with prefix reuse disabled.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.engine import Engine
from engine.llm import LLM
from engine.loader import LoadedModel
from engine.model import CausalLM
from engine.sampling import SamplingParams
from engine.scheduler import SchedulerConfig
from kvstore.config import StoreConfig
from kvstore.store import KVStore
from radix import Namespace
from tiers.layout import KVLayout

GREEDY = SamplingParams(max_tokens=12)
SYSTEM = ("You are a concise assistant for a bakery. You answer questions about bread, "
          "pastry, opening hours and prices. Keep answers short and friendly. ") * 3
QUESTIONS = ["What time do you open on Sunday?", "Do you sell rye bread?",
             "How much is a croissant?", "Can I order a birthday cake?"]


def make_engine(smollm2: LoadedModel, model: CausalLM, *, enable_cache: bool = True,
                max_tokens_per_step: int = 2048, **store_kw) -> Engine:
    c = smollm2.config
    layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, 16, "float32")
    store_kw.setdefault("gpu_blocks", 256)
    store = KVStore(StoreConfig(layout=layout, block_size=16, **store_kw))
    ns = Namespace(smollm2.fingerprint, "float32", 16)
    return Engine(model, smollm2.tokenizer, store, ns, smollm2.stop_token_ids,
                  SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_tokens_per_step,
                                  enable_cache=enable_cache))


def prompts(smollm2: LoadedModel) -> list[list[int]]:
    tok = smollm2.tokenizer
    assert tok is not None
    return [tok.encode_chat([{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": q}]) for q in QUESTIONS]


def run(engine: Engine, batch: list[list[int]], params: SamplingParams = GREEDY,
        tag: str = "r") -> list:
    for i, p in enumerate(batch):
        engine.add_request(f"{tag}{i}", p, params)
    done = {o.request_id: o for o in engine.run() if o.finished}
    engine.store.check_integrity()
    return [done[f"{tag}{i}"] for i in range(len(batch))]


@pytest.fixture(scope="module")
def reference(smollm2, model) -> list[list[int]]:
    """Greedy tokens with prefix reuse disabled, one request at a time."""
    engine = make_engine(smollm2, model, enable_cache=False)
    out = [run(engine, [p], tag=f"ref{i}-")[0].token_ids for i, p in enumerate(prompts(smollm2))]
    assert all(len(o) > 0 for o in out)
    return out


def tokens_of(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def test_cache_off_batched_equals_one_by_one(smollm2, model, reference):
    engine = make_engine(smollm2, model, enable_cache=False)
    outs = run(engine, prompts(smollm2))
    assert tokens_of(outs) == reference
    assert all(o.num_cached_tokens == 0 for o in outs)


def test_gpu_hits_equal_cache_off(smollm2, model, reference):
    engine = make_engine(smollm2, model)
    ps = prompts(smollm2)
    run(engine, ps[:1], tag="warm")
    outs = run(engine, ps)
    assert tokens_of(outs) == reference
    system_blocks = len(ps[0]) // 16 // 2
    assert all(o.cached_tokens.get("gpu", 0) >= system_blocks * 16 for o in outs)


def test_host_promotion_equals_cache_off(smollm2, model, reference):
    ps = prompts(smollm2)
    need = len(ps[0]) // 16 + 2
    engine = make_engine(smollm2, model, gpu_blocks=need + 2, host_blocks=4 * need)
    run(engine, ps[:1], tag="warm")
    filler = [list(range(1000, 1000 + len(ps[0])))]
    run(engine, filler, SamplingParams(max_tokens=2), tag="fill")  # pushes warm to host
    outs = run(engine, ps[:1], tag="again")
    assert outs[0].cached_tokens.get("host", 0) > 0
    assert tokens_of(outs) == reference[:1]


@pytest.mark.parametrize("shared", ["disk", "redis"])
def test_shared_tier_hits_equal_cache_off(smollm2, model, reference, shared, tmp_path,
                                          redis_server):
    kw: dict = {"policy": "write-through"}
    if shared == "disk":
        kw.update(disk_path=str(tmp_path / "disk"), disk_bytes=1 << 30)
    else:
        kw.update(redis_url=redis_server.url)
    first = make_engine(smollm2, model, **kw)
    ps = prompts(smollm2)
    run(first, ps[:2], tag="first")
    first.store.close()
    kw.pop("policy")
    second = make_engine(smollm2, model, **kw)  # a restarted process: empty index
    outs = run(second, ps[:2], tag="second")
    # The restarted engine's GPU starts empty, so the shared prefix comes from the shared
    # tier; a request matched after another's load finished finds it on the GPU instead.
    need = 16 * (len(ps[0]) // 32)
    by_tier = [o.cached_tokens for o in outs]
    assert all(sum(c.values()) >= need for c in by_tier), by_tier
    assert max(c.get(shared, 0) for c in by_tier) >= need, by_tier
    assert tokens_of(outs) == reference[:2]
    second.store.close()


def test_chunked_prefill_equals_cache_off(smollm2, model, reference):
    engine = make_engine(smollm2, model, max_tokens_per_step=24)
    outs = run(engine, prompts(smollm2))
    assert tokens_of(outs) == reference
    outs = run(engine, prompts(smollm2), tag="again")  # chunked and cached
    assert tokens_of(outs) == reference
    assert all(o.num_cached_tokens > 0 for o in outs)


def test_preemption_equals_cache_off(smollm2, model, reference):
    ps = prompts(smollm2)
    per_seq = (len(max(ps, key=len)) + GREEDY.max_tokens) // 16 + 1
    # Two prompts fit (admission control lets both in), their replies do not.
    engine = make_engine(smollm2, model, gpu_blocks=2 * per_seq - 1, host_blocks=64)
    outs = run(engine, ps)
    assert engine.scheduler.preemptions > 0
    assert tokens_of(outs) == reference


def test_forked_sequences_equal_cache_off(smollm2, model, reference):
    engine = make_engine(smollm2, model)
    outs = run(engine, prompts(smollm2)[:2], SamplingParams(max_tokens=12, n=3))
    for out, ref in zip(outs, reference[:2]):
        assert len(out.outputs) == 3
        assert all(c.token_ids == ref for c in out.outputs)
    assert engine.store.stats().blocks_moved.get("gpu->gpu", 0) > 0  # copy-on-write ran


def test_seeded_sampling_is_reproducible_and_forks_differ(smollm2, model):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=7, n=2)
    p = prompts(smollm2)[:1]
    a = run(make_engine(smollm2, model), p, params)[0]
    b = run(make_engine(smollm2, model, enable_cache=False), p, params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids


def test_stop_strings_and_max_tokens(smollm2, model, reference):
    engine = make_engine(smollm2, model)
    tok = smollm2.tokenizer
    full = tok.decode(reference[0], skip_special_tokens=True)
    word = full.split()[1]
    out = run(engine, prompts(smollm2)[:1], SamplingParams(max_tokens=12, stop=(word,)))[0]
    assert out.outputs[0].finish_reason == "stop" and word not in out.text
    out = run(engine, prompts(smollm2)[:1], SamplingParams(max_tokens=3), tag="len")[0]
    assert out.outputs[0].finish_reason == "length" and len(out.token_ids) == 3


def test_prompt_larger_than_the_pool_is_refused(smollm2, model):
    engine = make_engine(smollm2, model, gpu_blocks=4)
    long_prompt = prompts(smollm2)[0]
    assert len(long_prompt) > 4 * 16
    # Refused up front, naming the pool and how to grow it (it used to end at once with
    # "length" and no token: an empty reply).
    for n in (1, 2):
        with pytest.raises(ValueError, match=r"KV pool holds 64 \(4 blocks.*gpu_kv_bytes"):
            engine.add_request(f"long{n}", long_prompt, SamplingParams(max_tokens=4, n=n))
    with pytest.raises(ValueError, match="KV pool holds 64"):
        engine.add_request("full", long_prompt[:64], GREEDY)  # no room for a reply token
    assert not engine.has_unfinished
    # The largest prompt with room for one more token runs as before; its reply ends
    # with "length" when the sequence outgrows the pool.
    fits = long_prompt[:63]
    out = run(engine, [fits], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.token_ids) == 2
    ref = run(make_engine(smollm2, model), [fits], SamplingParams(max_tokens=2))[0]
    assert out.token_ids == ref.token_ids
    assert not engine.has_unfinished


def test_bad_requests_are_clear_errors(smollm2, model):
    engine = make_engine(smollm2, model)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("x", [], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("y", [10**9], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.add_request("z", [5] * model.config.max_context_len, GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_multi_turn_chat_reuses_prompt_and_generated_blocks(smollm2, tmp_path):
    llm = LLM("smollm2", device="cpu", dtype="float32", gpu_blocks=256, host_blocks=256,
              disk_path=str(tmp_path / "disk"), disk_bytes=1 << 30,
              model_cache_dir=str(Path(smollm2.path).parent), attention="torch")
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    first = llm.chat(msgs, GREEDY)
    turn1_tokens = first.prompt_tokens + len(first.token_ids)
    msgs += [{"role": "assistant", "content": first.text},
             {"role": "user", "content": QUESTIONS[1]}]
    second = llm.chat(msgs, GREEDY)
    # Turn 1's prompt and the blocks its reply filled are reused.
    assert second.num_cached_tokens > (first.prompt_tokens // 16) * 16
    assert second.num_cached_tokens <= turn1_tokens
    assert second.ttft_s is not None and second.ttft_s > 0
    llm.close()

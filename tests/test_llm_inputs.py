"""``LLM``'s inputs: a batch that fails part-way leaves nothing queued, prompts too large
for the KV pool are refused, and wrong argument types are ``TypeError``s naming what
to pass (never an internal error, never silently wrong data). Runs the tiny dummy model
with the SmolLM2 tokenizer on the CPU."""

from __future__ import annotations

import _thread
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.llm import LLM
from engine.loader import LoadedModel
from engine.sampling import SEED_RANGE, SamplingParams

PARAMS = SamplingParams(max_tokens=4)
CHAT = [{"role": "user", "content": "Hello there"}]


def tiny(cache_dir: str, **kwargs: Any) -> LLM:
    kwargs.setdefault("gpu_blocks", 256)
    return LLM("tiny", load_format="dummy", tokenizer="smollm2", device="cpu",
               dtype="float32", attention="torch", model_cache_dir=cache_dir, **kwargs)


@pytest.fixture(scope="module")
def cache_dir(smollm2: LoadedModel) -> str:
    assert smollm2.path is not None
    return str(Path(smollm2.path).parent)


@pytest.fixture(scope="module")
def llm(cache_dir: str) -> Iterator[LLM]:
    with tiny(cache_dir) as engine:
        yield engine


@pytest.fixture(scope="module")
def fresh(cache_dir: str) -> Iterator[LLM]:
    """A second engine that never saw a failed call: the reference outputs."""
    with tiny(cache_dir) as engine:
        yield engine


def ids_of(outs: list[Any]) -> list[list[int]]:
    return [o.token_ids for o in outs]


# ------------------------------------------------------------ failed batches


def test_a_failed_batch_leaves_no_request_behind(llm: LLM, fresh: LLM) -> None:
    too_long = [5] * (llm.loaded.config.max_context_len + 1)
    failing: list[tuple[Any, str]] = [
        (lambda: llm.generate(["Hello there", [50000]], PARAMS),
         r"prompts\[1\] \(of 2\): token ids"),
        (lambda: llm.generate(["Hello there", "Hi", too_long], PARAMS),
         r"prompts\[2\] \(of 3\): the prompt has 2049 tokens"),
        (lambda: llm.chat([CHAT, [{"role": "user", "content": "x " * 3000}]], PARAMS),
         "context"),
    ]
    for call, match in failing:
        finished = llm.engine.stats().requests_finished
        with pytest.raises(ValueError, match=match):
            call()
        assert not llm.engine.has_unfinished  # nothing was queued
        out = llm.generate("Hi", PARAMS)
        assert llm.engine.stats().requests_finished == finished + 1  # "Hi" ran alone
        assert ids_of(out) == ids_of(fresh.generate("Hi", PARAMS))
    assert ids_of(llm.chat([CHAT], PARAMS)) == ids_of(fresh.chat([CHAT], PARAMS))


def test_an_interrupted_generate_leaves_no_request_behind(llm: LLM, fresh: LLM) -> None:
    long = SamplingParams(max_tokens=1500, ignore_eos=True)
    started = llm.engine.steps

    def interrupt() -> None:  # Ctrl-C once the batch is running
        deadline = time.monotonic() + 120  # a guard against hanging, not a timing check
        while llm.engine.steps < started + 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        _thread.interrupt_main()

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["Count to a thousand:", "Hello there"], long)
    thread.join()
    assert not llm.engine.has_unfinished
    llm.store.check_integrity()
    assert ids_of(llm.generate("Hi", PARAMS)) == ids_of(fresh.generate("Hi", PARAMS))


# ------------------------------------------------------------- the KV pool


def test_prompt_larger_than_the_kv_pool_is_refused(cache_dir: str, fresh: LLM) -> None:
    with tiny(cache_dir, gpu_blocks=2) as small:
        assert small.max_sequence_tokens == 32
        with pytest.raises(ValueError, match=r"KV pool holds 32 \(2 blocks of 16 tokens.*"
                                             r"gpu_kv_bytes.*--gpu-kv-bytes"):
            small.generate([[7] * 51], PARAMS)
        with pytest.raises(ValueError, match="KV pool"):
            small.chat([{"role": "user", "content": "word " * 40}], PARAMS)
        with pytest.raises(ValueError, match="KV pool"):
            next(small.stream([7] * 32, PARAMS))
        assert not small.engine.has_unfinished
        # prompts that fit run as before
        fits = [[7] * 31, [8] * 20]
        outs = small.generate(fits, SamplingParams(max_tokens=1))
        assert ids_of(outs) == ids_of(fresh.generate(fits, SamplingParams(max_tokens=1)))


# -------------------------------------------------------------- text and seeds


def test_text_with_lone_surrogates_is_a_value_error(llm: LLM) -> None:
    text = b"\xff hi".decode("utf-8", "surrogateescape")  # undecodable stdin bytes
    assert llm.tokenizer is not None
    for call in (lambda: llm.generate(text, PARAMS), lambda: llm.encode(text),
                 lambda: llm.chat([{"role": "user", "content": text}], PARAMS),
                 lambda: llm.tokenizer.encode_batch(["ok", text])):  # type: ignore[union-attr]
        with pytest.raises(ValueError, match=r"unpaired surrogate \(U\+DCFF.*undecod"):
            call()
    assert not llm.engine.has_unfinished


def test_seeds_beyond_64_bits_are_refused_and_the_extremes_run(llm: LLM) -> None:
    for seed in (2**70, SEED_RANGE[1] + 1, SEED_RANGE[0] - 1):
        with pytest.raises(ValueError, match="SamplingParams: seed must be in"):
            SamplingParams(seed=seed)
    for seed in SEED_RANGE:
        params = SamplingParams(max_tokens=2, temperature=1.0, seed=seed, n=64)
        first, again = llm.generate([1, 2, 3], params), llm.generate([1, 2, 3], params)
        assert len(first[0].outputs) == 64
        assert [o.token_ids for o in first[0].outputs] == \
            [o.token_ids for o in again[0].outputs]


# -------------------------------------------------------------- argument types


@pytest.mark.parametrize(("prompts", "match"), [
    ([1.7, 2.2], r"prompts\[0\] is float 1.7: .*token ids are ints"),
    ([1, "a"], r"prompt\[1\] is str 'a': token ids must be ints"),
    (["a", 5], r"prompts\[1\] is int 5: each prompt must be a str or a list of int"),
    ([[1, 2], [3, 4.0]], r"prompts\[1\]\[1\] is float"),
    (None, "prompts must be a str, a list of int token ids.*got NoneType"),
    (123, "prompts must be a str.*got int"),
    ({"prompt": "hi"}, "prompts must be a str.*got dict"),
    (b"hello", "prompts is bytes: pass text as a str"),
    (bytearray(b"hi"), "prompts is bytearray"),
    ([b"hello"], r"prompts\[0\] is bytes"),
    ([True, False], r"prompt\[0\] is bool True"),
    (np.array([1.0, 2.0]), "numpy array of float64: token ids must be integers"),
    (np.array([[1, 2], [3, 4]]), "2-D numpy array"),
    (torch.tensor([True]), "torch tensor of bool"),
    (torch.tensor(5), "0-D torch tensor"),
])
def test_bad_prompts_are_type_errors(llm: LLM, prompts: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        llm.generate(prompts, PARAMS)
    assert not llm.engine.has_unfinished


def test_bad_params_messages_and_encode_arguments(llm: LLM) -> None:
    with pytest.raises(TypeError, match=r"params must be an engine.sampling.SamplingParams.*"
                                        r"got dict: build one with SamplingParams\(\*\*"):
        llm.generate("hi", {"max_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.chat(CHAT, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got one message \(a dict\): wrap it in a list"):
        llm.chat({"role": "user", "content": "hi"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got one message"):
        next(llm.stream({"role": "user", "content": "hi"}))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes a list of .* got NoneType"):
        llm.chat(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"prompt\[0\] is float 1.5"):
        llm.encode([1.5])  # was silently truncated to token 1
    with pytest.raises(TypeError, match="prompt must be a str or a sequence of int token ids"):
        llm.encode(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompt must be a str"):
        next(llm.stream(None))  # type: ignore[arg-type]
    assert not llm.engine.has_unfinished


def test_arrays_and_tensors_of_token_ids_are_prompts(llm: LLM) -> None:
    ids = [1, 2, 3, 4]
    ref = ids_of(llm.generate(ids, PARAMS))
    prompts: list[Any] = [np.array(ids), np.array(ids, dtype=np.int32), torch.tensor(ids),
                          torch.tensor(ids, dtype=torch.int32), tuple(ids),
                          [np.int64(t) for t in ids]]
    for prompt in prompts:
        assert ids_of(llm.generate(prompt, PARAMS)) == ref
        assert llm.encode(prompt) == ids
        assert [o.token_ids for o in llm.stream(prompt, PARAMS)][-1] == ref[0]
    batch: list[Any] = [np.array(ids), torch.tensor([5, 6]), "Hi", [7, 8]]
    expected = ids_of(llm.generate([ids, [5, 6], "Hi", [7, 8]], PARAMS))
    assert ids_of(llm.generate(batch, PARAMS)) == expected
    assert llm.generate([], PARAMS) == [] and llm.chat([], PARAMS) == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"gpu_kv_bytes": "1GiB"}, r"gpu_kv_bytes must be an int or None, got str '1GiB'.*"
                               r"parse_size\('1GiB'\)"),
    ({"tenant": 5}, "tenant must be a str, got int 5"),
    ({"gpu_blocks": 4.0}, "gpu_blocks must be an int or None, got float"),
    ({"max_num_seqs": "8"}, "max_num_seqs must be an int"),
    ({"enable_cache": "no"}, "enable_cache must be True or False"),
    ({"gpu_memory_fraction": "0.5"}, "gpu_memory_fraction must be a number"),
    ({"device": 0.5}, "device must be a str or None"),
    ({"redis_url": 6379}, "redis_url must be a str or None"),
])
def test_bad_engine_arguments_are_type_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        LLM("tiny", load_format="dummy", **kwargs)


def test_a_host_tier_too_small_for_one_block_is_refused(cache_dir: str) -> None:
    """``host_bytes`` below one block used to mean no host tier, silently."""
    with pytest.raises(ValueError, match="holds no KV block of this model"):
        tiny(cache_dir, host_bytes=1)

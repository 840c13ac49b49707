"""``kvstore serve`` end to end: a real server process, the real SmolLM2, the official
``openai`` client (and raw HTTP for malformed requests).

Covered: greedy output equal to the in-process engine, streamed or not; chat reuse of
the cached history (``usage.prompt_tokens_details.cached_tokens``); ``n`` with seeds;
stop strings (never leaked by a stream); ``/v1/models``; concurrent clients equal to
sequential ones; a table of bad requests answered with OpenAI error objects while the
server stays up; bearer auth; a disconnecting client aborting its request; graceful
SIGTERM with a request in flight; the disk tier surviving a restart; ``--help`` and bad
flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from engine.async_engine import AsyncEngine, EngineStoppedError
from engine.llm import LLM
from engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"
SYSTEM = ("You are a friendly assistant for a small bakery in Lyon. Answer questions about "
          "bread, pastry, opening hours and prices in one or two short sentences.")
QUESTION = "What is the capital of France?"
LISTENING = re.compile(r"listening on (http://[0-9.]+:[0-9]+)")
START_TIMEOUT_S = 300.0  # a cold model conversion on a slow machine


def _die_with_parent() -> None:
    """``preexec_fn``: Linux kills the server if the test process dies first."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


@dataclass
class Server:
    """A running ``python -m kvstore serve`` child process."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                             timeout=300)

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None, str]:
        """One raw request: status, parsed JSON body (``None`` if not JSON), raw text."""
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        try:
            conn.request(method, path, body=body, headers={
                "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                **(headers or {})})
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return resp.status, parsed, text


@contextlib.contextmanager
def running_server(tmp: Path, cache: Path, *flags: str, api_key: str | None = None
                   ) -> Iterator[Server]:
    """Start a server on a free port, wait for its 'listening on' log line, and kill it
    on exit, whatever happened."""
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "KVSTORE_API_KEY"}
    env.update(OMP_NUM_THREADS="1", KVSTORE_HOME=str(tmp / "home"))
    if api_key is not None:
        env["KVSTORE_API_KEY"] = api_key
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--port", "0", "--device", "cpu",
             "--dtype", "float32", "--gpu-kv-bytes", "180MiB", "--max-num-seqs", "16",
             "--model-cache-dir", str(cache), *flags],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            match = LISTENING.search(log.read_text(errors="replace"))
            if match:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start (exit {proc.poll()}):\n"
                                     f"{log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield Server(proc, match.group(1), log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "models"


@pytest.fixture(scope="module")
def reference(cache: Path) -> Iterator[LLM]:
    """The same model in process (converting it once for the module's servers too)."""
    llm = LLM("smollm2", device="cpu", dtype="float32", gpu_blocks=64,
              model_cache_dir=str(cache))
    try:
        yield llm
    finally:
        llm.close()


@pytest.fixture(scope="module")
def server(reference: LLM, cache: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve"), cache, api_key=API_KEY) as srv:
        yield srv
        assert srv.proc.poll() is None, srv.log_text()
        assert "Traceback" not in srv.log_text(), srv.log_text()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.client()


def chat(client: openai.OpenAI, messages: list[dict[str, str]], **kw: Any) -> Any:
    kw.setdefault("model", "smollm2")
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(messages=messages, **kw)


def stream_chat(client: openai.OpenAI, messages: list[dict[str, str]], **kw: Any
                ) -> tuple[dict[int, str], dict[int, str], list[Any]]:
    """Texts and finish reasons by choice index from a streamed chat, and the chunks."""
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 16)
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages,
                                                 stream=True, **kw))
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                assert choice.index not in reasons, "two finish reasons for one choice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------- AsyncEngine


def test_async_engine_batches_callers_and_matches_the_engine(reference: LLM) -> None:
    prompts = [reference.encode_chat(user(q)) for q in
               ("Name a color.", "What is 2 + 2?", "Say hello in French.")]
    params = SamplingParams(max_tokens=10)
    expected = [o.token_ids for o in reference.generate(prompts, params)]

    async def collect(engine: AsyncEngine, i: int) -> list[Any]:
        return [out async for out in engine.generate(prompts[i], params, f"r{i}")]

    async def main(engine: AsyncEngine) -> list[list[Any]]:
        return await asyncio.gather(*(collect(engine, i) for i in range(len(prompts))))

    engine = AsyncEngine(reference)
    try:
        runs = asyncio.run(main(engine))
        again = asyncio.run(main(engine))  # a second event loop: same engine thread
        counters = engine.counters()
    finally:
        engine.shutdown()
    for snaps, want in zip(runs, expected):
        assert snaps[-1].finished and snaps[-1].token_ids == want
        assert not any(s.finished for s in snaps[:-1])
        for a, b in zip(snaps, snaps[1:]):  # cumulative: each extends the one before
            assert b.token_ids[:len(a.token_ids)] == a.token_ids
    assert [r[-1].token_ids for r in again] == expected
    assert (counters.submitted, counters.finished, counters.running) == (6, 6, 0)
    assert counters.steps < sum(len(t) for t in expected) * 2  # batched, not one by one


def test_async_engine_refusals_cancellation_and_shutdown(reference: LLM) -> None:
    prompt = reference.encode("Count to a thousand:")
    long = SamplingParams(max_tokens=4000, ignore_eos=True)

    async def main(engine: AsyncEngine) -> None:
        with pytest.raises(ValueError, match="empty"):
            await anext(engine.generate([], long, "empty"))
        with pytest.raises(ValueError, match="vocabulary"):
            await anext(engine.generate([10**9], long, "oov"))
        first = engine.generate(prompt, long, "dup")
        await anext(first)
        with pytest.raises(ValueError, match="already running"):
            await anext(engine.generate(prompt, long, "dup"))
        await first.aclose()  # closing early aborts

        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(prompt, long, "cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await engine.run_on_engine(lambda llm: llm.engine.has_unfinished) is False
        assert engine.counters().aborted == 2
        with pytest.raises(ZeroDivisionError):
            await engine.run_on_engine(lambda llm: 1 / 0)

        running = engine.generate(prompt, long, "cut-off")
        await anext(running)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineStoppedError):
            async for _ in running:
                pass
        with pytest.raises(EngineStoppedError):
            await anext(engine.generate(prompt, long, "late"))
        with pytest.raises(EngineStoppedError):
            await engine.run_on_engine(lambda llm: None)

    engine = AsyncEngine(reference)
    try:
        asyncio.run(main(engine))
    finally:
        engine.shutdown()
    assert not engine.running and not reference.engine.has_unfinished
    assert reference.generate("Hi", SamplingParams(max_tokens=2))[0].finished


# ---------------------------------------------------------------------------- server


def test_models_lists_the_served_names(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["smollm2", "SmolLM2-135M-Instruct"]
    assert client.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, user(QUESTION), model="gpt-4o")
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_greedy_chat_equals_the_engine_streamed_or_not(client: openai.OpenAI,
                                                       reference: LLM) -> None:
    messages = [{"role": "system", "content": SYSTEM}, *user(QUESTION)]
    expected = reference.chat(messages, SamplingParams(max_tokens=16))
    assert expected.text

    full = chat(client, messages)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    (choice,) = full.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert full.usage.prompt_tokens == expected.prompt_tokens
    assert full.usage.completion_tokens == len(expected.token_ids)
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    tiny = chat(client, messages, temperature=1e-40)  # would overflow: treated as greedy
    assert tiny.choices[0].message.content == expected.text

    texts, reasons, chunks = stream_chat(client, messages,
                                         stream_options={"include_usage": True})
    assert texts == {0: expected.text} and reasons == {0: choice.finish_reason}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == len(expected.token_ids)
    assert last.usage.prompt_tokens == expected.prompt_tokens

    plain = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    ref = reference.generate("The capital of France is", SamplingParams(max_tokens=8))[0]
    assert plain.object == "text_completion" and plain.choices[0].text == ref.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True) if c.choices)
    assert streamed == ref.text


def test_second_chat_turn_reuses_the_cached_history(client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You help tourists in Kyoto. " + SYSTEM}
    turn1 = [system, *user("Where can I eat ramen?")]
    first = chat(client, turn1)
    reply = first.choices[0].message.content
    turn2 = [*turn1, {"role": "assistant", "content": reply}, *user("And sushi?")]
    second = chat(client, turn2)
    details = second.usage.prompt_tokens_details
    assert details.cached_tokens > 0
    assert details.cached_tokens >= first.usage.prompt_tokens // 16 * 16
    by_tier = (details.model_extra or {})["cached_tokens_by_tier"]
    assert sum(by_tier.values()) == details.cached_tokens and by_tier.get("gpu", 0) > 0
    # Streamed with usage: the same accounting.
    *_, chunks = stream_chat(client, turn2, stream_options={"include_usage": True})
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= details.cached_tokens


def test_n_choices_with_a_seed_are_reproducible(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"n": 2, "temperature": 0.9, "top_p": 0.95, "seed": 1234,
                          "max_tokens": 10, "extra_body": {"top_k": 40}}
    first = chat(client, user("Name a fruit."), **kw)
    again = chat(client, user("Name a fruit."), **kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert 2 <= first.usage.completion_tokens <= 2 * 10
    texts, reasons, _ = stream_chat(client, user("Name a fruit."), **kw)
    assert texts == {c.index: c.message.content for c in first.choices}
    assert reasons == {c.index: c.finish_reason for c in first.choices}
    greedy = chat(client, user("Name a fruit."), n=2, max_tokens=6)
    single = chat(client, user("Name a fruit."), max_tokens=6)
    assert [c.message.content for c in greedy.choices] == [single.choices[0].message.content] * 2
    assert greedy.usage.completion_tokens == 2 * single.usage.completion_tokens
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens


def test_stop_strings_cut_the_text_and_never_leak_into_a_stream(client: openai.OpenAI) -> None:
    messages = user(QUESTION)
    full = chat(client, messages, max_tokens=24).choices[0].message.content
    spaces = [i for i, ch in enumerate(full) if ch == " "]
    assert len(spaces) >= 3, full
    cut = spaces[2]
    spanning = full[cut - 2:cut + 3]  # the end of one word, a space, the start of the next
    for stop in (spanning, [spanning, "\u2603never"]):
        expected = full[:full.find(spanning)]
        out = chat(client, messages, max_tokens=24, stop=stop).choices[0]
        assert (out.message.content, out.finish_reason) == (expected, "stop")
        texts, reasons, chunks = stream_chat(client, messages, max_tokens=24, stop=stop)
        assert texts == {0: expected} and reasons == {0: "stop"}
        assert all(spanning not in (c.choices[0].delta.content or "")
                   for c in chunks if c.choices)


def test_concurrent_requests_equal_sequential_ones(client: openai.OpenAI) -> None:
    prompts = [f"Give me one word that rhymes with {w}." for w in
               ("cat", "tree", "blue", "light", "stone", "rain", "bread", "moon")]

    def ask(i: int) -> tuple[str, str]:
        if i % 2:
            texts, reasons, _ = stream_chat(client, user(prompts[i]), max_tokens=12)
            return texts[0], reasons[0]
        choice = chat(client, user(prompts[i]), max_tokens=12).choices[0]
        return choice.message.content, choice.finish_reason

    sequential = [ask(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        parallel = list(pool.map(ask, range(len(prompts))))
    assert parallel == sequential
    assert all(text for text, _ in sequential)


def _error_of(status: int, body: dict[str, Any] | None, text: str) -> dict[str, Any]:
    assert body is not None, text
    assert "Traceback" not in text
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert {"param", "code"} <= err.keys()
    return err


GOOD_CHAT: dict[str, Any] = {"model": "smollm2", "messages": user("Hi"), "max_tokens": 2}

BAD_REQUESTS: list[tuple[str, str, str, Any, int, str | None]] = [
    # (name, method, path, body: dict -> JSON, str -> raw, status, expected param)
    ("not json", "POST", "/v1/chat/completions", "{model: smollm2", 400, None),
    ("not utf-8", "POST", "/v1/chat/completions", "\udcff", 400, None),
    ("json array", "POST", "/v1/chat/completions", "[1, 2]", 400, None),
    ("empty body", "POST", "/v1/chat/completions", "", 400, None),
    ("no messages", "POST", "/v1/chat/completions", {"model": "smollm2"}, 400, "messages"),
    ("empty messages", "POST", "/v1/chat/completions", {**GOOD_CHAT, "messages": []}, 400,
     "messages"),
    ("message not object", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": ["hi"]}, 400, "messages[0]"),
    ("bad role", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("content number", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("image part", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
     "messages[0].content"),
    ("tool call message", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
     400, "messages[0].tool_calls"),
    ("unknown model", "POST", "/v1/chat/completions", {**GOOD_CHAT, "model": "gpt-4o"}, 404,
     "model"),
    ("model not string", "POST", "/v1/chat/completions", {**GOOD_CHAT, "model": 7}, 400,
     "model"),
    ("temperature string", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", "POST", "/v1/chat/completions", {**GOOD_CHAT, "temperature": 5},
     400, "temperature"),
    ("top_p zero", "POST", "/v1/chat/completions", {**GOOD_CHAT, "top_p": 0}, 400, "top_p"),
    ("top_k negative", "POST", "/v1/chat/completions", {**GOOD_CHAT, "top_k": -5}, 400,
     "top_k"),
    ("max_tokens zero", "POST", "/v1/chat/completions", {**GOOD_CHAT, "max_tokens": 0}, 400,
     "max_tokens"),
    ("max_tokens string", "POST", "/v1/chat/completions", {**GOOD_CHAT, "max_tokens": "9"},
     400, "max_tokens"),
    ("max_tokens past the context", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "max_tokens": 100_000}, 400, "max_tokens"),
    ("two different max lengths", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "max_completion_tokens": 3}, 400, "max_completion_tokens"),
    ("n zero", "POST", "/v1/chat/completions", {**GOOD_CHAT, "n": 0}, 400, "n"),
    ("n huge", "POST", "/v1/chat/completions", {**GOOD_CHAT, "n": 1000}, 400, "n"),
    ("seed float", "POST", "/v1/chat/completions", {**GOOD_CHAT, "seed": 1.5}, 400, "seed"),
    ("seed too large", "POST", "/v1/chat/completions", {**GOOD_CHAT, "seed": 2**64}, 400,
     "seed"),
    ("stop number", "POST", "/v1/chat/completions", {**GOOD_CHAT, "stop": 5}, 400, "stop"),
    ("stop empty string", "POST", "/v1/chat/completions", {**GOOD_CHAT, "stop": [""]}, 400,
     "stop"),
    ("stream not bool", "POST", "/v1/chat/completions", {**GOOD_CHAT, "stream": "yes"}, 400,
     "stream"),
    ("stream_options without stream", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("logprobs", "POST", "/v1/chat/completions", {**GOOD_CHAT, "logprobs": True}, 400,
     "logprobs"),
    ("top_logprobs", "POST", "/v1/chat/completions", {**GOOD_CHAT, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("tools", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("json mode", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("penalty", "POST", "/v1/chat/completions", {**GOOD_CHAT, "presence_penalty": 1}, 400,
     "presence_penalty"),
    ("unknown field", "POST", "/v1/chat/completions", {**GOOD_CHAT, "temprature": 0}, 400,
     "temprature"),
    ("longer than the KV pool", "POST", "/v1/completions",
     {"model": "smollm2", "prompt": [1] * 4000, "max_tokens": 200, "n": 2}, 400,
     "max_tokens"),
    ("prompt fills the KV pool", "POST", "/v1/completions",
     {"model": "smollm2", "prompt": [1] * 4096}, 400, "prompt"),
    ("no prompt", "POST", "/v1/completions", {"model": "smollm2"}, 400, "prompt"),
    ("empty prompt list", "POST", "/v1/completions", {"model": "smollm2", "prompt": []}, 400,
     "prompt"),
    ("empty token list", "POST", "/v1/completions", {"model": "smollm2", "prompt": [[]]}, 400,
     "prompt"),
    ("token out of vocabulary", "POST", "/v1/completions",
     {"model": "smollm2", "prompt": [1, 10_000_000]}, 400, "prompt"),
    ("negative token", "POST", "/v1/completions", {"model": "smollm2", "prompt": [-1]}, 400,
     "prompt"),
    ("echo", "POST", "/v1/completions", {"model": "smollm2", "prompt": "a", "echo": True},
     400, "echo"),
    ("completion logprobs", "POST", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ("nested too deeply", "POST", "/v1/chat/completions", "[" * 100_000 + "]" * 100_000, 400,
     None),
    ("lone surrogate in a prompt", "POST", "/v1/completions",
     '{"model": "smollm2", "prompt": "a\\ud800", "max_tokens": 2}', 400, "prompt"),
    ("lone surrogate in a message", "POST", "/v1/chat/completions",
     '{"model": "smollm2", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages[0].content"),
    ("negative stop token id", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "stop_token_ids": [-5]}, 400, "stop_token_ids"),
    ("too many prompts", "POST", "/v1/completions",
     {"model": "smollm2", "prompt": ["ab"] * 200, "max_tokens": 1}, 400, "prompt"),
    ("model name with a slash", "GET", "/v1/models/org/model", None, 404, "model"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, None),
    ("unknown route", "POST", "/v1/embeddings", {"model": "smollm2", "input": "a"}, 404, None),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "status", "param"), BAD_REQUESTS,
                         ids=[row[0] for row in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server: Server, name: str, method: str, path: str,
                                        body: Any, status: int, param: str | None) -> None:
    raw = None if body is None else (
        body.encode("utf-8", "surrogateescape") if isinstance(body, str) else
        json.dumps(body).encode())
    got, parsed, text = server.http(method, path, raw)
    assert got == status, text
    err = _error_of(got, parsed, text)
    if param is not None:
        assert err["param"] == param, err
    assert server.proc.poll() is None


def test_server_stays_up_after_bad_requests(server: Server, client: openai.OpenAI) -> None:
    status, body, _ = server.http("POST", "/v1/completions", b"x" * (17 << 20))
    assert status == 413 and body is not None and "too large" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, user("Hi"), logprobs=True)
    assert "logprobs" in err.value.message
    assert server.http("GET", "/healthz")[:2] == (200, {"status": "ok"})
    assert chat(client, user("Hi"), max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_api_key_is_required_except_for_healthz(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()
    for headers in ({"Authorization": ""}, {"Authorization": "Basic " + API_KEY},
                    {"Authorization": "Bearer " + API_KEY[:-1]}):
        status, body, text = server.http("GET", "/v1/models", headers=headers)
        assert status == 401 and _error_of(status, body, text)["code"] == "invalid_api_key"
    assert server.http("GET", "/healthz", headers={"Authorization": ""})[0] == 200


def _stats(server: Server) -> dict[str, Any]:
    status, body, text = server.http("GET", "/v1/stats")
    assert status == 200 and body is not None, text
    return body


def _wait_for(predicate: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def test_a_client_that_disconnects_aborts_its_request(server: Server) -> None:
    before = _stats(server)["requests"]
    host, port = server.url.removeprefix("http://").split(":")
    for stream in (True, False):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = {"model": "smollm2", "prompt": "Count to a million:", "max_tokens": 4000,
                "ignore_eos": True, "temperature": 0, "stream": stream}
        conn.request("POST", "/v1/completions", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {API_KEY}"})
        if stream:
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.readline().startswith(b"data: ")  # generation is under way
        else:
            _wait_for(lambda: _stats(server)["requests"]["running"] == 1, "the request")
        conn.sock.shutdown(2)  # type: ignore[union-attr]
        conn.close()
    _wait_for(lambda: _stats(server)["requests"]["aborted"] == before["aborted"] + 2,
              "both requests to be aborted")
    after = _stats(server)["requests"]
    assert after["running"] == 0 and after["finished"] == before["finished"]


def test_sigterm_drains_requests_a_second_one_cuts_them_and_the_disk_survives(
        reference: LLM, cache: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    flags = ("--disk", str(disk), "--disk-bytes", "64MiB", "--host-bytes", "24MiB",
             "--policy", "write-through", "--served-model-name", "tiny")
    messages = [{"role": "system", "content": SYSTEM}, *user("Do you bake rye bread?")]
    with running_server(tmp_path / "a", cache, *flags) as srv:
        log = srv.log_text()
        assert "tier disk: LMDB in" in log and "64.0 MiB" in log and "tier host DRAM" in log
        client = srv.client()
        assert [m.id for m in client.models.list()] == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="smollm2", messages=messages, max_tokens=2)
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24,
                                                temperature=0, stream=True, extra_body={
                                                    "ignore_eos": True})
        chunks = [next(stream), next(stream)]  # the role, then the first token
        srv.proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert srv.proc.wait(timeout=120) == 0
        log = srv.log_text()
        assert "received SIGTERM" in log and "stopped" in log and "Traceback" not in log
    expected = reference.chat(messages, SamplingParams(max_tokens=24, ignore_eos=True))
    assert text == expected.text
    with running_server(tmp_path / "b", cache, *flags) as srv:
        again = srv.client().chat.completions.create(model="tiny", messages=messages,
                                                     max_tokens=2, temperature=0)
        details = again.usage.prompt_tokens_details
        assert (details.model_extra or {})["cached_tokens_by_tier"].get("disk", 0) \
            >= again.usage.prompt_tokens // 16 * 16 > 0
        # A second signal while draining cuts the request off with an error event.
        host, port = srv.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("POST", "/v1/completions", body=json.dumps({
            "model": "tiny", "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True,
            "stream": True}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        srv.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: "received SIGTERM:" in srv.log_text(), "the first SIGTERM")
        srv.proc.send_signal(signal.SIGTERM)
        events = [line for line in resp.read().decode().splitlines() if line]
        conn.close()
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and "shutting down" in error["message"]
        assert srv.proc.wait(timeout=120) == 0
        assert "received SIGTERM again" in srv.log_text()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore", "serve", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize(("args", "message"), [
    (("--disk-bytes", "lots"), "not a size"),
    (("--port", "70000"), "not a TCP port"),
    (("--gpu-kv-bytes", "lots"), "not a size"),
    (("--max-num-seqs", "0"), "must be >= 1"),
    (("--dtype", "int3"), "invalid choice"),
    (("--no-disk", "--disk", "/tmp"), "not allowed with argument --no-disk"),
    (("--disk", "/etc/passwd"), "is a file, not a directory"),
    (("--disk", "/tmp/kvstore-never-made", "--disk-bytes", "0"), "--disk-bytes must be > 0"),
    (("--host-bytes", "99999999TiB"), "more than this machine's memory"),
])
def test_bad_flags_are_clear_errors(args: Sequence[str], message: str) -> None:
    out = _cli(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_help_names_every_flag() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    for flag in ("--model", "--host", "--port", "--device", "--dtype", "--gpu-kv-bytes",
                 "--host-bytes", "--disk", "--disk-bytes", "--redis", "--remote",
                 "--max-num-seqs", "--served-model-name", "--api-key", "--model-cache-dir"):
        assert flag in out.stdout
    assert "/v1/chat/completions" in out.stdout and "KVSTORE_API_KEY" in out.stdout


def test_a_port_in_use_fails_cleanly(server: Server, cache: Path) -> None:
    port = server.url.rsplit(":", 1)[1]
    out = _cli("--port", port, "--device", "cpu", "--dtype", "float32", "--gpu-kv-bytes", "12MiB",
               "--no-disk",
               "--model-cache-dir", str(cache), timeout=300)
    assert out.returncode == 1 and "cannot start" in out.stderr
    assert "Traceback" not in out.stderr



# ---------------------------------------------------------------------------- first-hour findings


def _scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, text = server.http("GET", "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_show_requests_tokens_and_prefix_cache_hits(server: Server,
                                                            client: openai.OpenAI) -> None:
    before = _scrape(server)
    turn1 = [{"role": "system", "content": "You answer about Lisbon. " + SYSTEM},
             *user("Where is the castle?")]
    first = chat(client, turn1)
    second = chat(client, [*turn1, {"role": "assistant",
                                    "content": first.choices[0].message.content},
                           *user("And the tram?")])
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    assert delta("kvstore_prefix_cache_hits_total", tier="gpu") >= cached
    assert delta("kvstore_prefix_cache_queries_total") >= (first.usage.prompt_tokens
                                                           + second.usage.prompt_tokens - 2)
    assert delta("kvstore_serve_prompt_tokens_total") == (first.usage.prompt_tokens
                                                          + second.usage.prompt_tokens)
    assert delta("kvstore_serve_generation_tokens_total") == (
        first.usage.completion_tokens + second.usage.completion_tokens)
    assert delta("kvstore_serve_time_to_first_token_seconds_count") == 2
    tokens_after_first = first.usage.completion_tokens + second.usage.completion_tokens - 2
    assert delta("kvstore_serve_inter_token_latency_seconds_count") == tokens_after_first
    assert delta("kvstore_serve_requests_total", endpoint="chat_completions", code="200") == 2
    assert after[("kvstore_serve_sequences_running", ())] == 0
    assert after[("kvstore_kv_pool_capacity_blocks", (("pool", "gpu"),))] == 256
    assert 0 < after[("kvstore_kv_pool_usage_ratio", (("pool", "gpu"),))] <= 1
    assert ("kvstore_serve_preemptions_total", ()) in after
    assert ("kvstore_tier_errors_total", (("tier", "disk"),)) in after  # the default disk tier


def test_n_choices_count_the_prompt_once_as_documented(client: openai.OpenAI) -> None:
    chat(client, user(QUESTION), max_tokens=4)  # warm the prefix cache
    double = chat(client, user(QUESTION), max_tokens=4, n=2)
    single = chat(client, user(QUESTION), max_tokens=4)
    assert double.usage.prompt_tokens == single.usage.prompt_tokens
    assert (double.usage.prompt_tokens_details.cached_tokens
            == single.usage.prompt_tokens_details.cached_tokens > 0)
    assert double.usage.completion_tokens == 2 * single.usage.completion_tokens
    doc = (ROOT / "docs" / "server.md").read_text()
    assert "counted once per prompt" in doc
    assert "summed over the choices and prompts" not in doc


def test_a_huge_prompt_is_refused_before_tokenizing(server: Server) -> None:
    """A 10 MB prompt cannot fit the context: it is refused from its size, with the limit
    named, and the server keeps answering."""
    text = "word " * (2 << 20)
    status, body, _ = server.http("POST", "/v1/chat/completions", json.dumps({
        "model": "smollm2", "messages": [{"role": "user", "content": text}]}).encode())
    assert status == 400 and body is not None
    assert "refused before tokenizing" in body["error"]["message"]
    assert body["error"]["param"] == "messages"
    status, body, _ = server.http("POST", "/v1/completions", json.dumps({
        "model": "smollm2", "prompt": text, "max_tokens": 1}).encode())
    assert status == 400 and "refused before tokenizing" in body["error"]["message"]  # type: ignore[index]
    assert server.http("GET", "/healthz")[0] == 200


def test_llm_refuses_malformed_chat_messages(reference: LLM) -> None:
    for messages, where in (([{"role": "user"}], "messages[0]['content']"),
                            ([{"content": "hi"}], "messages[0]['role']"),
                            ([{"role": "user", "content": "hi"}, "text"], "messages[1]")):
        with pytest.raises(ValueError, match=re.escape(where)):
            reference.chat(messages)  # type: ignore[arg-type]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line() -> None:
    out = _cli("--device", "cuda", "--no-disk", timeout=300)
    assert out.returncode == 1 and "no CUDA device" in out.stderr
    assert "Traceback" not in out.stderr


def test_listening_beyond_loopback_needs_an_api_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KVSTORE_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 2 and "refusing to listen on 0.0.0.0" in out.stderr
    assert "KVSTORE_API_KEY" in out.stderr


@pytest.mark.parametrize("command", ["serve", "router"])
def test_an_api_key_no_client_could_send_is_refused(command: str) -> None:
    """A key read from a file with its newline would make every request a 401."""
    env = dict(os.environ, KVSTORE_API_KEY="secretkey123\n")
    out = subprocess.run([sys.executable, "-m", "kvstore", command,
                          *(["--replica", "http://127.0.0.1:9"] if command == "router" else [])],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 2 and "whitespace" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_model_conversions_go_under_kvstore_home(tmp_path: Path) -> None:
    code = ("from engine.llm import LLM; LLM('smollm2', device='cpu', dtype='float32', "
            "gpu_blocks=4).close()")
    env = dict(os.environ, KVSTORE_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert any((tmp_path / "home" / "models").iterdir())

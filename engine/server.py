"""``kvstore serve``: an OpenAI-compatible HTTP server on the embedded engine.

Endpoints (JSON bodies, OpenAI's shapes):

- ``POST /v1/chat/completions`` and ``POST /v1/completions``: generation, streamed as
  server-sent events with ``"stream": true``.
- ``GET /v1/models`` and ``GET /v1/models/{model}``: the served model names.
- ``GET /v1/stats``: request counters and the KV store's counters (non-standard).
- ``GET /healthz``: liveness (200 ``{"status": "ok"}``; 503 while shutting down).

Every prompt goes through the tiered store: ``usage.prompt_tokens_details.cached_tokens``
counts the prompt tokens whose KV was reused, and the non-standard
``usage.prompt_tokens_details.cached_tokens_by_tier`` says from which tier. The
non-standard request field ``"return_token_ids": true`` adds each choice's generated
``token_ids`` (streamed: the new ids of each chunk), for clients that send token ids
(``--load-format dummy`` without a tokenizer has no text). Errors are
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (5xx only
for engine failures), never a traceback. With an API key (``--api-key`` or
``$KVSTORE_API_KEY``) every route but ``/healthz`` needs ``Authorization: Bearer KEY``.

One :class:`~engine.async_engine.AsyncEngine` thread runs the model; requests join its
running batch as they arrive (continuous batching). A client that disconnects aborts its
request. SIGINT/SIGTERM stop accepting connections, let requests in flight finish (up to
``--shutdown-timeout``), then stop the engine and close (flush) the cache tiers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from kvstore import __version__, env
from kvstore.units import format_size, parse_size

logger = logging.getLogger("kvstore.serve")

MAX_BODY_BYTES = 16 << 20
"""Largest request body (bytes); larger bodies get 413."""
MAX_STOP = 16
"""Most stop strings in one request."""
MAX_CHOICES = 128
"""Most sequences one request may generate (prompts x ``n``)."""
MIN_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (dividing logits by less overflows to NaN)."""
SEED_RANGE = (-(1 << 63), (1 << 63) - 1 - 64)
"""Seeds torch accepts, leaving room for ``seed + i`` of ``n`` sequences."""

_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user",
               "assistant": "assistant"}
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
"""Accepted and ignored: they do not change what is generated."""
_COMMON = frozenset({"model", "stream", "stream_options", "temperature", "top_p", "top_k",
                     "seed", "n", "stop", "max_tokens", "presence_penalty",
                     "frequency_penalty", "logit_bias", "logprobs", "ignore_eos",
                     "stop_token_ids", "return_token_ids"}) | _IGNORED
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                          "tool_choice", "functions", "function_call", "response_format",
                          "modalities", "audio", "prediction", "reasoning_effort",
                          "web_search_options"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}


# ---------------------------------------------------------------------------- errors


class APIError(Exception):
    """A refusal, answered as an OpenAI error object with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``type`` is ``invalid_request_error`` for 4xx statuses and
    ``server_error`` for 5xx."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(status: int, message: str, param: str | None = None,
                    code: str | None = None,
                    headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status,
                             headers=dict(headers or {}))


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


# ---------------------------------------------------------------------------- state


@dataclass
class ServerState:
    """What the handlers share: the engine, the names it answers to, auth and limits.

    ``model_names``: the first is the canonical name (listed first by ``/v1/models``);
    any of them is accepted as a request's ``model``. ``max_context``: the most tokens
    (prompt + completion) one sequence may hold: the model's context window, or the KV
    pool's capacity when that is smaller (a sequence must fit in the pool on its own).
    """

    engine: Any  # engine.async_engine.AsyncEngine (imported lazily: --help stays fast)
    model_names: tuple[str, ...]
    api_key: str | None
    max_context: int
    fingerprint: str
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    stopping: bool = False


STATE = web.AppKey("kvstore_serve_state", ServerState)


# ---------------------------------------------------------------------------- parsing


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float,
            *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{name}' must be a number, got {_json_kind(value)}", name)
    low_ok = value > lo if lo_open else value >= lo
    if not (low_ok and value <= hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(f"'{name}' must be in {interval}, got {value!r}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int | None = None,
             hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {_json_kind(value)}", name)
    if lo is not None and value < lo:
        raise _bad(f"'{name}' must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise _bad(f"'{name}' must be <= {hi}, got {value}", name)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be a boolean, got {_json_kind(value)}", name)
    return value


def _unsupported(name: str, what: str = "") -> APIError:
    return APIError(400, f"'{name}' is not supported by this server{what}", param=name,
                    code="unsupported_parameter")


@dataclass(frozen=True)
class Options:
    """The parts of a request body shared by both generation endpoints."""

    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    n: int
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    return_token_ids: bool = False


def parse_options(body: Mapping[str, Any], kind: str, state: ServerState) -> Options:
    """Validate the common fields of a ``chat`` or ``completion`` body (``APIError``
    400 naming the field; 404 for an unknown model). Unknown fields are refused, as
    OpenAI does, and so are features this server does not implement (log probabilities,
    penalties, tools, structured output)."""
    allowed = _CHAT_FIELDS if kind == "chat" else _COMPLETION_FIELDS
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}",
                       param=unknown[0], code="unknown_parameter")
    model = body.get("model", state.model_names[0])
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {_json_kind(model)}", "model")
    if model not in state.model_names:
        raise APIError(404, f"The model '{model}' does not exist; this server serves "
                            f"{', '.join(state.model_names)}", param="model",
                       code="model_not_found")
    _refuse_unsupported(body, kind)
    stream = _flag(body, "stream")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(stream_options, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        extra = sorted(set(stream_options) - {"include_usage"})
        if extra:
            raise _bad(f"unknown 'stream_options' field(s): {', '.join(extra)}", "stream_options")
        include_usage = _flag(stream_options, "include_usage")
    max_tokens = _integer(body, "max_tokens", lo=1)
    if kind == "chat":
        max_completion = _integer(body, "max_completion_tokens", lo=1)
        if max_completion is not None:
            if max_tokens is not None and max_tokens != max_completion:
                raise _bad("give 'max_completion_tokens' or 'max_tokens', not both",
                           "max_completion_tokens")
            max_tokens = max_completion
    elif max_tokens is None:
        max_tokens = 16  # the legacy completions API's default
    top_k = _integer(body, "top_k", lo=-1)
    n = _integer(body, "n", lo=1, hi=64)
    if kind == "completion":
        best_of = _integer(body, "best_of", lo=1)
        if best_of is not None and best_of != (n or 1):
            raise _unsupported("best_of", " (other than equal to 'n')")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    return Options(
        model=model, stream=stream, include_usage=include_usage, max_tokens=max_tokens,
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=0 if top_k in (None, -1) else int(top_k), seed=_integer(body, "seed", *SEED_RANGE),
        n=n or 1, stop=_stop_strings(body.get("stop")),
        stop_token_ids=_token_list(body.get("stop_token_ids"), "stop_token_ids",
                                   allow_empty=True),
        ignore_eos=_flag(body, "ignore_eos"), return_token_ids=_flag(body, "return_token_ids"))


def _refuse_unsupported(body: Mapping[str, Any], kind: str) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise _unsupported(name, " (only 0)")
    if body.get("logit_bias"):
        raise _unsupported("logit_bias")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise _unsupported("logprobs")
    if kind == "chat":
        if body.get("top_logprobs") is not None:
            raise _unsupported("top_logprobs")
        for name in ("tools", "functions", "audio", "prediction", "web_search_options"):
            if body.get(name):
                raise _unsupported(name)
        for name in ("tool_choice", "function_call"):
            if body.get(name) not in (None, "none"):
                raise _unsupported(name)
        if body.get("reasoning_effort") is not None:
            raise _unsupported("reasoning_effort")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise _unsupported("response_format", " (only {\"type\": \"text\"})")
        modalities = body.get("modalities")
        if modalities is not None and modalities != ["text"]:
            raise _unsupported("modalities", " (only [\"text\"])")
    else:
        if _flag(body, "echo"):
            raise _unsupported("echo")
        if body.get("suffix") is not None:
            raise _unsupported("suffix")


def _stop_strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("'stop' must be a string or an array of strings", "stop")
    if len(items) > MAX_STOP:
        raise _bad(f"'stop' may hold at most {MAX_STOP} strings, got {len(items)}", "stop")
    if any(not s for s in items):
        raise _bad("'stop' strings must not be empty", "stop")
    return tuple(items)


def _token_list(value: object, name: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    if value is None:
        return ()
    if (not isinstance(value, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        raise _bad(f"'{name}' must be an array of integer token ids", name)
    if not value and not allow_empty:
        raise _bad(f"'{name}' must not be empty", name)
    return tuple(value)


def parse_messages(value: object) -> list[dict[str, str]]:
    """Chat ``messages`` as ``[{"role", "content"}]`` strings for the chat template.

    ``developer`` is an alias of ``system``; content may be a string or an array of
    ``{"type": "text", "text": ...}`` parts (joined with newlines). Tool calls and
    non-text parts are refused (``APIError`` 400)."""
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty array of {\"role\", \"content\"} objects",
                   "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object, got {_json_kind(message)}", where)
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_CHAT_ROLES)}, got {role!r}",
                       f"{where}.role")
        extra = sorted(set(message) - {"role", "content", "name", "refusal"})
        if extra:
            raise APIError(400, f"{where}: {', '.join(extra)} not supported by this server",
                           param=f"{where}.{extra[0]}", code="unsupported_parameter")
        out.append({"role": _CHAT_ROLES[role],
                    "content": _content(message.get("content"), role, where)})
    return out


def _content(content: object, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise _bad(f"{where}.content[{j}] must be {{\"type\": \"text\", \"text\": "
                           "string}} (only text is supported)", f"{where}.content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"{where}.content must be a string or an array of text parts", f"{where}.content")


def parse_prompts(value: object) -> list[str | list[int]]:
    """A completion ``prompt``: a string, an array of token ids, or an array of either
    (a batch). ``APIError`` 400 otherwise."""
    message = ("'prompt' must be a string, an array of token ids, or an array of strings "
               "or of token-id arrays")

    def is_ids(v: object) -> bool:
        return isinstance(v, list) and bool(v) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        return [value]
    if is_ids(value):
        return [list(value)]  # type: ignore[arg-type]
    if isinstance(value, list) and value and all(isinstance(p, str) or is_ids(p) for p in value):
        return [p if isinstance(p, str) else list(p) for p in value]
    raise _bad(message, "prompt")


def sampling_params(opts: Options, prompt_lens: Sequence[int], max_context: int,
                    prompt_param: str = "messages") -> Any:
    """``SamplingParams`` for the request, with ``max_tokens`` defaulting to the rest of
    the context window; ``APIError`` 400 when a prompt leaves no room or the request asks
    for more than the window holds."""
    from engine.sampling import SamplingParams

    longest = max(prompt_lens)
    room = max_context - longest
    if room < 1:
        raise _bad(f"This server's maximum context length is {max_context} tokens; your "
                   f"prompt has {longest} tokens, leaving no room for a completion",
                   prompt_param)
    if opts.max_tokens is None:
        max_tokens = room
    else:
        max_tokens = opts.max_tokens
        if max_tokens > room:
            raise _bad(f"This server's maximum context length is {max_context} tokens. "
                       f"However, you requested {longest + max_tokens} tokens ({longest} in "
                       f"the prompt, {max_tokens} for the completion). Please reduce the "
                       "prompt or the completion length.", "max_tokens")
    if len(prompt_lens) * opts.n > MAX_CHOICES:
        raise _bad(f"at most {MAX_CHOICES} sequences per request (prompts x n), got "
                   f"{len(prompt_lens) * opts.n}", "n")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=opts.temperature,
                              top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed, n=opts.n,
                              stop_token_ids=opts.stop_token_ids, stop=opts.stop,
                              ignore_eos=opts.ignore_eos)
    except ValueError as exc:
        raise _bad(str(exc)) from None


# ---------------------------------------------------------------------------- streaming


def sendable_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` a stream may send now: everything but a tail that could be
    the start of a stop string (the engine cuts a stop string, and all after it, out
    of the text once it is complete, so such a tail may still disappear)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return len(text) - hold


async def merged(engine: Any, prompts: Sequence[Sequence[int]], params: Any,
                 request_id: str) -> AsyncIterator[tuple[int, Any]]:
    """Run every prompt as its own engine request (``{request_id}-{i}``) and yield
    ``(prompt index, RequestOutput)`` as any of them progresses, until all finished.
    Snapshots waiting when the consumer comes back are coalesced to the newest per
    prompt. An engine error of any prompt is raised; closing the iterator (or
    cancelling its consumer) aborts every unfinished request."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, ids: Sequence[int]) -> None:
        try:
            async with contextlib.aclosing(engine.generate(ids, params, f"{request_id}-{i}")) as gen:
                async for out in gen:
                    queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            latest: dict[int, Any] = {}
            for i, item in batch:
                if isinstance(item, BaseException):
                    raise item
                if item is done:
                    remaining -= 1
                else:
                    latest[i] = item
            for i, out in latest.items():
                yield i, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _SSE:
    """Writes one streamed completion: ``data: {json}`` events and ``data: [DONE]``."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def send(self, obj: Mapping[str, Any]) -> None:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        await self.response.write(b"data: " + data.encode() + b"\n\n")

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")


# ---------------------------------------------------------------------------- responses


def usage(finals: Sequence[Any]) -> dict[str, Any]:
    """OpenAI ``usage`` of finished ``RequestOutput``s (summed over prompts and choices),
    with the cached prompt tokens in total and by tier."""
    by_tier: Counter[str] = Counter()
    for out in finals:
        by_tier.update(out.cached_tokens)
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(by_tier.values()),
                                      "cached_tokens_by_tier": dict(sorted(by_tier.items()))}}


@dataclass(frozen=True)
class _Reply:
    """Envelope fields of one response (and every chunk of a stream)."""

    kind: str  # "chat" or "completion"
    id: str
    created: int
    model: str
    fingerprint: str

    def envelope(self, streaming: bool) -> dict[str, Any]:
        obj = {"chat": ("chat.completion.chunk" if streaming else "chat.completion"),
               "completion": "text_completion"}[self.kind]
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def choice(self, index: int, text: str, finish_reason: str | None,
               streaming: bool, role: bool = False) -> dict[str, Any]:
        if self.kind == "completion":
            return {"index": index, "text": text, "logprobs": None,
                    "finish_reason": finish_reason}
        if streaming:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text or role:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish_reason}


async def _generate(request: web.Request, state: ServerState, reply: _Reply,
                    prompts: list[list[int]], opts: Options) -> web.StreamResponse:
    prompt_param = "prompt" if reply.kind == "completion" else "messages"
    params = sampling_params(opts, [len(p) for p in prompts], state.max_context, prompt_param)
    for ids in prompts:
        try:
            state.engine.validate(ids, params)
        except ValueError as exc:
            raise _bad(str(exc), prompt_param) from None
    if opts.stream:
        return await _stream(request, state, reply, prompts, params, opts)
    finals: dict[int, Any] = {}
    async with contextlib.aclosing(merged(state.engine, prompts, params, reply.id)) as outs:
        try:
            async for i, out in outs:
                if out.finished:
                    finals[i] = out
        except Exception as exc:
            raise _engine_error(exc) from None
    ordered = [finals[i] for i in range(len(prompts))]
    choices = [reply.choice(i * opts.n + c.index, c.text, c.finish_reason, False)
               | ({"token_ids": list(c.token_ids)} if opts.return_token_ids else {})
               for i, out in enumerate(ordered) for c in out.outputs]
    return web.json_response({**reply.envelope(False), "choices": choices,
                              "usage": usage(ordered)})


async def _stream(request: web.Request, state: ServerState, reply: _Reply,
                  prompts: list[list[int]], params: Any, opts: Options) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    sse = _SSE(response)
    n = opts.n
    extra = {"usage": None} if opts.include_usage else {}
    sent: dict[int, int] = {}  # choice index -> characters sent
    ids_sent: dict[int, int] = {}  # choice index -> token ids sent (return_token_ids)
    ended: set[int] = set()
    finals: dict[int, Any] = {}

    async def chunk(index: int, text: str, finish: str | None, role: bool = False,
                    ids: Sequence[int] = ()) -> None:
        choice = reply.choice(index, text, finish, True, role)
        if opts.return_token_ids:
            choice["token_ids"] = list(ids)
        await sse.send({**reply.envelope(True), "choices": [choice], **extra})

    try:
        if reply.kind == "chat":
            for index in range(len(prompts) * n):
                await chunk(index, "", None, role=True)
        async with contextlib.aclosing(merged(state.engine, prompts, params, reply.id)) as outs:
            try:
                async for i, out in outs:
                    if out.finished:
                        finals[i] = out
                    for c in out.outputs:
                        index = i * n + c.index
                        if index in ended:
                            continue
                        start = sent.get(index, 0)
                        end = len(c.text) if c.finish_reason else sendable_length(c.text,
                                                                                  params.stop)
                        new_ids = (c.token_ids[ids_sent.get(index, 0):]
                                   if opts.return_token_ids else [])
                        if end > start or new_ids:
                            await chunk(index, c.text[start:end], None, ids=new_ids)
                            sent[index] = end
                            ids_sent[index] = len(c.token_ids)
                        if c.finish_reason:
                            ended.add(index)
                            await chunk(index, "", c.finish_reason)
            except ConnectionResetError:  # the client left: not an engine error
                raise
            except Exception as exc:
                err = _engine_error(exc)
                await sse.send(error_body(err.status, err.message, err.param, err.code))
                await sse.done()
                return response
        if opts.include_usage:
            await sse.send({**reply.envelope(True), "choices": [],
                            "usage": usage([finals[i] for i in range(len(prompts))])})
        await sse.done()
        await response.write_eof()
    except ConnectionResetError:
        logger.info("client of %s went away; request aborted", reply.id)
    return response


def _engine_error(exc: Exception) -> APIError:
    from engine.async_engine import EngineStoppedError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return _bad(str(exc))
    if isinstance(exc, EngineStoppedError):
        return APIError(503, "the server is shutting down; retry on another instance",
                        headers={"Retry-After": "1"})
    logger.error("request failed: %s: %s", type(exc).__name__, exc)
    return APIError(500, f"generation failed: {exc}", code="engine_error")


# ---------------------------------------------------------------------------- handlers


async def _read_json(request: web.Request) -> dict[str, Any]:
    if request.app[STATE].stopping:
        raise APIError(503, "the server is shutting down", headers={"Retry-After": "1"})
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}); send "
                            "a JSON object with Content-Type: application/json",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_kind(body)}",
                       code="invalid_json")
    return body


async def _off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """Run CPU work (tokenizing, templating) in the default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def _new_reply(kind: str, model: str, state: ServerState) -> _Reply:
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return _Reply(kind, prefix + uuid.uuid4().hex, int(time.time()), model, state.fingerprint)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    state = request.app[STATE]
    body = await _read_json(request)
    opts = parse_options(body, "chat", state)
    messages = parse_messages(body.get("messages"))
    tokenizer = state.engine.llm.tokenizer
    if tokenizer is None or tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template: use /v1/completions",
                       code="unsupported_endpoint")
    import jinja2

    try:
        ids = await _off_loop(tokenizer.encode_chat, messages)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise _bad(f"the chat template refused these messages: {exc}", "messages") from None
    return await _generate(request, state, _new_reply("chat", opts.model, state), [ids], opts)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    state = request.app[STATE]
    body = await _read_json(request)
    opts = parse_options(body, "completion", state)
    prompts = parse_prompts(body.get("prompt"))
    tokenizer = state.engine.llm.tokenizer
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise _bad("this model has no tokenizer: send the prompt as token ids", "prompt")
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(await _off_loop(tokenizer.encode_batch, texts) if texts else [])
    ids = [next(encoded) if isinstance(p, str) else p for p in prompts]
    if any(not p for p in ids):
        raise _bad("a prompt encodes to no tokens: give at least one token", "prompt")
    return await _generate(request, state, _new_reply("completion", opts.model, state), ids,
                           opts)


def _model_card(name: str, state: ServerState) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "kvstore",
            "max_model_len": state.max_context}


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``."""
    state = request.app[STATE]
    return web.json_response({"object": "list",
                              "data": [_model_card(m, state) for m in state.model_names]})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``."""
    state = request.app[STATE]
    name = request.match_info["model"]
    if name not in state.model_names:
        raise APIError(404, f"The model '{name}' does not exist", param="model",
                       code="model_not_found")
    return web.json_response(_model_card(name, state))


async def stats(request: web.Request) -> web.Response:
    """``GET /v1/stats``: request counters and the store's counters (read on the engine
    thread)."""
    state = request.app[STATE]
    counters = dataclasses.asdict(state.engine.counters())
    try:
        store = await state.engine.run_on_engine(lambda llm: dataclasses.asdict(llm.store.stats()))
    except Exception as exc:
        raise _engine_error(exc) from None
    return web.json_response({"requests": counters, "store": store})


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 while serving, 503 once shutdown started or the engine died."""
    state = request.app[STATE]
    if state.stopping or not state.engine.running:
        return web.json_response({"status": "stopping"}, status=503)
    return web.json_response({"status": "ok"})


# ---------------------------------------------------------------------------- middleware


@web.middleware
async def _errors_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                             ) -> web.StreamResponse:
    """Every refusal becomes an OpenAI error object; unexpected errors are logged and
    answered 500 without details of the server's internals."""
    try:
        return await handler(request)
    except APIError as exc:
        return _error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)
    except web.HTTPException as exc:  # aiohttp's own 404, 405, 413
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = (f"method {request.method} not allowed on {request.path}; allowed: "
                       f"{exc.headers.get('Allow', '')}")
        elif exc.status == 413:
            message = f"request body too large (limit {format_size(MAX_BODY_BYTES)})"
        else:
            message = exc.reason
        headers = {k: v for k, v in exc.headers.items() if k == "Allow"}
        return _error_response(exc.status, message, headers=headers)
    except Exception:
        logger.exception("internal error in %s %s", request.method, request.path)
        return _error_response(500, "internal server error (logged by the server)")


@web.middleware
async def _auth_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Bearer-key check (constant time) on every route but ``/healthz``."""
    key = request.app[STATE].api_key
    if key is not None and request.path != "/healthz":
        given = request.headers.get("Authorization", "")
        scheme, _, credential = given.partition(" ")
        ok = hmac.compare_digest(credential.strip().encode("utf-8", "surrogateescape"),
                                 key.encode())
        if scheme.lower() != "bearer" or not ok:
            reason = ("You didn't provide an API key" if not given else
                      "Incorrect API key provided")
            raise APIError(401, f"{reason}: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer realm="kvstore"'})
    return await handler(request)


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].stopping = True


async def _on_cleanup(app: web.Application) -> None:
    """After requests in flight finished: stop the engine thread, close (flush) tiers."""
    engine = app[STATE].engine
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, engine.shutdown)
    await loop.run_in_executor(None, engine.llm.close)
    logger.info("engine stopped, cache tiers closed")


def build_app(state: ServerState) -> web.Application:
    """The server as an aiohttp application around a running ``AsyncEngine``.

    Cleaning the application up (``runner.cleanup()``) shuts the engine down and closes
    its ``LLM``."""
    app = web.Application(middlewares=[_errors_middleware, _auth_middleware],
                          client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models, allow_head=False)
    app.router.add_get("/v1/models/{model}", get_model, allow_head=False)
    app.router.add_get("/v1/stats", stats, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


# ---------------------------------------------------------------------------- serving


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def max_sequence_tokens(llm: Any) -> int:
    """The longest sequence (prompt + completion, tokens) ``llm`` can run: its model's
    context window, capped by the KV pool (a longer one could never be scheduled)."""
    store = llm.store.config
    return min(llm.loaded.config.max_context_len, store.gpu_blocks * store.block_size)


def describe(llm: Any) -> list[str]:
    """Log lines about the model and the cache tiers (no secrets)."""
    cfg = llm.config
    store = llm.store.config
    block = store.layout.block_bytes if store.layout is not None else 0
    lines = [f"model {llm.loaded.name} ({llm.loaded.fingerprint[:12]}) on {llm.model.device}, "
             f"{str(llm.model.dtype).removeprefix('torch.')}, context "
             f"{llm.loaded.config.max_context_len} tokens (longest sequence served: "
             f"{max_sequence_tokens(llm)}), up to {cfg.max_num_seqs} sequences per batch"]
    for tier in llm.store.tiers:
        if tier == "gpu":
            where = "GPU" if llm.model.device.type == "cuda" else "device (CPU)"
            text = (f"{where} pool: {store.gpu_blocks} blocks of {store.block_size} tokens "
                    f"({format_size(store.gpu_blocks * block)})")
        elif tier == "host":
            text = (f"host DRAM: {store.host_blocks} blocks "
                    f"({format_size(store.host_blocks * block)})")
        elif tier == "disk":
            text = f"disk: LMDB in {store.disk_path}, {format_size(store.disk_bytes)}"
        elif tier == "redis":
            text = f"redis: {redact_url(store.redis_url or '')}"
        elif tier == "remote":
            text = f"remote daemon: {redact_url(store.remote_url or '')}"
        else:
            text = tier
        lines.append(f"tier {text}")
    lines.append(f"policy {store.policy}; prefix reuse {'on' if cfg.enable_cache else 'off'}")
    return lines


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen and how to present the engine (the engine's own settings are an
    ``EngineConfig``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    api_key: str | None = None
    shutdown_timeout_s: float = 30.0


async def serve(llm: Any, config: ServeConfig,
                ready: Callable[[list[str]], None] | None = None) -> None:
    """Serve ``llm`` until SIGINT or SIGTERM, then shut down gracefully: stop accepting,
    let requests in flight finish (up to ``shutdown_timeout_s``; streams still open
    after that are cut), stop the engine, close ``llm``. A second signal stops the
    engine at once: requests still in flight end with a 503 (or an error event). ``ready(urls)`` is called once
    listening. Raises ``OSError`` when the address cannot be bound (``llm`` is closed)."""
    from engine.async_engine import AsyncEngine

    names = config.served_model_names or tuple(dict.fromkeys(
        [llm.config.model, llm.loaded.name]))
    state = ServerState(engine=AsyncEngine(llm), model_names=names, api_key=config.api_key,
                        max_context=max_sequence_tokens(llm),
                        fingerprint=f"fp_{llm.loaded.fingerprint[:12]}")
    app = build_app(state)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=config.shutdown_timeout_s, access_log=None)
    await runner.setup()
    loop = asyncio.get_running_loop()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        stop = asyncio.Event()
        received: list[str] = []

        def on_signal(sig: signal.Signals) -> None:
            received.append(sig.name)
            if len(received) == 2:  # again while draining: cut off what is in flight
                logger.warning("received %s again: stopping the engine now; requests in "
                               "flight end with an error", sig.name)
                loop.run_in_executor(None, state.engine.shutdown)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        urls = [_address_url(a) for a in runner.addresses]
        logger.info("kvstore serve %s listening on %s (pid %d)", __version__, ", ".join(urls),
                    os.getpid())
        for line in describe(llm):
            logger.info("%s", line)
        logger.info("model names: %s", ", ".join(names))
        if config.api_key is None and not _is_loopback(config.host):
            logger.warning("auth: none, and listening beyond loopback: anyone who reaches "
                           "%s can generate; set $KVSTORE_API_KEY", config.host)
        elif config.api_key is None:
            logger.info("auth: none (any local process may generate)")
        else:
            logger.info("auth: bearer API key required (all routes but /healthz)")
        if ready is not None:
            ready(urls)
        await stop.wait()
        logger.info("received %s: finishing %d request(s) in flight (up to %.0f s), then "
                    "closing", received[0], state.engine.counters().running,
                    config.shutdown_timeout_s)
    finally:
        try:
            await runner.cleanup()  # runs _on_cleanup: engine stopped, llm closed
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    logger.info("stopped")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _address_url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# ---------------------------------------------------------------------------- command line

_EPILOG = """\
endpoints (OpenAI-compatible; JSON in, JSON or server-sent events out):
  POST /v1/chat/completions   POST /v1/completions   GET /v1/models
  GET /v1/stats (request and cache counters)          GET /healthz (no auth)

cache: every prompt is matched against the tiered KV store; usage reports
prompt_tokens_details.cached_tokens and, per tier, cached_tokens_by_tier.
Tiers: the device pool (--gpu-blocks), host DRAM (--host-blocks), LMDB on disk
(--disk, survives restarts), Redis (--redis) and a kvstore daemon (--remote).

sizes: 4096, 512MiB, 8GiB, 1.5G (powers of 1024) or 10GB (powers of 1000).

security: with an API key (prefer $KVSTORE_API_KEY to --api-key: command lines
are visible to other local users) clients must send 'Authorization: Bearer KEY'.
The remote daemon's token is read from $KVSTORE_DAEMON_TOKEN.

examples:
  kvstore serve --port 8000
  kvstore serve --host-blocks 8192 --disk ~/.cache/kvstore/disk --disk-bytes 20GiB
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi!"}]}'
"""


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count_arg(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _port_arg(text: str) -> int:
    value = _count_arg(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore serve`` argument parser."""
    p = argparse.ArgumentParser(
        prog="kvstore serve",
        description="OpenAI-compatible HTTP server on the embedded engine: chat and text\n"
                    "completions (streaming too), continuous batching, and prefix reuse\n"
                    "from the tiered KV-cache store.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--model", default="smollm2",
                       help="'smollm2' (the bundled SmolLM2-135M-Instruct), a local Hugging "
                            "Face checkpoint directory or a .gguf file (default %(default)s); "
                            "with --load-format dummy a shape name (llama3-8b, llama3.1-8b, "
                            "qwen2-7b, mistral-7b, llama2-7b, qwen2-0.5b, smollm2) or a "
                            "config.json")
    model.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="auto: the model's weights; dummy: random weights of its shape "
                            "(deterministic, made on the device in seconds; for benchmarks "
                            "at real model shapes) (default %(default)s)")
    model.add_argument("--tokenizer", default=None, metavar="NAME",
                       help="--load-format dummy only: 'none' (default; clients send token "
                            "ids to /v1/completions), 'smollm2' or a directory with a "
                            "tokenizer.json")
    model.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                       help="name clients pass as 'model' (repeatable; default: the --model "
                            "value and the model's own name)")
    model.add_argument("--device", default=None,
                       help="cuda, cuda:N or cpu (default: cuda when present)")
    model.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="weights and KV dtype (default: bfloat16 on GPU, float32 on CPU)")
    model.add_argument("--model-cache-dir", default=None, metavar="DIR",
                       help="where converted model weights are kept (default "
                            "~/.cache/kvstore/models)")
    net = p.add_argument_group("listening")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default %(default)s; 0.0.0.0 = all interfaces)")
    net.add_argument("--port", type=_port_arg, default=8000,
                     help="TCP port (default %(default)s; 0 = any free port, logged)")
    net.add_argument("--api-key", default=None, metavar="KEY",
                     help="bearer key clients must send (default: $KVSTORE_API_KEY; none)")
    net.add_argument("--shutdown-timeout", type=_seconds_arg, default=30.0, metavar="SECONDS",
                     help="on SIGINT/SIGTERM, time requests in flight get to finish "
                          "(default %(default)s)")
    tiers = p.add_argument_group("KV-cache tiers")
    tiers.add_argument("--gpu-blocks", type=_count_arg(1), default=None, metavar="N",
                       help="blocks of 16 tokens in the device pool (default: half the free "
                            "GPU memory; 2048 on CPU)")
    tiers.add_argument("--host-blocks", type=_count_arg(0), default=0, metavar="N",
                       help="blocks in the host DRAM tier (default 0 = none)")
    tiers.add_argument("--disk", default=None, metavar="PATH",
                       help="directory of the LMDB disk tier (default: none)")
    tiers.add_argument("--disk-bytes", type=_size_arg, default=4 << 30, metavar="SIZE",
                       help="disk tier capacity (default 4GiB)")
    tiers.add_argument("--redis", default=None, metavar="URL",
                       help="share blocks through Redis: redis://, rediss://, "
                            "redis+cluster://host:port,...")
    tiers.add_argument("--remote", default=None, metavar="URL",
                       help="share blocks through a kvstore daemon (http://host:port)")
    tiers.add_argument("--policy", default="write-back", choices=["write-back", "write-through"],
                       help="write-back copies blocks down the tiers when evicted; "
                            "write-through as soon as they are computed (default %(default)s)")
    tiers.add_argument("--no-prefix-reuse", action="store_true",
                       help="never reuse cached prefixes (for comparisons)")
    batch = p.add_argument_group("batching")
    batch.add_argument("--max-num-seqs", type=_count_arg(1), default=64, metavar="N",
                       help="most sequences in one batch (default %(default)s)")
    batch.add_argument("--max-num-batched-tokens", type=_count_arg(1), default=2048,
                       metavar="N", help="most tokens in one forward step; longer prefills "
                                         "are chunked (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="logging level (default %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``kvstore serve``: 0 after a clean shutdown, 1 when it cannot start, 2 for bad
    arguments, 130 when interrupted while starting."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key if args.api_key is not None else env.api_key()
    if api_key is not None and not api_key.strip():
        parser.error("--api-key must not be blank")
    config = ServeConfig(host=args.host, port=args.port,
                         served_model_names=tuple(dict.fromkeys(args.served_model_name or ())),
                         api_key=api_key, shutdown_timeout_s=args.shutdown_timeout)
    logger.info("loading %s and opening the cache tiers...", args.model)
    try:
        from engine.llm import LLM

        llm = LLM(args.model, device=args.device, dtype=args.dtype, gpu_blocks=args.gpu_blocks,
                  host_blocks=args.host_blocks, disk_path=args.disk,
                  disk_bytes=args.disk_bytes, redis_url=args.redis, remote_url=args.remote,
                  auth_token=env.daemon_token(), policy=args.policy,
                  enable_cache=not args.no_prefix_reuse, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  model_cache_dir=args.model_cache_dir, load_format=args.load_format,
                  tokenizer=args.tokenizer)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    try:
        asyncio.run(serve(llm, config))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

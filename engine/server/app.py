"""The OpenAI-compatible server as an aiohttp application: state, handlers, routes.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{model}``, ``GET /v1/stats`` (request and store counters),
``GET /metrics`` (Prometheus, :mod:`engine.server.metrics`), ``GET /healthz``,
``GET /v1/kv/namespace`` and ``GET /v1/kv/tokenizer`` (for routers,
:mod:`engine.server.routing`).
Errors are OpenAI's error object (:mod:`engine.server.schema`), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine.async_engine import AsyncEngine, EngineStoppedError
from engine.sampling import SamplingParams
from engine.sequence import RequestOutput
from engine.server.metrics import RequestTracker, ServeMetrics
from engine.server.responses import SSE, Reply, merged, sendable_length, usage
from engine.server.routing import add_routes
from engine.server.schema import (
    MAX_BODY_BYTES,
    APIError,
    Options,
    bad,
    error_body,
    json_kind,
    parse_messages,
    parse_options,
    parse_prompts,
    render_error,
    sampling_params,
)
from kvstore.service import (
    HTTPError,
    auth_middleware,
    error_middleware,
    timing_middleware,
)

logger = logging.getLogger("kvstore.serve")
T = TypeVar("T")


@dataclass
class ServerState:
    """What the handlers share: the engine, the names it answers to, auth and limits.

    ``model_names``: the first is the canonical name (listed first by ``/v1/models``);
    any of them is accepted as a request's ``model``. ``max_context``: the most tokens
    (prompt + completion) one sequence may hold: the model's context window, or the KV
    pool's capacity when that is smaller (a sequence must fit in the pool on its own).
    ``max_token_bytes``: the most bytes of text one token of the model covers; a
    prompt over ``max_context * max_token_bytes`` bytes is refused before tokenizing.
    """

    engine: AsyncEngine
    model_names: tuple[str, ...]
    api_key: str | None
    max_context: int
    max_token_bytes: int
    fingerprint: str
    metrics: ServeMetrics = dataclasses.field(default_factory=ServeMetrics)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    stopping: bool = False

    @property
    def max_prompt_bytes(self) -> int:
        """Longest prompt text (bytes, UTF-8) that could fit in ``max_context`` tokens."""
        return self.max_context * self.max_token_bytes


STATE = web.AppKey("kvstore_serve_state", ServerState)
OPEN_PATHS = frozenset({"/healthz"})


def _validate(state: ServerState, prompts: list[list[int]], opts: Options,
              prompt_param: str) -> SamplingParams:
    params = sampling_params(opts, [len(p) for p in prompts], state.max_context, prompt_param)
    for ids in prompts:
        try:
            state.engine.validate(ids, params)
        except ValueError as exc:
            raise bad(str(exc), prompt_param) from None
    return params


async def _generate(request: web.Request, state: ServerState, reply: Reply,
                    prompts: list[list[int]], opts: Options,
                    tracker: RequestTracker) -> web.StreamResponse:
    prompt_param = "prompt" if reply.kind == "completion" else "messages"
    params = await _off_loop(_validate, state, prompts, opts, prompt_param)
    if opts.stream:
        return await _stream(request, state, reply, prompts, params, opts, tracker)
    finals: dict[int, RequestOutput] = {}
    async with contextlib.aclosing(merged(state.engine, prompts, params, reply.id)) as outs:
        try:
            async for i, out in outs:
                tracker.update(i, out)
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


async def _stream(request: web.Request, state: ServerState, reply: Reply,
                  prompts: list[list[int]], params: SamplingParams, opts: Options,
                  tracker: RequestTracker) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    sse = SSE(response)
    n = opts.n
    extra = {"usage": None} if opts.include_usage else {}
    sent: dict[int, int] = {}  # choice index -> characters sent
    ids_sent: dict[int, int] = {}  # choice index -> token ids sent (return_token_ids)
    ended: set[int] = set()
    finals: dict[int, RequestOutput] = {}

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
                    tracker.update(i, out)
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
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return bad(str(exc))
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
        body = await _off_loop(json.loads, raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}); send "
                            "a JSON object with Content-Type: application/json",
                       code="invalid_json") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise APIError(400, "the JSON body of your request is nested too deeply to parse",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_kind(body)}",
                       code="invalid_json")
    return body


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work (parsing, templating, tokenizing, checking ids) in the default
    executor, so the event loop keeps answering (``/healthz`` among others)."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def _check_prompt_bytes(state: ServerState, texts: Sequence[str], param: str) -> None:
    """Refuse text that cannot fit in the context before tokenizing it: no token covers
    more than ``state.max_token_bytes`` bytes of text, so a prompt longer than
    ``max_context`` such tokens needs more than ``max_context`` tokens."""
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if size > state.max_prompt_bytes:
        raise bad(f"This server's maximum context length is {state.max_context} tokens; "
                  f"a prompt of {size} bytes cannot fit in it (the longest token of this "
                  f"model covers {state.max_token_bytes} bytes of text), so it was refused "
                  "before tokenizing", param)


def _new_reply(kind: str, model: str, state: ServerState) -> Reply:
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return Reply(kind, prefix + uuid.uuid4().hex, int(time.time()), model, state.fingerprint)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    state = request.app[STATE]
    tracker = state.metrics.track()
    body = await _read_json(request)
    opts = parse_options(body, "chat", state.model_names)
    messages = parse_messages(body.get("messages"))
    _check_prompt_bytes(state, [m["content"] for m in messages], "messages")
    tokenizer = state.engine.llm.tokenizer
    if tokenizer is None or tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template: use /v1/completions",
                       code="unsupported_endpoint")
    import jinja2

    try:
        ids = await _off_loop(tokenizer.encode_chat, messages)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise bad(f"the chat template refused these messages: {exc}", "messages") from None
    return await _generate(request, state, _new_reply("chat", opts.model, state), [ids], opts,
                           tracker)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    state = request.app[STATE]
    tracker = state.metrics.track()
    body = await _read_json(request)
    opts = parse_options(body, "completion", state.model_names)
    prompts = parse_prompts(body.get("prompt"))
    _check_prompt_bytes(state, [p for p in prompts if isinstance(p, str)], "prompt")
    tokenizer = state.engine.llm.tokenizer
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise bad("this model has no tokenizer: send the prompt as token ids", "prompt")
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(await _off_loop(tokenizer.encode_batch, texts)
                   if texts and tokenizer is not None else [])
    ids = [next(encoded) if isinstance(p, str) else p for p in prompts]
    if any(not p for p in ids):
        raise bad("a prompt encodes to no tokens: give at least one token", "prompt")
    return await _generate(request, state, _new_reply("completion", opts.model, state), ids,
                           opts, tracker)


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


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition (engine figures read on its thread)."""
    state = request.app[STATE]
    resp = web.Response(body=await state.metrics.render(state.engine))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def _refuse(reason: str) -> HTTPError:
    reason = {"missing Authorization header": "You didn't provide an API key"}.get(
        reason, "Incorrect API key provided")
    return APIError(401, f"{reason}: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="kvstore"'})


def _recorder(state: ServerState) -> Callable[[str, web.StreamResponse, float], None]:
    def record(endpoint: str, resp: web.StreamResponse, seconds: float) -> None:
        state.metrics.requests.labels(endpoint, str(resp.status)).inc()
        state.metrics.latency.labels(endpoint).observe(seconds)
    return record


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
    app = web.Application(middlewares=[timing_middleware(_recorder(state)),
                                       error_middleware(render_error, body_limit=MAX_BODY_BYTES),
                                       auth_middleware(state.api_key, OPEN_PATHS, _refuse)],
                          client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", chat_completions, name="chat_completions")
    app.router.add_post("/v1/completions", completions, name="completions")
    app.router.add_get("/v1/models", list_models, name="models", allow_head=False)
    # a name may hold '/' (org/model, a checkpoint path)
    app.router.add_get("/v1/models/{model:.+}", get_model, name="model", allow_head=False)
    app.router.add_get("/v1/stats", stats, name="stats", allow_head=False)
    app.router.add_get("/metrics", metrics, name="metrics", allow_head=False)
    app.router.add_get("/healthz", healthz, name="healthz", allow_head=False)
    add_routes(app, state.engine.llm)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app

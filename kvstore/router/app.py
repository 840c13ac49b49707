"""The router as an aiohttp application: state, proxying with retries, status routes.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (routed, the body
proxied unchanged and the answer streamed back as it comes, server-sent events
included), ``GET /v1/models`` and ``GET /v1/models/{model}`` (from any replica in
rotation), ``GET /v1/router`` (replicas, health, load, index), ``GET /metrics``
(Prometheus), ``GET /healthz`` (200 while some replica is in rotation). Every answer
from a replica carries ``X-Kvstore-Replica: <replica id>``.

When no replica passed its last health check, the replicas whose namespace is known are
tried anyway (a replica too busy to answer ``/healthz`` in time still serves) before
the router answers 503.

Retries: a request whose replica cannot be reached, answers 503 (shutting down) or
fails before the router sent the client any byte is sent to the next best replica; a
non-streamed answer is read whole first, a stream once its first chunk arrived. A
replica dying in the middle of a stream ends that stream (no ``[DONE]``). A hung replica
(connections open, no answers) is given up the same way once it has failed its health
checks for ``replica_timeout_s``: the request moves on, or its stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine.server.schema import MAX_BODY_BYTES, APIError, render_error
from kvstore.router.feed import EventFeed
from kvstore.router.index import GlobalIndex
from kvstore.router.keys import KeySpace
from kvstore.router.metrics import RouterMetrics
from kvstore.router.policy import Candidate, Chooser, PolicyConfig, saved_blocks
from kvstore.router.replicas import HealthChecker, Replica
from kvstore.service import HTTPError, auth_middleware, error_middleware
from kvstore.urls import redact_url

logger = logging.getLogger("kvstore.router")

OPEN_PATHS = frozenset({"/healthz"})
REPLICA_HEADER = "X-Kvstore-Replica"
ROUTE_TIME_HEADER = "X-Kvstore-Route-Ms"
OFF_LOOP_BYTES = 32 << 10
"""Bodies larger than this are tokenized off the event loop."""
_PASS_HEADERS = ("Content-Type", "Retry-After", "WWW-Authenticate", "Cache-Control",
                 "X-Accel-Buffering")


@dataclass(frozen=True)
class RouterSettings:
    """What the application needs from the command line (see ``RouterConfig``)."""

    replicas: tuple[str, ...]
    policy: PolicyConfig
    api_key: str | None = None
    kv_events: str | None = None
    health_interval_s: float = 0.25
    health_timeout_s: float = 0.5
    replica_timeout_s: float = 30.0


@dataclass
class RouterState:
    """What the handlers share."""

    settings: RouterSettings
    replicas: list[Replica]
    chooser: Chooser
    index: GlobalIndex = field(default_factory=GlobalIndex)
    keyspace: KeySpace | None = None
    feed: EventFeed | None = None
    session: aiohttp.ClientSession | None = None
    health: HealthChecker | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    metrics: RouterMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RouterMetrics(lambda: (self.replicas, self.index, self.feed))

    def auth_headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


STATE = web.AppKey("kvstore_router_state", RouterState)


class _Unreachable(Exception):
    """The replica failed before the client was sent anything: try another one."""


class _HungWatch:
    """Cancels the task that waits on ``replica`` once the replica has been out of
    rotation (failing its health checks) for ``after_s`` seconds; checked every
    ``every_s`` by a loop timer (no task). ``fired`` says whether it cancelled. Use as a
    context manager around the waits; it stops its timer on exit."""

    def __init__(self, replica: Replica, after_s: float, every_s: float) -> None:
        self.replica = replica
        self.after_s = after_s
        self.every_s = every_s
        self.fired = False
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> _HungWatch:
        self._timer = self._loop.call_later(self.every_s, self._check)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _check(self) -> None:
        r = self.replica
        if not r.healthy and time.monotonic() - r.since >= self.after_s:
            self.fired = True
            self._timer = None
            if self._task is not None:
                self._task.cancel()
        else:
            self._timer = self._loop.call_later(self.every_s, self._check)

    def absorb(self) -> str:
        """After the ``CancelledError`` this watch caused: clear the task's cancellation
        and return why (for a log or :class:`_Unreachable`)."""
        if self._task is not None:
            self._task.uncancel()
        return f"failed its health checks for {self.after_s:g} s while this request waited"


# ------------------------------------------------------------------------ namespaces


async def _on_namespace(state: RouterState, replica: Replica) -> None:
    """Adopt the first replica's key space; refuse replicas that disagree with it."""
    ns = replica.namespace or {}
    async with state.lock:
        if state.keyspace is None:
            assert state.session is not None
            async with state.session.get(replica.url + "/v1/kv/tokenizer",
                                         headers=state.auth_headers()) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"GET /v1/kv/tokenizer answered {resp.status}")
                payload = await resp.json()
            state.keyspace = KeySpace.from_replica(ns, payload)
            logger.info("key space from %s: root %s, blocks of %d tokens, tokenizer %s",
                        replica.name, state.keyspace.root.hex()[:16],
                        state.keyspace.block_size, state.keyspace.digest[:12])
            if state.settings.kv_events is not None:
                state.feed = EventFeed(state.settings.kv_events, state.index)
                state.tasks.append(asyncio.create_task(state.feed.run(state.keyspace.root)))
        ks = state.keyspace
        why = None
        if bytes.fromhex(str(ns.get("root", ""))) != ks.root or \
                int(ns.get("block_size", 0)) != ks.block_size:
            why = "serves another model or namespace (its block keys differ)"
        elif ns.get("tokenizer_digest") != ks.digest:
            why = "tokenizes differently"
        elif any(r is not replica and r.namespace is not None and r.name == replica.name
                 for r in state.replicas):
            why = f"has the replica id {replica.name!r} of another replica (set --replica-id)"
        if why != replica.refused:
            replica.refused = why
            if why:
                logger.error("replica %s (%s) kept out of rotation: it %s", replica.name,
                             redact_url(replica.url), why)
        if state.settings.kv_events is not None and not ns.get("kv_events"):
            logger.warning("replica %s publishes no KV events (start it with --kv-events): "
                           "prefix routing cannot see its cache", replica.name)


def _on_change(state: RouterState, replica: Replica) -> None:
    if not replica.healthy:
        logger.warning("replica %s (%s) out of rotation", replica.name, redact_url(replica.url))


# ------------------------------------------------------------------------ proxying


def _forward_headers(request: web.Request) -> dict[str, str]:
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    auth = request.headers.get("Authorization")
    if auth is not None:
        headers["Authorization"] = auth
    return headers


def _reply_headers(upstream: aiohttp.ClientResponse, replica: Replica) -> dict[str, str]:
    headers = {k: upstream.headers[k] for k in _PASS_HEADERS if k in upstream.headers}
    headers[REPLICA_HEADER] = replica.name
    return headers


class _Pending:
    """One request's queued prefill on a replica (``blocks``), counted in the replica's
    ``pending_blocks`` from dispatch until :meth:`done` (first byte, failure or end;
    idempotent)."""

    def __init__(self, replica: Replica, blocks: float) -> None:
        self.replica = replica
        self.blocks = blocks
        replica.pending_blocks += blocks

    def done(self) -> None:
        if self.blocks:
            self.replica.pending_blocks = max(0.0, self.replica.pending_blocks - self.blocks)
            self.blocks = 0.0


async def _forward(request: web.Request, state: RouterState, replica: Replica, method: str,
                   path: str, body: bytes | None, arrived: float | None,
                   first_byte: Callable[[], None] = lambda: None) -> web.StreamResponse:
    """Send one request to ``replica``; ``_Unreachable`` when it failed before the client
    was sent anything. ``first_byte()`` is called once the replica's answer (or the
    first event of a stream) is in. A non-streamed answer carries ``X-Kvstore-Route-Ms``:
    the time from ``arrived`` (``perf_counter``) to sending it to this replica (reading,
    parsing, tokenizing, hashing, choosing; earlier tries included). A replica out of
    rotation for ``replica_timeout_s`` while this waits on it counts as unreachable
    before the client got a byte, and ends the stream after."""
    s = state.settings
    with _HungWatch(replica, s.replica_timeout_s, s.health_interval_s) as watch:
        try:
            return await _relay(request, state, replica, method, path, body, arrived,
                                first_byte)
        except asyncio.CancelledError:
            if not watch.fired:
                raise
            why = watch.absorb()
            started = request.get(_STARTED)
            if not isinstance(started, web.StreamResponse):
                raise _Unreachable(why) from None
            logger.warning("replica %s %s; the stream ends there", replica.name, why)
            return started


_STARTED = "kvstore_router_started"
"""Request key: the response the router started streaming to the client, once it did."""


async def _relay(request: web.Request, state: RouterState, replica: Replica, method: str,
                 path: str, body: bytes | None, arrived: float | None,
                 first_byte: Callable[[], None]) -> web.StreamResponse:
    """:func:`_forward`'s work, without the watch."""
    assert state.session is not None
    sent = time.perf_counter()
    try:
        upstream = await state.session.request(method, replica.url + path, data=body,
                                               headers=_forward_headers(request))
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise _Unreachable(str(exc) or type(exc).__name__) from None
    async with upstream:
        if upstream.status == 503:
            raise _Unreachable("answered 503")
        headers = _reply_headers(upstream, replica)
        if "text/event-stream" not in upstream.headers.get("Content-Type", ""):
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise _Unreachable(str(exc) or type(exc).__name__) from None
            first_byte()
            if arrived is not None:
                headers[ROUTE_TIME_HEADER] = f"{(sent - arrived) * 1000:.3f}"
            return web.Response(status=upstream.status, body=data, headers=headers)
        try:
            first = await upstream.content.readany()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise _Unreachable(str(exc) or type(exc).__name__) from None
        if not first:
            raise _Unreachable("closed the stream before its first event")
        first_byte()
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        request[_STARTED] = response
        await response.write(first)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            logger.warning("replica %s failed in the middle of a stream (%s); the stream "
                           "ends there", replica.name, exc)
            return response
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


async def _route(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE]
    start = time.perf_counter()
    raw = await request.read()
    keys: list[bytes] = []
    ks = state.keyspace
    if ks is not None and state.chooser.config.policy == "prefix":
        keys = await _keys(ks, kind, raw)
    return await _dispatch(request, state, request.path, raw, keys, start)


async def _keys(ks: KeySpace, kind: str, raw: bytes) -> list[bytes]:
    def compute() -> list[bytes]:
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return []  # the replica answers the client's mistake
        ids = ks.token_ids(kind, body)
        return ks.keys(ids) if ids else []

    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.get_running_loop().run_in_executor(None, compute)
    return compute()


async def _dispatch(request: web.Request, state: RouterState, path: str, raw: bytes | None,
                    keys: list[bytes], start: float | None) -> web.StreamResponse:
    by_name = {r.name: r for r in state.replicas}
    tried: set[str] = set()
    m = state.metrics
    while True:
        candidates = [Candidate(r.name, r.in_flight, r.pending_blocks) for r in state.replicas
                      if r.routable and r.name not in tried]
        if not candidates:
            # None passed its last check: one may only be too busy to answer /healthz
            # in time. Try those with a known namespace before refusing (a dead one
            # fails fast and is skipped).
            candidates = [Candidate(r.name, r.in_flight, r.pending_blocks)
                          for r in state.replicas if r.namespace is not None and r.refused is None
                          and r.name not in tried]
        hits = state.index.match(keys, [c.name for c in candidates]) if keys else None
        decision = state.chooser.choose(candidates, hits)
        if decision is None:
            m.requests.labels("none", "503").inc()
            raise APIError(503, "no replica is available" + (
                f" (tried {len(tried)}, all failed)" if tried else ""),
                headers={"Retry-After": "1"})
        replica = by_name[decision.replica]
        if start is not None and not tried:
            m.route_seconds.observe(time.perf_counter() - start)
            m.decisions.labels(state.chooser.config.policy, decision.reason).inc()
            if keys:
                assert state.keyspace is not None
                bs = state.keyspace.block_size
                m.prompt_tokens.inc(len(keys) * bs)
                for tier, n in decision.hit.by_tier.items():
                    m.matched.labels(tier).inc(n * bs)
        # the prefill this request queues there, until its first byte comes back
        work = max(0.0, len(keys) - saved_blocks(state.chooser.config.weights, decision.hit))
        pending = _Pending(replica, work)
        replica.in_flight += 1
        try:
            response = await _forward(request, state, replica, request.method, path, raw, start,
                                      pending.done)
        except _Unreachable as exc:
            logger.warning("replica %s: %s; request moved to another replica", replica.name,
                           exc)
            m.retries.labels(replica.name).inc()
            tried.add(replica.name)
            if state.health is not None:
                state.health.set_health(replica, False)
            continue
        finally:
            replica.in_flight -= 1
            pending.done()
        m.requests.labels(replica.name, str(response.status)).inc()
        return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    return await _route(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    return await _route(request, "completion")


async def models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models`` and ``GET /v1/models/{model}`` from a replica in rotation. The
    name is forwarded quoted whole (``org/m`` as ``org%2Fm``): a name holding ``../``
    stays a name and cannot reach another path of the replica."""
    name = request.match_info.get("model")
    path = "/v1/models" if name is None else "/v1/models/" + quote(name, safe="")
    return await _dispatch(request, request.app[STATE], path, None, [], None)


async def router_status(request: web.Request) -> web.Response:
    """``GET /v1/router``: replicas, their health, load and blocks; the index; events."""
    state = request.app[STATE]
    feed = state.feed
    return web.json_response({
        "policy": state.chooser.config.policy,
        "replicas": [{"replica_id": r.name, "url": redact_url(r.url), "healthy": r.healthy,
                      "in_rotation": r.routable, "refused": r.refused,
                      "in_flight": r.in_flight,
                      "pending_blocks": r.pending_blocks, "blocks": state.index.held(r.name)}
                     for r in state.replicas],
        "index_blocks": len(state.index),
        "events": None if feed is None else {
            "connected": feed.connected, "batches": feed.batches, "gaps": feed.gaps,
            "applied": dict(feed.events)},
        "key_space": None if state.keyspace is None else {
            "root": state.keyspace.root.hex(), "block_size": state.keyspace.block_size}})


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 while some replica is in rotation, else 503."""
    state = request.app[STATE]
    n = sum(r.routable for r in state.replicas)
    return web.json_response({"status": "ok" if n else "no replica", "replicas_in_rotation": n},
                             status=200 if n else 503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``."""
    resp = web.Response(body=request.app[STATE].metrics.render())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def _refuse(reason: str) -> HTTPError:
    return APIError(401, f"{reason}: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="kvstore"'})


async def _on_startup(app: web.Application) -> None:
    state = app[STATE]
    s = state.settings
    state.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=max(1.0, s.health_timeout_s)),
        auto_decompress=False)

    async def on_namespace(replica: Replica) -> None:
        await _on_namespace(state, replica)

    state.health = HealthChecker(state.replicas, state.session, interval_s=s.health_interval_s,
                                 timeout_s=s.health_timeout_s, headers=state.auth_headers(),
                                 on_namespace=on_namespace,
                                 on_change=lambda r: _on_change(state, r))
    state.tasks.append(asyncio.create_task(state.health.run()))


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE]
    for task in state.tasks:
        task.cancel()
    for task in state.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if state.session is not None:
        await state.session.close()


def build_app(settings: RouterSettings) -> web.Application:
    """The router over ``settings.replicas``; health checks and the event feed start
    with the application and stop at its cleanup."""
    state = RouterState(settings, [Replica(url.rstrip("/"), url.rstrip("/"))
                                   for url in settings.replicas], Chooser(settings.policy))
    app = web.Application(middlewares=[error_middleware(render_error, body_limit=MAX_BODY_BYTES),
                                       auth_middleware(settings.api_key, OPEN_PATHS, _refuse)],
                          client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", chat_completions, name="chat_completions")
    app.router.add_post("/v1/completions", completions, name="completions")
    app.router.add_get("/v1/models", models, name="models", allow_head=False)
    app.router.add_get("/v1/models/{model:.+}", models, name="model", allow_head=False)
    app.router.add_get("/v1/router", router_status, name="router", allow_head=False)
    app.router.add_get("/metrics", metrics, name="metrics", allow_head=False)
    app.router.add_get("/healthz", healthz, name="healthz", allow_head=False)
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app

"""The daemon as an aiohttp application: routes, handlers, limits, and serving.

Routes: ``POST /v1/{namespace}/{exists,get,put,delete}`` (the protocol of
:mod:`tiers.wire`), ``GET /v1/stats`` (JSON), ``GET /metrics`` (Prometheus text),
``GET /healthz``.

Errors: every rejected request gets a JSON body ``{"error": message, "status": code}``
and changes nothing: 400 malformed body, wrong types, wrong key length, invalid block,
invalid namespace name; 401 missing or wrong bearer token (every endpoint except
``/healthz``); 403 namespace limit reached; 404 unknown route or a namespace outside
``--namespaces``; 405 wrong method; 408 body not received within ``--body-timeout``; 413
body over ``--max-body-bytes`` or batch over ``--max-batch``; 503 (with ``Retry-After``)
when ``--max-concurrency`` data requests are already in flight or the namespace's
storage cannot be opened; 507 a put none of whose blocks a durable tier stored.

Memory bound: at most ``max_concurrency`` request bodies of ``max_body_bytes`` each are
held at once, plus the memory tier and the replies being sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from kvstore import __version__
from kvstore.daemon.backend import Backend, StatsDict
from kvstore.daemon.config import DaemonConfig
from kvstore.daemon.metrics import Metrics
from kvstore.service import (
    Handler,
    HTTPError,
    auth_middleware,
    error_middleware,
    redact_url,
    run_until_signal,
    timing_middleware,
)
from kvstore.units import format_size
from tiers.codec import verify_block
from tiers.wire import (
    CONTENT_TYPE,
    DATA_OPS,
    NAMESPACE_PATTERN,
    ProtocolError,
    decode_items,
    decode_keys,
    encode_count_reply,
    encode_get_reply,
    valid_namespace,
)

logger = logging.getLogger("kvstore.daemon")
T = TypeVar("T")


@dataclass
class DaemonState:
    """Per-application state: config, tiers, metrics, worker threads, counters."""

    config: DaemonConfig
    backend: Backend
    metrics: Metrics
    executor: ThreadPoolExecutor
    started: float
    stopping: asyncio.Event
    inflight: int = 0
    requests: int = 0
    rejected: int = 0


STATE = web.AppKey("kvstore_daemon_state", DaemonState)
OPEN_PATHS = frozenset({"/healthz"})
"""Paths served without a token (liveness probes)."""


def _render(exc: HTTPError) -> web.Response:
    return web.json_response({"error": exc.message, "status": exc.status},
                             status=exc.status, headers=exc.headers)


def _refuse(reason: str) -> HTTPError:
    return HTTPError(401, f"{reason}: send 'Authorization: Bearer <token>'",
                     {"WWW-Authenticate": 'Bearer realm="kvstore"'})


def _endpoint(request: web.Request) -> str:
    name = request.match_info.route.name
    return name if name else "other"


def _recorder(state: DaemonState) -> Callable[[str, web.StreamResponse, float], None]:
    def record(endpoint: str, resp: web.StreamResponse, seconds: float) -> None:
        state.requests += 1
        if resp.status >= 400:
            state.rejected += 1
        m = state.metrics
        m.requests.labels(endpoint, str(resp.status)).inc()
        m.latency.labels(endpoint).observe(seconds)
        if isinstance(resp, web.Response) and isinstance(resp.body, bytes):
            m.reply_bytes.inc(len(resp.body))
    return record


@web.middleware
async def _limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """At most ``max_concurrency`` data requests in flight; more get 503 + Retry-After."""
    if _endpoint(request) not in DATA_OPS:
        return await handler(request)
    state = request.app[STATE]
    if state.inflight >= state.config.max_concurrency:
        raise HTTPError(503, f"busy: {state.inflight} requests in flight "
                        f"(--max-concurrency {state.config.max_concurrency}); retry",
                        {"Retry-After": "1"})
    state.inflight += 1
    state.metrics.inflight.inc()
    try:
        return await handler(request)
    finally:
        state.inflight -= 1
        state.metrics.inflight.dec()


async def _read_body(request: web.Request, state: DaemonState) -> bytes:
    """The whole body, within the size limit and ``body_timeout_s``. A body still
    arriving when shutdown starts is abandoned with a 503 (aiohttp stops reading then)."""
    limit = state.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise HTTPError(413, f"body of {request.content_length} bytes exceeds the limit "
                        f"of {limit} bytes (--max-body-bytes)")
    read = asyncio.ensure_future(request.read())
    stopping = asyncio.ensure_future(state.stopping.wait())
    try:
        done, _ = await asyncio.wait({read, stopping}, timeout=state.config.body_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if read not in done:
        read.cancel()
        with contextlib.suppress(asyncio.CancelledError, web.HTTPException):
            await read
        if state.stopping.is_set():
            raise HTTPError(503, "daemon is shutting down; retry on another replica or "
                            "after its restart", {"Retry-After": "1", "Connection": "close"})
        raise HTTPError(408, f"body not received within {state.config.body_timeout_s} s "
                        "(--body-timeout)", {"Connection": "close"})
    try:
        body = read.result()
    except web.HTTPRequestEntityTooLarge:
        raise HTTPError(413, f"body exceeds the limit of {limit} bytes "
                        "(--max-body-bytes)") from None
    state.metrics.body_bytes.inc(len(body))
    return body


def _namespace(request: web.Request, state: DaemonState) -> str:
    ns = request.match_info["namespace"]
    if not valid_namespace(ns):
        raise HTTPError(400, f"invalid namespace {ns[:80]!r}: it must match "
                        f"{NAMESPACE_PATTERN}")
    allowed = state.config.namespaces
    if allowed is not None and ns not in allowed:
        raise HTTPError(404, f"unknown namespace {ns!r}: this daemon serves "
                        f"{', '.join(allowed)}")
    return ns


def _verified(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    for i, (key, value) in enumerate(items):
        if not verify_block(value, key):
            raise HTTPError(400, f"items[{i}] value is not a valid encoded block for its "
                            "key (bad header, checksum, or another key's block); "
                            "nothing was stored")
    return items


def run_op(state: DaemonState, op: str, ns: str, body: bytes) -> bytes:
    """Parse, run and encode one data request (in a worker thread). A tier that fails
    is this namespace's error only: logged, answered 500."""
    backend, limit = state.backend, state.config.max_batch
    try:
        if op == "put":
            items = _verified(decode_items(body, limit))
            n = len(items)
            tiers = backend.namespace(ns)
            stored = _storage_call(ns, op, lambda: backend.put(tiers, items))
            if n and not stored:
                raise HTTPError(507, f"no durable tier ({', '.join(state.config.durable_tiers)})"
                                f" of namespace {ns!r} stored any of the {n} blocks (full "
                                "or failing; logged by the daemon); nothing was stored")
            reply = encode_count_reply("stored", stored)
        else:
            keys = decode_keys(body, limit)
            n = len(keys)
            tiers = backend.namespace(ns)
            if op == "get":
                values, corrupt = _storage_call(ns, op, lambda: backend.get(tiers, keys))
                reply = encode_get_reply(values, corrupt)
            elif op == "exists":
                reply = encode_count_reply("count",
                                           _storage_call(ns, op, lambda: backend.exists(tiers, keys)))
            else:
                reply = encode_count_reply("deleted",
                                           _storage_call(ns, op, lambda: backend.delete(tiers, keys)))
    except ProtocolError as exc:
        raise HTTPError(exc.status, exc.message) from None
    state.metrics.keys.labels(op).inc(n)
    return reply


def _storage_call(ns: str, op: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except Exception:
        logger.exception("namespace %r: %s failed in its storage", ns, op)
        raise HTTPError(500, f"the storage of namespace {ns!r} failed during {op} "
                        "(logged by the daemon); other namespaces are unaffected") from None


def _data_handler(op: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        state = request.app[STATE]
        ns = _namespace(request, state)
        body = await _read_body(request, state)
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(state.executor, run_op, state, op, ns, body)
        return web.Response(body=reply, content_type=CONTENT_TYPE)
    handler.__name__ = f"handle_{op}"
    handler.__doc__ = f"POST /v1/{{namespace}}/{op} (tiers.wire)."
    return handler


async def _healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the daemon serves; no token needed, no details."""
    return web.json_response({"status": "ok"})


def stats_snapshot(state: DaemonState) -> dict[str, object]:
    """The ``/v1/stats`` document (JSON-ready)."""
    c = state.config
    namespaces: dict[str, dict[str, StatsDict]] = state.backend.namespace_stats()
    return {
        "version": __version__,
        "uptime_s": round(time.monotonic() - state.started, 3),
        "requests": {"total": state.requests, "rejected": state.rejected,
                     "inflight": state.inflight},
        "limits": {"max_body_bytes": c.max_body_bytes, "max_batch": c.max_batch,
                   "max_concurrency": c.max_concurrency, "namespaces": c.namespace_limit},
        "tiers": state.backend.tier_stats(),
        "namespaces": namespaces,
        "broken_namespaces": state.backend.broken(),
    }


async def _stats(request: web.Request) -> web.Response:
    """Counters of every tier (summed and per namespace), requests and limits."""
    return web.json_response(stats_snapshot(request.app[STATE]))


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the daemon's own registry."""
    resp = web.Response(body=request.app[STATE].metrics.render())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def _on_shutdown(app: web.Application) -> None:
    """Shutdown started: requests still receiving their body are answered 503."""
    app[STATE].stopping.set()


async def _on_cleanup(app: web.Application) -> None:
    """After in-flight requests finished: stop the workers, close (flush) every tier."""
    state = app[STATE]
    await asyncio.get_running_loop().run_in_executor(None, _shutdown_backend, state)


def _shutdown_backend(state: DaemonState) -> None:
    state.executor.shutdown(wait=True)
    state.backend.close()
    logger.info("tiers closed")


def build_app(config: DaemonConfig, backend: Backend | None = None) -> web.Application:
    """The daemon as an aiohttp application (run it with ``web.AppRunner``).

    Opens the tiers (``backend``, when not given); closing the application
    (``runner.cleanup()``) closes them. Raises ``OSError`` when the disk root cannot
    be used.
    """
    backend = backend if backend is not None else Backend(config)
    state = DaemonState(config=config, backend=backend, metrics=Metrics(backend),
                        executor=ThreadPoolExecutor(max_workers=config.max_concurrency,
                                                    thread_name_prefix="kvstore-daemon"),
                        started=time.monotonic(), stopping=asyncio.Event())
    app = web.Application(
        middlewares=[timing_middleware(_recorder(state)),
                     error_middleware(_render, body_limit=config.max_body_bytes),
                     auth_middleware(config.token, OPEN_PATHS, _refuse), _limit_middleware],
        client_max_size=config.max_body_bytes)
    app[STATE] = state
    for op in DATA_OPS:
        app.router.add_post(f"/v1/{{namespace}}/{op}", _data_handler(op), name=op)
    app.router.add_get("/v1/stats", _stats, name="stats", allow_head=False)
    app.router.add_get("/metrics", _metrics, name="metrics", allow_head=False)
    app.router.add_get("/healthz", _healthz, name="healthz", allow_head=False)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


def describe(config: DaemonConfig) -> list[str]:
    """Log lines saying what the daemon serves and where (no secrets)."""
    lines = []
    if config.memory_bytes:
        lines.append(f"tier memory: {format_size(config.memory_bytes)} of host DRAM, shared "
                     "by all namespaces")
    if config.disk_path is not None:
        lines.append(f"tier disk: LMDB in {Path(config.disk_path).resolve()}/<namespace>, "
                     f"{format_size(config.disk_bytes)} per namespace")
    if config.redis_url is not None:
        ttl = f", blocks expire after {config.redis_ttl_s:g} s" if config.redis_ttl_s else ""
        lines.append(f"tier redis: {redact_url(config.redis_url)}, keys '<namespace>:'+key"
                     f"{ttl}")
    lines.append(f"puts count as stored once held by: {', '.join(config.durable_tiers)}")
    if config.namespaces is not None:
        lines.append(f"namespaces: {', '.join(config.namespaces)} (only these)")
    else:
        lines.append(f"namespaces: any valid name, at most {config.max_namespaces}")
    lines.append(f"limits: body {format_size(config.max_body_bytes)}, batch "
                 f"{config.max_batch} keys, {config.max_concurrency} concurrent requests")
    lines.append("auth: bearer token required" if config.token is not None else
                 "auth: none (loopback only: any local process can read and write the cache)")
    return lines


async def serve(config: DaemonConfig, ready: Callable[[list[str]], None] | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT, then shut down gracefully: stop accepting,
    let in-flight requests finish (up to ``shutdown_timeout_s``), close every tier.

    ``ready(urls)`` is called once listening. Raises ``OSError`` when the disk root
    cannot be used or the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    backend = await loop.run_in_executor(None, Backend, config)
    app = build_app(config, backend)
    access_log = logging.getLogger("kvstore.daemon.access")

    def listening(urls: list[str]) -> None:
        logger.info("kvstore daemon %s listening on %s (pid %d)", __version__,
                    ", ".join(urls), os.getpid())
        for line in describe(config):
            logger.info("%s", line)
        for name, reason in backend.broken().items():
            logger.warning("namespace %r unavailable (answering 503): %s", name, reason)
        if ready is not None:
            ready(urls)

    def stopping(signal_name: str) -> None:
        logger.info("received %s: finishing %d in-flight request(s), then closing tiers",
                    signal_name, app[STATE].inflight)

    await run_until_signal(app, config.host, config.port,
                           shutdown_timeout_s=config.shutdown_timeout_s,
                           on_listening=listening, on_stop=stopping,
                           access_log=access_log if access_log.isEnabledFor(logging.DEBUG)
                           else None)
    logger.info("stopped")

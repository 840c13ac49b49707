"""The cache daemon: ``kvstore daemon`` serves encoded KV blocks over HTTP (aiohttp).

Engines on other machines share one store through it; ``tiers.http.HTTPTier`` is its
client. ``docs/daemon.md`` has the operator's guide and the ``--help`` text.

Tiers, fastest first (each optional, at least one):

- ``memory``: host DRAM, an in-process LRU dict (``tiers.memory.MemoryTier``) of
  ``--memory-bytes``, one budget shared by every namespace.
- ``disk``: LMDB (``tiers.lmdb.LMDBTier``), one environment per namespace in
  ``--disk PATH/<namespace>``, each holding at most ``--disk-bytes``.
- ``redis``: Redis or Redis Cluster (``tiers.redis.RedisTier``) at ``--redis URL``, keys
  prefixed ``<namespace>:`` (the same keys a ``RedisTier`` with that namespace uses).

Lookups go through the tiers in that order; a block found in a lower tier is copied into
the memory tier. Puts write through to every tier (so the disk keeps everything the
memory tier evicts, and survives restarts); deletes remove from every tier.

Protocol: ``POST /v1/{namespace}/{op}`` with a msgpack map body, msgpack map reply
(``Content-Type: application/msgpack``). Keys are 16-byte msgpack ``bin``; values are
encoded blocks (``tiers.codec``) in ``bin``:

    exists  {"keys": [key, ...]}             -> {"count": n}  consecutive keys held, from the first
    get     {"keys": [key, ...]}             -> {"values": [block | nil, ...], "corrupt": n}
    put     {"items": [[key, block], ...]}   -> {"stored": n}  pairs accepted (all of them)
    delete  {"keys": [key, ...]}             -> {"deleted": n} distinct keys named (now absent)

``corrupt`` counts the requested blocks that the daemon's tiers found damaged during this
request (they were deleted and answered ``nil``). A put verifies every block against its
key with :func:`tiers.codec.verify_block` first; one bad block rejects the whole request
(400 naming its index) and nothing is stored.

Also ``GET /v1/stats`` (JSON), ``GET /metrics`` (Prometheus text), ``GET /healthz``.

Errors: every rejected request gets a 4xx JSON body ``{"error": message, "status":
code}`` and changes nothing: 400 malformed body, wrong types, wrong key length, invalid
block, invalid namespace name; 401 missing or wrong bearer token (every endpoint except
``/healthz``); 403 namespace limit reached; 404 unknown route or a namespace outside
``--namespaces``; 405 wrong method; 408 body not received within ``--body-timeout``; 413
body over ``--max-body-bytes`` or batch over ``--max-batch``; 503 (with ``Retry-After``)
when ``--max-concurrency`` data requests are already in flight.

Memory bound: at most ``max_concurrency`` request bodies of ``max_body_bytes`` each are
held at once, plus the memory tier and the replies being sent.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import hmac
import http.client
import ipaddress
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgpack
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from kvstore import __version__
from kvstore.process import die_with_parent, free_port
from kvstore.units import format_size, parse_size
from radix.hashing import KEY_BYTES
from tiers.base import HashTier, TierStats
from tiers.codec import verify_block
from tiers.http import (
    CONTENT_TYPE,
    NAMESPACE_PATTERN,
    TOKEN_RE,
    encode_get_reply,
    valid_namespace,
)
from tiers.memory import MemoryTier

logger = logging.getLogger("kvstore.daemon")

DEFAULT_PORT = 8470
TOKEN_ENV = "KVSTORE_DAEMON_TOKEN"
"""Environment variable read for the bearer token when ``--token`` is not given."""
MIN_TOKEN_CHARS = 16
TIER_ORDER = ("memory", "disk", "redis")
DATA_OPS = ("exists", "get", "put", "delete")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)

# ---------------------------------------------------------------------------- sizes

def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or a name) reaches this machine only.

    Names are resolved; a name that does not resolve, or resolves to any address that is
    not loopback, is not loopback. ``""``, ``0.0.0.0`` and ``::`` (all interfaces) are not.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                   for a in addresses)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DaemonConfig:
    """Everything the daemon needs, validated once (``ValueError`` naming the problem).

    - ``host``/``port``: where to listen (port 0: the OS picks one).
    - ``memory_bytes``: memory tier capacity in bytes, shared by all namespaces; 0 = none.
    - ``disk_path``/``disk_bytes``: LMDB root directory and capacity in bytes of each
      namespace's environment; ``None``/0 = no disk tier.
    - ``redis_url``/``redis_ttl_s``: Redis tier URL (``tiers.redis`` forms) and block
      expiry in seconds; ``None`` = none / no expiry.
    - ``token``: bearer token (at least :data:`MIN_TOKEN_CHARS` visible ASCII
      characters); required when ``host`` is not a loopback address.
    - ``namespaces``: the only namespaces served (opened at startup); ``None`` = any
      valid name, opened on first use, at most ``max_namespaces`` of them.
    - ``max_body_bytes``: largest request body (bytes); ``max_batch``: most keys or items
      in one request; ``max_concurrency``: most data requests in flight at once.
    - ``body_timeout_s``: time allowed to receive a request body (seconds);
      ``shutdown_timeout_s``: time in-flight requests get to finish on SIGTERM/SIGINT.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    memory_bytes: int = 1 << 30
    disk_path: str | None = None
    disk_bytes: int = 0
    redis_url: str | None = None
    redis_ttl_s: float | None = None
    token: str | None = None
    namespaces: tuple[str, ...] | None = None
    max_namespaces: int = 64
    max_body_bytes: int = 64 << 20
    max_batch: int = 4096
    max_concurrency: int = 64
    body_timeout_s: float = 30.0
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(isinstance(self.host, str) and bool(self.host.strip()),
             "host must be a non-empty address or name (0.0.0.0 for all interfaces)")
        need(type(self.port) is int and 0 <= self.port < 65536,
             f"port must be 0..65535, got {self.port!r}")
        for name in ("memory_bytes", "disk_bytes"):
            value = getattr(self, name)
            need(type(value) is int and value >= 0,
                 f"{name.replace('_', '-')} must be a non-negative number of bytes, got {value!r}")
        if self.disk_path is not None:
            need(isinstance(self.disk_path, str) and bool(self.disk_path),
                 "disk path must be a non-empty path")
            need(self.disk_bytes > 0, "--disk needs --disk-bytes (capacity of each "
                 "namespace's LMDB environment, e.g. 10GiB)")
        else:
            need(self.disk_bytes == 0, "--disk-bytes needs --disk PATH")
        if self.redis_url is not None:
            from tiers.redis import parse_redis_url
            parse_redis_url(self.redis_url)
        need(self.redis_ttl_s is None or (self.redis_url is not None and self.redis_ttl_s > 0),
             "redis TTL must be positive seconds and needs --redis")
        need(self.memory_bytes > 0 or self.disk_path is not None or self.redis_url is not None,
             "no tier to serve: give --memory-bytes > 0, --disk PATH --disk-bytes N, "
             "or --redis URL")
        if self.token is not None:
            need(isinstance(self.token, str) and TOKEN_RE.fullmatch(self.token) is not None
                 and len(self.token) >= MIN_TOKEN_CHARS,
                 f"token must be {MIN_TOKEN_CHARS} to 4096 visible ASCII characters without "
                 "spaces (generate one: python3 -c 'import secrets; "
                 "print(secrets.token_urlsafe(32))')")
        elif not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} (not a loopback address) without a "
                f"token: anyone who can reach it could read and overwrite the cache. Set "
                f"{TOKEN_ENV} (or --token), or bind 127.0.0.1")
        if self.namespaces is not None:
            need(type(self.namespaces) is tuple and len(self.namespaces) > 0,
                 "namespaces must be a non-empty tuple of names")
            for ns in self.namespaces:
                need(valid_namespace(ns),
                     f"namespace {ns!r} is not valid: it must match {NAMESPACE_PATTERN}")
            need(len(set(self.namespaces)) == len(self.namespaces),
                 "namespaces must not repeat")
        for name in ("max_namespaces", "max_batch", "max_concurrency"):
            value = getattr(self, name)
            need(type(value) is int and value >= 1,
                 f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        need(type(self.max_body_bytes) is int and self.max_body_bytes >= 1024,
             f"max-body-bytes must be at least 1 KiB, got {self.max_body_bytes!r}")
        for name in ("body_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            need(isinstance(value, int | float) and math.isfinite(value) and value > 0,
                 f"{name} must be positive seconds, got {value!r}")

    @property
    def namespace_limit(self) -> int:
        """How many namespaces the daemon opens at most."""
        return len(self.namespaces) if self.namespaces is not None else self.max_namespaces

    @property
    def tier_names(self) -> list[str]:
        """Configured tiers, in lookup order."""
        present = {"memory": self.memory_bytes > 0, "disk": self.disk_path is not None,
                   "redis": self.redis_url is not None}
        return [t for t in TIER_ORDER if present[t]]


# ---------------------------------------------------------------------------- errors


class RequestError(Exception):
    """A request the daemon refuses: HTTP ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def _kind(obj: object) -> str:
    """The msgpack name of a decoded value's type, for error messages."""
    names = {dict: "map", list: "array", bytes: "bin", str: "str", int: "int",
             float: "float", bool: "bool", type(None): "nil"}
    return names.get(type(obj), type(obj).__name__)


# ---------------------------------------------------------------------------- tiers


@dataclass
class _Stack:
    """The tiers of one namespace, fastest first; ``memory`` is also in ``tiers``."""

    namespace: str
    tiers: list[HashTier]
    memory: HashTier | None


def _corrupt_delta(tier: HashTier, before: int, misses: int) -> int:
    """Blocks this tier found corrupt since ``before`` was read, at most ``misses``."""
    return max(0, min(misses, tier.stats().corrupt - before))


class Backend:
    """The daemon's tiers for every namespace, and the four batch operations on them.

    Blocking (LMDB, Redis): the daemon calls it from worker threads. Thread-safe.
    Namespaces are opened on first use (or at construction when ``config.namespaces``
    is set); opening more than ``config.namespace_limit`` is a 403 ``RequestError``.
    Raises ``OSError`` at construction when a configured namespace's LMDB environment
    cannot be opened.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._stacks: dict[str, _Stack] = {}
        self._closed = False
        self.memory = MemoryTier(config.memory_bytes) if config.memory_bytes else None
        if config.disk_path is not None:
            Path(config.disk_path).mkdir(parents=True, exist_ok=True)
            if not os.access(config.disk_path, os.W_OK | os.X_OK):
                raise OSError(f"disk path {config.disk_path} is not writable")
        try:
            for ns in config.namespaces or ():
                self._stacks[ns] = self._open(ns)
        except BaseException:
            self.close()
            raise

    def stack(self, namespace: str) -> _Stack:
        """The tiers of ``namespace`` (a valid, allowed name), opening them if needed."""
        stack = self._stacks.get(namespace)
        if stack is not None:
            return stack
        with self._lock:
            stack = self._stacks.get(namespace)
            if stack is not None:
                return stack
            if self._closed:
                raise RequestError(503, "daemon is shutting down", {"Retry-After": "1"})
            if len(self._stacks) >= self.config.namespace_limit:
                raise RequestError(403, f"namespace limit reached: {len(self._stacks)} "
                                   "namespaces are open (raise --max-namespaces or list "
                                   "them with --namespaces)")
            try:
                stack = self._open(namespace)
            except OSError as exc:
                logger.error("cannot open namespace %r: %s", namespace, exc)
                raise RequestError(503, f"cannot open the storage of namespace "
                                   f"{namespace!r} (logged by the daemon)",
                                   {"Retry-After": "5"}) from None
            self._stacks[namespace] = stack
            logger.info("opened namespace %r", namespace)
            return stack

    def _open(self, namespace: str) -> _Stack:
        config = self.config
        tiers: list[HashTier] = []
        memory = self.memory.partition(namespace) if self.memory is not None else None
        if memory is not None:
            tiers.append(memory)
        try:
            if config.disk_path is not None:
                from tiers.lmdb import LMDBTier
                tiers.append(LMDBTier(Path(config.disk_path) / namespace, config.disk_bytes))
            if config.redis_url is not None:
                from tiers.redis import RedisTier
                tiers.append(RedisTier(config.redis_url, ttl_s=config.redis_ttl_s,
                                       namespace=namespace))
        except BaseException:
            for tier in tiers:
                tier.close()
            raise
        return _Stack(namespace, tiers, memory)

    def namespaces(self) -> dict[str, _Stack]:
        """A snapshot of the open namespaces."""
        with self._lock:
            return dict(self._stacks)

    # -- the four operations (blocking) -------------------------------------------------

    def exists(self, stack: _Stack, keys: list[bytes]) -> int:
        """How many of ``keys``, from the first, some tier holds (each key in any tier)."""
        pos, n = 0, len(keys)
        progress = True
        while progress and pos < n:
            progress = False
            for tier in stack.tiers:
                count = tier.contains_prefix(keys[pos:])
                if count:
                    pos += count
                    progress = True
                    if pos == n:
                        break
        return pos

    def get(self, stack: _Stack, keys: list[bytes]) -> tuple[list[bytes | None], int]:
        """Blocks in key order (``None`` = miss) and how many were found corrupt.
        Blocks found below the memory tier are copied into it."""
        values: list[bytes | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        corrupt = 0
        fill: list[tuple[bytes, bytes]] = []
        for tier in stack.tiers:
            if not pending:
                break
            before = tier.stats().corrupt
            got = tier.get([keys[i] for i in pending])
            missing = []
            for i, value in zip(pending, got):
                if value is None:
                    missing.append(i)
                else:
                    values[i] = value
                    if tier is not stack.memory:
                        fill.append((keys[i], value))
            corrupt += _corrupt_delta(tier, before, len(missing))
            pending = missing
        if fill and stack.memory is not None:
            stack.memory.put(fill)
        return values, corrupt

    def put(self, stack: _Stack, items: list[tuple[bytes, bytes]]) -> int:
        """Write verified pairs to every tier; returns how many pairs were accepted."""
        for tier in stack.tiers:
            tier.put(items)
        return len(items)

    def delete(self, stack: _Stack, keys: list[bytes]) -> int:
        """Remove keys from every tier; returns how many distinct keys were named."""
        for tier in stack.tiers:
            tier.delete(keys)
        return len(set(keys))

    # -- stats ---------------------------------------------------------------------------

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        """Per tier kind, counters summed over the open namespaces (JSON-ready)."""
        per_kind: dict[str, list[TierStats]] = {name: [] for name in self.config.tier_names}
        for stack in self.namespaces().values():
            for tier in stack.tiers:
                per_kind[tier.name].append(tier.stats())
        out: dict[str, dict[str, Any]] = {}
        for name, snaps in per_kind.items():
            total = _sum_stats(snaps)
            if name == "memory" and self.memory is not None:
                pool = self.memory.stats().extra
                total["blocks"] = int(pool["pool_blocks"])
                total["bytes_used"] = int(pool["pool_bytes"])
                total["capacity_bytes"] = self.memory.capacity_bytes
                total["extra"].pop("pool_blocks", None)
                total["extra"].pop("pool_bytes", None)
            elif name == "disk":
                total["capacity_bytes"] = self.config.disk_bytes * len(snaps)
            out[name] = total
        return out

    def namespace_stats(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per open namespace, each tier's own counters (JSON-ready)."""
        return {ns: {tier.name: _stats_dict(tier.stats()) for tier in stack.tiers}
                for ns, stack in sorted(self.namespaces().items())}

    def close(self) -> None:
        """Close every tier (LMDB saves pending access stamps). Idempotent."""
        with self._lock:
            self._closed = True
            stacks, self._stacks = list(self._stacks.values()), {}
        for stack in stacks:
            for tier in stack.tiers:
                try:
                    tier.close()
                except Exception:  # keep closing the others; report the failure
                    logger.exception("closing tier %r of namespace %r failed", tier.name,
                                     stack.namespace)
        if self.memory is not None:
            self.memory.close()


_COUNTER_FIELDS = ("blocks", "bytes_used", "gets", "hits", "misses", "puts", "bytes_read",
                   "bytes_written", "evictions", "corrupt", "errors")


def _stats_dict(s: TierStats) -> dict[str, Any]:
    out: dict[str, Any] = {f: getattr(s, f) for f in _COUNTER_FIELDS}
    out["capacity_bytes"] = s.capacity_bytes
    out["extra"] = {k: (int(v) if float(v).is_integer() else v) for k, v in s.extra.items()}
    return out


def _sum_stats(snaps: list[TierStats]) -> dict[str, Any]:
    total: dict[str, Any] = {f: 0 for f in _COUNTER_FIELDS}
    total["capacity_bytes"] = None
    extra: dict[str, float] = {}
    for s in snaps:
        for f in _COUNTER_FIELDS:
            total[f] += getattr(s, f)
        for k, v in s.extra.items():
            extra[k] = extra.get(k, 0.0) + v
    total["extra"] = {k: (int(v) if float(v).is_integer() else v) for k, v in extra.items()}
    return total


# ---------------------------------------------------------------------------- requests


def _decode(body: bytes) -> dict[str, Any]:
    if not body:
        raise RequestError(400, "empty body: expected a msgpack map")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise RequestError(400, f"body is not valid msgpack ({type(exc).__name__}: "
                           f"{str(exc)[:100]})") from None
    if type(obj) is not dict:
        raise RequestError(400, f"body must be a msgpack map, got {_kind(obj)}")
    return obj


def _field(obj: dict[str, Any], name: str, max_batch: int) -> list[Any]:
    """The one field ``name`` of the body map, an array within the batch limit."""
    if set(obj) != {name}:
        extra = sorted(map(str, set(obj) - {name}))
        raise RequestError(400, f"body must be a map with exactly the field {name!r}"
                           + (f"; unexpected: {', '.join(extra)}" if extra else ""))
    value = obj[name]
    if type(value) is not list:
        raise RequestError(400, f"{name!r} must be an array, got {_kind(value)}")
    if len(value) > max_batch:
        raise RequestError(413, f"batch of {len(value)} exceeds the limit of {max_batch} "
                           "(--max-batch): split it")
    return value


def _check_key(key: object, where: str) -> bytes:
    if type(key) is not bytes:
        raise RequestError(400, f"{where} must be bin ({KEY_BYTES} bytes), got {_kind(key)}")
    if len(key) != KEY_BYTES:
        raise RequestError(400, f"{where} must be {KEY_BYTES} bytes, got {len(key)}")
    return key


def parse_keys(body: bytes, max_batch: int) -> list[bytes]:
    """The keys of an exists/get/delete body; ``RequestError`` when malformed."""
    raw = _field(_decode(body), "keys", max_batch)
    return [_check_key(k, f"keys[{i}]") for i, k in enumerate(raw)]


def parse_items(body: bytes, max_batch: int) -> list[tuple[bytes, bytes]]:
    """The verified ``(key, block)`` pairs of a put body; ``RequestError`` when malformed
    or when any block does not verify against its key (the first such index is named)."""
    raw = _field(_decode(body), "items", max_batch)
    items: list[tuple[bytes, bytes]] = []
    for i, item in enumerate(raw):
        if type(item) is not list or len(item) != 2:
            raise RequestError(400, f"items[{i}] must be a [key, value] array, got "
                               f"{_kind(item)}" + (f" of {len(item)}" if type(item) is list else ""))
        key = _check_key(item[0], f"items[{i}] key")
        value = item[1]
        if type(value) is not bytes:
            raise RequestError(400, f"items[{i}] value must be bin (an encoded block), got "
                               f"{_kind(value)}")
        items.append((key, value))
    for i, (key, value) in enumerate(items):
        if not verify_block(value, key):
            raise RequestError(400, f"items[{i}] value is not a valid encoded block for its "
                               "key (bad header, checksum, or another key's block); "
                               "nothing was stored")
    return items


# ---------------------------------------------------------------------------- metrics


class _TierCollector(Collector):
    """Prometheus view of the tiers' counters, read from ``stats()`` at scrape time."""

    _COUNTERS = (("gets", "gets", "Blocks looked up"), ("hits", "hits", "Blocks found"),
                 ("misses", "misses", "Blocks not found (absent, corrupt or failed)"),
                 ("puts", "puts", "Blocks stored"),
                 ("bytes_written", "bytes_in", "Encoded block bytes written into the tier"),
                 ("bytes_read", "bytes_out", "Encoded block bytes read out of the tier"),
                 ("evictions", "evictions", "Blocks evicted for capacity"),
                 ("corrupt", "corrupt", "Blocks that failed verification (deleted)"),
                 ("errors", "errors", "Failed tier operations"))

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def collect(self) -> Any:
        stats = self.backend.tier_stats()
        for field, metric, text in self._COUNTERS:
            family = CounterMetricFamily(f"kvstore_tier_{metric}", text, labels=["tier"])
            for tier, s in stats.items():
                family.add_metric([tier], s[field])
            yield family
        for field, metric, text in (("blocks", "blocks", "Blocks held"),
                                    ("bytes_used", "used_bytes", "Encoded block bytes held"),
                                    ("capacity_bytes", "capacity_bytes", "Capacity in bytes")):
            gauge = GaugeMetricFamily(f"kvstore_tier_{metric}", text, labels=["tier"])
            for tier, s in stats.items():
                if s[field] is not None:
                    gauge.add_metric([tier], s[field])
            yield gauge
        yield GaugeMetricFamily("kvstore_daemon_namespaces", "Open namespaces",
                                value=len(self.backend.namespaces()))


class Metrics:
    """The daemon's Prometheus metrics in their own registry (never the global one)."""

    def __init__(self, backend: Backend) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kvstore_daemon_requests", "HTTP requests by endpoint and "
                                "status code", ["endpoint", "code"], registry=r)
        self.latency = Histogram("kvstore_daemon_request_seconds", "Request latency by "
                                 "endpoint (s)", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.keys = Counter("kvstore_daemon_keys", "Keys (or put items) in accepted data "
                            "requests", ["endpoint"], registry=r)
        self.body_bytes = Counter("kvstore_daemon_request_body_bytes", "Request body bytes "
                                  "received", registry=r)
        self.reply_bytes = Counter("kvstore_daemon_response_body_bytes", "Response body "
                                   "bytes sent", registry=r)
        self.inflight = Gauge("kvstore_daemon_inflight_requests", "Data requests in flight",
                              registry=r)
        r.register(_TierCollector(backend))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------- the app


@dataclass
class _State:
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


STATE = web.AppKey("kvstore_daemon_state", _State)
_OPEN_ROUTES = frozenset({"healthz"})
"""Routes served without a token (liveness probes)."""
_LIMITED_ROUTES = frozenset(DATA_OPS)
"""Routes counted against ``max_concurrency``; monitoring stays available under load."""


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    resp = web.json_response({"error": message, "status": status}, status=status,
                             headers=dict(headers or {}))
    return resp


def _endpoint(request: web.Request) -> str:
    name = request.match_info.route.name
    return name if name else "other"


@web.middleware
async def _errors_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                             ) -> web.StreamResponse:
    """Outermost: every refusal becomes a JSON 4xx; metrics for every request."""
    state = request.app[STATE]
    endpoint = _endpoint(request)
    start = time.perf_counter()
    try:
        resp = await handler(request)
    except RequestError as exc:
        resp = _error(exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:  # aiohttp's 404, 405, 413 ...
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") \
            else exc.reason
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = (f"method {request.method} not allowed for {request.path}; "
                       f"allowed: {exc.headers.get('Allow', '')}")
        resp = _error(exc.status, message, headers)
    except Exception:
        logger.exception("internal error in %s %s", request.method, request.path)
        resp = _error(500, "internal error (logged by the daemon)")
    state.requests += 1
    if resp.status >= 400:
        state.rejected += 1
        logger.debug("%s %s -> %d", request.method, request.path, resp.status)
    m = state.metrics
    m.requests.labels(endpoint, str(resp.status)).inc()
    m.latency.labels(endpoint).observe(time.perf_counter() - start)
    if isinstance(resp, web.Response) and resp.body is not None:
        m.reply_bytes.inc(len(resp.body))  # type: ignore[arg-type]
    return resp


@web.middleware
async def _auth_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Bearer-token check (constant-time) on every route but ``/healthz``."""
    token = request.app[STATE].config.token
    if token is not None and _endpoint(request) not in _OPEN_ROUTES:
        given = request.headers.get("Authorization", "")
        scheme, _, credential = given.partition(" ")
        ok = hmac.compare_digest(credential.strip().encode("utf-8", "surrogateescape"),
                                 token.encode())
        if scheme.lower() != "bearer" or not ok:
            reason = "missing Authorization header" if not given else "invalid bearer token"
            raise RequestError(401, f"{reason}: send 'Authorization: Bearer <token>'",
                               {"WWW-Authenticate": 'Bearer realm="kvstore"'})
    return await handler(request)


@web.middleware
async def _limit_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    """At most ``max_concurrency`` data requests in flight; more get 503 + Retry-After."""
    if _endpoint(request) not in _LIMITED_ROUTES:
        return await handler(request)
    state = request.app[STATE]
    if state.inflight >= state.config.max_concurrency:
        raise RequestError(503, f"busy: {state.inflight} requests in flight "
                           f"(--max-concurrency {state.config.max_concurrency}); retry",
                           {"Retry-After": "1"})
    state.inflight += 1
    state.metrics.inflight.inc()
    try:
        return await handler(request)
    finally:
        state.inflight -= 1
        state.metrics.inflight.dec()


async def _read_body(request: web.Request, state: _State) -> bytes:
    """The whole body, within the size limit and ``body_timeout_s``. A body still
    arriving when shutdown starts is abandoned with a 503 (aiohttp stops reading then)."""
    limit = state.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, f"body of {request.content_length} bytes exceeds the limit "
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
            raise RequestError(503, "daemon is shutting down; retry on another replica or "
                               "after its restart", {"Retry-After": "1", "Connection": "close"})
        raise RequestError(408, f"body not received within {state.config.body_timeout_s} s "
                           "(--body-timeout)", {"Connection": "close"})
    try:
        body = read.result()
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(413, f"body exceeds the limit of {limit} bytes "
                           "(--max-body-bytes)") from None
    state.metrics.body_bytes.inc(len(body))
    return body


def _namespace(request: web.Request, state: _State) -> str:
    ns = request.match_info["namespace"]
    if not valid_namespace(ns):
        raise RequestError(400, f"invalid namespace {ns[:80]!r}: it must match "
                           f"{NAMESPACE_PATTERN}")
    allowed = state.config.namespaces
    if allowed is not None and ns not in allowed:
        raise RequestError(404, f"unknown namespace {ns!r}: this daemon serves "
                           f"{', '.join(allowed)}")
    return ns


def _run_op(state: _State, op: str, ns: str, body: bytes) -> bytes:
    """Parse, run and encode one data request (in a worker thread)."""
    backend, limit = state.backend, state.config.max_batch
    if op == "put":
        items = parse_items(body, limit)
        n = len(items)
        reply = msgpack.packb({"stored": backend.put(backend.stack(ns), items)})
    else:
        keys = parse_keys(body, limit)
        n = len(keys)
        stack = backend.stack(ns)
        if op == "get":
            reply = encode_get_reply(*backend.get(stack, keys))
        elif op == "exists":
            reply = msgpack.packb({"count": backend.exists(stack, keys)})
        else:
            reply = msgpack.packb({"deleted": backend.delete(stack, keys)})
    state.metrics.keys.labels(op).inc(n)
    return reply


def _data_handler(op: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        state = request.app[STATE]
        ns = _namespace(request, state)
        body = await _read_body(request, state)
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(state.executor, _run_op, state, op, ns, body)
        return web.Response(body=reply, content_type=CONTENT_TYPE)
    handler.__name__ = f"handle_{op}"
    handler.__doc__ = f"POST /v1/{{namespace}}/{op} (module docstring)."
    return handler


async def _healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the daemon serves; no token needed, no details."""
    return web.json_response({"status": "ok"})


def stats_snapshot(state: _State) -> dict[str, Any]:
    """The ``/v1/stats`` document (JSON-ready)."""
    c = state.config
    return {
        "version": __version__,
        "uptime_s": round(time.monotonic() - state.started, 3),
        "requests": {"total": state.requests, "rejected": state.rejected,
                     "inflight": state.inflight},
        "limits": {"max_body_bytes": c.max_body_bytes, "max_batch": c.max_batch,
                   "max_concurrency": c.max_concurrency, "namespaces": c.namespace_limit},
        "tiers": state.backend.tier_stats(),
        "namespaces": state.backend.namespace_stats(),
    }


async def _stats(request: web.Request) -> web.Response:
    """Counters of every tier (summed and per namespace), requests and limits."""
    return web.json_response(stats_snapshot(request.app[STATE]))


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the daemon's own registry."""
    body = request.app[STATE].metrics.render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def _on_shutdown(app: web.Application) -> None:
    """Shutdown started: requests still receiving their body are answered 503."""
    app[STATE].stopping.set()


async def _on_cleanup(app: web.Application) -> None:
    """After in-flight requests finished: stop the workers, close (flush) every tier."""
    state = app[STATE]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _shutdown_backend, state)


def _shutdown_backend(state: _State) -> None:
    state.executor.shutdown(wait=True)
    state.backend.close()
    logger.info("tiers closed")


def build_app(config: DaemonConfig, backend: Backend | None = None) -> web.Application:
    """The daemon as an aiohttp application (run it with ``web.AppRunner``).

    Opens the tiers (``backend``, when not given); closing the application
    (``runner.cleanup()``) closes them. Raises ``OSError`` when a tier cannot be opened.
    """
    backend = backend if backend is not None else Backend(config)
    app = web.Application(middlewares=[_errors_middleware, _auth_middleware,
                                       _limit_middleware],
                          client_max_size=config.max_body_bytes)
    state = _State(config=config, backend=backend, metrics=Metrics(backend),
                   executor=ThreadPoolExecutor(max_workers=config.max_concurrency,
                                               thread_name_prefix="kvstore-daemon"),
                   started=time.monotonic(), stopping=asyncio.Event())
    app[STATE] = state
    for op in DATA_OPS:
        app.router.add_post(f"/v1/{{namespace}}/{op}", _data_handler(op), name=op)
    app.router.add_get("/v1/stats", _stats, name="stats", allow_head=False)
    app.router.add_get("/metrics", _metrics, name="metrics", allow_head=False)
    app.router.add_get("/healthz", _healthz, name="healthz", allow_head=False)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


# ---------------------------------------------------------------------------- serving


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
    if config.namespaces is not None:
        lines.append(f"namespaces: {', '.join(config.namespaces)} (only these)")
    else:
        lines.append(f"namespaces: any valid name, at most {config.max_namespaces}")
    lines.append(f"limits: body {format_size(config.max_body_bytes)}, batch "
                 f"{config.max_batch} keys, {config.max_concurrency} concurrent requests")
    lines.append("auth: bearer token required" if config.token is not None else
                 "auth: none (loopback only: any local process can read and write the cache)")
    return lines


async def serve(config: DaemonConfig, ready: Callable[[list[Any]], None] | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT, then shut down gracefully: stop accepting,
    let in-flight requests finish (up to ``shutdown_timeout_s``), close every tier.

    ``ready(addresses)`` is called once listening. Raises ``OSError`` when a tier cannot
    be opened or the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    backend = await loop.run_in_executor(None, Backend, config)
    app = build_app(config, backend)
    access_log = logging.getLogger("kvstore.daemon.access")
    runner = web.AppRunner(app, handle_signals=False,
                           shutdown_timeout=config.shutdown_timeout_s,
                           access_log=access_log if access_log.isEnabledFor(logging.DEBUG)
                           else None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        stop = asyncio.Event()
        received: list[str] = []

        def on_signal(sig: signal.Signals) -> None:
            received.append(sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        addresses = runner.addresses
        urls = ", ".join(_address_url(a) for a in addresses)
        logger.info("kvstore daemon %s listening on %s (pid %d)", __version__, urls,
                    os.getpid())
        for line in describe(config):
            logger.info("%s", line)
        if ready is not None:
            ready(addresses)
        await stop.wait()
        state = app[STATE]
        logger.info("received %s: finishing %d in-flight request(s), then closing tiers",
                    received[0], state.inflight)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    logger.info("stopped")


def _address_url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# ---------------------------------------------------------------------------- command line

_EPILOG = f"""\
tiers: lookups try memory, then disk, then redis; a block found below the memory
tier is copied into it. Puts write to every configured tier. Each namespace (tenant)
sees only its own blocks: it has its own LMDB environment (PATH/<namespace>) and
Redis key prefix, and a share of the one memory budget.

sizes: 4096, 512MiB, 8GiB, 1.5G (powers of 1024) or 10GB (powers of 1000).

security: requests need 'Authorization: Bearer <token>' when a token is set (all
endpoints but /healthz). A token is required to listen on a non-loopback address.
Prefer the {TOKEN_ENV} environment variable to --token (command lines are
visible to other local users).

examples:
  kvstore daemon --memory-bytes 8GiB --disk /var/cache/kv --disk-bytes 200GiB
  {TOKEN_ENV}=$(cat /etc/kvstore/token) kvstore daemon --host 0.0.0.0 \\
      --memory-bytes 16GiB --redis redis+cluster://10.0.0.1:6379,10.0.0.2:6379
"""


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be positive seconds, got {text}")
    return value


def _namespaces_arg(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one namespace name")
    for n in names:
        if not valid_namespace(n):
            raise argparse.ArgumentTypeError(f"invalid namespace {n!r}: names are 1-64 of "
                                             "A-Z a-z 0-9 _ . - starting with a letter or digit")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore daemon`` argument parser."""
    p = argparse.ArgumentParser(
        prog="kvstore daemon",
        description="Serve KV-cache blocks over HTTP from host memory, LMDB on disk and/or\n"
                    "Redis, so serving engines on many machines share one prefix cache.\n"
                    "Endpoints: POST /v1/NAMESPACE/{exists,get,put,delete} (msgpack bodies),\n"
                    "GET /v1/stats (JSON), GET /metrics (Prometheus), GET /healthz.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DaemonConfig.__dataclass_fields__
    net = p.add_argument_group("listening")
    net.add_argument("--host", default=d["host"].default,
                     help="address to bind (default %(default)s; 0.0.0.0 = all interfaces, "
                          "needs a token)")
    net.add_argument("--port", type=_port_arg, default=d["port"].default,
                     help="TCP port (default %(default)s; 0 = any free port, logged)")
    net.add_argument("--token", default=None,
                     help=f"bearer token clients must send (default: ${TOKEN_ENV}; "
                          f"at least {MIN_TOKEN_CHARS} characters)")
    tiers = p.add_argument_group("tiers (at least one)")
    tiers.add_argument("--memory-bytes", type=_size_arg, default=d["memory_bytes"].default,
                       metavar="SIZE",
                       help="host DRAM for the memory tier, shared by all namespaces "
                            "(default 1GiB; 0 = no memory tier)")
    tiers.add_argument("--disk", metavar="PATH", default=None,
                       help="directory of the LMDB disk tier (one environment per namespace)")
    tiers.add_argument("--disk-bytes", type=_size_arg, default=0, metavar="SIZE",
                       help="capacity of each namespace's LMDB environment (needed with --disk)")
    tiers.add_argument("--redis", metavar="URL", default=None,
                       help="Redis tier: redis://host:port/db, rediss://..., or "
                            "redis+cluster://host:port,host:port")
    tiers.add_argument("--redis-ttl", type=_seconds_arg, default=None, metavar="SECONDS",
                       help="expiry of blocks written to Redis (default: none)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--namespaces", type=_namespaces_arg, default=None, metavar="A,B,...",
                     help="serve only these namespaces (default: any valid name)")
    lim.add_argument("--max-namespaces", type=_positive_int,
                     default=d["max_namespaces"].default, metavar="N",
                     help="most namespaces opened without --namespaces (default %(default)s)")
    lim.add_argument("--max-body-bytes", type=_size_arg, default=d["max_body_bytes"].default,
                     metavar="SIZE", help="largest request body (default 64MiB; larger: 413)")
    lim.add_argument("--max-batch", type=_positive_int, default=d["max_batch"].default,
                     metavar="N", help="most keys or items in one request (default "
                                       "%(default)s; more: 413)")
    lim.add_argument("--max-concurrency", type=_positive_int,
                     default=d["max_concurrency"].default, metavar="N",
                     help="most data requests in flight (default %(default)s; more: 503 "
                          "with Retry-After)")
    lim.add_argument("--body-timeout", type=_seconds_arg, default=d["body_timeout_s"].default,
                     metavar="SECONDS", help="time to receive a request body (default "
                                             "%(default)s; slower: 408)")
    lim.add_argument("--shutdown-timeout", type=_seconds_arg,
                     default=d["shutdown_timeout_s"].default, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, time in-flight requests get to finish "
                          "(default %(default)s)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"),
                   help="logging level (default %(default)s; debug adds an access log)")
    return p


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> DaemonConfig:
    """A validated config from parsed arguments (``ValueError`` when inconsistent)."""
    token = args.token if args.token is not None else (environ.get(TOKEN_ENV) or None)
    return DaemonConfig(
        host=args.host, port=args.port, memory_bytes=args.memory_bytes,
        disk_path=args.disk, disk_bytes=args.disk_bytes, redis_url=args.redis,
        redis_ttl_s=args.redis_ttl, token=token, namespaces=args.namespaces,
        max_namespaces=args.max_namespaces, max_body_bytes=args.max_body_bytes,
        max_batch=args.max_batch, max_concurrency=args.max_concurrency,
        body_timeout_s=args.body_timeout, shutdown_timeout_s=args.shutdown_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """``kvstore daemon``: 0 after a clean shutdown, 1 when it cannot start, 2 for bad
    arguments (argparse's message, never a traceback)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = config_from_args(args, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    return 0


# ---------------------------------------------------------------------------- launcher

_ROOT = Path(__file__).resolve().parents[1]
_live: weakref.WeakSet[DaemonProcess] = weakref.WeakSet()


def _kill_all() -> None:
    for proc in list(_live):
        proc.close()


atexit.register(_kill_all)


class DaemonProcess:
    """A real ``python -m kvstore daemon`` child process on a loopback port.

    For tests, benchmarks and examples. ``args`` are extra daemon flags (tiers, limits);
    ``--host 127.0.0.1 --port`` are added. ``token``: passed through ``$KVSTORE_DAEMON_TOKEN``
    (``None``: no auth). ``port=None`` picks a free port at the first ``start()`` and keeps
    it for every restart. The daemon's log goes to :attr:`log_path` in a temporary
    directory. Every started process is killed at ``close()``, at interpreter exit, and
    (Linux) when the thread that started it exits.
    """

    def __init__(self, args: Sequence[str] = (), *, token: str | None = None,
                 port: int | None = None, env: Mapping[str, str] | None = None,
                 start_timeout_s: float = 30.0) -> None:
        self.args = list(args)
        self.token = token
        self.port = port or 0
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix="kvstore-daemon-"))
        self.log_path = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        _live.add(self)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the daemon logged so far (all runs)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> DaemonProcess:
        """Start the daemon and wait until ``/healthz`` answers. Returns ``self``.

        Raises ``RuntimeError`` with the log's end when it exits or does not answer in
        ``start_timeout_s``. A picked port lost to another process is retried.
        """
        if self.running:
            return self
        pick = self.port == 0
        for _attempt in range(5):
            if pick:
                self.port = free_port()
            env = {**os.environ, **self.env}
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
            env.pop("KVSTORE_DAEMON_TOKEN", None)
            if self.token is not None:
                env[TOKEN_ENV] = self.token
            cmd = [sys.executable, "-m", "kvstore", "daemon", "--host", "127.0.0.1",
                   "--port", str(self.port), *self.args]
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log,
                                             preexec_fn=die_with_parent)
            if self._wait_ready():
                return self
            text = self.log_text()[offset:]
            self.kill()
            if pick and "address already in use" in text.lower():
                continue
            raise RuntimeError(f"kvstore daemon did not start: {text[-2000:]}")
        raise RuntimeError("kvstore daemon: no free port after 5 attempts")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return True
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.02)
        return False

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful shutdown) and wait; returns the exit code (``None`` if it
        was not running). Kills it if it does not exit within ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> DaemonProcess:
        """Start again on the same port (after ``stop`` or ``kill``)."""
        return self.start()

    def close(self) -> None:
        """Kill the process if it runs and remove the temporary directory."""
        self.kill()
        _live.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Backend", "DaemonConfig", "DaemonProcess", "RequestError", "build_app",
           "build_parser", "free_port", "is_loopback", "main", "parse_items", "parse_keys",
           "parse_size", "serve", "stats_snapshot"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

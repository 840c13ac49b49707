"""The cache daemon (``kvstore daemon``) as a hash-addressed tier: its HTTP client.

URL: ``http://host[:port][/base]`` or ``https://...``; requests go to
``{base}/v1/{namespace}/{exists|get|put|delete}`` with msgpack bodies (the protocol is
``tiers.wire``; ``docs/daemon.md`` has the operator's view). ``namespace`` selects the
tenant on the daemon; ``token`` is sent as ``Authorization: Bearer <token>``.

Batches larger than ``max_batch`` keys or ``max_request_bytes`` of body are split into
several requests (keep both within the daemon's ``--max-batch`` and
``--max-body-bytes``); a single block larger than ``max_request_bytes`` is not sent
(dropped, counted in ``stats().errors`` and ``extra["too_large"]``).

Values received are verified with :func:`tiers.codec.verify_block` against their keys;
a value that fails is a miss counted in ``stats().corrupt``. Blocks the daemon found
corrupt in its own tiers (and deleted) are reported in its reply and counted there too.

Failure contract (``tiers.base``, the same as ``tiers.redis``): no method raises for a
daemon or network failure. Connecting is bounded by ``connect_timeout_s`` and every
socket read or write by ``timeout_s`` (seconds; each wait for bytes, not a whole batch).
A failed round trip (connection refused or reset, timeout, 5xx other than 503, 507) opens a
circuit breaker for a backoff interval (``backoff_s`` doubling per consecutive failure,
up to ``backoff_max_s``) during which calls answer misses without touching the network;
after it one call goes through as a probe and any HTTP reply closes the breaker.
Failures count in ``stats().errors``, short-circuited calls in
``extra["short_circuited"]``; each outage is logged once when it starts and once when it
ends (logger ``tiers.http``). A 4xx reply (bad token, limits) or 503 (daemon busy) is a
counted error and a miss, logged once per status, and does not open the breaker; so is
507 (a put that none of the daemon's tiers stored).

Connections are pooled and kept alive; a pooled connection the daemon closed (idle
timeout, restart) is detected on use and the request is sent once more on a fresh
connection (every endpoint is idempotent). Recovery after a daemon restart needs no new
tier. Thread-safe: any number of threads may call one tier at once, each request on its
own connection.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import msgpack

from radix.hashing import KEY_BYTES
from tiers.base import PutResult, Take, TierStats, take_each
from tiers.breaker import CircuitBreaker
from tiers.codec import verify_block
from tiers.wire import (
    CONTENT_TYPE,
    DATA_OPS,
    NAMESPACE_PATTERN,
    TOKEN_RE,
    encode_keys,
    encode_put_body,
    op_path,
    valid_namespace,
)

logger = logging.getLogger(__name__)

_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)
"""Errors that, on a reused keep-alive connection, mean the daemon had closed it."""
_NOT_OUTAGES = (503, 507)
"""5xx replies of a daemon that is up: busy, or a put none of its tiers could store."""
_ITEM_OVERHEAD = 32
"""Upper bound of the msgpack framing of one ``[key, value]`` pair (bytes)."""


class _Connection(http.client.HTTPConnection):
    """An HTTP connection whose connect and socket I/O have separate timeouts (s)."""

    def __init__(self, host: str, port: int, connect_timeout_s: float,
                 timeout_s: float) -> None:
        super().__init__(host, port, timeout=connect_timeout_s)
        self.io_timeout_s = timeout_s

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.io_timeout_s)


class _TLSConnection(http.client.HTTPSConnection):
    """:class:`_Connection` over TLS (the handshake is bounded by the connect timeout)."""

    def __init__(self, host: str, port: int, connect_timeout_s: float, timeout_s: float,
                 context: ssl.SSLContext | None) -> None:
        super().__init__(host, port, timeout=connect_timeout_s, context=context)
        self.io_timeout_s = timeout_s

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.io_timeout_s)


class _Failure(Exception):
    """Internal: a round trip failed; ``outage`` says whether it opens the breaker."""

    def __init__(self, kind: str, message: str, outage: bool) -> None:
        super().__init__(message)
        self.kind, self.outage = kind, outage


class HTTPTier:
    """A :class:`tiers.base.HashTier` served by a cache daemon (module docstring).

    ``url``: the daemon, ``http(s)://host[:port][/base]``. ``name``: the tier's name in
    stats. ``namespace``: the daemon namespace (tenant) to use, matching
    :data:`NAMESPACE_PATTERN`. ``token``: bearer token, or ``None`` for a daemon without
    auth. ``connect_timeout_s``/``timeout_s``: connect timeout and per-socket-operation
    timeout (seconds); a daemon busy with a large batch must answer within
    ``timeout_s``. ``backoff_s``/``backoff_max_s``: circuit-breaker backoff after the
    first failure and its cap (seconds). ``max_batch``: most keys per request.
    ``max_request_bytes``: most body bytes per put request. ``max_idle_connections``:
    kept-alive connections kept in the pool (more are opened while threads need them
    and closed when returned). ``ssl_context``: for ``https`` URLs (default: the
    system's default verification).

    Construction validates arguments (``ValueError``) but never touches the network.
    """

    def __init__(self, url: str, name: str = "remote", *, namespace: str = "kv",
                 token: str | None = None, timeout_s: float = 1.0,
                 connect_timeout_s: float = 0.25, backoff_s: float = 0.1,
                 backoff_max_s: float = 5.0, max_batch: int = 1024,
                 max_request_bytes: int = 16 << 20, max_idle_connections: int = 32,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if not isinstance(url, str):
            raise ValueError(f"daemon URL must be a str, got {type(url).__name__}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"daemon URL {url!r} must start with http:// or https://")
        if not parts.hostname:
            raise ValueError(f"daemon URL {url!r} has no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"daemon URL {url!r} must not carry credentials; pass token=")
        if parts.query or parts.fragment:
            raise ValueError(f"daemon URL {url!r} must not have a query or fragment")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in daemon URL {url!r}: {exc}") from None
        if not valid_namespace(namespace):
            raise ValueError(f"namespace must match {NAMESPACE_PATTERN}, got {namespace!r}")
        if token is not None and (not isinstance(token, str) or not TOKEN_RE.fullmatch(token)):
            raise ValueError("token must be 1 to 4096 visible ASCII characters")
        for arg, value in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s),
                           ("backoff_s", backoff_s), ("backoff_max_s", backoff_max_s)):
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{arg} must be > 0 seconds, got {value!r}")
        if backoff_max_s < backoff_s:
            raise ValueError("backoff_max_s must be >= backoff_s")
        for arg, count in (("max_batch", max_batch), ("max_request_bytes", max_request_bytes),
                           ("max_idle_connections", max_idle_connections)):
            if type(count) is not int or count < 1:
                raise ValueError(f"{arg} must be a positive int, got {count!r}")
        self.name = name
        self.url = url
        self.namespace = namespace
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        self.max_idle_connections = max_idle_connections
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port or (443 if self._tls else 80)
        self._ssl_context = ssl_context
        self._paths = {op: op_path(parts.path, namespace, op) for op in DATA_OPS}
        self._headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self._breaker = CircuitBreaker(float(backoff_s), float(backoff_max_s))
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False
        self._stats = TierStats(name=name)
        self._extra = {"round_trips": 0, "short_circuited": 0, "outages": 0,
                       "stale_retries": 0, "busy": 0, "too_large": 0}
        self._warned: set[str] = set()

    # -- public API --------------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, the daemon holds (one request per
        ``max_batch`` keys, stopping at the first short answer). A failure counts as
        absent from that point; never raises; counts nothing but errors."""
        _check_keys(keys)
        total = 0
        for chunk in _chunks(keys, self.max_batch):
            if self._closed:
                break
            reply = self._call("exists", encode_keys(chunk))
            count = reply.get("count") if reply is not None else None
            if type(count) is not int or not 0 <= count <= len(chunk):
                if reply is not None:
                    self._protocol_error("exists reply without a valid count")
                break
            total += count
            if count < len(chunk):
                break
        return total

    def get_into(self, keys: Sequence[bytes], take: Take) -> list[bool]:
        """:meth:`get`, each block handed to ``take`` (see :class:`tiers.base.HashTier`)."""
        return take_each(self.get(keys), take)

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Verified encoded blocks in key order; ``None`` for a miss, a corrupt block or
        a failure. Counts ``gets``/``hits``/``misses`` per key, ``bytes_read``, and
        ``corrupt`` (found here or reported by the daemon). Never raises."""
        _check_keys(keys)
        n = len(keys)
        out: list[bytes | None] = [None] * n
        corrupt = 0
        start = 0
        for chunk in _chunks(keys, self.max_batch):
            if self._closed:
                break
            reply = self._call("get", encode_keys(chunk))
            if reply is not None:
                values, reported = reply.get("values"), reply.get("corrupt", 0)
                if (type(values) is not list or len(values) != len(chunk)
                        or type(reported) is not int or reported < 0):
                    self._protocol_error("get reply without a valid values list")
                else:
                    corrupt += reported
                    for j, value in enumerate(values):
                        if value is None:
                            continue
                        if type(value) is bytes and verify_block(value, chunk[j]):
                            out[start + j] = value
                        else:
                            corrupt += 1
            start += len(chunk)
        hits = [v for v in out if v is not None]
        self._count(gets=n, hits=len(hits), misses=n - len(hits),
                    bytes_read=sum(len(v) for v in hits), corrupt=corrupt)
        return out

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> PutResult:
        """Store ``(key, encoded block)`` pairs (split into requests within the batch and
        body limits); returns the keys of the requests the daemon acknowledged in full.
        Best effort: a request that fails is dropped and counted in ``stats().errors``;
        the daemon rejects a whole request that holds an invalid block (a counted 400).
        A reply that stored only part of a request counts those blocks in ``puts`` and
        one error but, since it does not name them, reports none of its keys as stored."""
        _check_keys(key for key, _ in items)
        if not items or self._closed:
            return PutResult()
        held: set[bytes] = set()
        for chunk in self._put_chunks(items):
            if self._closed:
                break
            reply = self._call("put", encode_put_body(chunk))
            if reply is None:
                continue
            stored = reply.get("stored")
            if type(stored) is not int or not 0 <= stored <= len(chunk):
                self._protocol_error("put reply without a valid stored count")
                continue
            if stored < len(chunk):  # the daemon's tiers refused some (full, failing)
                self._count(puts=stored, errors=1)
                self._warn_once("partial put", f"http tier {self.name!r}: the daemon "
                                f"stored {stored} of {len(chunk)} blocks")
                continue
            held.update(key for key, _ in chunk)
            self._count(puts=stored, bytes_written=sum(len(v) for _, v in chunk))
        return PutResult.of(items, held)

    def delete(self, keys: Sequence[bytes]) -> None:
        """Remove keys; absent keys are ignored, failures dropped and counted."""
        _check_keys(keys)
        for chunk in _chunks(keys, self.max_batch):
            if self._closed:
                return
            self._call("delete", encode_keys(chunk))

    def stats(self) -> TierStats:
        """A snapshot of this client's counters (no network call).

        ``gets``/``hits``/``misses``/``puts`` count blocks, ``bytes_*`` bytes of encoded
        blocks. ``blocks``/``bytes_used`` stay 0 (the daemon's ``/v1/stats`` has its
        contents). ``extra``: ``round_trips``, ``short_circuited``, ``outages``,
        ``stale_retries`` (requests re-sent on a fresh connection), ``busy`` (503
        replies), ``too_large`` (blocks not sent) cumulative, and ``down`` (1 during an
        outage).
        """
        with self._lock:
            s = self._stats
            snap = TierStats(**{f: getattr(s, f) for f in s.__dataclass_fields__
                                if f != "extra"})
            snap.extra = {k: float(v) for k, v in self._extra.items()}
        snap.extra["down"] = float(self._breaker.is_open)
        return snap

    def close(self) -> None:
        """Close pooled connections; later calls are misses and no-ops."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> HTTPTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        scheme = "https" if self._tls else "http"
        return (f"HTTPTier({self.name!r}, {scheme}://{self._host}:{self._port}, "
                f"namespace={self.namespace!r})")

    # -- plumbing ----------------------------------------------------------------------

    def _put_chunks(self, items: Sequence[tuple[bytes, bytes]]) -> Iterator[list[tuple[bytes, bytes]]]:
        """Consecutive runs of ``items`` within ``max_batch`` and ``max_request_bytes``;
        a single block over the byte limit is dropped and counted."""
        chunk: list[tuple[bytes, bytes]] = []
        size = 16
        for key, value in items:
            item_bytes = len(key) + len(value) + _ITEM_OVERHEAD
            if item_bytes + 16 > self.max_request_bytes:
                self._count(errors=1)
                self._bump("too_large")
                self._warn_once("too_large", f"http tier {self.name!r}: a block of "
                                f"{len(value)} bytes exceeds max_request_bytes="
                                f"{self.max_request_bytes}; not sent")
                continue
            if chunk and (len(chunk) >= self.max_batch
                          or size + item_bytes > self.max_request_bytes):
                yield chunk
                chunk, size = [], 16
            chunk.append((key, value))
            size += item_bytes
        if chunk:
            yield chunk

    def _call(self, op: str, body: bytes) -> dict[str, Any] | None:
        """One request to endpoint ``op`` with an encoded ``body`` (``tiers.wire``); the
        decoded reply map, or ``None`` after a counted failure or when the breaker
        refused the call."""
        if self._closed:
            return None
        if not self._breaker.allow():
            self._bump("short_circuited")
            return None
        try:
            status, data = self._round_trip(self._paths[op], body)
        except _Failure as fail:
            self._failed(fail)
            return None
        self._bump("round_trips")
        recovered = self._breaker.success()
        if recovered is not None:
            logger.warning("http tier %r: daemon %s:%s is back after %.2f s", self.name,
                           self._host, self._port, recovered)
        if status != 200:
            self._count(errors=1)
            if status == 503:
                self._bump("busy")
            self._warn_once(f"status {status}", f"http tier {self.name!r}: daemon replied "
                            f"{status} to {op}: {_error_text(data)}")
            return None
        try:
            reply = msgpack.unpackb(data, raw=False)
        except Exception:  # msgpack raises many unrelated types for bad input
            reply = None
        if type(reply) is not dict:
            self._protocol_error(f"{op} reply is not a msgpack map")
            return None
        return reply

    def _round_trip(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Send one POST and read the whole reply; (status, body). A pooled connection
        found closed by the daemon is replaced once. Raises :class:`_Failure`."""
        for attempt in range(2):
            conn, reused = self._acquire()
            try:
                conn.request("POST", path, body=body, headers=self._headers)
                resp = conn.getresponse()
                data = resp.read()
            except _STALE as exc:
                conn.close()
                if reused and attempt == 0:
                    self._bump("stale_retries")
                    continue
                raise _Failure(type(exc).__name__, str(exc), outage=True) from None
            except Exception as exc:  # http.client/ssl raise more than OSError on bad I/O
                conn.close()
                raise _Failure(type(exc).__name__, str(exc), outage=True) from None
            if resp.will_close:
                conn.close()
            else:
                self._release(conn)
            if resp.status >= 500 and resp.status not in _NOT_OUTAGES:
                raise _Failure(f"status {resp.status}", _error_text(data), outage=True)
            return resp.status, data
        raise AssertionError("unreachable")  # pragma: no cover

    def _acquire(self) -> tuple[http.client.HTTPConnection, bool]:
        """A pooled idle connection (reused=True) or a new, unconnected one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        if self._tls:
            return _TLSConnection(self._host, self._port, self.connect_timeout_s,
                                  self.timeout_s, self._ssl_context), False
        return _Connection(self._host, self._port, self.connect_timeout_s,
                           self.timeout_s), False

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle_connections:
                self._idle.append(conn)
                return
        conn.close()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _failed(self, fail: _Failure) -> None:
        """Account a failed round trip: stats, breaker, one log line per outage."""
        self._count(errors=1)
        self._drop_idle()
        if self._closed:
            return
        started, delay = self._breaker.failure()
        if started:
            self._bump("outages")
            logger.warning("http tier %r: daemon %s:%s unavailable (%s: %s); answering "
                           "misses, retrying in %.3f s", self.name, self._host, self._port,
                           fail.kind, fail, delay)

    def _protocol_error(self, message: str) -> None:
        self._count(errors=1)
        self._warn_once(message, f"http tier {self.name!r}: {message}")

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)

    def _bump(self, key: str, by: int = 1) -> None:
        with self._lock:
            self._extra[key] += by

    def _warn_once(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        logger.warning("%s (logged once per error type)", message)


def _check_keys(keys: Any) -> None:
    for key in keys:
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise ValueError(f"block keys must be {KEY_BYTES} bytes, got {key!r:.60}")


def _chunks(seq: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def _error_text(data: bytes) -> str:
    """The daemon's error message from a JSON error body, else the body's start."""
    try:
        message = json.loads(data)["error"]
    except Exception:  # not the daemon's JSON error body
        return data[:200].decode("utf-8", "replace")
    return str(message)[:500]


__all__ = ["HTTPTier"]

"""Redis and Redis Cluster as a shared, hash-addressed tier of encoded KV blocks.

URL forms (parsed by :func:`parse_redis_url`; anything else is a ``ValueError`` at
construction)::

    redis://[[user]:password@]host[:port][/db]             one server (port 6379, db 0)
    rediss://[[user]:password@]host[:port][/db]            one server over TLS
    redis+cluster://[[user]:password@]host[:port][,host[:port]...]   Redis Cluster
    rediss+cluster://...                                   Redis Cluster over TLS

Cluster hosts are seeds: the slot map is read from the first that answers
``CLUSTER SLOTS`` and refreshed after a ``MOVED`` reply or a node failure. A cluster
has only db 0. IPv6 hosts are written in brackets (``[::1]:6379``). TLS URLs accept
the query options ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and
``ssl_cert_reqs`` (``none``, ``optional``, ``required``); other query options are
rejected.

Keys: ``{namespace}:`` (UTF-8) followed by the 16 raw key bytes. Namespaces may not
contain ``{`` or ``}``, so no hash tag ever pins every block to one slot: in a cluster
blocks spread over all nodes by ``CRC16(key) mod 16384``, and each batch is split by
node, one pipeline (one round trip) per node. The node pipelines run in one thread per
node (``parallel=True``, the default) or are all sent from the calling thread before
any reply is read (``parallel=False``); either way the nodes work at the same time.
Large replies (blocks) are read straight from the socket into one buffer, bypassing
redis-py's buffered reader (see :func:`_parser_options`).

Values are encoded blocks (``tiers.codec``); ``get`` verifies every value against its
key with :func:`tiers.codec.verify_block` and deletes and counts a corrupt one.

Failure contract (``tiers.base``): no method raises for a Redis failure. Every socket
connect is bounded by ``connect_timeout_s`` and every socket read or write by
``timeout_s`` (seconds), and redis-py's own retries are off. A failed round trip
opens that node's circuit breaker for a backoff interval (``backoff_s`` doubling per
consecutive failure up to ``backoff_max_s``) during which calls for that node are
answered with misses without touching the network; after it, one call goes through as
a probe and its success closes the breaker. Failures count in ``stats().errors``,
calls short-circuited by an open breaker in ``stats().extra["short_circuited"]``, and
each outage is logged once (``logging``, logger ``tiers.redis``) when it starts and
once when it ends. Reconnection needs no new tier: pooled connections are dropped on
failure and reopened by the probe.

Thread-safe: any number of threads may call one tier at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import NoBackoff
from redis.connection import Connection
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import MovedError, RedisError, ResponseError
from redis.retry import Retry

from tiers.base import PutResult, Take, TierStats, take_each
from tiers.breaker import CircuitBreaker
from tiers.codec import verify_block

try:  # redis-py's pure-Python RESP2 reader, extended below for large bulk replies
    from redis._parsers import _RESP2Parser
    from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR, SocketBuffer
    from redis.utils import SENTINEL
except ImportError:  # a redis-py without these internals: use its default parser
    _RESP2Parser = None  # type: ignore[assignment,misc]

_CLIENT_OPTIONS: dict[str, Any] = {"protocol": 2}
"""redis-py client options: RESP2 (no HELLO round trip on connect, any Redis version;
this tier's replies are the same in RESP2 and RESP3) and, where this redis-py has them,
no CLIENT SETINFO round trip on connect and no RESP3 maintenance notifications."""
try:  # newer redis-py names the CLIENT SETINFO metadata with DriverInfo
    from redis.driver_info import DriverInfo
    _CLIENT_OPTIONS["driver_info"] = DriverInfo(name=None, lib_version=None)
except ImportError:  # older redis-py
    _CLIENT_OPTIONS.update(lib_name=None, lib_version=None)
try:
    from redis.maint_notifications import MaintNotificationsConfig
    _CLIENT_OPTIONS["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
except ImportError:  # redis-py without maintenance notifications
    pass


logger = logging.getLogger(__name__)

DEFAULT_PORT = 6379
_SCHEMES = {  # scheme -> (tls, cluster)
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
_TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"})
_CERT_REQS = frozenset({"none", "optional", "required"})
_FAILURES = (RedisError, OSError)
"""Errors that mean the server (not one command) failed."""
_MISS: Any = object()
"""Result placeholder for a command that did not run or failed."""


@dataclass(frozen=True)
class RedisURL:
    """A parsed tier URL: ``nodes`` are ``(host, port)`` (seeds for a cluster)."""

    tls: bool
    cluster: bool
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls_options: dict[str, str] = field(default_factory=dict)


def _parse_host(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host or (rest and not rest.startswith(":")):
            raise ValueError(f"bad IPv6 host {text!r} in Redis URL {url!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = text.partition(":")
        if not host:
            raise ValueError(f"missing host in Redis URL {url!r}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in Redis URL {url!r}")
    return host, int(port_text)


def parse_redis_url(url: str) -> RedisURL:
    """Parse a tier URL (forms in the module docstring). Raises ``ValueError`` naming the
    problem: unknown scheme, missing or bad host/port, bad db, several hosts without
    ``+cluster``, a db other than 0 for a cluster, or an unknown query option."""
    if not isinstance(url, str):
        raise ValueError(f"Redis URL must be a str, got {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"unsupported Redis URL {url!r}: scheme must be one of "
                         f"{', '.join(s + '://' for s in _SCHEMES)}")
    tls, cluster = _SCHEMES[scheme.lower()]
    rest, _, query = rest.partition("?")
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise ValueError(f"Redis URL {url!r} must not have a fragment")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:  # redis://secret@host: a lone userinfo is the password
            username, password = None, unquote(user) or None
    if not hostlist:
        raise ValueError(f"missing host in Redis URL {url!r}")
    nodes = tuple(_parse_host(h.strip(), url) for h in hostlist.split(","))
    if len(nodes) > 1 and not cluster:
        raise ValueError(f"several hosts in {url!r}: use {scheme}+cluster:// for a cluster")
    db_text = path.strip("/")
    if db_text and not db_text.isdigit():
        raise ValueError(f"bad database {db_text!r} in Redis URL {url!r}")
    db = int(db_text or 0)
    if cluster and db:
        raise ValueError(f"Redis Cluster has only database 0, {url!r} names {db}")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    unknown = set(options) - _TLS_OPTIONS
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in Redis URL {url!r}; "
                         f"known: {sorted(_TLS_OPTIONS)}")
    if options and not tls:
        raise ValueError(f"TLS options {sorted(options)} need a rediss:// URL, got {url!r}")
    if options.get("ssl_cert_reqs", "required") not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {sorted(_CERT_REQS)} in {url!r}")
    return RedisURL(tls=tls, cluster=cluster, nodes=nodes, db=db, username=username,
                    password=password, tls_options=options)


_DIRECT_READ_BYTES = 1 << 16
"""Bulk replies longer than this (bytes) are read straight from the socket."""


def _parser_options() -> dict[str, Any]:
    """``parser_class`` for a redis-py connection pool: redis-py's RESP2 parser, except that a
    bulk reply (a block) longer than :data:`_DIRECT_READ_BYTES` is received with
    ``recv_into`` into one buffer and copied once into ``bytes``, instead of passing
    through redis-py's ``BytesIO`` (five copies). Empty when redis-py lacks the parser
    internals this relies on, so the tier then runs on redis-py's default parser."""
    if _RESP2Parser is None or not hasattr(_RESP2Parser, "on_connect"):
        return {}

    class _DirectSocketBuffer(SocketBuffer):
        def read(self, length: int, timeout: Any = SENTINEL) -> bytes:
            want = length + 2  # the value and its CRLF
            if want <= _DIRECT_READ_BYTES or timeout is not SENTINEL:
                return super().read(length, timeout)
            head = self._buffer.read(want)
            have = len(head)
            if have == want:
                return head[:-2]
            out = bytearray(want)
            out[:have] = head
            view = memoryview(out)
            recv_into = self._sock.recv_into
            try:
                while have < want:
                    got = recv_into(view[have:])
                    if not got:
                        raise redis.exceptions.ConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
                    have += got
            except TimeoutError:  # socket.timeout
                raise redis.exceptions.TimeoutError("Timeout reading from socket") from None
            return bytes(view[:length])

    class _DirectRESP2Parser(_RESP2Parser):
        def on_connect(self, connection: Any) -> None:
            super().on_connect(connection)
            assert self._sock is not None  # set from the connected connection just above
            self._buffer = _DirectSocketBuffer(self._sock, self.socket_read_size,
                                               connection.socket_timeout)

    return {"parser_class": _DirectRESP2Parser}


_PARSER = _parser_options()

SLOW_SERVER_BYTES_PER_S = 100e6
"""The least a live server is expected to send (bytes/s). A read waits for its bytes
behind every value requested from the same node before them, by any thread (the server
answers one request at a time), so each wait for bytes of a ``GET`` batch may last
``timeout_s`` plus those values' expected bytes at this rate; an idle tier still gives up
on a stalled server after ``timeout_s``."""


class _Node:
    """One Redis server: its client (connection pool) and its circuit breaker."""

    def __init__(self, host: str, port: int, client: redis.Redis, breaker: CircuitBreaker) -> None:
        self.host, self.port = host, port
        self.client = client
        self.breaker = breaker
        self.reading = 0  # values requested from this node and not yet read (tier's lock)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


class RedisTier:
    """A :class:`tiers.base.HashTier` on Redis or Redis Cluster (module docstring).

    ``url``: see the module docstring. ``ttl_s``: expiry of every block written, in
    seconds (``None``: no expiry; Redis' ``maxmemory-policy`` then evicts).
    ``namespace``: key prefix that isolates tiers sharing a server. ``connect_timeout_s``:
    socket connect timeout, in seconds; an unreachable server costs at most this once,
    then the open breaker answers at once. ``timeout_s``: timeout of each socket read
    and write, in seconds: how long a stalled server (or a starved CPU) may keep a call
    waiting before it counts as down. It bounds each wait for bytes, not a whole batch,
    so large batches need no larger value; a ``GET`` batch's waits also allow for the
    values other threads asked the same node for first (see
    :data:`SLOW_SERVER_BYTES_PER_S`).
    ``backoff_s``/``backoff_max_s``: circuit-breaker backoff after the first failure
    and its cap, in seconds. ``parallel``: run a cluster batch's node pipelines in
    one thread per node (else: send all, then read all, from the calling thread). ``topology_refresh_s``: least interval between two slot-map
    refreshes, in seconds. ``max_connections``: per-node connection pool limit.

    Construction validates arguments (``ValueError``) but never touches the network.
    """

    def __init__(self, url: str, name: str = "redis", *, ttl_s: float | None = None,
                 namespace: str = "kv", connect_timeout_s: float = 0.05,
                 timeout_s: float = 0.1, backoff_s: float = 0.1, backoff_max_s: float = 5.0,
                 parallel: bool = True, topology_refresh_s: float = 1.0,
                 max_connections: int = 256) -> None:
        self.url = parse_redis_url(url)
        if not isinstance(namespace, str) or not namespace or "{" in namespace \
                or "}" in namespace:
            raise ValueError(f"namespace must be a non-empty str without '{{' or '}}' "
                             f"(a hash tag would put every block on one node), got {namespace!r}")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be None or > 0 seconds, got {ttl_s!r}")
        for arg, value in (("connect_timeout_s", connect_timeout_s), ("timeout_s", timeout_s),
                           ("backoff_s", backoff_s), ("backoff_max_s", backoff_max_s)):
            if not value > 0:
                raise ValueError(f"{arg} must be > 0 seconds, got {value!r}")
        if backoff_max_s < backoff_s:
            raise ValueError("backoff_max_s must be >= backoff_s")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.name = name
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.parallel = parallel
        self.topology_refresh_s = topology_refresh_s
        self.max_connections = max_connections
        self._prefix = namespace.encode() + b":"
        self._px = None if ttl_s is None else max(1, round(ttl_s * 1000))
        self._closed = False
        self._lock = threading.Lock()
        self._stats = TierStats(name=name)
        self._extra = {"round_trips": 0, "short_circuited": 0, "outages": 0,
                       "topology_refreshes": 0}
        self._warned: set[str] = set()
        self._value_bytes = 0.0  # running mean of the values read (bytes)
        self._nodes: dict[tuple[str, int], _Node] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._topo_lock = threading.Lock()
        self._topo_breaker = CircuitBreaker(backoff_s, backoff_max_s)
        self._slots: list[_Node] | None = None
        self._topo_at = 0.0
        self._topo_stale = True
        if not self.url.cluster:
            self._single: _Node | None = self._node(*self.url.nodes[0])
        else:
            self._single = None

    # -- public API --------------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, exist (one batched EXISTS per node).

        A failed or short-circuited node counts as absent; never raises.
        """
        if not keys or self._closed:
            return 0
        rkeys = [self._prefix + k for k in keys]
        found = self._run(rkeys, lambda i: ("EXISTS", rkeys[i]))
        n = 0
        for r in found:
            if r is _MISS or not r:
                break
            n += 1
        return n

    def get_into(self, keys: Sequence[bytes], take: Take) -> list[bool]:
        """:meth:`get`, each block handed to ``take`` (see :class:`tiers.base.HashTier`)."""
        return take_each(self.get(keys), take)

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Verified encoded blocks in key order; ``None`` for a miss, a corrupt block
        (counted in ``stats().corrupt`` and deleted) or a failure. Never raises."""
        n = len(keys)
        if not n or self._closed:
            self._count(gets=n, misses=n)
            return [None] * n
        rkeys = [self._prefix + k for k in keys]
        values = self._run(rkeys, lambda i: ("GET", rkeys[i]))
        out: list[bytes | None] = [None] * n
        corrupt: list[bytes] = []
        hits = nbytes = 0
        for i, v in enumerate(values):
            if v is _MISS or v is None:
                continue
            if verify_block(v, keys[i]):
                out[i] = v
                hits += 1
                nbytes += len(v)
            else:
                corrupt.append(rkeys[i])
        if hits:
            with self._lock:
                mean = nbytes / hits
                self._value_bytes = mean if not self._value_bytes else \
                    0.8 * self._value_bytes + 0.2 * mean
        if corrupt:
            logger.debug("redis tier %r: deleting %d corrupt block(s)", self.name, len(corrupt))
            self._run(corrupt, lambda i: ("UNLINK", corrupt[i]))
        self._count(gets=n, hits=hits, misses=n - hits, bytes_read=nbytes,
                    corrupt=len(corrupt))
        return out

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> PutResult:
        """Store ``(key, encoded block)`` pairs (SET, with ``PX`` when ``ttl_s`` is set);
        returns the keys whose SET the server acknowledged.

        Best effort: a write that fails is dropped and counted in ``stats().errors``.
        A key that is not ``bytes`` or a value that is not bytes-like is a programming
        error: ``TypeError``, raised before anything is sent.
        """
        if not items or self._closed:
            return PutResult()
        rkeys = [self._prefix + k for k, _ in items]
        for _, value in items:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"block values must be bytes-like, got {type(value).__name__}")
        px = self._px
        if px is None:
            done = self._run(rkeys, lambda i: ("SET", rkeys[i], items[i][1]))
        else:
            done = self._run(rkeys, lambda i: ("SET", rkeys[i], items[i][1], "PX", px))
        ok = [i for i, r in enumerate(done) if r is not _MISS]
        self._count(puts=len(ok), bytes_written=sum(len(items[i][1]) for i in ok))
        acked = {items[i][0] for i in ok}
        # a key with a failed SET in the batch holds an unknown value: not reported
        acked -= {items[i][0] for i, r in enumerate(done) if r is _MISS}
        return PutResult.of(items, acked)

    def delete(self, keys: Sequence[bytes]) -> None:
        """Remove keys (UNLINK: memory is freed off Redis' main thread); absent keys are
        ignored, failures dropped and counted."""
        if not keys or self._closed:
            return
        rkeys = [self._prefix + k for k in keys]
        self._run(rkeys, lambda i: ("UNLINK", rkeys[i]))

    def stats(self) -> TierStats:
        """A snapshot of this client's counters (no network call).

        ``gets``/``hits``/``misses``/``puts`` count blocks, ``bytes_*`` bytes of encoded
        blocks. ``blocks`` and ``bytes_used`` stay 0: the server is shared, so this client
        does not know its contents. ``extra``: ``round_trips``, ``short_circuited``,
        ``outages``, ``topology_refreshes`` (cumulative) and ``nodes_down`` (now).
        """
        with self._lock:
            s = self._stats
            snap = TierStats(**{f: getattr(s, f) for f in s.__dataclass_fields__
                                if f != "extra"})
            snap.extra = {k: float(v) for k, v in self._extra.items()}
            nodes = list(self._nodes.values())
        snap.extra["nodes_down"] = float(sum(n.breaker.is_open for n in nodes))
        return snap

    def close(self) -> None:
        """Release connections and threads; later calls are misses and no-ops."""
        self._closed = True
        with self._lock:
            nodes, self._nodes = list(self._nodes.values()), {}
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for node in nodes:
            node.client.close()
            node.client.connection_pool.disconnect()

    def __enter__(self) -> RedisTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "cluster" if self.url.cluster else "server"
        hosts = ",".join(f"{h}:{p}" for h, p in self.url.nodes)
        return f"RedisTier({self.name!r}, {kind} {hosts}, namespace={self.namespace!r})"

    # -- plumbing ----------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)

    def _bump(self, key: str, by: int = 1) -> None:
        with self._lock:
            self._extra[key] += by

    def _node(self, host: str, port: int) -> _Node:
        """The node for ``host:port``, creating its client on first use."""
        with self._lock:
            node = self._nodes.get((host, port))
            if node is None:
                u = self.url
                tls: dict[str, Any] = {"ssl": True, **u.tls_options} if u.tls else {}
                client = redis.Redis(
                    host=host, port=port, db=u.db, username=u.username, password=u.password,
                    socket_timeout=self.timeout_s, socket_connect_timeout=self.connect_timeout_s,
                    retry=Retry(NoBackoff(), 0), max_connections=self.max_connections,
                    **_CLIENT_OPTIONS, **tls)
                client.connection_pool.connection_kwargs.update(_PARSER)
                node = _Node(host, port, client, CircuitBreaker(self.backoff_s, self.backoff_max_s))
                self._nodes[(host, port)] = node
            return node

    def _route(self, rkeys: Sequence[bytes],
               idxs: Sequence[int] | None = None) -> dict[_Node, list[int]] | None:
        """Group key indices by node; ``None`` when the cluster slot map is unknown."""
        indices = range(len(rkeys)) if idxs is None else idxs
        if self._single is not None:
            return {self._single: list(indices)}
        slots = self._topology()
        if slots is None:
            self._bump("short_circuited")
            return None
        groups: dict[_Node, list[int]] = {}
        for i in indices:
            groups.setdefault(slots[key_slot(rkeys[i])], []).append(i)
        return groups

    def _run(self, rkeys: Sequence[bytes], cmd: Callable[[int], tuple[Any, ...]]) -> list[Any]:
        """Run command ``cmd(i)`` for every key ``rkeys[i]``, one pipeline per node;
        returns each command's reply, or ``_MISS`` where it failed or did not run.

        Keys answered ``MOVED`` are retried once, on the node the redirection names.
        """
        out: list[Any] = [_MISS] * len(rkeys)
        pending: Sequence[int] | None = None
        for attempt in range(2):
            groups = self._route(rkeys, pending)
            if groups is None:
                return out
            moved = self._execute(groups, cmd, out)
            if not moved:
                break
            if attempt == 1 or self._single is not None:
                self._count(errors=len(moved))
                self._warn_once("MOVED", f"redis tier {self.name!r}: MOVED replies after a "
                                "retry (a cluster behind a redis:// URL? use redis+cluster://)")
                break
            self._redirect(moved)
            pending = [i for i, _, _ in moved]
        return out

    def _execute(self, groups: dict[_Node, list[int]], cmd: Callable[[int], tuple[Any, ...]],
                 out: list[Any]) -> list[tuple[int, _Node, MovedError]]:
        """Run the per-node pipelines; fill ``out``; return the commands answered
        ``MOVED`` as (index, node that replied, error).

        Several nodes: with ``parallel``, one thread per node sends and reads its
        pipeline; without, every node's pipeline is sent first and the replies are read
        afterwards, so the nodes still work at the same time.
        """
        items = list(groups.items())
        moved: list[tuple[int, _Node, MovedError]] = []
        pool = self._executor() if self.parallel and len(items) > 1 else None
        if pool is not None:
            futures = [pool.submit(self._node_call, node, idxs, cmd, out)
                       for node, idxs in items[1:]]
            moved += self._node_call(*items[0], cmd, out)
            for f in futures:
                moved += f.result()
            return moved
        sent = [(node, idxs, self._send(node, idxs, cmd)) for node, idxs in items]
        for node, idxs, call in sent:
            if call is not None:
                moved += self._receive(node, idxs, call, out)
        return moved

    def _node_call(self, node: _Node, idxs: list[int], cmd: Callable[[int], tuple[Any, ...]],
                   out: list[Any]) -> list[tuple[int, _Node, MovedError]]:
        """One pipeline on one node: send, then read the replies."""
        call = self._send(node, idxs, cmd)
        return [] if call is None else self._receive(node, idxs, call, out)

    def _send(self, node: _Node, idxs: list[int],
              cmd: Callable[[int], tuple[Any, ...]]) -> tuple[Connection, int] | None:
        """Send one node's commands in one write, guarded by its breaker. Returns the
        connection to read the replies from and the values it will read (``GET``s), or
        ``None`` (short-circuited or failed). A ``GET`` batch's socket waits allow for
        the values requested from the node before it (:data:`SLOW_SERVER_BYTES_PER_S`)."""
        if not node.breaker.allow():
            self._bump("short_circuited")
            return None
        pool = node.client.connection_pool
        conn: Connection | None = None
        commands = [cmd(i) for i in idxs]
        gets = len(commands) if commands and commands[0][0] == "GET" else 0
        try:
            conn = pool.get_connection()
            if gets:
                with self._lock:
                    node.reading += gets
                    ahead = node.reading * self._value_bytes
                sock = getattr(conn, "_sock", None)
                if ahead and sock is not None:
                    sock.settimeout(self.timeout_s + ahead / SLOW_SERVER_BYTES_PER_S)
            conn.send_packed_command(conn.pack_commands(commands))
        except Exception as exc:  # redis-py raises more than RedisError/OSError on bad I/O
            self._done_reading(node, gets)
            if conn is not None:
                conn.disconnect()
                pool.release(conn)
            self._failed(node, exc)
            return None
        return conn, gets

    def _done_reading(self, node: _Node, gets: int) -> None:
        if gets:
            with self._lock:
                node.reading -= gets

    def _receive(self, node: _Node, idxs: list[int], call: tuple[Connection, int],
                 out: list[Any]) -> list[tuple[int, _Node, MovedError]]:
        """Read one node's replies into ``out``; release the connection (its socket
        timeout back to ``timeout_s``). Returns the commands answered ``MOVED``."""
        conn, gets = call
        pool = node.client.connection_pool
        replies: list[Any] = []
        try:
            for _ in idxs:
                try:
                    replies.append(conn.read_response())
                except ResponseError as err:  # one command's error: the server is fine
                    replies.append(err)
        except Exception as exc:  # redis-py raises more than RedisError/OSError on bad I/O
            conn.disconnect()
            self._failed(node, exc)
            return []
        finally:
            self._done_reading(node, gets)
            sock = getattr(conn, "_sock", None)
            if gets and sock is not None:
                sock.settimeout(self.timeout_s)
            pool.release(conn)
        self._bump("round_trips")
        recovered = node.breaker.success()
        if recovered is not None:
            logger.warning("redis tier %r: %s is back after %.2f s", self.name, node.addr,
                           recovered)
        moved: list[tuple[int, _Node, MovedError]] = []
        errors = 0
        for i, r in zip(idxs, replies):
            if isinstance(r, MovedError):
                moved.append((i, node, r))
            elif isinstance(r, ResponseError):
                errors += 1
                self._warn_once(type(r).__name__,
                                f"redis tier {self.name!r}: {node.addr} replied {r}")
            else:
                out[i] = r
        if errors:
            self._count(errors=errors)
        return moved

    def _redirect(self, moved: list[tuple[int, _Node, MovedError]]) -> None:
        """Point the slots named by ``MOVED`` replies at their new nodes at once; the
        full slot map is refreshed on a later call."""
        with self._topo_lock:
            if self._slots is None:
                return
            slots = list(self._slots)
            for _, via, err in moved:
                slots[err.slot_id] = self._node(err.host or via.host, err.port)
            self._slots, self._topo_stale = slots, True

    def _executor(self) -> ThreadPoolExecutor | None:
        with self._lock:
            if self._pool is None and not self._closed:
                self._pool = ThreadPoolExecutor(max_workers=16,
                                                thread_name_prefix=f"redis-tier-{self.name}")
            return self._pool

    def _failed(self, node: _Node, exc: BaseException) -> None:
        """Account a failed round trip: stats, breaker, one log line per outage."""
        self._count(errors=1)
        node.client.connection_pool.disconnect(inuse_connections=False)
        if self._closed:
            return
        started, delay = node.breaker.failure()
        self._topo_stale = True
        if started:
            self._bump("outages")
            logger.warning("redis tier %r: %s unavailable (%s: %s); answering misses, "
                           "retrying in %.3f s", self.name, node.addr, type(exc).__name__,
                           exc, delay)

    def _warn_once(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        logger.warning("%s (logged once per error type)", message)

    # -- cluster topology --------------------------------------------------------------

    def _topology(self) -> list[_Node] | None:
        """The slot -> node map, refreshed when stale and due; ``None`` if never known."""
        slots = self._slots
        now = time.monotonic()
        if slots is not None and (not self._topo_stale
                                  or now - self._topo_at < self.topology_refresh_s):
            return slots
        with self._topo_lock:
            if self._slots is not None and time.monotonic() - self._topo_at \
                    < self.topology_refresh_s:
                return self._slots
            if not self._topo_breaker.allow():
                return self._slots
            self._refresh_topology()
            return self._slots

    def _refresh_topology(self) -> None:
        """Read ``CLUSTER SLOTS`` from the first node that answers (called under lock)."""
        known = [n for n in list(self._nodes.values()) if not n.breaker.is_open]
        seeds = [self._node(h, p) for h, p in self.url.nodes]
        candidates = list(dict.fromkeys(known + seeds))
        last_exc: BaseException | None = None
        for node in candidates:
            try:
                reply = node.client.execute_command("CLUSTER", "SLOTS")
                slots = self._slot_map(reply, node)
            except _FAILURES as exc:
                last_exc = exc
                continue
            self._slots, self._topo_at, self._topo_stale = slots, time.monotonic(), False
            self._bump("topology_refreshes")
            recovered = self._topo_breaker.success()
            if recovered is not None:
                logger.warning("redis tier %r: cluster reachable again after %.2f s",
                               self.name, recovered)
            return
        self._count(errors=1)
        started, delay = self._topo_breaker.failure()
        if started:
            self._bump("outages")
            logger.warning("redis tier %r: no cluster node answers CLUSTER SLOTS (%s: %s); "
                           "answering misses, retrying in %.3f s", self.name,
                           type(last_exc).__name__, last_exc, delay)

    def _slot_map(self, reply: Any, via: _Node) -> list[_Node]:
        """Build the 16384-entry slot map from a ``CLUSTER SLOTS`` reply.

        Raises ``RedisError`` if the reply does not cover every slot (cluster not ready).
        """
        slots: list[_Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for entry in reply:
            first, last, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            node = self._node(host or via.host, int(master[1]))
            slots[first:last + 1] = [node] * (last - first + 1)
        if any(s is None for s in slots):
            raise RedisError("cluster slot map does not cover every slot")
        return slots  # type: ignore[return-value]


__all__ = ["RedisTier", "RedisURL", "parse_redis_url"]

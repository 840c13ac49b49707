"""KV events: which blocks an engine holds, published to a Redis stream for routers.

An engine's index records a block in a tier (``stored``) or forgets it (``removed``)
through the observer of :class:`radix.RadixTree` (:class:`radix.TreeObserver`): every
insert, promotion, demotion, eviction and corrupt-block drop passes through them. A
:class:`PublishingObserver` (watching the index of an engine with events configured) records each
change of a replica-local tier (gpu, host, disk) as one small tuple in a bounded
in-memory queue; a background thread drains the queue every ``flush_interval_s`` and
appends one batch per flush to a Redis stream (``XADD ... MAXLEN ~ N``). The engine's
step loop pays one deque append per block change; a full queue drops the event and
counts it (a router then holds a stale view: a miss, never a failed request).

Shared tiers (redis, remote) are not published: every replica reaches them equally, so
they never distinguish one replica from another.

An engine without events configured uses :data:`NULL_EVENTS`: its index is a plain
``RadixTree`` with no observer and nothing is recorded, queued or sent.

Wire format (version 1), one stream entry per batch, fields:

- ``v``: ``b"1"``; ``r``: the replica id (UTF-8); ``s``: the batch sequence number of
  this publisher (decimal, from 0; a gap means batches were lost);
- ``e``: the events, concatenated, each :data:`EVENT` (34 bytes): op (1 byte:
  :data:`STORED`, :data:`REMOVED`, :data:`CLEARED`), tier (1 byte, index into
  :data:`TIERS`), block key (16 bytes), parent key (16 bytes; the chain root for a
  first block). ``CLEARED`` (key and parent zero) says "this replica holds nothing":
  each publisher sends it first, so a router forgets what a previous run of the same
  replica held.

The stream of a namespace is :func:`stream_name` of its root key, so replicas of
different models never mix. ``docs/router.md`` argues for Streams over pub/sub.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from radix import KEY_BYTES, NO_OBSERVER, Node, TreeObserver

logger = logging.getLogger("kvstore.events")

STORED = 0
REMOVED = 1
CLEARED = 2
OPS = ("stored", "removed", "cleared")
TIERS = ("gpu", "host", "disk", "redis", "remote")
"""Tier codes of the wire format (index = code)."""
LOCAL_TIERS = ("gpu", "host", "disk")
"""Tiers a replica holds on its own: the ones published."""
EVENT = struct.Struct(f"<BB{KEY_BYTES}s{KEY_BYTES}s")
"""One event on the wire: op, tier code, key, parent key."""
WIRE_VERSION = b"1"
_ZERO_KEY = bytes(KEY_BYTES)


def stream_name(root: bytes) -> str:
    """The Redis stream of the namespace whose chain root is ``root``."""
    return f"kvstore:kv-events:{root.hex()}"


@dataclass(frozen=True)
class Event:
    """One decoded event: ``op`` (:data:`OPS`), ``tier`` (:data:`TIERS`), 16-byte keys."""

    op: str
    tier: str
    key: bytes
    parent: bytes


def decode_events(payload: bytes) -> Iterator[Event]:
    """Events of one batch's ``e`` field. ``ValueError`` for a malformed payload."""
    if len(payload) % EVENT.size:
        raise ValueError(f"event payload of {len(payload)} bytes is not a multiple of "
                         f"{EVENT.size}")
    for op, tier, key, parent in EVENT.iter_unpack(payload):
        if op >= len(OPS) or tier >= len(TIERS):
            raise ValueError(f"unknown event op {op} or tier {tier}")
        yield Event(OPS[op], TIERS[tier], key, parent)


@dataclass(frozen=True)
class EventsConfig:
    """Where and how an engine publishes its KV events. Validated once.

    ``url``: the Redis server (``redis://``, ``rediss://``); ``replica_id``: this
    engine's name in the events (unique among the replicas of one router); ``root``:
    the namespace's chain root (names the stream). ``maxlen``: entries (batches) the
    stream keeps, approximately (``MAXLEN ~``). ``queue_events``: most events waiting
    for the publisher thread; more are dropped and counted. ``batch_events``: most
    events in one stream entry. ``flush_interval_s``: how long events wait at most.
    """

    url: str
    replica_id: str
    root: bytes
    maxlen: int = 100_000
    queue_events: int = 1 << 18
    batch_events: int = 8192
    flush_interval_s: float = 0.01

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--kv-events must be a redis://, rediss:// or unix:// URL, got "
                             f"{self.url.split('@')[-1]!r}")
        if not self.replica_id or len(self.replica_id.encode()) > 256:
            raise ValueError("--replica-id must be 1..256 bytes")
        if len(self.root) != KEY_BYTES:
            raise ValueError(f"namespace root must be {KEY_BYTES} bytes")
        for name in ("maxlen", "queue_events", "batch_events"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.flush_interval_s > 0:
            raise ValueError("flush_interval_s must be > 0 seconds")

    @property
    def stream(self) -> str:
        return stream_name(self.root)


@dataclass(frozen=True)
class EventStats:
    """Publisher counters: events queued, sent (in ``batches``), dropped because the
    queue was full, and lost because Redis refused a batch (``failed_batches``)."""

    queued: int
    sent: int
    batches: int
    dropped: int
    failed_batches: int
    lost: int


class NullEvents:
    """No events configured: a plain index, nothing recorded, nothing sent."""

    def observer(self, tiers: Sequence[str]) -> TreeObserver:
        """What watches the store's index over ``tiers``: nobody."""
        return NO_OBSERVER

    def stats(self) -> EventStats:
        return EventStats(0, 0, 0, 0, 0, 0)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Nothing waits."""

    def close(self) -> None:
        """Nothing to close."""


NULL_EVENTS = NullEvents()


class PublishingObserver:
    """Watches the store's index: records every location change of a published tier.

    The tree calls it from its two choke points (every insert, promotion, demotion,
    eviction and dropped corrupt block passes through them). ``tests/test_router.py``
    checks that the events rebuild exactly the index's locations.
    """

    def __init__(self, tiers: Sequence[str], publisher: EventPublisher) -> None:
        self._put = publisher.put
        # tree tier index -> wire tier code, for published tiers only
        self._codes = {i: TIERS.index(name) for i, name in enumerate(tiers)
                       if name in LOCAL_TIERS}

    def placed(self, node: Node, tier: int) -> None:
        code = self._codes.get(tier)
        if code is not None:
            self._put((STORED, code, node.key, node.parent_key))

    def cleared(self, node: Node, tier: int) -> None:
        code = self._codes.get(tier)
        if code is not None:
            self._put((REMOVED, code, node.key, node.parent_key))


class EventPublisher:
    """Batches events to a Redis stream from a background thread (see module docstring).

    :meth:`put` is called on the store's thread; it never blocks and never raises.
    Opening does not need Redis to answer: a Redis that is down loses batches (counted
    and logged once a minute) and the engine keeps serving.
    """

    def __init__(self, config: EventsConfig) -> None:
        import redis

        self.config = config
        self._redis = redis.Redis.from_url(config.url, socket_timeout=2.0,
                                           socket_connect_timeout=2.0)
        self._queue: collections.deque[tuple[int, int, bytes, bytes]] = collections.deque()
        self._cap = config.queue_events
        self._queued = 0
        self._dropped = 0
        self._sent = 0
        self._batches = 0
        self._failed = 0
        self._lost = 0
        self._seq = 0
        self._last_warning = 0.0
        self._wake = threading.Event()
        self._stop = False
        self._idle = threading.Condition()
        self._busy = False
        self._queue.append((CLEARED, 0, _ZERO_KEY, _ZERO_KEY))
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def observer(self, tiers: Sequence[str]) -> TreeObserver:
        """What watches the store's index over ``tiers``: this publisher."""
        return PublishingObserver(tiers, self)

    def put(self, event: tuple[int, int, bytes, bytes]) -> None:
        """Queue one event (store thread). A full queue drops it and counts it."""
        if len(self._queue) >= self._cap:
            self._dropped += 1
            return
        self._queue.append(event)
        self._queued += 1

    def stats(self) -> EventStats:
        return EventStats(self._queued, self._sent, self._batches, self._dropped,
                          self._failed, self._lost)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (up to ``timeout_s``) until every event queued so far was sent or lost."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._wake.set()
                self._idle.wait(0.01)

    def close(self) -> None:
        """Send what is queued (up to 5 s), stop the thread, close the connection."""
        self.flush()
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5.0)
        self._redis.close()

    def _run(self) -> None:
        interval = self.config.flush_interval_s
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            stopping = self._stop
            while self._queue:
                with self._idle:
                    self._busy = True
                self._send(self._take())
            with self._idle:
                self._busy = False
                self._idle.notify_all()
            if stopping:
                return

    def _take(self) -> list[tuple[int, int, bytes, bytes]]:
        out = []
        popleft = self._queue.popleft
        for _ in range(self.config.batch_events):
            try:
                out.append(popleft())
            except IndexError:
                break
        return out

    def _send(self, events: list[tuple[int, int, bytes, bytes]]) -> None:
        import redis

        payload = b"".join(EVENT.pack(*e) for e in events)
        cfg = self.config
        fields: dict[str | bytes, bytes | str] = {
            "v": WIRE_VERSION, "r": cfg.replica_id.encode(), "s": str(self._seq), "e": payload}
        self._seq += 1
        try:
            self._redis.xadd(cfg.stream, fields,  # type: ignore[arg-type]
                             maxlen=cfg.maxlen, approximate=True)
        except (redis.RedisError, OSError) as exc:
            self._failed += 1
            self._lost += len(events)
            now = time.monotonic()
            if now - self._last_warning > 60:
                self._last_warning = now
                logger.warning("KV events: Redis refused a batch (%s); routers will see a "
                               "stale view until it answers again", exc)
            return
        self._sent += len(events)
        self._batches += 1


EventSink = NullEvents | EventPublisher


def open_events(url: str | None, replica_id: str, root: bytes) -> EventSink:
    """The events of an engine: :data:`NULL_EVENTS` when ``url`` is ``None``."""
    if url is None:
        return NULL_EVENTS
    return EventPublisher(EventsConfig(url, replica_id, root))


__all__ = ["CLEARED", "EVENT", "LOCAL_TIERS", "NULL_EVENTS", "OPS", "REMOVED", "STORED",
           "TIERS", "Event", "EventPublisher", "EventSink", "EventStats", "EventsConfig",
           "NullEvents", "PublishingObserver", "decode_events", "open_events", "stream_name"]

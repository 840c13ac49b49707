"""Reading KV events from the Redis stream into the router's index.

The router reads the namespace's stream from its beginning (what ``MAXLEN ~`` kept:
a router that restarts rebuilds its view), then blocks for new entries (``XREAD
BLOCK``). A Redis that is down is retried every second; meanwhile the index only ages
(routes may miss, requests never fail).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from kvstore.events import decode_events, stream_name
from kvstore.router.index import GlobalIndex
from kvstore.urls import redact_url

logger = logging.getLogger("kvstore.router")


class EventFeed:
    """Consumes one namespace's events stream into ``index``; counters for metrics."""

    def __init__(self, url: str, index: GlobalIndex) -> None:
        self.url = url
        self.index = index
        self.connected = False
        self.events: Counter[str] = Counter()  # op -> events applied
        self.batches = 0
        self.gaps = 0  # batches a publisher sent that never arrived (sequence gaps)
        self.malformed = 0
        self._seq: dict[str, int] = {}

    async def run(self, root: bytes) -> None:
        """Read the stream of namespace ``root`` until cancelled."""
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        stream = stream_name(root)
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=2.0)
        last = "0"
        warned = False
        try:
            while True:
                try:
                    reply = await client.xread({stream: last}, count=512, block=1000)
                except (RedisError, OSError) as exc:
                    if self.connected or not warned:
                        logger.warning("KV events: cannot read %s (%s); routes age until "
                                       "it answers", redact_url(self.url), exc)
                        warned = True
                    self.connected = False
                    await asyncio.sleep(1.0)
                    continue
                if not self.connected:
                    logger.info("KV events: reading %s from %s", stream, redact_url(self.url))
                self.connected = True
                warned = False
                streams: list[Any] = list(reply or [])
                for _name, entries in streams:
                    for entry_id, fields in entries:
                        last = entry_id
                        self.apply(fields)
        finally:
            await client.aclose()

    def apply(self, fields: dict[bytes, bytes]) -> None:
        """Apply one stream entry (a batch)."""
        try:
            replica = fields[b"r"].decode()
            seq = int(fields[b"s"])
            events = list(decode_events(fields[b"e"]))
        except (KeyError, ValueError, UnicodeDecodeError):
            self.malformed += 1
            return
        prev = self._seq.get(replica)
        if prev is not None and seq > prev + 1:
            self.gaps += seq - prev - 1
        self._seq[replica] = seq
        self.index.apply(replica, events)
        self.batches += 1
        for ev in events:
            self.events[ev.op] += 1

"""The replicas behind the router: their state, health checks and namespaces.

A replica is healthy while ``GET /healthz`` answers 200 within ``timeout_s``; it is
checked every ``interval_s`` (by default 0.25 s and 0.5 s: a replica that stops
answering leaves the rotation within 1 s) and comes back at its first good answer. A
request that cannot reach it takes it out at once. Before a replica enters the rotation
the router reads its namespace (``GET /v1/kv/namespace``): its id in the KV events, and
a root and tokenizer that must agree with the router's key space.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kvstore.urls import redact_url

logger = logging.getLogger("kvstore.router")


@dataclass
class Replica:
    """One ``kvstore serve`` behind the router. ``name`` is its replica id once known
    (its URL before); ``in_flight``: requests sent and not finished; ``pending_blocks``:
    uncached prompt blocks of those not yet past their first byte (prefill queued)."""

    url: str
    name: str
    healthy: bool = False
    in_flight: int = 0
    pending_blocks: float = 0.0
    namespace: dict[str, Any] | None = None
    refused: str | None = None  # why it is kept out (namespace mismatch), if it is
    since: float = field(default_factory=time.monotonic)
    failure: str | None = None  # why its last check failed (logged when it changes)

    @property
    def routable(self) -> bool:
        return self.healthy and self.namespace is not None and self.refused is None


class HealthChecker:
    """Polls every replica's ``/healthz`` (and, once, its namespace) until stopped.

    ``on_namespace(replica)`` is called when a replica's namespace was read; it sets
    ``replica.refused`` when the namespace does not fit. ``on_change(replica)`` after
    each change of health.
    """

    def __init__(self, replicas: list[Replica], session: aiohttp.ClientSession, *,
                 interval_s: float, timeout_s: float, headers: dict[str, str],
                 on_namespace: Callable[[Replica], Any],
                 on_change: Callable[[Replica], None]) -> None:
        self.replicas = replicas
        self.session = session
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.headers = headers
        self.on_namespace = on_namespace
        self.on_change = on_change

    async def run(self) -> None:
        await asyncio.gather(*(self._watch(r) for r in self.replicas))

    async def check(self, replica: Replica) -> bool:
        """One check now; updates ``replica.healthy``. True when healthy."""
        ok = False
        try:
            async with self.session.get(replica.url + "/healthz", timeout=self.timeout) as resp:
                ok = resp.status == 200
            if ok and (replica.namespace is None or not replica.healthy):
                # read at the first answer and whenever it comes back (it may have
                # restarted with another model or id)
                async with self.session.get(replica.url + "/v1/kv/namespace",
                                            timeout=self.timeout, headers=self.headers) as resp:
                    if resp.status in (401, 403):
                        raise RuntimeError(
                            f"GET /v1/kv/namespace answered {resp.status}: give the router "
                            "the replicas' API key ($KVSTORE_API_KEY or --api-key)")
                    if resp.status != 200:
                        raise RuntimeError(f"GET /v1/kv/namespace answered {resp.status}")
                    namespace = await resp.json()
                if not isinstance(namespace, dict):
                    raise ValueError("GET /v1/kv/namespace answered no JSON object")
                replica.namespace = namespace
                replica.name = str(namespace.get("replica_id") or replica.url)
                try:
                    await self.on_namespace(replica)
                except BaseException:
                    replica.namespace = None
                    raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError,
                RuntimeError) as exc:
            why = str(exc) or type(exc).__name__
            if replica.healthy:
                logger.warning("replica %s (%s) stopped answering: %s", replica.name,
                               redact_url(replica.url), why)
            elif why != replica.failure:  # once per reason, not every check
                logger.warning("replica %s (%s) not in rotation: %s", replica.name,
                               redact_url(replica.url), why)
            replica.failure = why
            ok = False
        if ok:
            replica.failure = None
        self.set_health(replica, ok)
        return ok

    def set_health(self, replica: Replica, ok: bool) -> None:
        if ok != replica.healthy:
            replica.healthy = ok
            replica.since = time.monotonic()
            if ok:
                logger.info("replica %s (%s) is in rotation", replica.name,
                            redact_url(replica.url))
            self.on_change(replica)

    async def _watch(self, replica: Replica) -> None:
        while True:
            start = time.monotonic()
            await self.check(replica)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - start)))

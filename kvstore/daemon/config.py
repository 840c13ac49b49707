"""The daemon's configuration: one frozen dataclass, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvstore.service import check_exposure
from tiers.wire import NAMESPACE_PATTERN, TOKEN_RE, valid_namespace

DEFAULT_PORT = 8470
TOKEN_ENV = "KVSTORE_DAEMON_TOKEN"
"""Environment variable read for the bearer token when ``--token`` is not given."""
MIN_TOKEN_CHARS = 16
TIER_ORDER = ("memory", "disk", "redis")


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
    - ``reopen_interval_s``: after a namespace's storage failed to open, how long
      requests to it are answered 503 before the daemon tries to open it again.
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
    reopen_interval_s: float = 5.0

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
             "no tier to serve: give --host-bytes > 0, --disk PATH --disk-bytes N, "
             "or --redis URL")
        if self.token is not None:
            need(isinstance(self.token, str) and TOKEN_RE.fullmatch(self.token) is not None
                 and len(self.token) >= MIN_TOKEN_CHARS,
                 f"token must be {MIN_TOKEN_CHARS} to 4096 visible ASCII characters without "
                 "spaces (generate one: python3 -c 'import secrets; "
                 "print(secrets.token_hex(32))')")
        check_exposure(self.host, self.token, "read and overwrite the cache",
                       f"{TOKEN_ENV} (or --token)")
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
        for name in ("body_timeout_s", "reopen_interval_s"):
            value = getattr(self, name)
            need(isinstance(value, int | float) and math.isfinite(value) and value > 0,
                 f"{name} must be positive seconds, got {value!r}")
        value = self.shutdown_timeout_s
        need(isinstance(value, int | float) and math.isfinite(value) and value >= 0,
             f"shutdown_timeout_s must be >= 0 seconds, got {value!r}")

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

    @property
    def durable_tiers(self) -> list[str]:
        """The tiers a put must reach to count as stored: disk and Redis when configured
        (the memory tier is a cache in front of them, lost at restart), else memory."""
        lower = [t for t in self.tier_names if t != "memory"]
        return lower or ["memory"]

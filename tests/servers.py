"""Real redis-server and daemon launchers for tests: one implementation, in ``bench/servers.py``.

Re-exported here so tests import ``servers`` (or ``tests.servers``) without caring where
the launcher lives; benchmarks import ``bench.servers`` and never import tests.
"""

from __future__ import annotations

from bench.servers import (
    HOST,
    REDIS_SERVER,
    DaemonProcess,
    RedisCluster,
    RedisServer,
    free_port,
)

__all__ = ["HOST", "REDIS_SERVER", "DaemonProcess", "RedisCluster", "RedisServer",
           "free_port"]

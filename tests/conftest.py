"""Shared pytest set-up: the repository root on ``sys.path`` and real-server fixtures.

Fixtures:

- ``redis_server``: a fresh, empty redis-server for one test (function scope), killed
  and its directory removed afterwards, whatever the test did to it.
- ``redis_cluster``: one 3-master Redis Cluster for the whole session; each test gets
  it flushed, with any node a previous test stopped restarted first.
- ``smollm2`` and ``model``: the real SmolLM2-135M-Instruct in fp32 (converted once a
  session) and its :class:`engine.model.CausalLM` on the CPU with the torch attention
  backend (modules that need another variant define their own).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.servers import REDIS_SERVER, RedisCluster, RedisServer  # noqa: E402

try:  # One intra-op thread: small CPU models run faster, and never collapse under load.
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass


def _need_redis() -> None:
    if shutil.which(REDIS_SERVER) is None:
        pytest.skip(f"redis-server not found at {REDIS_SERVER}")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port (function scope)."""
    _need_redis()
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisCluster]:
    """The session's 3-master Redis Cluster (use ``redis_cluster`` in tests)."""
    _need_redis()
    cluster = RedisCluster(3)
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisCluster) -> RedisCluster:
    """The session's Redis Cluster, all nodes up, emptied before the test."""
    redis_cluster_session.heal()
    redis_cluster_session.flushall()
    return redis_cluster_session


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2-135M-Instruct in fp32 (an ``engine.loader.LoadedModel``)."""
    from engine.loader import resolve_model

    return resolve_model("smollm2", cache_dir=tmp_path_factory.getbasetemp() / "models",
                         dtype="float32")


@pytest.fixture(scope="session")
def model(smollm2):
    """``smollm2``'s ``CausalLM`` on the CPU, fp32, torch attention backend."""
    from engine.model import CausalLM

    return CausalLM.from_loaded(smollm2, dtype=torch.float32, backend="torch")

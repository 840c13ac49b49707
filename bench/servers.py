"""Launch real ``redis-server`` and ``kvstore daemon`` processes for tests and benchmarks.

One implementation shared by ``tests/`` (which re-exports it from ``tests/servers.py``)
and ``bench/``: real processes on free loopback ports, each in its own temporary
directory; Redis never persists (``--save '' --appendonly no``).

- :class:`RedisServer`: one server. ``start()`` returns once it answers PING;
  ``stop()`` shuts it down cleanly (SIGTERM), ``kill()`` sends SIGKILL (a crash),
  ``restart()`` starts it again on the same port and directory.
- :class:`RedisCluster`: ``n`` masters with ``--cluster-enabled yes``, all 16384 slots
  assigned in ``n`` contiguous ranges and the nodes introduced with CLUSTER MEET;
  ``start()`` returns once every node reports ``cluster_state:ok``. Its ``url`` is the
  ``redis+cluster://host:port,host:port,...`` form that ``tiers.redis.RedisTier`` reads.
- :class:`DaemonProcess`: one ``python -m kvstore daemon``; ``start()`` returns once
  ``/healthz`` answers; ``stop()`` is SIGTERM (graceful), ``kill()`` SIGKILL.

No leaked processes: both classes are context managers, every started server is also
stopped at interpreter exit (``atexit``), and on Linux each server gets
``PR_SET_PDEATHSIG = SIGKILL``, so it dies with the thread that started it even when
the parent is killed outright (SIGKILL, ``os._exit``). Start servers from a thread that
outlives them (the main thread, as pytest fixtures and benchmarks do).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from kvstore.process import die_with_parent, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
"""Path of the ``redis-server`` binary used by :class:`RedisServer`."""

HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384

_live: weakref.WeakSet[_Launched] = weakref.WeakSet()
_live_lock = threading.Lock()


def _stop_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.kill()
        server.cleanup()


atexit.register(_stop_all)


class _Launched:
    """What every launcher shares: a temporary directory, ``close()`` = ``kill()`` and
    remove it, and use as a context manager (``start()`` on entry, ``close()`` on exit)."""

    dir: Path

    def start(self) -> Self:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Remove the temporary directory (the process must be stopped)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def close(self) -> None:
        """Kill the process if it runs and remove its directory."""
        self.kill()
        self.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RedisServer(_Launched):
    """One real ``redis-server`` on a loopback port, in its own temporary directory.

    ``port=None`` picks a free port at the first ``start()`` and keeps it for every
    ``restart()``. ``extra_args`` are passed to redis-server verbatim (e.g.
    ``["--maxmemory", "64mb"]``). Data is never written to disk; ``dir`` also holds the
    server log (``redis.log``) and, for cluster nodes, ``nodes.conf``. DEBUG is enabled
    for local connections (tests use ``DEBUG SLEEP`` to simulate a stalled server);
    cluster nodes run with ``cluster-require-full-coverage no``, so a dead node takes
    down only its own slots.
    """

    def __init__(self, port: int | None = None, *, extra_args: Sequence[str] = (),
                 cluster: bool = False, start_timeout_s: float = 10.0) -> None:
        self.port: int = port or 0
        self.extra_args = list(extra_args)
        self.cluster = cluster
        self.start_timeout_s = start_timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix="kvstore-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """Loopback address the server listens on."""
        return HOST

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the process is alive (it may not accept connections yet)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.dir / "redis.log"

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain redis-py client for this server (for setup and inspection)."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5,
                           socket_connect_timeout=5, **kwargs)  # type: ignore[arg-type]

    def _args(self) -> list[str]:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", HOST,
                "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--protected-mode", "no",
                "--enable-debug-command", "local",
                "--logfile", str(self.log_path), "--loglevel", "warning"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "5000",
                     "--cluster-require-full-coverage", "no"]
        return args + self.extra_args

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Returns ``self``.

        A port lost to another process between picking and binding is retried on a new
        port (only when the port was picked here, never on ``restart``).
        """
        if self.running:
            return self
        pick = self.port == 0
        for _attempt in range(5):
            if pick:
                self.port = free_port()
            self.proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         preexec_fn=die_with_parent)
            with _live_lock:
                _live.add(self)
            if self._wait_ready():
                return self
            self.kill()
            if not pick:
                break
        raise RuntimeError(f"redis-server did not start on port {self.port}: "
                           f"{self._log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def _log_tail(self) -> str:
        parts = []
        if self.proc is not None and self.proc.stderr is not None and self.proc.poll() is not None:
            parts.append(self.proc.stderr.read().decode(errors="replace"))
        with contextlib.suppress(OSError):
            parts.append(self.log_path.read_text(errors="replace")[-2000:])
        return " | ".join(p.strip() for p in parts if p.strip()) or "(no output)"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Shut down cleanly (SIGTERM), SIGKILL if it takes longer than ``timeout_s``."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown, connections reset) and reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        with _live_lock:
            _live.discard(self)

    def restart(self) -> RedisServer:
        """Stop the server if it runs, then start it again on the same port (empty)."""
        self.stop()
        return self.start()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer(port={self.port}, {state})"


class RedisCluster:
    """A real Redis Cluster of ``n`` masters (no replicas) on loopback ports.

    Slots are split into ``n`` contiguous ranges, one per node, and the nodes are
    joined with CLUSTER MEET; ``start()`` waits until every node knows every other node
    and reports ``cluster_state:ok``.
    """

    def __init__(self, n: int = 3, *, extra_args: Sequence[str] = (),
                 start_timeout_s: float = 20.0) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got {n}")
        self.nodes = [RedisServer(extra_args=extra_args, cluster=True) for _ in range(n)]
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...`` (all nodes as seeds)."""
        return "redis+cluster://" + ",".join(f"{HOST}:{s.port}" for s in self.nodes)

    def start(self) -> RedisCluster:
        """Start every node, assign slots, join the nodes and wait for ``cluster_state:ok``."""
        try:
            for node in self.nodes:
                node.start()
            n = len(self.nodes)
            clients = [node.client() for node in self.nodes]
            for i, c in enumerate(clients):
                first, last = i * CLUSTER_SLOTS // n, (i + 1) * CLUSTER_SLOTS // n - 1
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", HOST, node.port)
            for c in clients:
                c.close()
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def wait_ok(self) -> None:
        """Wait until every node knows all ``n`` nodes, reports ``cluster_state:ok`` and
        sees every slot assigned and served (nodes run with full coverage not required,
        so ``cluster_state`` alone can be ok while a restarted node lacks the slot map).

        Raises ``RuntimeError`` after ``start_timeout_s`` seconds.
        """
        deadline = time.monotonic() + self.start_timeout_s
        n = len(self.nodes)
        clients = [node.client() for node in self.nodes]
        try:
            while time.monotonic() < deadline:
                try:
                    infos = [c.cluster("INFO") for c in clients]
                except redis.RedisError:
                    infos = []
                if infos and all(info.get("cluster_state") == "ok"
                                 and int(info.get("cluster_known_nodes", 0)) == n
                                 and int(info.get("cluster_slots_assigned", 0)) == 16384
                                 and int(info.get("cluster_slots_ok", 0)) == 16384
                                 for info in infos):
                    return
                time.sleep(0.05)
        finally:
            for c in clients:
                c.close()
        raise RuntimeError(f"cluster did not reach cluster_state:ok in {self.start_timeout_s} s")

    def heal(self) -> None:
        """Restart any node that is not running (same port, same ``nodes.conf``) and
        wait for ``cluster_state:ok``. Data of a restarted node is gone."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_ok()

    def flushall(self) -> None:
        """Delete every key on every node."""
        for node in self.nodes:
            with node.client() as c:
                c.flushall()

    def dbsizes(self) -> list[int]:
        """Number of keys on each node, in node order."""
        sizes = []
        for node in self.nodes:
            with node.client() as c:
                sizes.append(int(c.dbsize()))
        return sizes

    def close(self) -> None:
        """Kill every node and remove their directories."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisCluster({[s.port for s in self.nodes]})"


class DaemonProcess(_Launched):
    """A real ``python -m kvstore daemon`` child process on a loopback port.

    ``args`` are extra daemon flags (tiers, limits); ``--host 127.0.0.1 --port`` are
    added. ``token``: passed through ``$KVSTORE_DAEMON_TOKEN`` (``None``: no auth).
    ``port=None`` picks a free port at the first ``start()`` and keeps it for every
    restart. The daemon's log goes to :attr:`log_path` in a temporary directory.
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

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

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
        env = {k: v for k, v in {**os.environ, **self.env}.items()
               if k != "KVSTORE_DAEMON_TOKEN"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        if self.token is not None:
            env["KVSTORE_DAEMON_TOKEN"] = self.token
        for _attempt in range(5):
            if pick:
                self.port = free_port()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "kvstore", "daemon", "--host", HOST, "--port",
                     str(self.port), *self.args], cwd=_ROOT, env=env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    preexec_fn=die_with_parent)
            with _live_lock:
                _live.add(self)
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
            if not self.running:
                return False
            conn = http.client.HTTPConnection(HOST, self.port, timeout=1.0)
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
        was never started). Kills it if it does not exit within ``timeout_s``."""
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



_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["HOST", "REDIS_SERVER", "DaemonProcess", "RedisCluster", "RedisServer",
           "free_port"]


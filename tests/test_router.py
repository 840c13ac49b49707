"""KV events and ``kvstore router``: on a real Redis, real stores and real servers.

- The events a store publishes rebuild exactly the locations of its index (gpu, host,
  disk), through insertion, promotion, demotion and eviction.
- An engine without ``--kv-events`` records and sends nothing (the null object).
- Two SmolLM2 ``kvstore serve`` replicas publishing to one Redis behind one router:
  a conversation's second turn lands on the replica holding its first turn; the
  router's view equals each replica's index; a hung replica leaves the rotation and
  comes back when it answers again; killing a replica while requests are in flight
  loses none. (A restarted replica's announcement that it holds nothing is tested in
  process.)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.servers import RedisServer, free_port
from kvstore.config import StoreConfig
from kvstore.events import (
    NULL_EVENTS,
    EventPublisher,
    EventsConfig,
    decode_events,
    open_events,
    stream_name,
)
from kvstore.process import die_with_parent
from kvstore.router.index import GlobalIndex
from kvstore.router.policy import Candidate, Chooser, PolicyConfig
from kvstore.store import KVStore
from radix import Namespace, RadixTree, hash_blocks, token_bytes

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (http://[0-9.]+:[0-9]+)")
START_TIMEOUT_S = 300.0
TIER_MASKS = ("gpu", "host", "disk")


# ------------------------------------------------------------------ events (in process)


def _read_stream(server: RedisServer, root: bytes) -> GlobalIndex:
    index = GlobalIndex()
    with server.client() as client:
        for _id, fields in client.xrange(stream_name(root)):
            index.apply(fields[b"r"].decode(), decode_events(fields[b"e"]))
    index.check_integrity()
    return index


def _tree_view(tree: RadixTree) -> dict[bytes, set[str]]:
    view = {}
    for node in tree.iter_nodes():
        tiers = {name for t, name in enumerate(tree.tier_names)
                 if name in TIER_MASKS and node.locs[t] is not None}
        if tiers:
            view[node.key] = tiers
    return view


def _index_view(index: GlobalIndex, replica: str) -> dict[bytes, set[str]]:
    view = {}
    for key, entry in index._blocks.items():
        mask = entry.get(replica, 0)
        tiers = {name for t, name in enumerate(TIER_MASKS) if mask >> t & 1}
        if tiers:
            view[key] = tiers
    return view


def test_events_rebuild_the_index_through_promotion_demotion_and_eviction(
        redis_server: RedisServer) -> None:
    """A simulated store (real index, real policies) over gpu, host and disk publishes
    to a real Redis; replaying the stream gives exactly the index's locations."""
    ns = Namespace("events-test", dtype="float32", block_size=4)
    root = ns.root()
    publisher = EventPublisher(EventsConfig(redis_server.url, "replica-a", root,
                                            flush_interval_s=0.005))
    store = KVStore(StoreConfig.simulation(block_size=4, gpu_blocks=12, host_blocks=16,
                                           disk_blocks=24), events=publisher)
    rng = random.Random(7)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(4, 24))] for _ in range(6)]
    for _ in range(200):
        ids = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(0, 20))]
        chain = hash_blocks(root, ids, 4)
        store.replay(chain.keys, chain.blocks, len(ids), root=root)
    store.check_integrity()
    publisher.flush()
    stats = store.events.stats()
    assert stats.dropped == stats.lost == 0 and stats.sent == stats.queued + 1  # + CLEARED
    index = _read_stream(redis_server, root)
    view = _tree_view(store.tree)
    assert {t for tiers in view.values() for t in tiers} == {"gpu", "host", "disk"}
    assert _index_view(index, "replica-a") == view
    store.close()


def test_a_restarted_replica_is_forgotten_and_a_full_queue_drops_and_counts(
        redis_server: RedisServer) -> None:
    root = Namespace("events-test-2", block_size=4).root()
    first = EventPublisher(EventsConfig(redis_server.url, "r", root))
    tree = RadixTree(["gpu", "host"], observer=first.observer(["gpu", "host"]))
    tree.insert([b"k" * 16], [token_bytes([1, 2, 3, 4])], 0, [0], root_key=root)
    first.close()
    assert _read_stream(redis_server, root).held("r") == {"gpu": 1}
    second = EventPublisher(EventsConfig(redis_server.url, "r", root))  # a restart
    second.close()
    assert _read_stream(redis_server, root).held("r") == {}
    tiny = EventPublisher(EventsConfig(redis_server.url, "t", root, queue_events=2,
                                       flush_interval_s=60))
    tree = RadixTree(["gpu"], observer=tiny.observer(["gpu"]))
    keys = [bytes([i]) * 16 for i in range(5)]
    tree.insert(keys, [token_bytes([i] * 4) for i in range(5)], 0, list(range(5)),
                root_key=root)
    # The queue held CLEARED and one event: four stored events were dropped and counted.
    assert tiny.stats().dropped == 4
    tiny.close()
    assert _read_stream(redis_server, root).held("t") == {"gpu": 1}


def test_an_engine_without_redis_publishes_nothing(redis_server: RedisServer) -> None:
    """No URL: the null object, a plain index, no thread, no connection, no stream."""
    events = open_events(None, "x", Namespace("m").root())
    assert events is NULL_EVENTS
    store = KVStore(StoreConfig.simulation(block_size=4, gpu_blocks=8))
    assert store.events is NULL_EVENTS and type(store.tree) is RadixTree
    chain = hash_blocks(b"r" * 16, list(range(32)), 4)
    store.replay(chain.keys, chain.blocks, 32)
    assert store.events.stats().queued == 0
    with redis_server.client() as client:
        assert client.dbsize() == 0
    assert not any(t.name == "kv-events" for t in threading.enumerate())


def test_policies_choose_by_prefix_against_load() -> None:
    index = GlobalIndex()
    from kvstore.events import Event

    keys = [bytes([i]) * 16 for i in range(8)]
    index.apply("a", [Event("stored", "host", k, b"") for k in keys[:6]])
    index.apply("b", [Event("stored", "gpu", k, b"") for k in keys[:4]])
    hits = index.match(keys, ["a", "b"])
    assert hits["a"].blocks == 6 and hits["a"].by_tier == {"host": 6}
    assert hits["b"].by_tier == {"gpu": 4}
    prefix = Chooser(PolicyConfig("prefix", load_weight=1.0))
    # a: 6 * 0.8 = 4.8 beats b: 4 * 1.0 = 4.0 ...
    assert prefix.choose([Candidate("a", 0), Candidate("b", 0)], hits).replica == "a"
    # ... until a carries one more request in flight.
    assert prefix.choose([Candidate("a", 1), Candidate("b", 0)], hits).replica == "b"
    # A long prefix outweighs load, up to the imbalance allowed.
    capped = Chooser(PolicyConfig("prefix", load_weight=0.1, max_imbalance=2))
    assert capped.choose([Candidate("a", 2), Candidate("b", 0)], hits).replica == "a"
    assert capped.choose([Candidate("a", 3), Candidate("b", 0)], hits).replica == "b"
    # Prefill queued on a replica counts against it: a holds 4.8 blocks' worth, b 4.0;
    # with 1.0 more uncached block pending on a than on b, b answers sooner.
    assert prefix.choose([Candidate("a", 0, 1.0), Candidate("b", 0, 0.0)],
                         hits).replica == "b"
    assert prefix.choose([Candidate("a", 0, 0.5), Candidate("b", 0, 0.0)],
                         hits).replica == "a"
    # with nothing cached, the replica with less prefill queued wins, whatever the count
    assert prefix.choose([Candidate("a", 0, 40.0), Candidate("b", 1, 0.0)]).replica == "b"
    least = Chooser(PolicyConfig("least-load"))
    assert least.choose([Candidate("a", 3), Candidate("b", 1)]).replica == "b"
    rr = Chooser(PolicyConfig("round-robin"))
    assert [rr.choose([Candidate("a", 0), Candidate("b", 0)]).replica
            for _ in range(4)] == ["a", "b", "a", "b"]
    index.apply("a", [Event("removed", "host", keys[2], b"")])
    assert index.match(keys, ["a"])["a"].blocks == 2
    index.check_integrity()
    with pytest.raises(ValueError, match="--policy"):
        PolicyConfig("random")


# ------------------------------------------------------------------ servers


@dataclass
class Proc:
    """A ``python -m kvstore ...`` child process and its log."""

    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self, env: dict[str, str]) -> Proc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvstore", *self.args],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env=env, preexec_fn=die_with_parent)
        return self

    def wait_listening(self, skip: int = 0) -> Proc:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            found = LISTENING.findall(self.log.read_text(errors="replace"))
            if len(found) > skip:
                self.url = found[-1]
                return self
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.args[0]} did not start:\n{self.text()}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Fleet:
    redis: RedisServer
    replicas: dict[str, Proc]
    router: Proc
    env: dict[str, str]


def _get(url: str) -> Any:
    """The JSON body of a GET, whatever its status (``/healthz`` answers 503 with one)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def _chat(url: str, messages: list[dict[str, str]], max_tokens: int = 8
          ) -> tuple[str, dict[str, Any]]:
    body = json.dumps({"model": "smollm2", "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return resp.headers["X-Kvstore-Replica"], json.loads(resp.read())


def _wait_for(predicate: Any, what: str, timeout_s: float = 30.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("router")
    cache = tmp_path_factory.getbasetemp() / "models"
    redis = RedisServer().start()
    env = {k: v for k, v in os.environ.items() if k != "KVSTORE_API_KEY"}
    env.update(OMP_NUM_THREADS="1", KVSTORE_HOME=str(tmp / "home"))
    replicas: dict[str, Proc] = {}
    router: Proc | None = None
    try:
        for name in ("a", "b"):
            port = free_port()
            replicas[name] = Proc(
                ["serve", "--port", str(port), "--device", "cpu", "--dtype", "float32",
                 "--gpu-kv-bytes", "60MiB", "--host-bytes", "0", "--no-disk",
                 "--max-num-seqs", "8", "--model-cache-dir", str(cache),
                 "--kv-events", redis.url, "--replica-id", name], tmp / f"{name}.log")
        # Convert the model once, then start the second replica from the cache.
        replicas["a"].start(env).wait_listening()
        replicas["b"].start(env).wait_listening()
        router = Proc(["router", "--port", "0", "--kv-events", redis.url,
                       "--replica-timeout", "2",
                       "--replica", replicas["a"].url, "--replica", replicas["b"].url],
                      tmp / "router.log").start(env).wait_listening()
        _wait_for(lambda: _get(router.url + "/healthz")["replicas_in_rotation"] == 2,
                  "both replicas in rotation")
        yield Fleet(redis, replicas, router, env)
        assert "Traceback" not in router.text(), router.text()
    finally:
        procs = [*replicas.values(), *([router] if router else [])]
        for proc in procs:  # all at once, then wait for each
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.stop()
        redis.close()


def _held(fleet: Fleet, replica: str) -> dict[str, int]:
    status = _get(fleet.router.url + "/v1/router")
    return next(r["blocks"] for r in status["replicas"] if r["replica_id"] == replica)


Results = dict[int, tuple[str, dict[str, Any]] | BaseException]


def _ask_in_threads(url: str, prompt: str, n: int, max_tokens: int
                    ) -> tuple[list[threading.Thread], Results]:
    """Start ``n`` chats (``prompt`` formatted with the index) through ``url``, one thread
    each; their answers (or exceptions) land in the returned dict as they finish."""
    results: Results = {}

    def ask(i: int) -> None:
        try:
            results[i] = _chat(url, [{"role": "user", "content": prompt.format(i)}],
                               max_tokens=max_tokens)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertion
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _wait_for_a_request_on(url: str, replica: str) -> None:
    def busy() -> bool:
        status = _get(url + "/v1/router")
        return any(r["replica_id"] == replica and r["in_flight"] > 0
                   for r in status["replicas"])
    _wait_for(busy, f"a request in flight on replica {replica}")


def test_a_second_turn_lands_on_the_replica_holding_its_prefix(fleet: Fleet) -> None:
    first: dict[int, str] = {}
    convs: dict[int, list[dict[str, str]]] = {}

    def turn_one(c: int) -> None:
        msgs = [{"role": "user", "content": f"Conversation {c}: " + " ".join(
            f"word{c}x{i}" for i in range(40)) + ". Summarize the list."}]
        replica, body = _chat(fleet.router.url, msgs)
        first[c] = replica
        msgs += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "Now say it shorter."}]
        convs[c] = msgs

    # First turns at once: the router spreads them by load (they share only the chat
    # template's default system prompt).
    threads = [threading.Thread(target=turn_one, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(convs) == 4
    assert set(first.values()) == {"a", "b"}, first
    for name in ("a", "b"):  # events consumed: the router sees both replicas' blocks
        _wait_for(lambda name=name: _held(fleet, name).get("gpu", 0) > 0, f"{name}'s events")
    for c, msgs in convs.items():
        replica, body = _chat(fleet.router.url, msgs)
        assert replica == first[c], (c, first, replica)
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 48
    metrics = urllib.request.urlopen(fleet.router.url + "/metrics").read().decode()
    assert re.search(r'kvstore_router_decisions_total\{policy="prefix",reason="prefix"\} [4-9]',
                     metrics), metrics
    assert re.search(r'kvstore_router_matched_prefix_tokens_total\{tier="gpu"\} [1-9]', metrics)


def test_the_router_view_equals_each_replica_index(fleet: Fleet) -> None:
    """Events published and consumed: per replica, the blocks the router believes it
    holds equal the blocks its own index holds (once quiet)."""
    for name, proc in fleet.replicas.items():
        def same(name: str = name, proc: Proc = proc) -> bool:
            stats = _get(proc.url + "/v1/stats")["store"]["index"]["blocks"]
            want = {t: n for t, n in stats.items() if t in TIER_MASKS and n}
            return _held(fleet, name) == want
        _wait_for(same, f"the router's view of {name}", timeout_s=10)
    status = _get(fleet.router.url + "/v1/router")
    assert status["events"]["connected"] and status["events"]["gaps"] == 0
    assert status["events"]["applied"]["stored"] > 0


def test_a_replica_that_stops_answering_leaves_the_rotation_and_comes_back(
        fleet: Fleet) -> None:
    """SIGSTOP (a hung process: connections open, no answers), then SIGCONT."""
    url = fleet.router.url
    proc = fleet.replicas["b"].proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        out_s = _wait_for(lambda: _get(url + "/healthz")["replicas_in_rotation"] == 1,
                          "the hung replica to leave the rotation", timeout_s=10)
        assert _chat(url, [{"role": "user", "content": "Hi"}])[0] == "a"
    finally:
        proc.send_signal(signal.SIGCONT)
    back_s = _wait_for(lambda: _get(url + "/healthz")["replicas_in_rotation"] == 2,
                       "the replica to come back", timeout_s=10)
    print(f"hung replica out of rotation after {out_s:.2f} s, back {back_s:.2f} s after "
          "it answered again")


def test_a_request_on_a_replica_that_hangs_moves_to_another(fleet: Fleet) -> None:
    """SIGSTOP while a request is in flight on the replica: the router gives up on it
    once the replica has failed its health checks for --replica-timeout (2 s here) and
    sends the request to the other one; nothing waits for the hung process."""
    url = fleet.router.url
    proc = fleet.replicas["b"].proc
    assert proc is not None
    threads, results = _ask_in_threads(url, "List ten fruits, {}.", 4, max_tokens=48)
    _wait_for_a_request_on(url, "b")
    proc.send_signal(signal.SIGSTOP)
    try:
        for t in threads:  # answered while b is still stopped
            t.join(120)
        failed = {i: r for i, r in results.items() if isinstance(r, BaseException)}
        assert len(results) == 4 and not failed, (results, fleet.router.text()[-2000:])
        assert "failed its health checks for 2 s" in fleet.router.text()
    finally:
        proc.send_signal(signal.SIGCONT)
    _wait_for(lambda: _get(url + "/healthz")["replicas_in_rotation"] == 2,
              "the replica to come back", timeout_s=10)


def test_models_by_name_through_the_router(fleet: Fleet) -> None:
    """A name is forwarded as one name: ``../`` in it reaches no other path."""
    url = fleet.router.url
    assert _get(url + "/v1/models/smollm2")["id"] == "smollm2"
    for path in ("/v1/models/x%2F..%2F..%2Fv1%2Fstats", "/v1/models/org/model"):
        err = _get(url + path)["error"]
        assert err["code"] == "model_not_found", (path, err)


def test_killing_a_replica_loses_no_request(fleet: Fleet) -> None:
    url = fleet.router.url
    threads, results = _ask_in_threads(url, "Count to twenty, {}.", 4, max_tokens=32)
    _wait_for_a_request_on(url, "a")
    fleet.replicas["a"].kill()
    _wait_for(lambda: _get(url + "/healthz")["replicas_in_rotation"] == 1,
              "the dead replica to leave the rotation", timeout_s=10)
    for t in threads:
        t.join(300)
    failed = {i: r for i, r in results.items() if isinstance(r, BaseException)}
    assert not failed and len(results) == 4, failed
    assert {r[0] for r in results.values() if not isinstance(r, BaseException)} >= {"b"}
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    assert re.search(r'kvstore_router_retries_total\{replica="a"\} [1-9]', metrics), metrics
    assert re.search(r'kvstore_router_replica_healthy\{replica="a"\} 0', metrics)
    for i in range(3):  # while it is down, every request is served
        assert _chat(url, [{"role": "user", "content": f"Hello {i}"}])[0] == "b"
    with contextlib.suppress(urllib.error.URLError):
        assert _get(url + "/v1/models")["data"]

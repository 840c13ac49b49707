"""The cache daemon (``kvstore daemon``) and its client tier, against real processes.

Every daemon here is a real ``python -m kvstore daemon`` subprocess on a free loopback
port (``bench.servers.DaemonProcess``), except one test that runs ``build_app`` in
process. Blocks are real encoded blocks of a small layout. Requests that must fail are
sent raw (``http.client``) so the daemon sees exactly the bytes under test; after each
one the test checks that the stored data did not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import DaemonProcess, free_port
from kvstore.daemon import DaemonConfig, build_app, main
from kvstore.service import is_loopback
from kvstore.units import parse_size
from radix.hashing import Namespace, hash_blocks
from tiers.codec import encode_block
from tiers.http import HTTPTier
from tiers.layout import KVLayout
from tiers.memory import MemoryTier
from tiers.wire import encode_get_reply, encode_put_body

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float16")
TOKEN = secrets.token_hex(24)
"""Hex, so never read by argparse as an option when passed as ``--token TOKEN``."""
Items = list[tuple[bytes, bytes]]


def make_blocks(n: int, seed: int = 0, tag: str = "daemon") -> Items:
    """``n`` real encoded blocks ``(key, blob)`` of one chain, random payloads."""
    ids = [(seed * 7919 + i) % 50_000 for i in range(n * LAYOUT.block_size)]
    chain = hash_blocks(Namespace(model=f"{tag}-{seed}").root(), ids, LAYOUT.block_size)
    out = []
    for i, key in enumerate(chain.keys):
        parent = chain.keys[i - 1] if i else chain.root
        out.append((key, encode_block(key, parent, chain.blocks[i], LAYOUT,
                                      os.urandom(LAYOUT.block_bytes))))
    return out


BLOCK_BYTES = len(make_blocks(1)[0][1])


def keys_of(items: Items) -> list[bytes]:
    return [k for k, _ in items]


def values_of(items: Items) -> list[bytes]:
    return [v for _, v in items]


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def msgpack(self) -> Any:
        return msgpack.unpackb(self.body, raw=False)


def request(port: int, method: str, path: str, body: Any = None, *, token: str | None = TOKEN,
            headers: dict[str, str] | None = None, chunked: bool = False) -> Reply:
    """One raw HTTP request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        hdrs = {"Authorization": f"Bearer {token}"} if token is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs, encode_chunked=chunked)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def stats(port: int, token: str | None = TOKEN) -> dict[str, Any]:
    reply = request(port, "GET", "/v1/stats", token=token)
    assert reply.status == 200, reply.body
    return reply.json()


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: (name, sorted labels) -> value."""
    reply = request(port, "GET", "/metrics")
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def tier_for(daemon: DaemonProcess, namespace: str = "kv", **kwargs: Any) -> HTTPTier:
    kwargs.setdefault("timeout_s", 30.0)
    return HTTPTier(daemon.url, namespace=namespace, token=daemon.token, **kwargs)


class HeldRequest:
    """A data request whose body is only half sent: in flight until :meth:`finish`."""

    def __init__(self, port: int, body: bytes, path: str = "/v1/kv/put") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.body = body
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}"
                f"\r\nContent-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n\r\n")
        self.sock.sendall(head.encode() + body[:len(body) // 2])

    def finish(self) -> Reply:
        """Send the rest and read the reply."""
        self.sock.sendall(self.body[len(self.body) // 2:])
        return self.reply()

    def reply(self) -> Reply:
        resp = http.client.HTTPResponse(self.sock)
        resp.begin()
        return Reply(resp.status, resp.headers, resp.read())

    def close(self) -> None:
        self.sock.close()


# ============================================================ the shared daemon

ALLOWED = ("kv", "other", "tenant-b", "fill")
MAX_BATCH = 64
MAX_BODY = 64 << 10
MEMORY_BLOCKS = 4


@dataclass
class Shared:
    """The module's daemon (memory of 4 blocks + LMDB) and the blocks seeded into "kv"."""

    daemon: DaemonProcess
    disk: Path
    seed: Items

    @property
    def port(self) -> int:
        return self.daemon.port

    def assert_unchanged(self, absent: Sequence[bytes] = ()) -> None:
        """The seeded blocks are all there with exact bytes; ``absent`` keys are not."""
        tier = tier_for(self.daemon)
        try:
            assert tier.contains_prefix(keys_of(self.seed)) == len(self.seed)
            assert tier.get(keys_of(self.seed)) == values_of(self.seed)
            for key in absent:
                assert tier.contains_prefix([key]) == 0, "a rejected request stored a key"
            assert tier.stats().errors == 0
        finally:
            tier.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    disk = tmp_path_factory.mktemp("shared-disk")
    daemon = DaemonProcess(["--host-bytes", str(MEMORY_BLOCKS * BLOCK_BYTES),
                            "--disk", str(disk), "--disk-bytes", "64MiB",
                            "--namespaces", ",".join(ALLOWED), "--max-batch", str(MAX_BATCH),
                            "--max-body-bytes", str(MAX_BODY)], token=TOKEN)
    try:
        daemon.start()
        seed = make_blocks(8, seed=1, tag="seed")
        tier = tier_for(daemon)
        tier.put(seed)
        assert tier.stats().puts == 8
        tier.close()
        yield Shared(daemon, disk, seed)
    finally:
        daemon.close()


# ============================================================ round trips


def test_round_trip_through_memory_and_disk(shared: Shared) -> None:
    tier = tier_for(shared.daemon, "other")
    items = make_blocks(20, seed=2)
    keys = keys_of(items)
    assert tier.contains_prefix(keys) == 0
    assert tier.get(keys) == [None] * 20
    tier.put(items)
    assert tier.contains_prefix(keys) == 20
    assert tier.get(keys) == values_of(items)
    assert tier.get(keys[::-1]) == values_of(items)[::-1]
    assert all(type(v) is bytes for v in tier.get(keys))
    tier.delete([keys[5], keys[5], keys_of(make_blocks(1, seed=3))[0]])
    assert tier.contains_prefix(keys) == 5
    assert tier.get(keys[4:7]) == [items[4][1], None, items[6][1]]
    s = tier.stats()
    assert (s.puts, s.bytes_written, s.errors, s.corrupt) == (20, 20 * BLOCK_BYTES, 0, 0)
    assert (s.gets, s.hits, s.misses) == (83, 62, 21)
    assert s.bytes_read == 62 * BLOCK_BYTES
    tier.close()
    # both tiers hold the namespace's blocks; the memory tier only the newest few
    ns = stats(shared.port)["namespaces"]["other"]
    assert ns["disk"]["blocks"] == 19
    assert ns["memory"]["blocks"] <= MEMORY_BLOCKS


def test_lower_tier_hits_fill_the_memory_tier(shared: Shared) -> None:
    tier = tier_for(shared.daemon, "fill")
    items = make_blocks(10, seed=4)
    tier.put(items)
    before = stats(shared.port)["namespaces"]["fill"]
    assert before["memory"]["blocks"] == MEMORY_BLOCKS  # the 4 newest
    assert tier.get(keys_of(items[:3])) == values_of(items[:3])  # from disk, copied up
    middle = stats(shared.port)["namespaces"]["fill"]
    assert middle["disk"]["hits"] - before["disk"]["hits"] == 3
    assert middle["memory"]["misses"] - before["memory"]["misses"] == 3
    assert tier.get(keys_of(items[:3])) == values_of(items[:3])  # now from memory
    after = stats(shared.port)["namespaces"]["fill"]
    assert after["memory"]["hits"] - middle["memory"]["hits"] == 3
    assert after["disk"]["hits"] == middle["disk"]["hits"]
    assert after["memory"]["evictions"] > before["memory"]["evictions"]
    tier.close()


def test_client_splits_batches_and_skips_oversize_blocks(shared: Shared) -> None:
    tier = tier_for(shared.daemon, "other", max_batch=3, max_request_bytes=4 * BLOCK_BYTES)
    items = make_blocks(11, seed=5)
    tier.put(items)
    assert tier.stats().extra["round_trips"] >= 4
    assert tier.get(keys_of(items)) == values_of(items)
    assert tier.contains_prefix(keys_of(items)) == 11
    tier.delete([items[7][0]])
    assert tier.contains_prefix(keys_of(items)) == 7  # the gap is in the third request
    small = HTTPTier(shared.daemon.url, namespace="other", token=TOKEN,
                     max_request_bytes=BLOCK_BYTES // 2)
    fresh = make_blocks(1, seed=6)
    small.put(fresh)
    assert small.stats().extra["too_large"] == 1 and small.stats().errors == 1
    assert small.stats().extra["round_trips"] == 0
    assert tier.contains_prefix(keys_of(fresh)) == 0
    tier.close()
    small.close()


def test_namespaces_isolate_tenants(shared: Shared) -> None:
    a, b = tier_for(shared.daemon, "other"), tier_for(shared.daemon, "tenant-b")
    items = make_blocks(3, seed=7)
    a.put(items)
    assert b.contains_prefix(keys_of(items)) == 0
    assert b.get(keys_of(items)) == [None] * 3
    b.delete(keys_of(items))
    assert a.get(keys_of(items)) == values_of(items)
    assert (shared.disk / "other").is_dir() and (shared.disk / "tenant-b").is_dir()
    nope = tier_for(shared.daemon, "unlisted")  # not in --namespaces: a 404 per call
    assert nope.get(keys_of(items)) == [None] * 3
    nope.put(items)
    assert nope.stats().errors == 2
    assert nope.stats().extra["down"] == 0  # a 4xx is not an outage: the breaker stays shut
    assert nope.stats().extra["round_trips"] == 2
    for tier in (a, b, nope):
        tier.close()
    assert "unlisted" not in stats(shared.port)["namespaces"]
    shared.assert_unchanged()


# ============================================================ auth


def test_auth(shared: Shared) -> None:
    port = shared.port
    body = pack({"keys": keys_of(shared.seed)})
    missing = request(port, "POST", "/v1/kv/exists", body, token=None)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "missing Authorization" in missing.json()["error"]
    for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}",
                   TOKEN, f"Bearer {TOKEN} extra"):
        reply = request(port, "POST", "/v1/kv/exists", body, token=None,
                        headers={"Authorization": header})
        assert reply.status == 401, header
        assert reply.json() == {"error": reply.json()["error"], "status": 401}
    for path in ("/v1/stats", "/metrics", "/nope"):
        assert request(port, "GET", path, token=None).status == 401
    assert request(port, "GET", "/healthz", token=None).status == 200
    ok = request(port, "POST", "/v1/kv/exists", body)
    assert ok.status == 200 and ok.msgpack() == {"count": len(shared.seed)}
    ok = request(port, "POST", "/v1/kv/exists", body, token=None,
                 headers={"Authorization": f"bearer {TOKEN}"})  # the scheme is case-insensitive
    assert ok.status == 200

    wrong = HTTPTier(shared.daemon.url, token="not-the-token-0123456789")
    assert wrong.get(keys_of(shared.seed)) == [None] * len(shared.seed)
    assert wrong.contains_prefix(keys_of(shared.seed)) == 0
    wrong.put(make_blocks(1, seed=8))
    assert wrong.stats().errors == 3 and wrong.stats().extra["down"] == 0
    none = HTTPTier(shared.daemon.url)
    assert none.get(keys_of(shared.seed)) == [None] * len(shared.seed)
    assert none.stats().errors == 1
    for tier in (wrong, none):
        tier.close()
    shared.assert_unchanged(absent=keys_of(make_blocks(1, seed=8)))


def test_non_loopback_bind_needs_a_token() -> None:
    refused = DaemonProcess(["--host", "0.0.0.0"])
    try:
        with pytest.raises(RuntimeError, match="refusing to listen on 0.0.0.0"):
            refused.start()
        assert refused.proc is not None and refused.proc.returncode == 2
        assert "Traceback" not in refused.log_text()
    finally:
        refused.close()
    with DaemonProcess(["--host", "0.0.0.0"], token=TOKEN) as allowed:
        assert "listening on http://0.0.0.0:" in allowed.log_text()
        assert request(allowed.port, "GET", "/v1/stats").status == 200
        assert allowed.stop() == 0
    # --token on the command line works as well as the environment variable
    with DaemonProcess(["--host", "0.0.0.0", "--token", TOKEN]) as flagged:
        assert request(flagged.port, "GET", "/v1/stats").status == 200
        assert request(flagged.port, "GET", "/v1/stats", token=None).status == 401
    # a token that starts with '-' (secrets.token_urlsafe makes one in 64) goes as --token=
    dashed = "-" + TOKEN
    with DaemonProcess(["--host", "0.0.0.0", f"--token={dashed}"]) as flagged:
        assert request(flagged.port, "GET", "/v1/stats", token=dashed).status == 200
        assert request(flagged.port, "GET", "/v1/stats").status == 401


# ============================================================ malformed requests


@dataclass(frozen=True)
class Bad:
    """One malformed request and the answer it must get."""

    path: str
    body: bytes | None
    status: int
    message: str
    method: str = "POST"
    chunked: bool = False
    absent: tuple[bytes, ...] = ()


FRESH = make_blocks(MAX_BATCH + 1, seed=9, tag="fresh")
"""Blocks no test stores: every malformed put tries to store some of them."""
K0, V0 = FRESH[0]
K1, V1 = FRESH[1]
TAMPERED = V1[:-1] + bytes([V1[-1] ^ 1])


def _bad_cases() -> dict[str, Bad]:
    big = pack({"keys": [K0] * 10}) + b"\x00" * MAX_BODY
    return {
        "bad msgpack": Bad("/v1/kv/get", b"\xc1", 400, "not valid msgpack"),
        "truncated msgpack": Bad("/v1/kv/get", pack({"keys": [K0]})[:-3], 400,
                                 "not valid msgpack"),
        "trailing bytes": Bad("/v1/kv/exists", pack({"keys": [K0]}) + b"\x01", 400,
                              "not valid msgpack"),
        "declared huge array": Bad("/v1/kv/get", b"\x81\xa4keys\xdd\xff\xff\xff\xff", 400,
                                   "not valid msgpack"),
        "invalid utf-8 str": Bad("/v1/kv/get", b"\x81\xa4\xff\xfe\xfd\xfc\x90", 400,
                                 "not valid msgpack"),
        "int map key": Bad("/v1/kv/get", pack({1: [K0]}), 400, "not valid msgpack"),
        "empty body": Bad("/v1/kv/get", b"", 400, "empty body"),
        "top-level array": Bad("/v1/kv/get", pack([K0]), 400, "must be a msgpack map, got array"),
        "top-level int": Bad("/v1/kv/delete", pack(7), 400, "must be a msgpack map, got int"),
        "missing field": Bad("/v1/kv/get", pack({"key": [K0]}), 400, "exactly the field 'keys'"),
        "extra field": Bad("/v1/kv/delete", pack({"keys": [K0], "all": True}), 400,
                           "unexpected: all"),
        "keys not an array": Bad("/v1/kv/get", pack({"keys": K0}), 400,
                                 "'keys' must be an array, got bin"),
        "key is str": Bad("/v1/kv/exists", pack({"keys": [K0, "a" * 16]}), 400,
                          "keys[1] must be bin"),
        "key of 15 bytes": Bad("/v1/kv/get", pack({"keys": [K0, K0[:15]]}), 400,
                               "keys[1] must be 16 bytes, got 15"),
        "key of 17 bytes": Bad("/v1/kv/delete", pack({"keys": [K0 + b"x"]}), 400,
                               "keys[0] must be 16 bytes, got 17"),
        "nil key": Bad("/v1/kv/delete", pack({"keys": [None]}), 400, "keys[0] must be bin"),
        "put with keys": Bad("/v1/kv/put", pack({"keys": [K0]}), 400,
                             "exactly the field 'items'", absent=(K0,)),
        "item not a pair": Bad("/v1/kv/put", pack({"items": [[K0]]}), 400,
                               "items[0] must be a [key, value] array", absent=(K0,)),
        "item is a map": Bad("/v1/kv/put", pack({"items": [{"k": K0}]}), 400,
                             "items[0] must be a [key, value] array, got map", absent=(K0,)),
        "item key of 15 bytes": Bad("/v1/kv/put", pack({"items": [[K0[:15], V0]]}), 400,
                                    "items[0] key must be 16 bytes", absent=(K0,)),
        "item value str": Bad("/v1/kv/put", pack({"items": [[K0, "block"]]}), 400,
                              "items[0] value must be bin", absent=(K0,)),
        "value not a block": Bad("/v1/kv/put", pack({"items": [[K0, b"garbage"]]}), 400,
                                 "items[0] value is not a valid encoded block", absent=(K0,)),
        "another key's block": Bad("/v1/kv/put", pack({"items": [[K0, V1]]}), 400,
                                   "items[0] value is not a valid", absent=(K0, K1)),
        "tampered block after a good one": Bad(
            "/v1/kv/put", pack({"items": [[K0, V0], [K1, TAMPERED]]}), 400,
            "items[1] value is not a valid", absent=(K0, K1)),
        "batch too long": Bad("/v1/kv/get", pack({"keys": [K0] * (MAX_BATCH + 1)}), 413,
                              f"limit of {MAX_BATCH} (--max-batch)"),
        "put batch too long": Bad("/v1/kv/put", pack({"items": [list(p) for p in FRESH]}),
                                  413, "--max-batch", absent=tuple(keys_of(FRESH))),
        "body too large": Bad("/v1/kv/get", big, 413, "--max-body-bytes"),
        "chunked body too large": Bad("/v1/kv/get", big, 413, "--max-body-bytes",
                                      chunked=True),
        "unknown namespace": Bad("/v1/unlisted/get", pack({"keys": [K0]}), 404,
                                 "unknown namespace 'unlisted'"),
        "namespace with $": Bad("/v1/bad$ns/put", pack({"items": [[K0, V0]]}), 400,
                                "invalid namespace", absent=(K0,)),
        "namespace too long": Bad(f"/v1/{'a' * 65}/get", pack({"keys": [K0]}), 400,
                                  "invalid namespace"),
        "namespace starting with -": Bad("/v1/-kv/get", pack({"keys": [K0]}), 400,
                                         "invalid namespace"),
        "namespace with encoded slash": Bad("/v1/kv%2Fx/get", pack({"keys": [K0]}), 400,
                                            "invalid namespace"),
        "unknown operation": Bad("/v1/kv/frobnicate", pack({"keys": [K0]}), 404,
                                 "no such endpoint"),
        "unknown path": Bad("/nope", None, 404, "no such endpoint", method="GET"),
        "no version": Bad("/kv/get", pack({"keys": [K0]}), 404, "no such endpoint"),
        "GET on a data endpoint": Bad("/v1/kv/get", None, 405, "allowed: POST", method="GET"),
        "PUT on put": Bad("/v1/kv/put", pack({"items": [[K0, V0]]}), 405, "not allowed",
                          method="PUT", absent=(K0,)),
        "DELETE on delete": Bad("/v1/kv/delete", pack({"keys": keys_of(FRESH[:1])}), 405,
                                "not allowed", method="DELETE"),
        "POST on stats": Bad("/v1/stats", b"{}", 405, "allowed: GET"),
        "POST on healthz": Bad("/healthz", b"", 405, "allowed: GET"),
    }


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_malformed_request_gets_a_4xx_and_changes_nothing(shared: Shared, case: str) -> None:
    bad = BAD_CASES[case]
    before = stats(shared.port)["tiers"]
    body: Any = bad.body
    if bad.chunked:
        body = iter([bad.body[i:i + 4096] for i in range(0, len(bad.body), 4096)])
    reply = request(shared.port, bad.method, bad.path, body, chunked=bad.chunked)
    assert reply.status == bad.status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    doc = reply.json()
    assert doc["status"] == bad.status
    assert bad.message in doc["error"], doc["error"]
    after = stats(shared.port)["tiers"]
    for tier in ("memory", "disk"):  # nothing written, deleted or evicted
        for field in ("blocks", "bytes_used", "puts", "evictions"):
            assert after[tier][field] == before[tier][field], (tier, field)
    shared.assert_unchanged(absent=list(bad.absent))


def test_deleting_and_getting_through_raw_requests(shared: Shared) -> None:
    """The wire format itself: reply fields and types."""
    items = make_blocks(3, seed=10)
    port = shared.port
    put = request(port, "POST", "/v1/other/put", pack({"items": [list(p) for p in items]}),
                  headers={"Content-Type": "application/msgpack"})
    assert put.status == 200 and put.msgpack() == {"stored": 3}
    assert put.headers["Content-Type"] == "application/msgpack"
    got = request(port, "POST", "/v1/other/get", pack({"keys": [items[0][0], K0]})).msgpack()
    assert got == {"values": [items[0][1], None], "corrupt": 0}
    ex = request(port, "POST", "/v1/other/exists", pack({"keys": keys_of(items) + [K0]}))
    assert ex.msgpack() == {"count": 3}
    deleted = request(port, "POST", "/v1/other/delete",
                      pack({"keys": [items[0][0], items[0][0], K0]})).msgpack()
    assert deleted == {"deleted": 2}
    assert request(port, "POST", "/v1/other/exists",
                   pack({"keys": keys_of(items)})).msgpack() == {"count": 0}
    empty = request(port, "POST", "/v1/other/get", pack({"keys": []})).msgpack()
    assert empty == {"values": [], "corrupt": 0}


# ============================================================ fuzz

_INTS = st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1)
"""Every integer msgpack can carry."""
_KEYISH = st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20),
                    st.text(max_size=18), _INTS, st.none())
_LEAF = st.one_of(st.none(), st.booleans(), _INTS, st.floats(), st.text(max_size=12),
                  st.binary(max_size=48))
_TREE = st.recursive(_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.one_of(st.text(max_size=6), st.binary(max_size=6)), inner, max_size=4)),
    max_leaves=16)
_SHAPED = st.one_of(
    st.fixed_dictionaries({"keys": st.lists(_KEYISH, max_size=MAX_BATCH + 2)}),
    st.fixed_dictionaries({"items": st.lists(
        st.one_of(st.lists(st.one_of(_KEYISH, st.binary(max_size=600)), max_size=3), _TREE),
        max_size=6)}),
    st.dictionaries(st.sampled_from(["keys", "items", "values"]), _TREE, max_size=3),
    _TREE)
_BODIES = st.one_of(st.binary(max_size=400), _SHAPED.map(pack))


_PATHS = st.one_of(
    st.builds(lambda ns, op: f"/v1/{ns}/{op}",
              st.sampled_from(["kv", "other", "unlisted", "x%20y", "%ff", ".."]),
              st.sampled_from(["exists", "get", "put", "delete", "stats", ""])),
    st.sampled_from(["/v1/stats", "/metrics", "/healthz", "/", "/v1", "/v1/kv"]))


def test_fuzzed_requests_never_get_a_5xx_and_change_nothing(shared: Shared) -> None:
    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(op=st.sampled_from(["exists", "get", "put", "delete"]),
           namespace=st.sampled_from(["kv", "other", "unlisted", "x%20y"]), body=_BODIES,
           other_path=_PATHS, method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH"]),
           data_endpoint=st.integers(0, 3))
    def one(op: str, namespace: str, body: bytes, other_path: str, method: str,
            data_endpoint: int) -> None:
        if data_endpoint:  # mostly well-formed paths, so the bodies reach the parsers
            path, method = f"/v1/{namespace}/{op}", "POST"
        else:
            path = other_path
        reply = request(shared.port, method, path, body)
        assert reply.status < 500, reply.body
        if reply.status != 200:
            assert reply.json()["status"] == reply.status
        elif path.startswith("/v1/") and path.rsplit("/", 1)[1] in ("exists", "get", "put",
                                                                       "delete"):
            doc = reply.msgpack()
            assert isinstance(doc, dict)
            if path.endswith("/put"):  # random bytes never verify as a block: only [] is
                assert doc == {"stored": 0}

    one()
    assert shared.daemon.running
    assert request(shared.port, "GET", "/healthz").status == 200
    shared.assert_unchanged()
    assert "internal error" not in shared.daemon.log_text()


# ============================================================ metrics and stats


def test_metrics_and_stats_reflect_activity(shared: Shared) -> None:
    port = shared.port
    m0, s0 = metrics(port), stats(port)
    tier = tier_for(shared.daemon, "tenant-b")
    items = make_blocks(3, seed=11)
    tier.put(items)
    for _ in range(5):
        assert tier.get(keys_of(items)) == values_of(items)
    tier.get(keys_of(make_blocks(2, seed=12)))
    assert request(port, "POST", "/v1/kv/get", b"\xc1").status == 400
    tier.close()
    m1, s1 = metrics(port), stats(port)

    def d(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    assert d("kvstore_daemon_requests_total", endpoint="get", code="200") == 6
    assert d("kvstore_daemon_requests_total", endpoint="put", code="200") == 1
    assert d("kvstore_daemon_requests_total", endpoint="get", code="400") == 1
    assert d("kvstore_daemon_request_seconds_count", endpoint="get") == 7
    assert d("kvstore_daemon_request_seconds_sum", endpoint="get") > 0
    assert d("kvstore_daemon_keys_total", endpoint="get") == 17
    assert d("kvstore_daemon_keys_total", endpoint="put") == 3
    assert d("kvstore_daemon_request_body_bytes_total") > 3 * BLOCK_BYTES
    assert d("kvstore_daemon_response_body_bytes_total") > 15 * BLOCK_BYTES
    hits = d("kvstore_tier_hits_total", tier="memory") + d("kvstore_tier_hits_total", tier="disk")
    assert hits == 15
    assert d("kvstore_tier_puts_total", tier="disk") == 3
    assert d("kvstore_tier_bytes_in_total", tier="disk") == 3 * BLOCK_BYTES
    assert d("kvstore_tier_misses_total", tier="disk") >= 2
    assert d("kvstore_tier_errors_total", tier="disk") == 0
    assert m1[("kvstore_tier_capacity_bytes", (("tier", "memory"),))] == MEMORY_BLOCKS * BLOCK_BYTES
    assert m1[("kvstore_daemon_namespaces", ())] == s1["limits"]["namespaces"] == len(ALLOWED)
    assert m1[("kvstore_daemon_inflight_requests", ())] == 0

    # 8 data requests, the first /v1/stats (counted once it is answered) and /metrics
    assert s1["requests"]["total"] - s0["requests"]["total"] == 10
    assert s1["requests"]["rejected"] - s0["requests"]["rejected"] == 1
    assert s1["tiers"]["disk"]["puts"] - s0["tiers"]["disk"]["puts"] == 3
    ns0, ns1 = s0["namespaces"]["tenant-b"], s1["namespaces"]["tenant-b"]
    assert ns1["memory"]["gets"] - ns0["memory"]["gets"] == 17
    assert (ns1["memory"]["hits"] + ns1["disk"]["hits"]
            - ns0["memory"]["hits"] - ns0["disk"]["hits"]) == 15
    assert s1["limits"] == {"max_body_bytes": MAX_BODY, "max_batch": MAX_BATCH,
                            "max_concurrency": 64, "namespaces": len(ALLOWED)}
    assert set(s1["tiers"]) == {"memory", "disk"}


# ============================================================ concurrency


def test_many_threads_mixed_operations_lose_nothing(tmp_path: Path) -> None:
    threads, per_thread, batch = 64, 48, 4
    run_s = 3.0
    chains = [make_blocks(per_thread, seed=t, tag="conc") for t in range(threads)]
    with DaemonProcess(["--host-bytes", str(64 * BLOCK_BYTES), "--disk", str(tmp_path),
                        "--disk-bytes", "256MiB", "--max-concurrency", "128"],
                       token=TOKEN) as daemon:
        tier = tier_for(daemon, max_idle_connections=threads)
        stored = [0] * threads
        wrong: list[str] = []
        stop_at = time.monotonic() + run_s
        start = threading.Barrier(threads)

        def work(t: int) -> None:
            own = chains[t]
            start.wait()
            rounds = 0
            while time.monotonic() < stop_at or rounds == 0:
                n = stored[t]
                if n < per_thread:
                    chunk = own[n:n + batch]
                    tier.put(chunk)
                    stored[t] = n + len(chunk)
                    if tier.get(keys_of(chunk)) != values_of(chunk):
                        wrong.append(f"thread {t}: get after put")
                done = stored[t]
                if tier.contains_prefix(keys_of(own)) != done:
                    wrong.append(f"thread {t}: exists")
                other = chains[(t + 1 + rounds) % threads]
                have = stored[(t + 1 + rounds) % threads]
                got = tier.get(keys_of(other[:have]))
                if got != values_of(other[:have]):
                    wrong.append(f"thread {t}: get of another thread's blocks")
                rounds += 1

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        assert wrong == []
        s = tier.stats()
        assert (s.errors, s.corrupt, s.extra["short_circuited"]) == (0, 0, 0)
        tier.close()
        check = tier_for(daemon)
        for t in range(threads):
            written = chains[t][:stored[t]]
            assert check.get(keys_of(written)) == values_of(written)
        assert sum(stored) >= threads * batch
        daemon_stats = stats(daemon.port)["tiers"]
        assert daemon_stats["disk"]["blocks"] == sum(stored)
        assert daemon_stats["memory"]["evictions"] > 0
        assert daemon_stats["disk"]["errors"] == daemon_stats["memory"]["errors"] == 0
        check.close()


def test_concurrency_limit_answers_503_with_retry_after(tmp_path: Path) -> None:
    with DaemonProcess(["--max-concurrency", "1", "--body-timeout", "10"], token=TOKEN) as d:
        item = make_blocks(1, seed=13)
        held = HeldRequest(d.port, pack({"items": [list(item[0])]}))
        try:
            probe = pack({"keys": keys_of(item)})
            wait_until(lambda: request(d.port, "POST", "/v1/kv/exists", probe).status == 503,
                       "a 503 while one request is in flight")
            busy = request(d.port, "POST", "/v1/kv/exists", probe)
            assert busy.status == 503 and busy.headers["Retry-After"] == "1"
            assert "--max-concurrency 1" in busy.json()["error"]
            doc = stats(d.port)  # monitoring is not limited
            assert doc["requests"]["inflight"] == 1
            done = held.finish()
            assert done.status == 200 and done.msgpack() == {"stored": 1}
        finally:
            held.close()
        assert request(d.port, "POST", "/v1/kv/exists", probe).msgpack() == {"count": 1}


def test_slow_body_gets_408(tmp_path: Path) -> None:
    with DaemonProcess(["--body-timeout", "0.5"], token=TOKEN) as d:
        item = make_blocks(1, seed=14)
        held = HeldRequest(d.port, pack({"items": [list(item[0])]}))
        try:
            reply = held.reply()  # never sends the second half
        finally:
            held.close()
        assert reply.status == 408 and "--body-timeout" in reply.json()["error"]
        assert request(d.port, "POST", "/v1/kv/exists",
                       pack({"keys": keys_of(item)})).msgpack() == {"count": 0}


# ============================================================ failures and restarts


def test_killed_daemon_misses_fast_and_recovers_with_the_same_client(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tiers.http")
    with DaemonProcess(["--host-bytes", "1MiB", "--disk", str(tmp_path),
                        "--disk-bytes", "64MiB"], token=TOKEN) as daemon:
        tier = HTTPTier(daemon.url, token=TOKEN, timeout_s=5.0, connect_timeout_s=1.0,
                        backoff_s=0.5, backoff_max_s=1.0)
        items = make_blocks(10, seed=15)
        tier.put(items)
        assert tier.get(keys_of(items)) == values_of(items)

        daemon.kill()
        assert tier.get(keys_of(items)) == [None] * 10  # refused: counted, breaker opens
        assert tier.stats().errors == 1 and tier.stats().extra["down"] == 1
        assert tier.contains_prefix(keys_of(items)) == 0  # short-circuited, no network
        tier.put(make_blocks(1, seed=16))  # dropped
        tier.delete(keys_of(items))  # dropped
        s = tier.stats()
        assert s.extra["short_circuited"] >= 1
        assert s.extra["outages"] == 1

        daemon.restart()
        wait_until(lambda: tier.get(keys_of(items)) == values_of(items),
                   "the same client to read the blocks back from the restarted daemon")
        assert tier.stats().extra["down"] == 0
        assert tier.contains_prefix(keys_of(items)) == 10  # LMDB kept them (SIGKILL)
        assert tier.contains_prefix(keys_of(make_blocks(1, seed=16))) == 0
        disk = stats(daemon.port)["tiers"]["disk"]
        assert disk["hits"] >= 10 and disk["blocks"] == 10
        tier.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "tiers.http"]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("is back after" in m for m in messages) == 1


def test_stalled_daemon_costs_one_timeout_then_misses_without_waiting(tmp_path: Path) -> None:
    with DaemonProcess(["--host-bytes", "1MiB"], token=TOKEN) as daemon:
        tier = HTTPTier(daemon.url, token=TOKEN, timeout_s=0.3, connect_timeout_s=0.3,
                        backoff_s=5.0, backoff_max_s=10.0)
        items = make_blocks(2, seed=17)
        tier.put(items)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            assert tier.get(keys_of(items)) == [None, None]  # one read timeout
            assert tier.stats().errors == 1
            for _ in range(20):
                assert tier.get(keys_of(items)) == [None, None]
            s = tier.stats()
            assert s.errors == 1 and s.extra["short_circuited"] == 20
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        tier.close()
        fresh = tier_for(daemon)
        assert fresh.get(keys_of(items)) == values_of(items)
        fresh.close()


def test_sigterm_lets_in_flight_requests_finish_and_flushes_lmdb(tmp_path: Path) -> None:
    args = ["--host-bytes", "1MiB", "--disk", str(tmp_path), "--disk-bytes", "64MiB"]
    first, held_item = make_blocks(1, seed=18), make_blocks(1, seed=23)
    with DaemonProcess(args, token=TOKEN) as daemon:
        tier = tier_for(daemon)
        tier.put(first)  # opens the namespace's LMDB environment
        # Hold LMDB's writer lock from this process: the daemon's next put blocks in its
        # disk write (the durable tier, written first) until the lock is released.
        env = lmdb.open(str(tmp_path / "kv"), map_size=2 * (64 << 20) + (64 << 20), max_dbs=4)
        txn = env.begin(write=True)
        result: list[int] = []
        body = ("kvstore_daemon_request_body_bytes_total", ())
        received = metrics(daemon.port)[body]
        writer = threading.Thread(target=lambda: result.append(tier.put(held_item).count))
        try:
            writer.start()
            # its body is in (so SIGTERM finds a request in flight, not an upload)
            wait_until(lambda: metrics(daemon.port)[body] > received,
                       "the put's body to be read")
            assert stats(daemon.port)["requests"]["inflight"] == 1
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "received SIGTERM" in daemon.log_text(), "the SIGTERM log line")
        finally:
            txn.abort()
            env.close()
            writer.join(30)
        assert result == [1]
        assert tier.stats().puts == 2 and tier.stats().errors == 0  # answered 200
        assert daemon.proc.wait(30) == 0
        log = daemon.log_text()
        assert "finishing 1 in-flight request(s)" in log and "tiers closed" in log
        assert "Traceback" not in log
        tier.close()

        daemon.restart()
        tier = tier_for(daemon)
        assert tier.get(keys_of(first + held_item)) == values_of(first + held_item)
        tier.close()
        assert daemon.stop() == 0


def test_sigterm_during_an_upload_answers_503_and_exits(tmp_path: Path) -> None:
    with DaemonProcess(["--host-bytes", "1MiB", "--body-timeout", "60"], token=TOKEN) as d:
        held = HeldRequest(d.port, pack({"items": [list(make_blocks(1, seed=24)[0])]}))
        try:
            wait_until(lambda: stats(d.port)["requests"]["inflight"] == 1,
                       "the upload to be in flight")
            assert d.proc is not None
            d.proc.send_signal(signal.SIGTERM)
            reply = held.reply()
        finally:
            held.close()
        assert reply.status == 503 and "shutting down" in reply.json()["error"]
        assert d.proc.wait(30) == 0


def test_startup_failures_are_clear_messages(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad_disk = DaemonProcess(["--disk", str(blocker / "sub"), "--disk-bytes", "1MiB"])
    try:
        with pytest.raises(RuntimeError, match="cannot start"):
            bad_disk.start()
        assert bad_disk.proc is not None and bad_disk.proc.returncode == 1
        assert "Traceback" not in bad_disk.log_text()
    finally:
        bad_disk.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = DaemonProcess([], port=port)
        try:
            with pytest.raises(RuntimeError, match="cannot start"):
                busy.start()
            assert busy.proc is not None and busy.proc.returncode == 1
            assert "Traceback" not in busy.log_text()
        finally:
            busy.close()


def test_namespace_whose_storage_cannot_open_is_a_503(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the LMDB directory would go")
    with DaemonProcess(["--disk", str(tmp_path), "--disk-bytes", "1MiB"], token=TOKEN) as d:
        reply = request(d.port, "POST", "/v1/blocked/get", pack({"keys": [K0]}))
        assert reply.status == 503 and reply.headers["Retry-After"] == "5"
        assert "cannot open the storage of namespace 'blocked'" in reply.json()["error"]
        assert "cannot open the storage of namespace 'blocked'" in d.log_text()
        tier = tier_for(d, "fine")
        tier.put(FRESH[:1])
        assert tier.get([K0]) == [V0]
        tier.close()


def test_a_broken_namespace_at_startup_is_that_namespaces_503_only(tmp_path: Path) -> None:
    """With --namespaces, one namespace whose LMDB environment cannot open no longer
    stops the daemon: it starts, serves the others, answers 503 for that one, and opens
    it once the cause is gone."""
    (tmp_path / "broken").write_text("a file where the LMDB directory would go")
    with DaemonProcess(["--disk", str(tmp_path), "--disk-bytes", "1MiB",
                        "--namespaces", "fine,broken"], token=TOKEN) as d:
        reply = request(d.port, "POST", "/v1/broken/put",
                        encode_put_body(make_blocks(1, seed=40)))
        assert reply.status == 503 and "namespace 'broken'" in reply.json()["error"]
        assert "Retry-After" in reply.headers
        tier = tier_for(d, "fine")
        items = make_blocks(3, seed=41)
        tier.put(items)
        assert tier.get(keys_of(items)) == values_of(items) and tier.stats().errors == 0
        tier.close()
        assert stats(d.port)["broken_namespaces"].keys() == {"broken"}
        assert metrics(d.port)[("kvstore_daemon_broken_namespaces", ())] == 1
        assert "Traceback" not in d.log_text()


def _put(port: int, items: Items, namespace: str = "kv") -> Reply:
    return request(port, "POST", f"/v1/{namespace}/put", encode_put_body(items))


def test_put_counts_only_what_a_durable_tier_holds(tmp_path: Path) -> None:
    """``stored`` counts the blocks the disk tier holds after the put: a disk too small
    for any block stores nothing (507, and the memory tier in front of it takes nothing
    either: a refused put changes nothing), one that holds two of five blocks answers 2
    (and the memory tier caches those two), and the client counts the shortfall."""
    items = make_blocks(5, seed=42)
    keys = pack({"keys": keys_of(items)})
    with DaemonProcess(["--host-bytes", "1MiB", "--disk", str(tmp_path / "tiny"),
                        "--disk-bytes", str(BLOCK_BYTES // 2)], token=TOKEN) as d:
        reply = _put(d.port, items)
        assert reply.status == 507, reply.body
        assert "nothing was stored" in reply.json()["error"]
        assert request(d.port, "POST", "/v1/kv/exists", keys).msgpack() == {"count": 0}
        assert stats(d.port)["tiers"]["memory"]["blocks"] == 0
        tier = tier_for(d)
        tier.put(items)
        s = tier.stats()
        assert (s.puts, s.errors, s.extra["down"]) == (0, 1, 0.0)  # not an outage
        tier.close()
    with DaemonProcess(["--host-bytes", "1MiB", "--disk", str(tmp_path / "two"),
                        "--disk-bytes", str(2 * BLOCK_BYTES + BLOCK_BYTES // 2)],
                       token=TOKEN) as d:
        reply = _put(d.port, items)
        assert reply.status == 200 and reply.msgpack() == {"stored": 2}
        assert stats(d.port)["tiers"]["memory"]["blocks"] == 2
        tier = tier_for(d)
        tier.put(items)
        assert (tier.stats().puts, tier.stats().errors) == (2, 1)
        tier.close()


def test_put_to_a_dead_redis_only_daemon_is_an_error(redis_server: Any) -> None:
    items = make_blocks(4, seed=43)
    with DaemonProcess(["--host-bytes", "0", "--redis", redis_server.url], token=TOKEN) as d:
        assert _put(d.port, items).msgpack() == {"stored": 4}
        redis_server.kill()
        reply = _put(d.port, make_blocks(4, seed=44))
        assert reply.status == 507 and "redis" in reply.json()["error"]
        assert d.running


def test_wire_encoders_match_msgpack() -> None:
    for n in (0, 1, 15, 16, 17, 65535, 65536):
        values = [None if i % 3 == 0 else os.urandom(i % 7) for i in range(n)]
        assert encode_get_reply(values, n) == pack({"values": values, "corrupt": n})
    for size in (0, 1, 255, 256, 65535, 65536, 70000):
        items = [(os.urandom(16), os.urandom(size)), (b"k" * 16, b"")]
        assert encode_put_body(items) == pack({"items": [list(p) for p in items]})


# ============================================================ redis behind the daemon


def test_redis_tier_behind_the_daemon(redis_server: Any) -> None:
    with DaemonProcess(["--host-bytes", "0", "--redis", redis_server.url,
                        "--redis-ttl", "600"], token=TOKEN) as daemon:
        assert "tier redis: redis://127.0.0.1" in daemon.log_text()
        a, b = tier_for(daemon, "tenant-a"), tier_for(daemon, "tenant-b")
        items = make_blocks(4, seed=19)
        a.put(items)
        raw = redis_server.client()
        assert raw.get(b"tenant-a:" + items[0][0]) == items[0][1]
        assert 0 < raw.ttl(b"tenant-a:" + items[0][0]) <= 600
        assert a.get(keys_of(items)) == values_of(items)
        assert b.get(keys_of(items)) == [None] * 4
        raw.set(b"tenant-a:" + items[1][0], b"damaged")
        before = a.stats().corrupt
        assert a.get(keys_of(items)) == [items[0][1], None, items[2][1], items[3][1]]
        assert a.stats().corrupt - before == 1
        assert a.contains_prefix(keys_of(items)) == 1
        a.close()
        b.close()
        raw.close()


# ============================================================ in process, units


@contextlib.contextmanager
def in_process(config: DaemonConfig) -> Iterator[int]:
    """``build_app(config)`` served from a background event loop; yields the port."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(build_app(config))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        holder["runner"] = runner
        holder["port"] = runner.addresses[0][1]

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(30)
    try:
        yield holder["port"]
    finally:
        asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_build_app_serves_in_process(tmp_path: Path) -> None:
    config = DaemonConfig(port=0, memory_bytes=1 << 20, disk_path=str(tmp_path),
                          disk_bytes=64 << 20, token=TOKEN)
    items = make_blocks(5, seed=20)
    with in_process(config) as port:
        tier = HTTPTier(f"http://127.0.0.1:{port}/", token=TOKEN)
        tier.put(items)
        assert tier.get(keys_of(items)) == values_of(items)
        tier.close()
    with in_process(config) as port:  # the first app closed (flushed) its LMDB
        tier = HTTPTier(f"http://127.0.0.1:{port}", token=TOKEN)
        assert tier.get(keys_of(items)) == values_of(items)
        tier.close()


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("0", 0), ("512MiB", 512 << 20), ("8GiB", 8 << 30), ("8gib", 8 << 30),
    ("1.5G", 3 << 29), ("10GB", 10 ** 10), ("64k", 65536), ("2 TiB", 2 << 40), ("7B", 7),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.2.3G", "5 parsecs", "GiB", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("changes,message", [
    ({"memory_bytes": 0}, "no tier to serve"),
    ({"disk_path": "/tmp/x"}, "needs --disk-bytes"),
    ({"disk_bytes": 5}, "needs --disk PATH"),
    ({"token": "short"}, "16 to 4096 visible ASCII"),
    ({"token": "has a space in it, long enough"}, "visible ASCII"),
    ({"host": "0.0.0.0"}, "refusing to listen on 0.0.0.0"),
    ({"host": "::"}, "refusing to listen"),
    ({"port": 70000}, "port must be"),
    ({"namespaces": ("ok", "no/slash")}, "namespace 'no/slash' is not valid"),
    ({"namespaces": ("a", "a")}, "must not repeat"),
    ({"max_batch": 0}, "max-batch must be a positive integer"),
    ({"max_body_bytes": 10}, "at least 1 KiB"),
    ({"redis_url": "http://x"}, "unsupported Redis URL"),
    ({"redis_ttl_s": 5.0}, "needs --redis"),
    ({"body_timeout_s": float("nan")}, "positive seconds"),
])
def test_config_validation(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        replace(DaemonConfig(), **changes)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.0.0.2") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    assert not is_loopback("192.0.2.1") and not is_loopback("no-such-host.invalid")


@pytest.mark.parametrize("argv,message", [
    (["--host-bytes", "lots"], "not a size"),
    (["--port", "99999"], "not a TCP port"),
    (["--disk", "/tmp/x"], "needs --disk-bytes"),
    (["--namespaces", "bad$"], "invalid namespace"),
    (["--max-batch", "0"], "must be >= 1"),
    (["--token", "short"], "16 to 4096"),
    (["--body-timeout", "inf"], "positive seconds"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_flags_are_argparse_errors(argv: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVSTORE_DAEMON_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: kvstore daemon" in err and message in err


def test_help_runs_as_a_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "kvstore", "daemon", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for flag in ("--host", "--port", "--token", "--host-bytes", "--disk", "--disk-bytes",
                 "--redis", "--max-body-bytes", "--max-batch", "--max-concurrency",
                 "--namespaces", "KVSTORE_DAEMON_TOKEN"):
        assert flag in out


def test_memory_partitions_share_capacity_and_stay_isolated() -> None:
    root = MemoryTier(4 * BLOCK_BYTES)
    a, b = root.partition("a"), root.partition("b")
    assert root.partition("a") is a
    items = make_blocks(4, seed=21)
    a.put(items)
    assert b.contains_prefix(keys_of(items)) == 0 and b.get(keys_of(items[:1])) == [None]
    b.put(make_blocks(2, seed=22))  # evicts a's two oldest
    assert [a.contains_prefix([k]) for k in keys_of(items)] == [0, 0, 1, 1]
    sa, sb = a.stats(), b.stats()
    assert (sa.blocks, sa.evictions, sb.blocks, sb.evictions) == (2, 2, 2, 0)
    assert sa.extra["pool_blocks"] == 4 and sa.extra["pool_bytes"] == 4 * BLOCK_BYTES
    b.close()
    assert a.get(keys_of(items[2:])) == values_of(items[2:])
    assert root.stats().extra["pool_blocks"] == 2
    with pytest.raises(ValueError):
        root.partition("")


def test_http_tier_validates_its_arguments() -> None:
    for url in ("ftp://x", "http://", "http://u:p@host", "http://h?x=1", "http://h:99999"):
        with pytest.raises(ValueError):
            HTTPTier(url)
    for kwargs in ({"namespace": "a/b"}, {"namespace": ""}, {"token": "two words"},
                   {"timeout_s": 0}, {"max_batch": 0}, {"backoff_s": 2, "backoff_max_s": 1}):
        with pytest.raises(ValueError):
            HTTPTier("http://127.0.0.1:1", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="16 bytes"):
        HTTPTier("http://127.0.0.1:1").get([b"short"])
    unused = free_port()
    tier = HTTPTier(f"http://127.0.0.1:{unused}", connect_timeout_s=0.5)
    assert tier.get([b"k" * 16]) == [None] and tier.stats().errors == 1
    assert "127.0.0.1" in repr(tier) and "token" not in repr(tier)
    tier.close()

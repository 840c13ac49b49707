"""Faults of the disk tier (``tiers.lmdb``, ``tiers.lmdb_check``) on real LMDB files: a
truncated or byte-damaged ``data.mdb`` reopened in a fresh process, damaged records, a
full LMDB map and a full filesystem (a real tmpfs), and the open-time checks themselves.

A damaged environment must never kill the process that opens it: each reopen runs in a
subprocess that must exit 0, with the file moved aside and the tier serving; and where
the fault is real, a control process that opens the same file with plain ``lmdb`` shows
that it would have crashed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
import xxhash

from tests.test_lmdb_tier import BIG, LAYOUT, audit, blocks, present
from tiers import lmdb_check
from tiers.base import PutResult
from tiers.lmdb import LMDBTier
from tiers.lmdb_check import Damaged, Healthy, New, check_environment, read_meta

ROOT = Path(__file__).resolve().parents[1]


def damaged_files(path: Path) -> list[Path]:
    return sorted(path.glob("data.mdb.damaged-*"))


def written_env(path: Path, n: int = 40) -> list[tuple[bytes, bytes]]:
    """A closed environment of ``n`` 128 KiB blocks (several commits) at ``path``."""
    items = blocks(n, BIG, seed=7)
    with LMDBTier(path, capacity_bytes=1 << 30) as tier:
        for i in range(0, n, 4):
            tier.put(items[i:i + 4])
    return items


# ---------------------------------------------------------------- reopen in a subprocess


SERVE = textwrap.dedent("""
    import json, logging, os, sys
    import xxhash
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    from tests.test_lmdb_tier import BIG, blocks
    from tiers.lmdb import LMDBTier

    path, digests = sys.argv[1], json.loads(sys.argv[2])
    keys = [bytes.fromhex(k) for k in digests]
    tier = LMDBTier(path, capacity_bytes=1 << 30)
    got = tier.get(keys)
    wrong = sum(v is not None and xxhash.xxh3_128_hexdigest(v) != digests[k.hex()]
                for k, v in zip(keys, got))
    fresh = blocks(6, BIG, seed=99)
    stored = tier.put(fresh)
    back = tier.get([k for k, _ in fresh])
    s = tier.stats()
    tier.close()
    print(json.dumps({"hits": sum(v is not None for v in got), "wrong": wrong,
                      "stored": stored.count, "fresh_ok": back == [v for _, v in fresh],
                      "corrupt": s.corrupt, "errors": s.errors}))
""")


def serve_in_subprocess(path: Path, items: list[tuple[bytes, bytes]]
                        ) -> tuple[dict[str, object], list[str]]:
    """Open the tier at ``path`` in a fresh process, read ``items`` back, put and read
    new blocks; returns its JSON report and its warning lines. Fails unless it exits 0."""
    digests = {k.hex(): xxhash.xxh3_128_hexdigest(v) for k, v in items}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SERVE, str(path), json.dumps(digests)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    return json.loads(done.stdout), warnings


RAW_OPEN = textwrap.dedent("""
    import sys, lmdb
    env = lmdb.open(sys.argv[1], max_dbs=4, map_size=1 << 30)
    for name in (b"blocks", b"index", b"lru", b"meta"):
        db = env.open_db(name)
        with env.begin(db=db, buffers=True) as txn:
            for key, value in txn.cursor():
                if len(value):
                    value[0], value[-1]
""")


def raw_lmdb_exit(path: Path) -> int:
    """Exit status of a process that opens a copy of the environment at ``path`` with
    plain ``lmdb`` and reads every record (negative: killed by that signal)."""
    copy = path.parent / f"{path.name}-raw-copy"
    shutil.copytree(path, copy)
    try:
        return subprocess.run([sys.executable, "-c", RAW_OPEN, str(copy)],
                              capture_output=True, timeout=120).returncode
    finally:
        shutil.rmtree(copy)


def test_truncated_data_file_is_quarantined_and_the_tier_serves(tmp_path: Path) -> None:
    env = tmp_path / "env"
    items = written_env(env)
    data = env / "data.mdb"
    full = data.stat().st_size
    os.truncate(data, full // 2)
    assert raw_lmdb_exit(env) in (-signal.SIGBUS, -signal.SIGSEGV)  # what it used to do

    report, warnings = serve_in_subprocess(env, items)
    assert report == {"hits": 0, "wrong": 0, "stored": 6, "fresh_ok": True, "corrupt": 0,
                      "errors": 0}
    moved, = damaged_files(env)
    assert moved.stat().st_size == full // 2
    assert len(warnings) == 1 and "truncated" in warnings[0] and moved.name in warnings[0]
    audit(env)


def test_a_data_file_cut_inside_the_meta_pages_is_quarantined(tmp_path: Path) -> None:
    env = tmp_path / "env"
    items = written_env(env, 4)
    os.truncate(env / "data.mdb", 5000)
    report, warnings = serve_in_subprocess(env, items)
    assert (report["hits"], report["fresh_ok"]) == (0, True)
    assert len(damaged_files(env)) == 1 and len(warnings) == 1


def smash_page_headers(data: Path) -> None:
    """Overwrite the first 48 bytes (page header and node offsets) of every page after
    the two metas with a fixed pattern: every tree page is damaged, the size is kept."""
    meta = read_meta(data)
    assert not isinstance(meta, New | Damaged)
    with open(data, "r+b") as f:
        for page in range(2, meta.last_page + 1):
            f.seek(page * meta.page_size)
            f.write(bytes([0xA5, 0x5A] * 24))


def test_damaged_tree_pages_are_found_by_the_walk_and_quarantined(tmp_path: Path) -> None:
    env = tmp_path / "env"
    items = written_env(env)
    size = (env / "data.mdb").stat().st_size
    smash_page_headers(env / "data.mdb")
    assert isinstance(read_meta(env / "data.mdb"), lmdb_check.Meta)  # metadata looks fine
    assert raw_lmdb_exit(env) != 0

    report, warnings = serve_in_subprocess(env, items)
    assert report == {"hits": 0, "wrong": 0, "stored": 6, "fresh_ok": True, "corrupt": 0,
                      "errors": 0}
    moved, = damaged_files(env)
    assert moved.stat().st_size == size
    assert len(warnings) == 1
    assert "offline verification" in warnings[0] or "LMDB reports" in warnings[0]


@pytest.mark.parametrize("seed", range(6))
def test_random_byte_damage_never_crashes_and_never_serves_wrong_bytes(tmp_path: Path,
                                                                       seed: int) -> None:
    """Heavy damage (2,000 random bytes anywhere past the metas): whatever it hits, the
    process exits 0, every block it serves is the one written, and new blocks work."""
    env = tmp_path / "env"
    items = written_env(env)
    data = env / "data.mdb"
    rng = __import__("random").Random(seed)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        for _ in range(2000):
            f.seek(rng.randrange(8192, size))
            f.write(bytes([rng.randrange(256)]))
    report, warnings = serve_in_subprocess(env, items)
    assert report["wrong"] == 0
    assert report["fresh_ok"] is True and report["stored"] == 6
    if damaged_files(env):
        assert report["hits"] == 0 and len(warnings) == 1
    else:  # only payload bytes were hit: those blocks are corrupt misses, counted
        assert report["hits"] + report["corrupt"] == len(items)


def test_damaged_meta_page_is_quarantined(tmp_path: Path) -> None:
    env = tmp_path / "env"
    items = written_env(env, 4)
    with open(env / "data.mdb", "r+b") as f:
        f.seek(16)
        f.write(b"\0\0\0\0")  # meta 0's magic
    verdict = check_environment(env)
    assert isinstance(verdict, Damaged) and "magic" in verdict.reason
    report, warnings = serve_in_subprocess(env, items)
    assert (report["hits"], report["fresh_ok"]) == (0, True)
    assert len(warnings) == 1 and "bad magic" in warnings[0]


def test_a_damaged_format_record_quarantines_the_environment(tmp_path: Path) -> None:
    env = tmp_path / "env"
    items = written_env(env, 4)
    raw = lmdb.open(str(env), max_dbs=4)
    with raw.begin(write=True) as txn:
        txn.put(b"format", b"\x01\x02", db=raw.open_db(b"meta", txn=txn))
    raw.close()
    report, warnings = serve_in_subprocess(env, items)
    assert (report["hits"], report["fresh_ok"]) == (0, True)
    assert len(damaged_files(env)) == 1
    assert len(warnings) == 1 and "format record of 2 bytes" in warnings[0]


# ---------------------------------------------------------------- the open-time checks


def test_the_walk_runs_only_after_an_unclean_close(tmp_path: Path) -> None:
    env = tmp_path / "env"
    assert isinstance(check_environment(env), New)
    written_env(env, 4)
    assert (env / lmdb_check.MARKER).exists()
    assert check_environment(env) == Healthy("metadata and clean-close marker")
    assert not (env / lmdb_check.MARKER).exists()  # consumed: a crash from here walks
    verdict = check_environment(env)
    assert isinstance(verdict, Healthy) and verdict.how.startswith("metadata and walk")

    LMDBTier(env, capacity_bytes=1 << 30).close()
    raw = lmdb.open(str(env), max_dbs=4)          # a write behind the marker's back
    with raw.begin(write=True) as txn:
        txn.put(b"x" * 16, b"y", db=raw.open_db(b"blocks", txn=txn))
    raw.close()
    verdict = check_environment(env)
    assert isinstance(verdict, Healthy) and verdict.how.startswith("metadata and walk")


def test_a_walk_past_its_time_bound_opens_on_metadata_alone(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    env = tmp_path / "env"
    written_env(env, 4)
    (env / lmdb_check.MARKER).unlink()
    with caplog.at_level(logging.WARNING, logger="tiers.lmdb_check"):
        verdict = check_environment(env, timeout_s=0.001)
    assert verdict == Healthy("metadata only (walk timed out)")
    assert len(caplog.records) == 1 and "was stopped" in caplog.records[0].getMessage()


@pytest.mark.parametrize("shared", [False, True], ids=["at-rest", "open-elsewhere"])
def test_the_walk_reports_damage_the_metadata_check_cannot_see(tmp_path: Path,
                                                                shared: bool) -> None:
    """At rest, py-lmdb's offline verifier (where installed) or LMDB's own walk finds it;
    while another process has the environment open, LMDB's walk alone must."""
    env = tmp_path / "env"
    written_env(env, 8)
    (env / lmdb_check.MARKER).unlink()
    assert isinstance(check_environment(env), Healthy)
    smash_page_headers(env / "data.mdb")
    holder = lmdb.open(str(env), max_dbs=4) if shared else None  # maps, reads no tree page
    try:
        verdict = check_environment(env)
    finally:
        if holder is not None:
            holder.close()
    assert isinstance(verdict, Damaged), verdict
    if shared:
        assert verdict.reason.startswith("LMDB reports")


# ---------------------------------------------------------------- damaged records


def damage_records(path: Path, records: dict[tuple[bytes, bytes], bytes]) -> None:
    """Write ``(database, key) -> value`` straight into the closed environment."""
    raw = lmdb.open(str(path), max_dbs=4)
    with raw.begin(write=True) as txn:
        for (db, key), value in records.items():
            txn.put(key, value, db=raw.open_db(db, txn=txn))
    raw.close()


def test_a_damaged_index_record_is_a_counted_miss_deleted_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = blocks(6)
    with LMDBTier(tmp_path, capacity_bytes=1 << 20) as tier:
        tier.put(b)
    damage_records(tmp_path, {(b"index", b[1][0]): b"\x07" * 5,
                              (b"index", b[3][0]): b"",
                              (b"index", b[4][0]): b"\x01" * 17})
    caplog.set_level(logging.WARNING, logger="tiers.lmdb")
    tier = LMDBTier(tmp_path, capacity_bytes=1 << 20)
    keys = [k for k, _ in b]
    assert tier.contains_prefix(keys) == 1            # ends at the damaged record
    assert tier.stats().corrupt == 1                  # ... which is now removed
    assert tier.get(keys) == [b[0][1], None, b[2][1], None, None, b[5][1]]
    stats = tier.stats()
    assert (stats.corrupt, stats.hits, stats.misses, stats.errors) == (3, 3, 3, 0)
    assert present(tier, b) == [True, False, True, False, False, True]
    assert (stats.blocks, stats.bytes_used) == (3, 3 * len(b[0][1]))
    assert tier.get(keys) == [b[0][1], None, b[2][1], None, None, b[5][1]]
    assert tier.stats().corrupt == 3
    tier.delete(keys[1:2])
    assert tier.put(b[1:2]).stored == {b[1][0]}
    assert tier.get(keys[1:2]) == [b[1][1]]
    tier.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "damaged record" in warnings[0].getMessage()
    audit(tmp_path)


def test_damaged_lru_keys_and_stale_entries_do_not_stop_eviction(tmp_path: Path) -> None:
    b = blocks(6)
    size = len(b[0][1])
    with LMDBTier(tmp_path, capacity_bytes=4 * size) as tier:
        tier.put(b[:4])
    damage_records(tmp_path, {(b"lru", b"\x00\x01"): b"",                  # too short
                              (b"lru", b"\x00" * 8 + b[3][0]): b""})       # stale stamp
    with LMDBTier(tmp_path, capacity_bytes=4 * size) as tier:
        assert tier.put(b[4:6]).stored == {b[4][0], b[5][0]}
        assert present(tier, b) == [False, False, True, True, True, True]  # 3 survived
        stats = tier.stats()
        assert (stats.evictions, stats.errors, stats.corrupt) == (2, 0, 1)
    audit(tmp_path)


def test_a_damaged_byte_count_is_recomputed(tmp_path: Path) -> None:
    b = blocks(3)
    with LMDBTier(tmp_path, capacity_bytes=1 << 20) as tier:
        tier.put(b)
    damage_records(tmp_path, {(b"meta", b"bytes_used"): b"\xff\xff"})
    with LMDBTier(tmp_path, capacity_bytes=1 << 20) as tier:
        stats = tier.stats()
        assert (stats.bytes_used, stats.corrupt) == (3 * len(b[0][1]), 1)
        assert tier.get([k for k, _ in b]) == [v for _, v in b]
    audit(tmp_path)


DAMAGE_WHILE_OPEN = textwrap.dedent("""
    import sys, lmdb
    env = lmdb.open(sys.argv[1], max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(bytes.fromhex(sys.argv[2]), b"bad", db=env.open_db(b"index", txn=txn))
    env.close()
""")


def test_an_index_record_damaged_while_open_is_removed_by_the_next_write(
        tmp_path: Path) -> None:
    """Another process damages the record of a block whose access stamp is pending:
    applying the stamp removes it instead of failing the write."""
    b = blocks(4)
    with LMDBTier(tmp_path, capacity_bytes=1 << 20) as tier:
        tier.put(b[:3])
        assert tier.get([b[0][0]]) == [b[0][1]]
        assert tier.stats().extra["pending_touches"] == 1
        subprocess.run([sys.executable, "-c", DAMAGE_WHILE_OPEN, str(tmp_path),
                        b[0][0].hex()], check=True, timeout=60)
        assert tier.put(b[3:]).stored == {b[3][0]}
        assert present(tier, b) == [False, True, True, True]
        stats = tier.stats()
        assert (stats.corrupt, stats.errors) == (1, 0)
    audit(tmp_path)


# ---------------------------------------------------------------- no room


def test_full_map_evicts_logs_once_and_reports_only_what_it_stored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tiers.lmdb")
    b = blocks(60, BIG)
    tier = LMDBTier(tmp_path, capacity_bytes=100 * len(b[0][1]), map_size=1 << 20)
    for i in range(0, 60, 3):
        result = tier.put(b[i:i + 3])
        assert result.count >= 1
        keys = sorted(result.stored)
        values = dict(b[i:i + 3])
        assert tier.get(keys) == [values[k] for k in keys]
    stats = tier.stats()
    assert stats.extra["map_full"] > 1 and stats.evictions > 0 and stats.errors == 0
    tier.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "map" in warnings[0]
    audit(tmp_path)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 8 MiB tmpfs mounted for the test (skips where mounting is not permitted)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_filesystem_evicts_keeps_serving_and_recovers(
        small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tiers.lmdb")
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (3 << 20))
    b = blocks(120, BIG)                  # 15 MiB of blocks into ~5 MiB of free space
    size = len(b[0][1])
    tier = LMDBTier(small_fs / "env", capacity_bytes=64 << 20)
    held: set[bytes] = set()
    for i in range(0, 60, 4):
        chunk = b[i:i + 4]
        result = tier.put(chunk)
        assert result.count >= 1          # keeps serving: room is made for new blocks
        keys = sorted(result.stored)
        values = dict(chunk)
        assert tier.get(keys) == [values[k] for k in keys]  # what it reports is there
        held |= result.stored
    full = tier.stats()
    assert full.extra["disk_full"] > 0 and full.evictions > 0 and full.errors == 0
    assert full.blocks < 40 and present(tier, b[56:60]) == [True] * 4
    full_warnings = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
    assert len(full_warnings) == 1        # once, not per put

    filler.unlink()                       # 3 MiB return: 2 MiB of blocks fit, no eviction
    for i in range(60, 76, 4):
        assert tier.put(b[i:i + 4]).count == 4
    grown = tier.stats()
    assert grown.blocks == full.blocks + 16 and grown.evictions == full.evictions
    assert grown.bytes_used == grown.blocks * size
    assert present(tier, b[56:76]) == [True] * 20
    messages = [r.getMessage() for r in caplog.records]
    assert sum("room again" in m for m in messages) == 1
    assert sum("is full" in m for m in messages) == 1
    for i in range(76, 120, 4):           # filling it up again: evicts, logged once more
        assert tier.put(b[i:i + 4]).count >= 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is full" in m for m in messages) == 2
    assert tier.stats().errors == 0
    tier.close()
    audit(small_fs / "env")


def test_put_on_a_full_filesystem_with_nothing_to_evict_is_dropped_not_reported(
        small_fs: Path) -> None:
    tier = LMDBTier(small_fs / "env", capacity_bytes=64 << 20)
    items = blocks(2, BIG)
    assert tier.put(items[:1]).count == 1
    tier.delete([items[0][0]])
    filler = small_fs / "filler"
    with open(filler, "wb") as f:         # fill every byte left
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    big = blocks(40, BIG, seed=3)
    result = tier.put(big)
    assert result.count < 40
    for key in result.stored:
        assert tier.contains_prefix([key]) == 1
    assert tier.get([k for k, _ in big if k not in result.stored]) == \
        [None] * (40 - result.count)
    filler.unlink()
    assert tier.put(big[:4]) == PutResult.of(big[:4], {k for k, _ in big[:4]})
    tier.close()
    audit(small_fs / "env")


def test_small_layout_still_works_with_the_checks(tmp_path: Path) -> None:
    """The common path stays exact: reopen after a clean close keeps everything."""
    b = blocks(10, LAYOUT)
    with LMDBTier(tmp_path, capacity_bytes=1 << 20) as tier:
        assert tier.put(b).count == 10
    with LMDBTier(tmp_path, capacity_bytes=1 << 20) as tier:
        assert tier.get([k for k, _ in b]) == [v for _, v in b]
    assert damaged_files(tmp_path) == []

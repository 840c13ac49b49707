"""Open-time verification of an LMDB environment, so that damage never crashes the
process that serves from it.

LMDB maps ``data.mdb`` into memory and follows page numbers it finds there. A file
shorter than the pages LMDB's metadata says it holds makes the first access past its end
raise SIGBUS; a damaged page pointer or node size can raise SIGSEGV or abort. Python
cannot catch either, so :class:`tiers.lmdb.LMDBTier` asks :func:`check_environment`
before it maps a file, and a damaged environment is moved aside (:func:`quarantine`)
instead of opened.

Two checks, the cheap one always:

1. **Metadata** (:func:`read_meta`, in process, microseconds): the two meta pages at the
   start of ``data.mdb`` are read with ``os.pread`` and parsed with ``struct`` (never
   mapped): page number and flags, magic, data version, page size, the last used page
   and every database root of both metas. The file must hold every page up to the
   largest ``last_pg`` of the two, and every root must lie within it. This catches
   truncation, the cause of the SIGBUS at open, and damaged metas.
2. **Walk** (:func:`walk`, in a child process ``python -m tiers.lmdb_check PATH``): when
   no process has the environment open and py-lmdb ships its offline verifier
   (``lmdb.verify``, py-lmdb >= 3.0: reads pages with ``read``, checks every page is
   reachable once and the free list and the trees are disjoint and cover the file, the
   damage that would make a later write overwrite a live page), that first; it needs the
   file at rest, so a shared, open environment skips it. Then it opens the environment
   read-only and lets LMDB itself walk every page: a compacting copy to
   ``/dev/null`` (``mdb_env_copyfd2(MDB_CP_COMPACT)``: follows every branch, leaf and
   overflow page of every database, and fails when the free list and the used pages do
   not add up to the file), then a cursor pass over every named database touching the
   first and last byte of each key and value and comparing the entries with the
   database's own count. A signal, an LMDB error or a mismatch there means "damaged";
   the serving process never ran the code that crashed.

When the walk runs. A healthy environment is closed by :meth:`LMDBTier.close`, which
writes a *clean-close marker* (:data:`MARKER`) recording ``data.mdb``'s inode, size,
modification time (ns) and both metas' transaction ids; opening consumes the marker. The
walk runs only when the marker is absent or does not match the file exactly, i.e. after
a crash or a kill, or after anything else wrote to the file since (a copy, a restore,
an editor, a disk fault that rewrote it). Why not always: the walk reads every tree page;
measured on a healthy 1 GB environment it costs 0.8 s against 0.4 ms for the metadata
check (``docs/disk.md``), paid at every start of every tenant, while LMDB's
commits are crash-safe and a clean close proves nothing changed since. Why not never:
byte damage that keeps the file size is invisible to the metadata check, and the walk
is what turns it into "damaged" instead of a SIGSEGV later. The walk is bounded
(``timeout_s``); past it the child is killed and the environment is opened on the
strength of the metadata check alone (logged), since a slow disk is not damage.

Several processes may share an environment: the checks read a committed snapshot (meta
fields are rewritten with their own values, and pages are written before the meta that
names them), and the walk registers as an LMDB reader. This module imports nothing but
the standard library and ``lmdb``, so the child starts in tens of milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"
MARKER = "clean-close.json"
"""File in the environment directory written by a clean close (see the module docstring)."""

CHECK_TIMEOUT_S = 60.0
"""Default bound on the walk (seconds of wall time for the child)."""

DAMAGED_EXIT = 3
"""The walk's exit status for "damaged" (0: healthy; anything else: could not check)."""

MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
"""LMDB 0.9's on-disk format (the LMDB that py-lmdb bundles)."""

P_META = 0x08
P_INVALID = (1 << 64) - 1
"""A root page number meaning "empty database"."""

MAX_TREE_DEPTH = 32
"""LMDB's cursor stack depth: no valid tree is deeper."""

_PAGE_HEAD = struct.Struct("=QHH")          # page number, pad, flags
_META_HEAD = struct.Struct("=IIQQ")         # magic, version, address, map size
_DB = struct.Struct("=IHHQQQQQ")            # pad (page size), flags, depth, branch,
#                                             leaf, overflow pages, entries, root
_META_TAIL = struct.Struct("=QQ")           # last used page, transaction id
_META_AT, _DBS_AT, _TAIL_AT = 16, 40, 136
_META_BYTES = _TAIL_AT + _META_TAIL.size


@dataclass(frozen=True)
class Meta:
    """What the two meta pages of a ``data.mdb`` say (pages of ``page_size`` bytes).

    ``last_page``: the highest page number either meta says is in use; ``txnids``: the
    transaction id of meta 0 and meta 1; ``file_bytes``: the file size when read.
    """

    page_size: int
    last_page: int
    txnids: tuple[int, int]
    file_bytes: int


@dataclass(frozen=True)
class New:
    """No ``data.mdb`` (or an empty one, left by a crash while creating it): LMDB makes one."""


@dataclass(frozen=True)
class Healthy:
    """The environment may be mapped. ``how``: which check vouched for it."""

    how: str


@dataclass(frozen=True)
class Damaged:
    """The environment must not be mapped. ``reason``: what is wrong, for the log."""

    reason: str


def read_meta(data_path: Path) -> Meta | New | Damaged:
    """Parse the meta pages of ``data_path`` with ``pread`` (no mapping); never raises
    for damage (an ``OSError`` other than a missing file is raised)."""
    try:
        fd = os.open(data_path, os.O_RDONLY)
    except FileNotFoundError:
        return New()
    try:
        head = os.pread(fd, _META_BYTES, 0)
        if not head:
            return New()
        if len(head) < _META_BYTES:
            return Damaged(f"truncated to {len(head)} bytes, shorter than a meta page")
        page_size = _DB.unpack_from(head, _DBS_AT)[0]
        if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
            return Damaged(f"meta page 0 gives page size {page_size}")
        second = os.pread(fd, _META_BYTES, page_size)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if len(second) < _META_BYTES:
        return Damaged(f"truncated to {size} bytes, shorter than the two meta pages")
    last_pages, txnids = [], []
    for number, page in enumerate((head, second)):
        fault = _meta_fault(number, page)
        if fault:
            return Damaged(f"meta page {number}: {fault}")
        last_page, txnid = _META_TAIL.unpack_from(page, _TAIL_AT)
        last_pages.append(last_page)
        txnids.append(txnid)
    last_page = max(last_pages)
    if size < (last_page + 1) * page_size:
        return Damaged(f"truncated: {size:,} bytes, but LMDB's metadata says pages up to "
                       f"{last_page} ({(last_page + 1) * page_size:,} bytes) are in use")
    return Meta(page_size=page_size, last_page=last_page, txnids=(txnids[0], txnids[1]),
                file_bytes=size)


def _meta_fault(number: int, page: bytes) -> str:
    """What is wrong with meta page ``number`` (empty string when nothing is)."""
    pgno, _, flags = _PAGE_HEAD.unpack_from(page, 0)
    magic, version, _, _ = _META_HEAD.unpack_from(page, _META_AT)
    if pgno != number or not flags & P_META:
        return f"page header says page {pgno}, flags {flags:#x}"
    if magic != MDB_MAGIC:
        return f"bad magic {magic:#x}"
    if version != MDB_DATA_VERSION:
        return f"data version {version}, expected {MDB_DATA_VERSION}"
    last_page, _ = _META_TAIL.unpack_from(page, _TAIL_AT)
    if last_page < 1:
        return f"last page {last_page}"
    for which in (0, 1):
        _, _, depth, _, _, _, _, root = _DB.unpack_from(page, _DBS_AT + which * _DB.size)
        if root != P_INVALID and not 1 < root <= last_page:
            return f"database {which} root page {root} outside pages 2..{last_page}"
        if depth > MAX_TREE_DEPTH:
            return f"database {which} depth {depth}"
    return ""


# ---------------------------------------------------------------- clean-close marker


def _fingerprint(path: Path) -> dict[str, int] | None:
    """Identity of ``path/data.mdb`` as it is now, or ``None`` when it cannot be read."""
    data = path / DATA_FILE
    try:
        st = os.stat(data)
        meta = read_meta(data)
    except OSError:
        return None
    if not isinstance(meta, Meta):
        return None
    return {"inode": st.st_ino, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "txnid0": meta.txnids[0], "txnid1": meta.txnids[1]}


def mark_clean(path: str | os.PathLike[str]) -> None:
    """Record that the environment at ``path`` was closed cleanly, as it is now (call
    after the environment is closed). Best effort: a failure only means the next open
    walks the file."""
    path = Path(path)
    mark = _fingerprint(path)
    if mark is None:
        return
    tmp = path / f".{MARKER}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(mark))
        os.replace(tmp, path / MARKER)
    except OSError:
        tmp.unlink(missing_ok=True)


def _take_marker(path: Path) -> bool:
    """Consume the clean-close marker; True when it matches ``data.mdb`` exactly."""
    marker = path / MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = None
    try:
        marker.unlink(missing_ok=True)
    except OSError:
        return False  # a marker we cannot remove would vouch for later, unchecked writes
    return recorded is not None and recorded == _fingerprint(path)


# ---------------------------------------------------------------- the checks


def check_environment(path: str | os.PathLike[str],
                      timeout_s: float = CHECK_TIMEOUT_S) -> New | Healthy | Damaged:
    """Decide whether the environment directory ``path`` may be mapped (see the module
    docstring). Never raises for damage; consumes the clean-close marker."""
    path = Path(path)
    clean = _take_marker(path)
    try:
        meta = read_meta(path / DATA_FILE)
    except OSError as exc:
        return Damaged(f"cannot read {DATA_FILE}: {exc}")
    if not isinstance(meta, Meta):
        return meta
    if clean:
        return Healthy("metadata and clean-close marker")
    return run_walk(path, timeout_s)


def run_walk(path: Path, timeout_s: float) -> Healthy | Damaged:
    """Walk the environment in a child process, bounded by ``timeout_s`` seconds."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "tiers.lmdb_check", str(path)],
                              env=env, cwd=root, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("LMDB environment %s: the verification walk took over %.0f s and was "
                       "stopped; opening it on its metadata check alone", path, timeout_s)
        return Healthy("metadata only (walk timed out)")
    except OSError as exc:
        logger.warning("LMDB environment %s: cannot start the verification walk (%s); "
                       "opening it on its metadata check alone", path, exc)
        return Healthy("metadata only (walk did not start)")
    seconds = time.monotonic() - started
    if done.returncode == 0:
        return Healthy(f"metadata and walk ({seconds:.2f} s)")
    if done.returncode < 0:
        return Damaged(f"the verification walk died of signal {-done.returncode} "
                       f"({_signal_name(-done.returncode)})")
    if done.returncode == DAMAGED_EXIT:
        return Damaged(done.stdout.strip() or "the verification walk found damage")
    logger.warning("LMDB environment %s: the verification walk failed to run (exit %d: %s); "
                   "opening it on its metadata check alone", path, done.returncode,
                   done.stderr.strip()[-300:])
    return Healthy("metadata only (walk failed to run)")


def _signal_name(number: int) -> str:
    import signal
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


def _offline_verifier() -> Callable[[str], list[str]] | None:
    """py-lmdb's pure-Python structural verifier (``lmdb.verify.verify``, py-lmdb 3.0 and
    later), or ``None`` where the installed py-lmdb has none."""
    try:
        from lmdb.verify import verify
    except ImportError:
        return None
    return verify


def _at_rest(path: Path) -> bool:
    """True when no process has the environment open: every LMDB process holds a shared
    ``fcntl`` lock on the first byte of ``lock.mdb`` while open, so an exclusive lock
    there can be taken only when none does (taken and released at once)."""
    import fcntl

    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError:
        return False
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
        return True
    finally:
        os.close(fd)


def walk(path: str | os.PathLike[str]) -> str:
    """Walk every page and record of the environment at ``path`` (read-only); returns
    what is wrong, or an empty string. May crash the calling process on damage: run it
    through :func:`run_walk`, never in a serving process."""
    import lmdb

    offline = _offline_verifier()
    if offline is not None and _at_rest(Path(path)):
        problems = offline(str(path))
        if problems:
            return "offline verification: " + "; ".join(problems[:3])
    env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=64, readahead=True,
                    subdir=True, create=False)
    try:
        with open(os.devnull, "wb") as sink:
            env.copyfd(sink.fileno(), compact=True)
        with env.begin(buffers=True) as txn:
            names = [bytes(key) for key, _ in txn.cursor()]
        for name in [None, *names]:
            db = env.open_db(name, create=False)  # None: the main database
            with env.begin(db=db, buffers=True) as txn:
                expected = txn.stat(db)["entries"]  # of this snapshot, as is the walk
                seen = 0
                for key, value in txn.cursor():
                    if len(key):
                        key[0], key[-1]  # noqa: B018 (touch the first and last byte)
                    if len(value):
                        value[0], value[-1]  # noqa: B018
                    seen += 1
                if seen != expected:
                    return (f"database {name!r} holds {seen} entries but its record says "
                            f"{expected}")
    finally:
        env.close()
    return ""


# ---------------------------------------------------------------- quarantine


def quarantine(path: str | os.PathLike[str]) -> Path | None:
    """Move ``data.mdb`` of the environment at ``path`` aside, renamed with a UTC
    timestamp suffix in the same directory (where an operator can inspect or delete it),
    and remove ``lock.mdb`` and the marker; returns the new data file path (``None`` if
    there was no data file). ``OSError`` if it cannot be moved."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = f"damaged-{stamp}"
    n = 1
    while (path / f"{DATA_FILE}.{suffix}").exists():
        n += 1
        suffix = f"damaged-{stamp}-{n}"
    moved = path / f"{DATA_FILE}.{suffix}"
    try:
        os.rename(path / DATA_FILE, moved)
    except FileNotFoundError:
        moved = None
    (path / LOCK_FILE).unlink(missing_ok=True)  # holds no data; LMDB makes a new one
    (path / MARKER).unlink(missing_ok=True)
    return moved


def _main(argv: list[str]) -> int:
    """``python -m tiers.lmdb_check PATH``: exit 0 healthy, :data:`DAMAGED_EXIT` damaged
    (the reason on stdout). A signal that kills it also means damaged."""
    if len(argv) != 1:
        print("usage: python -m tiers.lmdb_check ENV_DIR", file=sys.stderr)
        return 2
    import lmdb

    try:
        fault = walk(argv[0])
    except (lmdb.ReadersFullError, lmdb.LockError, lmdb.MemoryError, lmdb.ReadonlyError,
            lmdb.TlsFullError) as exc:  # the environment's situation, not its file
        print(f"cannot walk: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except lmdb.Error as exc:
        fault = f"LMDB reports {type(exc).__name__}: {exc}"
    except (OSError, ValueError, IndexError) as exc:
        fault = f"{type(exc).__name__}: {exc}"
    if fault:
        print(fault)
        return DAMAGED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

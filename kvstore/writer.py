"""The write queue's thread: background writes to the shared tiers, most urgent first.

One thread runs every job submitted to it. Jobs carry a priority: :data:`WRITE_BACK`
(a block demoted from the host: the write is its only copy's way down, it is lost if
the write never happens) before :data:`PUBLICATION` (a copy of a block that still lives
on the GPU or the host, written for other engines), first in, first out within a
priority. Under sustained write pressure (a disk slower than the engine commits blocks)
the queue then loses redundant copies, not the last copy of a block.

A barrier is a job that does nothing: ``submit(lambda: None, p).result()`` waits for
every job of priority ``p`` or more urgent queued before it (``barrier``).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future

WRITE_BACK = 0
"""Priority of a host victim's write-back (runs first)."""

PUBLICATION = 1
"""Priority of a publication (a copy of a block still cached above)."""


class Writer:
    """One background thread running submitted jobs by priority (module docstring).

    Thread-safe. ``shutdown`` runs the jobs already queued, then stops the thread; a job
    submitted after it raises ``RuntimeError``. A job's exception is set on its future
    (jobs report their own failures; the thread goes on). The thread is a daemon: a
    process that exits without ``shutdown`` (``KVStore.close``) loses the writes still
    queued, as a crash would; none of them was acknowledged.
    """

    def __init__(self, name: str = "kv-publish") -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Callable[[], object], Future[object]]] = []
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object], priority: int = PUBLICATION
               ) -> Future[object]:
        """Queue ``fn()``; returns its future."""
        fut: Future[object] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the writer is shut down")
            heapq.heappush(self._heap, (priority, next(self._seq), fn, fut))
            self._cond.notify()
        return fut

    def barrier(self, priority: int = PUBLICATION) -> None:
        """Wait until every job of ``priority`` or more urgent queued before this call
        has run (with the default, every job queued before it)."""
        self.submit(lambda: None, priority).result()

    @property
    def pending(self) -> int:
        """Jobs queued and not started."""
        with self._cond:
            return len(self._heap)

    def shutdown(self) -> None:
        """Run what is queued, then stop the thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if not self._heap:
                    return
                _, _, fn, fut = heapq.heappop(self._heap)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
                fut.set_exception(exc)

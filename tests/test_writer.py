"""kvstore.writer: the write queue's thread runs write-backs before publications."""

from __future__ import annotations

import threading

import pytest

from kvstore.writer import PUBLICATION, WRITE_BACK, Writer


def hold(writer: Writer, priority: int = PUBLICATION) -> threading.Event:
    """Occupy the writer's thread until the returned event is set."""
    started, gate = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        gate.wait()

    writer.submit(job, priority)
    assert started.wait(5)
    return gate


def test_write_backs_run_before_publications_fifo_within_each():
    writer = Writer("test-writer")
    gate = hold(writer)  # the rest queue up behind it
    ran: list[str] = []
    for name, prio in (("p1", PUBLICATION), ("w1", WRITE_BACK), ("p2", PUBLICATION),
                       ("w2", WRITE_BACK)):
        writer.submit(lambda name=name: ran.append(name), prio)
    assert writer.pending == 4
    gate.set()
    writer.barrier()
    assert ran == ["w1", "w2", "p1", "p2"]
    writer.shutdown()


def test_a_write_back_barrier_does_not_wait_for_queued_publications():
    writer = Writer("test-writer")
    gate = hold(writer, WRITE_BACK)
    pub_gate = threading.Event()
    ran: list[str] = []
    publication = writer.submit(pub_gate.wait, PUBLICATION)  # would wait for ever
    writer.submit(lambda: ran.append("w"), WRITE_BACK)
    gate.set()
    writer.barrier(WRITE_BACK)  # returns: the write-back ran before the publication
    assert ran == ["w"] and not publication.done()
    pub_gate.set()
    writer.shutdown()
    assert publication.done() and writer.pending == 0


def test_errors_reach_the_future_and_the_thread_goes_on():
    writer = Writer("test-writer")

    def boom() -> None:
        raise OSError("disk gone")

    failed = writer.submit(boom, WRITE_BACK)
    after = writer.submit(lambda: 7, PUBLICATION)
    with pytest.raises(OSError, match="disk gone"):
        failed.result(timeout=5)
    assert after.result(timeout=5) == 7
    writer.shutdown()


def test_shutdown_runs_what_is_queued_then_refuses_more():
    writer = Writer("test-writer")
    gate = hold(writer)
    ran: list[int] = []
    for i in range(3):
        writer.submit(lambda i=i: ran.append(i))
    gate.set()
    writer.shutdown()
    assert ran == [0, 1, 2]
    with pytest.raises(RuntimeError, match="shut down"):
        writer.submit(lambda: None)
    writer.shutdown()  # idempotent

"""The service layer every server runs on (``kvstore/service.py``), in process."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

import pytest
from aiohttp import web

from kvstore.service import run_until_signal


def test_a_listening_service_has_frozen_its_start_up_heap() -> None:
    """Once it listens, what start-up built is out of the cyclic collector's scans (full
    collections would otherwise pause the serving thread over the whole heap); the
    service then stops on SIGTERM."""
    frozen: list[int] = []
    stopped: list[str] = []

    def listening(urls: list[str]) -> None:
        frozen.append(gc.get_freeze_count())
        os.kill(os.getpid(), signal.SIGTERM)

    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        asyncio.run(run_until_signal(web.Application(), "127.0.0.1", 0,
                                     shutdown_timeout_s=1.0, on_listening=listening,
                                     on_stop=stopped.append))
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 0
    assert stopped == ["SIGTERM"]


def test_the_gc_bench_runs_and_leaves_the_heap_unfrozen(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench import gc_bench

    assert gc_bench.main(["--waves", "2", "--sequences", "2", "--blocks", "20",
                          "--pool-blocks", "100", "--heap-objects", "1000"]) == 0
    out = capsys.readouterr().out
    for label in ("prefix reuse off", "heap tracked", "heap frozen"):
        assert label in out
    assert gc.get_freeze_count() == 0

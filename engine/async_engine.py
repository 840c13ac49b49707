"""``AsyncEngine``: the embedded engine behind an asyncio server.

The engine and its store are single-threaded, so one background thread owns them: it
takes new requests and aborts from a thread-safe inbox, runs ``Engine.step()`` while
any request is unfinished, and sleeps on a condition variable when there is nothing to
do (no busy loop). Every request admitted between two steps joins the running batch
(continuous batching), so concurrent callers share the model.

Each caller iterates :meth:`AsyncEngine.generate` on its own event loop; snapshots
reach it through ``loop.call_soon_threadsafe`` into an ``asyncio.Queue``. Cancelling
the caller (a client that disconnects) or closing the iterator early aborts the
request on the engine thread, and its blocks stay cached.

    engine = AsyncEngine(LLM("smollm2"))
    async for out in engine.generate(ids, SamplingParams(max_tokens=32), "req-1"):
        print(out.outputs[0].text)
    engine.shutdown()
    engine.llm.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.sequence import RequestOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineStoppedError(RuntimeError):
    """The engine was shut down: no new requests, and running ones were cut off."""


class EngineFailedError(RuntimeError):
    """An engine step raised; every request in flight at that moment was failed."""


@dataclass
class _Stream:
    """Where the engine thread delivers one request's snapshots (the caller's loop)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    admitted: bool = False  # set on the engine thread once ``add_request`` succeeded


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLM], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


_Command = _Add | _Abort | _Call


@dataclass(frozen=True)
class EngineCounters:
    """Request counters since start: ``running`` are admitted or queued and unfinished;
    ``finished`` ran to a finish reason; ``aborted`` were cancelled by their caller;
    ``failed`` were rejected by the engine or cut off by an engine error or shutdown."""

    submitted: int
    running: int
    finished: int
    aborted: int
    failed: int
    steps: int


class AsyncEngine:
    """Drives ``llm.engine`` from one background thread for asyncio callers.

    The thread starts with the object; :meth:`shutdown` stops it (the caller then
    closes ``llm``). Every call into the engine and the store happens on that thread:
    :meth:`generate` and its aborts go through the inbox, and :meth:`run_on_engine`
    runs any other function there. Thread-safe: any thread or event loop may call it.
    """

    def __init__(self, llm: LLM, *, thread_name: str = "kvstore-engine") -> None:
        self.llm = llm
        self._engine = llm.engine
        vocab = llm.model.config.vocab_size
        self.vocab_size: int = vocab
        self._cond = threading.Condition()
        self._inbox: deque[_Command] = deque()
        self._streams: dict[str, _Stream] = {}  # guarded by _cond; the engine thread removes
        self._stopping = False
        self._submitted = self._finished = self._aborted = self._failed = 0
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- callers

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` for a request the engine would refuse: an empty prompt,
        ids outside the vocabulary, or ``params`` that is not a ``SamplingParams``."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"token ids out of the vocabulary (0..{self.vocab_size - 1}): "
                             f"{bad[:5]}")

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """Run one request; yield cumulative snapshots, the last one ``finished``.

        Snapshots are cumulative (whole text and token ids so far), so when the caller
        falls behind only the newest waiting snapshot is yielded. Raises ``ValueError``
        for an invalid request or a ``request_id`` already in flight,
        :class:`EngineStoppedError` after :meth:`shutdown`, :class:`EngineFailedError`
        when an engine step fails. Cancelling the caller, or closing the iterator before
        the final snapshot, aborts the request in the engine.
        """
        self.validate(prompt_ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the engine is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = _Stream(loop, queue)
            self._inbox.append(_Add(request_id, list(prompt_ids), params))
            self._submitted += 1
            self._cond.notify()
        done = False
        try:
            while True:
                item = await queue.get()
                while not _terminal(item) and not queue.empty():
                    item = queue.get_nowait()  # coalesce: each snapshot supersedes the last
                if isinstance(item, BaseException):
                    done = True  # the engine thread already dropped the request
                    raise item
                if item.finished:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                self._post(_Abort(request_id))

    async def run_on_engine(self, fn: Callable[[LLM], T]) -> T:
        """Run ``fn(llm)`` on the engine thread between steps and return its result
        (or raise its exception). For reading the store (``llm.store.stats()``) and
        other engine state safely. :class:`EngineStoppedError` after shutdown."""
        call = _Call(fn)
        self._post(call)
        return await asyncio.wrap_future(call.future)

    def counters(self) -> EngineCounters:
        """A snapshot of the request counters (cheap; any thread)."""
        with self._cond:
            return EngineCounters(self._submitted, len(self._streams), self._finished,
                                  self._aborted, self._failed, self._engine.steps)

    @property
    def running(self) -> bool:
        """True until :meth:`shutdown` is called and while the thread is alive."""
        return not self._stopping and self._thread.is_alive()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread: requests still in flight end with
        :class:`EngineStoppedError` (and are aborted in the engine), later calls are
        refused. Waits up to ``timeout`` seconds for the current step to finish.
        Idempotent. Does not close ``llm``: the caller does, after this returns."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine thread still busy after %.0f s", timeout or 0)

    # ---------------------------------------------------------------- engine thread

    def _post(self, command: _Command) -> None:
        with self._cond:
            if self._stopping:
                if isinstance(command, _Call):
                    command.future.set_exception(EngineStoppedError("the engine is shut down"))
                return  # an abort after shutdown: the request was already cut off
            self._inbox.append(command)
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while (not self._inbox and not self._stopping
                           and not self._engine.has_unfinished):
                        self._cond.wait()
                    if self._stopping:
                        break
                    commands = list(self._inbox)
                    self._inbox.clear()
                for command in commands:
                    self._apply(command)
                if self._engine.has_unfinished:
                    self._step()
        except BaseException:  # a bug in this loop: never leave callers hanging
            logger.exception("engine thread crashed")
            with self._cond:
                self._stopping = True
        finally:
            self._stop_all()

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Add):
            try:
                self._engine.add_request(command.request_id, command.prompt_ids, command.params)
            except Exception as exc:  # refused (ValueError) or a bug: this request only
                if not isinstance(exc, ValueError):
                    logger.exception("add_request(%s) failed", command.request_id)
                self._fail(command.request_id, exc)
                return
            with self._cond:
                stream = self._streams.get(command.request_id)
                if stream is not None:
                    stream.admitted = True
        elif isinstance(command, _Abort):
            with self._cond:
                stream = self._streams.pop(command.request_id, None)
                if stream is not None:
                    self._aborted += 1
            if stream is not None and stream.admitted:
                try:
                    self._engine.abort(command.request_id)
                except Exception:
                    logger.exception("abort of %s failed", command.request_id)
        else:
            if not command.future.set_running_or_notify_cancel():
                return
            try:
                command.future.set_result(command.fn(self.llm))
            except BaseException as exc:  # handed to the caller, who raises it
                command.future.set_exception(exc)

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing every request in flight")
            message = f"engine step failed: {type(exc).__name__}: {exc}"
            with self._cond:
                ids = [rid for rid, s in self._streams.items() if s.admitted]
            for rid in ids:
                try:
                    self._engine.abort(rid)
                except Exception:
                    logger.exception("abort of %s after a failed step", rid)
                self._fail(rid, EngineFailedError(message))
            return
        for out in outputs:
            with self._cond:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # aborted while this step ran; its abort is in the inbox
                if out.finished:
                    del self._streams[out.request_id]
                    self._finished += 1
            self._deliver(out.request_id, stream, out)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        with self._cond:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._failed += 1
        if stream is not None:
            self._deliver(request_id, stream, exc)

    def _deliver(self, request_id: str, stream: _Stream,
                 item: RequestOutput | BaseException) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            if isinstance(item, RequestOutput) and not item.finished:
                self._apply(_Abort(request_id))

    def _stop_all(self) -> None:
        """On the engine thread at exit: cut off every request, refuse pending calls."""
        with self._cond:
            self._stopping = True
            streams = list(self._streams.items())
            self._streams.clear()
            self._failed += len(streams)
            commands = list(self._inbox)
            self._inbox.clear()
        for rid, stream in streams:
            if stream.admitted:
                try:
                    self._engine.abort(rid)
                except Exception:
                    logger.exception("abort of %s at shutdown", rid)
            self._deliver_quietly(
                stream, EngineStoppedError("the engine shut down before the request finished"))
        for command in commands:
            if isinstance(command, _Call) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(EngineStoppedError("the engine is shut down"))

    @staticmethod
    def _deliver_quietly(stream: _Stream, item: BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def _terminal(item: RequestOutput | BaseException) -> bool:
    """True for the last thing a request's queue ever receives."""
    return isinstance(item, BaseException) or item.finished

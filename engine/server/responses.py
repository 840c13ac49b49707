"""Building responses: envelopes, ``usage``, and server-sent events for streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.async_engine import AsyncEngine
from engine.sampling import SamplingParams
from engine.sequence import RequestOutput


def sendable_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` a stream may send now: everything but a tail that could be
    the start of a stop string (the engine cuts a stop string, and all after it, out
    of the text once it is complete, so such a tail may still disappear)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return len(text) - hold


@dataclass(frozen=True)
class _Done:
    """One prompt's request finished (its last snapshot was queued before this)."""


async def merged(engine: AsyncEngine, prompts: Sequence[Sequence[int]],
                 params: SamplingParams, request_id: str
                 ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Run every prompt as its own engine request (``{request_id}-{i}``) and yield
    ``(prompt index, RequestOutput)`` as any of them progresses, until all finished.
    Snapshots waiting when the consumer comes back are coalesced to the newest per
    prompt. An engine error of any prompt is raised; closing the iterator (or
    cancelling its consumer) aborts every unfinished request."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | _Done]] = asyncio.Queue()

    async def pump(i: int, ids: Sequence[int]) -> None:
        try:
            async with contextlib.aclosing(engine.generate(ids, params, f"{request_id}-{i}")) as gen:
                async for out in gen:
                    queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, _Done()))

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            latest: dict[int, RequestOutput] = {}
            for i, item in batch:
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, _Done):
                    remaining -= 1
                else:
                    latest[i] = item
            for i, out in latest.items():
                yield i, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SSE:
    """Writes one streamed completion: ``data: {json}`` events and ``data: [DONE]``."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def send(self, obj: Mapping[str, Any]) -> None:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        await self.response.write(b"data: " + data.encode() + b"\n\n")

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")


# ---------------------------------------------------------------------------- responses


def usage(finals: Sequence[RequestOutput]) -> dict[str, Any]:
    """OpenAI ``usage`` of finished ``RequestOutput``s (summed over prompts and choices),
    with the cached prompt tokens in total and by tier."""
    by_tier: Counter[str] = Counter()
    for out in finals:
        by_tier.update(out.cached_tokens)
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(by_tier.values()),
                                      "cached_tokens_by_tier": dict(sorted(by_tier.items()))}}


@dataclass(frozen=True)
class Reply:
    """Envelope fields of one response (and every chunk of a stream)."""

    kind: str  # "chat" or "completion"
    id: str
    created: int
    model: str
    fingerprint: str

    def envelope(self, streaming: bool) -> dict[str, Any]:
        obj = {"chat": ("chat.completion.chunk" if streaming else "chat.completion"),
               "completion": "text_completion"}[self.kind]
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def choice(self, index: int, text: str, finish_reason: str | None,
               streaming: bool, role: bool = False) -> dict[str, Any]:
        if self.kind == "completion":
            return {"index": index, "text": text, "logprobs": None,
                    "finish_reason": finish_reason}
        if streaming:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text or role:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish_reason}


"""What a router needs from a replica to compute the block keys of a request.

- ``GET /v1/kv/namespace``: this replica's id (the ``r`` of its KV events), the chain
  root of its namespace (hex; it names the events stream), the block size (tokens),
  whether it publishes KV events, and a digest of its tokenizer and chat template.
- ``GET /v1/kv/tokenizer``: the tokenizer itself (``tokenizer.json`` text, the chat
  template, the special tokens), fetched once by a router; replicas whose digests
  agree tokenize alike, so the router computes the same keys as every replica.
"""

from __future__ import annotations

import json

import xxhash
from aiohttp import web

from engine.llm import LLM
from engine.tokenizer import Tokenizer

LLM_KEY = web.AppKey("kvstore_serve_llm", LLM)
_DIGEST = web.AppKey("kvstore_serve_tokenizer", dict)


def tokenizer_payload(tokenizer: Tokenizer | None) -> dict[str, object]:
    """The tokenizer as JSON (``{}`` for a model without one)."""
    if tokenizer is None:
        return {}
    return {"tokenizer": tokenizer.backend.to_str(), "chat_template": tokenizer.chat_template,
            "special_tokens": dict(tokenizer.special_tokens)}


def tokenizer_digest(payload: dict[str, object]) -> str:
    """xxh3-128 hex of the canonical JSON of :func:`tokenizer_payload`."""
    return xxhash.xxh3_128_hexdigest(json.dumps(payload, sort_keys=True).encode())


def _cached(app: web.Application) -> dict[str, object]:
    cache = app[_DIGEST]
    if not cache:
        payload = tokenizer_payload(app[LLM_KEY].tokenizer)
        cache["payload"] = payload
        cache["digest"] = tokenizer_digest(payload)
    return cache


async def kv_namespace(request: web.Request) -> web.Response:
    """``GET /v1/kv/namespace``."""
    llm = request.app[LLM_KEY]
    cache = _cached(request.app)
    return web.json_response({
        "replica_id": llm.replica_id, "root": llm.namespace.root().hex(),
        "block_size": llm.namespace.block_size, "model": llm.config.model,
        "kv_events": llm.config.kv_events_url is not None,
        "tokenizer_digest": cache["digest"]})


async def kv_tokenizer(request: web.Request) -> web.Response:
    """``GET /v1/kv/tokenizer``."""
    cache = _cached(request.app)
    return web.json_response({**cache["payload"], "digest": cache["digest"]})  # type: ignore[dict-item]


def add_routes(app: web.Application, llm: LLM) -> None:
    """Register both routes on the server's application."""
    app[LLM_KEY] = llm
    app[_DIGEST] = {}
    app.router.add_get("/v1/kv/namespace", kv_namespace, name="kv_namespace", allow_head=False)
    app.router.add_get("/v1/kv/tokenizer", kv_tokenizer, name="kv_tokenizer", allow_head=False)

"""``kvstore serve``: an OpenAI-compatible HTTP server on the embedded engine.

- :mod:`engine.server.schema`: OpenAI's request bodies validated, its error object.
- :mod:`engine.server.responses`: envelopes, ``usage``, server-sent events.
- :mod:`engine.server.app`: the aiohttp application, its state and handlers.
- :mod:`engine.server.metrics`: Prometheus ``/metrics``.
- :mod:`engine.server.cli`: the command line and ``serve()``.

Every prompt goes through the tiered store: ``usage.prompt_tokens_details.cached_tokens``
counts the prompt tokens whose KV was reused, and the non-standard
``usage.prompt_tokens_details.cached_tokens_by_tier`` says from which tier. The
non-standard request field ``"return_token_ids": true`` adds each choice's generated
``token_ids`` (streamed: the new ids of each chunk), for clients that send token ids
(``--load-format dummy`` without a tokenizer has no text). One
:class:`~engine.async_engine.AsyncEngine` thread runs the model; requests join its
running batch as they arrive (continuous batching). A client that disconnects aborts
its request. ``docs/server.md`` is the user's guide.
"""

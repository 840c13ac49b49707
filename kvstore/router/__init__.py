"""``kvstore router``: one OpenAI-compatible front over several ``kvstore serve`` replicas,
routing each request to the replica that holds most of its prefix.

- :mod:`kvstore.router.index`: the approximate global index fed by KV events.
- :mod:`kvstore.router.keys`: a request's block keys (the replicas' tokenizer and namespace).
- :mod:`kvstore.router.policy`: scoring replicas (prefix, round-robin, least-load).
- :mod:`kvstore.router.replicas`: replica state and health checks.
- :mod:`kvstore.router.feed`: reading KV events from the Redis stream.
- :mod:`kvstore.router.metrics`: Prometheus ``/metrics``.
- :mod:`kvstore.router.app`: the aiohttp application (proxying, retries).
- :mod:`kvstore.router.cli`: the command line.

``docs/router.md`` is the user's guide.
"""

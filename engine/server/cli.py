"""``kvstore serve``: the command line, its configuration, and running the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore import __version__, env
from kvstore.args import (
    SIZE_HELP,
    add_listen_arguments,
    add_log_level,
    configure_logging,
    count_arg,
)

if TYPE_CHECKING:  # the engine (torch) loads only when serving, so --help stays fast
    from engine.llm import LLM

logger = logging.getLogger("kvstore.serve")

API_KEY_ENV = "KVSTORE_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen and how to present the engine (the engine's own settings are an
    ``EngineConfig``). Validated once: ``ValueError`` naming what to change."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    api_key: str | None = None
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        from kvstore.service import check_api_key, check_exposure

        check_api_key(self.api_key, f"the API key (${API_KEY_ENV} or --api-key)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError("shutdown timeout must be >= 0 seconds")
        check_exposure(self.host, self.api_key, "generate with this server",
                       f"${API_KEY_ENV} (or --api-key)")


def max_token_bytes(llm: LLM) -> int:
    """The most bytes of prompt text one token of ``llm``'s tokenizer can cover: the
    longest vocabulary entry in UTF-8, times 4 (a normalizer may shrink a character to a
    quarter of its bytes). 1 when the model has no tokenizer (prompts are token ids)."""
    tokenizer = llm.tokenizer
    if tokenizer is None:
        return 1
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return 4 * max(len(token.encode("utf-8")) for token in vocab)


async def serve(llm: LLM, config: ServeConfig,
                ready: Callable[[list[str]], None] | None = None) -> None:
    """Serve ``llm`` until SIGINT or SIGTERM, then shut down gracefully: stop accepting,
    let requests in flight finish (up to ``shutdown_timeout_s``; streams still open
    after that are cut), stop the engine, close ``llm``. A second signal stops the
    engine at once: requests still in flight end with a 503 (or an error event).
    ``ready(urls)`` is called once listening. Raises ``OSError`` when the address cannot
    be bound (``llm`` is closed)."""
    from engine.async_engine import AsyncEngine
    from engine.server.app import STATE, ServerState, build_app
    from kvstore.service import run_until_signal

    names = config.served_model_names or tuple(dict.fromkeys(
        [llm.config.model, llm.loaded.name]))
    state = ServerState(engine=AsyncEngine(llm), model_names=names, api_key=config.api_key,
                        max_context=llm.max_sequence_tokens,
                        max_token_bytes=max_token_bytes(llm),
                        fingerprint=f"fp_{llm.loaded.fingerprint[:12]}")
    app = build_app(state)
    loop = asyncio.get_running_loop()

    def listening(urls: list[str]) -> None:
        logger.info("kvstore serve %s listening on %s (pid %d)", __version__, ", ".join(urls),
                    os.getpid())
        for line in llm.describe():
            logger.info("%s", line)
        logger.info("model names: %s", ", ".join(names))
        logger.info("auth: %s", "bearer API key required (all routes but /healthz)"
                    if config.api_key else "none (loopback only: any local process may "
                                           "generate)")
        logger.info("metrics: GET /metrics (Prometheus)")
        if ready is not None:
            ready(urls)

    def stopping(signal_name: str) -> None:
        logger.info("received %s: finishing %d request(s) in flight (up to %.0f s), then "
                    "closing", signal_name, app[STATE].engine.counters().running,
                    config.shutdown_timeout_s)

    def cut_off(signal_name: str) -> None:
        logger.warning("received %s again: stopping the engine now; requests in flight "
                       "end with an error", signal_name)
        loop.run_in_executor(None, state.engine.shutdown)

    await run_until_signal(app, config.host, config.port,
                           shutdown_timeout_s=config.shutdown_timeout_s,
                           on_listening=listening, on_stop=stopping,
                           on_second_signal=cut_off, cancel_on_disconnect=True)
    logger.info("stopped")


_EPILOG = f"""\
endpoints (OpenAI-compatible; JSON in, JSON or server-sent events out):
  POST /v1/chat/completions   POST /v1/completions   GET /v1/models
  GET /v1/stats (request and cache counters)          GET /healthz (no auth)
  GET /metrics (Prometheus: TTFT, inter-token latency, tokens, prefix-cache hits by tier)

cache: every prompt is matched against the tiered KV store; usage reports
prompt_tokens_details.cached_tokens and, per tier, cached_tokens_by_tier.
Tiers: the device pool (--gpu-kv-bytes), host DRAM (--host-bytes), LMDB on disk
(--disk, survives restarts), Redis (--redis) and a kvstore daemon (--remote).
`kvstore chat` takes the same model and tier flags, with the same defaults.

{SIZE_HELP}.

security: with an API key (prefer ${API_KEY_ENV} to --api-key: command lines
are visible to other local users) clients must send 'Authorization: Bearer KEY'.
Listening beyond loopback needs one. The remote daemon's token is read from
$KVSTORE_DAEMON_TOKEN.

examples:
  kvstore serve --port 8000
  kvstore serve --host-bytes 8GiB --disk ~/.cache/kvstore/disk --disk-bytes 20GiB
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "smollm2", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore serve`` argument parser."""
    from engine.options import add_engine_arguments

    p = argparse.ArgumentParser(
        prog="kvstore serve",
        description="OpenAI-compatible HTTP server on the embedded engine: chat and text\n"
                    "completions (streaming too), continuous batching, prefix reuse from\n"
                    "the tiered KV-cache store, and Prometheus metrics.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p).add_argument(
        "--served-model-name", action="append", default=None, metavar="NAME",
        help="name clients pass as 'model' (repeatable; default: the --model value and the "
             "model's own name)")
    d = ServeConfig()
    add_listen_arguments(p, host=d.host, port=d.port, shutdown_timeout_s=d.shutdown_timeout_s,
                         credential="--api-key", env=API_KEY_ENV,
                         credential_help="bearer key clients must send")
    route = p.add_argument_group("routing (kvstore router)")
    route.add_argument("--kv-events", default=None, metavar="URL",
                       help="publish KV events (blocks stored and removed, per tier) to this "
                            "Redis, redis://host:port, for `kvstore router` (default: none; "
                            "nothing is recorded)")
    route.add_argument("--replica-id", default=None, metavar="ID",
                       help="this server's name in its KV events (default: hostname:port, "
                            "or hostname:pid with --port 0)")
    batch = p.add_argument_group("batching")
    batch.add_argument("--max-num-seqs", type=count_arg(1), default=64, metavar="N",
                       help="most sequences in one batch (default: %(default)s)")
    batch.add_argument("--max-num-batched-tokens", type=count_arg(1), default=2048,
                       metavar="N", help="most tokens in one forward step; longer prefills "
                                         "are chunked (default: %(default)s)")
    add_log_level(p)
    return p


def _replica_id(args: argparse.Namespace) -> str:
    """``--replica-id``, else ``hostname:port`` (``""``: the engine's hostname:pid)."""
    import socket

    if args.replica_id is not None:
        return str(args.replica_id)
    return f"{socket.gethostname()}:{args.port}" if args.port else ""


def main(argv: Sequence[str] | None = None) -> int:
    """``kvstore serve``: 0 after a clean shutdown, 1 when it cannot start, 2 for bad
    arguments, 130 when interrupted while starting."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from engine.options import check_engine_arguments

    check_engine_arguments(parser, args)
    configure_logging(args.log_level)
    try:
        config = ServeConfig(host=args.host, port=args.port,
                             served_model_names=tuple(dict.fromkeys(args.served_model_name
                                                                    or ())),
                             api_key=args.api_key if args.api_key is not None
                             else env.api_key(),
                             shutdown_timeout_s=args.shutdown_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    import torch

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    logger.info("loading %s and opening the cache tiers%s...", args.model,
                " (then the warm-up)" if cuda and not args.no_warmup else "")
    try:
        from engine.llm import LLM
        from engine.options import engine_kwargs

        llm = LLM(args.model, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_events_url=args.kv_events, replica_id=_replica_id(args),
                  **engine_kwargs(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    try:
        asyncio.run(serve(llm, config))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kvstore daemon``: the command line (``docs/daemon.md`` has the operator's guide)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from kvstore.args import (
    SIZE_HELP,
    add_hidden_alias,
    add_listen_arguments,
    add_log_level,
    configure_logging,
    count_arg,
    seconds_arg,
    size_arg,
)
from kvstore.daemon.config import MIN_TOKEN_CHARS, TOKEN_ENV, DaemonConfig
from tiers.wire import valid_namespace

logger = logging.getLogger("kvstore.daemon")

_EPILOG = f"""\
tiers: lookups try host memory, then disk, then redis; a block found below the memory
tier is copied into it. Puts write to every configured tier and count as stored once
disk or redis (when configured; else memory) holds them. Each namespace (tenant) sees
only its own blocks: it has its own LMDB environment (PATH/<namespace>) and Redis key
prefix, and a share of the one memory budget.

{SIZE_HELP}.

security: requests need 'Authorization: Bearer <token>' when a token is set (all
endpoints but /healthz). A token is required to listen on a non-loopback address.
Prefer the {TOKEN_ENV} environment variable to --token (command lines are
visible to other local users).

examples:
  kvstore daemon --host-bytes 8GiB --disk /var/cache/kv --disk-bytes 200GiB
  {TOKEN_ENV}=$(cat /etc/kvstore/token) kvstore daemon --host 0.0.0.0 \\
      --host-bytes 16GiB --redis redis+cluster://10.0.0.1:6379,10.0.0.2:6379
"""


def _namespaces_arg(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one namespace name")
    for n in names:
        if not valid_namespace(n):
            raise argparse.ArgumentTypeError(f"invalid namespace {n!r}: names are 1-64 of "
                                             "A-Z a-z 0-9 _ . - starting with a letter or digit")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore daemon`` argument parser."""
    p = argparse.ArgumentParser(
        prog="kvstore daemon",
        description="Serve KV-cache blocks over HTTP from host memory, LMDB on disk and/or\n"
                    "Redis, so serving engines on many machines share one prefix cache.\n"
                    "Endpoints: POST /v1/NAMESPACE/{exists,get,put,delete} (msgpack bodies),\n"
                    "GET /v1/stats (JSON), GET /metrics (Prometheus), GET /healthz.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DaemonConfig()
    add_listen_arguments(p, host=d.host, port=d.port, shutdown_timeout_s=d.shutdown_timeout_s,
                         credential="--token", env=TOKEN_ENV,
                         credential_help=f"bearer token clients must send, at least "
                                         f"{MIN_TOKEN_CHARS} characters")
    tiers = p.add_argument_group("tiers (at least one)")
    tiers.add_argument("--host-bytes", dest="host_bytes", type=size_arg,
                       default=d.memory_bytes, metavar="SIZE",
                       help="host DRAM for the memory tier, shared by all namespaces "
                            "(default: 1GiB; 0 = no memory tier)")
    add_hidden_alias(tiers, "--memory-bytes", "host_bytes", type=size_arg, metavar="SIZE")
    tiers.add_argument("--disk", metavar="PATH", default=None,
                       help="directory of the LMDB disk tier, one environment per "
                            "namespace (default: none)")
    tiers.add_argument("--disk-bytes", type=size_arg, default=0, metavar="SIZE",
                       help="capacity of each namespace's LMDB environment (needed with "
                            "--disk; default: none)")
    tiers.add_argument("--redis", metavar="URL", default=None,
                       help="Redis tier: redis://host:port/db, rediss://..., or "
                            "redis+cluster://host:port,host:port (default: none)")
    tiers.add_argument("--redis-ttl", type=seconds_arg(allow_zero=False), default=None,
                       metavar="SECONDS", help="expiry of blocks written to Redis "
                                               "(default: none)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--namespaces", type=_namespaces_arg, default=None, metavar="A,B,...",
                     help="serve only these namespaces (default: any valid name)")
    lim.add_argument("--max-namespaces", type=count_arg(1), default=d.max_namespaces,
                     metavar="N", help="most namespaces opened without --namespaces "
                                       "(default: %(default)s)")
    lim.add_argument("--max-body-bytes", type=size_arg, default=d.max_body_bytes,
                     metavar="SIZE", help="largest request body (default: 64MiB; larger: 413)")
    lim.add_argument("--max-batch", type=count_arg(1), default=d.max_batch, metavar="N",
                     help="most keys or items in one request (default: %(default)s; more: 413)")
    lim.add_argument("--max-concurrency", type=count_arg(1), default=d.max_concurrency,
                     metavar="N", help="most data requests in flight (default: %(default)s; "
                                       "more: 503 with Retry-After)")
    lim.add_argument("--body-timeout", type=seconds_arg(allow_zero=False),
                     default=d.body_timeout_s, metavar="SECONDS",
                     help="time to receive a request body (default: %(default)s; slower: 408)")
    add_log_level(p)
    return p


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> DaemonConfig:
    """A validated config from parsed arguments (``ValueError`` when inconsistent)."""
    token = args.token if args.token is not None else (environ.get(TOKEN_ENV) or None)
    return DaemonConfig(
        host=args.host, port=args.port, memory_bytes=args.host_bytes,
        disk_path=args.disk, disk_bytes=args.disk_bytes, redis_url=args.redis,
        redis_ttl_s=args.redis_ttl, token=token, namespaces=args.namespaces,
        max_namespaces=args.max_namespaces, max_body_bytes=args.max_body_bytes,
        max_batch=args.max_batch, max_concurrency=args.max_concurrency,
        body_timeout_s=args.body_timeout, shutdown_timeout_s=args.shutdown_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """``kvstore daemon``: 0 after a clean shutdown, 1 when it cannot start, 2 for bad
    arguments (argparse's message, never a traceback)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = config_from_args(args, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(args.log_level)
    from kvstore.daemon.app import serve

    try:
        asyncio.run(serve(config))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

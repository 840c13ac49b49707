"""``kvstore router``: the command line, its configuration, and running the router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore import __version__, env
from kvstore.args import (
    add_listen_arguments,
    add_log_level,
    configure_logging,
    count_arg,
    seconds_arg,
)
from kvstore.router.policy import DEFAULT_WEIGHTS, POLICIES, PolicyConfig

logger = logging.getLogger("kvstore.router")

API_KEY_ENV = "KVSTORE_API_KEY"


@dataclass(frozen=True)
class RouterConfig:
    """Where to listen, which replicas, how to route. Validated once: ``ValueError``
    naming what to change."""

    replicas: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    kv_events: str | None = None
    health_interval_s: float = 0.25
    health_timeout_s: float = 0.5
    replica_timeout_s: float = 30.0
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        from kvstore.service import check_api_key, check_exposure

        if not self.replicas:
            raise ValueError("give at least one --replica URL (a `kvstore serve`)")
        for url in self.replicas:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--replica must be an http:// or https:// URL, got {url!r}")
        if len(set(self.replicas)) != len(self.replicas):
            raise ValueError("a --replica URL is given twice")
        check_api_key(self.api_key, f"the API key (${API_KEY_ENV} or --api-key)")
        if self.kv_events is not None and not self.kv_events.startswith(
                ("redis://", "rediss://", "unix://")):
            raise ValueError("--kv-events must be a redis://, rediss:// or unix:// URL")
        if self.health_interval_s + self.health_timeout_s > 1.0:
            logger.warning("--health-interval + --health-timeout exceed 1 s: a dead replica "
                           "stays in rotation that long")
        check_exposure(self.host, self.api_key, "generate with every replica behind it",
                       f"${API_KEY_ENV} (or --api-key)")


def parse_weights(text: str) -> dict[str, float]:
    """``gpu=1,host=0.8,disk=0.5`` -> weights (tiers not named keep their default)."""
    weights = dict(DEFAULT_WEIGHTS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        tier, eq, value = part.partition("=")
        try:
            if not eq:
                raise ValueError
            weights[tier.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not TIER=WEIGHT: {part!r} (e.g. gpu=1,host=0.8,disk=0.5)") from None
    return weights


_EPILOG = f"""\
endpoints (the same as `kvstore serve`, proxied with streaming):
  POST /v1/chat/completions   POST /v1/completions   GET /v1/models
  GET /v1/router (replicas, health, load, index)     GET /healthz (no auth)
  GET /metrics (Prometheus: requests by replica, decisions by policy, matched prefix
  tokens by tier, replica health and load, KV events)

routing: the router computes each prompt's block keys with the replicas' own tokenizer
and namespace (read from them at start) and scores every replica in rotation by the
prefix it holds (from the KV events the replicas publish to --kv-events) weighted by
tier, minus --load-weight blocks per request in flight. Start each replica with
`kvstore serve --kv-events redis://... --replica-id NAME`.

health: each replica's /healthz is polled every --health-interval seconds; one that
does not answer within --health-timeout leaves the rotation until it answers again.
A request whose replica fails before the client got a byte goes to another replica;
so does one waiting on a replica out of rotation for --replica-timeout seconds (a hung
process), or its stream ends there if it had begun.

security: the key (${API_KEY_ENV} or --api-key) is required from clients and sent to
the replicas for the router's own calls; give the replicas the same key. Listening
beyond loopback needs one.

examples:
  kvstore serve --port 8001 --kv-events redis://127.0.0.1:6379 --replica-id a &
  kvstore serve --port 8002 --kv-events redis://127.0.0.1:6379 --replica-id b &
  kvstore router --replica http://127.0.0.1:8001 --replica http://127.0.0.1:8002 \\
      --kv-events redis://127.0.0.1:6379 --port 8000
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore router",
        description="OpenAI-compatible router over several `kvstore serve` replicas: each\n"
                    "request goes to the replica holding most of its prefix in cache\n"
                    "(weighted by tier) against its load, or round-robin / least-load.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RouterConfig(replicas=("http://x",))
    p.add_argument("--replica", action="append", default=None, metavar="URL", required=True,
                   help="a `kvstore serve` to route to, http://host:port (repeat for each)")
    p.add_argument("--policy", default=d.policy.policy, choices=POLICIES,
                   help="prefix: cached prefix by tier minus load; round-robin; least-load: "
                        "fewest requests in flight (default: %(default)s)")
    p.add_argument("--kv-events", default=None, metavar="URL",
                   help="the Redis the replicas publish KV events to (default: none; prefix "
                        "routing then sees no cache and balances load)")
    p.add_argument("--tier-weights", type=parse_weights, default=dict(DEFAULT_WEIGHTS),
                   metavar="TIER=W,...",
                   help="value of one cached block by tier (default: gpu=1,host=0.8,disk=0.5)")
    p.add_argument("--load-weight", type=float, default=d.policy.load_weight, metavar="BLOCKS",
                   help="cached blocks one request in flight is worth against (default: "
                        "%(default)s)")
    p.add_argument("--max-imbalance", type=count_arg(0), default=d.policy.max_imbalance,
                   metavar="N", help="a replica with more than N requests in flight beyond the "
                                     "least loaded one is skipped by the prefix policy "
                                     "(default: %(default)s)")
    net = add_listen_arguments(p, host=d.host, port=d.port,
                               shutdown_timeout_s=d.shutdown_timeout_s, credential="--api-key",
                               env=API_KEY_ENV,
                               credential_help="bearer key clients must send, also sent to the "
                                               "replicas")
    net.add_argument("--health-interval", type=seconds_arg(allow_zero=False),
                     default=d.health_interval_s, metavar="SECONDS",
                     help="how often each replica's /healthz is polled (default: %(default)s)")
    net.add_argument("--health-timeout", type=seconds_arg(allow_zero=False),
                     default=d.health_timeout_s, metavar="SECONDS",
                     help="a replica slower than this to answer leaves the rotation "
                          "(default: %(default)s)")
    net.add_argument("--replica-timeout", type=seconds_arg(allow_zero=False),
                     default=d.replica_timeout_s, metavar="SECONDS",
                     help="a request waiting on a replica that has been out of rotation "
                          "this long (hung: connections open, no answers) is sent to "
                          "another replica, or its stream ends if it had begun "
                          "(default: %(default)s)")
    add_log_level(p)
    return p


async def run(config: RouterConfig) -> None:
    """Route until SIGINT or SIGTERM. ``OSError`` when the address cannot be bound."""
    from kvstore.router.app import RouterSettings, build_app
    from kvstore.service import run_until_signal

    app = build_app(RouterSettings(config.replicas, config.policy, config.api_key,
                                   config.kv_events, config.health_interval_s,
                                   config.health_timeout_s, config.replica_timeout_s))

    def listening(urls: list[str]) -> None:
        logger.info("kvstore router %s listening on %s (pid %d)", __version__, ", ".join(urls),
                    os.getpid())
        logger.info("policy %s over %d replica(s); KV events %s", config.policy.policy,
                    len(config.replicas), "from " + redact(config.kv_events)
                    if config.kv_events else "off")

    def stopping(signal_name: str) -> None:
        logger.info("received %s: finishing requests in flight (up to %.0f s)", signal_name,
                    config.shutdown_timeout_s)

    await run_until_signal(app, config.host, config.port,
                           shutdown_timeout_s=config.shutdown_timeout_s,
                           on_listening=listening, on_stop=stopping, cancel_on_disconnect=True)
    logger.info("stopped")


def redact(url: str | None) -> str:
    from kvstore.urls import redact_url

    return redact_url(url or "")


def main(argv: Sequence[str] | None = None) -> int:
    """``kvstore router``: 0 after a clean shutdown, 1 when it cannot start, 2 for bad
    arguments."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    configure_logging(args.log_level)
    try:
        config = RouterConfig(
            replicas=tuple(u.rstrip("/") for u in args.replica), host=args.host, port=args.port,
            api_key=args.api_key if args.api_key is not None else env.api_key(),
            policy=PolicyConfig(args.policy, args.tier_weights, args.load_weight,
                                args.max_imbalance),
            kv_events=args.kv_events, health_interval_s=args.health_interval,
            health_timeout_s=args.health_timeout, replica_timeout_s=args.replica_timeout,
            shutdown_timeout_s=args.shutdown_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(run(config))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``kvstore`` command: one entry point with a subcommand per job.

Each subcommand's module is imported only when it runs, so ``kvstore --help`` is fast
and a missing optional dependency only affects the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from kvstore import __version__

# name -> (module with main(argv), one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "radix": ("bench.radix_bench", "hashing, prefix match and eviction of the radix index"),
    "tiers": ("bench.tiers_bench", "put/get throughput of every tier vs its raw library"),
    "hit-rate": ("bench.hit_rate", "cache hit rate on real and generated workloads"),
    "engine": ("bench.engine_bench", "engine TTFT (cold vs cached) and throughput"),
    "attention": ("bench.attention_bench", "paged attention kernels vs torch SDPA"),
    "serve": ("bench.serve_bench", "serving under load over HTTP, cache tiers on vs off"),
    "router": ("bench.router_bench", "routing policies over replicas; router overhead"),
    "pressure": ("bench.pressure_bench",
                 "closed-loop clients over a small GPU KV pool: tiers vs preemption"),
    "plan": ("bench.plan_bench", "the plan's predictions next to the engine's measurements"),
    "format": ("bench.format_bench", "bytes and load GB/s of exact, int8 and fp8 blocks"),
    "fused": ("bench.fused_bench", "fused elementwise kernels vs the torch formulas"),
}

COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("engine.chat", "multi-turn chat demo on the embedded engine"),
    "serve": ("engine.server.cli", "OpenAI-compatible HTTP server"),
    "daemon": ("kvstore.daemon.cli", "standalone cache daemon over HTTP"),
    "router": ("kvstore.router.cli", "OpenAI-compatible router over serve replicas, by prefix"),
    "plan": ("kvstore.plan", "capacity plan: memory, KV, batch, TTFT/TPOT, tier sizing"),
}


def _run_module(module: str, argv: Sequence[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            print(f"kvstore: this command is not available in this version ({module} is missing)",
                  file=sys.stderr)
        else:
            print(f"kvstore: missing dependency {exc.name!r}; run `bash .ci/setup` "
                  "or `pip install -e '.[dev]'`", file=sys.stderr)
        return 2
    try:
        return int(mod.main(list(argv)) or 0)
    except BrokenPipeError:
        # the reader went away (`kvstore plan ... | head -1`): stop quietly, as cat does;
        # stdout is pointed at /dev/null so the interpreter's own flush at exit is silent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore",
        description="Tiered, distributed KV-cache store with prefix sharing, and an embedded "
                    "serving engine that reuses it. Run `kvstore COMMAND --help` for details.")
    p.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    bench = sub.add_parser("bench", help="benchmarks, each next to its baseline",
                           description="Benchmarks. Each prints a table with its baseline "
                                       "measured in the same run.")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    for name, (_, text) in BENCHES.items():
        bsub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Subcommands parse their own arguments: split argv at the subcommand.
    if argv and argv[0] in COMMANDS:
        return _run_module(COMMANDS[argv[0]][0], argv[1:])
    if argv and argv[0] == "bench" and len(argv) > 1 and argv[1] in BENCHES:
        return _run_module(BENCHES[argv[1]][0], argv[2:])
    args = parser.parse_args(argv)
    if args.command == "bench":
        parser.parse_args(["bench", "--help"])
    parser.print_help()
    return 0 if not argv else 2

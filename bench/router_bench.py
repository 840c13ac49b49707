"""``kvstore bench router``: the router's overhead; and the router mode of
``kvstore bench serve``.

- ``kvstore bench router``: one replica (``--replica-arg`` flags verbatim) and a router
  (prefix policy, KV events on) over it; requests with a short chat prompt and
  ``max_tokens`` 1 at ``--rate`` per second (Poisson arrivals), alternately straight to
  the replica and through the router, so both paths see the same load. Prints each
  path's latency p50/p99 and the router's p50 overhead in ms next to the target
  (<= 2 ms at 100 requests/s), and the routing time itself (parse, tokenize, hash,
  choose) from the router's metrics.
- ``kvstore bench serve --replicas N --policies round-robin,prefix,least-load``
  (:func:`add_serve_arguments`, :func:`policy_runs`, :func:`routed`, :func:`report`):
  each policy is one run of the serve bench against a fresh Redis, N fresh replicas of
  the first ``--configs`` configuration (``--devices`` in turn) and a router; the serve
  bench's table gives TTFT, throughput and cached tokens by tier per policy, and
  :func:`report` adds the hit rate by replica and tier and prefix vs round-robin next
  to the targets (hit rate >= 1.5x, p50 TTFT <= 0.6x, throughput not lower).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.servers import RedisServer
from kvstore.args import add_out_argument, make_dir, plain_text, seconds_arg
from kvstore.process import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (http://[0-9.]+:[0-9]+)")
TARGET_HIT = 1.5
TARGET_TTFT = 0.6
TARGET_OVERHEAD_MS = 2.0


# ------------------------------------------------------------------------- processes


class Child:
    """One ``python -m kvstore ...`` process with its log; ``url`` once listening."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.args = list(args)
        self.log = log
        self._offset = log.stat().st_size if log.exists() else 0  # earlier runs' lines
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvstore", *self.args],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env=env, preexec_fn=die_with_parent)
        self.url = ""

    def wait(self, timeout_s: float) -> Child:
        deadline = time.monotonic() + timeout_s
        while True:
            found = LISTENING.search(self._text())
            if found:
                self.url = found.group(1)
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self._text()[-3000:]
                self.stop()
                raise RuntimeError(f"kvstore {self.args[0]} did not start (see {self.log}):\n"
                                   f"{tail}")
            time.sleep(0.1)

    def _text(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _get_json(url: str) -> Any:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            return await resp.json()
    except (aiohttp.ClientError, OSError, ValueError):
        return None


# ------------------------------------------------------------------------- helpers


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _model(url: str) -> str:
    """The first model name the server at ``url`` answers to."""
    import urllib.request

    with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
        return str(json.loads(resp.read())["data"][0]["id"])


def _scrape(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("kvstore_router_") and not line.startswith("#") and \
                "_created" not in line and "_bucket" not in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# ------------------------------------------------------------------------- overhead


async def _overhead(direct: str, routed: str, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    model = _model(direct)
    rng = random.Random(args.seed)
    lat: dict[str, list[float]] = {"direct": [], "router": [], "warm": []}
    route_ms: list[float] = []
    errors = Counter[str]()

    async def one(i: int, url: str, kind: str) -> None:
        body = {"model": model, "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": f"Say hi to user {i}."}]}
        start = time.perf_counter()
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                ok = resp.status == 200
                if ok and kind == "router":
                    route_ms.append(float(resp.headers.get("X-Kvstore-Route-Ms", "nan")))
        except aiohttp.ClientError:
            ok = False
        if ok:
            lat[kind].append((time.perf_counter() - start) * 1000)
        else:
            errors[kind] += 1

    n = int(args.rate * args.duration)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for i in range(20):  # warm both paths (connections, tokenizer, graphs)
            await one(i, direct if i % 2 else routed, "warm")
        lat["direct"].clear()
        lat["router"].clear()
        route_ms.clear()
        tasks = []
        start = time.perf_counter()
        t = 0.0
        for i in range(n):
            t += rng.expovariate(args.rate)
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = "router" if i % 2 else "direct"
            tasks.append(asyncio.create_task(one(i, routed if i % 2 else direct, kind)))
        sending = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return {"lat": lat, "route_ms": route_ms, "errors": dict(errors),
            "achieved_rate": n / max(sending, 1e-9)}


def run_overhead(args: argparse.Namespace, out: Path) -> int:
    args.replicas = 1
    with fleet("prefix", args, list(args.replica_arg or []), out) as (router, replicas):
        print(f"[overhead] {args.rate:.0f} requests/s for {args.duration:.0f} s, "
              "alternately direct and through the router", flush=True)
        res = asyncio.run(_overhead(replicas[0], router, args))
        metrics = _scrape(router)
    d, r = res["lat"]["direct"], res["lat"]["router"]
    p50d, p50r = _pct(d, 50), _pct(r, 50)
    route_p50 = _pct(res["route_ms"], 50)
    print(f"{'path':<8} {'reqs':>6} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    print(f"{'direct':<8} {len(d):>6} {p50d:>8.2f} {_pct(d, 99):>8.2f} "
          f"{res['errors'].get('direct', 0):>6}")
    print(f"{'router':<8} {len(r):>6} {p50r:>8.2f} {_pct(r, 99):>8.2f} "
          f"{res['errors'].get('router', 0):>6}")
    overhead = p50r - p50d
    print(f"router overhead p50: {overhead:.2f} ms at {res['achieved_rate']:.0f} requests/s "
          f"(target <= {TARGET_OVERHEAD_MS:.0f} ms: "
          f"{'met' if overhead <= TARGET_OVERHEAD_MS else 'NOT met'}); routing itself "
          f"(arrival to dispatch: read, parse, tokenize, hash, choose) p50 {route_p50:.2f} ms")
    if res["achieved_rate"] < 0.9 * args.rate or p50d > 1000:
        print("note: the replica could not keep up (or the client could not send at the "
              "rate): the p50 difference is noise; use a faster replica (GPU)")
    (out / "router_overhead.json").write_text(json.dumps(
        {"args": vars(args), **res, "p50_overhead_ms": overhead, "router_metrics": metrics},
        indent=2, default=str))
    return 0


# ------------------------------------------------------------------------- kvstore bench serve


POLICIES = ("round-robin", "prefix", "least-load")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """``kvstore bench serve``'s router mode: ``--replicas``, ``--policies``, ``--devices``,
    ``--router-arg``."""
    g = p.add_argument_group("router (--replicas: the runs are routing policies)")
    g.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="start N replicas of the first --configs configuration, one Redis and "
                        "a kvstore router per policy, and send the load through the router "
                        "(default: 0, no router)")
    g.add_argument("--policies", default="round-robin,prefix,least-load",
                   help="router policies to compare, round-robin first as the baseline "
                        "(default: %(default)s)")
    g.add_argument("--devices", default=None, metavar="D0,D1",
                   help="devices given to the replicas in turn, e.g. cuda:0,cuda:1 (default: "
                        "--device for all: cap each pool with --gpu-kv-bytes to share one GPU)")
    _add_router_arg(g)


def _add_router_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--router-arg``: both benches' flags for the routers they start."""
    p.add_argument("--router-arg", action="append", default=None, metavar="ARG",
                   help="extra argument for every kvstore router (repeatable; use "
                        "--router-arg=--flag, e.g. --router-arg=--load-weight=16; "
                        "default: none)")


def policy_runs(p: argparse.ArgumentParser, args: argparse.Namespace, configs: list[str]
                ) -> list[str]:
    """The runs of the router mode (policies, baseline first); the replicas' cache
    configuration is ``configs[0]`` (kept in ``args.replica_config``)."""
    if args.replicas < 1 or args.url:
        p.error("--replicas needs N >= 1 and no --url")
    names = [x.strip() for x in args.policies.split(",") if x.strip()]
    bad = [x for x in names if x not in POLICIES]
    if bad or not names:
        p.error(f"--policies: unknown {bad or 'empty list'}; choose from {', '.join(POLICIES)}")
    args.replica_config = configs[0]
    args.no_sim = True  # the store's simulation models one server
    return sorted(dict.fromkeys(names), key=lambda x: x != "round-robin")


class _Fleet:
    def __init__(self) -> None:
        self.children: list[Any] = []
        self.redis: RedisServer | None = None

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.redis is not None:
            self.redis.close()


def routed(policy: str, args: argparse.Namespace, flags: Sequence[str], out: Path
           ) -> contextlib.AbstractContextManager[str]:
    """A fresh Redis, ``args.replicas`` replicas started with ``flags`` (plus their KV
    events, ids and ``--devices``) and a router of ``policy``: its URL for the ``with``
    body; everything stopped afterwards."""

    @contextlib.contextmanager
    def run() -> Iterator[str]:
        with fleet(policy, args, flags, out) as (url, _replicas):
            yield url
            (out / f"router-{policy}.metrics.json").write_text(json.dumps(_scrape(url), indent=1))

    return run()


@contextlib.contextmanager
def fleet(policy: str, args: argparse.Namespace, flags: Sequence[str], out: Path
          ) -> Iterator[tuple[str, list[str]]]:
    """:func:`routed`, yielding the router's URL and the replicas' URLs."""
    from bench.serve_bench import ServeProcess

    running = _Fleet()
    try:
        running.redis = RedisServer().start()
        devices = [d for d in (args.devices or "").split(",") if d]
        urls = []
        for i in range(args.replicas):
            extra = ["--kv-events", running.redis.url, "--replica-id", f"r{i}"]
            if devices:
                extra += ["--device", devices[i % len(devices)]]
            server = ServeProcess([*flags, *extra], out / f"server-{policy}-r{i}.log")
            running.children.append(server)
            if i == 0:  # the first converts the model once
                urls.append(server.wait_url(args.startup_timeout))
        urls += [s.wait_url(args.startup_timeout) for s in running.children[1:]]
        router = _RouterChild(["router", "--port", "0", "--policy", policy, "--kv-events",
                               running.redis.url, *(x for u in urls for x in ("--replica", u)),
                               *(args.router_arg or [])],
                              out / f"router-{policy}.log")
        running.children.append(router)
        url = router.wait(120).url
        deadline = time.monotonic() + 60
        while True:
            status = asyncio.run(_get_json(url + "/v1/router"))
            if status and all(r["in_rotation"] for r in status["replicas"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the router did not put every replica in rotation")
            time.sleep(0.1)
        print(f"[{policy}] router {url} over {len(urls)} replicas", flush=True)
        yield url, urls
    finally:
        running.stop()


class _RouterChild(Child):
    def __init__(self, args: Sequence[str], log: Path) -> None:
        super().__init__(args, log, dict(os.environ))


def report(rows: Sequence[Any], results: dict[str, list[Any]]) -> list[str]:
    """Lines for ``kvstore bench serve --replicas``: per policy the hit rate by replica
    and tier, then each policy against round-robin next to the targets."""
    lines = ["hit rate by replica (cached / prompt tokens, requests):"]
    for name, res in results.items():
        ok = [r for r in res if r.error is None and not r.cut]
        prompt: Counter[str] = Counter()
        cached: Counter[str] = Counter()
        tiers: dict[str, Counter[str]] = {}
        for r in ok:
            prompt[r.replica] += r.prompt_tokens
            cached[r.replica] += r.cached_tokens
            tiers.setdefault(r.replica, Counter()).update(r.cached_by_tier)
        parts = []
        for rep in sorted(prompt):
            by = " ".join(f"{t}={n / max(1, prompt[rep]):.0%}" for t, n in sorted(tiers[rep].items()))
            n = sum(1 for r in ok if r.replica == rep)
            parts.append(f"{rep or '?'}: {cached[rep] / max(1, prompt[rep]):.1%} ({by or '-'}) "
                         f"of {n}")
        lines.append(f"  {name:<12} " + "; ".join(parts))
    by_name = {s.config: s for s in rows}
    base = by_name.get("round-robin")
    if base is None or not base.requests:
        return lines
    for s in rows:
        if s is base or not s.requests:
            continue
        if not base.cached_frac:
            lines.append(f"{s.config} vs round-robin: round-robin hit nothing (pools too small "
                         "for the prompts?); no ratio")
            continue
        hit = s.cached_frac / base.cached_frac
        ttft = s.ttft_ms["p50"] / max(base.ttft_ms["p50"], 1e-9)
        tput = s.output_tok_per_s / max(base.output_tok_per_s, 1e-9)
        line = (f"{s.config} vs round-robin: hit rate {hit:.2f}x ({s.cached_frac:.1%} vs "
                f"{base.cached_frac:.1%}), p50 TTFT {ttft:.2f}x, throughput {tput:.2f}x")
        if s.config == "prefix":
            ok_all = hit >= TARGET_HIT and ttft <= TARGET_TTFT and tput >= 1.0
            line += (f"  [targets >= {TARGET_HIT}x, <= {TARGET_TTFT}x, >= 1.00x: "
                     f"{'met' if ok_all else 'NOT met'}]")
        lines.append(line)
    return lines


# ------------------------------------------------------------------------- cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore bench router",
        description="The router's per-request overhead: requests straight to a replica and "
                    "through `kvstore router`, interleaved at one rate. (Routing policies "
                    "are compared by `kvstore bench serve --replicas N --policies ...`.)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=plain_text(__doc__))
    p.add_argument("--rate", type=float, default=100.0,
                   help="requests a second, Poisson arrivals (default: %(default)s)")
    p.add_argument("--duration", type=float, default=10.0, metavar="SECONDS",
                   help="how long (default: %(default)s)")
    p.add_argument("--device", dest="devices", default=None, metavar="DEVICE",
                   help="the replica's device: cuda, cuda:N or cpu (default: cuda when "
                        "present, else cpu)")
    p.add_argument("--replica-arg", action="append", default=None, metavar="ARG",
                   help="flag passed to the replica verbatim, e.g. --replica-arg=--model=smollm2 "
                        "(repeatable; default: none)")
    _add_router_arg(p)
    p.add_argument("--startup-timeout", type=seconds_arg(allow_zero=False), default=900.0,
                   metavar="SECONDS", help="replica start (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the arrivals (default: %(default)s)")
    add_out_argument(p, "router", "the logs and the JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not (math.isfinite(args.rate) and args.rate > 0
            and math.isfinite(args.duration) and args.duration > 0):
        p.error("--rate and --duration must be finite and > 0")
    if args.devices is not None:
        from bench.device import bench_device  # torch: only when a device is named

        bench_device(p, args.devices)  # a device the replica would refuse: say so now
    out = make_dir(p, "--out", args.out)
    from bench.serve_bench import RunError  # serve_bench imports this module

    try:
        return run_overhead(args, out)
    except (RuntimeError, RunError, OSError) as exc:
        print(f"kvstore bench router: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

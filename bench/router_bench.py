"""``kvstore bench router``: routing policies over replicas, and the router's overhead.

Two measurements, each next to its baseline in the same run:

- ``policies`` (default): one ``redis-server``, ``--replicas`` fresh ``kvstore serve``
  replicas publishing KV events, and ``kvstore router`` in front, started afresh for
  each of ``--policies`` (round-robin first: the baseline). A closed loop of
  ``--clients`` users runs multi-turn conversations through the router (turn ``k``
  re-sends the whole history plus ``--new-tokens`` new tokens, as token ids, streamed;
  each reply's tokens are appended to the history). Per policy: hit rate (cached /
  prompt tokens, from each answer's usage) overall, by replica and by tier; TTFT p50
  and p99; throughput (generated tokens/s and requests/s); then prefix-aware against
  round-robin as ratios next to the targets (hit rate >= 1.5x, p50 TTFT <= 0.6x,
  throughput not lower).
- ``overhead``: one replica and a router (prefix policy, events on); requests with a
  short chat prompt and ``max_tokens`` 1 at ``--rate`` per second (Poisson arrivals),
  alternately sent straight to the replica and through the router, so both see the
  same load. Reports each latency's p50/p99 and the router's p50 overhead in ms
  (target <= 2 ms at 100 requests/s).

Replicas get ``--replica-arg`` flags verbatim (model, dtype, pools, ``--load-format``)
and ``--devices`` round-robin (``cuda:0,cuda:1``: one GPU each; one device: shared, so
give each a capped pool with ``--replica-arg=--gpu-kv-bytes=...``). Logs and a JSON of
every figure go to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.servers import RedisServer, free_port
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


def start_replicas(args: argparse.Namespace, redis_url: str, out: Path, tag: str
                   ) -> list[Child]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    devices = [d for d in (args.devices or "").split(",") if d]
    children = []
    try:
        for i in range(args.replicas):
            flags = ["serve", "--port", str(free_port()), "--kv-events", redis_url,
                     "--replica-id", f"r{i}", *(args.replica_arg or [])]
            if devices:
                flags += ["--device", devices[i % len(devices)]]
            children.append(Child(flags, out / f"{tag}-r{i}.log", env))
            if i == 0:  # the first converts the model once; the others load the cache
                children[0].wait(args.startup_timeout)
        for child in children:
            child.wait(args.startup_timeout)
    except BaseException:
        for child in children:
            child.stop()
        raise
    return children


def start_router(args: argparse.Namespace, replicas: Sequence[Child], redis_url: str,
                 policy: str, out: Path) -> Child:
    flags = ["router", "--port", "0", "--policy", policy, "--kv-events", redis_url,
             *(x for r in replicas for x in ("--replica", r.url)), *(args.router_arg or [])]
    router = Child(flags, out / f"router-{policy}.log", dict(os.environ)).wait(120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = asyncio.run(_get_json(router.url + "/v1/router"))
        if status and all(r["in_rotation"] for r in status["replicas"]):
            return router
        time.sleep(0.1)
    router.stop()
    raise RuntimeError("the router did not put every replica in rotation within 60 s")


async def _get_json(url: str) -> Any:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            return await resp.json()
    except (aiohttp.ClientError, OSError, ValueError):
        return None


# ------------------------------------------------------------------------- workload


@dataclass
class Answer:
    """One request's outcome as the client saw it."""

    replica: str
    prompt_tokens: int
    cached_by_tier: dict[str, int]
    output_tokens: int
    ttft_s: float
    e2e_s: float


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 30000) for _ in range(n)]


async def _complete(session: Any, url: str, model: str, prompt: list[int], max_tokens: int
                    ) -> Answer:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    text_chunks = 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {(await resp.text())[:300]}")
        replica = resp.headers.get("X-Kvstore-Replica", "direct")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                text_chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    e2e = time.perf_counter() - start
    details = usage.get("prompt_tokens_details") or {}
    out = int(usage.get("completion_tokens", text_chunks))
    answer = Answer(replica, int(usage.get("prompt_tokens", len(prompt))),
                    dict(details.get("cached_tokens_by_tier") or {}), out,
                    ttft if ttft is not None else e2e, e2e)
    return answer


async def run_conversations(url: str, args: argparse.Namespace, model: str) -> tuple[
        list[Answer], float]:
    """Closed loop: ``clients`` users each take the next conversation and run its turns
    back to back. Returns the answers and the wall time (s)."""
    import aiohttp

    rng = random.Random(args.seed)
    system = _ids(rng, args.system_tokens)
    convs = [[_ids(rng, args.new_tokens) for _ in range(args.rounds)]
             for _ in range(args.conversations)]
    replies = [[_ids(rng, args.output_tokens) for _ in range(args.rounds)]
               for _ in range(args.conversations)]
    queue = list(range(args.conversations))
    answers: list[Answer] = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)

    async def user(session: Any) -> None:
        while queue:
            c = queue.pop(0)
            history = list(system)
            for k in range(args.rounds):
                history += convs[c][k]
                answer = await _complete(session, url, model, history, args.output_tokens)
                answers.append(answer)
                # The reply's tokens join the history (the same ids on every run, so
                # every policy sees the same prompts).
                history += replies[c][k]

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(user(session) for _ in range(args.clients)))
    return answers, time.perf_counter() - start


# ------------------------------------------------------------------------- reports


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


@dataclass
class PolicyResult:
    policy: str
    requests: int
    hit_rate: float
    hit_by_tier: dict[str, float]
    hit_by_replica: dict[str, float]
    requests_by_replica: dict[str, int]
    ttft_p50_ms: float
    ttft_p99_ms: float
    tokens_per_s: float
    requests_per_s: float
    router_metrics: dict[str, float] = field(default_factory=dict)


def summarize(policy: str, answers: Sequence[Answer], wall_s: float) -> PolicyResult:
    prompt = sum(a.prompt_tokens for a in answers)
    cached_tier: Counter[str] = Counter()
    by_replica_prompt: Counter[str] = Counter()
    by_replica_cached: Counter[str] = Counter()
    for a in answers:
        cached_tier.update(a.cached_by_tier)
        by_replica_prompt[a.replica] += a.prompt_tokens
        by_replica_cached[a.replica] += sum(a.cached_by_tier.values())
    ttfts = [a.ttft_s * 1000 for a in answers]
    return PolicyResult(
        policy, len(answers), sum(cached_tier.values()) / max(1, prompt),
        {t: n / max(1, prompt) for t, n in sorted(cached_tier.items())},
        {r: by_replica_cached[r] / max(1, by_replica_prompt[r]) for r in sorted(by_replica_prompt)},
        dict(sorted(Counter(a.replica for a in answers).items())),
        _pct(ttfts, 50), _pct(ttfts, 99),
        sum(a.output_tokens for a in answers) / wall_s, len(answers) / wall_s)


def format_policies(rows: Sequence[PolicyResult]) -> str:
    lines = [f"{'policy':<12} {'reqs':>5} {'hit':>6} {'by tier':<22} {'by replica (hit, reqs)':<34}"
             f" {'TTFT p50':>9} {'p99':>9} {'tok/s':>8} {'req/s':>6}"]
    for r in rows:
        tiers = " ".join(f"{t}={v:.0%}" for t, v in r.hit_by_tier.items()) or "-"
        reps = " ".join(f"{k}={r.hit_by_replica[k]:.0%}/{n}" for k, n in r.requests_by_replica.items())
        lines.append(f"{r.policy:<12} {r.requests:>5} {r.hit_rate:>6.1%} {tiers:<22} {reps:<34}"
                     f" {r.ttft_p50_ms:>7.1f}ms {r.ttft_p99_ms:>7.1f}ms {r.tokens_per_s:>8.1f}"
                     f" {r.requests_per_s:>6.2f}")
    return "\n".join(lines)


def compare(rows: Sequence[PolicyResult]) -> list[str]:
    """Each policy against round-robin (the baseline), next to the targets."""
    base = next((r for r in rows if r.policy == "round-robin"), None)
    if base is None:
        return ["(no round-robin run: no baseline to compare with)"]
    out = []
    for r in rows:
        if r is base:
            continue
        hit = r.hit_rate / base.hit_rate if base.hit_rate else float("inf")
        ttft = r.ttft_p50_ms / base.ttft_p50_ms if base.ttft_p50_ms else float("nan")
        tput = r.tokens_per_s / base.tokens_per_s if base.tokens_per_s else float("nan")
        line = (f"{r.policy} vs round-robin: hit rate {hit:.2f}x, p50 TTFT {ttft:.2f}x, "
                f"throughput {tput:.2f}x")
        if r.policy == "prefix":
            ok = hit >= TARGET_HIT and ttft <= TARGET_TTFT and tput >= 1.0
            line += (f"  (targets: >= {TARGET_HIT}x, <= {TARGET_TTFT}x, >= 1.00x: "
                     f"{'met' if ok else 'NOT met'})")
        out.append(line)
    return out


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


def run_policies(args: argparse.Namespace, out: Path) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    policies.sort(key=lambda p: p != "round-robin")  # the baseline first
    rows = []
    for policy in policies:
        with RedisServer() as redis:
            replicas = start_replicas(args, redis.url, out, policy)
            try:
                router = start_router(args, replicas, redis.url, policy, out)
                try:
                    print(f"[{policy}] {args.replicas} replicas, {args.clients} clients, "
                          f"{args.conversations} conversations x {args.rounds} rounds",
                          flush=True)
                    model = _model(router.url)
                    answers, wall = asyncio.run(run_conversations(router.url, args, model))
                    row = summarize(policy, answers, wall)
                    row.router_metrics = _scrape(router.url)
                    rows.append(row)
                    print(format_policies([row]).splitlines()[1], flush=True)
                finally:
                    router.stop()
            finally:
                for r in replicas:
                    r.stop()
    print()
    print(format_policies(rows))
    for line in compare(rows):
        print(line)
    (out / "router_policies.json").write_text(json.dumps(
        {"args": vars(args), "results": [asdict(r) for r in rows]}, indent=2, default=str))
    print(f"details: {out / 'router_policies.json'}")
    return 0


# ------------------------------------------------------------------------- overhead


async def _overhead(direct: str, routed: str, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    model = _model(direct)
    rng = random.Random(args.seed)
    lat: dict[str, list[float]] = {"direct": [], "router": [], "warm": []}
    errors = Counter[str]()

    async def one(i: int, url: str, kind: str) -> None:
        body = {"model": model, "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": f"Say hi to user {i}."}]}
        start = time.perf_counter()
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                ok = resp.status == 200
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
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"lat": lat, "errors": dict(errors), "achieved_rate": n / wall}


def run_overhead(args: argparse.Namespace, out: Path) -> int:
    args.replicas = 1
    with RedisServer() as redis:
        replicas = start_replicas(args, redis.url, out, "overhead")
        try:
            router = start_router(args, replicas, redis.url, "prefix", out)
            try:
                print(f"[overhead] {args.rate:.0f} requests/s for {args.duration:.0f} s, "
                      "alternately direct and through the router", flush=True)
                res = asyncio.run(_overhead(replicas[0].url, router.url, args))
                metrics = _scrape(router.url)
            finally:
                router.stop()
        finally:
            for r in replicas:
                r.stop()
    d, r = res["lat"]["direct"], res["lat"]["router"]
    p50d, p50r = _pct(d, 50), _pct(r, 50)
    route_n = metrics.get("kvstore_router_route_seconds_count", 0)
    route_mean = metrics.get("kvstore_router_route_seconds_sum", 0) / max(1, route_n) * 1000
    print(f"{'path':<8} {'reqs':>6} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    print(f"{'direct':<8} {len(d):>6} {p50d:>8.2f} {_pct(d, 99):>8.2f} "
          f"{res['errors'].get('direct', 0):>6}")
    print(f"{'router':<8} {len(r):>6} {p50r:>8.2f} {_pct(r, 99):>8.2f} "
          f"{res['errors'].get('router', 0):>6}")
    overhead = p50r - p50d
    print(f"router overhead p50: {overhead:.2f} ms at {res['achieved_rate']:.0f} requests/s "
          f"(target <= {TARGET_OVERHEAD_MS:.0f} ms: "
          f"{'met' if overhead <= TARGET_OVERHEAD_MS else 'NOT met'}); routing itself "
          f"(parse, tokenize, hash, choose) {route_mean:.2f} ms mean")
    (out / "router_overhead.json").write_text(json.dumps(
        {"args": vars(args), **res, "p50_overhead_ms": overhead, "router_metrics": metrics},
        indent=2, default=str))
    return 0


# ------------------------------------------------------------------------- kvstore bench serve


POLICIES = ("round-robin", "prefix", "least-load")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """``kvstore bench serve``'s router mode: ``--replicas``, ``--policies``, ``--devices``."""
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
    from bench.serve_bench import ServeProcess

    @contextlib.contextmanager
    def run() -> Iterator[str]:
        fleet = _Fleet()
        try:
            fleet.redis = RedisServer().start()
            devices = [d for d in (args.devices or "").split(",") if d]
            urls = []
            for i in range(args.replicas):
                extra = ["--kv-events", fleet.redis.url, "--replica-id", f"r{i}"]
                if devices:
                    extra += ["--device", devices[i % len(devices)]]
                server = ServeProcess([*flags, *extra], out / f"server-{policy}-r{i}.log")
                fleet.children.append(server)
                if i == 0:  # the first converts the model once
                    urls.append(server.wait_url(args.startup_timeout))
            urls += [s.wait_url(args.startup_timeout) for s in fleet.children[1:]]
            router = _RouterChild(["router", "--port", "0", "--policy", policy, "--kv-events",
                                   fleet.redis.url, *(x for u in urls for x in ("--replica", u))],
                                  out / f"router-{policy}.log")
            fleet.children.append(router)
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
            yield url
            (out / f"router-{policy}.metrics.json").write_text(json.dumps(_scrape(url), indent=1))
        finally:
            fleet.stop()

    return run()


class _RouterChild(Child):
    def __init__(self, args: Sequence[str], log: Path) -> None:
        super().__init__(args, log, dict(os.environ))


def report(rows: Sequence[Any], results: dict[str, list[Any]]) -> list[str]:
    """Lines for ``kvstore bench serve --replicas``: per policy the hit rate by replica
    and tier, then each policy against round-robin next to the targets."""
    lines = ["hit rate by replica (cached / prompt tokens, requests):"]
    for name, res in results.items():
        ok = [r for r in res if r.error is None]
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
        hit = s.cached_frac / base.cached_frac if base.cached_frac else float("inf")
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
        description="Routing policies over kvstore serve replicas (hit rate by replica and "
                    "tier, TTFT, throughput; prefix vs round-robin), or the router's "
                    "per-request overhead.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--mode", choices=["policies", "overhead"], default="policies",
                   help="what to measure (default: %(default)s)")
    srv = p.add_argument_group("replicas")
    srv.add_argument("--replicas", type=int, default=2, help="replicas (default: %(default)s)")
    srv.add_argument("--policies", default="round-robin,prefix,least-load",
                     help="comma-separated; round-robin runs first as the baseline "
                          "(default: %(default)s)")
    srv.add_argument("--devices", default=None, metavar="D0,D1",
                     help="devices given to replicas in turn, e.g. cuda:0,cuda:1 (default: "
                          "each replica's default)")
    srv.add_argument("--replica-arg", action="append", default=None, metavar="ARG",
                     help="flag passed to every replica verbatim, e.g. "
                          "--replica-arg=--gpu-kv-bytes=2GiB (repeatable)")
    srv.add_argument("--router-arg", action="append", default=None, metavar="ARG",
                     help="flag passed to the router verbatim, e.g. --router-arg=--load-weight=8")
    srv.add_argument("--startup-timeout", type=float, default=900.0, metavar="SECONDS",
                     help="per replica start (default: %(default)s)")
    wl = p.add_argument_group("multi-turn workload (policies)")
    wl.add_argument("--clients", type=int, default=16, help="concurrent users (default: %(default)s)")
    wl.add_argument("--conversations", type=int, default=48,
                    help="conversations in all (default: %(default)s)")
    wl.add_argument("--rounds", type=int, default=6, help="turns per conversation (default: %(default)s)")
    wl.add_argument("--system-tokens", type=int, default=0,
                    help="system prompt shared by every conversation, tokens (default: %(default)s)")
    wl.add_argument("--new-tokens", type=int, default=512,
                    help="new user tokens per turn (default: %(default)s)")
    wl.add_argument("--output-tokens", type=int, default=64,
                    help="tokens generated per turn (default: %(default)s)")
    wl.add_argument("--request-timeout", type=float, default=1800.0, metavar="SECONDS")
    ov = p.add_argument_group("overhead")
    ov.add_argument("--rate", type=float, default=100.0, help="requests/s (default: %(default)s)")
    ov.add_argument("--duration", type=float, default=10.0, metavar="SECONDS",
                    help="how long (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="router_bench_out", metavar="DIR",
                   help="logs and JSON (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("replicas", "clients", "conversations", "rounds", "new_tokens",
                 "output_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.system_tokens < 0 or not args.rate > 0 or not args.duration > 0:
        p.error("--system-tokens must be >= 0, --rate and --duration > 0")
    bad = [x for x in args.policies.split(",") if x.strip() and x.strip() not in
           ("prefix", "round-robin", "least-load")]
    if bad:
        p.error(f"unknown policy {bad[0]!r} (prefix, round-robin, least-load)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return run_overhead(args, out) if args.mode == "overhead" else run_policies(args, out)
    except RuntimeError as exc:
        print(f"kvstore bench router: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

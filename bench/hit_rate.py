"""Hit-rate benchmark: the tiered store against its baselines on three workloads.

Run: ``python -m kvstore bench hit-rate`` (``--help`` for options). For every workload
(:mod:`bench.workloads`) and every total cache capacity of a sweep, each request is
replayed through:

- the tiered store in simulation mode (:meth:`kvstore.store.KVStore.replay`), GPU + host
  + disk in a 1:3:30 split, for each policy (write-back, write-through);
- GPU-only leaf-first LRU: the same store with only its GPU tier (the same GPU
  capacity, no host or disk tier): what a server without the lower tiers gets;
- one-tier LRU of the total size: the store with the whole capacity in its GPU tier, an
  idealised bound (no GPU holds 30M tokens) that a tiered LRU can at best equal;
- flat FIFO: a flat map of block hashes with the whole capacity, insertion-order
  eviction, no prefix structure (:class:`bench.baselines.FlatFIFOCache`);
- an infinite cache (the upper bound; one run per workload).

Hit rate = prompt tokens served from the cache / prompt tokens, and for the tiered store
per tier. Capacities are in tokens (blocks x block size). The sweep multiplies a
reference capacity: for the full Mooncake trace GPU 1M + host 3M + disk 30M tokens (the
issue's configuration); for any other workload a quarter of its footprint (its
distinct full blocks), split the same way. The GPU tier never gets fewer blocks than
the largest request (a sequence must fit on the GPU); host and disk share the rest 3:30.

Writes a table (stdout), ``hit_rate.csv`` and ``hit_rate.png`` to ``--out``, then
checks the targets: on Mooncake at the reference capacity the write-back store reaches
>= 95% of the infinite cache's hit rate; at every capacity each tiered policy is >=
GPU-only LRU, and write-back (the default) >= flat FIFO; the full-trace replay time
(the target is < 30 s on 2 cores); and reports how far each policy stays from the
one-tier bound. Write-through against flat FIFO is reported, not judged: it keeps every
block on disk as well (inclusive), so it holds at most the disk tier's distinct blocks,
30/34 of the total capacity flat FIFO gets, and loses to it where capacity is scarce.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bench import workloads as wl
from bench.baselines import FlatFIFOCache, InfiniteCache, gpu_only_store
from kvstore.config import POLICIES, StoreConfig
from kvstore.store import KVStore

TIERS = ("gpu", "host", "disk", "redis")
SPLIT = (1, 3, 30)
"""GPU : host : disk shares of the total capacity."""

MOONCAKE_REFERENCE_TOKENS = (1_000_000, 3_000_000, 30_000_000)
"""The issue's Mooncake configuration: GPU, host, disk capacities (tokens)."""

OTHER_REFERENCE_FRACTION = 0.25
"""Reference total capacity of a workload other than the full Mooncake trace, as a
fraction of its footprint (distinct full blocks)."""

DEFAULT_FACTORS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4)
QUICK_FACTORS = (1 / 8, 1, 4)
WORKLOADS = ("mooncake", "sharegpt", "generated")

TIERED = "tiered"
GPU_ONLY = "one-tier LRU, total size"
GPU_SHARE = "GPU-only LRU, same GPU"
FLAT = "flat FIFO"
INFINITE = "infinite"


@dataclass(frozen=True)
class Capacity:
    """One point of the sweep: per-tier capacities in blocks."""

    factor: float
    gpu: int
    host: int
    disk: int

    @property
    def total(self) -> int:
        """Total capacity (blocks)."""
        return self.gpu + self.host + self.disk


@dataclass
class Row:
    """Result of one replay of a workload through one cache."""

    workload: str
    cache: str
    policy: str
    capacity: Capacity | None
    block_size: int
    prompt_tokens: int
    hit_tokens: dict[str, int]
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def hit(self) -> int:
        """Prompt tokens served from the cache (all tiers)."""
        return sum(self.hit_tokens.values())

    @property
    def hit_rate(self) -> float:
        """Hit tokens / prompt tokens."""
        return self.hit / self.prompt_tokens if self.prompt_tokens else 0.0

    def tier_rate(self, tier: str) -> float:
        """Prompt tokens served from ``tier`` / prompt tokens."""
        return self.hit_tokens.get(tier, 0) / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def label(self) -> str:
        return f"{self.cache} {self.policy}" if self.policy else self.cache

    @property
    def capacity_tokens(self) -> int | None:
        """Total capacity of the sweep point (tokens); ``None`` for the infinite cache."""
        return None if self.capacity is None else self.capacity.total * self.block_size

    @property
    def own_blocks(self) -> int | None:
        """Blocks this cache itself had (the GPU share alone has only the GPU's)."""
        if self.capacity is None:
            return None
        return self.capacity.gpu if self.cache == GPU_SHARE else self.capacity.total


Replayer = Callable[[Sequence[bytes], Sequence[bytes], int], dict[str, int]]


def split_capacity(total_blocks: int, factor: float) -> Capacity:
    """``total_blocks`` split GPU:host:disk = 1:3:30 (at least one GPU block)."""
    gpu = max(1, round(total_blocks * SPLIT[0] / sum(SPLIT)))
    host = round(total_blocks * SPLIT[1] / sum(SPLIT))
    return Capacity(factor, gpu, host, max(0, total_blocks - gpu - host))


def reference_blocks(workload: wl.Workload, full_mooncake: bool) -> tuple[int, int, int]:
    """The reference GPU, host and disk capacities of ``workload`` (blocks)."""
    bs = workload.block_size
    if full_mooncake:
        gpu, host, disk = (t // bs for t in MOONCAKE_REFERENCE_TOKENS)
        return gpu, host, disk
    ref = split_capacity(round(workload.distinct_blocks() * OTHER_REFERENCE_FRACTION), 1.0)
    return ref.gpu, ref.host, ref.disk


def sweep(workload: wl.Workload, factors: Sequence[float], full_mooncake: bool
          ) -> tuple[list[Capacity], float]:
    """The sweep's capacities and the smallest feasible factor.

    Each factor scales the reference capacities (:func:`reference_blocks`) keeping the
    1:3:30 split. A sequence must fit on the GPU (as in a serving engine), so a factor
    whose GPU share is smaller than the largest request is raised to the smallest factor
    whose share holds it; duplicates are dropped.
    """
    ref = reference_blocks(workload, full_mooncake)
    total = sum(ref)
    largest = max(len(r.keys) for r in workload.requests)
    f_min = largest * sum(SPLIT) / (SPLIT[0] * total)
    caps: dict[float, Capacity] = {}
    for f in sorted(factors):
        f = max(f, f_min)
        if f in caps:
            continue
        if full_mooncake:
            gpu, host, disk = (round(n * f) for n in ref)
            cap = Capacity(f, gpu, host, disk)
        else:
            cap = split_capacity(round(total * f), f)
        caps[f] = Capacity(f, max(cap.gpu, largest), cap.host, cap.disk)
    return list(caps.values()), f_min


def replay(workload: wl.Workload, replayer: Replayer, desc: str) -> tuple[dict[str, int], float]:
    """Replay every request; return hit tokens by tier and the wall time (seconds)."""
    hits: Counter[str] = Counter()
    t0 = time.perf_counter()
    for r in tqdm(workload.requests, desc=desc, unit="req", leave=False, mininterval=0.5):
        for tier, n in replayer(r.keys, r.blocks, r.prompt_tokens).items():
            hits[tier] += n
    return dict(hits), time.perf_counter() - t0


def _store_replayer(store: KVStore) -> Replayer:
    def run(keys: Sequence[bytes], blocks: Sequence[bytes], prompt_tokens: int
            ) -> dict[str, int]:
        return store.replay(keys, blocks, prompt_tokens).hit_tokens
    return run


def _store_counters(store: KVStore) -> dict[str, int]:
    st = store.stats()
    out = {f"evictions_{t}": n for t, n in st.evictions.items()}
    out.update({f"demotions_{t}": n for t, n in st.demotions.items()})
    return out


def run_workload(workload: wl.Workload, capacities: Sequence[Capacity],
                 policies: Sequence[str]) -> list[Row]:
    """Replay ``workload`` through every cache at every capacity (plus the infinite cache)."""
    name, bs, prompt = workload.name, workload.block_size, workload.prompt_tokens
    rows = []
    inf = InfiniteCache(bs)
    hits, secs = replay(workload, inf.replay, f"{name} {INFINITE}")
    rows.append(Row(name, INFINITE, "", None, bs, prompt, hits, secs))
    for cap in capacities:
        tag = f"{name} x{cap.factor:.3g}"
        for policy in policies:
            cfg = StoreConfig.simulation(block_size=bs, gpu_blocks=cap.gpu,
                                         host_blocks=cap.host, disk_blocks=cap.disk,
                                         policy=policy)  # type: ignore[arg-type]
            store = KVStore(cfg)
            hits, secs = replay(workload, _store_replayer(store), f"{tag} {policy}")
            rows.append(Row(name, TIERED, policy, cap, bs, prompt, hits, secs,
                            _store_counters(store)))
        for label, blocks in ((GPU_ONLY, cap.total), (GPU_SHARE, cap.gpu)):
            store = gpu_only_store(bs, blocks)
            hits, secs = replay(workload, _store_replayer(store), f"{tag} {label}")
            rows.append(Row(name, label, "", cap, bs, prompt, hits, secs,
                            _store_counters(store)))
        flat = FlatFIFOCache(bs, cap.total)
        hits, secs = replay(workload, flat.replay, f"{tag} {FLAT}")
        rows.append(Row(name, FLAT, "", cap, bs, prompt, hits, secs,
                        {"evictions_cache": flat.evictions}))
    return rows


def _fmt_tokens(n: int | None) -> str:
    if n is None:
        return "inf"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def format_table(rows: Sequence[Row]) -> str:
    """The results as a fixed-width text table (rates in %)."""
    inf = {r.workload: r.hit_rate for r in rows if r.cache == INFINITE}
    head = (f"{'workload':<10} {'x ref':>6} {'total cap':>9} {'blocks (gpu/host/disk)':>22} "
            f"{'cache':<24} {'hit %':>6} {'gpu %':>6} {'host %':>6} {'disk %':>6} "
            f"{'of inf':>7} {'time s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cap = r.capacity
        blocks = ("" if cap is None else f"{cap.gpu}/{cap.host}/{cap.disk}" if r.cache == TIERED
                  else f"{cap.gpu}" if r.cache == GPU_SHARE else f"{cap.total}")
        tiers = [f"{100 * r.tier_rate(t):6.2f}" if r.cache == TIERED else f"{'':>6}"
                 for t in ("gpu", "host", "disk")]
        ratio = r.hit_rate / inf[r.workload] if inf.get(r.workload) else 0.0
        lines.append(
            f"{r.workload:<10} {'' if cap is None else f'{cap.factor:.3g}':>6} "
            f"{_fmt_tokens(r.capacity_tokens):>9} {blocks:>22} {r.label:<24} "
            f"{100 * r.hit_rate:6.2f} {' '.join(tiers)} {100 * ratio:6.1f}% {r.seconds:7.2f}")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """One line per replay: capacities (blocks and tokens), hits by tier, rates, time."""
    inf = {r.workload: r.hit_rate for r in rows if r.cache == INFINITE}
    counter_keys = sorted({k for r in rows for k in r.counters})
    fields = ["workload", "cache", "policy", "factor", "block_size", "capacity_tokens",
              "cache_blocks", "gpu_blocks", "host_blocks", "disk_blocks", "prompt_tokens",
              "hit_tokens", "hit_rate", *(f"hit_rate_{t}" for t in TIERS),
              "fraction_of_infinite", "seconds", *counter_keys]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            cap = r.capacity
            row: dict[str, object] = {
                "workload": r.workload, "cache": r.cache, "policy": r.policy,
                "factor": "" if cap is None else cap.factor, "block_size": r.block_size,
                "capacity_tokens": "" if cap is None else cap.total * r.block_size,
                "cache_blocks": "" if cap is None else r.own_blocks,
                "gpu_blocks": "" if cap is None else cap.gpu,
                "host_blocks": "" if cap is None else cap.host,
                "disk_blocks": "" if cap is None else cap.disk,
                "prompt_tokens": r.prompt_tokens, "hit_tokens": r.hit,
                "hit_rate": f"{r.hit_rate:.6f}",
                "fraction_of_infinite": f"{r.hit_rate / inf[r.workload]:.6f}"
                if inf.get(r.workload) else "",
                "seconds": f"{r.seconds:.3f}",
            }
            for t in TIERS:
                row[f"hit_rate_{t}"] = f"{r.tier_rate(t):.6f}" if r.cache == TIERED else ""
            for k in counter_keys:
                row[k] = r.counters.get(k, "")
            w.writerow(row)


_STYLES = {
    f"{TIERED} write-back": dict(color="tab:blue", marker="o", linestyle="-"),
    f"{TIERED} write-through": dict(color="tab:cyan", marker="s", linestyle="--"),
    GPU_ONLY: dict(color="tab:orange", marker="^", linestyle="-."),
    FLAT: dict(color="tab:red", marker="v", linestyle=":"),
    GPU_SHARE: dict(color="tab:gray", marker="x", linestyle=":"),
}


def plot(rows: Sequence[Row], path: Path, reference: dict[str, int]) -> None:
    """Hit rate vs total capacity per cache (top) and the write-back store's per-tier
    split (bottom), one column per workload; ``reference`` marks each workload's
    reference capacity (tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 8.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for col, name in enumerate(names):
        ax, axt = axes[0][col], axes[1][col]
        mine = [r for r in rows if r.workload == name]
        for r in mine:
            if r.cache == INFINITE:
                ax.axhline(100 * r.hit_rate, color="black", linewidth=1, label=INFINITE)
        for label, style in _STYLES.items():
            pts = sorted((r.capacity_tokens, 100 * r.hit_rate) for r in mine
                         if r.label == label and r.capacity_tokens)
            if pts:
                ax.plot(*zip(*pts), label=label, **style)
        if name in reference:
            for a in (ax, axt):
                a.axvline(reference[name], color="gray", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_title(f"{name} ({mine[0].block_size}-token blocks)")
        ax.set_ylabel("hit rate (% of prompt tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        wb = sorted((r for r in mine if r.label == f"{TIERED} write-back"),
                    key=lambda r: r.capacity_tokens or 0)
        if wb:
            xs = [r.capacity_tokens for r in wb]
            axt.stackplot(xs, *[[100 * r.tier_rate(t) for r in wb] for t in ("gpu", "host",
                                                                          "disk")],
                          labels=["gpu", "host", "disk"],
                          colors=["tab:green", "tab:olive", "tab:brown"], alpha=0.8)
            axt.set_xscale("log")
            axt.legend(fontsize=8, loc="upper left")
        axt.set_title("write-back: hits by tier", fontsize=9)
        axt.set_xlabel("total cache capacity (tokens, log); dotted: reference")
        axt.set_ylabel("hit rate (%)")
        axt.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_targets(rows: Sequence[Row], mooncake_ref_factor: float | None) -> list[str]:
    """The issue's targets as PASS/FAIL lines (see the module docstring).

    Every tiered row is compared with flat FIFO and GPU-only LRU at the same total
    capacity (the issue's targets) and with its GPU share alone (what the lower tiers
    add); hit tokens are compared exactly.
    """
    out = []
    inf = {r.workload: r.hit_rate for r in rows if r.cache == INFINITE}
    if mooncake_ref_factor is not None and "mooncake" in inf:
        for r in rows:
            if (r.workload == "mooncake" and r.cache == TIERED and r.capacity is not None
                    and r.capacity.factor == mooncake_ref_factor):
                frac = r.hit_rate / inf["mooncake"]
                out.append(f"{'PASS' if frac >= 0.95 else 'FAIL'} mooncake GPU 1M + host 3M + "
                           f"disk 30M tokens, {r.policy}: {100 * r.hit_rate:.2f}% = "
                           f"{100 * frac:.1f}% of infinite {100 * inf['mooncake']:.2f}% "
                           "(target >= 95%)")
                out.append(f"{'PASS' if r.seconds < 30 else 'FAIL'} full Mooncake replay, "
                           f"{r.policy}, reference config: {r.seconds:.1f} s for "
                           f"{r.prompt_tokens:,} prompt tokens (target < 30 s on 2 cores; "
                           f"this machine has {os.cpu_count()} CPUs)")
    points: dict[tuple[str, float], dict[str, Row]] = {}
    for r in rows:
        if r.capacity is not None:
            points.setdefault((r.workload, r.capacity.factor), {})[r.label] = r
    for base in (FLAT, GPU_SHARE):
        for policy in POLICIES:
            label = f"{TIERED} {policy}"
            fails = []
            n = 0
            for (name, factor), point in points.items():
                r, b = point.get(label), point.get(base)
                if r is None or b is None:
                    continue
                n += 1
                if r.hit < b.hit:
                    fails.append(f"{name} x{factor:.3g} {100 * r.hit_rate:.3f}% < "
                                 f"{100 * b.hit_rate:.3f}%")
            if n:
                verdict = "PASS" if not fails else "FAIL"
                detail = f" at {n} of {n} points" if not fails else \
                    f" at {n - len(fails)} of {n} points; below at: " + "; ".join(fails)
                if base == FLAT and policy == "write-through" and fails:
                    # Inclusive by design: every block is also on disk, so the distinct
                    # blocks it can hold are the disk tier's, 30/34 of the total that
                    # flat FIFO gets. The target applies to the default, write-back.
                    verdict = "INFO"
                    detail += " (write-through is inclusive: its distinct capacity is " \
                              "the disk tier's, 30/34 of the total flat FIFO gets)"
                out.append(f"{verdict} {label} >= {base}{detail}")
    for policy in POLICIES:
        label = f"{TIERED} {policy}"
        gaps = [(100 * (point[GPU_ONLY].hit_rate - point[label].hit_rate), name, factor)
                for (name, factor), point in points.items()
                if label in point and GPU_ONLY in point]
        if gaps:
            gap, name, factor = max(gaps)
            out.append(f"INFO {label} vs {GPU_ONLY} (ideal bound): largest gap "
                       f"{max(gap, 0.0):.2f} points ({name} x{factor:.3g})")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore bench hit-rate",
        description="Cache hit rate of the tiered store (simulation mode) vs an infinite "
                    "cache, GPU-only leaf-first LRU and a flat FIFO block cache, over a "
                    "sweep of total capacities, on the Mooncake conversation trace, "
                    "multi-turn ShareGPT chats and a generated shared-prefix workload.",
        epilog="Capacity factors multiply a reference total capacity split GPU:host:disk = "
               "1:3:30: for the full Mooncake trace GPU 1M + host 3M + disk 30M tokens; "
               f"otherwise {OTHER_REFERENCE_FRACTION:g} x the workload's footprint "
               "(distinct full blocks). Outputs: a table on stdout, hit_rate.csv and "
               "hit_rate.png in --out.")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--capacities", default=None,
                   help="comma-separated capacity factors relative to the reference, e.g. "
                        "0.25,1,4 (default: 1/8..4 in powers of 2; --quick: 1/8,1,4); a "
                        "factor whose GPU share cannot hold the largest request is raised "
                        "to the smallest that can")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="comma-separated store policies (default: write-back,write-through)")
    p.add_argument("--quick", action="store_true",
                   help="small run: first 2000 trace requests, 200 conversations, 16x8 "
                        "generated prompts, 3 capacities")
    p.add_argument("--conversations", type=int, default=None,
                   help="ShareGPT conversations to replay (default 2000; --quick 200)")
    p.add_argument("--trace", type=Path, default=None,
                   help="Mooncake trace JSONL (default: ../shared/data beside the repo)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of arrival times and generated tokens (default 0)")
    p.add_argument("--out", type=Path, default=Path("bench_out/hit_rate"),
                   help="output directory for the CSV and PNG (default ./bench_out/hit_rate)")
    return p


def _parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"kvstore bench hit-rate: unknown {what} {bad or text!r}; "
                         f"choose from {', '.join(allowed)}")
    return items


def load_workload(name: str, args: argparse.Namespace) -> wl.Workload:
    """Build workload ``name`` with the command line's sizes."""
    if name == "mooncake":
        return wl.mooncake_workload(args.trace, limit=2000 if args.quick else None)
    if name == "sharegpt":
        n = args.conversations or (200 if args.quick else 2000)
        return wl.sharegpt_workload(n, seed=args.seed, progress=True)
    if args.quick:
        return wl.generated_shared_prefix_workload(16, 8, seed=args.seed)
    return wl.generated_shared_prefix_workload(seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = _parse_list(args.workloads, WORKLOADS, "workload")
    policies = _parse_list(args.policies, POLICIES, "policy")
    if args.capacities:
        try:
            factors = [float(s) for s in args.capacities.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"kvstore bench hit-rate: --capacities takes numbers, got "
                             f"{args.capacities!r}") from None
        if not factors or min(factors) <= 0:
            raise SystemExit("kvstore bench hit-rate: capacity factors must be positive")
    else:
        factors = list(QUICK_FACTORS if args.quick else DEFAULT_FACTORS)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    reference: dict[str, int] = {}
    mooncake_ref: float | None = None
    for name in names:
        t0 = time.perf_counter()
        try:
            workload = load_workload(name, args)
        except FileNotFoundError as exc:
            print(f"kvstore bench hit-rate: {exc}", file=sys.stderr)
            return 2
        loaded = time.perf_counter() - t0
        full_mooncake = name == "mooncake" and not args.quick
        caps, f_min = sweep(workload, factors, full_mooncake)
        reference[name] = sum(reference_blocks(workload, full_mooncake)) * workload.block_size
        if full_mooncake and any(c.factor == 1.0 for c in caps):
            mooncake_ref = 1.0
        print(f"{name}: {workload.description}; {len(workload.requests):,} requests, "
              f"{workload.prompt_tokens:,} prompt tokens, footprint "
              f"{workload.distinct_blocks():,} blocks; reference capacity "
              f"{_fmt_tokens(reference[name])} tokens; loaded in {loaded:.1f} s", flush=True)
        if min(factors) < f_min:
            print(f"  factors below {f_min:.3g} raised to {f_min:.3g}: the GPU share must hold "
                  "the largest request", flush=True)
        rows += run_workload(workload, caps, policies)
    table = format_table(rows)
    print()
    print(table)
    csv_path, png_path = args.out / "hit_rate.csv", args.out / "hit_rate.png"
    write_csv(rows, csv_path)
    plot(rows, png_path, reference)
    print()
    for line in check_targets(rows, mooncake_ref):
        print(line)
    print(f"\nwrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory-pressure benchmark: a closed loop of multi-turn clients over a small GPU KV pool.

Run: ``kvstore bench pressure`` (``--help``). ``--clients`` clients each run ``--rounds``
rounds; a round's prompt is the client's whole history (previous prompts and replies)
plus ``--new-tokens`` new random tokens, and generates ``--output-tokens`` tokens (EOS
ignored). A client sends its next round as soon as its previous one finished. The live
KV outgrows the GPU pool (``--gpu-kv-bytes``), which is where a tiered store earns its
keep. One invocation runs, on the same model and workload:

- ``off``: prefix reuse off (every prompt computed in full), the baseline;
- ``gpu``: prefix reuse from the GPU pool only;
- ``host``: the GPU pool plus a host DRAM tier (``--host-bytes``).

Per configuration it prints wall time, TTFT p50/p90, requests/s, preemptions per
request, store lookups and tokens looked up but missed, and the tokens fed through the
model ("computed", counted at the model runner) next to the tokens that had to be
computed at least once ("needed": prompt tokens no tier served plus the generated
tokens fed back); then each configuration's throughput and TTFT p90 against its
baseline in the same run.

On CUDA the defaults are the Llama-3-8B shape with random bf16 weights (throughput does
not depend on weight values), 32 clients x 6 rounds x 1,000 new tokens, 32 output
tokens, 8 GB of GPU KV and 24 GB of host KV. On CPU: SmolLM2 (real weights, float32) on
a tiny workload and pool.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.device import bench_device
from kvstore.args import SIZE_HELP, add_device_argument, count_arg, size_arg
from kvstore.units import parse_size

CONFIGS = ("off", "gpu", "host")
LABELS = {"off": "cache off", "gpu": "GPU only", "host": "GPU + host"}


@dataclass(frozen=True)
class Workload:
    """The closed loop's shape (tokens, clients, rounds)."""

    clients: int
    rounds: int
    new_tokens: int
    output_tokens: int
    seed: int

    def new(self, client: int, round_: int, vocab: int) -> list[int]:
        """The new tokens of ``client``'s round ``round_`` (deterministic)."""
        rng = random.Random(self.seed * 1_000_003 + client * 1009 + round_)
        return [rng.randrange(10, vocab) for _ in range(self.new_tokens)]


@dataclass(frozen=True)
class Result:
    """One configuration's run (seconds, tokens, counts)."""

    name: str
    wall_s: float
    ttft_s: list[float]
    requests: int
    preemptions: int
    lookups: int
    missed_tokens: int
    computed_tokens: int
    needed_tokens: int
    prompt_tokens: int
    hit_tokens: dict[str, int]
    resumed_tokens: dict[str, int]
    recomputed_tokens: int | None  # the engine's own count (None: engine without stats)

    @property
    def req_per_s(self) -> float:
        return self.requests / self.wall_s

    def ttft_ms(self, q: float) -> float:
        xs = sorted(self.ttft_s)
        return 1e3 * xs[min(len(xs) - 1, int(q * len(xs)))]


def _model(args: argparse.Namespace, dev: torch.device):
    """(model, name) for the run: random weights of a named shape, or SmolLM2's own."""
    if args.weights == "random":
        from bench.engine_bench import _random_model

        model, _ = _random_model(args.model, dev)
        return model
    from engine.loader import resolve_model
    from engine.model import CausalLM

    assert args.model == "smollm2", "main() refuses --weights real for other shapes"
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    loaded = resolve_model("smollm2", cache_dir=args.model_cache_dir, dtype=dtype, device=dev)
    return CausalLM.from_loaded(loaded, device=dev)


def _engine(model, config: str, args: argparse.Namespace):
    from engine.engine import Engine
    from engine.scheduler import SchedulerConfig
    from kvstore.config import StoreConfig
    from kvstore.store import KVStore
    from radix import Namespace
    from tiers.layout import KVLayout

    mc = model.config
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16",
             torch.float32: "float32"}[model.dtype]
    layout = KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, 16, dtype)
    gpu_blocks = args.gpu_kv_bytes // layout.block_bytes
    host_blocks = args.host_bytes // layout.block_bytes if config == "host" else 0
    store = KVStore(StoreConfig(layout=layout, gpu_blocks=gpu_blocks, host_blocks=host_blocks,
                                device=str(model.device)))
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            enable_cache=config != "off")
    return Engine(model, None, store, Namespace(f"pressure-{config}", dtype, 16), frozenset(),
                  sched)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_config(model, config: str, wl: Workload, args: argparse.Namespace) -> Result:
    """Run the closed loop once on a fresh engine and store."""
    from tqdm import tqdm

    from engine.sampling import SamplingParams

    engine = _engine(model, config, args)
    dev = model.device
    vocab = model.config.vocab_size
    params = SamplingParams(max_tokens=wl.output_tokens, ignore_eos=True)
    runner = engine.runner
    if dev.type == "cuda":
        runner.capture()  # CUDA graphs up front, outside the timed loop
    # Warm-up (kernel compilation): one short request, its blocks dropped afterwards.
    engine.add_request("warm", [11] * 64, SamplingParams(max_tokens=2, ignore_eos=True))
    for _ in engine.run():
        pass
    engine.store.drop("gpu")
    fed = [0]
    run = runner.run

    def counted(ids, *a, **kw):  # tokens fed through the model, whatever the engine counts
        fed[0] += len(ids)
        return run(ids, *a, **kw)

    runner.run = counted  # type: ignore[method-assign]
    before = engine.store.stats()
    stats0 = engine.stats() if hasattr(engine, "stats") else None
    history: list[list[int]] = [[] for _ in range(wl.clients)]
    rounds = [0] * wl.clients
    ttft: list[float] = []
    preempt = needed = prompt_tokens = 0
    hits: dict[str, int] = {}
    resumed: dict[str, int] = {}

    def submit(c: int) -> None:
        prompt = history[c] + wl.new(c, rounds[c], vocab)
        history[c] = prompt
        engine.add_request(f"c{c}-r{rounds[c]}", prompt, params)

    total = wl.clients * wl.rounds
    bar = tqdm(total=total, desc=LABELS[config], unit="req", leave=False, file=sys.stderr)
    _sync(dev)
    t0 = time.perf_counter()
    for c in range(wl.clients):
        submit(c)
    while engine.has_unfinished:
        for out in engine.step():
            if not out.finished:
                continue
            c = int(out.request_id[1:].split("-")[0])
            bar.update(1)
            assert out.ttft_s is not None
            ttft.append(out.ttft_s)
            preempt += getattr(out, "preemptions", 0)
            cached = out.num_cached_tokens
            for t, n in out.cached_tokens.items():
                hits[t] = hits.get(t, 0) + n
            for t, n in getattr(out, "resumed_tokens", {}).items():
                resumed[t] = resumed.get(t, 0) + n
            prompt_tokens += out.prompt_tokens
            needed += out.prompt_tokens - cached + len(out.token_ids) - 1
            history[c] = history[c] + out.token_ids
            rounds[c] += 1
            if rounds[c] < wl.rounds:
                submit(c)
    _sync(dev)
    wall = time.perf_counter() - t0
    bar.close()
    after = engine.store.stats()
    recomputed = None
    if stats0 is not None:
        s = engine.stats()
        preempt = s.preemptions - stats0.preemptions
        recomputed = s.recomputed_tokens - stats0.recomputed_tokens
    else:  # an engine without per-request accounting: its scheduler's count
        preempt = engine.scheduler.preemptions
    engine.store.check_integrity()
    engine.store.close()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return Result(LABELS[config], wall, ttft, total, preempt, after.lookups - before.lookups,
                  after.miss_tokens - before.miss_tokens, fed[0], needed, prompt_tokens, hits,
                  resumed, recomputed)


def _tokens(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e4:
        return f"{n / 1e3:.0f} k"
    return f"{n:.0f}"


def print_table(results: list[Result]) -> None:
    head = (f"{'configuration':<12} {'wall s':>7} {'TTFT p50/p90 ms':>17} {'req/s':>6} "
            f"{'preempt/req':>11} {'lookups':>8} {'missed':>8} {'computed':>9} "
            f"{'needed':>8} {'ratio':>6}  served from tiers / resumed (tokens)")
    print(head)
    for r in results:
        ttft = f"{r.ttft_ms(0.5):,.0f} / {r.ttft_ms(0.9):,.0f}"
        served = ", ".join(f"{t} {_tokens(n)}" for t, n in sorted(r.hit_tokens.items())) or "-"
        res = ", ".join(f"{t} {_tokens(n)}" for t, n in sorted(r.resumed_tokens.items())) or "-"
        print(f"{r.name:<12} {r.wall_s:7.1f} {ttft:>17} {r.req_per_s:6.2f} "
              f"{r.preemptions / r.requests:11.2f} {r.lookups:8,d} {_tokens(r.missed_tokens):>8} "
              f"{_tokens(r.computed_tokens):>9} {_tokens(r.needed_tokens):>8} "
              f"{r.computed_tokens / max(1, r.needed_tokens):5.2f}x  {served} / {res}")
    by = {r.name: r for r in results}
    pairs = [("GPU only", "cache off"), ("GPU + host", "GPU only"), ("GPU + host", "cache off")]
    lines = []
    for a, b in pairs:
        if a in by and b in by:
            ra, rb = by[a], by[b]
            lines.append(f"{a} vs {b}: throughput {ra.req_per_s / rb.req_per_s:.2f}x, "
                         f"TTFT p90 {ra.ttft_ms(0.9) / rb.ttft_ms(0.9):.2f}x")
    if lines:
        print("\n".join(["", "Same run, each against its baseline:"] + lines))
    print("\nratio = computed / needed (1.00x: nothing computed twice). computed = tokens fed "
          "through the model; needed = prompt tokens no tier served + generated tokens fed back.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore bench pressure",
        description="Closed-loop multi-turn clients over a GPU KV pool smaller than the live "
                    "KV: cache off vs GPU only vs GPU + host tier, in one run. Defaults depend "
                    "on the device (CUDA: the Llama-3-8B workload of the scheduling issue; "
                    "CPU: SmolLM2, tiny).")
    add_device_argument(p)
    p.add_argument("--model", choices=["smollm2", "llama3-8b"], default=None,
                   help="model shape (default: llama3-8b on CUDA, smollm2 on CPU)")
    p.add_argument("--weights", choices=["random", "real"], default=None,
                   help="random weights of the shape, or SmolLM2's real weights "
                        "(default: random on CUDA, real on CPU for smollm2; random for "
                        "shapes without real weights)")
    p.add_argument("--clients", type=count_arg(1), default=None,
                   help="concurrent clients (default: 32 on CUDA, 4 on CPU)")
    p.add_argument("--rounds", type=count_arg(1), default=None,
                   help="rounds per client (default: 6 on CUDA, 3 on CPU)")
    p.add_argument("--new-tokens", type=count_arg(1), default=None,
                   help="new tokens appended to the history each round (default: 1000 on "
                        "CUDA, 96 on CPU)")
    p.add_argument("--output-tokens", type=count_arg(1), default=None,
                   help="tokens generated each round (default: 32 on CUDA, 8 on CPU)")
    p.add_argument("--gpu-kv-bytes", type=size_arg, default=None, metavar="SIZE",
                   help="KV pool on the device (default: 8GB on CUDA, 24MB on CPU)")
    p.add_argument("--host-bytes", type=size_arg, default=None, metavar="SIZE",
                   help="host DRAM tier of the 'host' configuration (default: 24GB on CUDA, "
                        "64MB on CPU)")
    p.add_argument("--configs", nargs="+", default=[",".join(CONFIGS)],
                   metavar="CONFIG[,CONFIG]",
                   help="configurations to run, comma-separated (or separated by spaces): "
                        "off (cache off), gpu, host (default: all)")
    p.add_argument("--max-num-seqs", type=count_arg(1), default=None,
                   help="scheduler batch limit in sequences (default: --clients)")
    p.add_argument("--max-num-batched-tokens", type=count_arg(1), default=None,
                   help="scheduler token budget per step (default: 8192 on CUDA, 256 on CPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the new tokens (default: %(default)s)")
    p.add_argument("--model-cache-dir", default=None, help=argparse.SUPPRESS)
    p.epilog = SIZE_HELP + "."
    return p


def _configs(p: argparse.ArgumentParser, given: Sequence[str]) -> list[str]:
    """``--configs`` (``off,gpu``, ``off gpu`` or both) as a list without repeats;
    ``p.error`` on an unknown one."""
    names = [c.strip() for text in given for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names:
        p.error(f"--configs: unknown {bad or 'empty list'}; choose from {', '.join(CONFIGS)}")
    return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    dev = bench_device(p, args.device)
    on_gpu = dev.type == "cuda"
    args.configs = _configs(p, args.configs)
    model_name = args.model or ("llama3-8b" if on_gpu else "smollm2")
    if args.weights == "real" and model_name != "smollm2":
        p.error(f"--weights real is available for smollm2 only (no model hub): use "
                f"--weights random for {model_name}")
    if args.weights is None and not on_gpu and model_name != "smollm2":
        print(f"note: {model_name} has no real weights here: random weights of its shape "
              "(--weights random)", flush=True)
    defaults = dict(model=model_name,
                    weights="random" if on_gpu or model_name != "smollm2" else "real",
                    clients=32 if on_gpu else 4, rounds=6 if on_gpu else 3,
                    new_tokens=1000 if on_gpu else 96, output_tokens=32 if on_gpu else 8,
                    gpu_kv_bytes=parse_size("8GB" if on_gpu else "24MB"),
                    host_bytes=parse_size("24GB" if on_gpu else "64MB"),
                    max_num_batched_tokens=8192 if on_gpu else 256)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.max_num_seqs is None:
        args.max_num_seqs = args.clients
    wl = Workload(args.clients, args.rounds, args.new_tokens, args.output_tokens, args.seed)
    model = _model(args, dev)
    from tiers.layout import KVLayout

    mc = model.config
    dtype = str(model.dtype).removeprefix("torch.")
    block = KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, 16, dtype).block_bytes
    longest = wl.rounds * (wl.new_tokens + wl.output_tokens)
    if longest >= mc.max_context_len:
        p.error(f"the last round's prompt ({longest} tokens) exceeds the model's context "
                f"({mc.max_context_len}); lower --rounds or --new-tokens")
    if args.gpu_kv_bytes // block < 1:
        p.error(f"--gpu-kv-bytes holds no block (one block is {block} bytes)")
    final_kv = wl.clients * longest * block // 16
    print(f"{args.model} ({args.weights} weights, {dtype}) on {dev.type}: {wl.clients} clients x "
          f"{wl.rounds} rounds, {wl.new_tokens} new tokens a round, {wl.output_tokens} output "
          f"tokens; GPU KV {args.gpu_kv_bytes / 1e9:.3g} GB ({args.gpu_kv_bytes // block} blocks), host "
          f"{args.host_bytes / 1e9:.3g} GB ({args.host_bytes // block} blocks); live KV at the end "
          f"{final_kv / 1e9:.3g} GB")
    results = [run_config(model, c, wl, args) for c in args.configs]
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

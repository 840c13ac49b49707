"""Validation of ``kvstore plan``: its predictions next to the engine's measurements.

Run: ``python -m kvstore bench plan`` (``--help``). For each model (random bf16 weights
of the real shape, built as in :mod:`bench.engine_bench`), on the local device:

1. the device's ceilings are measured (:func:`kvstore.plan.measure_device`) and the plan
   is made for them, with the plan's default efficiencies;
2. **KV pool**: on CUDA the pool the engine can have is sized from the memory actually
   free once the weights are loaded (``total x utilization - used - the plan's
   activation reserve``), next to the plan's pool; on CPU (or with ``--gpu-kv-bytes``) both use that pool;
3. **largest batch**: sequences of ``--context`` tokens allocated in the engine's store
   until it is out of blocks; then one decode step of that batch runs (proving it fits in
   memory) and is timed;
4. **TTFT**: a ``--context``-token prompt through the engine (prefix reuse off), median
   of ``--repeat``;
5. **decode step** at batch 1 and ``--batch``: requests prefilled to ``--context``
   tokens, then the mean of ``--steps`` engine steps.

Prints one table per model: plan, measured, plan / measured; the efficiencies and floors
the plan assumed; and what the measurements imply (whole-step efficiencies, the time a
layer, and the attention's bandwidth efficiency once the plan's other kernels are taken
off the decode step), to calibrate the constants of :mod:`kvstore.plan`. The issue's
target is every ratio within 0.8-1.2 on the H200.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.device import bench_device
from bench.engine_bench import _random_model, model_list
from kvstore import plan as kp
from kvstore.args import SIZE_HELP, add_device_argument, count_arg, size_arg

CPU_POOL_BLOCKS = 256
"""KV pool blocks on CPU without ``--gpu-kv-bytes`` (free memory is not measured there)."""


@dataclass(frozen=True)
class Row:
    """One compared quantity (``unit``: ``blocks``, ``seqs`` or ``s``)."""

    quantity: str
    unit: str
    plan: float
    measured: float

    @property
    def ratio(self) -> float:
        return self.plan / self.measured if self.measured else float("inf")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _engine(model, name: str, gpu_blocks: int, max_num_seqs: int, chunk: int, dtype: str):
    from engine.engine import Engine
    from engine.scheduler import SchedulerConfig
    from kvstore.config import StoreConfig
    from kvstore.store import KVStore
    from radix import Namespace
    from tiers.layout import KVLayout

    mc = model.config
    layout = KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, kp.BLOCK_SIZE, dtype)
    store = KVStore(StoreConfig(layout=layout, gpu_blocks=gpu_blocks,
                                device=str(model.device)))
    return Engine(model, None, store, Namespace(f"plan-bench-{name}", dtype, kp.BLOCK_SIZE),
                  frozenset(),
                  SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=chunk,
                                  enable_cache=False))


def _prompt(i: int, n: int, vocab: int) -> list[int]:
    """A distinct ``n``-token prompt (distinct first token: no prefix sharing)."""
    return [(i * 7919 + j * 31 + 1) % vocab for j in range(n)]


def _params(max_tokens: int):
    from engine.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def measure_ttft(engine, context: int, repeat: int) -> float:
    """Median seconds from arrival to first token of a ``context``-token prompt."""
    vocab = engine.model.config.vocab_size
    times = []
    for i in range(repeat + 1):  # the first one warms up kernels and the allocator
        engine.add_request(f"ttft-{i}", _prompt(10_000 + i, context, vocab), _params(1))
        outs = [out for out in engine.run() if out.finished]
        assert len(outs) == 1 and outs[0].ttft_s is not None
        if i:
            times.append(outs[0].ttft_s)
    return statistics.median(times)


def measure_decode(engine, batch: int, context: int, steps: int) -> float:
    """Mean seconds of one engine step of ``batch`` sequences decoding at ``context``."""
    vocab = engine.model.config.vocab_size
    dev = engine.model.device
    prompt = max(1, context - 1)
    for i in range(batch):
        engine.add_request(f"dec-{batch}-{i}", _prompt(i, prompt, vocab),
                           _params(2 * steps + 8))
    sched = engine.scheduler
    while sched.waiting or sched.loading or any(s.in_prefill for s in sched.running):
        engine.step()
    for _ in range(3):  # graph capture / warm-up of this batch size
        engine.step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(dev)
    elapsed = (time.perf_counter() - t0) / steps
    for rid in list(engine._requests):
        engine.abort(rid)
    return elapsed


def measure_largest_batch(engine, context: int) -> tuple[int, float]:
    """Sequences of ``context`` tokens the store holds at once (allocated until it is out
    of blocks), and the seconds of one decode step over all of them."""
    from kvstore.store import Lease, OutOfBlocks
    from radix import hash_blocks

    store = engine.store
    vocab = engine.model.config.vocab_size
    leases: list[Lease] = []
    while True:
        chain = hash_blocks(engine.root, _prompt(50_000 + len(leases), 16, vocab),
                            store.block_size)
        lease = store.acquire(store.match(chain, max_blocks=0))
        if isinstance(store.allocate(lease, context), OutOfBlocks):
            store.release(lease)
            break
        leases.append(lease)
    n = len(leases)
    seconds = float("nan")
    if n:
        runner = engine.runner
        ids = [1] * n
        tables = [lease.slots for lease in leases]
        dev = engine.model.device
        runner.run(ids, tables, [1] * n, [context] * n)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        runner.run(ids, tables, [1] * n, [context] * n)
        _sync(dev)
        seconds = time.perf_counter() - t0
    for lease in leases:
        store.release(lease)
    return n, seconds


def bench_model(name: str, args: argparse.Namespace, dev: torch.device,
                spec: kp.GPUSpec) -> tuple[kp.Plan, list[Row], dict[str, float]]:
    """Plan and measurements of one model (see the module docstring)."""
    model, _ = _random_model(name, dev)
    dtype = "bfloat16"
    if dev.type == "cpu":  # bf16 GEMMs are slow on CPU: the CPU run is fp32
        model = model.float()
        dtype = "float32"
        # random norm weights (~0.02) shrink activations to denormals, which x86
        # computes slowly: norms at 1, as a trained model's are about
        from engine.model import RMSNorm

        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
    cfg = model.config
    util = args.memory_utilization
    chunk = args.chunk
    plan = kp.make_plan(name, cfg, dtype, args.context, args.batch, spec,
                        utilization=util, chunk=chunk)
    if args.gpu_kv_bytes is not None:
        measured_blocks = planned_blocks = max(1, args.gpu_kv_bytes
                                               // plan.size.kv_bytes_per_block)
    elif dev.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        pool_bytes = int(total * util) - (total - free) - plan.memory.activations
        measured_blocks = max(1, pool_bytes // plan.size.kv_bytes_per_block)
        planned_blocks = plan.memory.kv_pool_blocks
    else:
        measured_blocks = planned_blocks = CPU_POOL_BLOCKS
    planned_batch = planned_blocks // plan.memory.blocks_per_sequence
    engine = _engine(model, name, measured_blocks, max(args.batch, 64), chunk, dtype)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    largest, largest_s = measure_largest_batch(engine, args.context)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    ttft = measure_ttft(engine, args.context, args.repeat)
    d1 = measure_decode(engine, 1, args.context, args.steps)
    db = measure_decode(engine, args.batch, args.context, args.steps)
    size = plan.size
    p_largest = kp.decode_roofline(cfg, size, spec, max(1, planned_batch), args.context,
                                   plan.efficiency)
    rows = [
        Row("KV pool", "blocks", planned_blocks, measured_blocks),
        Row(f"largest batch at {args.context} tokens", "seqs", planned_batch, largest),
        Row(f"TTFT, {args.context}-token prompt", "s", plan.prefill.seconds, ttft),
        Row("decode step, batch 1", "s", plan.decode_one.seconds, d1),
        Row(f"decode step, batch {args.batch}", "s", plan.decode_batch.seconds, db),
        Row(f"decode step, batch {largest} (largest)", "s", p_largest.seconds, largest_s),
    ]
    implied = {
        "prefill FLOP/s efficiency (whole step)": plan.prefill.flops / (ttft * spec.flops),
        "decode bandwidth efficiency, batch 1 (whole step)":
            plan.decode_one.bytes / (d1 * spec.bandwidth),
        f"decode bandwidth efficiency, batch {args.batch} (whole step)":
            plan.decode_batch.bytes / (db * spec.bandwidth),
        "decode step per layer, batch 1 (s)": d1 / cfg.num_layers,
        "prefill per layer (s)": ttft / cfg.num_layers,
    }
    # the attention efficiency the decode step implies: its time less the plan's other
    # kernels, against the KV the attention reads
    kernels = kp.step_kernels(cfg, size, spec, args.batch, 1, args.context - 1, True,
                              plan.efficiency)
    attention = next(k for k in kernels if k.name == "paged attention")
    rest = sum(k.seconds for k in kernels) - attention.seconds
    if db > rest:
        implied[f"attention bandwidth efficiency, batch {args.batch}"] = (
            attention.bytes / ((db - rest) * spec.bandwidth))
    if dev.type == "cuda":
        implied["peak memory allocated / plan budget"] = peak / plan.memory.usable
    engine.store.close()
    del engine, model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return plan, rows, implied


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.3f} ms"
    return f"{value:,.0f}"


def format_rows(name: str, rows: Sequence[Row]) -> str:
    lines = [f"{'[' + name + ']':<40} {'plan':>14} {'measured':>14} {'plan/meas':>10}"]
    for r in rows:
        lines.append(f"{r.quantity:<40} {_fmt(r.plan, r.unit):>14} "
                     f"{_fmt(r.measured, r.unit):>14} {r.ratio:>9.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore bench plan",
        description="kvstore plan's predictions (KV pool, largest batch, TTFT, decode step) "
                    "next to the engine's measurements on this device, for random-weight "
                    "models of real shapes.")
    p.add_argument("--models", type=model_list, default=None, metavar="M1,M2",
                   help="model shapes, comma-separated (default: smollm2,llama3-8b on "
                        "CUDA, smollm2 on CPU)")
    add_device_argument(p)
    p.add_argument("--context", type=count_arg(1), default=None,
                   help="tokens per sequence (default: 2048 on CUDA, 64 on CPU)")
    p.add_argument("--batch", type=count_arg(1), default=None,
                   help="the larger decode batch (default: 64 on CUDA, 4 on CPU)")
    p.add_argument("--steps", type=count_arg(1), default=20,
                   help="decode steps timed (default: %(default)s)")
    p.add_argument("--repeat", type=count_arg(1), default=3,
                   help="TTFT prompts (median; default: %(default)s)")
    p.add_argument("--chunk", type=count_arg(1), default=kp.MAX_NUM_BATCHED_TOKENS,
                   help="prefill chunk, tokens a step (default: %(default)s)")
    p.add_argument("--memory-utilization", type=float, default=kp.MEMORY_UTILIZATION,
                   help="fraction of GPU memory for the engine (default: %(default)s)")
    p.add_argument("--gpu-kv-bytes", type=size_arg, default=None, metavar="SIZE",
                   help="KV pool on the device, for both the plan and the engine (default: "
                        f"on CUDA sized from the free memory; on CPU {CPU_POOL_BLOCKS} "
                        "blocks)")
    p.add_argument("--gpu", default=None,
                   help="plan with this table GPU instead of the measured ceilings "
                        "(default: none)")
    p.epilog = SIZE_HELP + "."
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    dev = bench_device(p, args.device)
    on_gpu = dev.type == "cuda"
    args.models = args.models or (["smollm2", "llama3-8b"] if on_gpu else ["smollm2"])
    if args.context is None:
        args.context = 2048 if on_gpu else 64
    if args.batch is None:
        args.batch = 64 if on_gpu else 4
    try:
        spec = kp.resolve_gpu(args.gpu) if args.gpu else kp.measure_device(str(dev))
    except kp.PlanError as exc:
        p.error(str(exc))
    print(f"device {spec.name} ({spec.source}): {spec.bandwidth / 1e9:.0f} GB/s, "
          f"{spec.flops / 1e12:.2f} TFLOP/s, {spec.memory_bytes / 2**30:.1f} GiB; context "
          f"{args.context} tokens, prefill chunk {args.chunk}", flush=True)
    for name in args.models:
        t0 = time.perf_counter()
        try:
            plan, rows, implied = bench_model(name, args, dev, spec)
        except kp.PlanError as exc:
            print(f"kvstore bench plan: {name}: {exc}", file=sys.stderr)
            return 2
        print()
        print(format_rows(name, rows))
        e = plan.efficiency
        print(f"  plan assumed: {kp.format_assumptions(e)}; measurements imply:")
        for key, value in implied.items():
            shown = f"{value * 1e6:.1f} us" if key.endswith("(s)") else f"{value:.2f}"
            print(f"    {key}: {shown}")
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

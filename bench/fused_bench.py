"""Fused elementwise kernels (engine/fused.py) next to the torch formulas they replace.

Run: ``kvstore bench fused`` (``--help``). Needs a CUDA device and triton. Two
parts, both with the fused kernels and the torch formulas in the same run:

1. ops: add + RMSNorm, RoPE + K/V write and SiLU * up at a model's shape (default
   Llama-3-8B) for several token counts. Each is timed as CUDA-graph replays with events
   (median of ``--iters``); the bytes column counts what the fused kernel must move (each
   input read once, each output written once). Inputs stay L2-resident at small token
   counts, as they are in the model right after the matmul that wrote them.
2. step: the whole model (random weights, bf16, Triton attention): CUDA kernels one eager
   decode step launches (torch profiler), the decode step's GPU time from CUDA-graph
   replays for each ``--batches`` at ``--context`` tokens, and the host wall time of one
   eager ``--prefill``-token chunk after a cached prefix of ``--context`` tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from bench.attention_bench import time_calls
from kvstore.args import add_out_argument, plain_text

BLOCK_SIZE = 16


def op_cases(name: str, tokens: int, device: torch.device, dtype: torch.dtype,
             write_kv: Callable) -> list[tuple[str, int, Callable[[], object],
                                                Callable[[], object]]]:
    """``(op, fused bytes, fused call, torch call)`` for each op at model ``name``'s shape."""
    from engine import fused
    from engine.config import NAMED_SHAPES, ModelConfig

    c = ModelConfig.from_hf_dict(NAMED_SHAPES[name])
    es = torch.tensor([], dtype=dtype).element_size()
    h, inter = c.hidden_size, c.intermediate_size
    heads, kvh, hd = c.num_heads, c.num_kv_heads, c.head_dim
    x = torch.randn(tokens, h, device=device, dtype=dtype)
    res = torch.randn_like(x)
    w = torch.randn(h, device=device, dtype=dtype)
    gate_up = torch.randn(tokens, 2 * inter, device=device, dtype=dtype)
    qkv = torch.randn(tokens, (heads + 2 * kvh) * hd, device=device, dtype=dtype)
    angles = torch.rand(tokens, hd // 2, device=device).repeat(1, 2) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = tokens // BLOCK_SIZE + 2
    pool = torch.zeros(slots, 2, 2, BLOCK_SIZE, kvh, hd, device=device, dtype=dtype)
    slot_mapping = torch.randperm(slots * BLOCK_SIZE, device=device)[:tokens]
    kc, vc = pool[:, 1, 0], pool[:, 1, 1]
    eps = c.rms_norm_eps
    return [
        ("add_rms_norm", (4 * tokens + 1) * h * es,
         lambda: fused.add_rms_norm_triton(x, res, w, eps),
         lambda: fused.add_rms_norm_reference(x, res, w, eps)),
        ("rope_write_kv", tokens * (2 * (heads + 2 * kvh) * hd + hd) * es,
         lambda: fused.rope_write_kv_triton(qkv, cos, sin, kc, vc, slot_mapping, heads, kvh),
         lambda: fused.rope_write_kv_reference(qkv, cos, sin, kc, vc, slot_mapping, heads, kvh,
                                               write_kv)),
        ("silu_mul", 3 * tokens * inter * es,
         lambda: fused.silu_mul_triton(gate_up),
         lambda: fused.silu_mul_reference(gate_up)),
    ]


def bench_ops(args: argparse.Namespace, device: torch.device, log: list[dict]) -> None:
    from engine import triton_attention

    print(f"{'op':<14} {'tokens':>6} {'fused us':>9} {'torch us':>9} {'speed-up':>8} "
          f"{'MB':>8} {'fused GB/s':>10}")
    for tokens in args.tokens:
        for op, nbytes, ours, ref in op_cases(args.shape, tokens, device, torch.bfloat16,
                                              triton_attention.write_kv):
            t_ours = time_calls([ours], args.iters) * 1e3
            t_ref = time_calls([ref], args.iters) * 1e3
            gbs = nbytes / (t_ours * 1e-6) / 1e9
            print(f"{op:<14} {tokens:>6} {t_ours:>9.2f} {t_ref:>9.2f} {t_ref / t_ours:>8.2f} "
                  f"{nbytes / 1e6:>8.2f} {gbs:>10.0f}", flush=True)
            log.append({"kind": "op", "op": op, "tokens": tokens, "fused_us": t_ours,
                        "torch_us": t_ref, "bytes": nbytes})


def count_kernels(fn: Callable[[], object]) -> tuple[int, int]:
    """``(kernels, of which matmuls)`` launched on the GPU by one eager call of ``fn``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    names = [n for n in names if not n.startswith(("Memcpy", "Memset"))]
    gemm = sum(any(k in n.lower() for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas"))
               for n in names)
    return len(names), gemm


def graph_ms(fn: Callable[[], object], iters: int) -> float:
    """Median GPU ms of one replay of ``fn`` captured in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def eager_ms(fn: Callable[[], object], iters: int) -> tuple[float, float]:
    """``(host wall ms, GPU ms)`` medians of eager calls of ``fn``, each synchronized."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    wall, gpu = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        end.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        gpu.append(start.elapsed_time(end))
    return statistics.median(wall), statistics.median(gpu)


def bench_step(args: argparse.Namespace, device: torch.device, log: list[dict]) -> None:
    from engine.batch import build_batch
    from engine.loader import dummy_model
    from engine.model import CausalLM

    loaded = dummy_model(args.shape, dtype=torch.bfloat16, device=device)
    model = CausalLM.from_loaded(loaded, device=device, backend="triton")
    del loaded
    c = model.config
    per_seq = -(-(args.context + args.prefill) // BLOCK_SIZE)
    max_batch = max(args.batches)
    pool = torch.zeros(max_batch * per_seq, c.num_layers, 2, BLOCK_SIZE, c.num_kv_heads,
                       c.head_dim, device=device, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    print(f"{'mode':<7} {'case':<26} {'kernels':>7} {'matmuls':>7} {'GPU ms':>8} "
          f"{'host ms':>8}")
    for mode in ("torch", "triton"):
        model.set_fused(mode)
        for batch_size in args.batches:
            tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch_size)]
            batch, pos = build_batch(tables, [1] * batch_size, [args.context] * batch_size,
                                     BLOCK_SIZE, device)
            ids = torch.randint(0, c.vocab_size, (batch_size,), generator=gen).to(device)

            def step(ids=ids, pos=pos, batch=batch) -> object:
                return model(ids, pos, batch, pool)

            kernels, gemms = count_kernels(step)
            ms = graph_ms(step, args.iters)
            case = f"decode b={batch_size} ctx={args.context}"
            print(f"{mode:<7} {case:<26} {kernels:>7} {gemms:>7} {ms:>8.3f} {'graph':>8}",
                  flush=True)
            log.append({"kind": "step", "mode": mode, "case": case, "kernels": kernels,
                        "matmul_kernels": gemms, "graph_gpu_ms": ms})
        total = args.context + args.prefill
        batch, pos = build_batch([list(range(per_seq))], [args.prefill], [total], BLOCK_SIZE,
                                 device)
        ids = torch.randint(0, c.vocab_size, (args.prefill,), generator=gen).to(device)

        def prefill(ids=ids, pos=pos, batch=batch) -> object:
            return model(ids, pos, batch, pool)

        kernels, gemms = count_kernels(prefill)
        wall, gpu = eager_ms(prefill, args.iters)
        case = f"prefill {args.prefill} on {args.context}"
        print(f"{mode:<7} {case:<26} {kernels:>7} {gemms:>7} {gpu:>8.3f} {wall:>8.3f}",
              flush=True)
        log.append({"kind": "step", "mode": mode, "case": case, "kernels": kernels,
                    "matmul_kernels": gemms, "eager_gpu_ms": gpu, "eager_wall_ms": wall})


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    """The fused-kernel bench's argument parser."""
    parser = argparse.ArgumentParser(prog="kvstore bench fused",
                                     description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="ops,step",
                        help="comma list of ops, step (default: %(default)s)")
    parser.add_argument("--shape", default="llama3-8b",
                        help="a named model shape of engine/config.py (default: %(default)s)")
    parser.add_argument("--tokens", type=_ints, default=_ints("1,128,2048"),
                        help="token counts of the op timings (default: 1,128,2048)")
    parser.add_argument("--batches", type=_ints, default=_ints("1,128"),
                        help="decode batch sizes of the step timings (default: 1,128)")
    parser.add_argument("--context", type=int, default=1024,
                        help="context tokens of each decode sequence, and the cached prefix "
                             "of the prefill chunk (default: %(default)s)")
    parser.add_argument("--prefill", type=int, default=32,
                        help="tokens of the eager prefill chunk (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=50,
                        help="timed replays or calls (default: %(default)s)")
    add_out_argument(parser, "fused", "fused.json, every number measured")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from engine import fused

    if not (torch.cuda.is_available() and fused.AVAILABLE):
        print("the fused-kernel bench needs a CUDA device and triton", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    print(f"{props.name}, torch {torch.__version__}", flush=True)
    log: list[dict] = [{"kind": "device", "name": props.name, "torch": torch.__version__}]
    parts = set(args.parts.split(","))
    if "ops" in parts:
        bench_ops(args, device, log)
    if "step" in parts:
        bench_step(args, device, log)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fused.json"
    path.write_text(json.dumps(log, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

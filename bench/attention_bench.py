"""Paged-attention benchmark: the Triton kernels next to torch SDPA in the same run.

Run: ``kvstore bench attention`` or ``python -m bench.attention_bench`` (``--help``).
Needs a CUDA device and triton. Cases (bf16 by default):

- decode: batch 64/256 x context 1k/4k, one query per sequence;
- prefill: a 2k-token prompt, with and without a 2k-token cached prefix;
- mixed: one 512-token prefill chunk over a 1k prefix plus 63 decodes at 2k (ours only);

for the SmolLM2-135M shape (9 heads, 3 kv heads, head_dim 64) and the Llama-3-8B shape
(32 heads, 8 kv heads, head_dim 128). The baseline is ``scaled_dot_product_attention``
(flash backend where it accepts the call) on the same values laid out contiguously
``[B, kvh, L, D]``: it reads no block table, so it is the physical-limit-ish peer. KV GB/s
counts K and V bytes of every context read once; the copy bandwidth (bytes read + written
of a 2 GiB device-to-device copy) and a bf16 matmul rate are measured in the same run.
Timing: CUDA-graph replays (no launch gaps), median of ``--iters``; memory-bound cases
rotate among enough input replicas that the working set exceeds L2 several times over.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kvstore.args import add_out_argument, dtype_arg, plain_text

BLOCK_SIZE = 16
NUM_LAYERS = 2  # the bench reads layer 1: strided per-layer views as in the engine
LAYER = 1


@dataclass(frozen=True)
class Shape:
    """Attention shape of one model."""

    name: str
    num_heads: int
    kv_heads: int
    head_dim: int


SHAPES = {
    "smollm2": Shape("SmolLM2-135M", 9, 3, 64),
    "llama3-8b": Shape("Llama-3-8B", 32, 8, 128),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    """One line of the table (times in ms; bandwidth in GB/s; rates in TFLOP/s)."""

    case: str
    shape: str
    ours_ms: float
    config: str
    base_ms: float | None = None
    base_name: str = "-"
    kv_bytes: int = 0
    flops: float = 0.0

    def gbs(self, ms: float | None) -> float | None:
        return None if ms is None else self.kv_bytes / (ms * 1e-3) / 1e9

    def tflops(self, ms: float | None) -> float | None:
        return None if ms is None or not self.flops else self.flops / (ms * 1e-3) / 1e12


def time_calls(fns: Sequence[Callable[[], object]], iters: int) -> float:
    """Median ms per call of ``fns`` run back to back, from CUDA-graph replays timed with
    events; falls back to plain launches if capture fails."""
    for fn in fns:  # compile / autotune / handle creation
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph = torch.cuda.CUDAGraph()
    use_graph = True
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
    except RuntimeError:
        use_graph = False
        torch.cuda.synchronize()

    def run() -> None:
        if use_graph:
            graph.replay()
        else:
            for fn in fns:
                fn()

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy of 2 GiB, GB/s counting bytes read plus bytes written: the
    better of ``copy_`` (memcpy) and an elementwise kernel (``mul(x, 1)``)."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = min(time_calls([lambda: dst.copy_(src)], 30),
             time_calls([lambda: torch.mul(src, 1, out=dst)], 30))
    return 2 * (2 << 30) / (ms * 1e-3) / 1e9


def read_bandwidth(device: torch.device) -> float:
    """Reading 4 GiB once (a max-reduction of a bf16 tensor), GB/s."""
    src = torch.empty(2 << 30, dtype=torch.bfloat16, device=device).normal_()
    ms = time_calls([lambda: torch.amax(src)], 30)
    return (4 << 30) / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """8192^3 matrix product on random data, TFLOP/s."""
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(50):  # ~100 ms of work so that the clocks settle
        a @ b
    ms = time_calls([lambda: a @ b], 10)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


class PagedCase:
    """``replicas`` independent ragged batches on one strided pool, with contiguous copies
    of the same K/V for the SDPA baseline."""

    def __init__(self, shape: Shape, seq_lens: list[int], n_q: list[int], dtype: torch.dtype,
                 replicas: int, device: torch.device, want_dense: bool, seed: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        nblks = [-(-s // BLOCK_SIZE) for s in seq_lens]
        per = sum(nblks)
        num_slots = per * replicas
        pool = torch.empty((num_slots, NUM_LAYERS, 2, BLOCK_SIZE, shape.kv_heads,
                            shape.head_dim), dtype=dtype, device=device)
        pool.normal_()
        self.k_cache, self.v_cache = pool[:, LAYER, 0], pool[:, LAYER, 1]
        self.shape = shape
        self.seq_lens, self.n_q = seq_lens, n_q
        perm = torch.randperm(num_slots, generator=gen)
        width = max(nblks)
        self.replicas = []
        self.dense = []
        for r in range(replicas):
            table = torch.zeros((len(seq_lens), width), dtype=torch.int32)
            used = r * per
            for b, nb in enumerate(nblks):
                table[b, :nb] = perm[used:used + nb].to(torch.int32)
                used += nb
            table = table.to(device)
            qsl = torch.tensor([0, *torch.tensor(n_q).cumsum(0).tolist()], dtype=torch.int32,
                               device=device)
            lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
            q = torch.randn((sum(n_q), shape.num_heads, shape.head_dim), device=device,
                            dtype=dtype)
            self.replicas.append((q, table, qsl, lens))
            if want_dense:  # same values, contiguous [B, kvh, L, D]; equal lengths only
                length = seq_lens[0]
                k = self.k_cache[table.long()].reshape(len(seq_lens), -1, shape.kv_heads,
                                                       shape.head_dim)[:, :length]
                v = self.v_cache[table.long()].reshape(len(seq_lens), -1, shape.kv_heads,
                                                       shape.head_dim)[:, :length]
                qd = q.reshape(len(seq_lens), n_q[0], shape.num_heads, shape.head_dim)
                self.dense.append((qd.transpose(1, 2).contiguous(),
                                   k.transpose(1, 2).contiguous(),
                                   v.transpose(1, 2).contiguous()))
        self.scale = shape.head_dim ** -0.5

    def ours(self, config: object = None) -> list[Callable[[], object]]:
        from engine import triton_attention as ta

        return [(lambda q=q, t=t, s=s, n=n: ta.paged_attention(
            q, self.k_cache, self.v_cache, t, s, n, self.scale, config=config))
            for q, t, s, n in self.replicas]

    def kv_bytes(self) -> int:
        elem = self.k_cache.element_size()
        return sum(self.seq_lens) * self.shape.kv_heads * self.shape.head_dim * 2 * elem

    def flops(self) -> float:
        pairs = sum(n * (s - n) + n * (n + 1) // 2 for s, n in zip(self.seq_lens, self.n_q,
                                                                   strict=True))
        return 4.0 * self.shape.num_heads * self.shape.head_dim * pairs


def sdpa_calls(case: PagedCase) -> tuple[list[Callable[[], object]], str]:
    """SDPA over the contiguous copies; the first backend that accepts the call, in the
    order flash, cuDNN, memory-efficient. Returns the calls and the backend's name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    n, length = case.n_q[0], case.seq_lens[0]
    if n == 1:
        kwargs: dict = {"is_causal": False}
    elif n == length:
        kwargs = {"is_causal": True}
    else:
        kwargs = {"attn_mask": causal_lower_right(n, length)}
    group = case.shape.num_heads // case.shape.kv_heads
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):
        for gqa in (True, False):
            def make(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     backend: SDPBackend = backend, gqa: bool = gqa) -> Callable[[], object]:
                if not gqa:  # expanded K/V: reads group-times the bytes; noted in the name
                    k = k.repeat_interleave(group, dim=1)
                    v = v.repeat_interleave(group, dim=1)

                extra = {"enable_gqa": True} if gqa else {}

                def call() -> torch.Tensor:
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(
                            q, k, v, scale=case.scale, **kwargs, **extra)
                return call

            try:
                calls = [make(q, k, v) for q, k, v in case.dense]
                calls[0]()
                torch.cuda.synchronize()
            except Exception:  # this backend refuses the call: try the next one
                continue
            name = backend.name.lower().replace("_attention", "")
            return calls, name if gqa else f"{name}(kv expanded)"
    return [], "-"


def replicas_for(kv_bytes: int, l2_bytes: int, memory_bound: bool) -> int:
    """Input replicas so that one graph replay streams at least 4x the L2 size."""
    if not memory_bound:
        return 1
    return max(1, min(16, math.ceil(4 * l2_bytes / kv_bytes)))


def decode_configs(case: PagedCase) -> list[tuple[str, object]]:
    """Grid of decode variants: KV tile x splits x pipeline depth."""
    from engine import triton_attention as ta

    bm = max(16, 1 << (case.shape.num_heads // case.shape.kv_heads - 1).bit_length())
    return [(f"n{bn}s{sp}p{st}", ta.KernelConfig(bm, bn, sp, 4, st))
            for bn in (32, 64, 128) for sp in (1, 2, 4) for st in (3, 4)]


def prefill_configs(case: PagedCase) -> list[tuple[str, object]]:
    from engine import triton_attention as ta

    return [(f"m{m}n{n}w{w}s{st}", ta.KernelConfig(m, n, 1, w, st))
            for m, n, w, st in ((128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3),
                                (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2),
                                (64, 64, 4, 2), (128, 128, 4, 2))]


def config_name(case: PagedCase) -> str:
    from engine import triton_attention as ta

    s = case.shape
    q = case.replicas[0][0]
    c = ta.choose_config(q.shape[0], len(case.seq_lens), s.num_heads, s.kv_heads, s.head_dim,
                         case.replicas[0][1].shape[1] * BLOCK_SIZE, q.device)
    return f"m{c.block_m}n{c.block_n}s{c.num_splits}w{c.num_warps}p{c.num_stages}"


def run_case(label: str, case: PagedCase, iters: int, tune: bool, kind: str,
             log: list[dict]) -> Row:
    row = Row(label, case.shape.name, time_calls(case.ours(), iters), config_name(case),
              kv_bytes=case.kv_bytes(), flops=case.flops())
    if case.dense:
        calls, name = sdpa_calls(case)
        if calls:
            row.base_ms, row.base_name = time_calls(calls, iters), name
    log.append({"kind": "row", **asdict(row)})
    if tune:
        variants = decode_configs(case) if kind == "decode" else prefill_configs(case)
        timed: list[tuple[float, str]] = []
        for vname, config in variants:
            try:
                ms = time_calls(case.ours(config), iters)
            except Exception as exc:  # a variant that does not compile is reported, not fatal
                log.append({"kind": "variant", "case": label, "shape": case.shape.name,
                            "variant": vname, "error": repr(exc)[:200]})
                print(f"  variant {vname}: failed: {exc!r}"[:200], flush=True)
                continue
            log.append({"kind": "variant", "case": label, "shape": case.shape.name,
                        "variant": vname, "config": str(config), "ms": ms})
            timed.append((ms, vname))
        best = ", ".join(f"{n} {ms:.4f}" for ms, n in sorted(timed)[:3])
        print(f"  tune {label} {case.shape.name}: auto {row.ours_ms:.4f} ms; best {best}",
              flush=True)
    return row


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[Row], copy_gbs: float, read_gbs: float, mm_tflops: float) -> None:
    print(f"\ndevice copy {copy_gbs:.0f} GB/s (read+write), read {read_gbs:.0f} GB/s, "
          f"bf16 matmul {mm_tflops:.0f} TFLOP/s")
    head = (f"{'case':<26} {'shape':<13} {'ours ms':>8} {'sdpa ms':>8} {'sdpa/ours':>9} "
            f"{'ours GB/s':>9} {'%copy':>6} {'%read':>6} {'sdpa GB/s':>9} {'ours TF/s':>9} "
            f"{'sdpa TF/s':>9}  baseline / our config")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = None if r.base_ms is None else r.base_ms / r.ours_ms
        gbs = r.gbs(r.ours_ms)
        print(f"{r.case:<26} {r.shape:<13} {r.ours_ms:>8.4f} {fmt(r.base_ms, '8.4f'):>8} "
              f"{fmt(ratio, '9.2f'):>9} {fmt(gbs, '9.0f'):>9} "
              f"{fmt(None if gbs is None else 100 * gbs / copy_gbs, '6.1f'):>6} "
              f"{fmt(None if gbs is None else 100 * gbs / read_gbs, '6.1f'):>6} "
              f"{fmt(r.gbs(r.base_ms), '9.0f'):>9} {fmt(r.tflops(r.ours_ms), '9.1f'):>9} "
              f"{fmt(r.tflops(r.base_ms), '9.1f'):>9}  {r.base_name} / {r.config}")


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore bench attention`` argument parser."""
    parser = argparse.ArgumentParser(prog="kvstore bench attention",
                                     description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2,llama3-8b",
                        help=f"comma list of {', '.join(sorted(SHAPES))} "
                             "(default: %(default)s)")
    parser.add_argument("--cases", default="decode,prefill,mixed",
                        help="comma list of decode, prefill, mixed (default: %(default)s)")
    parser.add_argument("--batches", default="64,256",
                        help="decode batch sizes (default: %(default)s)")
    parser.add_argument("--contexts", default="1024,4096",
                        help="decode context lengths (default: %(default)s)")
    parser.add_argument("--prompt", type=int, default=2048,
                        help="prefill prompt tokens (default: %(default)s)")
    parser.add_argument("--prefix", type=int, default=2048,
                        help="cached prefix tokens (default: %(default)s)")
    parser.add_argument("--dtype", type=dtype_arg, default="bfloat16",
                        metavar="{bfloat16,float16}",
                        help="KV and query dtype; bf16, fp16 are aliases (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=20,
                        help="timed graph replays (default: %(default)s)")
    parser.add_argument("--tune", action="store_true",
                        help="also time alternative kernel configurations")
    add_out_argument(parser, "attention", "attention.json, every number measured")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kvstore bench attention``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    from engine import triton_attention as ta

    if not (torch.cuda.is_available() and ta.AVAILABLE):
        print("attention bench needs a CUDA device and triton", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if args.dtype not in DTYPES:
        parser.error(f"--dtype {args.dtype} is not supported by the kernels: use "
                     f"{' or '.join(DTYPES)}")
    dtype = DTYPES[args.dtype]
    props = torch.cuda.get_device_properties(device)
    l2 = props.L2_cache_size
    print(f"{props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, "
          f"torch {torch.__version__}", flush=True)
    mm = matmul_tflops(device, dtype)  # first: brings the clocks up from idle
    copy_gbs = max(copy_bandwidth(device) for _ in range(2))
    read_gbs = read_bandwidth(device)
    print(f"copy {copy_gbs:.0f} GB/s, read {read_gbs:.0f} GB/s, matmul {mm:.0f} TFLOP/s",
          flush=True)
    cases = set(args.cases.split(","))
    rows: list[Row] = []
    log: list[dict] = [{"kind": "device", "name": props.name, "copy_gbs": copy_gbs,
                        "read_gbs": read_gbs, "matmul_tflops": mm}]
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        kv_tok = shape.kv_heads * shape.head_dim * 2 * torch.tensor([], dtype=dtype).element_size()
        if "decode" in cases:
            for batch in (int(x) for x in args.batches.split(",")):
                for ctx in (int(x) for x in args.contexts.split(",")):
                    reps = replicas_for(batch * ctx * kv_tok, l2, True)
                    case = PagedCase(shape, [ctx] * batch, [1] * batch, dtype, reps, device,
                                     True, seed=batch + ctx)
                    rows.append(run_case(f"decode b={batch} ctx={ctx}", case, args.iters,
                                         args.tune, "decode", log))
                    print(f"done {rows[-1].case} {shape.name}: {rows[-1].ours_ms:.4f} ms",
                          flush=True)
                    del case
                    torch.cuda.empty_cache()
        if "prefill" in cases:
            for prefix in (0, args.prefix):
                total = prefix + args.prompt
                case = PagedCase(shape, [total], [args.prompt], dtype, 1, device, True,
                                 seed=total)
                rows.append(run_case(f"prefill {args.prompt}+{prefix} cached", case,
                                     args.iters, args.tune, "prefill", log))
                print(f"done {rows[-1].case} {shape.name}: {rows[-1].ours_ms:.4f} ms",
                      flush=True)
        if "mixed" in cases:
            lens = [1024 + 512] + [2048] * 63
            n_q = [512] + [1] * 63
            case = PagedCase(shape, lens, n_q, dtype, 2, device, False, seed=5)
            rows.append(run_case("mixed 512@1k + 63 dec@2k", case, args.iters, False,
                                 "prefill", log))
    print_table(rows, copy_gbs, read_gbs, mm)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "attention.json"
    path.write_text(json.dumps(log, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

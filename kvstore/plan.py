"""Capacity planning from first principles: ``kvstore plan``.

From a model shape, a KV dtype, a GPU and a workload, the plan states what a deployment
needs before it runs:

- **weights**: parameters x bytes per parameter;
- **KV**: ``2 (K, V) x layers x kv_heads x head_dim x bytes`` per token, times
  ``block_size`` per block (MHA, GQA and MQA differ only in ``kv_heads``);
- **KV pool and largest batch**: the GPU memory left for KV after the weights and a
  stated reserve, and how many sequences of the requested context fit in it;
- **latency**: a roofline per kernel, summed over the engine's kernel sequence of a step
  (:func:`step_kernels`): each kernel takes the largest of its compute time (FLOPs /
  achieved FLOP/s), its memory time (bytes / achieved bandwidth) and its floor (the
  shortest a kernel runs); a step takes the larger of that sum and the host's work for
  it (CUDA-graph replay in decode, eager launches in prefill). A big model's prefill is
  bound by compute, its decode by memory bandwidth; a small model's steps by the host;
- **tier sizing**: host DRAM and disk capacity that reach 90/95/99% of the infinite
  cache's hit rate on a workload, found by bisection over capacities with the store's
  own simulation (:meth:`kvstore.store.KVStore.replay`), and the prefill it saves.

The arithmetic lives in pure functions returning frozen dataclasses; :func:`main` is the
command line. Units: tokens, blocks, bytes, seconds, FLOP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.config import NAMED_SHAPES, ModelConfig
from kvstore.args import SIZE_HELP, add_dtype_argument, size_arg
from kvstore.units import format_size

# ---------------------------------------------------------------------------- constants
# The latency model's constants. Each comes from ``kvstore bench plan`` and the kernel
# timings of engine steps on an H200 whose measured ceilings are 4,131 GB/s (device copy)
# and 742 TFLOP/s (bf16 matmul): efficiencies are fractions of *measured* ceilings
# (:func:`measure_device`), not of a data sheet's. Recalibrate on another GPU with that
# bench. One set serves every model: none is fitted to one shape.

GEMM_COMPUTE_EFFICIENCY = 0.80
"""Fraction of the matmul ceiling (:attr:`GPUSpec.reached_flops`: the measured bf16
FLOP/s, or a data sheet's x :data:`TABLE_FLOPS_REACHED`) a prefill GEMM (fused QKV, O,
fused gate/up, down, LM head) reaches. H200: Llama-3-8B's 2,048-token prefill, GEMMs nearly all of its FLOPs,
runs at 0.81 of the measured 742 TFLOP/s."""

DECODE_GEMM_COMPUTE_EFFICIENCY = 0.80
"""Fraction of bf16 FLOP/s a decode step's GEMMs (one row a sequence) reach when
compute-bound, which they are only at large batches (below ~200 rows they read weights).
Such GEMMs are not skinny: H200, Llama-3-8B's 436-sequence step takes 41.9 ms; reading its
117 GB of KV takes at least 28.3 ms at copy bandwidth, which leaves its 6.6 TFLOP of GEMMs
at most ~12.5 ms, 0.7 of FLOP/s or more (at 0.40 the plan would predict 61 ms). The
prefill value is used."""

GEMM_MEMORY_EFFICIENCY = 0.90
"""Fraction of the copy bandwidth (:attr:`GPUSpec.reached_bandwidth`: measured, or a data
sheet's x :data:`TABLE_BANDWIDTH_REACHED`) a memory-bound GEMM reaches reading its weights (the
decode GEMVs: ~0.9 of the measured copy bandwidth on an H200)."""

ATTENTION_MEMORY_EFFICIENCY = 0.75
"""Fraction of the copy bandwidth paged attention reaches reading the KV. H200, decode
at 2,048 tokens: the Triton kernel alone reads SmolLM2's KV (3 KV heads x 64) at ~2.96 of
4.13 TB/s at batch 64 (0.72); the whole steps, less the plan's other kernels, imply 0.59
(batch 64) and 0.64 (batch 2,838) for SmolLM2 and 0.79 (batch 64) and 0.95 (batch 436)
for Llama-3-8B (8 KV heads x 128: twice the bytes a head vector). One value between
them: SmolLM2's large decode steps run ~15% slower than planned, Llama-3-8B's largest
~15% faster."""

SPLIT_KV_PROGRAMS = 264
"""The engine's decode attention splits each sequence's KV and launches a merge kernel
when its programs (batch x KV heads) number fewer than this: 2 an SM of an H100's or
H200's 132 (:func:`engine.triton_attention.choose_config`)."""

ATTENTION_COMPUTE_EFFICIENCY = 0.30
"""Fraction of bf16 FLOP/s paged attention reaches when compute-bound (prefill). Not
measured alone at head_dim 128: Llama-3-8B's 2,048-token prefill (49.2 ms on an H200, 1.1
of its 29.7 TFLOP in attention) puts it above ~0.23 if its GEMMs run at 0.9 of FLOP/s.
SmolLM2 (head_dim 64: half the work a K/V tile) reaches only ~0.13 (4.8 GFLOP a layer in
~51 us with the merge), but its prefill is host-bound: its planned TTFT does not move."""

ELEMENTWISE_MEMORY_EFFICIENCY = 0.80
"""Fraction of the copy bandwidth the elementwise kernels reach (add + RMSNorm, RoPE + KV
write, SiLU * up, the split-KV merge, embedding and row gathers, the fp32 logits cast,
argmax)."""

GEMM_FLOOR_S = 4e-6
"""Shortest GEMM kernel (seconds, gap to the next launch included). H200: the cuBLAS
GEMMs of a small model's decode step take 3.6-4.1 us plus ~0.5 us of gap, whatever their
size below that."""

KERNEL_FLOOR_S = 2e-6
"""Shortest non-GEMM kernel (seconds, gap included). H200, under a CUDA graph: RMSNorm
1.8 us, SiLU * up 1.5 us, the split-KV merge 1.7 us, RoPE + KV write 2.2 us, plus ~0.5 us
of gap each."""

DECODE_HOST_S_PER_LAYER = 32.5e-6
"""Host work of one decode step per decoder layer (seconds): scheduling, staging the
step's metadata, replaying its CUDA graph, sampling. The GPU cannot finish a step sooner.
H200: SmolLM2 (30 layers) decodes at batch 1 in 0.976 ms a step with the GPU idle
between kernels (host-bound)."""

PREFILL_HOST_S_PER_LAYER = 440e-6
"""Host work of one prefill step (chunk) per decoder layer (seconds; eager, no CUDA
graph: every kernel is launched from Python). H200: SmolLM2's 2,048-token prompt reaches
its first token in 13.4 ms with 3.1 ms of GPU kernel time."""

MEMORY_UTILIZATION = 0.90
"""Fraction of GPU memory the plan lets the engine use (the rest: CUDA context, the
allocator's fragmentation, other processes)."""

BLOCK_SIZE = 16
"""Tokens per KV block (the engine's default)."""

MAX_NUM_BATCHED_TOKENS = 8192
"""Prefill chunk the plan assumes (tokens per step; the engine's token budget)."""

TARGET_FRACTIONS = (0.90, 0.95, 0.99)
"""Fractions of the infinite cache's hit rate the tier sizing aims at."""

def int8_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes of one token's KV in the int8 (or fp8) lower-tier format of
    :mod:`tiers.quant`: one byte a value plus a 2-byte scale per head vector."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 2)


DTYPES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2,
          "bf16": 2}
"""KV / weight dtypes the plan accepts, with their bytes per element."""

_CANONICAL_DTYPE = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


class PlanError(ValueError):
    """Bad input to the plan; the message says what to change."""


# ------------------------------------------------------------------------ model shapes


def named_model_configs() -> dict[str, dict[str, Any]]:
    """Hugging Face ``config.json`` dicts of the named model shapes (``--model NAME``):
    :data:`engine.config.NAMED_SHAPES`, the same table dummy weights use."""
    return {name: dict(cfg) for name, cfg in NAMED_SHAPES.items()}


def resolve_model(name_or_path: str) -> tuple[str, ModelConfig]:
    """``(display name, config)`` of a named shape or a ``config.json`` path.

    Raises :class:`PlanError` listing the known names for anything else.
    """
    named = named_model_configs()
    if not name_or_path.strip():
        raise PlanError(f"--model is empty: give one of {', '.join(named)} or the path of a "
                        "Hugging Face config.json (or its directory)")
    key = name_or_path.lower()
    if key in named:
        return key, ModelConfig.from_hf_dict(named[key])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"config file {path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise PlanError(f"cannot read {path} as JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlanError(f"{path} is not a config.json object")
        try:
            # a checkpoint's config.json is named by its directory, another file by itself
            label = (path.parent.name or path.stem) if path.name == "config.json" else path.stem
            return label, ModelConfig.from_hf_dict(data)
        except ValueError as exc:
            raise PlanError(f"{path}: {exc}") from None
    raise PlanError(f"unknown model {name_or_path!r}: give one of {', '.join(named)} or the "
                    "path of a Hugging Face config.json")


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (``bfloat16``, ``fp16``, ...). :class:`PlanError`
    naming the accepted values otherwise."""
    if dtype.lower() not in DTYPES:
        raise PlanError(f"unknown dtype {dtype!r}: use one of bfloat16, float16, float32 "
                        "(or bf16, fp16, fp32)")
    return DTYPES[dtype.lower()]


def canonical_dtype(dtype: str) -> str:
    """``bf16`` -> ``bfloat16`` etc. (after :func:`dtype_bytes` accepted it)."""
    return _CANONICAL_DTYPE.get(dtype.lower(), dtype.lower())


@dataclass(frozen=True)
class ModelSize:
    """Parameter count and memory of a model in one dtype.

    ``parameters`` counts every weight once (a tied head shares the embedding);
    ``matmul_parameters`` are the ones multiplied per token (decoder layers and the LM
    head, not the embedding lookup). Bytes are exact products, no rounding.
    """

    parameters: int
    matmul_parameters: int
    weights_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_block: int
    block_size: int
    dtype: str


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of a Llama-family decoder (embedding, layers, final norm, LM head)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    attn = h * (q + 2 * kv) + q * h
    if cfg.attention_bias:
        attn += q + 2 * kv
    if cfg.attention_out_bias:
        attn += h
    mlp = 3 * h * cfg.intermediate_size
    if cfg.mlp_bias:
        mlp += 2 * cfg.intermediate_size + h
    layer = attn + mlp + 2 * h
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return embed + cfg.num_layers * layer + h + head


def kv_bytes_per_token(cfg: ModelConfig, element_bytes: int) -> int:
    """``2 x layers x kv_heads x head_dim x bytes``: the KV of one token (bytes)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * element_bytes


def model_size(cfg: ModelConfig, dtype: str, block_size: int = BLOCK_SIZE) -> ModelSize:
    """Weights and KV sizes of ``cfg`` with weights and KV in ``dtype``."""
    b = dtype_bytes(dtype)
    params = parameter_count(cfg)
    per_token = kv_bytes_per_token(cfg, b)
    return ModelSize(parameters=params,
                     matmul_parameters=params - cfg.vocab_size * cfg.hidden_size
                     + (cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0),
                     weights_bytes=params * b, kv_bytes_per_token=per_token,
                     kv_bytes_per_block=per_token * block_size, block_size=block_size,
                     dtype=canonical_dtype(dtype))


# ------------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GPUSpec:
    """Ceilings of one accelerator: ``memory_bytes`` (what CUDA reports as total),
    ``bandwidth`` (HBM bytes/s), ``flops`` (dense bf16 FLOP/s), ``pcie`` (host<->device
    bytes/s, one direction). ``source``: ``table`` (data sheet) or ``measured``.

    The plan's efficiencies are fractions of *measured* ceilings (a copy, a large
    matmul: :func:`measure_device`), so the rooflines use :attr:`reached_bandwidth` and
    :attr:`reached_flops`: the measured values, or a data sheet's scaled by what a copy
    and a matmul reach of it (:data:`TABLE_BANDWIDTH_REACHED`,
    :data:`TABLE_FLOPS_REACHED`)."""

    name: str
    memory_bytes: int
    bandwidth: float
    flops: float
    pcie: float
    source: str = "table"

    @property
    def reached_bandwidth(self) -> float:
        """HBM bytes/s a device copy reaches (the rooflines' ceiling)."""
        return self.bandwidth if self.source == "measured" else \
            self.bandwidth * TABLE_BANDWIDTH_REACHED

    @property
    def reached_flops(self) -> float:
        """Dense bf16 FLOP/s a large matmul reaches (the rooflines' ceiling)."""
        return self.flops if self.source == "measured" else self.flops * TABLE_FLOPS_REACHED


TABLE_BANDWIDTH_REACHED = 0.86
"""Share of a data sheet's HBM bandwidth a device-to-device copy reaches: 4.13 of the
H200's 4.8 TB/s (:func:`measure_device` on an H200, two sessions: 3.99 and 4.13)."""

TABLE_FLOPS_REACHED = 0.75
"""Share of a data sheet's dense bf16 FLOP/s an 8,192-square bf16 matmul reaches: 717 to
743 of the H200's 989 TFLOP/s (:func:`measure_device` on an H200, three sessions)."""


_GiB = 1 << 30
GPUS: dict[str, GPUSpec] = {g.name.lower(): g for g in (
    # Data-sheet figures: dense (no sparsity) bf16 tensor FLOP/s with fp32 accumulate,
    # memory as CUDA reports it (a little under the marketed size), PCIe one direction.
    GPUSpec("H200", int(139.8 * _GiB), 4.8e12, 989e12, 64e9),
    GPUSpec("H100-SXM", int(79.1 * _GiB), 3.35e12, 989e12, 64e9),
    GPUSpec("H100-PCIe", int(79.1 * _GiB), 2.0e12, 756e12, 64e9),
    GPUSpec("A100-80GB", int(79.2 * _GiB), 2.039e12, 312e12, 32e9),
    GPUSpec("A100-40GB", int(39.4 * _GiB), 1.555e12, 312e12, 32e9),
    GPUSpec("L40S", int(44.4 * _GiB), 864e9, 362e12, 32e9),
    GPUSpec("A10G", int(22.0 * _GiB), 600e9, 70e12, 32e9),
    GPUSpec("L4", int(21.9 * _GiB), 300e9, 121e12, 32e9),
    GPUSpec("RTX-4090", int(23.6 * _GiB), 1.008e12, 165e12, 32e9),
)}


def resolve_gpu(name: str) -> GPUSpec:
    """A GPU of the table by name (case-insensitive; ``h100`` means the SXM part).
    :class:`PlanError` listing the names otherwise."""
    key = name.lower().replace("_", "-").replace(" ", "-")
    key = {"h100": "h100-sxm", "a100": "a100-80gb", "4090": "rtx-4090"}.get(key, key)
    if key not in GPUS:
        raise PlanError(f"unknown GPU {name!r}: give one of "
                        f"{', '.join(g.name for g in GPUS.values())} (or run on the GPU "
                        "without --gpu to measure it)")
    return GPUS[key]


def measure_device(device: str = "cuda", seconds: float = 0.3) -> GPUSpec:
    """Measure a device's ceilings in about a second: a bf16 matmul (FLOP/s), a device
    copy of 1 GiB (bandwidth = bytes read + written per second) and a pinned host to
    device copy (PCIe). On CPU the matmul is fp32 and "PCIe" is a host copy."""
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if cuda:
                torch.cuda.synchronize(dev)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds or n >= 50:
                return elapsed / n

    n = 8192 if cuda else 512
    dt = torch.bfloat16 if cuda else torch.float32
    mats = [torch.randn(n, n, device=dev, dtype=dt) for _ in range(2)]
    flops = 2 * n ** 3 / timed(lambda: mats[0] @ mats[1])
    mats.clear()
    size = (1 << 30) if cuda else (64 << 20)
    bufs = [torch.empty(size, dtype=torch.uint8, device=dev) for _ in range(2)]
    bandwidth = 2 * size / timed(lambda: bufs[1].copy_(bufs[0]))
    bufs.pop()
    bufs.append(torch.empty(min(size, 256 << 20), dtype=torch.uint8, pin_memory=cuda))
    moved = bufs[1].numel()
    pcie = moved / timed(lambda: bufs[0][:moved].copy_(bufs[1], non_blocking=cuda))
    bufs.clear()
    if cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(dev).total_memory
        name = torch.cuda.get_device_name(dev)
    else:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        name = "CPU"
    return GPUSpec(name, int(total), bandwidth, flops, pcie, "measured")


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryPlan:
    """How GPU memory splits (bytes) and how many sequences fit.

    ``usable = memory x utilization``; ``activations`` is the peak of one step of
    ``max_num_batched_tokens`` tokens (largest live set: hidden states, fused QKV,
    gate/up output, fp32 logits of ``logits_rows`` rows, one a sequence of the step);
    ``kv_pool = usable - weights - activations``. ``max_batch``: sequences of ``context``
    tokens whose blocks fit the pool (each takes ``ceil(context / block_size)`` blocks)
    while their step's logits fit beside it. ``logits_rows`` is the batch that can run:
    ``concurrency``, or ``max_batch`` when fewer fit (1 when none does), never the rows
    of sequences that cannot run. ``fits``: ``concurrency <= max_batch``.
    """

    gpu_memory: int
    utilization: float
    usable: int
    weights: int
    activations: int
    kv_pool_bytes: int
    kv_pool_blocks: int
    kv_pool_tokens: int
    context: int
    blocks_per_sequence: int
    max_batch: int
    concurrency: int
    fits: bool
    logits_rows: int = 1


def activation_bytes(cfg: ModelConfig, element_bytes: int, tokens: int, logits_rows: int
                     ) -> int:
    """Peak activation memory of one step of ``tokens`` tokens (bytes): the residual and
    normed hidden states, the fused QKV output, the gate/up output and its SwiGLU
    product, the attention output, and ``logits_rows`` fp32 rows of logits."""
    per_token = (3 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                 + 3 * cfg.intermediate_size + cfg.num_heads * cfg.head_dim)
    return tokens * per_token * element_bytes + logits_rows * cfg.vocab_size * 4


def plan_memory(cfg: ModelConfig, size: ModelSize, gpu: GPUSpec, context: int,
                concurrency: int, utilization: float = MEMORY_UTILIZATION,
                max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS) -> MemoryPlan:
    """Split ``gpu``'s memory into weights, activations and the KV pool (see
    :class:`MemoryPlan`). The pool is 0 when the weights and one step's activations do
    not fit.

    The activations hold logits for the batch that can run: ``concurrency`` rows when
    that many sequences fit beside them, else the largest batch ``b`` whose ``b`` rows
    of logits and ``b`` sequences of KV fit together (a bisection: more rows leave less
    pool)."""
    usable = int(gpu.memory_bytes * utilization)
    element = dtype_bytes(size.dtype)
    per_seq = -(-context // size.block_size)

    def pool_for(rows: int) -> int:
        act = activation_bytes(cfg, element, max_num_batched_tokens, rows)
        return max(0, usable - size.weights_bytes - act)

    def batch_for(rows: int) -> int:
        return pool_for(rows) // size.kv_bytes_per_block // per_seq

    concurrency = max(1, concurrency)
    if batch_for(concurrency) >= concurrency:
        rows = concurrency
        max_batch = batch_for(rows)
    elif batch_for(1) < 1:
        rows, max_batch = 1, 0
    else:  # the largest b < concurrency with b <= batch_for(b)
        lo, hi = 1, concurrency
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if batch_for(mid) >= mid:
                lo = mid
            else:
                hi = mid
        rows = max_batch = lo
    act = activation_bytes(cfg, element, max_num_batched_tokens, rows)
    pool = pool_for(rows)
    blocks = pool // size.kv_bytes_per_block
    return MemoryPlan(gpu.memory_bytes, utilization, usable, size.weights_bytes, act, pool,
                      blocks, blocks * size.block_size, context, per_seq, max_batch,
                      concurrency, concurrency <= max_batch, rows)


# ---------------------------------------------------------------------------- roofline


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the measured ceilings each kind of kernel reaches, the kernel floors
    and the host floors of a step (defaults: the module constants, which say where they
    come from). Fractions must be in (0, 1]; floors >= 0 seconds."""

    gemm_compute: float = GEMM_COMPUTE_EFFICIENCY
    decode_gemm_compute: float = DECODE_GEMM_COMPUTE_EFFICIENCY
    gemm_memory: float = GEMM_MEMORY_EFFICIENCY
    attention_memory: float = ATTENTION_MEMORY_EFFICIENCY
    attention_compute: float = ATTENTION_COMPUTE_EFFICIENCY
    elementwise_memory: float = ELEMENTWISE_MEMORY_EFFICIENCY
    gemm_floor: float = GEMM_FLOOR_S
    kernel_floor: float = KERNEL_FLOOR_S
    decode_host_per_layer: float = DECODE_HOST_S_PER_LAYER
    prefill_host_per_layer: float = PREFILL_HOST_S_PER_LAYER

    def __post_init__(self) -> None:
        for name in ("gemm_compute", "decode_gemm_compute", "gemm_memory",
                     "attention_memory", "attention_compute", "elementwise_memory"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise PlanError(f"efficiency {name} must be in (0, 1], got {value}")
        for name in ("gemm_floor", "kernel_floor", "decode_host_per_layer",
                     "prefill_host_per_layer"):
            value = getattr(self, name)
            if not value >= 0:
                raise PlanError(f"floor {name} must be >= 0 seconds, got {value}")


def format_assumptions(eff: Efficiency, gpu: GPUSpec | None = None) -> str:
    """One line: the efficiencies and floors a plan assumed. Efficiencies are fractions
    of the rooflines' ceilings (:attr:`GPUSpec.reached_flops`, a large matmul's FLOP/s,
    and :attr:`GPUSpec.reached_bandwidth`, a device copy's bandwidth), not of a data
    sheet's peak; with a ``gpu`` from the table the line also gives the GEMM fractions of
    its data sheet."""
    decode = ("" if eff.decode_gemm_compute == eff.gemm_compute
              else f" ({eff.decode_gemm_compute:.0%} in decode)")
    sheet_c = sheet_m = ""
    if gpu is not None and gpu.source != "measured":
        c = gpu.reached_flops / gpu.flops
        m = gpu.reached_bandwidth / gpu.bandwidth
        sheet_c = f" = {eff.gemm_compute * c:.0%} of the data sheet's"
        sheet_m = f" = {eff.gemm_memory * m:.0%} of the data sheet's"
    return (f"fractions of the ceilings a matmul (FLOP/s) and a copy (bandwidth) reach: "
            f"GEMMs {eff.gemm_compute:.0%} of FLOP/s{sheet_c}{decode}, "
            f"{eff.gemm_memory:.0%} of bandwidth{sheet_m}; attention "
            f"{eff.attention_compute:.0%} of FLOP/s, {eff.attention_memory:.0%} of "
            f"bandwidth; elementwise {eff.elementwise_memory:.0%} of bandwidth; kernel floors "
            f"{eff.gemm_floor * 1e6:.1f} us a GEMM, {eff.kernel_floor * 1e6:.1f} us others; "
            f"host floors a layer: decode {eff.decode_host_per_layer * 1e6:.1f} us, prefill "
            f"{eff.prefill_host_per_layer * 1e6:.0f} us")


@dataclass(frozen=True)
class KernelTime:
    """One kernel of a step, over its ``launches`` (one a decoder layer, or one a step):
    ``flops`` and ``bytes`` of all launches; ``compute_s = flops / (FLOP/s x its compute
    efficiency)``, ``memory_s = bytes / (bandwidth x its memory efficiency)``,
    ``floor_s = launches x its kernel floor``, and ``seconds`` the largest of the three
    (every launch is the same, so this is ``launches`` x one launch's roofline).
    ``bound``: ``compute``, ``memory`` or ``floor``, whichever ``seconds`` is."""

    name: str
    launches: int
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    floor_s: float
    seconds: float
    bound: str


def _kernel(name: str, launches: int, flops: float, nbytes: float, gpu: GPUSpec,
            compute_eff: float, memory_eff: float, floor: float) -> KernelTime:
    flops, nbytes = launches * flops, launches * nbytes
    compute_s = flops / (gpu.reached_flops * compute_eff)
    memory_s = nbytes / (gpu.reached_bandwidth * memory_eff)
    floor_s = launches * floor
    seconds = max(compute_s, memory_s, floor_s)
    bound = ("floor" if seconds == floor_s else "compute" if seconds == compute_s
             else "memory")
    return KernelTime(name, launches, flops, nbytes, compute_s, memory_s, floor_s, seconds,
                      bound)


def attention_flops(cfg: ModelConfig, queries: int, context_start: int) -> float:
    """FLOPs of causal attention for ``queries`` new tokens after ``context_start`` cached
    ones: ``QK^T`` and ``PV``, 2 x 2 x heads x head_dim FLOPs per (query, key) pair."""
    pairs = queries * context_start + queries * (queries + 1) / 2
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs


def step_kernels(cfg: ModelConfig, size: ModelSize, gpu: GPUSpec, batch: int,
                 queries: int, cached: int, decode: bool,
                 eff: Efficiency = Efficiency()) -> tuple[KernelTime, ...]:
    """The kernels of one engine step (:meth:`engine.model.CausalLM.forward` on the fused
    CUDA path, then greedy sampling), with their predicted times.

    The step runs ``queries`` new tokens of each of ``batch`` sequences after ``cached``
    tokens of context each, and takes logits for one row a sequence. ``decode`` (one
    query a sequence, a replayed CUDA graph) adds the split-KV merge after attention and
    runs its GEMMs at :attr:`Efficiency.decode_gemm_compute` when compute-bound; a
    prefill chunk (``decode`` false) runs them at :attr:`Efficiency.gemm_compute`.

    Per step: the embedding gather and the RoPE cos/sin tables (7 small kernels); per
    decoder layer: add + RMSNorm, fused QKV GEMM, RoPE + KV write, paged attention,
    (decode) split-KV merge, O GEMM, add + RMSNorm, fused gate/up GEMM, SiLU * up, down
    GEMM; then once: the two gathers of the logit rows, the final add + RMSNorm on them,
    the LM head GEMM (the embedding when tied: same bytes), the fp32 cast of the logits
    and argmax. GEMMs read their weights once a step plus activations in and out;
    attention reads each sequence's KV of the layer (``cached + queries`` tokens) plus
    its queries and writes its output; elementwise kernels read and write
    ``tokens x width`` elements. The merge runs only when the batch does not fill the
    GPU (:data:`SPLIT_KV_PROGRAMS`), with the engine's split count.

    Raises :class:`PlanError` unless ``batch`` and ``queries`` are >= 1 and ``cached``
    >= 0.
    """
    if batch < 1 or queries < 1 or cached < 0:
        raise PlanError(f"a step needs batch >= 1, queries >= 1 and cached >= 0 tokens; got "
                        f"{batch}, {queries}, {cached}")
    b = dtype_bytes(size.dtype)
    h, d, inter, vocab = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    qkv = q + 2 * kv
    tokens = batch * queries
    rows = batch
    layers = cfg.num_layers
    gemm_c = eff.decode_gemm_compute if decode else eff.gemm_compute

    def gemm(name: str, n_rows: int, k: int, n: int, bias: bool, launches: int = layers
             ) -> KernelTime:
        weights = (k * n + (n if bias else 0)) * b
        return _kernel(name, launches, 2.0 * n_rows * k * n,
                       weights + n_rows * (k + n) * b, gpu, gemm_c, eff.gemm_memory,
                       eff.gemm_floor)

    def elementwise(name: str, nbytes: float, launches: int = layers) -> KernelTime:
        return _kernel(name, launches, 0.0, nbytes, gpu, 1.0, eff.elementwise_memory,
                       eff.kernel_floor)

    norm = elementwise("add + RMSNorm", 4 * tokens * h * b + h * b)
    context = cached + queries
    attention = _kernel(
        "paged attention", layers, batch * attention_flops(cfg, queries, cached) / layers,
        batch * context * 2 * kv * b + 2 * tokens * q * b, gpu, eff.attention_compute,
        eff.attention_memory, eff.kernel_floor)
    kernels = [
        elementwise("embedding", 2 * tokens * h * b, 1),
        elementwise("RoPE tables", 2 * tokens * d * b, 7),
        norm,
        gemm("QKV GEMM", tokens, h, qkv, cfg.attention_bias),
        elementwise("RoPE + KV write", 2 * tokens * qkv * b + 2 * tokens * d * b),
        attention,
    ]
    programs = batch * cfg.num_kv_heads
    splits = min(-(-SPLIT_KV_PROGRAMS // programs), 16, max(1, -(-context // 128) // 4))
    if decode and programs < SPLIT_KV_PROGRAMS and splits > 1:
        # each split's fp32 partials (accumulator, max, sum) a query row, merged to one
        kernels.append(elementwise(
            "split-KV merge", splits * tokens * cfg.num_heads * (d + 2) * 4 + tokens * q * b))
    kernels += [
        gemm("O GEMM", tokens, q, h, cfg.attention_out_bias),
        norm,
        gemm("gate/up GEMM", tokens, h, 2 * inter, cfg.mlp_bias),
        elementwise("SiLU * up", 3 * tokens * inter * b),
        gemm("down GEMM", tokens, inter, h, cfg.mlp_bias),
        elementwise("logit-row gathers", 2 * rows * h * b, 2),
        elementwise("final add + RMSNorm", 4 * rows * h * b + h * b, 1),
        gemm("LM head GEMM", rows, h, vocab, False, 1),
        elementwise("fp32 logits", rows * vocab * (b + 4), 1),
        elementwise("argmax", rows * vocab * 4, 1),
    ]
    return tuple(kernels)


@dataclass(frozen=True)
class Roofline:
    """One predicted phase (a prefill of ``steps`` chunks, or one decode step), summed
    over its steps and each step's kernels (:func:`step_kernels`).

    ``flops`` and ``bytes``: what its kernels compute and move. ``compute_s``,
    ``memory_s`` and ``floors_s``: the GPU time of the kernels bound by compute, by
    memory and by their kernel floor; ``gpu_s`` their sum. ``host_s``: the host floor
    (layers x the per-layer host work of the step kind, a step). ``seconds``: each
    step's ``max(its GPU time, its host floor)``, summed. ``bound`` names what sets
    ``seconds``: ``host`` when the host floor wins (the GPU idles between launches: a
    small model, a CUDA graph replay or an eager prefill), else whichever of
    ``compute``, ``memory`` or ``floors`` (kernels at their minimum duration, however
    little they do) makes up the most of ``gpu_s``."""

    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    floors_s: float
    gpu_s: float
    host_s: float
    seconds: float
    bound: str
    steps: int = 1


def _phase(steps: Sequence[tuple[tuple[KernelTime, ...], float]]) -> Roofline:
    """Sum steps of ``(kernels, host floor)`` into a :class:`Roofline`."""
    parts = {"compute": 0.0, "memory": 0.0, "floor": 0.0}
    flops = nbytes = gpu_s = host_s = seconds = host_bound_s = 0.0
    for kernels, host in steps:
        step_gpu = 0.0
        for k in kernels:
            parts[k.bound] += k.seconds
            flops += k.flops
            nbytes += k.bytes
            step_gpu += k.seconds
        gpu_s += step_gpu
        host_s += host
        seconds += max(step_gpu, host)
        if host > step_gpu:
            host_bound_s += host
    if host_bound_s > seconds / 2:
        bound = "host"
    else:
        top = max(parts, key=lambda p: parts[p])
        bound = "floors" if top == "floor" else top
    return Roofline(flops, nbytes, parts["compute"], parts["memory"], parts["floor"],
                    gpu_s, host_s, seconds, bound, len(steps))


def prefill_roofline(cfg: ModelConfig, size: ModelSize, gpu: GPUSpec, tokens: int,
                     eff: Efficiency = Efficiency(),
                     chunk: int = MAX_NUM_BATCHED_TOKENS) -> Roofline:
    """Predicted prefill of one ``tokens``-token prompt (the TTFT on an idle server), in
    chunks of ``chunk`` tokens, each an eager step: its kernels (:func:`step_kernels`,
    attention over all earlier chunks' KV too, logits for its last token) against the
    prefill host floor."""
    steps = []
    for start in range(0, tokens, chunk):
        queries = min(chunk, tokens - start)
        steps.append((step_kernels(cfg, size, gpu, 1, queries, start, False, eff),
                      cfg.num_layers * eff.prefill_host_per_layer))
    return _phase(steps)


def decode_roofline(cfg: ModelConfig, size: ModelSize, gpu: GPUSpec, batch: int,
                    context: int, eff: Efficiency = Efficiency()) -> Roofline:
    """Predicted decode step of ``batch`` sequences of ``context`` tokens each, the new
    one included (the time per output token): its kernels (:func:`step_kernels`; the
    weights read once, each sequence's ``context`` tokens of KV once) against the decode
    host floor."""
    kernels = step_kernels(cfg, size, gpu, batch, 1, max(0, context - 1), True, eff)
    return _phase([(kernels, cfg.num_layers * eff.decode_host_per_layer)])


# ------------------------------------------------------------------------- tier sizing


@dataclass(frozen=True)
class TierTarget:
    """Smallest capacity of one tier reaching ``fraction`` of the infinite cache's hit
    rate: ``blocks`` of the workload's block size, ``bytes`` exact and in the int8 tier
    format, the ``hit_rate`` reached there, and ``prefill_saved_s`` the GPU time of the
    prompt tokens it serves (at the predicted prefill rate). ``reachable`` is false when
    even the whole footprint does not get there (then ``blocks`` is the footprint)."""

    tier: str
    fraction: float
    blocks: int
    bytes: int
    int8_bytes: int
    hit_rate: float
    prefill_saved_s: float
    reachable: bool


@dataclass(frozen=True)
class TierPlan:
    """Tier sizing on one workload. ``gpu_blocks`` is the GPU KV pool in the workload's
    blocks; ``gpu_hit_rate`` what the GPU alone reaches; ``infinite_hit_rate`` the upper
    bound; ``host`` the host DRAM needed with no disk (write-back: the GPU demotes to
    host); ``disk`` the disk needed behind a host tier of ``host_blocks`` (write-back
    cascade), or with no host tier (``host_blocks == 0``) under write-through, since
    write-back demotes only through host DRAM.

    The sizing replays ``requests`` of the workload's ``workload_requests``: a request
    longer than ``max_request_tokens`` (the model's context or the GPU pool, whichever is
    smaller: what a server admits) is left out, as a server refuses it;
    ``over_context`` of them exceed the model's context, ``over_pool`` fit the context
    but not the GPU pool, and ``longest_tokens`` is the longest request of the whole
    workload. ``prompt_tokens`` and ``footprint_blocks`` are those of the replayed
    requests."""

    workload: str
    requests: int
    prompt_tokens: int
    block_size: int
    footprint_blocks: int
    gpu_blocks: int
    gpu_hit_rate: float
    infinite_hit_rate: float
    host_blocks: int
    host: tuple[TierTarget, ...]
    disk: tuple[TierTarget, ...]
    replays: int
    seconds: float
    workload_requests: int = 0
    max_request_tokens: int = 0
    over_context: int = 0
    over_pool: int = 0
    longest_tokens: int = 0


def request_tokens(request: Any, block_size: int) -> int:
    """Tokens a request holds on the GPU: its prompt, or its full blocks (prompt and
    generated output) when they are more."""
    return max(int(request.prompt_tokens), len(request.keys) * block_size)


def infinite_hit_rate(workload: Any) -> float:
    """Hit rate (prompt tokens served / prompt tokens) of a cache that never evicts."""
    from bench.baselines import InfiniteCache

    cache = InfiniteCache(workload.block_size)
    hit = sum(cache.replay(r.keys, r.blocks, r.prompt_tokens)["cache"]
              for r in workload.requests)
    return hit / max(1, workload.prompt_tokens)


def simulated_hit_rate(workload: Any, gpu_blocks: int, host_blocks: int = 0,
                       disk_blocks: int = 0, policy: str = "write-back") -> float:
    """Hit rate of the store (simulation mode) with these capacities and ``policy``."""
    from kvstore.config import StoreConfig
    from kvstore.store import KVStore

    store = KVStore(StoreConfig.simulation(block_size=workload.block_size,
                                           gpu_blocks=gpu_blocks, host_blocks=host_blocks,
                                           disk_blocks=disk_blocks,
                                           policy=policy))  # type: ignore[arg-type]
    hit = 0
    for r in workload.requests:
        hit += sum(store.replay(r.keys, r.blocks, r.prompt_tokens).hit_tokens.values())
    store.close()
    return hit / max(1, workload.prompt_tokens)


def smallest_capacity(hit_rate_at: Callable[[int], float], goal: float, upper: int,
                      tolerance: float = 0.02) -> tuple[int, float, bool]:
    """Bisection: the smallest capacity in ``[0, upper]`` whose hit rate is >= ``goal``,
    to within ``tolerance`` x ``upper`` (hit rate grows with capacity). Returns
    ``(capacity, its hit rate, reached)``; ``reached`` is false when even ``upper``
    falls short (then ``upper`` is returned)."""
    at_zero = hit_rate_at(0)
    if at_zero >= goal:
        return 0, at_zero, True
    top = hit_rate_at(upper)
    if top < goal:
        return upper, top, False
    lo, hi, hi_rate = 0, upper, top
    step = max(1, int(upper * tolerance))
    while hi - lo > step:
        mid = (lo + hi) // 2
        rate = hit_rate_at(mid)
        if rate >= goal:
            hi, hi_rate = mid, rate
        else:
            lo = mid
    return hi, hi_rate, True


def size_tiers(workload: Any, gpu_blocks: int, kv_bytes_per_token: int,
               prefill_s_per_token: float, host_blocks: int = 0,
               int8_per_token: int | None = None,
               fractions: Sequence[float] = TARGET_FRACTIONS,
               progress: Callable[[str], None] | None = None,
               context_tokens: int | None = None) -> TierPlan:
    """Host and disk capacities reaching each fraction of the infinite hit rate.

    The GPU tier has exactly ``gpu_blocks`` blocks (of the workload's block size). A
    request longer than the model's ``context_tokens`` (no limit when ``None``) or than
    the GPU pool is left out of every replay and counted (:class:`TierPlan`): a server
    refuses it. Each replay is memoised, so the bisections of the three targets share
    their points. ``int8_per_token``: bytes a token in the int8 tier format (default
    half of ``kv_bytes_per_token``).

    Raises :class:`PlanError` when the GPU pool holds no block of the workload's size
    or no request of the workload fits.
    """
    t0 = time.perf_counter()
    bs = workload.block_size
    if gpu_blocks < 1:
        raise PlanError(f"the GPU KV pool holds no {bs}-token block of the workload: no "
                        "tier sizing (give a GPU with more memory, or a smaller model)")
    pool_tokens = gpu_blocks * bs
    limit = pool_tokens if context_tokens is None else min(context_tokens, pool_tokens)
    kept, over_context, over_pool, longest = [], 0, 0, 0
    for r in workload.requests:
        n = request_tokens(r, bs)
        longest = max(longest, n)
        if context_tokens is not None and n > context_tokens:
            over_context += 1
        elif n > pool_tokens:
            over_pool += 1
        else:
            kept.append(r)
    if not kept:
        raise PlanError(
            f"no request of the workload {workload.name} fits: all {len(workload.requests):,} "
            f"are longer than {limit:,} tokens (the model's context or the GPU KV pool of "
            f"{pool_tokens:,} tokens); give a model with a longer context or a larger GPU")
    total = len(workload.requests)
    if len(kept) < total:
        workload = replace(workload, requests=kept)
    gpu = gpu_blocks
    footprint = workload.distinct_blocks()
    inf = infinite_hit_rate(workload)
    cache: dict[tuple[int, int], float] = {}

    def rate(host: int, disk: int) -> float:
        if (host, disk) not in cache:
            if progress is not None:
                progress(f"replay gpu={gpu} host={host} disk={disk} blocks")
            policy = "write-back" if host or not disk else "write-through"
            cache[(host, disk)] = simulated_hit_rate(workload, gpu, host, disk, policy)
        return cache[(host, disk)]

    block_bytes = bs * kv_bytes_per_token
    int8_block = bs * (int8_per_token or kv_bytes_per_token // 2)
    prompt = workload.prompt_tokens

    def targets(tier: str, fn: Callable[[int], float]) -> tuple[TierTarget, ...]:
        out = []
        for f in fractions:
            blocks, reached_rate, ok = smallest_capacity(fn, f * inf, footprint)
            saved = reached_rate * prompt * prefill_s_per_token
            out.append(TierTarget(tier, f, blocks, blocks * block_bytes, blocks * int8_block,
                                  reached_rate, saved, ok))
        return tuple(out)

    host = targets("host", lambda n: rate(n, 0))
    disk = targets("disk", lambda n: rate(host_blocks, n))
    return TierPlan(workload.name, len(workload.requests), prompt, bs, footprint, gpu,
                    rate(0, 0), inf, host_blocks, host, disk, len(cache),
                    time.perf_counter() - t0, total, limit, over_context, over_pool, longest)


WORKLOADS = ("mooncake", "sharegpt", "generated")


def load_workload(name: str, quick: bool, trace: Path | None = None) -> Any:
    """A workload of :mod:`bench.workloads` by name; ``quick`` takes a subset (the first
    2,000 trace requests, 200 conversations, 16 x 8 generated prompts)."""
    from bench import workloads as wl

    if name == "mooncake":
        return wl.mooncake_workload(trace, limit=2000 if quick else None)
    if name == "sharegpt":
        return wl.sharegpt_workload(200 if quick else 2000, progress=True)
    if name == "generated":
        if quick:
            return wl.generated_shared_prefix_workload(16, 8)
        return wl.generated_shared_prefix_workload()
    raise PlanError(f"unknown workload {name!r}: give one of {', '.join(WORKLOADS)}")


# -------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Everything ``kvstore plan`` prints (``--json`` prints :meth:`to_dict`)."""

    model: str
    config: ModelConfig
    gpu: GPUSpec
    size: ModelSize
    memory: MemoryPlan
    efficiency: Efficiency
    prefill: Roofline
    decode_one: Roofline
    decode_batch: Roofline
    tiers: TierPlan | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def runs(self) -> bool:
        """Whether one sequence of the context fits (else the latencies are of a step
        that cannot run, and are not a result)."""
        return self.memory.max_batch > 0

    @property
    def decode_batch_size(self) -> int:
        """Sequences of :attr:`decode_batch`: ``concurrency``, or the largest batch when
        fewer fit (1 when none does)."""
        return max(1, min(self.memory.concurrency, self.memory.max_batch))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (bytes as ints, seconds as floats). ``runs`` false (no
        sequence fits) makes ``prefill``, ``decode_one`` and ``decode_batch`` null."""
        out = asdict(self)
        out["config"] = json.loads(self.config.identity())
        out["config"]["max_position_embeddings"] = self.config.max_position_embeddings
        out["config"]["max_context_len"] = self.config.max_context_len
        out["gpu"]["reached_flops"] = self.gpu.reached_flops
        out["gpu"]["reached_bandwidth"] = self.gpu.reached_bandwidth
        out["efficiency_of"] = ("fractions of gpu.reached_flops and gpu.reached_bandwidth "
                                "(what a matmul and a copy reach), not of gpu.flops and "
                                "gpu.bandwidth")
        out["runs"] = self.runs
        out["decode_batch_size"] = self.decode_batch_size
        if not self.runs:
            out["prefill"] = out["decode_one"] = out["decode_batch"] = None
        return out


def make_plan(model: str, cfg: ModelConfig, dtype: str, context: int, concurrency: int,
              gpu: GPUSpec, eff: Efficiency = Efficiency(),
              utilization: float = MEMORY_UTILIZATION, block_size: int = BLOCK_SIZE,
              chunk: int = MAX_NUM_BATCHED_TOKENS) -> Plan:
    """The memory and latency part of a plan (:func:`size_tiers` adds tiers).

    Raises :class:`PlanError` for a context beyond the model's, a non-positive context
    or concurrency, or a utilization outside (0, 1].
    """
    if context < 1:
        raise PlanError(f"--context must be a positive number of tokens, got {context}")
    if context > cfg.max_context_len:
        raise PlanError(f"--context {context} exceeds the model's context of "
                        f"{cfg.max_context_len} tokens; give at most {cfg.max_context_len}")
    if concurrency < 1:
        raise PlanError(f"--concurrency must be >= 1, got {concurrency}")
    if not 0 < utilization <= 1:
        raise PlanError(f"--memory-utilization must be in (0, 1], got {utilization}")
    if block_size < 1 or chunk < 1:
        raise PlanError("block size and prefill chunk must be >= 1 token")
    size = model_size(cfg, dtype, block_size)
    memory = plan_memory(cfg, size, gpu, context, concurrency, utilization, chunk)
    notes = []
    within = f"{utilization:.0%} of the GPU's {format_size(gpu.memory_bytes)}"
    nothing = "nothing runs: no TTFT or decode step is planned"
    if size.weights_bytes > memory.usable:
        notes.append(f"the weights ({format_size(size.weights_bytes)}) do not fit in "
                     f"{within} ({format_size(memory.usable)}): {nothing}; give a GPU "
                     "with more memory, a smaller dtype or a smaller model")
    elif memory.kv_pool_bytes == 0:
        notes.append(f"the weights ({format_size(size.weights_bytes)}) fit in {within}, "
                     f"but with the activations of one {chunk}-token step "
                     f"({format_size(memory.activations)}) no memory is left for KV: "
                     f"{nothing}; give a GPU with more memory or a higher "
                     "--memory-utilization")
    elif memory.max_batch == 0:
        notes.append(f"one sequence of {context:,} tokens "
                     f"({format_size(memory.blocks_per_sequence * size.kv_bytes_per_block)} "
                     f"of KV) does not fit the KV pool ({format_size(memory.kv_pool_bytes)}): "
                     f"{nothing}; give a shorter --context or a GPU with more memory")
    elif not memory.fits:
        notes.append(f"--concurrency {concurrency:,} exceeds the largest batch "
                     f"({memory.max_batch:,}) at {context:,} tokens: requests will queue; "
                     f"decode is planned at batch {memory.max_batch:,}")
    batch = max(1, min(concurrency, memory.max_batch))
    return Plan(model, cfg, gpu, size, memory, eff,
                prefill_roofline(cfg, size, gpu, context, eff, chunk),
                decode_roofline(cfg, size, gpu, 1, context, eff),
                decode_roofline(cfg, size, gpu, batch, context, eff), None, tuple(notes))


def _num(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} "


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


BOUND_TEXT = {"compute": "compute-bound", "memory": "memory-bound",
              "floors": "bound by kernel floors", "host": "host-bound"}
"""How the printout says each :attr:`Roofline.bound`."""


def _why(r: Roofline) -> str:
    steps = f"{r.steps} steps; " if r.steps > 1 else ""
    return (f"{BOUND_TEXT[r.bound]}; {steps}{_num(r.flops)}FLOP, {_num(r.bytes)}B; kernels "
            f"{_ms(r.gpu_s)}: compute {_ms(r.compute_s)} + memory {_ms(r.memory_s)} + "
            f"floors {_ms(r.floors_s)}; host floor {_ms(r.host_s)}")


def format_plan(plan: Plan) -> str:
    """The human-readable plan."""
    s, m, g, e, c = plan.size, plan.memory, plan.gpu, plan.efficiency, plan.config
    batch = plan.decode_batch_size
    attn = ("MHA" if c.num_kv_heads == c.num_heads else
            "MQA" if c.num_kv_heads == 1 else f"GQA {c.num_queries_per_kv}:1")
    lines = [
        f"model      {plan.model}: {c.num_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_heads} heads / {c.num_kv_heads} KV heads ({attn}), head_dim {c.head_dim}, "
        f"vocab {c.vocab_size}{', tied embeddings' if c.tie_word_embeddings else ''}; "
        f"context {c.max_context_len} tokens",
        f"gpu        {g.name} ({g.source}): {format_size(g.memory_bytes)}, "
        f"{g.bandwidth / 1e12:.2f} TB/s, {g.flops / 1e12:.0f} TFLOP/s bf16, "
        f"PCIe {g.pcie / 1e9:.0f} GB/s"
        + ("" if g.source == "measured" else
           f"; reached by a copy and a matmul (the rooflines' ceilings): "
           f"{g.reached_bandwidth / 1e12:.2f} TB/s, {g.reached_flops / 1e12:.0f} TFLOP/s"),
        "",
        f"parameters {s.parameters:,} ({s.parameters / 1e9:.2f} B)",
        f"weights    {s.weights_bytes / 1e9:.2f} GB ({format_size(s.weights_bytes)}) "
        f"in {s.dtype}",
        f"KV         {format_size(s.kv_bytes_per_token)} a token "
        f"({s.kv_bytes_per_token:,} B), {format_size(s.kv_bytes_per_block)} a "
        f"{s.block_size}-token block, {format_size(s.kv_bytes_per_token * m.context)} for "
        f"{m.context:,} tokens",
        f"memory     {m.utilization:.0%} of {format_size(m.gpu_memory)} = "
        f"{format_size(m.usable)}: weights {format_size(m.weights)} + activations "
        f"{format_size(m.activations)} (one {MAX_NUM_BATCHED_TOKENS}-token step, logits of "
        f"{m.logits_rows:,} row{'s' if m.logits_rows > 1 else ''}) + KV pool "
        f"{format_size(m.kv_pool_bytes)}",
        f"KV pool    {m.kv_pool_blocks:,} blocks = {m.kv_pool_tokens:,} tokens; largest "
        f"batch at {m.context:,} tokens: {m.max_batch:,} sequences "
        f"({m.blocks_per_sequence} blocks each)",
        "",
    ]
    if plan.runs:
        lines += [
            f"prefill    {m.context:,} tokens: TTFT {_ms(plan.prefill.seconds)} "
            f"({_why(plan.prefill)})",
            f"decode     batch 1: {_ms(plan.decode_one.seconds)} per output token "
            f"({_why(plan.decode_one)})",
            f"decode     batch {batch}: {_ms(plan.decode_batch.seconds)} per step, "
            f"{batch / plan.decode_batch.seconds:,.0f} output tokens/s "
            f"({_why(plan.decode_batch)})",
        ]
    else:
        lines.append(f"latency    none: no sequence of {m.context:,} tokens fits (see the "
                     "note), so there is no TTFT or decode step to plan")
    lines.append(f"assumed    {format_assumptions(e, g)}")
    if plan.tiers is not None:
        t = plan.tiers
        lines += [
            "",
            f"workload   {t.workload}: {t.requests:,} requests, {t.prompt_tokens:,} prompt "
            f"tokens, footprint {t.footprint_blocks:,} blocks of {t.block_size} tokens",
        ]
        if t.requests < t.workload_requests:
            left = []
            if t.over_context:
                left.append(f"{t.over_context:,} longer than the model's context of "
                            f"{c.max_context_len:,} tokens")
            if t.over_pool:
                left.append(f"{t.over_pool:,} longer than the GPU KV pool of "
                            f"{t.gpu_blocks * t.block_size:,} tokens")
            lines.append(
                f"           of {t.workload_requests:,}: left out {' and '.join(left)} "
                f"(longest {t.longest_tokens:,} tokens), as a server refuses them; the "
                "hit rates and capacities are of the requests it admits")
        lines += [
            f"hit rate   infinite cache {t.infinite_hit_rate:.1%}; GPU pool alone "
            f"({t.gpu_blocks:,} blocks of {t.block_size} = "
            f"{t.gpu_blocks * t.block_size:,} tokens) {t.gpu_hit_rate:.1%}",
            f"{'tier':<26} {'target':>7} {'capacity':>12} {'int8 tier':>11} {'hit rate':>9} "
            f"{'prefill saved':>14}",
        ]
        behind = (f"disk behind host {format_size(t.host_blocks * t.block_size * s.kv_bytes_per_token)}"
                  if t.host_blocks else "disk, write-through")
        for label, rows in (("host DRAM (no disk)", t.host), (behind, t.disk)):
            for r in rows:
                cap = format_size(r.bytes) + ("" if r.reachable else "!")
                lines.append(f"{label:<26} {r.fraction:>6.0%} {cap:>12} "
                             f"{format_size(r.int8_bytes):>11} {r.hit_rate:>8.1%} "
                             f"{r.prefill_saved_s:>12.1f} s")
        if t.gpu_hit_rate >= max(TARGET_FRACTIONS) * t.infinite_hit_rate:
            lines.append("           the GPU pool alone holds this workload's reuse: no lower "
                         "tier is needed")
        lines.append(f"           ({t.replays} simulated replays in {t.seconds:.1f} s; "
                     "! = not reached with the whole footprint; prefill saved = GPU time "
                     "of the hit prompt tokens at the predicted prefill rate)")
    for note in plan.notes:
        lines.append(f"note       {note}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore plan",
        description="Capacity plan of a deployment from first principles: weights, KV bytes "
                    "per token and block, KV pool and largest batch, roofline TTFT and time "
                    "per output token, and host/disk sizing from the store's simulation of "
                    "a workload.",
        epilog=f"{SIZE_HELP}. Example: kvstore plan --model llama3-8b --dtype bf16 "
               "--context 8192 --concurrency 64 --gpu H100 --workload mooncake --quick")
    p.add_argument("--model", required=True,
                   help=f"named shape ({', '.join(named_model_configs())}) or the path of a "
                        "Hugging Face config.json (or its directory)")
    add_dtype_argument(p, "weights and KV dtype (default: %(default)s)", default="bfloat16")
    p.add_argument("--context", type=int, required=True,
                   help="tokens per sequence (prompt and reply) for the pool, the largest "
                        "batch, the prefill and the decode predictions")
    p.add_argument("--concurrency", type=int, default=1,
                   help="sequences decoding together (default: %(default)s)")
    p.add_argument("--gpu", default=None,
                   help=f"GPU from the table ({', '.join(g.name for g in GPUS.values())}) "
                        "(default: measure the local CUDA GPU, else H100-SXM)")
    p.add_argument("--workload", default=None, choices=WORKLOADS,
                   help="size host and disk tiers on this workload (store simulation; "
                        "default: none)")
    p.add_argument("--quick", action="store_true",
                   help="with --workload: a subset (2,000 trace requests, 200 chats, 128 "
                        "generated prompts)")
    p.add_argument("--trace", type=Path, default=None,
                   help="with --workload mooncake: the Mooncake trace JSONL (default: "
                        "bench/data/, or $KVSTORE_DATA)")
    p.add_argument("--host-bytes", type=size_arg, default=None, metavar="SIZE",
                   help="with --workload: host DRAM tier in front of the disk when sizing "
                        "the disk (e.g. 64GiB; default: 0, the disk right behind the GPU)")
    p.add_argument("--memory-utilization", type=float, default=MEMORY_UTILIZATION,
                   help="fraction of GPU memory for weights, activations and KV "
                        "(default: %(default)s)")
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE,
                   help="tokens per KV block (default: %(default)s)")
    p.add_argument("--prefill-efficiency", type=float, default=GEMM_COMPUTE_EFFICIENCY,
                   help="fraction of the FLOP/s a large bf16 matmul reaches (measured, or "
                        f"for a --gpu from the table {TABLE_FLOPS_REACHED} x its data "
                        "sheet's peak) that the prefill GEMMs reach; the default "
                        f"%(default)s is {GEMM_COMPUTE_EFFICIENCY * TABLE_FLOPS_REACHED:.2f} "
                        "of a table GPU's peak")
    p.add_argument("--decode-efficiency", type=float, default=GEMM_MEMORY_EFFICIENCY,
                   help="fraction of the bandwidth a device copy reaches (measured, or for "
                        f"a --gpu from the table {TABLE_BANDWIDTH_REACHED} x its data "
                        "sheet's HBM bandwidth) that the decode GEMMs reach reading the "
                        f"weights; the default %(default)s is "
                        f"{GEMM_MEMORY_EFFICIENCY * TABLE_BANDWIDTH_REACHED:.2f} of a table "
                        "GPU's HBM bandwidth")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _default_gpu() -> GPUSpec:
    try:
        import torch

        if torch.cuda.is_available():
            return measure_device("cuda")
    except ImportError:
        pass
    return GPUS["h100-sxm"]


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.workload is None:
        given = [flag for flag, value in (("--host-bytes", args.host_bytes is not None),
                                          ("--quick", args.quick),
                                          ("--trace", args.trace is not None)) if value]
        if given:
            flags = " and ".join(given)
            p.error(f"{flags} only appl{'ies' if len(given) == 1 else 'y'} to sizing the "
                    f"host and disk tiers on a workload: add --workload "
                    f"{{{','.join(WORKLOADS)}}}, or leave {flags} out")
    elif args.trace is not None and args.workload != "mooncake":
        p.error(f"--trace is a Mooncake trace: give it with --workload mooncake, not "
                f"--workload {args.workload}")
    if args.gpu is not None and not args.gpu.strip():
        p.error("argument --gpu: the GPU name is empty; give one of "
                f"{', '.join(g.name for g in GPUS.values())}, or leave --gpu out to measure "
                "the local CUDA GPU")
    try:
        name, cfg = resolve_model(args.model)
        dtype_bytes(args.dtype)
        host_bytes = args.host_bytes or 0
        gpu = resolve_gpu(args.gpu) if args.gpu is not None else _default_gpu()
        eff = Efficiency(gemm_compute=args.prefill_efficiency,
                         gemm_memory=args.decode_efficiency)
        plan = make_plan(name, cfg, args.dtype, args.context, args.concurrency, gpu, eff,
                         args.memory_utilization, args.block_size)
        if args.gpu is None and gpu.source == "table":
            plan = replace(plan, notes=plan.notes + (
                f"no --gpu and no CUDA device here: planned for the {gpu.name}",))
        if args.workload:
            try:
                workload = load_workload(args.workload, args.quick, args.trace)
            except (FileNotFoundError, ValueError) as exc:  # ValueError: path:line and why
                raise PlanError(str(exc)) from None
            per_token = plan.prefill.seconds / args.context
            wbs = workload.block_size
            gpu_blocks = plan.memory.kv_pool_tokens // wbs
            host_blocks = host_bytes // (wbs * plan.size.kv_bytes_per_token)
            say = None if args.json else (lambda m: print(f"  {m}", file=sys.stderr,
                                                          flush=True))
            if not plan.runs:
                plan = replace(plan, notes=plan.notes + (
                    "no tier sizing: it needs the prefill rate of a sequence of --context "
                    "tokens, and none fits; give a --context the KV pool holds",))
            elif gpu_blocks < 1:
                plan = replace(plan, notes=plan.notes + (
                    f"no tier sizing: the KV pool ({plan.memory.kv_pool_tokens:,} tokens) "
                    f"holds no {wbs}-token block of the {args.workload} workload",))
            else:
                tiers = size_tiers(workload, gpu_blocks, plan.size.kv_bytes_per_token,
                                   per_token, host_blocks, int8_bytes_per_token(cfg),
                                   progress=say, context_tokens=cfg.max_context_len)
                plan = replace(plan, tiers=tiers)
    except PlanError as exc:
        print(f"kvstore plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

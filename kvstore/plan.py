"""Capacity planning from first principles: ``kvstore plan``.

From a model shape, a KV dtype, a GPU and a workload, the plan states what a deployment
needs before it runs:

- **weights**: parameters x bytes per parameter;
- **KV**: ``2 (K, V) x layers x kv_heads x head_dim x bytes`` per token, times
  ``block_size`` per block (MHA, GQA and MQA differ only in ``kv_heads``);
- **KV pool and largest batch**: the GPU memory left for KV after the weights and a
  stated reserve, and how many sequences of the requested context fit in it;
- **latency**: a roofline per step, the larger of compute time (FLOPs / achieved FLOP/s)
  and memory time (bytes / achieved bandwidth), plus a per-layer launch floor.
  Prefill is bound by compute, decode by memory bandwidth;
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

PREFILL_COMPUTE_EFFICIENCY = 0.70
"""Fraction of the GPU's dense bf16 FLOP/s the engine's prefill reaches (fused QKV,
gate/up and down GEMMs plus Triton paged attention, one 8,192-token chunk). From
``kvstore bench plan`` on an H200 (Llama-3-8B shape, random bf16 weights, 2,048-token
prompt): 0.73 of the measured 717 TFLOP/s. Recalibrate with that bench on the target GPU."""

DECODE_MEMORY_EFFICIENCY = 0.72
"""Fraction of the HBM bandwidth a decode step reaches (weight GEMVs and paged-attention
reads of the KV). Same bench and shape, 2,048-token contexts: 0.77 at batch 1, 0.66 at
batch 64, 0.80 at the largest batch (431), of the measured 3.94 TB/s."""

DECODE_COMPUTE_EFFICIENCY = 0.40
"""Fraction of dense bf16 FLOP/s reached by the skinny GEMMs of a decode step (matters
only for large batches, where decode turns compute-bound; not yet measured)."""

DECODE_FLOOR_S_PER_LAYER = 50e-6
"""Floor of one decode step per decoder layer (seconds): a small model's step is bound by
the engine's per-step host work and CUDA-graph replay, not by FLOPs or bytes. From the
same bench: SmolLM2 (30 layers) decodes at batch 1 in 1.5 ms an engine step."""

PREFILL_FLOOR_S_PER_LAYER = 550e-6
"""Floor of one prefill chunk per decoder layer (seconds; eager, no CUDA graph). From the
same bench: SmolLM2's 2,048-token prompt reaches its first token in 16.4 ms (one point:
recalibrate at the context you plan for)."""

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
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read {path} as JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlanError(f"{path} is not a config.json object")
        try:
            return path.parent.name or path.stem, ModelConfig.from_hf_dict(data)
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
    bytes/s, one direction). ``source``: ``table`` (data sheet) or ``measured``."""

    name: str
    memory_bytes: int
    bandwidth: float
    flops: float
    pcie: float
    source: str = "table"


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
    gate/up output, fp32 logits of the sampled rows); ``kv_pool = usable - weights -
    activations``. ``max_batch``: sequences of ``context`` tokens whose blocks fit the
    pool (each takes ``ceil(context / block_size)`` blocks).
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
    :class:`MemoryPlan`). The pool is 0 when the weights do not fit."""
    usable = int(gpu.memory_bytes * utilization)
    act = activation_bytes(cfg, dtype_bytes(size.dtype), max_num_batched_tokens,
                           max(1, concurrency))
    pool = max(0, usable - size.weights_bytes - act)
    blocks = pool // size.kv_bytes_per_block
    per_seq = -(-context // size.block_size)
    max_batch = blocks // per_seq
    return MemoryPlan(gpu.memory_bytes, utilization, usable, size.weights_bytes, act, pool,
                      blocks, blocks * size.block_size, context, per_seq, max_batch,
                      concurrency, concurrency <= max_batch)


# ---------------------------------------------------------------------------- roofline


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the ceilings the engine reaches (see the module constants)."""

    prefill_compute: float = PREFILL_COMPUTE_EFFICIENCY
    decode_memory: float = DECODE_MEMORY_EFFICIENCY
    decode_compute: float = DECODE_COMPUTE_EFFICIENCY
    decode_floor_per_layer: float = DECODE_FLOOR_S_PER_LAYER
    prefill_floor_per_layer: float = PREFILL_FLOOR_S_PER_LAYER

    def __post_init__(self) -> None:
        for name in ("prefill_compute", "decode_memory", "decode_compute"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise PlanError(f"efficiency {name} must be in (0, 1], got {value}")
        if min(self.decode_floor_per_layer, self.prefill_floor_per_layer) < 0:
            raise PlanError("the per-layer step floors must be >= 0 seconds")


@dataclass(frozen=True)
class Roofline:
    """One predicted phase: ``flops`` and ``bytes`` moved, ``compute_s = flops /
    (flops/s x efficiency)``, ``memory_s = bytes / (bandwidth x efficiency)``,
    ``floor_s`` the launch floor, ``seconds = max(compute_s, memory_s, floor_s)`` and
    ``bound`` which of the three it is."""

    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    floor_s: float
    seconds: float
    bound: str


def _roofline(flops: float, nbytes: float, gpu: GPUSpec, compute_eff: float,
              memory_eff: float, floor_s: float) -> Roofline:
    compute_s = flops / (gpu.flops * compute_eff)
    memory_s = nbytes / (gpu.bandwidth * memory_eff)
    seconds = max(compute_s, memory_s, floor_s)
    bound = ("compute" if seconds == compute_s else "memory" if seconds == memory_s
             else "launch")
    return Roofline(flops, nbytes, compute_s, memory_s, floor_s, seconds, bound)


def attention_flops(cfg: ModelConfig, queries: int, context_start: int) -> float:
    """FLOPs of causal attention for ``queries`` new tokens after ``context_start`` cached
    ones: ``QK^T`` and ``PV``, 2 x 2 x heads x head_dim FLOPs per (query, key) pair."""
    pairs = queries * context_start + queries * (queries + 1) / 2
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs


def prefill_roofline(cfg: ModelConfig, size: ModelSize, gpu: GPUSpec, tokens: int,
                     eff: Efficiency = Efficiency(),
                     chunk: int = MAX_NUM_BATCHED_TOKENS) -> Roofline:
    """Predicted prefill of one ``tokens``-token prompt (the TTFT on an idle server), in
    chunks of ``chunk`` tokens: every chunk reads the weights once and writes its KV;
    logits only for the last token."""
    chunks = -(-tokens // chunk)
    layer_params = size.matmul_parameters - (cfg.vocab_size * cfg.hidden_size)
    flops = (2.0 * layer_params * tokens + 2.0 * cfg.vocab_size * cfg.hidden_size
             + attention_flops(cfg, tokens, 0))
    nbytes = (chunks * size.weights_bytes + tokens * size.kv_bytes_per_token
              + chunks * tokens / 2 * size.kv_bytes_per_token)
    floor = chunks * cfg.num_layers * eff.prefill_floor_per_layer
    return _roofline(flops, nbytes, gpu, eff.prefill_compute, eff.decode_memory, floor)


def decode_roofline(cfg: ModelConfig, size: ModelSize, gpu: GPUSpec, batch: int,
                    context: int, eff: Efficiency = Efficiency()) -> Roofline:
    """Predicted decode step of ``batch`` sequences of ``context`` tokens each (the time
    per output token): the weights are read once per step, each sequence's KV once."""
    flops = 2.0 * size.matmul_parameters * batch + attention_flops(cfg, 1, context) * batch
    nbytes = size.weights_bytes + batch * context * size.kv_bytes_per_token
    floor = cfg.num_layers * eff.decode_floor_per_layer
    return _roofline(flops, nbytes, gpu, eff.decode_compute, eff.decode_memory, floor)


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
    write-back demotes only through host DRAM. ``prompt_tokens`` of ``requests``."""

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
               progress: Callable[[str], None] | None = None) -> TierPlan:
    """Host and disk capacities reaching each fraction of the infinite hit rate.

    The GPU tier has ``gpu_blocks`` blocks (never fewer than the largest request, as a
    sequence must fit on the GPU). Each replay is memoised, so the bisections of the
    three targets share their points. ``int8_per_token``: bytes a token in the int8
    tier format (default half of ``kv_bytes_per_token``).
    """
    t0 = time.perf_counter()
    bs = workload.block_size
    largest = max(len(r.keys) for r in workload.requests)
    gpu = max(gpu_blocks, largest, 1)
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
                    time.perf_counter() - t0)


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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (bytes as ints, seconds as floats)."""
        out = asdict(self)
        out["config"] = json.loads(self.config.identity())
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
    if memory.kv_pool_bytes == 0:
        notes.append(f"the weights ({format_size(size.weights_bytes)}) do not fit in "
                     f"{utilization:.0%} of the GPU's {format_size(gpu.memory_bytes)}")
    elif memory.max_batch == 0:
        notes.append(f"one sequence of {context} tokens does not fit the KV pool")
    elif not memory.fits:
        notes.append(f"--concurrency {concurrency} exceeds the largest batch "
                     f"({memory.max_batch}) at {context} tokens: requests will queue")
    batch = max(1, min(concurrency, memory.max_batch or 1))
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


def format_plan(plan: Plan) -> str:
    """The human-readable plan."""
    s, m, g, e, c = plan.size, plan.memory, plan.gpu, plan.efficiency, plan.config
    attn = ("MHA" if c.num_kv_heads == c.num_heads else
            "MQA" if c.num_kv_heads == 1 else f"GQA {c.num_queries_per_kv}:1")
    lines = [
        f"model      {plan.model}: {c.num_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_heads} heads / {c.num_kv_heads} KV heads ({attn}), head_dim {c.head_dim}, "
        f"vocab {c.vocab_size}{', tied embeddings' if c.tie_word_embeddings else ''}; "
        f"context {c.max_context_len} tokens",
        f"gpu        {g.name} ({g.source}): {format_size(g.memory_bytes)}, "
        f"{g.bandwidth / 1e12:.2f} TB/s, {g.flops / 1e12:.0f} TFLOP/s bf16, "
        f"PCIe {g.pcie / 1e9:.0f} GB/s",
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
        f"{format_size(m.activations)} (one {MAX_NUM_BATCHED_TOKENS}-token step) + KV pool "
        f"{format_size(m.kv_pool_bytes)}",
        f"KV pool    {m.kv_pool_blocks:,} blocks = {m.kv_pool_tokens:,} tokens; largest "
        f"batch at {m.context:,} tokens: {m.max_batch:,} sequences "
        f"({m.blocks_per_sequence} blocks each)",
        "",
        f"prefill    {m.context:,} tokens: TTFT {_ms(plan.prefill.seconds)} "
        f"({plan.prefill.bound}-bound; {_num(plan.prefill.flops)}FLOP at "
        f"{e.prefill_compute:.0%} of peak)",
        f"decode     batch 1: {_ms(plan.decode_one.seconds)} per output token "
        f"({plan.decode_one.bound}-bound; {_num(plan.decode_one.bytes)}B at "
        f"{e.decode_memory:.0%} of bandwidth)",
        f"decode     batch {max(1, min(m.concurrency, m.max_batch or 1))}: "
        f"{_ms(plan.decode_batch.seconds)} per step "
        f"({plan.decode_batch.bound}-bound), "
        f"{max(1, min(m.concurrency, m.max_batch or 1)) / plan.decode_batch.seconds:,.0f} "
        "output tokens/s",
        f"assumed    efficiencies: prefill {e.prefill_compute:.0%} of FLOP/s, decode "
        f"{e.decode_memory:.0%} of bandwidth ({e.decode_compute:.0%} of FLOP/s when "
        f"compute-bound); step floors a layer: decode {e.decode_floor_per_layer * 1e6:.0f} us, "
        f"prefill {e.prefill_floor_per_layer * 1e6:.0f} us",
    ]
    if plan.tiers is not None:
        t = plan.tiers
        lines += [
            "",
            f"workload   {t.workload}: {t.requests:,} requests, {t.prompt_tokens:,} prompt "
            f"tokens, footprint {t.footprint_blocks:,} blocks of {t.block_size} tokens",
            f"hit rate   infinite cache {t.infinite_hit_rate:.1%}; GPU pool alone "
            f"({t.gpu_blocks:,} blocks) {t.gpu_hit_rate:.1%}",
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
                   help="Mooncake trace JSONL (default: bench/data/, or $KVSTORE_DATA)")
    p.add_argument("--host-bytes", type=size_arg, default=0, metavar="SIZE",
                   help="host DRAM tier in front of the disk when sizing the disk (e.g. "
                        "64GiB; default: 0, the disk right behind the GPU)")
    p.add_argument("--memory-utilization", type=float, default=MEMORY_UTILIZATION,
                   help="fraction of GPU memory for weights, activations and KV "
                        "(default: %(default)s)")
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE,
                   help="tokens per KV block (default: %(default)s)")
    p.add_argument("--prefill-efficiency", type=float, default=PREFILL_COMPUTE_EFFICIENCY,
                   help="fraction of peak FLOP/s prefill reaches (default: %(default)s)")
    p.add_argument("--decode-efficiency", type=float, default=DECODE_MEMORY_EFFICIENCY,
                   help="fraction of HBM bandwidth decode reaches (default: %(default)s)")
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
    try:
        name, cfg = resolve_model(args.model)
        dtype_bytes(args.dtype)
        host_bytes = args.host_bytes
        gpu = resolve_gpu(args.gpu) if args.gpu else _default_gpu()
        eff = Efficiency(prefill_compute=args.prefill_efficiency,
                         decode_memory=args.decode_efficiency)
        plan = make_plan(name, cfg, args.dtype, args.context, args.concurrency, gpu, eff,
                         args.memory_utilization, args.block_size)
        if not args.gpu and gpu.source == "table":
            plan = replace(plan, notes=plan.notes + (
                f"no --gpu and no CUDA device here: planned for the {gpu.name}",))
        if args.workload:
            try:
                workload = load_workload(args.workload, args.quick, args.trace)
            except FileNotFoundError as exc:
                raise PlanError(str(exc)) from None
            per_token = plan.prefill.seconds / args.context
            wbs = workload.block_size
            gpu_blocks = plan.memory.kv_pool_tokens // wbs
            host_blocks = host_bytes // (wbs * plan.size.kv_bytes_per_token)
            say = None if args.json else (lambda m: print(f"  {m}", file=sys.stderr,
                                                          flush=True))
            tiers = size_tiers(workload, gpu_blocks, plan.size.kv_bytes_per_token,
                               per_token, host_blocks, int8_bytes_per_token(cfg),
                               progress=say)
            plan = replace(plan, tiers=tiers)
    except PlanError as exc:
        print(f"kvstore plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

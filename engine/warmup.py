"""Start-up warm-up: run every kernel variant a request can hit before the first request.

On CUDA the first use of a kernel costs far more than its run: Triton compiles (or loads
from its disk cache) one binary per *specialisation* of ``write_kv``, the attention
kernel and the split-KV merge, CUDA modules load lazily, and each decode batch size
captures its CUDA graph. Left to the first request, that is the first chat turn's TTFT.
:func:`warm_up` pays it at start-up, in this order:

1. the tokenizer's chat template (compiled on first use);
2. eager steps of planned shapes (:func:`plan_steps`): one step per distinct kernel
   specialisation the attention launch heuristic can pick for steps this engine can
   schedule (decode-like and prefill-like configs, split-KV with each merge width,
   block-table widths of 1, a multiple of 16 and neither, which Triton specialises
   on), most with a cached prefix. Their slot mapping is ``-1``: ``write_kv`` runs and
   writes nothing; attention reads pool slot 0, whatever it holds, and the logits are
   dropped;
3. the decode CUDA graphs of every batch size (:meth:`engine.runner.ModelRunner.capture`,
   which itself runs padding rows only, slot mapping ``-1``);
4. the sampler (greedy argmax as the engine takes it, temperature, top-k, top-p, seeded
   generators) on random logits drawn from a private generator;
5. the store's kernels: the block copy between pools (``tiers.block_copy``) and, with
   ``--kv-format int8|fp8``, the quantize and dequantize kernels (``tiers.quant``), on
   slots allocated for it and freed at once (a free slot is written before it is read).

The warm-up writes no KV a request could read, leaves the index, the slot pools' free
lists, the cost model, the engine's counters and torch's global RNG as they were, and
so changes no output: greedy tokens are identical with and without it
(``tests/test_warmup.py``).

On CPU there is nothing to compile and the first turn is barely slower than the next,
so :func:`enabled` turns it off there by default (``warmup=True`` forces it); the test
suite's CPU start-ups are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.batch import BatchStager
from engine.sampling import SamplingParams, make_generator, sample

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.tokenizer import Tokenizer
    from kvstore.store import KVStore

log = logging.getLogger(__name__)

Key = tuple[object, ...]


def enabled(device: torch.device, requested: bool | None) -> bool:
    """Whether to warm up: ``requested`` when given, else on CUDA only."""
    return requested if requested is not None else device.type == "cuda"


@dataclass(frozen=True)
class StepShape:
    """One planned eager step: ``query_lens[b]`` queries of sequence ``b`` over
    ``seq_lens[b]`` tokens of context, block tables ``width`` blocks wide; ``key`` is
    the kernel specialisation it covers."""

    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    width: int
    key: Key

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


@dataclass
class WarmupReport:
    """What :func:`warm_up` ran and how long each part took (seconds)."""

    seconds: float = 0.0
    eager_steps: int = 0
    variants: int = 0
    graphs: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"{self.eager_steps} eager steps ({self.variants} kernel variants)"]
        if self.graphs:
            parts.append(f"{len(self.graphs)} decode graphs (batch {self.graphs[0]}.."
                         f"{self.graphs[-1]})")
        parts.append(", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in self.phases.items()))
        text = f"warm-up took {self.seconds:.2f} s: " + "; ".join(parts)
        if self.failed:
            text += "; failed: " + ", ".join(f"{k} ({v})" for k, v in self.failed.items())
        return text


# ------------------------------------------------------------------- planning

def _int_class(value: int) -> str:
    """How Triton specialises an int argument: ``"1"`` (a constant), ``"D"`` (divisible
    by 16) or ``""``."""
    return "1" if value == 1 else "D" if value % 16 == 0 else ""


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def triton_key(num_tokens: int, num_seqs: int, width: int, *, num_heads: int,
               num_kv_heads: int, head_dim: int, block_size: int, device: torch.device,
               elem_bytes: int) -> Key:
    """The specialisation of ``engine.triton_attention``'s kernels that a step of these
    shapes launches: the config :func:`engine.triton_attention.choose_config` picks
    (its compile-time parts: rows, KV tile, warps, stages, split or not and, split, the
    merge kernel's width), and the classes of the int arguments that vary with the step
    (the block-table row stride, ``width``, and the split scratch strides, which grow
    with ``num_tokens``). Every other argument of the launch is fixed per model."""
    from engine.triton_attention import choose_config

    cfg = choose_config(num_tokens, num_seqs, num_heads, num_kv_heads, head_dim,
                        width * block_size, device, elem_bytes)
    block_m = max(cfg.block_m, _pow2(num_heads // num_kv_heads))
    key: list[object] = [block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                         _int_class(width)]
    if cfg.num_splits > 1:
        key += ["split", max(2, _pow2(cfg.num_splits)),
                _int_class(num_tokens * num_heads * head_dim),
                _int_class(num_tokens * num_heads * 2)]
    return tuple(key)


def _candidates(limit: int, small: int = 8) -> list[int]:
    """1..small, then around every power of two and 1.5 times one (``x - 1``, ``x``,
    ``x + 1``), then ``limit``; all within ``1..limit``, ascending."""
    values = set(range(1, small + 1))
    x = 1
    while x <= 2 * limit:
        for v in (x - 1, x, x + 1, x + x // 2):
            values.add(v)
        x *= 2
    values.add(limit)
    return sorted(v for v in values if 1 <= v <= limit)


def plan_steps(key_of: Callable[[int, int, int], Key], *, block_size: int, max_tokens: int,
               max_seqs: int, max_context: int) -> list[StepShape]:
    """One cheap step shape per distinct ``key_of(num_tokens, num_seqs, width)`` over
    the steps an engine can schedule: up to ``max_tokens`` tokens of up to ``max_seqs``
    sequences, contexts up to ``max_context`` tokens.

    Shapes are searched on a grid dense at small sizes and around powers of two (where
    launch heuristics and Triton's divisibility classes change); for each key the step
    with the fewest tokens, then the narrowest block tables, then the fewest sequences
    is kept. Sequence 0 is the longest (``width`` full blocks: a prefill or decode after
    a cached prefix); the others hold only their queries.
    """
    max_width = max(1, max_context // block_size)
    widths = _candidates(max_width)
    found: dict[Key, tuple[tuple[int, int, int], int, int, int]] = {}
    for num_tokens in _candidates(max_tokens):
        for num_seqs in _candidates(min(max_seqs, num_tokens)):
            longest = -(-num_tokens // num_seqs)
            least = -(-longest // block_size)
            if least > max_width:
                continue
            for width in widths:
                if width < least:
                    continue
                key = key_of(num_tokens, num_seqs, width)
                cost = (num_tokens, width, num_seqs)
                if key not in found or cost < found[key][0]:
                    found[key] = (cost, num_tokens, num_seqs, width)
    shapes = []
    for key, (_, num_tokens, num_seqs, width) in found.items():
        base, extra = divmod(num_tokens, num_seqs)
        query_lens = tuple(base + (i < extra) for i in range(num_seqs))
        seq_lens = (width * block_size, *query_lens[1:])
        shapes.append(StepShape(query_lens, seq_lens, width, key))
    shapes.sort(key=lambda s: (s.num_tokens, s.width, len(s.seq_lens)))
    return shapes


def basic_plan(*, block_size: int, max_tokens: int, max_seqs: int,
               max_context: int) -> list[StepShape]:
    """A few representative steps for backends with nothing to specialise (the torch
    reference): a prefill, a prefill after a cached prefix, a mixed prefill + decode
    step and decode steps of one and of several sequences."""
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    prompt = max(1, min(32, max_tokens, max_context))
    shapes.append(((prompt,), (prompt,)))
    prefix = min(2 * block_size, max_context - 1)
    if prefix > 0:
        q = max(1, min(16, max_tokens, max_context - prefix))
        shapes.append(((q,), (prefix + q,)))
    seqs = min(4, max_seqs, max_tokens)
    if seqs > 1:
        q = max(1, min(16, max_tokens - (seqs - 1), max_context))
        shapes.append(((q, *[1] * (seqs - 1)), (q, *[min(max_context, 2 * block_size)]
                                                     * (seqs - 1))))
    for b in sorted({1, min(8, max_seqs, max_tokens)}):
        shapes.append(((1,) * b, (min(max_context, block_size + 1),) * b))
    out: list[StepShape] = []
    for query_lens, seq_lens in shapes:
        width = max(-(-n // block_size) for n in seq_lens)
        out.append(StepShape(tuple(query_lens), tuple(seq_lens), width,
                             (len(out),)))
    return out


def plan_for(engine: Engine) -> list[StepShape]:
    """The eager steps to warm ``engine`` with: :func:`plan_steps` over the Triton
    kernels' specialisations, or :func:`basic_plan` for another backend."""
    model = engine.model
    cfg = model.config
    sched = engine.scheduler.config
    bs = engine.store.block_size
    max_context = min(cfg.max_context_len, engine.store.config.gpu_blocks * bs)
    sizes = {"block_size": bs, "max_tokens": max(1, sched.max_num_batched_tokens),
             "max_seqs": max(1, sched.max_num_seqs), "max_context": max(1, max_context)}
    if model.backend.name != "triton":
        return basic_plan(**sizes)
    elem = torch.empty((), dtype=model.dtype).element_size()
    device = model.device

    def key_of(num_tokens: int, num_seqs: int, width: int) -> Key:
        return triton_key(num_tokens, num_seqs, width, num_heads=cfg.num_heads,
                          num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          block_size=bs, device=device, elem_bytes=elem)

    return plan_steps(key_of, **sizes)


# -------------------------------------------------------------------- running

def run_steps(engine: Engine, shapes: Iterable[StepShape]) -> int:
    """Run each planned step through the model over the engine's KV pool with every
    slot mapping ``-1`` (no KV is written; block tables point at slot 0). Inputs are
    staged in a :class:`engine.batch.BatchStager` with the runner's token and sequence
    capacities, so its sections (hence the kernels' pointer alignment) match the
    runner's eager steps. Returns the number of steps run."""
    runner = engine.runner
    shapes = list(shapes)
    if not shapes:
        return 0
    max_tokens, max_seqs = runner.eager_capacity
    max_tokens = max(max_tokens, *(s.num_tokens for s in shapes))
    max_seqs = max(max_seqs, *(len(s.seq_lens) for s in shapes))
    cells = max(len(s.seq_lens) * s.width for s in shapes)
    stager = BatchStager(engine.store.block_size, runner.model.device, max_tokens, max_seqs,
                         cells)
    vocab = runner.model.config.vocab_size
    for shape in shapes:
        ids = [(7 * i + 1) % vocab for i in range(shape.num_tokens)]
        tables = [[0] * shape.width for _ in shape.seq_lens]
        input_ids, positions, batch = stager.stage(ids, tables, shape.query_lens,
                                                   shape.seq_lens, width=shape.width)
        batch.slot_mapping.fill_(-1)
        runner.model(input_ids, positions, batch, runner.kv_pool)
    return len(shapes)


def warm_sampling(device: torch.device, vocab_size: int) -> None:
    """Run the engine's greedy pick and :func:`engine.sampling.sample`'s paths
    (temperature, top-k, top-p, seeded) on random logits from a private generator."""
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    logits = torch.randn((4, vocab_size), generator=gen, device=device)
    logits.argmax(dim=-1).tolist()
    params = [SamplingParams(),
              SamplingParams(temperature=0.7, seed=0),
              SamplingParams(temperature=0.8, top_k=50, seed=1),
              SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=2)]
    picked = logits.index_select(0, torch.tensor([0, 1, 2, 3], device=device))
    sample(picked, params, [make_generator(p, 0, device) for p in params])


def warm_pool_kernels(store: KVStore) -> int:
    """The store's own kernels, between GPU slots allocated for it and freed again (a
    free slot is written before anyone reads it): the block-copy kernel for one and for
    two blocks (two index-array alignments), GPU to GPU and, when the host pool is
    pinned, host to GPU and back; with ``kv_format`` int8 or fp8, the quantize and
    dequantize kernels of the shared tiers' blocks. Returns the launches made."""
    from tiers import block_copy, quant
    from tiers.pool import SlotPool, copy_slots

    gpu = getattr(store, "gpu", None)
    if not isinstance(gpu, SlotPool) or gpu.device.type != "cuda":
        return 0
    host = getattr(store, "host", None)
    copies = 0
    got = gpu.alloc(4)
    if not got.ok:
        return 0
    held: list[tuple[SlotPool, tuple[int, ...]]] = [(gpu, got.slots)]
    try:
        g = got.slots
        kv_format = getattr(store.config, "kv_format", "exact")
        if kv_format != "exact" and quant.triton_available():
            q = quant.quantize(gpu.tensor, kv_format, [g[0]])
            quant.dequantize_into(q, gpu.tensor, [g[1]])
            copies += 2
        if not block_copy.available():
            return copies
        for n in (1, 2):
            copy_slots(gpu, g[:n], gpu, g[2:2 + n], strategy="index").wait()
            copies += 1
        h = host.alloc(2) if isinstance(host, SlotPool) and host.pinned else None
        if h is not None and h.ok:
            assert isinstance(host, SlotPool)
            held.append((host, h.slots))
            # ValueError: this GPU cannot address the host pool (its copies are staged)
            with contextlib.suppress(ValueError):
                for n in (1, 2):
                    copy_slots(host, h.slots[:n], gpu, g[:n], strategy="index").wait()
                    copy_slots(gpu, g[:n], host, h.slots[:n], strategy="index").wait()
                    copies += 2
    finally:
        for pool, slots in held:
            pool.free(slots)
    return copies


def warm_up(engine: Engine, tokenizer: Tokenizer | None = None, *,
            graphs: bool = True) -> WarmupReport:
    """Warm ``engine`` up before its first request (module docstring); returns what ran.

    A part that fails is logged and skipped (the engine then compiles it on first use);
    the warm-up never raises for it. ``graphs=False`` leaves the decode graphs to be
    captured on first use.
    """
    report = WarmupReport()
    start = time.perf_counter()
    cuda = engine.model.device.type == "cuda"
    engine.bind_device()

    def phase(name: str, fn: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        try:
            result = fn()
            if cuda:
                torch.cuda.synchronize(engine.model.device)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs speed later
            log.warning("warm-up: %s failed (%s); it will run on first use", name, exc)
            report.failed[name] = str(exc)
            result = None
        report.phases[name] = time.perf_counter() - t0
        return result

    if tokenizer is not None:
        phase("tokenizer", lambda: _warm_tokenizer(tokenizer))
    shapes = phase("plan", lambda: plan_for(engine))
    if isinstance(shapes, list):
        report.variants = len({s.key for s in shapes})
        ran = phase("eager steps", lambda: run_steps(engine, shapes))
        report.eager_steps = ran if isinstance(ran, int) else 0
    if graphs:
        def capture() -> None:
            runner = engine.runner
            runner.capture()
            report.graphs = list(runner.captured)

        phase("graphs", capture)
    phase("sampling", lambda: warm_sampling(engine.model.device,
                                            engine.model.config.vocab_size))
    phase("pool kernels", lambda: warm_pool_kernels(engine.store))
    report.seconds = time.perf_counter() - start
    log.info("%s", report.describe())
    return report


def _warm_tokenizer(tokenizer: Tokenizer) -> None:
    with contextlib.suppress(ValueError):  # a tokenizer without a chat template
        tokenizer.encode_chat([{"role": "user", "content": "Hi!"}])
    stream = tokenizer.stream(skip_special_tokens=True)
    for tok in tokenizer.encode("Hello there"):
        stream.push(tok)
    stream.flush()

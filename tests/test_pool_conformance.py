"""Conformance of every slot-pool kind (tiers.pool): bookkeeping, views, bytes, bulk copies.

Every test runs against every pool kind: ``GPUPool`` on the CPU and ``HostPool`` always;
``GPUPool`` on CUDA and an unpinned ``HostPool`` when CUDA is available (skipped
otherwise; ``bench/gpu_check_pools.py`` runs this module on the GPU machine).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiers import pool as pool_mod
from tiers.layout import KVLayout
from tiers.pool import (
    AllocResult,
    GPUPool,
    HostPool,
    IntegrityError,
    SlotPool,
    Transfer,
    coalesce_runs,
    copy_slots,
)

CUDA = torch.cuda.is_available()
POISON = 0xA5
"""Byte written over destinations before a copy; random source bytes never take it."""

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="bfloat16")

_needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]

PoolFactory = Callable[[KVLayout, int], SlotPool]
FACTORIES: dict[str, PoolFactory] = {
    "gpu-on-cpu": lambda layout, n: GPUPool(layout, n, device="cpu"),
    "host": lambda layout, n: HostPool(layout, n),
    "host-unpinned": lambda layout, n: HostPool(layout, n, pin_memory=False),
    "gpu-cuda": lambda layout, n: GPUPool(layout, n, device="cuda"),
}
KINDS = [
    pytest.param("gpu-on-cpu"),
    pytest.param("host"),
    pytest.param("host-unpinned", marks=_needs_cuda),
    pytest.param("gpu-cuda", marks=_needs_cuda),
]
KIND_NAMES = ["gpu-on-cpu", "host"] + (["host-unpinned", "gpu-cuda"] if CUDA else [])
STRATEGIES = ["auto", "runs", "index", "staged"]


def make(kind: str, n: int = 16, layout: KVLayout = LAYOUT) -> SlotPool:
    return FACTORIES[kind](layout, n)


def pool_bytes(pool: SlotPool) -> torch.Tensor:
    """``[num_slots, block_bytes]`` uint8 copy of the pool, on the CPU."""
    if pool.device.type == "cuda":
        torch.cuda.synchronize(pool.device)
    return pool.tensor.reshape(pool.num_slots, -1).view(torch.uint8).cpu().clone()


def fill_random(pool: SlotPool, seed: int) -> None:
    """Fill every byte of the pool with random bytes other than POISON (never all zero)."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 255, (pool.num_slots * pool.block_bytes,), dtype=torch.uint8,
                         generator=gen)
    data[data >= POISON] += 1
    pool.tensor.view(-1).view(torch.uint8).copy_(data.to(pool.device))


def poison(pool: SlotPool) -> None:
    pool.tensor.view(-1).view(torch.uint8).fill_(POISON)


def alloc_all(pool: SlotPool) -> None:
    result = pool.alloc(pool.num_slots)
    assert result.ok


ZERO_COPY = CUDA and HostPool(LAYOUT, 1)._cuda_alias(
    torch.device("cuda", torch.cuda.current_device())) is not None
"""Whether this GPU reads and writes the pinned host pool directly (zero-copy)."""


def index_applies(src_kind: str, dst_kind: str) -> bool:
    """Strategy 'index' between CPU memory and CUDA needs a pinned host pool that the
    GPU can address."""
    kinds = {src_kind, dst_kind}
    if "gpu-cuda" not in kinds or kinds == {"gpu-cuda"}:
        return True
    return "host" in kinds and ZERO_COPY


# ---- construction ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shape_dtype_and_initial_state(kind: str) -> None:
    pool = make(kind, 5)
    assert pool.tensor.shape == (5, *LAYOUT.block_shape)
    assert pool.tensor.dtype == torch.bfloat16
    assert pool.tensor.is_contiguous()
    assert pool.block_bytes == LAYOUT.block_bytes
    assert (pool.num_slots, pool.num_free, pool.num_used) == (5, 5, 0)
    pool.check_integrity()


def test_host_pool_pinning_follows_cuda() -> None:
    assert HostPool(LAYOUT, 2).pinned == CUDA
    assert not HostPool(LAYOUT, 2, pin_memory=False).pinned
    if CUDA:
        assert HostPool(LAYOUT, 2, pin_memory=True).tensor.is_pinned()
    else:
        with pytest.raises(ValueError, match="CUDA"):
            HostPool(LAYOUT, 2, pin_memory=True)


def test_bad_construction_arguments() -> None:
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_slots"):
            GPUPool(LAYOUT, bad, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GPUPool(LAYOUT, 2, device="meta")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA"):
            GPUPool(LAYOUT, 2, device="cuda")


# ---- alloc / free ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_alloc_free_exact(kind: str) -> None:
    pool = make(kind, 8)
    a = pool.alloc(3)
    assert a == AllocResult((0, 1, 2), True) and a
    pool.check_integrity()
    b = pool.alloc(2)
    assert b.slots == (3, 4) and b.ok
    assert (pool.num_free, pool.num_used) == (3, 5)
    pool.free([1, 3])
    pool.check_integrity()
    assert (pool.num_free, pool.num_used) == (5, 3)
    assert not pool.is_allocated(1) and pool.is_allocated(2)
    c = pool.alloc(3)  # lowest free first: the holes, then the tail
    assert c.slots == (1, 3, 5)
    empty = pool.alloc(0)
    assert empty.ok and empty.slots == ()
    pool.check_integrity()
    with pytest.raises(ValueError):
        pool.alloc(-1)
    with pytest.raises(ValueError):
        pool.alloc(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_exhaustion_is_a_typed_result(kind: str) -> None:
    pool = make(kind, 4)
    assert pool.alloc(3).ok
    failed = pool.alloc(2)
    assert failed == AllocResult((), False)
    assert not failed
    assert (pool.num_free, pool.num_used) == (1, 3)  # nothing partially allocated
    pool.check_integrity()
    assert pool.alloc(1).slots == (3,)
    assert not pool.alloc(1).ok
    pool.check_integrity()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_frees_raise_and_change_nothing(kind: str) -> None:
    pool = make(kind, 6)
    pool.alloc(4)
    pool.free([2])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([2])  # double free
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([5])  # never allocated
    with pytest.raises(ValueError, match="out of range"):
        pool.free([6])
    with pytest.raises(ValueError, match="out of range"):
        pool.free([-1])
    with pytest.raises(ValueError, match="twice"):
        pool.free([0, 0])
    with pytest.raises(ValueError, match="ints"):
        pool.free(["1"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([0, 1, 2])  # valid 0 and 1 stay allocated
    assert pool.is_allocated(0) and pool.is_allocated(1)
    assert (pool.num_free, pool.num_used) == (3, 3)
    pool.check_integrity()


@pytest.mark.parametrize("kind", KINDS)
def test_integrity_check_detects_corruption(kind: str) -> None:
    pool = make(kind, 4)
    pool.alloc(2)
    pool.check_integrity()
    pool._used.add(3)  # slot 3 is now both free and used
    with pytest.raises(IntegrityError, match="both free and used"):
        pool.check_integrity()
    pool._used.discard(3)
    pool._free_heap.append(2)  # duplicate entry in the free list
    with pytest.raises(IntegrityError):
        pool.check_integrity()
    pool._free_heap.pop()
    pool._used.discard(1)  # slot 1 lost: neither free nor used
    with pytest.raises(IntegrityError, match="num_slots"):
        pool.check_integrity()


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_alloc_free_matches_reference(kind: str, data: st.DataObject) -> None:
    n = 12
    pool = make(kind, n)
    used: set[int] = set()
    for _ in range(data.draw(st.integers(1, 25), label="ops")):
        op = data.draw(st.sampled_from(["alloc", "free", "bad_free"]))
        if op == "alloc":
            k = data.draw(st.integers(0, n + 1), label="k")
            result = pool.alloc(k)
            if k <= n - len(used):
                free_sorted = sorted(set(range(n)) - used)
                assert result == AllocResult(tuple(free_sorted[:k]), True)
                used.update(result.slots)
            else:
                assert result == AllocResult((), False)
        elif op == "free" and used:
            chosen = data.draw(st.lists(st.sampled_from(sorted(used)), unique=True),
                               label="free")
            pool.free(chosen)
            used.difference_update(chosen)
        else:
            victim = data.draw(st.integers(0, n - 1), label="victim")
            if victim in used:
                pool.free([victim])
                used.discard(victim)
            with pytest.raises(ValueError):
                pool.free([victim])
        pool.check_integrity()
        assert pool.num_used == len(used) and pool.num_free == n - len(used)
        assert all(pool.is_allocated(s) == (s in used) for s in range(n))


# ---- views ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_views_alias_the_pool(kind: str) -> None:
    pool = make(kind, 4)
    alloc_all(pool)
    poison(pool)
    k, v = pool.layer_kv(1)
    shape = (4, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    assert k.shape == shape and v.shape == shape
    k[2].fill_(3.0)
    v[2].fill_(-5.0)
    block = pool.block(2)
    assert block.shape == LAYOUT.block_shape
    assert bool((block[1, 0] == 3.0).all()) and bool((block[1, 1] == -5.0).all())
    assert bool((pool.tensor[2, 1, 0] == 3.0).all())
    before = pool_bytes(pool)
    assert bool((before[[0, 1, 3]] == POISON).all())  # other slots untouched
    block[0, 1, 0, 0, 0] = 7.0
    assert float(pool.layer_kv(0)[1][2, 0, 0, 0]) == 7.0
    with pytest.raises(ValueError):
        pool.layer_kv(LAYOUT.num_layers)
    with pytest.raises(ValueError):
        pool.layer_kv(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_block_needs_an_allocated_slot(kind: str) -> None:
    pool = make(kind, 3)
    pool.alloc(1)
    pool.block(0)
    for slot in (1, 3, -1):
        with pytest.raises(ValueError):
            pool.block(slot)


# ---- bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_bytes_round_trip(kind: str, dtype: str) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=3, head_dim=4, block_size=2, dtype=dtype)
    pool = make(kind, 4, layout)
    other = make(kind, 3, layout)
    alloc_all(pool)
    alloc_all(other)
    fill_random(pool, seed=1)
    poison(other)
    expected = pool_bytes(pool)
    payload = pool.to_bytes(2)
    assert len(payload) == layout.block_bytes
    assert bytes(payload) == expected[2].numpy().tobytes()
    other.from_bytes(1, payload)
    got = pool_bytes(other)
    assert torch.equal(got[1], expected[2])
    assert bool((got[[0, 2]] == POISON).all())
    # Layout order: element (l, kv, t, h, d) is at its C-order offset.
    pool.block(0).copy_(torch.arange(pool.block(0).numel()).reshape(layout.block_shape))
    int_type = {"float32": np.float32, "float16": np.float16, "bfloat16": None}[dtype]
    raw = bytes(pool.to_bytes(0))
    if int_type is None:
        values = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float().numpy()
    else:
        values = np.frombuffer(raw, dtype=int_type).astype(np.float64)
    reference = torch.arange(pool.block(0).numel()).to(pool.dtype).float().numpy()
    assert np.array_equal(values, reference)


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_errors_and_readonly(kind: str) -> None:
    pool = make(kind, 3)
    pool.alloc(2)
    payload = pool.to_bytes(0)
    assert payload.readonly
    with pytest.raises(ValueError, match="bytes"):
        pool.from_bytes(0, b"\x01" * (pool.block_bytes - 1))
    with pytest.raises(ValueError, match="not allocated"):
        pool.from_bytes(2, b"\x01" * pool.block_bytes)
    with pytest.raises(ValueError, match="not allocated"):
        pool.to_bytes(2)
    pool.from_bytes(1, bytearray(b"\x07" * pool.block_bytes))
    assert bytes(pool.to_bytes(1)) == b"\x07" * pool.block_bytes


@pytest.mark.parametrize("kind", ["gpu-on-cpu", "host"])
def test_cpu_to_bytes_is_zero_copy(kind: str) -> None:
    pool = make(kind, 2)
    pool.alloc(2)
    payload = pool.to_bytes(1)
    pool.tensor[1].view(-1).view(torch.uint8).fill_(9)
    assert bytes(payload) == b"\x09" * pool.block_bytes


# ---- copy_slots -----------------------------------------------------------------------

PATTERNS = ["contiguous", "scattered", "reversed", "permutation", "duplicate_source",
            "single"]


def slot_pattern(pattern: str, n: int, num_slots: int, rng: random.Random,
                 ) -> tuple[list[int], list[int]]:
    if pattern == "contiguous":
        return list(range(3, 3 + n)), list(range(5, 5 + n))
    if pattern == "scattered":
        return rng.sample(range(num_slots), n), rng.sample(range(num_slots), n)
    if pattern == "reversed":
        return list(range(2, 2 + n)), list(range(n, 0, -1))
    if pattern == "permutation":
        src = list(range(n))
        dst = list(range(num_slots - n, num_slots))
        rng.shuffle(src)
        rng.shuffle(dst)
        return src, dst
    if pattern == "duplicate_source":
        return [rng.randrange(4) for _ in range(n)], rng.sample(range(num_slots), n)
    return [7], [num_slots - 1]


def check_copy(src: SlotPool, s_list: list[int], dst: SlotPool, d_list: list[int],
               strategy: str, seed: int) -> Transfer:
    """Copy with poisoned destination; verify every destination byte and nothing else."""
    fill_random(src, seed)
    if dst is not src:
        poison(dst)
    src_before = pool_bytes(src)
    dst_before = pool_bytes(dst)
    transfer = copy_slots(src, s_list, dst, d_list, strategy=strategy)
    assert transfer.strategy != "auto"
    transfer.wait()
    assert transfer.done()
    assert transfer.n_blocks == len(s_list)
    assert transfer.nbytes == len(s_list) * src.block_bytes
    after = pool_bytes(dst)
    expected = dst_before.clone()
    expected[d_list] = src_before[s_list]
    mismatched = (after != expected).any(dim=1).nonzero().flatten().tolist()
    assert not mismatched, f"slots {mismatched} differ after {transfer.strategy} copy"
    if dst is not src:
        assert torch.equal(pool_bytes(src), src_before)
    return transfer


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("src_kind", KINDS)
def test_copy_slots_between_kinds(src_kind: str, dst_kind: str, pattern: str,
                                  strategy: str) -> None:
    num_slots, n = 24, 9
    src, dst = make(src_kind, num_slots), make(dst_kind, num_slots)
    alloc_all(src)
    alloc_all(dst)
    rng = random.Random(f"{src_kind}{dst_kind}{pattern}{strategy}")
    s_list, d_list = slot_pattern(pattern, n, num_slots, rng)
    if strategy == "index" and not index_applies(src_kind, dst_kind):
        with pytest.raises(ValueError, match="pinned"):
            copy_slots(src, s_list, dst, d_list, strategy=strategy)
        return
    check_copy(src, s_list, dst, d_list, strategy, seed=rng.randrange(1 << 30))
    src.check_integrity()
    dst.check_integrity()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", KINDS)
def test_copy_within_one_pool(kind: str, strategy: str) -> None:
    pool = make(kind, 20)
    alloc_all(pool)
    rng = random.Random(7)
    s_list = rng.sample(range(10), 6)
    d_list = rng.sample(range(10, 20), 6)
    check_copy(pool, s_list, pool, d_list, strategy, seed=3)
    check_copy(pool, [0, 1, 2, 3], pool, [4, 5, 6, 7], strategy, seed=4)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("src_kind", KINDS)
def test_round_trip_large_batch(src_kind: str, dst_kind: str, strategy: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """80 blocks there and back, in chunks of 5-7 blocks (mixed consecutive and
    scattered chunks), returns the original bytes."""
    if strategy == "index" and not index_applies(src_kind, dst_kind):
        return
    block_bytes = LAYOUT.block_bytes
    monkeypatch.setattr(pool_mod, "INDEX_CHUNK_BYTES", 7 * block_bytes)
    monkeypatch.setattr(pool_mod, "STAGE_CHUNK_BYTES", 5 * block_bytes)
    n, num_slots = 80, 128
    a, b = make(src_kind, num_slots), make(dst_kind, num_slots)
    c = make(src_kind, num_slots)
    for p in (a, b, c):
        alloc_all(p)
    rng = random.Random(f"{src_kind}{dst_kind}{strategy}")
    s_list = rng.sample(range(num_slots), n)
    # Half the destination run is consecutive, half scattered.
    mid_list = list(range(10, 10 + n // 2)) + rng.sample(range(60, num_slots), n // 2)
    back_list = list(range(num_slots - n, num_slots))
    rng.shuffle(back_list)
    check_copy(a, s_list, b, mid_list, strategy, seed=11)
    original = pool_bytes(a)[s_list]
    poison(c)
    copy_slots(b, mid_list, c, back_list, strategy=strategy).wait()
    assert torch.equal(pool_bytes(c)[back_list], original)


@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("src_kind", KINDS)
def test_copy_slots_validation(src_kind: str, dst_kind: str) -> None:
    src, dst = make(src_kind, 6), make(dst_kind, 6)
    src.alloc(4)
    dst.alloc(4)
    poison(dst)
    before = pool_bytes(dst)
    other_layout = make(dst_kind, 6, KVLayout(3, 2, 8, block_size=4, dtype="float16"))
    other_layout.alloc(4)
    cases: list[tuple[object, list[int], object, list[int], str, str]] = [
        (src, [0], other_layout, [0], "auto", "layouts differ"),
        (src, [0, 1], dst, [0], "auto", "source slots"),
        (src, [0], dst, [6], "auto", "out of range"),
        (src, [4], dst, [0], "auto", "not allocated"),
        (src, [0], dst, [5], "auto", "not allocated"),
        (src, [0, 1], dst, [2, 2], "auto", "twice"),
        (src, [0], dst, [1], "fastest", "strategy"),
        (src, [0, 1], src, [1, 2], "auto", "overlap"),
    ]
    for s_pool, s_list, d_pool, d_list, strategy, message in cases:
        with pytest.raises(ValueError, match=message):
            copy_slots(s_pool, s_list, d_pool, d_list, strategy=strategy)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        copy_slots(src, [0], dst.tensor, [0])  # type: ignore[arg-type]
    assert torch.equal(pool_bytes(dst), before)


@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("src_kind", KINDS)
def test_empty_copy_is_complete(src_kind: str, dst_kind: str) -> None:
    src, dst = make(src_kind, 2), make(dst_kind, 2)
    transfer = copy_slots(src, [], dst, [])
    assert transfer.done() and (transfer.n_blocks, transfer.nbytes) == (0, 0)
    transfer.wait()
    transfer.wait_on_stream()


def test_cpu_copies_are_complete_on_return() -> None:
    src, dst = make("host", 4), make("gpu-on-cpu", 4)
    alloc_all(src)
    alloc_all(dst)
    fill_random(src, 5)
    transfer = copy_slots(src, [3, 1], dst, [0, 2])
    assert transfer.done()
    assert torch.equal(pool_bytes(dst)[[0, 2]], pool_bytes(src)[[3, 1]])


@pytest.mark.parametrize("kind", KINDS)
def test_auto_strategy_choice(kind: str) -> None:
    host, other = make("host", 16), make(kind, 16)
    alloc_all(host)
    alloc_all(other)
    one_run = copy_slots(host, [0, 1, 2], other, [4, 5, 6])
    one_run.wait()
    assert one_run.strategy == "runs"
    scattered = copy_slots(host, [0, 5, 9], other, [3, 1, 14])
    host_consecutive = copy_slots(host, [4, 5, 6], other, [9, 2, 0])
    scattered.wait()
    host_consecutive.wait()
    if other.device.type == "cpu":
        assert scattered.strategy == "runs" and host_consecutive.strategy == "runs"
    else:
        assert scattered.strategy in ("index", "runs")
        assert host_consecutive.strategy == "staged"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_copies_megabyte_blocks_by_dma_and_smaller_ones_by_the_kernel() -> None:
    """Scattered host <-> GPU copies: blocks of AUTO_MIN_RUN_BYTES or more go one DMA a
    run (the block-copy kernel would occupy SMs that compute needs), smaller ones by
    the kernel; the bytes arrive either way."""
    for layout, expected in ((KVLayout(num_layers=32, num_kv_heads=8, head_dim=128), "runs"),
                             (KVLayout(num_layers=4, num_kv_heads=2, head_dim=64), "index")):
        assert (layout.block_bytes >= pool_mod.AUTO_MIN_RUN_BYTES) == (expected == "runs")
        host, gpu = HostPool(layout, 8), GPUPool(layout, 8)
        alloc_all(host)
        alloc_all(gpu)
        fill_random(host, 3)
        for src, s, dst, d in ((host, [0, 5, 2], gpu, [7, 1, 4]), (gpu, [7, 1], host, [3, 6])):
            transfer = copy_slots(src, s, dst, d)
            transfer.wait()
            assert transfer.strategy == expected
            assert torch.equal(pool_bytes(dst)[d].cpu(), pool_bytes(src)[s].cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_wait_on_stream_orders_compute_after_the_copy() -> None:
    big = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16)
    host, gpu = HostPool(big, 64), GPUPool(big, 64)
    alloc_all(host)
    alloc_all(gpu)
    host.tensor.fill_(2.0)
    gpu.tensor.fill_(0.0)
    torch.cuda.synchronize()
    slots = list(range(0, 64, 2))
    compute = torch.cuda.Stream()
    transfer = copy_slots(host, slots, gpu, slots)
    transfer.wait_on_stream(compute)
    with torch.cuda.stream(compute):
        total = gpu.tensor[slots].double().sum()
    compute.synchronize()
    assert float(total) == 2.0 * len(slots) * gpu.tensor[0].numel()
    transfer.wait()
    assert transfer.done()


# ---- coalescing -----------------------------------------------------------------------


def test_coalesce_runs_examples() -> None:
    assert coalesce_runs([], []) == []
    assert coalesce_runs([0, 1, 2], [5, 6, 7]) == [(0, 5, 3)]
    assert coalesce_runs([2, 0, 1], [7, 5, 6]) == [(0, 5, 3)]
    assert coalesce_runs([0, 1, 2], [7, 6, 5]) == [(0, 7, 1), (1, 6, 1), (2, 5, 1)]
    assert coalesce_runs([0, 1, 5, 6], [3, 4, 0, 1]) == [(0, 3, 2), (5, 0, 2)]
    assert coalesce_runs([3, 3], [0, 1]) == [(3, 0, 1), (3, 1, 1)]


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=40,
                unique_by=lambda p: p[1]))
def test_coalesce_runs_covers_exactly_the_pairs(pairs: list[tuple[int, int]]) -> None:
    s_list = [p[0] for p in pairs]
    d_list = [p[1] for p in pairs]
    runs = coalesce_runs(s_list, d_list)
    expanded = [(s + i, d + i) for s, d, n in runs for i in range(n)]
    assert sorted(expanded) == sorted(pairs)
    for (s0, d0, n0), (s1, d1, _) in zip(runs, runs[1:]):
        assert not (s1 == s0 + n0 and d1 == d0 + n0)  # maximal: neighbours not mergeable

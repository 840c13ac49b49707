"""Slot-addressed KV block pools (GPU and host) and bulk copies of many slots between them.

A pool is one tensor of shape ``[num_slots, num_layers, 2, block_size, num_kv_heads,
head_dim]`` (the layout's ``block_shape`` behind a slot axis). Slot ``i`` is one block,
one contiguous byte range of ``layout.block_bytes`` bytes. Pools hand out slot numbers
(``alloc``/``free``); what a slot holds is decided by the store, never by the pool.

- :class:`GPUPool` lives on a device (``"cuda"``; ``"cpu"`` also works, so CPU-only CI
  exercises the same code).
- :class:`HostPool` lives in CPU memory, page-locked when CUDA is available so that
  host<->device copies run asynchronously at full PCIe bandwidth.
- :func:`copy_slots` copies many slots from one pool to another in one call and returns
  a :class:`Transfer`. With CUDA involved it runs on a per-device side stream, so
  promotions and demotions overlap with compute.

Contents of a newly allocated slot are undefined until written.

Thread safety: ``alloc``, ``free`` and the bookkeeping queries are serialized by a
per-pool lock; :func:`copy_slots` may be called from several threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import heapq
import logging
import mmap
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from tiers import block_copy
from tiers.layout import KVLayout
from tiers.slots import AllocResult, IntegrityError

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Torch dtype of each :data:`tiers.layout.DTYPE_BYTES` name."""

Strategy = Literal["auto", "runs", "index", "staged"]
"""How :func:`copy_slots` moves the bytes:

- ``"runs"``: sort the (src, dst) pairs by source slot, merge runs that are consecutive
  on both sides, one copy (``cudaMemcpyAsync`` on CUDA) per run. Always possible.
- ``"index"``: a gather/scatter executed by one device. With CUDA it is one launch of
  the Triton block-copy kernel (:mod:`tiers.block_copy`; torch ``index_select`` /
  ``index_copy_`` chunks where triton is missing). Between a pinned host pool and a CUDA
  pool the kernel runs on the GPU and reads or writes host memory directly over PCIe
  (zero-copy, through the unified virtual address of the page-locked pool); needs a
  pinned host pool.
- ``"staged"``: host<->CUDA only. The host side goes through contiguous staging: if
  the host slots of a chunk are consecutive they are one DMA, otherwise the CPU gathers
  them into (or scatters them from) a pinned staging buffer; the device side is a
  gather/scatter kernel on the GPU. Without a host<->device hop it is ``"index"``.
- ``"auto"``: one copy when the slots form one run on both sides; otherwise, between
  host and CUDA: ``"staged"`` when the host slots are consecutive, ``"runs"`` when
  runs average at least :data:`AUTO_MIN_RUN_BYTES`, else ``"index"`` (``"runs"`` if
  the host pool is not pinned); device to device: ``"index"``; CPU to CPU: ``"runs"``.
"""

STRATEGIES: tuple[str, ...] = ("auto", "runs", "index", "staged")

AUTO_MIN_RUN_BYTES = 1 << 20
"""Average bytes per run from which ``"auto"`` issues one DMA per run between host and
device rather than the zero-copy block-copy kernel. The kernel moves scattered blocks at
the link's rate (45-50 GB/s on an H200) but occupies SMs while it waits on PCIe; DMA
leaves them to compute. Measured on an H200 (``python -m bench.tiers_bench_pools
--blocks 256``: 256 scattered blocks copied on a side stream during a burst of bf16
matmuls): 2 MiB blocks, DMA 42 GB/s with the matmuls 1.02x slower, the kernel 50 GB/s
with them 2.41x slower; 360 KiB blocks, DMA 21.5 GB/s (1.00x), the kernel 45.6 GB/s
(1.19x). A serving engine copies beside its compute, so runs of a MiB or more go by
DMA; smaller ones by the kernel, whose GB/s then doubles DMA's for a slight slowdown."""

INDEX_CHUNK_BYTES = 64 << 20
"""Most bytes one gather/scatter step moves: bounds the temporary buffer (bytes)."""

STAGE_CHUNK_BYTES = 16 << 20
"""Bytes per staging chunk of ``"staged"``: the CPU gathers chunk ``k+1`` while the copy
engine moves chunk ``k``."""

_PAGE_BYTES = mmap.PAGESIZE


def _as_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {dev} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"pools live on 'cpu' or 'cuda' devices, got {dev}")
    return dev


def _wide_dtype(block_bytes: int) -> torch.dtype:
    """The widest integer dtype whose size divides ``block_bytes``: copies of one
    element per thread then move as many bytes per memory transaction as possible."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if block_bytes % size == 0:
            return dtype
    return torch.uint8


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _unregister_host(buffer: torch.Tensor) -> None:
    """Finalizer of a registered host buffer: unpins it (the buffer is freed after)."""
    # At interpreter exit the driver may be gone already: nothing is left to release.
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


_HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14
"""``madvise`` advice (Linux) asking for transparent huge pages on a range."""


def _prefault(buffer: torch.Tensor) -> None:
    """Back ``buffer`` with memory before it is page-locked: ask Linux for transparent
    huge pages (512x fewer faults, and pages, to pin), then touch every byte with
    torch's intra-op threads. ``cudaHostRegister`` of untouched memory faults it in one
    4 KiB page at a time on one thread: on an H200 host 4 GiB took 1.55 s that way, and
    0.22 s faulted in on huge pages first (0.13 s, then 0.09 s to register). The buffer
    must be 2 MiB-aligned for the advice to take (it is ignored elsewhere)."""
    with contextlib.suppress(Exception):  # no libc madvise: small pages, still touched
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        length = buffer.numel() // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
        if length:
            libc.madvise(buffer.data_ptr(), length, _MADV_HUGEPAGE)
    buffer.fill_(0)


def _alloc_pinned(nbytes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nbytes`` of page-locked host memory as a uint8 tensor.

    Registers an exact-size, 2 MiB-aligned allocation with ``cudaHostRegister`` (the
    caching pinned allocator would round a pool of tens of GiB up to a power of two),
    after faulting it in on huge pages (:func:`_prefault`). Falls back to the caching
    pinned allocator if registration fails. Returns the tensor and, when registered, the
    buffer to unregister when the pool dies.
    """
    reg_bytes = _round_up(nbytes, _PAGE_BYTES)
    owner = torch.empty(reg_bytes + _HUGE_PAGE_BYTES, dtype=torch.uint8)
    offset = (-owner.data_ptr()) % _HUGE_PAGE_BYTES
    # A tensor whose storage starts at the aligned address, so is_pinned() (which asks
    # about the storage base) sees the registered range; it keeps `owner` alive.
    buffer = torch.frombuffer(owner.numpy().data[offset:offset + reg_bytes],
                              dtype=torch.uint8)
    _prefault(buffer)
    try:
        rc = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), reg_bytes, 0)
        ok = int(rc) == 0
    except Exception as exc:
        log.warning("cudaHostRegister raised %s; using the caching pinned allocator", exc)
        ok = False
    if ok:
        return buffer.narrow(0, 0, nbytes), buffer
    log.warning("cudaHostRegister of %d bytes failed; using the caching pinned allocator",
                nbytes)
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None


_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91
"""``CUdevice_attribute`` of the CUDA driver API."""


@functools.cache
def _device_reads_host_pointers(index: int) -> bool:
    """Whether CUDA device ``index`` can dereference page-locked host memory at the
    CPU's address (asked of the driver; False if it cannot be asked)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    dev, value = ctypes.c_int(), ctypes.c_int()
    if libcuda.cuInit(ctypes.c_uint(0)) != 0:
        return False
    if libcuda.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(index)) != 0:
        return False
    if libcuda.cuDeviceGetAttribute(ctypes.byref(value),
                                    ctypes.c_int(_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM),
                                    dev) != 0:
        return False
    return value.value == 1


class _CudaArrayView:
    """``__cuda_array_interface__`` of a byte range, for a zero-copy CUDA alias of
    page-locked host memory. Holds ``owner`` so the memory outlives the alias."""

    def __init__(self, ptr: int, nbytes: int, owner: torch.Tensor) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 2,
        }


class SlotPool:
    """A fixed number of block slots in one tensor, with exact slot bookkeeping.

    ``tensor``: ``[num_slots, num_layers, 2, block_size, num_kv_heads, head_dim]`` of the
    layout's dtype on ``device``. ``alloc`` hands out the lowest free slots first, which
    keeps batches consecutive and so cheap to copy.
    """

    def __init__(self, layout: KVLayout, num_slots: int, device: str | torch.device,
                 pin_memory: bool = False) -> None:
        """Allocate the pool. ``pin_memory`` (CPU only, needs CUDA) page-locks it.

        Raises ``ValueError`` for a non-positive ``num_slots``, an unknown or unavailable
        device, or ``pin_memory`` on a non-CPU device or without CUDA.
        """
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots <= 0:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        dev = _as_device(device)
        if pin_memory and dev.type != "cpu":
            raise ValueError(f"pin_memory applies to CPU pools, not {dev}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA, which is not available")
        self._layout = layout
        self._num_slots = num_slots
        self._device = dev
        self._dtype = TORCH_DTYPES[layout.dtype]
        block_bytes = layout.block_bytes
        shape = (num_slots, *layout.block_shape)
        self._unpin: weakref.finalize | None = None
        if pin_memory:
            raw, registered = _alloc_pinned(num_slots * block_bytes)
            self._tensor = raw.view(self._dtype).view(shape)
            if registered is not None:
                self._unpin = weakref.finalize(self, _unregister_host, registered)
        else:
            self._tensor = torch.empty(shape, dtype=self._dtype, device=dev)
        self._pinned = bool(pin_memory) and self._tensor.is_pinned()
        # [num_slots, block_bytes] uint8 and [num_slots, block_bytes / w] of a w-byte
        # integer type: byte-exact views of the same memory for copies.
        self._flat_u8 = self._tensor.view(-1).view(torch.uint8).view(num_slots, block_bytes)
        self._flat = self._flat_u8.view(_wide_dtype(block_bytes))
        self._np_u8 = self._flat_u8.numpy() if dev.type == "cpu" else None
        self._aliases: dict[torch.device, torch.Tensor | None] = {}
        self._lock = threading.Lock()
        self._free_heap: list[int] = list(range(num_slots))  # sorted, hence a heap
        self._free_set: set[int] = set(self._free_heap)
        self._used: set[int] = set()

    # ---- properties -------------------------------------------------------------------

    @property
    def layout(self) -> KVLayout:
        """The block layout of every slot."""
        return self._layout

    @property
    def device(self) -> torch.device:
        """Where the pool tensor lives (a CUDA device always carries its index)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Element type of :attr:`tensor`."""
        return self._dtype

    @property
    def pinned(self) -> bool:
        """True when the pool is page-locked host memory."""
        return self._pinned

    @property
    def tensor(self) -> torch.Tensor:
        """The whole pool: ``[num_slots, layers, 2, block_size, kv_heads, head_dim]``."""
        return self._tensor

    @property
    def block_bytes(self) -> int:
        """Bytes of one slot."""
        return self._layout.block_bytes

    @property
    def num_slots(self) -> int:
        """Total slots (free + used)."""
        return self._num_slots

    @property
    def num_free(self) -> int:
        """Slots available to :meth:`alloc`."""
        with self._lock:
            return len(self._free_heap)

    @property
    def num_used(self) -> int:
        """Slots allocated and not yet freed."""
        with self._lock:
            return len(self._used)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(slots={self._num_slots}, used={self.num_used}, "
                f"device={self._device}, pinned={self._pinned}, layout={self._layout})")

    # ---- bookkeeping ------------------------------------------------------------------

    def alloc(self, n: int) -> AllocResult:
        """Allocate ``n`` slots, lowest free slot numbers first (ascending).

        All or nothing: when fewer than ``n`` slots are free, returns
        ``AllocResult((), ok=False)`` and allocates none. ``n == 0`` succeeds with no
        slots. Raises ``ValueError`` only for a negative or non-int ``n``.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"alloc(n) needs an int n >= 0, got {n!r}")
        with self._lock:
            if n > len(self._free_heap):
                return AllocResult((), False)
            slots = tuple(heapq.heappop(self._free_heap) for _ in range(n))
            self._free_set.difference_update(slots)
            self._used.update(slots)
        return AllocResult(slots, True)

    def free(self, slots: Iterable[int]) -> None:
        """Return allocated slots to the pool.

        All or nothing: raises ``ValueError`` (and frees none) if any slot is out of
        range, not allocated (double free, or never allocated), or listed twice.
        """
        slot_list = self._check_slot_numbers(slots, "free")
        with self._lock:
            seen: set[int] = set()
            for s in slot_list:
                if s in seen:
                    raise ValueError(f"free: slot {s} is listed twice")
                if s not in self._used:
                    raise ValueError(
                        f"free: slot {s} of {type(self).__name__} is not allocated "
                        "(double free, or never allocated)")
                seen.add(s)
            self._used.difference_update(slot_list)
            self._free_set.update(slot_list)
            for s in slot_list:
                heapq.heappush(self._free_heap, s)

    def is_allocated(self, slot: int) -> bool:
        """Whether ``slot`` is currently allocated (False for out-of-range slots)."""
        with self._lock:
            return slot in self._used

    def check_integrity(self) -> None:
        """Verify the bookkeeping: every slot is exactly once either free or used.

        Raises :class:`IntegrityError` naming the first violation.
        """
        with self._lock:
            heap = list(self._free_heap)
            free_set = set(self._free_set)
            used = set(self._used)
        n = self._num_slots
        heap_set = set(heap)
        if len(heap_set) != len(heap):
            dup = sorted(s for s in heap_set if heap.count(s) > 1)
            raise IntegrityError(f"free list holds duplicates: {dup[:10]}")
        if heap_set != free_set:
            diff = sorted(heap_set ^ free_set)
            raise IntegrityError(f"free list and free set disagree on slots {diff[:10]}")
        both = free_set & used
        if both:
            raise IntegrityError(f"slots both free and used: {sorted(both)[:10]}")
        bad = sorted(s for s in free_set | used if not 0 <= s < n)
        if bad:
            raise IntegrityError(f"slots out of range [0, {n}): {bad[:10]}")
        if len(free_set) + len(used) != n:
            raise IntegrityError(
                f"free ({len(free_set)}) + used ({len(used)}) != num_slots ({n})")
        for i in range(len(heap)):
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap) and heap[child] < heap[i]:
                    raise IntegrityError(f"free heap order broken at index {i}")

    def _check_slot_numbers(self, slots: Iterable[int], what: str) -> list[int]:
        """Slots as a list of ints in range; ``ValueError`` otherwise."""
        out: list[int] = []
        for s in slots:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
                raise ValueError(f"{what}: slot numbers must be ints, got {s!r}")
            s = int(s)
            if not 0 <= s < self._num_slots:
                raise ValueError(
                    f"{what}: slot {s} out of range [0, {self._num_slots}) of {type(self).__name__}")
            out.append(s)
        return out

    def _check_allocated(self, slots: Iterable[int], what: str) -> list[int]:
        """Slots as a list of ints, each in range and allocated; ``ValueError`` otherwise."""
        slot_list = list(slots)
        if all(type(s) is int for s in slot_list):
            with self._lock:  # allocated slots are in range: one subset test suffices
                if self._used.issuperset(slot_list):
                    return slot_list
        slot_list = self._check_slot_numbers(slot_list, what)
        with self._lock:
            for s in slot_list:
                if s not in self._used:
                    raise ValueError(
                        f"{what}: slot {s} of {type(self).__name__} is not allocated")
        return slot_list

    # ---- views and bytes --------------------------------------------------------------

    def block(self, slot: int) -> torch.Tensor:
        """View of one allocated slot: ``[layers, 2, block_size, kv_heads, head_dim]``.

        Aliases the pool (writes go to the slot). ``ValueError`` if not allocated.
        """
        (s,) = self._check_allocated((slot,), "block")
        return self._tensor[s]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided views of one layer's K and V over all slots, for attention kernels.

        Each is ``[num_slots, block_size, kv_heads, head_dim]`` and aliases the pool.
        ``ValueError`` for a layer out of range.
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not (
                0 <= layer < self._layout.num_layers):
            raise ValueError(
                f"layer must be an int in [0, {self._layout.num_layers}), got {layer!r}")
        return self._tensor[:, layer, 0], self._tensor[:, layer, 1]

    def to_bytes(self, slot: int) -> memoryview:
        """The raw payload of one allocated slot, ``block_bytes`` bytes in layout order.

        CPU pools: a zero-copy read-only view of the pool, valid until the slot is
        rewritten or freed (copy it to keep it). CUDA pools: a copy, taken on the
        current stream (wait for any :class:`Transfer` into the slot first).
        """
        (s,) = self._check_allocated((slot,), "to_bytes")
        if self._np_u8 is not None:
            return memoryview(self._np_u8[s]).toreadonly()
        return self._flat_u8[s].cpu().numpy().data.toreadonly()

    def from_bytes(self, slot: int, data: bytes | bytearray | memoryview) -> None:
        """Overwrite one allocated slot with ``block_bytes`` raw bytes in layout order.

        Synchronous (on the current stream for CUDA pools). ``ValueError`` for a slot
        not allocated or a payload of the wrong length.
        """
        (s,) = self._check_allocated((slot,), "from_bytes")
        src = np.frombuffer(data, dtype=np.uint8)
        if src.size != self.block_bytes:
            raise ValueError(
                f"from_bytes: payload is {src.size} bytes, a block is {self.block_bytes}")
        if self._np_u8 is not None:
            self._np_u8[s] = src
            return
        host = torch.empty(self.block_bytes, dtype=torch.uint8)
        host.numpy()[:] = src
        self._flat_u8[s].copy_(host)

    def _cuda_alias(self, device: torch.device) -> torch.Tensor | None:
        """``[num_slots, block_bytes / w]`` CUDA tensor on ``device`` aliasing this pinned
        host pool (zero-copy through unified virtual addressing), or None when the pool
        is not pinned or the alias cannot be made."""
        if not self._pinned or not _device_reads_host_pointers(device.index or 0):
            return None
        with self._lock:
            if device in self._aliases:
                return self._aliases[device]
        ptr = self._flat_u8.data_ptr()
        nbytes = self._num_slots * self.block_bytes
        alias: torch.Tensor | None
        try:
            raw = torch.as_tensor(_CudaArrayView(ptr, nbytes, self._tensor), device=device)
        except (RuntimeError, TypeError, ValueError) as exc:
            log.info("no zero-copy CUDA alias of %r on %s: %s", self, device, exc)
            raw = None
        if raw is None or raw.device != device or raw.data_ptr() != ptr:
            alias = None
        else:
            alias = raw.view(self._num_slots, self.block_bytes).view(self._flat.dtype)
        with self._lock:
            self._aliases[device] = alias
        return alias


class GPUPool(SlotPool):
    """A pool in device memory (``device="cuda"`` or ``"cuda:N"``; ``"cpu"`` for tests)."""

    def __init__(self, layout: KVLayout, num_slots: int,
                 device: str | torch.device = "cuda") -> None:
        super().__init__(layout, num_slots, device, pin_memory=False)


class HostPool(SlotPool):
    """A pool in CPU memory, page-locked when CUDA is available.

    ``pin_memory=None`` pins exactly when CUDA is available; True demands it
    (``ValueError`` without CUDA); False never pins (host<->device copies then run
    synchronously through the driver's bounce buffers).
    """

    def __init__(self, layout: KVLayout, num_slots: int,
                 pin_memory: bool | None = None) -> None:
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        super().__init__(layout, num_slots, "cpu", pin_memory=pin)


# ---- transfers ------------------------------------------------------------------------


class Transfer:
    """Handle of one :func:`copy_slots` call.

    Until the transfer is complete, its source slots must not be rewritten or freed and
    its destination slots must not be read. Host-side readers (the CPU, ``to_bytes``,
    or another ``copy_slots`` reading a host destination slot) need :meth:`wait` to
    have returned or :meth:`done` to have returned True; work on a CUDA stream reading
    a device destination slot needs :meth:`wait_on_stream` on that stream (or
    :meth:`wait`) first.

    The transfer keeps both pools alive until it is complete; one dropped unfinished
    hands them to a list that later copies release once its copy is done.
    """

    def __init__(self, n_blocks: int, nbytes: int, strategy: str,
                 event: torch.cuda.Event | None = None, device: torch.device | None = None,
                 finalize: Callable[[], None] | None = None,
                 keepalive: Sequence[Any] = (), start: torch.cuda.Event | None = None,
                 seconds: float | None = None) -> None:
        self.n_blocks = n_blocks
        """Blocks copied."""
        self.nbytes = nbytes
        """Bytes copied."""
        self.strategy = strategy
        """The strategy actually used (never ``"auto"``)."""
        self._event = event
        self._device = device
        self._finalize = finalize
        self._keepalive = keepalive  # pools and staging buffers, until complete
        self._lock = threading.Lock()
        self._start = start
        self._seconds = seconds

    @property
    def seconds(self) -> float | None:
        """Seconds the copy took: the wall time of a synchronous copy between CPU pools;
        for CUDA, the device time from when the side stream reached the copy to its end
        (``None`` until complete)."""
        if self._seconds is None and self._start is not None and self._event is not None \
                and self._event.query():
            self._seconds = self._start.elapsed_time(self._event) / 1e3
        return self._seconds

    def __del__(self) -> None:
        # Dropped before completion (e.g. after wait_on_stream only): what it keeps
        # alive must outlive the copy, without blocking here.
        event = getattr(self, "_event", None)
        keepalive = getattr(self, "_keepalive", ())
        if event is not None and keepalive:
            with contextlib.suppress(Exception):
                _defer_release(event, keepalive)

    def _run_finalize(self) -> None:
        with self._lock:
            fin, self._finalize = self._finalize, None
            if fin is not None:
                fin()
            self._keepalive = ()

    def done(self) -> bool:
        """True when the copy is complete, without blocking (may finish host-side work)."""
        if self._event is not None and not self._event.query():
            return False
        self._run_finalize()
        return True

    def device_done(self) -> bool:
        """True when the device side of the copy is complete (its sources may be
        overwritten, its device destinations read), without blocking and without the
        host-side work :meth:`done` may run (a staged copy's last leg). True for copies
        between CPU pools, which are complete on return."""
        return self._event is None or bool(self._event.query())

    def wait(self) -> None:
        """Block the calling thread until the copy is complete."""
        if self._event is not None:
            self._event.synchronize()
        self._run_finalize()

    def wait_on_stream(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream of the transfer's device) wait
        for the device-side copy before running later work; does not block the host.

        Host-side destinations of a ``"staged"`` device-to-host copy additionally need
        :meth:`wait` or :meth:`done`. A no-op for copies between CPU pools.
        """
        if self._event is None:
            return
        if stream is None:
            stream = torch.cuda.current_stream(self._device)
        stream.wait_event(self._event)


_deferred: list[tuple[torch.cuda.Event, Sequence[Any]]] = []
_deferred_lock = threading.Lock()


def _defer_release(event: torch.cuda.Event, keepalive: Sequence[Any]) -> None:
    """Hold ``keepalive`` until ``event`` has completed (checked by later copies)."""
    if event.query():
        return
    with _deferred_lock:
        _deferred.append((event, keepalive))


def _reap_deferred() -> None:
    """Release what dropped transfers held, for those whose copy has completed."""
    with _deferred_lock:
        if _deferred:
            _deferred[:] = [(e, k) for e, k in _deferred if not e.query()]


_side_streams: dict[torch.device, torch.cuda.Stream] = {}
_side_lock = threading.Lock()


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The dedicated copy stream of a CUDA device (created on first use)."""
    with _side_lock:
        stream = _side_streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            _side_streams[device] = stream
        return stream


def coalesce_runs(src_slots: Sequence[int],
                  dst_slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Merge (src, dst) slot pairs into runs ``(src_start, dst_start, length)``.

    Pairs are sorted by source slot; consecutive pairs join a run when both their source
    and destination slots follow the previous pair's by one. Lengths in slots.
    """
    runs: list[tuple[int, int, int]] = []
    for s, d in sorted(zip(src_slots, dst_slots)):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def _is_range(values: Sequence[int]) -> bool:
    """Whether ``values`` are ``v0, v0 + 1, ...`` in this order."""
    return all(b == a + 1 for a, b in zip(values, values[1:]))


def _chunks(n: int, per_chunk: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + per_chunk)) for i in range(0, n, per_chunk)]


def _index_tensor(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """``[len(rows), n]`` int64 on ``device``; for CUDA, copied from pinned memory on
    the current stream without blocking the host."""
    host = torch.from_numpy(np.array(rows, dtype=np.int64))
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _validate(src: SlotPool, src_slots: Iterable[int], dst: SlotPool,
              dst_slots: Iterable[int], strategy: str) -> tuple[list[int], list[int]]:
    if not isinstance(src, SlotPool) or not isinstance(dst, SlotPool):
        raise TypeError("copy_slots copies between SlotPool instances")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if src.layout != dst.layout:
        raise ValueError(f"layouts differ: source {src.layout}, destination {dst.layout}")
    s_list = src._check_allocated(src_slots, "copy_slots source")
    d_list = dst._check_allocated(dst_slots, "copy_slots destination")
    if len(s_list) != len(d_list):
        raise ValueError(
            f"copy_slots: {len(s_list)} source slots but {len(d_list)} destination slots")
    if len(set(d_list)) != len(d_list):
        raise ValueError("copy_slots: a destination slot is listed twice")
    if src is dst and set(s_list) & set(d_list):
        raise ValueError("copy_slots within one pool: source and destination slots overlap")
    return s_list, d_list


def copy_slots(src: SlotPool, src_slots: Sequence[int], dst: SlotPool,
               dst_slots: Sequence[int], *, strategy: Strategy = "auto",
               after: torch.cuda.Event | None = None) -> Transfer:
    """Copy block ``src_slots[i]`` of ``src`` into block ``dst_slots[i]`` of ``dst``, for
    all ``i``, in one call.

    Pools must share a layout; every slot must be allocated in its pool; destination
    slots must be distinct; within one pool, source and destination slots must not
    overlap. A source slot may be listed more than once. ``ValueError`` otherwise
    (``TypeError`` for non-pools), before anything is copied.

    Between CPU pools the copy is synchronous and the returned transfer is complete.
    With a CUDA pool involved the copy is enqueued on the device's side stream after the
    work already enqueued on the current stream(s) of the pools' devices (so blocks
    being written by compute are copied once written, and a reused destination slot is
    overwritten only after earlier readers); the returned :class:`Transfer` completes
    asynchronously. See :data:`Strategy` for the strategies; an explicit strategy that
    cannot apply to the pools raises ``ValueError``.

    ``after`` (CUDA): order the copy after this event instead of after the work enqueued
    on the current streams, for a copy issued from another thread than the one that
    reserved the slots (the event recorded there, when they were reserved): later
    compute that cannot touch these slots then does not delay it.
    """
    s_list, d_list = _validate(src, src_slots, dst, dst_slots, strategy)
    n = len(s_list)
    nbytes = n * src.block_bytes
    runs = coalesce_runs(s_list, d_list)
    resolved = _resolve_strategy(src, s_list, dst, d_list, len(runs), strategy)
    if n == 0:
        return Transfer(0, 0, resolved)
    if src.device.type == "cpu" and dst.device.type == "cpu":
        t0 = time.perf_counter()
        if resolved == "runs":
            _copy_runs(src._flat, dst._flat, runs, non_blocking=False)
        else:
            _gather_scatter(src._flat, dst._flat, s_list, d_list,
                            same_storage=src is dst)
        return Transfer(n, nbytes, resolved, seconds=time.perf_counter() - t0)
    return _copy_cuda(src, s_list, dst, d_list, runs, resolved, after)


def _host_device(src: SlotPool, dst: SlotPool) -> tuple[SlotPool, SlotPool] | None:
    """(host pool, CUDA pool) when exactly one side is on CUDA, else None."""
    if src.device.type == "cpu" and dst.device.type == "cuda":
        return src, dst
    if src.device.type == "cuda" and dst.device.type == "cpu":
        return dst, src
    return None


def _resolve_strategy(src: SlotPool, s_list: list[int], dst: SlotPool, d_list: list[int],
                      n_runs: int, strategy: str) -> str:
    """The concrete strategy for these pools and slots; ``ValueError`` if an explicit
    one cannot apply."""
    hd = _host_device(src, dst)
    if strategy == "index":
        if hd is not None:
            host, gpu = hd
            if host._cuda_alias(gpu.device) is None:
                raise ValueError(
                    "strategy 'index' between host and CUDA needs a pinned host pool "
                    "that the GPU can address directly")
        elif src.device != dst.device:
            raise ValueError(
                f"strategy 'index' needs one device, got {src.device} and {dst.device}")
        return strategy
    if strategy == "staged":
        if hd is not None:
            return strategy
        if src.device != dst.device:
            raise ValueError(f"strategy 'staged' cannot copy {src.device} -> {dst.device}")
        return "index"
    if strategy == "runs" or n_runs <= 1:
        return "runs"
    if hd is None:
        same_cuda = src.device.type == "cuda" and src.device == dst.device
        return "index" if same_cuda else "runs"
    host, gpu = hd
    if not host.pinned:
        return "runs"
    if _is_range(sorted(s_list if host is src else d_list)):
        return "staged"
    if len(s_list) * src.block_bytes // n_runs >= AUTO_MIN_RUN_BYTES:
        return "runs"
    return "index" if host._cuda_alias(gpu.device) is not None else "runs"


def _copy_runs(src_flat: torch.Tensor, dst_flat: torch.Tensor,
               runs: Sequence[tuple[int, int, int]], non_blocking: bool) -> None:
    """One copy per run (``cudaMemcpyAsync`` on the current stream for CUDA tensors),
    issued by one ``_foreach_copy_`` call to keep the per-run host cost low."""
    if len(runs) == 1:
        s, d, length = runs[0]
        dst_flat.narrow(0, d, length).copy_(src_flat.narrow(0, s, length),
                                            non_blocking=non_blocking)
        return
    torch._foreach_copy_([dst_flat.narrow(0, d, length) for _, d, length in runs],
                         [src_flat.narrow(0, s, length) for s, _, length in runs],
                         non_blocking=non_blocking)


def _gather_scatter(src_flat: torch.Tensor, dst_flat: torch.Tensor, s_list: list[int],
                    d_list: list[int], same_storage: bool) -> None:
    """``dst_flat[d_list[i]] = src_flat[s_list[i]]`` by gather/scatter kernels of the
    device both tensors are on (current stream), in chunks of at most
    :data:`INDEX_CHUNK_BYTES`. Pairs go in destination order; a chunk whose destination
    (or source) slots are consecutive is one gather (or scatter) with no temporary.
    ``same_storage`` (source and destination are one pool) always goes through a
    temporary, as the kernels refuse partially overlapping inputs and outputs."""
    order = sorted(range(len(d_list)), key=d_list.__getitem__)
    s_sorted = [s_list[i] for i in order]
    d_sorted = [d_list[i] for i in order]
    idx = _index_tensor([s_sorted, d_sorted], dst_flat.device)
    row_bytes = dst_flat.shape[1] * dst_flat.element_size()
    per_chunk = max(1, INDEX_CHUNK_BYTES // row_bytes)
    for lo, hi in _chunks(len(d_sorted), per_chunk):
        si, di = idx[0, lo:hi], idx[1, lo:hi]
        if not same_storage and _is_range(d_sorted[lo:hi]):
            torch.index_select(src_flat, 0, si, out=dst_flat.narrow(0, d_sorted[lo], hi - lo))
        elif not same_storage and _is_range(s_sorted[lo:hi]):
            dst_flat.index_copy_(0, di, src_flat.narrow(0, s_sorted[lo], hi - lo))
        else:
            dst_flat.index_copy_(0, di, src_flat.index_select(0, si))


def _copy_cuda(src: SlotPool, s_list: list[int], dst: SlotPool, d_list: list[int],
               runs: list[tuple[int, int, int]], strategy: str,
               after: torch.cuda.Event | None = None) -> Transfer:
    """Enqueue the copy on the side stream of the CUDA device involved."""
    _reap_deferred()
    n = len(s_list)
    device = src.device if src.device.type == "cuda" else dst.device
    stream = side_stream(device)
    if after is not None:
        stream.wait_event(after)
    else:
        for dev in {src.device, dst.device}:
            if dev.type == "cuda":
                stream.wait_stream(torch.cuda.current_stream(dev))
    finalize: Callable[[], None] | None = None
    keepalive: list[Any] = [src, dst]
    with torch.cuda.device(device), torch.cuda.stream(stream):
        start = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        if strategy == "runs":
            _copy_runs(src._flat, dst._flat, runs, non_blocking=True)
        elif strategy == "index":
            src_flat = src._flat if src.device.type == "cuda" else src._cuda_alias(device)
            dst_flat = dst._flat if dst.device.type == "cuda" else dst._cuda_alias(device)
            assert src_flat is not None and dst_flat is not None  # checked when resolved
            if block_copy.available():
                idx = _index_tensor([s_list, d_list], device)
                block_copy.copy_blocks(src_flat, dst_flat, idx[0], idx[1])
            else:
                _gather_scatter(src_flat, dst_flat, s_list, d_list, same_storage=src is dst)
        elif src.device.type == "cpu":
            _staged_h2d(src, s_list, dst, d_list, keepalive)
        else:
            finalize = _staged_d2h(src, s_list, dst, d_list)
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
    return Transfer(n, n * src.block_bytes, strategy, event=event, device=device,
                    finalize=finalize, keepalive=keepalive, start=start)


def _staged_h2d(src: SlotPool, s_list: list[int], dst: SlotPool, d_list: list[int],
                keepalive: list[Any]) -> None:
    """Host -> CUDA through contiguous staging, chunk by chunk (current stream = side).

    Per chunk (in host slot order): consecutive host slots are DMA'd directly, others
    are gathered by the CPU into a pinned staging buffer first; on the device the chunk
    lands in place when its destination slots are consecutive, else in a temporary that
    one scatter kernel distributes.
    """
    order = sorted(range(len(s_list)), key=s_list.__getitem__)
    s_sorted = [s_list[i] for i in order]
    d_sorted = [d_list[i] for i in order]
    dev_idx = _index_tensor([d_sorted], dst.device)[0]
    per_chunk = max(1, STAGE_CHUNK_BYTES // src.block_bytes)
    for lo, hi in _chunks(len(s_sorted), per_chunk):
        s_chunk, d_chunk = s_sorted[lo:hi], d_sorted[lo:hi]
        if _is_range(s_chunk):
            staged = src._flat.narrow(0, s_chunk[0], hi - lo)
        else:
            staged = torch.empty((hi - lo, src._flat.shape[1]), dtype=src._flat.dtype,
                                 pin_memory=src.pinned)
            torch.index_select(src._flat, 0, torch.tensor(s_chunk, dtype=torch.int64),
                               out=staged)
            keepalive.append(staged)
        if _is_range(d_chunk):
            dst._flat.narrow(0, d_chunk[0], hi - lo).copy_(staged, non_blocking=True)
        else:
            on_device = staged.to(dst.device, non_blocking=True)
            dst._flat.index_copy_(0, dev_idx[lo:hi], on_device)


def _staged_d2h(src: SlotPool, s_list: list[int], dst: SlotPool,
                d_list: list[int]) -> Callable[[], None] | None:
    """CUDA -> host through contiguous staging (current stream = side stream).

    Per chunk (in host slot order): the device gathers the chunk into a contiguous
    temporary unless its source slots are consecutive; one DMA moves it straight into
    the host pool when the host slots are consecutive, else into a pinned staging buffer
    that the returned finalizer scatters on the CPU (one memcpy per run of consecutive
    host slots) once the DMA is complete.
    """
    order = sorted(range(len(d_list)), key=d_list.__getitem__)
    s_sorted = [s_list[i] for i in order]
    d_sorted = [d_list[i] for i in order]
    dev_idx = _index_tensor([s_sorted], src.device)[0]
    per_chunk = max(1, STAGE_CHUNK_BYTES // src.block_bytes)
    pending: list[tuple[list[int], torch.Tensor]] = []
    for lo, hi in _chunks(len(d_sorted), per_chunk):
        s_chunk, d_chunk = s_sorted[lo:hi], d_sorted[lo:hi]
        if _is_range(s_chunk):
            gathered = src._flat.narrow(0, s_chunk[0], hi - lo)
        else:
            gathered = src._flat.index_select(0, dev_idx[lo:hi])
        if _is_range(d_chunk):
            dst._flat.narrow(0, d_chunk[0], hi - lo).copy_(gathered, non_blocking=True)
        else:
            staged = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=dst.pinned)
            staged.copy_(gathered, non_blocking=True)
            pending.append((d_chunk, staged))
    if not pending:
        return None

    def scatter() -> None:
        for d_chunk, staged in pending:
            _copy_runs(staged, dst._flat, coalesce_runs(range(len(d_chunk)), d_chunk),
                       non_blocking=False)
        pending.clear()

    return scatter

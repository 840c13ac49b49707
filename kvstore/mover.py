"""Moving block bytes between tiers: the store decides, the mover copies.

- GPU <-> host: ``tiers.pool.copy_slots``, one call per batch, on a CUDA side stream
  (asynchronous; the compute stream is made to wait where it reads or reuses slots).
- Demotion down the cascade (:meth:`BlockMover.demote`): GPU -> host slots; host ->
  shared tier in the background (the host slots are copied into the write queue, the
  publication pool, and written by the publisher thread, so a slow disk never stalls the
  step loop; blocks the full queue cannot take are dropped, and a write that does not
  land is reported back through :meth:`BlockMover.published` so the store forgets it);
  shared -> shared (``get``, ``put``, synchronous). A block whose ``put`` did not land
  is reported back, so the index does not keep it there.
- Loads into GPU slots (:meth:`BlockMover.load`, promotion): host hits are one
  ``copy_slots`` call; shared-tier hits (disk, Redis, daemon) go through one pipeline
  over :data:`MoverConfig.load_workers` threads. Each worker takes a batch of about
  ``load_batch_bytes``: ``get`` (the tier verifies every checksum, per the
  ``tiers.base`` contract), header check against the request (key, parent, tokens,
  layout; no second checksum; our own headers by two byte comparisons,
  ``tiers.codec.ExpectedBlocks``, any other through the full decode), payload copy
  into the worker's pinned staging lane (numpy copy: releases the GIL), then one
  batched host -> GPU copy into the destination slots (``get_into``: LMDB lends views
  into its storage, so the payload is copied once). Workers overlap: one reads its
  batch from the tier while another's copy runs on the GPU. The first block that is
  missing or corrupt ends the hit: blocks after it are not used (the engine recomputes
  them); batches wholly after a known failure are skipped. Only calls that release
  the GIL run in parallel, and with eight workers every release is a hand-over that
  waits to take the GIL back: per block the path releases it for the tier's two
  lookups, its checksum and one payload copy, and per batch for a constant number of
  device calls.
- KV format (:data:`MoverConfig.kv_format`): with ``int8``/``fp8`` the shared tiers
  hold compressed blocks (``tiers.quant``). A block is quantized on its way down:
  publication and write-through quantize the GPU slots on the device (the Triton kernel
  on CUDA, on the side stream) and copy the half-size payloads into the pinned
  publication queue; demotion from the host pool quantizes the host copy with the torch
  reference. It is dequantized on its way up: a load worker stages the
  compressed payloads of its batch in its pinned lane (destination slots, scales and
  codes each at a fixed place, :class:`_CompressedStaging`), copies the good run's
  span (half-size bytes and the slot index) to the device in one host -> device copy
  and dequantizes it straight into the destination GPU slots in one call
  (``quant.dequantize_into``: one Triton launch on CUDA; on the CPU two torch passes
  over each run of consecutive slots). The GPU and host pools always hold exact KV;
  shared -> shared copies move blobs unchanged.
- Publication (:meth:`BlockMover.publish`): committed blocks are snapshotted on the
  GPU side stream into a bounded pinned queue (:data:`MoverConfig.publish_queue_bytes`)
  and written to the shared tiers by one background thread (``kvstore.writer``:
  write-back of host victims first, then publications; publications may fill only half
  the queue when there is a host tier); a full queue drops (counted), never blocks.
  What each tier verifiably stored comes back through :meth:`BlockMover.published`,
  for the store's thread to record in its index.

Thread contract: every public method runs on the store's thread; workers touch only
the shared tiers (thread-safe), staging buffers they own and GPU slots reserved for
them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from queue import SimpleQueue
from typing import Any, NamedTuple

import numpy as np
import torch

from kvstore.cascade import LoadMeasure, LoadRequest, Published
from kvstore.writer import PUBLICATION, WRITE_BACK, Writer
from radix import Moved, Node
from tiers import quant
from tiers.base import HashTier
from tiers.codec import Corrupt, ExpectedBlocks, decode_block, encode_block, payload_bytes
from tiers.layout import KVLayout
from tiers.pool import GPUPool, HostPool, SlotPool, Transfer, copy_slots, side_stream

logger = logging.getLogger(__name__)

POOL_TIERS = ("gpu", "host")
"""Tiers addressed by slot; every other tier is a shared, hash-addressed one."""


@dataclass(frozen=True)
class MoverConfig:
    """Knobs of the load and publication paths (validated by ``StoreConfig``).

    ``load_workers``: threads of the shared-tier load pipeline. ``load_batch_bytes``:
    payload bytes one worker reads and copies at a time (its pinned staging lane).
    ``publish_queue_bytes``: pinned bytes of committed blocks waiting to be written to
    the shared tiers (the bounded publication queue); 0 disables publication.
    ``kv_format``: format of the blocks in the shared tiers (``exact``, ``int8``,
    ``fp8``).
    """

    load_workers: int = 8
    load_batch_bytes: int = 16 << 20
    publish_queue_bytes: int = 256 << 20
    kv_format: str = "exact"


@dataclass
class _LoadState:
    """Shared by the batches of one load: the earliest failure so far."""

    failed: int | None = None
    ready: torch.cuda.Event | None = None  # CUDA: the slots may be written after this
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, index: int) -> None:
        with self.lock:
            if self.failed is None or index < self.failed:
                self.failed = index

    def failed_before(self, index: int) -> bool:
        with self.lock:
            return self.failed is not None and self.failed < index


@dataclass(frozen=True)
class _BatchResult:
    tier: str
    blocks: int
    failure: int | None
    end: float


class Load:
    """A load into GPU slots in flight: host copies on the side stream, shared-tier
    batches on the workers. Poll :meth:`done` from the store's thread."""

    def __init__(self, t0: float, transfer: Transfer | None, host_blocks: int,
                 futures: list[Future[_BatchResult]], block_bytes: int, cuda: bool) -> None:
        self._transfer = transfer
        self._host_blocks = host_blocks
        self._futures = futures
        self._block_bytes = block_bytes
        self._cuda = cuda
        self._t0 = t0  # when the load was started (before any batch was submitted)
        self._host_end: float | None = None
        self._ready = False

    def done(self) -> bool:
        """True once every block has landed (or failed); compute may then read the
        slots (the current CUDA stream is made to wait for the host copy)."""
        if self._ready:
            return True
        t = self._transfer
        if t is not None:
            if not t.done():
                return False
            if self._host_end is None:
                self._host_end = time.perf_counter()
        if not all(f.done() for f in self._futures):
            return False
        if t is not None and self._cuda:
            t.wait_on_stream()  # the current stream of the GPU pool's device
        self._ready = True
        return True

    def wait(self) -> None:
        """Block until :meth:`done`."""
        if self._transfer is not None:
            self._transfer.wait()
        for f in self._futures:
            f.result()
        while not self.done():  # pragma: no cover - done right after the waits above
            time.sleep(0)

    @property
    def first_failure(self) -> int | None:
        """Block index of the first block that could not be loaded, ``None`` if all did."""
        fails = [r.failure for r in (f.result() for f in self._futures) if r.failure is not None]
        return min(fails) if fails else None

    def measures(self) -> list[LoadMeasure]:
        """Per tier: blocks, bytes and seconds from the load's start to its last batch."""
        out = []
        if self._transfer is not None and self._host_blocks:
            seconds = self._transfer.seconds
            if seconds is None and self._host_end is not None:
                seconds = self._host_end - self._t0
            if seconds:
                out.append(LoadMeasure("host", self._host_blocks,
                                       self._host_blocks * self._block_bytes, seconds))
        per: dict[str, tuple[int, float]] = {}
        for f in self._futures:
            r = f.result()
            blocks, end = per.get(r.tier, (0, 0.0))
            per[r.tier] = (blocks + r.blocks, max(end, r.end))
        for tier, (blocks, end) in per.items():
            if blocks:
                out.append(LoadMeasure(tier, blocks, blocks * self._block_bytes, end - self._t0))
        return out


class _Staging:
    """Pinned (with CUDA) staging slots, handed out as fixed lanes of ``lane_blocks``."""

    def __init__(self, layout: KVLayout, lanes: int, lane_blocks: int) -> None:
        self.pool = HostPool(layout, lanes * lane_blocks)
        slots = list(self.pool.alloc(lanes * lane_blocks).slots)
        self._free: SimpleQueue[list[int]] = SimpleQueue()
        for i in range(lanes):
            self._free.put(slots[i * lane_blocks:(i + 1) * lane_blocks])

    def take(self) -> list[int]:
        return self._free.get()

    def give(self, lane: list[int]) -> None:
        self._free.put(lane)


def load_batch_blocks(n: int, lane: int, workers: int) -> int:
    """Blocks per batch of an ``n``-block shared-tier load: at most ``lane`` (a staging
    lane's blocks), and spread evenly: the batches (``ceil(n / lane)``, rounded up to a
    multiple of ``workers``) share the blocks equally, so the load ends when every worker
    has read about ``n / workers`` blocks instead of one worker reading a last short
    round alone (256 blocks in lanes of 15 on 8 workers: 24 batches of 11, not 17 of 15
    and one of 1, three rounds of 15 on the slowest worker)."""
    batches = -(-max(1, n) // max(1, lane))
    batches = -(-batches // max(1, workers)) * max(1, workers)
    return max(1, -(-n // batches))


_LANE_ALIGN = 256
"""Bytes each region of a compressed staging lane starts on (a multiple of any dtype's
size and of the 16 bytes a vectorized device load wants)."""


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _StagedBatch(NamedTuple):
    """Views of a lane's first ``n`` staged blocks (made once per lane and ``n``):
    ``host``, the span to copy (slots, scales, codes); ``device``, where it is copied
    (``None`` without a mirror); ``blocks`` and ``slots``, the blocks and their
    destination slots (int64), on the mirror if any, else on the host."""

    host: torch.Tensor
    device: torch.Tensor | None
    blocks: quant.QuantizedBlocks
    slots: torch.Tensor


class _CompressedStaging:
    """Staging lanes of compressed blocks, pinned (with CUDA), and their mirror on the
    device.

    A lane is one row of bytes with three regions at fixed places: the destination slots
    of its blocks (int64), then ``lane_blocks`` blocks' scales, then their codes. Block
    ``i``'s scales and codes land at their places whatever the batch's good run turns
    out to be, so nothing is repacked, and the first ``n`` blocks (slots, every scale
    row, ``n`` blocks' codes) are one contiguous span: one host -> device copy moves a
    batch, slot index included.

    Per block, :meth:`put` makes one copy that releases the GIL (the codes, numpy) and
    one small one that keeps it (the scales, a ``memoryview`` copy of a few KiB).
    Per batch, :meth:`batch` hands out views made once per lane and run length. Both
    for the same reason: a torch or numpy call that releases the GIL hands it to another
    loader and waits to get it back, which with eight loaders costs more than a small
    copy or a view (torch's bindings release it around every op, views included).
    """

    def __init__(self, layout: KVLayout, kv_format: str, lanes: int, lane_blocks: int,
                 device: torch.device, mirror: bool | None = None) -> None:
        layers, two, bs, heads, dim = layout.block_shape
        self.layout = layout
        self.kv_format = kv_format
        self.lane_blocks = lane_blocks
        self.code_bytes = layers * two * bs * heads * dim
        self.block_bytes = payload_bytes(layout, kv_format)
        self.scale_bytes = self.block_bytes - self.code_bytes
        self.scales_at = _round_up(8 * lane_blocks, _LANE_ALIGN)
        self.codes_at = self.scales_at + _round_up(lane_blocks * self.scale_bytes, _LANE_ALIGN)
        self.lane_bytes = _round_up(self.codes_at + lane_blocks * self.code_bytes, _LANE_ALIGN)
        cuda = device.type == "cuda"
        self.host = torch.empty((lanes, self.lane_bytes), dtype=torch.uint8, pin_memory=cuda)
        self._rows = [self.host[i] for i in range(lanes)]
        self._rows_np = [row.numpy() for row in self._rows]
        self._rows_mv = [row.data for row in self._rows_np]
        self.device = (torch.empty((lanes, self.lane_bytes), dtype=torch.uint8, device=device)
                       if (cuda if mirror is None else mirror) else None)
        self._batches: dict[tuple[int, int], _StagedBatch] = {}
        self._free: SimpleQueue[int] = SimpleQueue()
        for i in range(lanes):
            self._free.put(i)

    def take(self) -> int:
        return self._free.get()

    def give(self, lane: int) -> None:
        self._free.put(lane)

    def put(self, lane: int, i: int, payload: memoryview | bytes) -> None:
        """Stage block ``i`` of ``lane`` (a compressed payload: codes, then scales)."""
        c, s = self.code_bytes, self.scale_bytes
        at = self.codes_at + i * c
        self._rows_np[lane][at:at + c] = np.frombuffer(payload, dtype=np.uint8, count=c)
        at = self.scales_at + i * s
        self._rows_mv[lane][at:at + s] = memoryview(payload)[c:c + s]

    def put_slots(self, lane: int, slots: Sequence[int]) -> None:
        """Write the destination slots of the lane's first ``len(slots)`` blocks."""
        self._rows_np[lane][:8 * len(slots)].view(np.int64)[:] = slots

    def batch(self, lane: int, n: int) -> _StagedBatch:
        """Views of ``lane``'s first ``n`` blocks (see :class:`_StagedBatch`)."""
        views = self._batches.get((lane, n))
        if views is None:
            span = self.codes_at + n * self.code_bytes
            host = self._rows[lane][:span]
            device = self.device[lane, :span] if self.device is not None else None
            row = host if device is None else device
            blocks = quant.blocks_view(row[self.codes_at:], row[self.scales_at:self.codes_at],
                                       self.layout, self.kv_format, n)
            views = _StagedBatch(host, device, blocks, row[:8 * n].view(torch.int64))
            self._batches[(lane, n)] = views
        return views


class BlockMover:
    """Copies blocks for the store; counts blocks moved per direction and corrupt blocks.

    ``host`` may be a pool of no slots (no host tier). ``shared``: the shared tiers by
    name, in cascade order.
    """

    def __init__(self, layout: KVLayout, gpu: GPUPool, host: SlotPool | Any,
                 shared: dict[str, HashTier], config: MoverConfig | None = None) -> None:
        cfg = config or MoverConfig()
        self.layout = layout
        self.gpu = gpu
        self.host = host
        self.shared = shared
        self.config = cfg
        self.moved: Counter[str] = Counter()  # "src->dst" -> blocks
        self.corrupt = 0
        self.publish_dropped = 0
        self.puts_failed: Counter[str] = Counter()
        self._lock = threading.Lock()
        # GPU->host copies in flight, with the host slots each writes
        self._host_pending: list[tuple[Transfer, frozenset[int]]] = []
        # Publication copies in flight, with the GPU slots each reads: a slot of a cached
        # block is rewritten only once the block left the GPU and the slot is handed out
        # again, so later compute waits for them only then (before_gpu_reuse).
        self._gpu_reads: list[tuple[Transfer, frozenset[int]]] = []
        self._cuda = gpu.device.type == "cuda"
        self.kv_format = cfg.kv_format
        self._compressed = cfg.kv_format != "exact"
        self._lane_blocks = max(1, cfg.load_batch_bytes // payload_bytes(layout, cfg.kv_format))
        self._expected = ExpectedBlocks(layout, cfg.kv_format)
        # Made up front (pinned allocation is slow): a first load pays no set-up.
        self._staging = _Staging(layout, cfg.load_workers, self._lane_blocks) \
            if shared and not self._compressed else None
        self._cstaging = _CompressedStaging(layout, cfg.kv_format, cfg.load_workers,
                                            self._lane_blocks, gpu.device) \
            if shared and self._compressed else None
        self._loaders = ThreadPoolExecutor(max_workers=cfg.load_workers,
                                           thread_name_prefix="kv-load") if shared else None
        pub_slots = cfg.publish_queue_bytes // layout.block_bytes if shared else 0
        self._pub_pool = HostPool(layout, pub_slots) if pub_slots else None
        # Half the write queue is kept for write-back of host victims (their only copy)
        # when there is a host tier to demote from: publications may not fill it.
        demotes = isinstance(host, SlotPool) and host.num_slots > 0
        self._pub_reserve = pub_slots // 2 if demotes else 0
        self._publisher = Writer("kv-publish")
        self._published: deque[Published] = deque()
        # keys of write-back demotions queued or being written (a load waits for them)
        self._writing: Counter[bytes] = Counter()

    # ------------------------------------------------------------- GPU <-> host

    def host_barrier(self, slots: Sequence[int] | None = None) -> None:
        """Wait for the GPU->host copies in flight that write ``slots`` (every one by
        default), before those host slots are read on the host."""
        if slots is None:
            pending, self._host_pending = self._host_pending, []
            for t, _ in pending:
                t.wait()
            return
        wanted = set(slots)
        keep: list[tuple[Transfer, frozenset[int]]] = []
        for t, dst in self._host_pending:
            if not wanted.isdisjoint(dst):
                t.wait()
            elif not t.done():
                keep.append((t, dst))
        self._host_pending = keep

    def gpu_to_host(self, gpu_slots: Sequence[int], host_slots: Sequence[int]) -> None:
        """Copy GPU slots to host slots (async). The GPU slots may be reused at once."""
        if not gpu_slots:
            return
        t = copy_slots(self.gpu, gpu_slots, self.host, host_slots)
        if self._cuda:
            t.wait_on_stream(torch.cuda.current_stream(self.gpu.device))
        self._host_pending.append((t, frozenset(host_slots)))
        self._count("gpu->host", len(gpu_slots))

    def before_gpu_reuse(self, gpu_slots: Sequence[int]) -> None:
        """Order the compute enqueued from now on after the publication copies still
        reading any of ``gpu_slots`` (about to be handed out again, so about to be
        written); store's thread, before the compute that writes them is enqueued.
        Copies on the side stream are ordered after the current stream, so they follow
        too. Cheap when nothing is in flight (the common case: publications finish long
        before their blocks are evicted)."""
        if not self._gpu_reads:
            return
        wanted = set(gpu_slots)
        keep: list[tuple[Transfer, frozenset[int]]] = []
        for t, src in self._gpu_reads:
            if t.device_done():
                continue
            if wanted.isdisjoint(src):
                keep.append((t, src))
            else:
                t.wait_on_stream(torch.cuda.current_stream(self.gpu.device))
        self._gpu_reads = keep

    def copy_gpu(self, src: int, dst: int) -> None:
        """Copy one GPU slot to another (copy-on-write), ordered before later compute."""
        t = copy_slots(self.gpu, [src], self.gpu, [dst])
        if self._cuda:
            t.wait_on_stream(torch.cuda.current_stream(self.gpu.device))
        else:
            t.wait()
        self._count("gpu->gpu", 1)

    # --------------------------------------------------------------- demotion

    def demote(self, src: str, dst: str, moved: Sequence[Moved]) -> list[Node]:
        """Copy demoted blocks from tier ``src`` to the next tier ``dst``; returns the
        nodes whose bytes did not reach ``dst`` (the store forgets them there).

        GPU -> host is asynchronous (host readers wait at :meth:`host_barrier`). Host ->
        shared tier is written in the background when the write queue has room (see
        :meth:`_demote_in_background`; the blocks it takes are reported lost later if
        their write fails); otherwise, and shared -> shared, synchronously, as the source
        slots are freed next.
        """
        if not moved:
            return []
        if src == "gpu" and dst == "host":
            self.gpu_to_host([m.src for m in moved], [m.dst for m in moved])
            return []
        nodes = [m.node for m in moved]
        if src == "host":
            self.host_barrier([m.src for m in moved])  # only the copies into the victims
            if self._pub_pool is not None:
                return self._demote_in_background(dst, nodes, [m.src for m in moved])
            items = self._encode_slots(nodes, self.host, [m.src for m in moved])
        elif src not in POOL_TIERS:
            keys = [n.key for n in nodes]
            blobs = self._get(src, keys)
            items = [(k, b) for k, b in zip(keys, blobs) if b is not None]
        else:
            raise ValueError(f"no demotion path {src} -> {dst}")
        stored = self._put_verified(dst, items)
        self._count(f"{src}->{dst}", len(stored))
        return [n for n in nodes if n.key not in stored]

    def _demote_in_background(self, dst: str, nodes: list[Node], host_slots: list[int]
                              ) -> list[Node]:
        """Write-back from the host pool to shared tier ``dst`` off the store's thread.

        The blocks the write queue (the publication pool) has room for are copied into
        it now, so their host slots may be reused at once, and written to ``dst`` by the
        publisher thread; those whose write does not land come back as
        :attr:`Published.lost`. The rest are dropped (counted in :attr:`publish_dropped`):
        under sustained pressure the disk keeps what it can write, and the step loop
        never waits for it. Returns the dropped nodes (the store forgets them in
        ``dst``); the others stay recorded there meanwhile (a load of one still queued
        waits for its write: :meth:`load`).
        """
        pool = self._pub_pool
        assert pool is not None
        n = min(len(nodes), pool.num_free)
        if n < len(nodes):
            # keep the blocks nearest their chains' roots: a hit needs a prefix's
            # leading blocks, a trailing one alone serves nothing
            order = sorted(range(len(nodes)), key=lambda i: nodes[i].depth)
            nodes = [nodes[i] for i in order]
            host_slots = [host_slots[i] for i in order]
            with self._lock:
                self.publish_dropped += len(nodes) - n
        if n:
            slots = list(pool.alloc(n).slots)
            copy_slots(self.host, host_slots[:n], pool, slots)  # CPU pools: synchronous
            with self._lock:
                self._writing.update(node.key for node in nodes[:n])
            self._publisher.submit(partial(self._demote_job, dst, nodes[:n], slots),
                                   WRITE_BACK)
        return nodes[n:]

    def _demote_job(self, dst: str, nodes: list[Node], slots: list[int]) -> None:
        """Publisher thread: encode demoted blocks from the write queue and put them."""
        pool = self._pub_pool
        assert pool is not None
        stored: set[bytes] = set()
        try:
            try:
                items = self._encode_slots(nodes, pool, slots)
            finally:
                pool.free(slots)
            stored = self._put_verified(dst, items)
        except Exception:  # whatever failed, those blocks are not there: report them lost
            logger.exception("write-back of %d block(s) to %s failed", len(nodes), dst)
        finally:
            with self._lock:
                self._writing.subtract(node.key for node in nodes)
                for node in nodes:
                    if self._writing[node.key] <= 0:
                        del self._writing[node.key]
            self._count(f"host->{dst}", len(stored))
            self._published.append(Published(dst, [], [n for n in nodes
                                                       if n.key not in stored]))

    def _encode_slots(self, nodes: Sequence[Node], pool: SlotPool, slots: Sequence[int]
                      ) -> list[tuple[bytes, bytes]]:
        """``(key, blob)`` of each node from its slot of a CPU pool, in the shared tiers'
        format (quantized here for a compressed one)."""
        if not self._compressed:
            return [(n.key, encode_block(n.key, n.parent_key, n.tokens, self.layout,
                                         pool.to_bytes(s))) for n, s in zip(nodes, slots)]
        q = quant.quantize(pool.tensor, self.kv_format, list(slots))
        return [(n.key, encode_block(n.key, n.parent_key, n.tokens, self.layout,
                                     quant.encode_payload(q, i), kv_format=self.kv_format))
                for i, n in enumerate(nodes)]

    def _get(self, tier: str, keys: list[bytes]) -> list[bytes | None]:
        try:
            return self.shared[tier].get(keys)
        except Exception:  # a tier must not raise; if one does, it is a miss
            logger.exception("tier %s raised on get", tier)
            return [None] * len(keys)

    def _put_verified(self, tier: str, items: list[tuple[bytes, bytes]]) -> set[bytes]:
        """``put`` then ask the tier which keys it holds: the keys stored (a prefix of
        ``items``' keys). A put the tier dropped (full, down, failed) stores nothing."""
        if not items:
            return set()
        keys = [k for k, _ in items]
        t = self.shared[tier]
        try:
            t.put(items)
            n = t.contains_prefix(keys)
        except Exception:
            logger.exception("tier %s raised on put", tier)
            n = 0
        if n < len(keys):
            with self._lock:
                self.puts_failed[tier] += len(keys) - n
        return set(keys[:n])

    # ------------------------------------------------------------------ loads

    def contains_prefix(self, keys: Sequence[bytes]) -> list[tuple[str, int]]:
        """Walk the shared tiers past the index: ``[(tier, consecutive blocks), ...]``."""
        out: list[tuple[str, int]] = []
        pos = 0
        for name, tier in self.shared.items():
            if pos >= len(keys):
                break
            n = tier.contains_prefix(keys[pos:])
            if n:
                out.append((name, n))
                pos += n
        return out

    def load(self, requests: Sequence[LoadRequest]) -> Load:
        """Start loading blocks into GPU slots: host hits on the side stream, shared-tier
        hits on the load workers in batches. Poll the returned :class:`Load`."""
        t0 = time.perf_counter()
        host = [r for r in requests if r.tier == "host"]
        transfer = None
        if host:
            sources = [r.source for r in host if r.source is not None]
            assert len(sources) == len(host), "a host load names its host slot"
            if self._cuda and all(t.strategy != "staged" for t, _ in self._host_pending):
                # No host-side wait: the GPU->host copies that wrote these host slots and
                # this host->GPU copy run on the device's one side stream, in order, so
                # the engine thread does not stall on the compute they waited for. (A
                # staged copy lands in the host slots only when the CPU finishes it.)
                self._host_pending = [(t, d) for t, d in self._host_pending if not t.done()]
            else:
                self.host_barrier(sources)
            transfer = copy_slots(self.host, sources, self.gpu,
                                  [r.slot for r in host])
            self._count("host->gpu", len(host))
        futures: list[Future[_BatchResult]] = []
        shared = sorted((r for r in requests if r.tier != "host"), key=lambda r: r.index)
        if shared:
            assert self._loaders is not None, "a shared-tier load needs shared tiers"
            with self._lock:
                writing = bool(self._writing) and any(r.key in self._writing for r in shared)
            if writing:  # a block demoted a moment ago: let its write land first
                self._publisher.barrier(WRITE_BACK)
            # The slots were reserved now, on the store's thread: the workers' copies
            # wait for the compute enqueued so far, not for compute enqueued later.
            ready = None
            if self._cuda:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.gpu.device))
            state = _LoadState(ready=ready)
            per = load_batch_blocks(len(shared), self._lane_blocks, self.config.load_workers)
            batch: list[LoadRequest] = []
            for r in shared:
                if batch and (r.tier != batch[0].tier or len(batch) == per):
                    futures.append(self._loaders.submit(self._load_batch, batch, state))
                    batch = []
                batch.append(r)
            futures.append(self._loaders.submit(self._load_batch, batch, state))
        return Load(t0, transfer, len(host), futures, self.layout.block_bytes, self._cuda)

    def _load_batch(self, reqs: list[LoadRequest], state: _LoadState) -> _BatchResult:
        """Worker: read, check and copy one batch; returns what landed.

        Each value is checked against its request (key, parent, tokens, layout; the tier
        verified the checksum, per the ``tiers.base`` contract) and its payload copied
        into this worker's staging lane, then the longest good run from the batch's
        first block goes to the GPU in one copy. Every tier hands blocks over through
        ``get_into``; LMDB lends views into its storage, so the payload is copied once,
        by numpy, without the GIL.
        """
        name = reqs[0].tier
        if state.failed_before(reqs[0].index):
            return _BatchResult(name, 0, reqs[0].index, time.perf_counter())
        if self._compressed:
            return self._load_compressed(reqs, state)
        assert self._staging is not None
        staging = self._staging
        lane = staging.take()
        try:
            ok = self._read_batch(reqs, lambda i, payload: staging.pool.from_bytes(
                lane[i], payload))
            if ok:
                copy_slots(staging.pool, lane[:ok], self.gpu, [r.slot for r in reqs[:ok]],
                           after=state.ready).wait()
        finally:
            staging.give(lane)
        return self._landed(reqs, ok, state)

    def _read_batch(self, reqs: list[LoadRequest],
                    stage: Callable[[int, memoryview | bytes], None]) -> int:
        """Read one batch from its tier, check each block against its request (key,
        parent, tokens, layout, format; the tier verified the checksum, per the
        ``tiers.base`` contract: our own encoding of the block asked for is recognized by
        :class:`tiers.codec.ExpectedBlocks`, anything else goes through the full decode,
        which accepts and refuses what it always did) and hand each good payload to
        ``stage(i, payload)``.
        Corrupt blocks are counted and deleted. Returns the length of the good run from
        the batch's first block (what may be copied to the GPU)."""
        name = reqs[0].tier
        tier = self.shared[name]
        good = [False] * len(reqs)
        bad: list[int] = []

        expected = self._expected

        def take(i: int, blob: bytes | memoryview) -> None:
            r = reqs[i]
            payload: memoryview | bytes | None = expected.payload(blob, r.key, r.parent,
                                                                   r.tokens)
            if payload is None:  # not our canonical encoding of this block: parse it
                blk = decode_block(blob, expected_key=r.key, layout=self.layout,
                                   verify_checksum=False, kv_format=self.kv_format)
                if isinstance(blk, Corrupt) or blk.tokens != r.tokens or blk.parent != r.parent:
                    bad.append(i)
                    return
                payload = blk.payload
            stage(i, payload)
            good[i] = True

        try:
            tier.get_into([r.key for r in reqs], take)
        except Exception:  # a tier must not raise; if one does, the rest is a miss
            logger.exception("tier %s raised on get", name)
        if bad:
            with self._lock:
                self.corrupt += len(bad)
            tier.delete([reqs[i].key for i in bad])
        return good.index(False) if False in good else len(good)

    def _landed(self, reqs: list[LoadRequest], ok: int, state: _LoadState) -> _BatchResult:
        """Record that the first ``ok`` blocks of a batch landed; the next one failed."""
        failure = reqs[ok].index if ok < len(reqs) else None
        if failure is not None:
            state.fail(failure)
        name = reqs[0].tier
        self._count(f"{name}->gpu", ok)
        return _BatchResult(name, ok, failure, time.perf_counter())

    def _load_compressed(self, reqs: list[LoadRequest], state: _LoadState) -> _BatchResult:
        """:meth:`_load_batch` for compressed blocks: stage the payloads in the worker's
        lane (:class:`_CompressedStaging`), then per batch a fixed number of calls: on
        CUDA one host -> device copy of the good run's span (destination slots, scales,
        codes), one dequantization into the destination GPU slots (one Triton launch),
        one event to wait on; on the CPU the dequantization straight from the lane."""
        staging = self._cstaging
        assert staging is not None
        lane = staging.take()
        try:
            ok = self._read_batch(reqs, lambda i, payload: staging.put(lane, i, payload))
            if ok:
                slots = [r.slot for r in reqs[:ok]]
                staging.put_slots(lane, slots)  # GPU slots this store allocated
                b = staging.batch(lane, ok)
                if b.device is None:
                    quant.dequantize_into(b.blocks, self.gpu.tensor, b.slots)
                else:
                    stream = side_stream(self.gpu.device)
                    with torch.cuda.stream(stream):
                        if state.ready is not None:
                            stream.wait_event(state.ready)
                        b.device.copy_(b.host, non_blocking=True)
                        quant.dequantize_into(b.blocks, self.gpu.tensor, b.slots)
                        done = torch.cuda.Event()
                        done.record(stream)
                    done.synchronize()  # the lane's bytes may be reused after this
        finally:
            staging.give(lane)
        return self._landed(reqs, ok, state)

    # ------------------------------------------------------------ publication

    def publish(self, nodes: Sequence[Node], gpu_slots: Sequence[int]) -> int:
        """Queue committed blocks for every shared tier; returns how many were queued.

        Snapshots the GPU slots on the side stream, after the compute that wrote them;
        later compute does not wait for the copy (the blocks stay cached on the GPU), only
        compute after the store hands one of those slots out again
        (:meth:`before_gpu_reuse`). When the queue is full the rest are
        dropped (counted in :attr:`publish_dropped`); this never blocks. With a host
        tier, publications leave half the queue to write-back (a host victim's write is
        its only copy's way down; a publication copies a block still cached above) and
        are written after the write-backs queued (``kvstore.writer``).
        """
        if not nodes or not self.shared:
            return 0
        pool = self._pub_pool
        n = max(0, min(len(nodes), pool.num_free - self._pub_reserve)) if pool is not None else 0
        with self._lock:
            self.publish_dropped += len(nodes) - n
        if n == 0:
            return 0
        assert pool is not None
        slots = list(pool.alloc(n).slots)
        batch = list(nodes[:n])
        if self._compressed:
            ready = self._snapshot_compressed(list(gpu_slots[:n]), pool, slots)
            self._publisher.submit(partial(self._publish_job, batch, slots, ready), PUBLICATION)
            return n
        t = copy_slots(self.gpu, gpu_slots[:n], pool, slots)
        if self._cuda:  # compute waits for it only if it reuses a slot it reads
            self._gpu_reads = [(r, g) for r, g in self._gpu_reads if not r.device_done()]
            self._gpu_reads.append((t, frozenset(gpu_slots[:n])))
        self._publisher.submit(partial(self._publish_job, batch, slots, t), PUBLICATION)
        return n

    def _snapshot_compressed(self, gpu_slots: list[int], pool: HostPool, slots: list[int]
                             ) -> torch.cuda.Event | None:
        """Quantize GPU slots on the device (Triton on CUDA, on the side stream after the
        compute that wrote them) and copy each compressed payload (codes, then scales:
        ``quant.encode_payload``'s bytes) into the first bytes of its publication slot,
        so half the bytes cross to the host. Returns the event the copies end at (CUDA);
        the compute stream waits only for the quantization, so the GPU slots may be
        reused at once."""
        code_bytes = math.prod(self.layout.block_shape)  # one byte a value
        cbytes = payload_bytes(self.layout, self.kv_format)
        if not self._cuda:
            q = quant.quantize(self.gpu.tensor, self.kv_format, gpu_slots)
            self._pack_into(q, pool, slots, code_bytes, cbytes)
            return None
        device = self.gpu.device
        stream = side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            q = quant.quantize(self.gpu.tensor, self.kv_format, gpu_slots)
            read = torch.cuda.Event()
            read.record(stream)
            self._pack_into(q, pool, slots, code_bytes, cbytes)
            copied = torch.cuda.Event()
            copied.record(stream)
        torch.cuda.current_stream(device).wait_event(read)
        return copied

    @staticmethod
    def _pack_into(q: quant.QuantizedBlocks, pool: HostPool, slots: list[int],
                   code_bytes: int, cbytes: int) -> None:
        codes = q.codes.view(torch.uint8).view(q.num_blocks, -1)
        scales = q.scales.view(torch.uint8).view(q.num_blocks, -1)
        for i, s in enumerate(slots):
            dst = pool.tensor[s].view(-1).view(torch.uint8)
            dst[:code_bytes].copy_(codes[i], non_blocking=True)
            dst[code_bytes:cbytes].copy_(scales[i], non_blocking=True)

    def _publish_job(self, nodes: list[Node], slots: list[int],
                     ready: Transfer | torch.cuda.Event | None) -> None:
        pool = self._pub_pool
        assert pool is not None
        try:
            if isinstance(ready, Transfer):
                ready.wait()
                items = self._encode_slots(nodes, pool, slots)
            else:  # compressed payloads already packed into the slots' first bytes
                if ready is not None:
                    ready.synchronize()
                cbytes = payload_bytes(self.layout, self.kv_format)
                items = [(n.key, encode_block(n.key, n.parent_key, n.tokens, self.layout,
                                              pool.to_bytes(s)[:cbytes],
                                              kv_format=self.kv_format))
                         for n, s in zip(nodes, slots)]
        finally:
            pool.free(slots)
        for name in self.shared:
            stored = self._put_verified(name, items)
            self._count(f"gpu->{name}", len(stored))
            self._published.append(Published(name, [n for n in nodes if n.key in stored]))

    def published(self) -> list[Published]:
        """Publications completed since the last call, oldest first (store's thread)."""
        out = []
        while self._published:
            out.append(self._published.popleft())
        return out

    # ------------------------------------------------------------------ misc

    def _count(self, direction: str, n: int) -> None:
        if n:
            with self._lock:
                self.moved[direction] += n

    def flush(self) -> None:
        """Wait until every queued publication has reached its tiers."""
        self._publisher.barrier()
        self.host_barrier()

    def close(self) -> None:
        """Finish queued writes, then stop the threads."""
        self._publisher.shutdown()
        if self._loaders is not None:
            self._loaders.shutdown(wait=True)
        self.host_barrier()

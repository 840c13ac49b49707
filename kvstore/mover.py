"""Moving block bytes between tiers: the store decides, the mover copies.

- GPU <-> host: ``tiers.pool.copy_slots``, one call per batch, on a CUDA side stream
  (asynchronous; the compute stream is made to wait where it reads or reuses slots).
- host -> disk/redis/remote: encode (``tiers.codec``) and ``put`` one batch.
- disk/redis/remote -> GPU (promotion): a background worker thread ``get``s a batch,
  decodes and verifies every block (key, parent, tokens, layout, checksum) and writes
  the payload into the destination GPU slot. The first block that is missing or
  corrupt ends the load: blocks after it are not used (the engine recomputes them).

Thread contract: every method but the worker's body runs on the store's thread; the
worker touches only the shared tiers (thread-safe) and GPU slots reserved for it.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from radix import Node
from tiers.base import HashTier
from tiers.codec import Corrupt, decode_block, encode_block
from tiers.layout import KVLayout
from tiers.pool import GPUPool, HostPool, Transfer, copy_slots

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRequest:
    """One block to promote from a shared tier into GPU slot ``slot``."""

    index: int  # block index in the sequence
    key: bytes
    parent: bytes
    tokens: bytes
    tier: str
    slot: int


class Load:
    """A promotion from shared tiers in flight on the worker thread."""

    def __init__(self, future: Future[int | None]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        self._future.result()

    @property
    def first_failure(self) -> int | None:
        """Block index of the first block that could not be loaded, ``None`` if all did."""
        return self._future.result()


class BlockMover:
    """Copies blocks for the store; counts blocks moved per direction and corrupt blocks."""

    def __init__(self, layout: KVLayout, gpu: GPUPool, host: HostPool | None,
                 shared: dict[str, HashTier]) -> None:
        self.layout = layout
        self.gpu = gpu
        self.host = host
        self.shared = shared
        self.moved: Counter[str] = Counter()  # "src->dst" -> blocks
        self.corrupt = 0
        self._lock = threading.Lock()
        self._host_pending: list[Transfer] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-mover")
        self._cuda = gpu.device.type == "cuda"

    # ------------------------------------------------------------- GPU <-> host

    def host_barrier(self) -> None:
        """Wait for every GPU->host copy in flight, before host slots are read."""
        pending, self._host_pending = self._host_pending, []
        for t in pending:
            t.wait()

    def gpu_to_host(self, gpu_slots: Sequence[int], host_slots: Sequence[int]) -> None:
        """Copy GPU slots to host slots (async). The GPU slots may be reused at once."""
        if not gpu_slots:
            return
        assert self.host is not None
        t = copy_slots(self.gpu, gpu_slots, self.host, host_slots)
        if self._cuda:
            t.wait_on_stream(torch.cuda.current_stream(self.gpu.device))
        self._host_pending.append(t)
        self._count("gpu->host", len(gpu_slots))

    def host_to_gpu(self, host_slots: Sequence[int], gpu_slots: Sequence[int]) -> Transfer | None:
        """Start copying host slots into GPU slots; poll with :meth:`wait_ready`."""
        if not host_slots:
            return None
        assert self.host is not None
        self.host_barrier()
        t = copy_slots(self.host, host_slots, self.gpu, gpu_slots)
        self._count("host->gpu", len(host_slots))
        return t

    def wait_ready(self, transfer: Transfer | None) -> bool:
        """True once ``transfer`` is complete; then compute may read its slots."""
        if transfer is None:
            return True
        if not transfer.done():
            return False
        if self._cuda:
            transfer.wait_on_stream(torch.cuda.current_stream(self.gpu.device))
        return True

    def copy_gpu(self, src: int, dst: int) -> None:
        """Copy one GPU slot to another (copy-on-write), ordered before later compute."""
        t = copy_slots(self.gpu, [src], self.gpu, [dst])
        if self._cuda:
            t.wait_on_stream(torch.cuda.current_stream(self.gpu.device))
        else:
            t.wait()
        self._count("gpu->gpu", 1)

    # ------------------------------------------------------- to the shared tiers

    def _encode(self, node: Node, payload: memoryview | bytes) -> tuple[bytes, bytes]:
        return node.key, encode_block(node.key, node.parent_key, node.tokens, self.layout, payload)

    def host_to_shared(self, tier: str, nodes: Sequence[Node], host_slots: Sequence[int]) -> None:
        """Encode host slots and write them to ``tier`` (synchronous: slots are freed next)."""
        if not nodes:
            return
        assert self.host is not None
        self.host_barrier()
        items = [self._encode(n, self.host.to_bytes(s)) for n, s in zip(nodes, host_slots)]
        self.shared[tier].put(items)
        self._count(f"host->{tier}", len(items))

    def gpu_to_shared(self, tier: str, nodes: Sequence[Node], gpu_slots: Sequence[int]) -> None:
        """Write-through: snapshot GPU slots now, encode and write on the worker."""
        if not nodes:
            return
        payloads = [bytes(self.gpu.to_bytes(s)) for s in gpu_slots]
        meta = [(n.key, n.parent_key, n.tokens) for n in nodes]

        def job() -> None:
            items = [(k, encode_block(k, p, t, self.layout, b)) for (k, p, t), b in zip(meta, payloads)]
            self.shared[tier].put(items)
            self._count(f"gpu->{tier}", len(items))

        self._worker.submit(job)

    def shared_to_shared(self, src: str, dst: str, nodes: Sequence[Node]) -> None:
        """Copy blocks from one shared tier down to the next (demotion cascade)."""
        if not nodes:
            return
        keys = [n.key for n in nodes]
        blobs = self.shared[src].get(keys)
        items = [(k, b) for k, b in zip(keys, blobs) if b is not None]
        if items:
            self.shared[dst].put(items)
        self._count(f"{src}->{dst}", len(items))

    # -------------------------------------------------------- from shared tiers

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
        """Promote blocks from shared tiers into GPU slots on the worker thread."""
        reqs = sorted(requests, key=lambda r: r.index)
        return Load(self._worker.submit(self._load, reqs))

    def _load(self, reqs: list[LoadRequest]) -> int | None:
        for tier, group_iter in itertools.groupby(reqs, key=lambda r: r.tier):
            group = list(group_iter)
            try:
                blobs = self.shared[tier].get([r.key for r in group])
            except Exception:  # a tier must not raise; if one does, the load is a miss
                logger.exception("tier %s raised on get", tier)
                return group[0].index
            for r, blob in zip(group, blobs):
                if blob is None:
                    return r.index
                blk = decode_block(blob, expected_key=r.key, layout=self.layout)
                if isinstance(blk, Corrupt) or blk.tokens != r.tokens or blk.parent != r.parent:
                    with self._lock:
                        self.corrupt += 1
                    self.shared[tier].delete([r.key])
                    return r.index
                self.gpu.from_bytes(r.slot, blk.payload)
                self._count(f"{tier}->gpu", 1)
        return None

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            self.moved[direction] += n

    def flush(self) -> None:
        """Wait until every queued background write has reached its tier."""
        self._worker.submit(lambda: None).result()
        self.host_barrier()

    def close(self) -> None:
        """Finish queued writes, then stop the worker."""
        self._worker.shutdown(wait=True)
        self.host_barrier()

"""Configuration of the store: one frozen dataclass, validated once.

Capacities are in blocks for the slot pools (GPU, host) and in bytes for the disk tier
(LMDB enforces it). In simulation mode (``layout is None``) no KV bytes exist and every
tier's capacity is in blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from radix.eviction import DEFAULT_KNEE_TOKENS, EVICTIONS, Eviction
from radix.hashing import KV_FORMATS
from tiers.codec import payload_bytes
from tiers.layout import KVLayout

Policy = Literal["write-back", "write-through"]
POLICIES: tuple[str, ...] = ("write-back", "write-through")
SHARED_TIERS: tuple[str, ...] = ("disk", "redis", "remote")
"""Hash-addressed tiers other processes can read, in cascade order."""


@dataclass(frozen=True)
class StoreConfig:
    """Everything a :class:`kvstore.store.KVStore` needs to build its tiers.

    - ``layout``: KV block layout; ``None`` means simulation mode (capacity accounting
      only, no tensors, no I/O).
    - ``gpu_blocks``: slots of the GPU pool (on ``device``; ``"cpu"`` works).
    - ``host_blocks``: slots of the host pool (pinned when CUDA is present); 0 = none.
    - ``disk_path``/``disk_bytes``: LMDB directory and capacity in bytes; ``None`` = none.
    - ``redis_url``: ``redis://``, ``rediss://`` or ``redis+cluster://`` URL; ``None`` = none.
    - ``remote_url``: ``http(s)://`` URL of a cache daemon; ``None`` = none.
    - ``disk_blocks``/``redis_blocks``/``remote_blocks``: how many blocks of each shared
      tier the local index remembers (in simulation mode: the tier's capacity). The
      shared tiers themselves may hold more, written by other processes; a match asks
      them past the index. 0 derives a default from ``disk_bytes`` or 1M blocks.
    - ``policy``: ``write-back`` demotes blocks down the tiers when they are evicted;
      ``write-through`` also copies every committed block down at once.
    - ``publish``: sharing by default. Copy every committed block to every configured
      shared tier at once (asynchronously, through a bounded queue that never blocks
      the engine) so another engine hits it without waiting for eviction. The index
      records a block in a shared tier only once the tier verifiably holds it. The
      simulation (:meth:`simulation`) turns it off: it models one process's cache.
    - ``publish_queue_bytes``: pinned host bytes of blocks waiting for the shared tiers
      (the write queue's bound): publications, and write-back demotions from the host
      (with ``publish`` off too; 0 makes those synchronous). Blocks that do not fit are
      dropped and counted (``publish_dropped``). With a host tier, publications may fill
      only half of it and are written after the demotions queued: under write pressure
      the queue drops copies of blocks still cached above, not a host victim's only copy.
      The engine (``engine.llm.LLM``) sizes it to two steps' worth of blocks when that is
      more than the default (Llama-3-8B with 8,192-token steps: 2 GiB).
    - ``load_workers``/``load_batch_bytes``: threads of the shared-tier -> GPU load
      pipeline and the payload bytes each reads and copies at a time (its pinned
      staging lane).
    - ``eviction``: which evictable block of a tier goes first (radix/eviction.py):
      ``lru`` (default), ``lfu`` (LFU with aging) or ``cost`` (keeps blocks that cost the
      most to recompute: the deeper in the sequence, the costlier).
    - ``eviction_knee_tokens``: the ``cost`` order's knee, the context length (tokens) at
      which attention costs a token as much as the weights (~params / (2 layers hidden)).
    - ``redis_ttl_s``: expiry of blocks written to Redis; ``None`` = none.
    - ``namespace``: key prefix in Redis and the daemon (separates deployments).
    - ``auth_token``: bearer token for the daemon; ``None`` = none.
    - ``kv_format``: format of the blocks in the shared tiers (disk, Redis, daemon):
      ``exact`` (the default: the GPU pool's bytes), or ``int8``/``fp8`` (``tiers.quant``:
      one byte a value plus a bf16 scale per head vector, about half of bf16). Blocks are
      quantized on the way down and dequantized into GPU slots on the way up; the GPU and
      host pools always hold exact KV. The namespace names the format
      (``Namespace.kv_format`` must equal it), so stores of different formats never
      read each other's blocks.
    """

    layout: KVLayout | None
    gpu_blocks: int
    block_size: int = 16
    host_blocks: int = 0
    disk_path: str | None = None
    disk_bytes: int = 0
    disk_blocks: int = 0
    redis_url: str | None = None
    redis_blocks: int = 0
    redis_ttl_s: float | None = None
    remote_url: str | None = None
    remote_blocks: int = 0
    auth_token: str | None = None
    policy: Policy = "write-back"
    eviction: Eviction = "lru"
    eviction_knee_tokens: int = DEFAULT_KNEE_TOKENS
    device: str = "cpu"
    namespace: str = "kv"
    publish: bool = True
    publish_queue_bytes: int = 256 << 20
    load_workers: int = 8
    load_batch_bytes: int = 16 << 20
    kv_format: str = "exact"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"StoreConfig: {msg}")

        need(isinstance(self.gpu_blocks, int) and self.gpu_blocks > 0,
             f"gpu_blocks must be a positive number of blocks, got {self.gpu_blocks!r}")
        for name in ("host_blocks", "disk_bytes", "disk_blocks", "redis_blocks",
                     "remote_blocks"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0,
                 f"{name} must be a non-negative int, got {value!r}")
        need(self.block_size > 0, f"block_size must be positive, got {self.block_size}")
        need(isinstance(self.publish_queue_bytes, int) and self.publish_queue_bytes >= 0,
             f"publish_queue_bytes must be a non-negative int of bytes, got "
             f"{self.publish_queue_bytes!r}")
        need(isinstance(self.load_workers, int) and 1 <= self.load_workers <= 256,
             f"load_workers must be an int in 1..256, got {self.load_workers!r}")
        need(isinstance(self.load_batch_bytes, int) and self.load_batch_bytes > 0,
             f"load_batch_bytes must be a positive int of bytes, got "
             f"{self.load_batch_bytes!r}")
        need(self.policy in POLICIES,
             f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        need(self.eviction in EVICTIONS,
             f"eviction must be one of {', '.join(EVICTIONS)}, got {self.eviction!r}")
        need(isinstance(self.eviction_knee_tokens, int) and self.eviction_knee_tokens > 0,
             f"eviction_knee_tokens must be a positive number of tokens, got "
             f"{self.eviction_knee_tokens!r}")
        if self.layout is not None:
            need(self.layout.block_size == self.block_size,
                 f"block_size {self.block_size} differs from the layout's "
                 f"{self.layout.block_size}; set one value for both")
            need(self.disk_path is None or self.disk_bytes > 0,
                 "disk_path needs disk_bytes > 0 (the disk tier's capacity in bytes)")
            if self.disk_path is not None and self.kv_format in KV_FORMATS:
                one = payload_bytes(self.layout, self.kv_format)
                need(self.disk_bytes >= one,
                     f"disk_bytes {self.disk_bytes} holds no block of this model ({one} "
                     "bytes a block): give more (--disk-bytes), or no disk tier")
        else:
            need(self.disk_path is None and self.redis_url is None and self.remote_url is None,
                 "simulation mode (layout=None) takes capacities in blocks "
                 "(disk_blocks, redis_blocks), not paths or URLs")
        need(self.kv_format in KV_FORMATS,
             f"kv_format must be one of {', '.join(KV_FORMATS)} (--kv-format), got "
             f"{self.kv_format!r}")
        need(self.redis_ttl_s is None or self.redis_ttl_s > 0,
             f"redis_ttl_s must be None or positive seconds, got {self.redis_ttl_s!r}")

    @classmethod
    def simulation(cls, block_size: int, gpu_blocks: int, host_blocks: int = 0,
                   disk_blocks: int = 0, redis_blocks: int = 0,
                   policy: Policy = "write-back", eviction: Eviction = "lru"
                   ) -> StoreConfig:
        """A capacity-only store: the same policies, no KV bytes (tiers in blocks)."""
        return cls(layout=None, block_size=block_size, gpu_blocks=gpu_blocks,
                   host_blocks=host_blocks, disk_blocks=disk_blocks,
                   redis_blocks=redis_blocks, policy=policy, eviction=eviction,
                   publish=False)

    @property
    def simulated(self) -> bool:
        return self.layout is None

    @property
    def shared_block_bytes(self) -> int:
        """Payload bytes of one block in the shared tiers (``kv_format``); needs a layout."""
        assert self.layout is not None, "simulation mode has no block bytes"
        return payload_bytes(self.layout, self.kv_format)

    def shared_capacity(self, tier: str) -> int:
        """Blocks of shared tier ``tier`` the index tracks (0: tier absent)."""
        if tier == "disk":
            if self.simulated:
                return self.disk_blocks
            if self.disk_path is None:
                return 0
            assert self.layout is not None
            return self.disk_blocks or max(1, self.disk_bytes // self.shared_block_bytes)
        if tier == "redis":
            if self.simulated:
                return self.redis_blocks
            return 0 if self.redis_url is None else (self.redis_blocks or 1 << 20)
        if tier == "remote":
            return 0 if self.remote_url is None else (self.remote_blocks or 1 << 20)
        raise ValueError(f"unknown shared tier {tier!r}")

    def shared_tier_names(self) -> list[str]:
        """Configured shared tiers, in cascade order (disk, redis, remote)."""
        return [t for t in SHARED_TIERS if self.shared_capacity(t)]

    def tier_names(self) -> list[str]:
        """Configured tiers, fastest first: the demotion cascade order."""
        return ["gpu"] + (["host"] if self.host_blocks else []) + self.shared_tier_names()

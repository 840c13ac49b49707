"""Block hashing: the one place that turns token ids into block keys.

Contract (docs/architecture.md, "Keys"):

- A sequence is cut into blocks of ``block_size`` tokens; only full blocks get a key.
- ``key(block_i) = xxh3_128(key(block_{i-1}) || token_ids_i as little-endian int32)``.
- The chain root is ``xxh3_128(namespace bytes)``; the namespace encodes everything that
  makes KV bytes differ (model fingerprint, dtype, block size, layout version, tenant
  salt), so two models or two tenants never share a key.
- Keys are 16 bytes and identical in every process and on every machine: no ``hash()``,
  no random seeds, no dependence on the platform's byte order.

Everything else in the project imports its hashing from here.
"""

from __future__ import annotations

import functools
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

KEY_BYTES = 16
"""Length of a block key in bytes."""

LAYOUT_VERSION = 1
"""Version of the KV block layout ``[layers, 2, block_size, kv_heads, head_dim]``."""

KV_FORMATS = ("exact", "int8", "fp8")
"""KV formats a namespace may name: ``exact`` (the model dtype, every tier) or a
compressed lower-tier format (:mod:`tiers.quant`; the GPU pool stays exact)."""

_xxh3_128 = xxhash.xxh3_128_digest
_BIG_ENDIAN = sys.byteorder == "big"


@functools.lru_cache(maxsize=256)
def _int32_struct(n: int) -> struct.Struct:
    """Compiled little-endian int32 packer for ``n`` values (prompts repeat lengths)."""
    return struct.Struct(f"<{n}i")


def token_bytes(token_ids: Iterable[int]) -> bytes:
    """Token ids as little-endian int32 bytes (4 bytes a token).

    Raises ``ValueError`` for an id outside int32 or a non-integer (bad input).
    """
    if not isinstance(token_ids, list | tuple):
        token_ids = list(token_ids)
    try:
        return _int32_struct(len(token_ids)).pack(*token_ids)
    except struct.error as exc:
        raise ValueError(f"token ids must be integers within int32: {exc}") from None


def tokens_from_bytes(data: bytes) -> list[int]:
    """Inverse of :func:`token_bytes`."""
    arr = array("i")
    arr.frombytes(data)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tolist()


def chain_key(parent: bytes, block_tokens: bytes) -> bytes:
    """Key of one block from its parent key and its tokens (LE int32 bytes)."""
    return _xxh3_128(parent + block_tokens)


@dataclass(frozen=True)
class Namespace:
    """Everything that makes the KV bytes of the same tokens differ.

    ``model`` is a model fingerprint (architecture and weights identity), ``dtype`` the
    KV dtype name, ``block_size`` in tokens, ``layout`` the KV layout version, and
    ``tenant`` an optional salt that isolates tenants. ``kv_format`` is the format of
    the blocks below the GPU (one of :data:`KV_FORMATS`): a compressed format changes
    every key, so exact and compressed blocks never mix; ``exact`` keeps the keys as
    they were.
    """

    model: str
    dtype: str = "bfloat16"
    block_size: int = 16
    layout: int = LAYOUT_VERSION
    tenant: str = ""
    kv_format: str = "exact"

    def __post_init__(self) -> None:
        if self.kv_format not in KV_FORMATS:
            raise ValueError(f"kv_format must be one of {', '.join(KV_FORMATS)}, "
                             f"got {self.kv_format!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be a positive number of tokens, got {self.block_size}")
        for name in ("model", "dtype", "tenant"):
            if "\x00" in getattr(self, name):
                raise ValueError(f"namespace field {name!r} must not contain NUL bytes")

    def encode(self) -> bytes:
        """Canonical bytes of the namespace (NUL-separated, versioned)."""
        parts: tuple[str, ...] = ("kvstore-ns-v1", self.model, self.dtype,
                                  str(self.block_size), str(self.layout), self.tenant)
        if self.kv_format != "exact":
            parts += (f"kv-format={self.kv_format}",)
        return "\x00".join(parts).encode()

    def root(self) -> bytes:
        """Root key of every chain in this namespace."""
        return _xxh3_128(self.encode())


def hash_blocks(root: bytes, token_ids: Sequence[int] | bytes, block_size: int) -> BlockChain:
    """Hash every full block of ``token_ids`` starting from chain root ``root``.

    ``token_ids`` may be ints or already-encoded LE int32 bytes. Tokens past the last full
    block are ignored. Cost: one xxh3 call per full block.
    """
    chain = BlockChain(root=root, block_size=block_size)
    chain.extend(token_ids)
    return chain


@dataclass
class BlockChain:
    """The keys of a growing token sequence, hashed incrementally.

    ``keys[i]`` is the key of block ``i`` and ``blocks[i]`` its tokens as LE int32 bytes
    (``4 * block_size`` bytes). Tokens that do not yet fill a block wait in ``tail``.
    ``extend`` costs only the new full blocks, never a rehash of the prefix.
    """

    root: bytes
    block_size: int
    keys: list[bytes] = field(default_factory=list)
    blocks: list[bytes] = field(default_factory=list)
    tail: bytes = b""

    @property
    def num_tokens(self) -> int:
        """Tokens seen so far, full blocks and tail (tokens)."""
        return len(self.keys) * self.block_size + len(self.tail) // 4

    @property
    def last_key(self) -> bytes:
        """Key of the last full block, or the root when there is none."""
        return self.keys[-1] if self.keys else self.root

    def extend(self, token_ids: Sequence[int] | bytes) -> int:
        """Append tokens; hash the blocks they complete. Returns the number of new blocks."""
        if isinstance(token_ids, bytes):
            data = token_ids
        elif isinstance(token_ids, bytearray | memoryview):
            data = bytes(token_ids)
        else:
            data = token_bytes(token_ids)
        if len(data) % 4:
            raise ValueError("token bytes must be a multiple of 4 (little-endian int32)")
        if self.tail:
            data = self.tail + data
        step = 4 * self.block_size
        full = len(data) - len(data) % step
        parent = self.last_key
        new_blocks = [data[s:s + step] for s in range(0, full, step)]
        keys = self.keys
        append = keys.append
        h = _xxh3_128
        for blk in new_blocks:
            parent = h(parent + blk)
            append(parent)
        self.blocks.extend(new_blocks)
        self.tail = bytes(data[full:])
        return len(new_blocks)

    def truncate(self, num_blocks: int) -> None:
        """Keep only the first ``num_blocks`` full blocks and drop the tail."""
        del self.keys[num_blocks:]
        del self.blocks[num_blocks:]
        self.tail = b""

    def fork(self) -> BlockChain:
        """An independent copy that shares nothing mutable with this one."""
        return BlockChain(self.root, self.block_size, list(self.keys), list(self.blocks), self.tail)

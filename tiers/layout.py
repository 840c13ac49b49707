"""The one KV block layout shared by every tier, the engine and the codec.

A block holds the K and V of ``block_size`` consecutive tokens for every layer, as one
contiguous array of shape ``[num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]``
("page-first"). Pools store ``num_slots`` such blocks: ``[num_slots, *block_shape]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of one KV block. Validated on construction."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(
                f"KVLayout.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """``(num_layers, 2, block_size, num_kv_heads, head_dim)``."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's payload."""
        n = 1
        for d in self.block_shape:
            n *= d
        return n * DTYPE_BYTES[self.dtype]

    def fingerprint(self) -> bytes:
        """8-byte identity of the layout, stored in every serialized block header."""
        text = f"kv-layout-v1|{self.block_shape}|{self.dtype}"
        return xxhash.xxh3_64_digest(text.encode())

"""The block codec: the serialized form of one KV block on disk, in Redis and over HTTP.

Wire format (all integers little-endian)::

    b"KVB1" | u32 header length (bytes) | msgpack header | raw payload

The header is a msgpack map with exactly these fields:

    ``v``    format version (int, :data:`FORMAT_VERSION`)
    ``lf``   layout fingerprint (8 bytes, :meth:`KVLayout.fingerprint`)
    ``dt``   dtype name (str, e.g. ``"bfloat16"``)
    ``sh``   block shape ``[layers, 2, block_size, kv_heads, head_dim]`` (list of int)
    ``tok``  the block's token ids, little-endian int32 (``4 * block_size`` bytes)
    ``par``  parent key (16 bytes)
    ``key``  the block's key (16 bytes), equal to ``chain_key(par, tok)``
    ``len``  payload length (bytes)
    ``sum``  xxh3-64 digest of the payload (8 bytes)

Contracts:

- :func:`encode_block` raises ``ValueError`` for programming errors (wrong key length,
  wrong payload size, key that is not the chain key of ``parent`` and ``tokens``).
- :func:`decode_block` never raises, whatever the input: a blob that fails any check
  is a :class:`Corrupt` naming the first check that failed. A :class:`Block` is
  returned only when the header is self-consistent (fingerprint, dtype and shape agree;
  the key is the chain key of the parent and tokens) and the payload matches its
  checksum, so a tampered header cannot bind KV to the wrong tokens.
- Decoding does not copy the payload: :attr:`Block.payload` is a read-only memoryview
  into the blob (which it keeps alive).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack
import xxhash

from radix.hashing import KEY_BYTES, chain_key
from tiers.layout import DTYPE_BYTES, KVLayout

MAGIC = b"KVB1"
"""First four bytes of every serialized block."""

FORMAT_VERSION = 1
"""Version of the header schema written by :func:`encode_block`."""

PREFIX_BYTES = 8
"""Magic (4 bytes) plus header length (4 bytes)."""

CHECKSUM_BYTES = 8
"""Length of the xxh3-64 digest of the payload."""

MAX_HEADER_BYTES = 1 << 20
"""Largest header :func:`decode_block` will parse (bytes); real headers are ~200 bytes."""

_HEADER_FIELDS = frozenset(("v", "lf", "dt", "sh", "tok", "par", "key", "len", "sum"))
_LEN = struct.Struct("<I")
_xxh3_64 = xxhash.xxh3_64_digest


@dataclass(frozen=True)
class Block:
    """A decoded, verified block.

    ``tokens`` are little-endian int32 token ids; ``payload`` is ``prod(shape)`` elements
    of ``dtype`` (bytes), a zero-copy view into the decoded blob.
    """

    key: bytes
    parent: bytes
    tokens: bytes
    layout_fingerprint: bytes
    dtype: str
    shape: tuple[int, ...]
    payload: memoryview | bytes


@dataclass(frozen=True)
class Corrupt:
    """A blob that did not decode; ``reason`` names the failed check (for logs/stats)."""

    reason: str


def encode_block(key: bytes, parent: bytes, tokens: bytes, layout: KVLayout,
                 payload: bytes | memoryview) -> bytes:
    """Serialize one block.

    ``key`` and ``parent`` are 16-byte block keys with ``key == chain_key(parent, tokens)``,
    ``tokens`` the block's ``layout.block_size`` token ids as little-endian int32 bytes, and
    ``payload`` exactly ``layout.block_bytes`` bytes in the layout's block shape.
    Raises ``ValueError`` when any of these does not hold. Copies the payload once.
    """
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes")
    if not isinstance(parent, bytes) or len(parent) != KEY_BYTES:
        raise ValueError(f"parent must be {KEY_BYTES} bytes")
    if not isinstance(tokens, bytes) or len(tokens) != 4 * layout.block_size:
        raise ValueError(
            f"tokens must be {4 * layout.block_size} bytes ({layout.block_size} int32 ids)")
    if chain_key(parent, tokens) != key:
        raise ValueError("key is not chain_key(parent, tokens)")
    view = memoryview(payload)
    if view.nbytes != layout.block_bytes:
        raise ValueError(
            f"payload is {view.nbytes} bytes, layout {layout} needs {layout.block_bytes}")
    if not view.c_contiguous:
        raise ValueError("payload must be C-contiguous")
    view = view.cast("B")
    header = msgpack.packb({
        "v": FORMAT_VERSION,
        "lf": layout.fingerprint(),
        "dt": layout.dtype,
        "sh": list(layout.block_shape),
        "tok": tokens,
        "par": parent,
        "key": key,
        "len": view.nbytes,
        "sum": _xxh3_64(view),
    }, use_bin_type=True)
    return b"".join((MAGIC, _LEN.pack(len(header)), header, view))


@dataclass(frozen=True)
class _LayoutFacts:
    """What a header's shape and dtype imply, computed once per distinct layout."""

    layout: KVLayout
    shape: tuple[int, ...]
    fingerprint: bytes
    payload_bytes: int
    token_bytes: int


def _layout_facts(shape_list: list[Any], dtype: str) -> _LayoutFacts | None:
    """Facts about the layout a header's shape and dtype describe, ``None`` if none.

    Element types are checked before the cached lookup: ``True`` and ``1.0`` hash and
    compare equal to ``1`` and must not hit a cached layout.
    """
    if len(shape_list) != 5:
        return None
    for d in shape_list:
        if type(d) is not int or not 0 < d < (1 << 31):
            return None
    return _cached_facts(tuple(shape_list), dtype)


@lru_cache(maxsize=256)
def _cached_facts(shape: tuple[int, ...], dtype: str) -> _LayoutFacts | None:
    if shape[1] != 2 or dtype not in DTYPE_BYTES:
        return None
    layers, _, block_size, kv_heads, head_dim = shape
    layout = KVLayout(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                      block_size=block_size, dtype=dtype)
    return _LayoutFacts(layout=layout, shape=shape, fingerprint=layout.fingerprint(),
                        payload_bytes=layout.block_bytes, token_bytes=4 * block_size)


def _check(blob: bytes, expected_key: bytes | None,
           layout: KVLayout | None) -> tuple[dict[str, Any], _LayoutFacts, memoryview] | Corrupt:
    """Every check of :func:`decode_block`; the parsed header and payload view, or why not."""
    try:
        view = memoryview(blob)
        if not view.c_contiguous:
            return Corrupt("not a contiguous bytes-like object")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError):
        return Corrupt("not a contiguous bytes-like object")
    total = view.nbytes
    if total < PREFIX_BYTES:
        return Corrupt("truncated prefix")
    if view[:4] != MAGIC:
        return Corrupt("bad magic")
    (header_len,) = _LEN.unpack_from(view, 4)
    header_end = PREFIX_BYTES + header_len
    if header_len > MAX_HEADER_BYTES or header_end > total:
        return Corrupt("bad header length")
    try:
        header = msgpack.unpackb(
            view[PREFIX_BYTES:header_end], raw=False, use_list=True, strict_map_key=True,
            max_bin_len=header_len, max_str_len=header_len, max_array_len=16,
            max_map_len=16, max_ext_len=0)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        return Corrupt(f"header does not parse: {type(exc).__name__}")
    if type(header) is not dict or header.keys() != _HEADER_FIELDS:
        return Corrupt("header fields")
    version = header["v"]
    if type(version) is not int or version != FORMAT_VERSION:
        return Corrupt("unsupported format version")
    key, parent, tokens = header["key"], header["par"], header["tok"]
    if (type(key) is not bytes or len(key) != KEY_BYTES
            or type(parent) is not bytes or len(parent) != KEY_BYTES):
        return Corrupt("key or parent is not 16 bytes")
    dtype, shape_list = header["dt"], header["sh"]
    if type(dtype) is not str or type(shape_list) is not list:
        return Corrupt("dtype or shape type")
    facts = _layout_facts(shape_list, dtype)
    if facts is None:
        return Corrupt("shape or dtype describe no layout")
    if header["lf"] != facts.fingerprint or type(header["lf"]) is not bytes:
        return Corrupt("layout fingerprint does not match shape and dtype")
    if type(tokens) is not bytes or len(tokens) != facts.token_bytes:
        return Corrupt("token bytes do not fill one block")
    length = header["len"]
    if type(length) is not int or length != total - header_end:
        return Corrupt("payload length")
    if length != facts.payload_bytes:
        return Corrupt("payload length does not match shape")
    if expected_key is not None and key != expected_key:
        return Corrupt("key differs from the expected key")
    if layout is not None and facts.layout != layout:
        return Corrupt("layout differs from the expected layout")
    if chain_key(parent, tokens) != key:
        return Corrupt("key is not chain_key(parent, tokens)")
    payload = view[header_end:]
    checksum = header["sum"]
    if type(checksum) is not bytes or _xxh3_64(payload) != checksum:
        return Corrupt("payload checksum")
    return header, facts, payload


def decode_block(blob: bytes, expected_key: bytes | None = None,
                 layout: KVLayout | None = None) -> Block | Corrupt:
    """Parse and verify a serialized block; never raises.

    Accepts any bytes-like ``blob``. With ``expected_key``, the block's key must equal
    it; with ``layout``, the block's fingerprint, dtype and shape must match it.
    Returns a :class:`Block` whose payload is a read-only view into ``blob``, or
    :class:`Corrupt`.
    """
    checked = _check(blob, expected_key, layout)
    if isinstance(checked, Corrupt):
        return checked
    header, facts, payload = checked
    return Block(key=header["key"], parent=header["par"], tokens=header["tok"],
                 layout_fingerprint=facts.fingerprint, dtype=facts.layout.dtype,
                 shape=facts.shape, payload=payload.toreadonly())


def verify_block(blob: bytes, key: bytes) -> bool:
    """True when ``blob`` decodes to a verified block whose key is ``key``; never raises.

    Runs every check of :func:`decode_block` without building the :class:`Block`.
    """
    return not isinstance(_check(blob, key, None), Corrupt)

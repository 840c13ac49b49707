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
    ``kf``   KV format (str, ``"int8"`` or ``"fp8"``), present only for a compressed
             block; an exact block has no ``kf`` field, so its blob is byte for byte
             what it was before formats existed

The payload of an exact block is the block's values in the layout's dtype
(``layout.block_bytes``); that of a compressed block is :func:`tiers.quant.encode_payload`'s
codes and scales (:func:`payload_bytes`, about half). The namespace names the format too
(:attr:`radix.hashing.Namespace.kv_format`), so exact and compressed blocks never share a
key; the header field lets a reader refuse a block of another format as :class:`Corrupt`.

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
from typing import Any, NamedTuple

import msgpack
import xxhash

from radix.hashing import KEY_BYTES, KV_FORMATS, chain_key
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
_FORMAT_FIELD = "kf"
_COMPRESSED_FIELDS = _HEADER_FIELDS | {_FORMAT_FIELD}
SCALE_BYTES = 2
"""Bytes of one per-head-vector scale of a compressed block (bf16; as ``tiers.quant``)."""
_LEN = struct.Struct("<I")
_PREFIX = struct.Struct("<4sI")
_xxh3_64 = xxhash.xxh3_64_digest


@dataclass(frozen=True)
class Block:
    """A decoded, verified block.

    ``tokens`` are little-endian int32 token ids; ``payload`` is ``prod(shape)`` elements
    of ``dtype`` (bytes) when ``kv_format`` is ``"exact"``, else the compressed block's
    codes and scales (:func:`payload_bytes`); a zero-copy view into the decoded blob.
    """

    key: bytes
    parent: bytes
    tokens: bytes
    layout_fingerprint: bytes
    dtype: str
    shape: tuple[int, ...]
    payload: memoryview | bytes
    kv_format: str = "exact"


@dataclass(frozen=True)
class Corrupt:
    """A blob that did not decode; ``reason`` names the failed check (for logs/stats)."""

    reason: str


def check_kv_format(kv_format: str) -> None:
    """Raise ``ValueError`` unless ``kv_format`` is one of :data:`KV_FORMATS`."""
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format must be one of {', '.join(KV_FORMATS)}, "
                         f"got {kv_format!r}")


def payload_bytes(layout: KVLayout, kv_format: str = "exact") -> int:
    """Bytes of one block's payload in ``kv_format``: ``layout.block_bytes`` for exact;
    one byte a value plus one bf16 scale per head vector for ``int8``/``fp8`` (equal to
    :func:`tiers.quant.compressed_block_bytes`, computed here without torch)."""
    check_kv_format(kv_format)
    if kv_format == "exact":
        return layout.block_bytes
    layers, two, bs, heads, dim = layout.block_shape
    return layers * two * bs * heads * (dim + SCALE_BYTES)


def encode_block(key: bytes, parent: bytes, tokens: bytes, layout: KVLayout,
                 payload: bytes | memoryview, kv_format: str = "exact") -> bytes:
    """Serialize one block.

    ``key`` and ``parent`` are 16-byte block keys with ``key == chain_key(parent, tokens)``,
    ``tokens`` the block's ``layout.block_size`` token ids as little-endian int32 bytes, and
    ``payload`` exactly :func:`payload_bytes` ``(layout, kv_format)`` bytes: the block in
    the layout's shape and dtype (exact), or :func:`tiers.quant.encode_payload`'s bytes.
    Raises ``ValueError`` when any of these does not hold. Copies the payload once.
    """
    check_kv_format(kv_format)
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
    facts = _facts_of(layout, kv_format)
    if view.nbytes != facts.payload_bytes:
        raise ValueError(f"payload is {view.nbytes} bytes, layout {layout} in format "
                         f"{kv_format} needs {facts.payload_bytes}")
    if not view.c_contiguous:
        raise ValueError("payload must be C-contiguous")
    view = view.cast("B")
    template = _template(facts)
    header = template.fill(tokens, parent, key, _xxh3_64(view))
    return b"".join((MAGIC, template.header_len_bytes, header, view))


@dataclass(frozen=True)
class _LayoutFacts:
    """What a header's shape, dtype and format imply, computed once per distinct pair
    of layout and format."""

    layout: KVLayout
    kv_format: str
    shape: tuple[int, ...]
    fingerprint: bytes
    payload_bytes: int
    token_bytes: int


def _layout_facts(shape_list: list[Any], dtype: str, kv_format: str) -> _LayoutFacts | None:
    """Facts about the layout a header's shape and dtype describe, ``None`` if none.

    Element types are checked before the cached lookup: ``True`` and ``1.0`` hash and
    compare equal to ``1`` and must not hit a cached layout.
    """
    if len(shape_list) != 5:
        return None
    for d in shape_list:
        if type(d) is not int or not 0 < d < (1 << 31):
            return None
    return _cached_facts(tuple(shape_list), dtype, kv_format)


@lru_cache(maxsize=256)
def _cached_facts(shape: tuple[int, ...], dtype: str, kv_format: str) -> _LayoutFacts | None:
    if shape[1] != 2 or dtype not in DTYPE_BYTES:
        return None
    layers, _, block_size, kv_heads, head_dim = shape
    return _facts_of(KVLayout(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                              block_size=block_size, dtype=dtype), kv_format)


@lru_cache(maxsize=256)
def _facts_of(layout: KVLayout, kv_format: str) -> _LayoutFacts:
    return _LayoutFacts(layout=layout, kv_format=kv_format, shape=layout.block_shape,
                        fingerprint=layout.fingerprint(),
                        payload_bytes=payload_bytes(layout, kv_format),
                        token_bytes=4 * layout.block_size)


@dataclass(frozen=True)
class _Template:
    """The canonical header of one (layout, format): fixed bytes around four fixed-size
    holes.

    :func:`encode_block` writes exactly ``head + tok + seg1 + par + seg2 + key + seg3 +
    sum``. Every byte outside the holes is the msgpack of a field whose value the layout
    fixes (version, fingerprint, dtype, shape, payload length, format) or of a key name or bin
    length, so a header that matches them byte for byte parses to the same map the full
    parser would accept: decode then only reads the holes.
    """

    facts: _LayoutFacts
    header_len: int
    header_len_bytes: bytes
    head: bytes
    seg1: bytes
    seg2: bytes
    seg3: bytes
    tok_at: int
    par_at: int
    key_at: int
    sum_at: int

    def fill(self, tokens: bytes, parent: bytes, key: bytes, checksum: bytes) -> bytes:
        return b"".join((self.head, tokens, self.seg1, parent, self.seg2, key, self.seg3,
                         checksum))


_TEMPLATES: dict[int, tuple[_Template, ...]] = {}
"""Templates by header length, for the fast path of :func:`_check` (bounded)."""
_MAX_TEMPLATES = 64


@lru_cache(maxsize=_MAX_TEMPLATES)
def _template(facts: _LayoutFacts) -> _Template:
    """Build (once per layout and format) and register the canonical header template.

    The format field comes first and only for a compressed format, so the exact
    template (and every exact blob) is what it was before formats existed."""
    packer = msgpack.Packer(use_bin_type=True)
    fields: list[tuple[str, Any]] = []
    if facts.kv_format != "exact":
        fields.append((_FORMAT_FIELD, facts.kv_format))
    fields += [
        ("v", FORMAT_VERSION), ("lf", facts.fingerprint), ("dt", facts.layout.dtype),
        ("sh", list(facts.shape)), ("tok", bytes(facts.token_bytes)),
        ("par", bytes(KEY_BYTES)), ("key", bytes(KEY_BYTES)), ("len", facts.payload_bytes),
        ("sum", bytes(CHECKSUM_BYTES))]
    pieces = [packer.pack_map_header(len(fields))]
    holes: dict[str, tuple[int, int]] = {}
    for name, value in fields:
        pieces.append(packer.pack(name))
        packed = packer.pack(value)
        pieces.append(packed)
        if name in ("tok", "par", "key", "sum"):
            end = sum(map(len, pieces))
            holes[name] = (end - len(value), end)
    header = b"".join(pieces)
    (tok_at, tok_end), (par_at, par_end) = holes["tok"], holes["par"]
    (key_at, key_end), (sum_at, sum_end) = holes["key"], holes["sum"]
    assert sum_end == len(header)
    template = _Template(
        facts=facts, header_len=len(header), header_len_bytes=_LEN.pack(len(header)),
        head=header[:tok_at], seg1=header[tok_end:par_at], seg2=header[par_end:key_at],
        seg3=header[key_end:sum_at], tok_at=tok_at, par_at=par_at, key_at=key_at,
        sum_at=sum_at)
    if sum(map(len, _TEMPLATES.values())) < _MAX_TEMPLATES:
        _TEMPLATES[len(header)] = (*_TEMPLATES.get(len(header), ()), template)
    return template


class _Checked(NamedTuple):
    """The fields of a blob that passed every check, and its payload view."""

    key: bytes
    parent: bytes
    tokens: bytes
    facts: _LayoutFacts
    payload: memoryview


def _match_template(header: memoryview) -> tuple[_LayoutFacts, bytes, bytes, bytes,
                                                  bytes] | None:
    """``(facts, tokens, parent, key, checksum)`` when ``header`` is the canonical header
    of a known layout, else ``None`` (the full parser then decides)."""
    templates = _TEMPLATES.get(header.nbytes)
    if not templates:
        return None
    raw = bytes(header)
    for t in templates:
        tok_at, par_at, key_at, sum_at = t.tok_at, t.par_at, t.key_at, t.sum_at
        tokens = raw[tok_at:tok_at + t.facts.token_bytes]
        parent = raw[par_at:par_at + KEY_BYTES]
        key = raw[key_at:key_at + KEY_BYTES]
        checksum = raw[sum_at:]
        if raw == t.fill(tokens, parent, key, checksum):
            return t.facts, tokens, parent, key, checksum
    return None


def _parse_header(header_view: memoryview, payload_len: int) -> tuple[
        _LayoutFacts, bytes, bytes, bytes, bytes] | Corrupt:
    """Full msgpack parse and field checks of a header in any field order."""
    try:
        header = msgpack.unpackb(
            header_view, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=header_view.nbytes, max_str_len=header_view.nbytes,
            max_array_len=16, max_map_len=16, max_ext_len=0)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        return Corrupt(f"header does not parse: {type(exc).__name__}")
    if type(header) is not dict or header.keys() not in (_HEADER_FIELDS, _COMPRESSED_FIELDS):
        return Corrupt("header fields")
    kv_format = header.get(_FORMAT_FIELD, "exact")
    if type(kv_format) is not str or kv_format not in KV_FORMATS or (
            _FORMAT_FIELD in header and kv_format == "exact"):
        return Corrupt("unknown KV format")
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
    facts = _layout_facts(shape_list, dtype, kv_format)
    if facts is None:
        return Corrupt("shape or dtype describe no layout")
    if header["lf"] != facts.fingerprint or type(header["lf"]) is not bytes:
        return Corrupt("layout fingerprint does not match shape and dtype")
    if type(tokens) is not bytes or len(tokens) != facts.token_bytes:
        return Corrupt("token bytes do not fill one block")
    length = header["len"]
    if type(length) is not int or length != payload_len:
        return Corrupt("payload length")
    checksum = header["sum"]
    if type(checksum) is not bytes or len(checksum) != CHECKSUM_BYTES:
        return Corrupt("payload checksum")
    return facts, tokens, parent, key, checksum


def _check(blob: bytes | memoryview, expected_key: bytes | None, layout: KVLayout | None,
           verify_checksum: bool = True, kv_format: str | None = None
           ) -> _Checked | Corrupt:
    """Every check of :func:`decode_block`: the verified fields, or why not.

    A header in the canonical form of a layout seen before (all of ours) is matched
    against its template; any other header goes through the full parser. Both paths
    accept exactly the same headers.
    """
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
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        return Corrupt("bad magic")
    header_end = PREFIX_BYTES + header_len
    if header_len > MAX_HEADER_BYTES or header_end > total:
        return Corrupt("bad header length")
    header_view = view[PREFIX_BYTES:header_end]
    matched = _match_template(header_view)
    if matched is None:
        parsed = _parse_header(header_view, total - header_end)
        if isinstance(parsed, Corrupt):
            return parsed
        _template(parsed[0])
        matched = parsed
    facts, tokens, parent, key, checksum = matched
    if total - header_end != facts.payload_bytes:
        return Corrupt("payload length does not match shape")
    if expected_key is not None and key != expected_key:
        return Corrupt("key differs from the expected key")
    if layout is not None and facts.layout != layout:
        return Corrupt("layout differs from the expected layout")
    if kv_format is not None and facts.kv_format != kv_format:
        return Corrupt("KV format differs from the expected format")
    if chain_key(parent, tokens) != key:
        return Corrupt("key is not chain_key(parent, tokens)")
    payload = view[header_end:]
    if verify_checksum and _xxh3_64(payload) != checksum:
        return Corrupt("payload checksum")
    return _Checked(key=key, parent=parent, tokens=tokens, facts=facts, payload=payload)


def decode_block(blob: bytes | memoryview, expected_key: bytes | None = None,
                 layout: KVLayout | None = None, verify_checksum: bool = True,
                 kv_format: str | None = None) -> Block | Corrupt:
    """Parse and verify a serialized block; never raises.

    Accepts any bytes-like ``blob``. With ``expected_key``, the block's key must equal
    it; with ``layout``, the block's fingerprint, dtype and shape must match it; with
    ``kv_format``, the block must be in that format (a block of another format is
    :class:`Corrupt`; ``None`` accepts any).
    Returns a :class:`Block` whose payload is a read-only view into ``blob``, or
    :class:`Corrupt`.

    ``verify_checksum=False`` skips only the payload checksum (every header check still
    runs): for a blob that a tier's ``get`` returned, which per the ``tiers.base``
    contract the tier verified already. The checksum holds the GIL (about 35 GB/s on
    one core), so hashing each payload once instead of twice is what lets several
    loader threads scale.
    """
    checked = _check(blob, expected_key, layout, verify_checksum, kv_format)
    if isinstance(checked, Corrupt):
        return checked
    facts = checked.facts
    return Block(key=checked.key, parent=checked.parent, tokens=checked.tokens,
                 layout_fingerprint=facts.fingerprint, dtype=facts.layout.dtype,
                 shape=facts.shape, payload=checked.payload.toreadonly(),
                 kv_format=facts.kv_format)


class ExpectedBlocks:
    """Recognizes :func:`encode_block`'s own encoding of a block the reader asked for, in
    one layout and format, with two byte comparisons instead of a header parse.

    For a reader that knows each block's key, parent and tokens (the load path): the
    canonical header of that block is known up to its checksum, so a blob whose bytes
    up to the checksum equal it, whose length is the header's plus the payload's and
    whose key is ``chain_key(parent, tokens)`` is one :func:`decode_block` accepts with
    that key, parent, tokens, layout and format. :meth:`payload` returns its payload (a
    view into the blob, no copy) or ``None``, which means only "not recognized here":
    the caller then asks :func:`decode_block`, which decides (a header in another field
    order, another format or layout, a corrupt blob). The payload checksum is not
    verified here (the tier that returned the blob verified it).
    """

    def __init__(self, layout: KVLayout, kv_format: str = "exact") -> None:
        check_kv_format(kv_format)
        facts = _facts_of(layout, kv_format)
        t = _template(facts)
        self._head = MAGIC + t.header_len_bytes + t.head
        self._seg1, self._seg2, self._seg3 = t.seg1, t.seg2, t.seg3
        self._checksum_at = PREFIX_BYTES + t.sum_at
        self._payload_at = PREFIX_BYTES + t.header_len
        self._total = self._payload_at + facts.payload_bytes

    @property
    def blob_bytes(self) -> int:
        """Length of every blob of this layout and format (header and payload)."""
        return self._total

    def payload(self, blob: bytes | memoryview, key: bytes, parent: bytes, tokens: bytes
                ) -> memoryview | None:
        """The payload of ``blob`` when it is the canonical encoding of the block
        ``(key, parent, tokens)`` (checksum aside), else ``None``; never raises."""
        try:
            view = memoryview(blob)
        except TypeError:
            return None
        if view.nbytes != self._total or view.ndim != 1 or view.format != "B":
            return None
        try:
            expected = b"".join((self._head, tokens, self._seg1, parent, self._seg2, key,
                                 self._seg3))
        except TypeError:
            return None
        if bytes(view[:self._checksum_at]) != expected or chain_key(parent, tokens) != key:
            return None
        return view[self._payload_at:].toreadonly()


def verify_block(blob: bytes | memoryview, key: bytes) -> bool:
    """True when ``blob`` decodes to a verified block whose key is ``key``; never raises.

    Runs every check of :func:`decode_block` without building the :class:`Block`.
    """
    return not isinstance(_check(blob, key, None), Corrupt)

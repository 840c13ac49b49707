"""Tests of the block codec: exact wire format, every check of decode, and fuzzing.

The fuzz contract: for any input bytes ``decode_block`` returns a ``Block`` or a
``Corrupt`` and never raises; a damaged blob (truncated, any single byte changed) is
``Corrupt``; a ``Block`` is only ever returned with the payload that was encoded.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radix.hashing import Namespace, chain_key, token_bytes
from tiers.codec import (
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    Block,
    Corrupt,
    ExpectedBlocks,
    decode_block,
    encode_block,
    payload_bytes,
    verify_block,
)
from tiers.layout import KVLayout

SMALL = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, block_size=16, dtype="float16")
"""128-byte payload: small enough to damage every byte of a blob exhaustively."""

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def make_block(layout: KVLayout = SMALL, seed: int = 0) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """``(key, parent, tokens, payload, blob)`` of a real block with seeded contents."""
    parent = Namespace(model=f"test-{seed}").root()
    tokens = token_bytes(range(seed, seed + layout.block_size))
    key = chain_key(parent, tokens)
    payload = xxhash.xxh3_128_digest(str(seed).encode()) * (layout.block_bytes // 16 + 1)
    payload = payload[:layout.block_bytes]
    return key, parent, tokens, payload, encode_block(key, parent, tokens, layout, payload)


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """The header map and payload of a blob (trusting its framing)."""
    (header_len,) = struct.unpack_from("<I", blob, 4)
    header = msgpack.unpackb(blob[8:8 + header_len], raw=False)
    return header, blob[8 + header_len:]


def rebuild(blob: bytes, edit: Callable[[dict[str, Any]], None], payload: bytes | None = None,
            ) -> bytes:
    """The blob with its header edited in place by ``edit`` (and optionally a new payload)."""
    header, old_payload = split(blob)
    edit(header)
    packed = msgpack.packb(header, use_bin_type=True)
    body = old_payload if payload is None else payload
    return MAGIC + struct.pack("<I", len(packed)) + packed + body


def assert_corrupt(result: Block | Corrupt, reason_part: str = "") -> None:
    assert isinstance(result, Corrupt), result
    assert reason_part in result.reason


# ---------------------------------------------------------------- round trip and format


@pytest.mark.parametrize("layout", [
    SMALL,
    KVLayout(num_layers=30, num_kv_heads=3, head_dim=64),  # SmolLM2-135M, 360 KiB
    KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32"),
], ids=["small", "smollm2", "fp32"])
def test_round_trip_returns_every_field(layout: KVLayout) -> None:
    key, parent, tokens, payload, blob = make_block(layout, seed=7)
    block = decode_block(blob, expected_key=key, layout=layout)
    assert isinstance(block, Block)
    assert block.key == key
    assert block.parent == parent
    assert block.tokens == tokens
    assert block.layout_fingerprint == layout.fingerprint()
    assert block.dtype == layout.dtype
    assert block.shape == layout.block_shape
    assert bytes(block.payload) == payload
    assert verify_block(blob, key)


def test_wire_format_is_magic_length_msgpack_header_payload() -> None:
    key, parent, tokens, payload, blob = make_block()
    assert blob[:4] == b"KVB1"
    header, body = split(blob)
    assert body == payload
    (header_len,) = struct.unpack_from("<I", blob, 4)
    assert len(blob) == 8 + header_len + len(payload)
    assert header == {
        "v": FORMAT_VERSION,
        "lf": SMALL.fingerprint(),
        "dt": "float16",
        "sh": [1, 2, 16, 1, 2],
        "tok": tokens,
        "par": parent,
        "key": key,
        "len": len(payload),
        "sum": xxhash.xxh3_64_digest(payload),
    }
    assert blob[8:8 + header_len] == msgpack.packb(header, use_bin_type=True)


def test_header_fields_in_any_order_decode() -> None:
    """Our encoder writes one canonical order; a reader accepts any order of the map."""
    key, _, _, payload, blob = make_block(seed=11)

    def reverse(h: dict[str, Any]) -> None:
        items = list(h.items())[::-1]
        h.clear()
        h.update(items)

    reordered = rebuild(blob, reverse)
    assert reordered != blob
    block = decode_block(reordered, expected_key=key)
    assert isinstance(block, Block)
    assert bytes(block.payload) == payload
    damaged = rebuild(blob, lambda h: (reverse(h), h.update(key=bytes(16))))
    assert_corrupt(decode_block(damaged), "chain_key")


def test_first_decode_of_an_unseen_layout_and_later_ones_agree() -> None:
    """A layout met first by the decoder (not the encoder) decodes the same every time."""
    layout = KVLayout(num_layers=3, num_kv_heads=1, head_dim=4, block_size=2, dtype="float32")
    key, _, _, payload, blob = make_block(layout, seed=12)
    for _ in range(2):
        block = decode_block(blob, expected_key=key, layout=layout)
        assert isinstance(block, Block)
        assert bytes(block.payload) == payload
        assert_corrupt(decode_block(blob[:-1] + b"\x00"), "checksum")


def test_decode_does_not_copy_the_payload() -> None:
    _, _, _, payload, blob = make_block()
    block = decode_block(blob)
    assert isinstance(block, Block)
    assert isinstance(block.payload, memoryview)
    assert block.payload.readonly
    assert block.payload.obj is blob


def test_decode_accepts_bytearray_and_memoryview() -> None:
    key, _, _, payload, blob = make_block()
    for form in (bytearray(blob), memoryview(blob)):
        block = decode_block(form, expected_key=key)
        assert isinstance(block, Block)
        assert bytes(block.payload) == payload


def test_encode_accepts_memoryview_and_multidimensional_buffers() -> None:
    key, parent, tokens, payload, blob = make_block()
    assert encode_block(key, parent, tokens, SMALL, memoryview(payload)) == blob
    shaped = memoryview(bytearray(payload)).cast("B", (16, 8))
    assert encode_block(key, parent, tokens, SMALL, shaped) == blob


def test_encode_is_deterministic_and_depends_on_every_input() -> None:
    blobs = {make_block(seed=s)[4] for s in range(5)}
    assert len(blobs) == 5
    assert make_block(seed=3)[4] == make_block(seed=3)[4]


# ---------------------------------------------------------------- encode errors


def test_encode_rejects_programming_errors() -> None:
    key, parent, tokens, payload, _ = make_block()
    with pytest.raises(ValueError, match="payload is 127 bytes"):
        encode_block(key, parent, tokens, SMALL, payload[:-1])
    with pytest.raises(ValueError, match="payload is 129 bytes"):
        encode_block(key, parent, tokens, SMALL, payload + b"x")
    with pytest.raises(ValueError, match="key must be 16 bytes"):
        encode_block(key[:15], parent, tokens, SMALL, payload)
    with pytest.raises(ValueError, match="parent must be 16 bytes"):
        encode_block(key, parent + b"x", tokens, SMALL, payload)
    with pytest.raises(ValueError, match="tokens must be 64 bytes"):
        encode_block(key, parent, tokens[:-4], SMALL, payload)
    with pytest.raises(ValueError, match="chain_key"):
        encode_block(bytes(16), parent, tokens, SMALL, payload)
    strided = memoryview(bytearray(2 * len(payload)))[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        encode_block(key, parent, tokens, SMALL, strided)


# ---------------------------------------------------------------- each decode check


def test_decode_rejects_framing_errors() -> None:
    _, _, _, _, blob = make_block()
    assert_corrupt(decode_block(b""), "truncated prefix")
    assert_corrupt(decode_block(blob[:7]), "truncated prefix")
    assert_corrupt(decode_block(b"KVB2" + blob[4:]), "bad magic")
    huge = blob[:4] + struct.pack("<I", MAX_HEADER_BYTES + 1) + blob[8:]
    assert_corrupt(decode_block(huge), "bad header length")
    past_end = blob[:4] + struct.pack("<I", len(blob)) + blob[8:]
    assert_corrupt(decode_block(past_end), "bad header length")
    garbage = MAGIC + struct.pack("<I", 3) + b"\xc1\xc1\xc1"
    assert_corrupt(decode_block(garbage), "header does not parse")
    not_a_map = MAGIC + struct.pack("<I", 1) + msgpack.packb(7)
    assert_corrupt(decode_block(not_a_map), "header fields")


def test_decode_rejects_non_buffers() -> None:
    for value in (None, 12, "KVB1", [1, 2], object()):
        assert_corrupt(decode_block(value), "not a contiguous bytes-like")  # type: ignore[arg-type]
    strided = memoryview(bytearray(64))[::2]
    assert_corrupt(decode_block(strided), "not a contiguous bytes-like")


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda h: h.pop("sum"), "header fields"),
    (lambda h: h.update(extra=1), "header fields"),
    (lambda h: h.update(v=2), "format version"),
    (lambda h: h.update(v=True), "format version"),
    (lambda h: h.update(v="1"), "format version"),
    (lambda h: h.update(key=h["key"][:15]), "key or parent"),
    (lambda h: h.update(par=h["par"].hex()), "key or parent"),
    (lambda h: h.update(dt=b"float16"), "dtype or shape type"),
    (lambda h: h.update(sh=tuple(h["sh"])[0]), "dtype or shape type"),
    (lambda h: h.update(sh=[1, 2, 16, 1]), "describe no layout"),
    (lambda h: h.update(sh=[True, 2, 16, 1, 2]), "describe no layout"),
    (lambda h: h.update(sh=[1.0, 2, 16, 1, 2]), "describe no layout"),
    (lambda h: h.update(sh=[1, 3, 16, 1, 2]), "describe no layout"),
    (lambda h: h.update(sh=[1, 2, 16, 1, 0]), "describe no layout"),
    (lambda h: h.update(sh=[1, 2, 16, 1, 1 << 40]), "describe no layout"),
    (lambda h: h.update(dt="int8"), "describe no layout"),
    (lambda h: h.update(dt="bfloat16"), "fingerprint"),
    (lambda h: h.update(lf=bytes(8)), "fingerprint"),
    (lambda h: h.update(lf=h["lf"].hex()), "fingerprint"),
    (lambda h: h.update(tok=h["tok"][:-4]), "token bytes"),
    (lambda h: h.update(len=h["len"] + 1), "payload length"),
    (lambda h: h.update(len=str(h["len"])), "payload length"),
    (lambda h: h.update(tok=token_bytes(range(100, 116))), "chain_key"),
    (lambda h: h.update(par=bytes(16)), "chain_key"),
    (lambda h: h.update(key=bytes(16)), "chain_key"),
    (lambda h: h.update(sum=bytes(8)), "checksum"),
    (lambda h: h.update(sum=int.from_bytes(h["sum"], "big")), "checksum"),
])
def test_decode_rejects_each_bad_header_field(edit: Callable[[dict[str, Any]], None],
                                              reason: str) -> None:
    _, _, _, _, blob = make_block()
    assert_corrupt(decode_block(rebuild(blob, edit)), reason)


def test_same_shape_other_length_payload_is_corrupt() -> None:
    _, _, _, payload, blob = make_block()
    assert_corrupt(decode_block(blob + b"\x00"), "payload length")
    assert_corrupt(decode_block(blob[:-1]), "payload length")
    shorter = rebuild(blob, lambda h: h.update(len=len(payload) - 2), payload[:-2])
    assert_corrupt(decode_block(shorter), "does not match shape")


def test_payload_change_is_caught_by_checksum() -> None:
    _, _, _, payload, blob = make_block()
    changed = bytes([payload[0] ^ 1]) + payload[1:]
    assert_corrupt(decode_block(rebuild(blob, lambda h: None, changed)), "checksum")


def test_expected_key_catches_a_consistently_rebound_header() -> None:
    """A header rewritten to other tokens with a matching key is not served for the old key."""
    key, parent, _, _, blob = make_block()
    other_tokens = token_bytes(range(500, 516))

    def rebind(h: dict[str, Any]) -> None:
        h.update(tok=other_tokens, key=chain_key(parent, other_tokens))

    rebound = rebuild(blob, rebind)
    assert_corrupt(decode_block(rebound, expected_key=key), "expected key")
    assert not verify_block(rebound, key)


def test_expected_layout_must_match() -> None:
    key, _, _, _, blob = make_block()
    assert isinstance(decode_block(blob, layout=SMALL), Block)
    for other in (KVLayout(1, 1, 2, block_size=16, dtype="bfloat16"),
                  KVLayout(1, 1, 2, block_size=8, dtype="float16"),
                  KVLayout(2, 1, 2, block_size=16, dtype="float16")):
        assert_corrupt(decode_block(blob, expected_key=key, layout=other), "expected layout")


def test_verify_block_checks_key_and_content() -> None:
    key, _, _, _, blob = make_block()
    other_key, _, _, _, other_blob = make_block(seed=1)
    assert verify_block(blob, key)
    assert not verify_block(blob, other_key)
    assert not verify_block(other_blob, key)
    assert not verify_block(blob[:-1], key)
    assert not verify_block(b"", key)


# ---------------------------------------------------------------- exhaustive damage


def test_every_single_byte_change_anywhere_is_corrupt() -> None:
    """All 255 other values at every offset of a real blob: each one is Corrupt."""
    key, _, _, _, blob = make_block()
    damaged = bytearray(blob)
    for offset in range(len(blob)):
        original = blob[offset]
        for value in range(256):
            if value == original:
                continue
            damaged[offset] = value
            result = decode_block(bytes(damaged))
            assert isinstance(result, Corrupt), (offset, value)
        damaged[offset] = original
    assert isinstance(decode_block(bytes(damaged), expected_key=key), Block)


def test_every_truncation_is_corrupt() -> None:
    _, _, _, _, blob = make_block()
    for length in range(len(blob)):
        assert isinstance(decode_block(blob[:length]), Corrupt), length


@pytest.mark.parametrize("kv_format", ["exact", "int8", "fp8"])
def test_expected_blocks_accepts_only_what_decode_block_accepts(kv_format: str) -> None:
    """The load path's fast check (:class:`ExpectedBlocks`) against the full decode, over
    every single-byte change of a blob and every truncation and extension: whenever it
    returns a payload, ``decode_block`` (checksum aside, as for a blob its tier verified)
    accepts the blob as the block asked for, with the same payload bytes. It recognizes
    the intact blob, and returns ``None`` for another block's blob or another format's."""
    key, parent, tokens, _, _ = make_block()
    payload = os.urandom(payload_bytes(SMALL, kv_format))
    blob = encode_block(key, parent, tokens, SMALL, payload, kv_format=kv_format)
    expected = ExpectedBlocks(SMALL, kv_format)
    assert expected.blob_bytes == len(blob)

    def agrees(data: bytes) -> bool:
        got = expected.payload(data, key, parent, tokens)
        if got is None:
            return False
        blk = decode_block(data, expected_key=key, layout=SMALL, verify_checksum=False,
                           kv_format=kv_format)
        assert isinstance(blk, Block), blk
        assert (blk.tokens, blk.parent, bytes(blk.payload)) == (tokens, parent, bytes(got))
        return True

    assert agrees(blob) and bytes(expected.payload(blob, key, parent, tokens) or b"") == payload
    damaged = bytearray(blob)
    header_end = len(blob) - len(payload)
    for offset in range(len(blob)):
        original = blob[offset]
        for value in (original ^ 1, original ^ 0x80, (original + 77) % 256):
            damaged[offset] = value
            accepted = agrees(bytes(damaged))
            # only the checksum (verified by the tier) and the payload are not compared
            assert accepted == (offset >= header_end - 8), offset
        damaged[offset] = original
    for length in range(len(blob)):
        assert not agrees(blob[:length])
    assert not agrees(blob + b"\0")
    other_key, other_parent, other_tokens, _, other = make_block(seed=1)
    assert expected.payload(blob, other_key, other_parent, other_tokens) is None
    assert expected.payload(blob, key, other_parent, tokens) is None
    assert expected.payload(blob, key, parent, other_tokens) is None
    for fmt in {"exact", "int8", "fp8"} - {kv_format}:
        assert ExpectedBlocks(SMALL, fmt).payload(blob, key, parent, tokens) is None
    assert expected.payload(blob, key, parent, "not bytes") is None  # type: ignore[arg-type]


# ---------------------------------------------------------------- hypothesis fuzz


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_never_raise(data: bytes) -> None:
    assert isinstance(decode_block(data), Corrupt)
    assert isinstance(decode_block(MAGIC + data), Corrupt)
    assert not verify_block(data, bytes(16))


@FUZZ
@given(st.binary(max_size=512), st.binary(max_size=256))
def test_fuzz_framed_random_headers_never_raise(header: bytes, payload: bytes) -> None:
    blob = MAGIC + struct.pack("<I", len(header)) + header + payload
    assert isinstance(decode_block(blob), Corrupt)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=16) | st.binary(max_size=80),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=4), children, max_size=6),
    max_leaves=20,
)
_FIELDS = ("v", "lf", "dt", "sh", "tok", "par", "key", "len", "sum")


@FUZZ
@given(st.dictionaries(st.sampled_from(_FIELDS), msgpack_values), st.data())
def test_fuzz_well_formed_headers_with_wrong_values_never_raise(
        replacements: dict[str, Any], data: st.DataObject) -> None:
    """Swap arbitrary msgpack values into a real header: never raises, never a new payload."""
    _, _, _, payload, blob = make_block()
    new_payload = data.draw(st.sampled_from([payload, payload[::-1], payload[:64]]))
    edited = rebuild(blob, lambda h: h.update(replacements), new_payload)
    result = decode_block(edited)
    if isinstance(result, Block):
        assert bytes(result.payload) == new_payload
        layers, _, block_size, heads, head_dim = result.shape
        layout = KVLayout(layers, heads, head_dim, block_size=block_size, dtype=result.dtype)
        assert result.payload.nbytes == layout.block_bytes
        assert result.layout_fingerprint == layout.fingerprint()
        assert xxhash.xxh3_64_digest(result.payload) == split(edited)[0]["sum"]
        assert chain_key(result.parent, result.tokens) == result.key


@FUZZ
@given(st.data())
def test_fuzz_any_damage_is_corrupt_or_the_original_block(data: st.DataObject) -> None:
    key, _, tokens, payload, blob = make_block(seed=data.draw(st.integers(0, 3)))
    damaged = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        damaged[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(damaged)))
    result = decode_block(bytes(damaged[:cut]))
    if isinstance(result, Block):
        assert bytes(damaged[:cut]) == blob
        assert (result.key, result.tokens, bytes(result.payload)) == (key, tokens, payload)


@FUZZ
@given(
    layers=st.integers(1, 3), heads=st.integers(1, 3), head_dim=st.integers(1, 8),
    block_size=st.integers(1, 32), dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    token_ids=st.data(), parent=st.binary(min_size=16, max_size=16),
)
def test_fuzz_round_trip_any_layout(layers: int, heads: int, head_dim: int, block_size: int,
                                    dtype: str, token_ids: st.DataObject,
                                    parent: bytes) -> None:
    layout = KVLayout(layers, heads, head_dim, block_size=block_size, dtype=dtype)
    ids = token_ids.draw(st.lists(st.integers(-(2**31), 2**31 - 1),
                                  min_size=block_size, max_size=block_size))
    tokens = token_bytes(ids)
    key = chain_key(parent, tokens)
    payload = os.urandom(layout.block_bytes)
    blob = encode_block(key, parent, tokens, layout, payload)
    block = decode_block(blob, expected_key=key, layout=layout)
    assert isinstance(block, Block)
    assert (block.key, block.parent, block.tokens, block.shape, block.dtype) == (
        key, parent, tokens, layout.block_shape, dtype)
    assert bytes(block.payload) == payload


# ------------------------------------------------------------------- KV formats


@pytest.mark.parametrize("layout,size,digest", [
    (SMALL, 307, "ced52a620bd6c811"),
    (KVLayout(num_layers=30, num_kv_heads=3, head_dim=64), 368823, "8bbb5bd8ce78721d"),
], ids=["small", "smollm2"])
def test_exact_blobs_are_byte_identical_to_before_formats(layout: KVLayout, size: int,
                                                          digest: str) -> None:
    """Exact blobs carry no format field: the bytes (digests taken from the codec before
    KV formats existed) are unchanged, so every stored exact block stays readable."""
    key, _, _, _, blob = make_block(layout, seed=3)
    assert len(blob) == size
    assert xxhash.xxh3_64_hexdigest(blob) == digest
    assert "kf" not in split(blob)[0]
    block = decode_block(blob, expected_key=key, layout=layout, kv_format="exact")
    assert isinstance(block, Block) and block.kv_format == "exact"


def compressed_block(layout: KVLayout, kv_format: str, seed: int = 0
                     ) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """``(key, parent, tokens, payload, blob)`` of a compressed block (real quantized KV)."""
    import torch

    from tiers import quant
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randn((1, *layout.block_shape), generator=gen).to(
        getattr(torch, layout.dtype))
    payload = quant.encode_payload(quant.quantize(blocks, kv_format))
    parent = Namespace(model=f"test-{seed}", kv_format=kv_format).root()
    tokens = token_bytes(range(seed, seed + layout.block_size))
    key = chain_key(parent, tokens)
    return key, parent, tokens, payload, encode_block(key, parent, tokens, layout, payload,
                                                      kv_format=kv_format)


@pytest.mark.parametrize("kv_format", ["int8", "fp8"])
def test_compressed_round_trip_and_header(kv_format: str) -> None:
    from tiers import quant
    layout = KVLayout(num_layers=2, num_kv_heads=3, head_dim=64, dtype="bfloat16")
    key, parent, tokens, payload, blob = compressed_block(layout, kv_format, seed=5)
    assert payload_bytes(layout, kv_format) == quant.compressed_block_bytes(layout, kv_format)
    assert len(payload) == payload_bytes(layout, kv_format) <= 0.52 * layout.block_bytes
    header, body = split(blob)
    assert header["kf"] == kv_format and header["len"] == len(payload) and body == payload
    for fmt in (kv_format, None):
        block = decode_block(blob, expected_key=key, layout=layout, kv_format=fmt)
        assert isinstance(block, Block)
        assert block.kv_format == kv_format and bytes(block.payload) == payload
        assert (block.parent, block.tokens, block.shape) == (parent, tokens,
                                                             layout.block_shape)
    assert verify_block(blob, key)
    # a reader of another format gets a miss, never KV it would misread
    assert_corrupt(decode_block(blob, kv_format="exact"), "format")
    other = "fp8" if kv_format == "int8" else "int8"
    assert_corrupt(decode_block(blob, kv_format=other), "format")
    # first decode through the full parser (fields in another order) agrees
    reordered = rebuild(blob, lambda h: h.update(dict(reversed(list(h.items())))))
    block = decode_block(reordered, expected_key=key, kv_format=kv_format)
    assert isinstance(block, Block) and bytes(block.payload) == payload


def test_format_field_errors_are_corrupt() -> None:
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16")
    key, _, _, payload, blob = compressed_block(layout, "int8", seed=2)
    assert_corrupt(decode_block(rebuild(blob, lambda h: h.update(kf="int4"))), "format")
    assert_corrupt(decode_block(rebuild(blob, lambda h: h.update(kf="exact"))), "format")
    assert_corrupt(decode_block(rebuild(blob, lambda h: h.update(kf=8))), "format")
    # a compressed payload under an exact header (or the reverse) is a length mismatch
    assert_corrupt(decode_block(rebuild(blob, lambda h: h.pop("kf"))), "length")
    _, _, _, _, exact = make_block(layout, seed=2)
    assert_corrupt(decode_block(rebuild(exact, lambda h: h.update(kf="fp8"))), "length")
    # every single-byte change of a compressed blob is caught
    for i in range(0, len(blob), 7):
        damaged = bytearray(blob)
        damaged[i] ^= 0x01
        assert isinstance(decode_block(bytes(damaged), expected_key=key), Corrupt), i


def test_encode_checks_the_format_and_its_payload_size() -> None:
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16")
    key, parent, tokens, payload, _ = make_block(layout, seed=1)
    with pytest.raises(ValueError, match="kv_format must be one of"):
        encode_block(key, parent, tokens, layout, payload, kv_format="int4")
    with pytest.raises(ValueError, match="int8 needs"):
        encode_block(key, parent, tokens, layout, payload, kv_format="int8")
    short = payload[:payload_bytes(layout, "int8")]
    assert isinstance(decode_block(encode_block(key, parent, tokens, layout, short,
                                                kv_format="int8"), kv_format="int8"), Block)

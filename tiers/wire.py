"""The cache daemon's wire protocol: one leaf module read by both ends.

The daemon (``kvstore.daemon``) serves it and :class:`tiers.http.HTTPTier` speaks it;
neither imports the other. ``docs/daemon.md`` is the operator's description.

``POST {base}/v1/{namespace}/{op}`` with a msgpack map body and a msgpack map reply
(``Content-Type: application/msgpack``). Keys are 16-byte msgpack ``bin``; values are
encoded blocks (``tiers.codec``) in ``bin``:

    exists  {"keys": [key, ...]}            -> {"count": n}    consecutive keys held, from the first
    get     {"keys": [key, ...]}            -> {"values": [block | nil, ...], "corrupt": n}
    put     {"items": [[key, block], ...]}  -> {"stored": n}   blocks the daemon now holds
    delete  {"keys": [key, ...]}            -> {"deleted": n}  distinct keys named (now absent)

A put that stored nothing is answered with an error status, never ``200``; a reply's
``stored`` may be less than the items sent (a tier refused some). Error replies are the
JSON body ``{"error": message, "status": code}``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgpack

from radix.hashing import KEY_BYTES

NAMESPACE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
"""Valid daemon namespaces: 1 to 64 characters, ASCII letters, digits, ``_ . -``, not
starting with a punctuation mark (safe as a directory name and a Redis key prefix)."""

NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)

TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")
"""A bearer token: 1 to 4096 visible ASCII characters (no spaces or control characters)."""

CONTENT_TYPE = "application/msgpack"
DATA_OPS = ("exists", "get", "put", "delete")
"""The four batch operations, in the order of the table above."""


class ProtocolError(ValueError):
    """A request body that does not follow the protocol: HTTP ``status`` (400, or 413
    for a batch over the limit) and a message naming the offending field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def valid_namespace(namespace: object) -> bool:
    """True when ``namespace`` is a str matching :data:`NAMESPACE_PATTERN`."""
    return isinstance(namespace, str) and NAMESPACE_RE.fullmatch(namespace) is not None


def op_path(base: str, namespace: str, op: str) -> str:
    """The request path of ``op`` on ``namespace`` under URL path ``base``."""
    from urllib.parse import quote

    return f"{base.rstrip('/')}/v1/{quote(namespace)}/{op}"


# -- encoding ------------------------------------------------------------------------------
# The two large messages (a put body, a get reply) are framed by hand: one join of the
# blocks instead of msgpack's growing buffer (about 2.5 copies of every block). The bytes
# are exactly what ``msgpack.packb(..., use_bin_type=True)`` writes.


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encode_keys(keys: Sequence[bytes]) -> bytes:
    """The body of an exists, get or delete request: ``{"keys": [key, ...]}``."""
    return msgpack.packb({"keys": list(keys)}, use_bin_type=True)


def encode_put_body(items: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The msgpack body of a put request: ``{"items": [[key, block], ...]}``."""
    parts = [b"\x81\xa5items", _array_header(len(items))]
    for key, value in items:
        parts += (b"\x92", _bin_header(len(key)), key, _bin_header(len(value)), value)
    return b"".join(parts)


def encode_get_reply(values: Sequence[bytes | None], corrupt: int) -> bytes:
    """The msgpack reply of a get: ``{"values": [block | nil, ...], "corrupt": n}``."""
    parts = [b"\x82\xa6values", _array_header(len(values))]
    for value in values:
        if value is None:
            parts.append(b"\xc0")
        else:
            parts += (_bin_header(len(value)), value)
    parts += (b"\xa7corrupt", msgpack.packb(corrupt))
    return b"".join(parts)


def encode_count_reply(field: str, n: int) -> bytes:
    """The reply of exists (``count``), put (``stored``) or delete (``deleted``)."""
    return msgpack.packb({field: n})


# -- decoding (the daemon's side) ----------------------------------------------------------


def _kind(obj: object) -> str:
    """The msgpack name of a decoded value's type, for error messages."""
    names = {dict: "map", list: "array", bytes: "bin", str: "str", int: "int",
             float: "float", bool: "bool", type(None): "nil"}
    return names.get(type(obj), type(obj).__name__)


def _decode(body: bytes) -> dict[Any, Any]:
    if not body:
        raise ProtocolError(400, "empty body: expected a msgpack map")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise ProtocolError(400, f"body is not valid msgpack ({type(exc).__name__}: "
                            f"{str(exc)[:100]})") from None
    if type(obj) is not dict:
        raise ProtocolError(400, f"body must be a msgpack map, got {_kind(obj)}")
    return obj


def _field(obj: dict[Any, Any], name: str, max_batch: int) -> list[Any]:
    """The one field ``name`` of the body map, an array within the batch limit."""
    if set(obj) != {name}:
        extra = sorted(map(str, set(obj) - {name}))
        raise ProtocolError(400, f"body must be a map with exactly the field {name!r}"
                            + (f"; unexpected: {', '.join(extra)}" if extra else ""))
    value = obj[name]
    if type(value) is not list:
        raise ProtocolError(400, f"{name!r} must be an array, got {_kind(value)}")
    if len(value) > max_batch:
        raise ProtocolError(413, f"batch of {len(value)} exceeds the limit of {max_batch} "
                            "(--max-batch): split it")
    return value


def _check_key(key: object, where: str) -> bytes:
    if type(key) is not bytes:
        raise ProtocolError(400, f"{where} must be bin ({KEY_BYTES} bytes), got {_kind(key)}")
    if len(key) != KEY_BYTES:
        raise ProtocolError(400, f"{where} must be {KEY_BYTES} bytes, got {len(key)}")
    return key


def decode_keys(body: bytes, max_batch: int) -> list[bytes]:
    """The keys of an exists/get/delete body; :class:`ProtocolError` when malformed."""
    raw = _field(_decode(body), "keys", max_batch)
    return [_check_key(k, f"keys[{i}]") for i, k in enumerate(raw)]


def decode_items(body: bytes, max_batch: int) -> list[tuple[bytes, bytes]]:
    """The ``(key, block)`` pairs of a put body, blocks not yet verified;
    :class:`ProtocolError` when malformed (the first bad index is named)."""
    raw = _field(_decode(body), "items", max_batch)
    items: list[tuple[bytes, bytes]] = []
    for i, item in enumerate(raw):
        if type(item) is not list or len(item) != 2:
            raise ProtocolError(400, f"items[{i}] must be a [key, value] array, got "
                                f"{_kind(item)}"
                                + (f" of {len(item)}" if type(item) is list else ""))
        key = _check_key(item[0], f"items[{i}] key")
        value = item[1]
        if type(value) is not bytes:
            raise ProtocolError(400, f"items[{i}] value must be bin (an encoded block), got "
                                f"{_kind(value)}")
        items.append((key, value))
    return items


__all__ = ["CONTENT_TYPE", "DATA_OPS", "NAMESPACE_PATTERN", "NAMESPACE_RE", "TOKEN_RE",
           "ProtocolError", "decode_items", "decode_keys", "encode_count_reply",
           "encode_get_reply", "encode_keys", "encode_put_body", "op_path",
           "valid_namespace"]

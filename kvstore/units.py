"""Human-friendly sizes for command-line flags and logs (bytes)."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_UNITS = {"": 1, "b": 1,
          "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40,
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size(text: str) -> int:
    """Bytes in a human-friendly size: ``4096``, ``512MiB``, ``8GiB``, ``1.5G``, ``10GB``.

    Binary units (``KiB MiB GiB TiB`` and the bare ``K M G T``) are powers of 1024,
    decimal units (``kB MB GB TB``) powers of 1000; case-insensitive. Fractions round
    down to whole bytes. Raises ``ValueError`` naming the problem.
    """
    match = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 512MiB, 8GiB, 10GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """``n`` bytes in binary units, for logs (``1.0 GiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"

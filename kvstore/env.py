"""Every environment variable the project reads, in one place.

- ``KVSTORE_HOME``: root of on-disk state (model conversions, the chat demo's disk
  tier and sessions); default ``~/.cache/kvstore``.
- ``KVSTORE_DAEMON_TOKEN``: bearer token of the cache daemon (server and clients).
- ``KVSTORE_API_KEY``: bearer key of the OpenAI-compatible server.
- ``KVSTORE_FUSED_KERNELS``: ``0`` keeps the engine's fused Triton kernels
  (``engine/fused.py``) off on CUDA (the torch formulas run instead); default on.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Root directory of the project's on-disk state."""
    return Path(os.environ.get("KVSTORE_HOME", "~/.cache/kvstore")).expanduser()


def daemon_token() -> str | None:
    """The cache daemon's bearer token, when set."""
    return os.environ.get("KVSTORE_DAEMON_TOKEN") or None


def api_key() -> str | None:
    """The OpenAI-compatible server's API key, when set."""
    return os.environ.get("KVSTORE_API_KEY") or None


FUSED_KERNELS = "KVSTORE_FUSED_KERNELS"


def fused_kernels_enabled() -> bool:
    """False when ``KVSTORE_FUSED_KERNELS=0`` turns the fused kernels off."""
    return os.environ.get(FUSED_KERNELS, "1") != "0"

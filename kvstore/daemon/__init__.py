"""The cache daemon: ``kvstore daemon`` serves encoded KV blocks over HTTP (aiohttp).

Engines on other machines share one store through it; ``tiers.http.HTTPTier`` is its
client, and both speak the protocol of ``tiers.wire``. ``docs/daemon.md`` has the
operator's guide.

- :mod:`kvstore.daemon.config`: :class:`DaemonConfig`, validated once.
- :mod:`kvstore.daemon.backend`: the tiers of every namespace and the four operations.
- :mod:`kvstore.daemon.metrics`: the Prometheus registry.
- :mod:`kvstore.daemon.app`: the aiohttp application, its handlers, and ``serve``.
- :mod:`kvstore.daemon.cli`: the command line.

A test and benchmark launcher for real daemon processes is ``bench.servers.DaemonProcess``.
"""

from kvstore.daemon.app import build_app, serve
from kvstore.daemon.backend import Backend
from kvstore.daemon.cli import build_parser, main
from kvstore.daemon.config import DaemonConfig

__all__ = ["Backend", "DaemonConfig", "build_app", "build_parser", "main", "serve"]

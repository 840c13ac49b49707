"""The command-line vocabulary every ``kvstore`` command shares.

Sizes are bytes with units (``4096``, ``512MiB``, ``8GiB``, ``10GB``); dtypes are
``float32|float16|bfloat16`` (``fp32 fp16 bf16`` accepted as aliases); ``--log-level``
has the same choices everywhere; seconds are plain numbers. Each type raises
``argparse.ArgumentTypeError``, so a bad value is argparse's one-line message and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from kvstore.units import parse_size

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
SIZE_HELP = "sizes: 4096, 512MiB, 8GiB, 1.5G (powers of 1024) or 10GB (powers of 1000)"
DEVICE_HELP = "cuda, cuda:N or cpu (default: cuda when present, else cpu)"
OUT_ROOT = Path("bench_out")


def size_arg(text: str) -> int:
    """A size in bytes with units (``4096``, ``512MiB``, ``8GiB``, ``10GB``)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def count_arg(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def port_arg(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    value = count_arg(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value} (0..65535)")
    return value


def seconds_arg(*, allow_zero: bool) -> Callable[[str], float]:
    """Finite seconds, ``> 0`` (or ``>= 0`` with ``allow_zero``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
            raise argparse.ArgumentTypeError(
                f"must be {'>= 0' if allow_zero else 'positive'} seconds, got {text}")
        return value

    parse.__name__ = "seconds"
    return parse


def dir_arg(text: str) -> Path:
    """A directory that exists or can be created (``mkdir -p``): not a file, not under a
    file, and writable (or in a writable directory). Nothing is created here; the
    command creates it when it writes there."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path: give a directory")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text} is a file, not a directory: give a directory (existing or new)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(
                f"directory {text} is not writable: give a directory you can write to")
        return path
    if path.is_symlink():
        raise argparse.ArgumentTypeError(
            f"{text} is a broken symbolic link: remove it or give another directory")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"cannot create directory {text}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"cannot create directory {text}: {parent} is not writable; give a directory "
            "you can write to")
    return path


dir_arg.__name__ = "directory"


def make_dir(parser: argparse.ArgumentParser, flag: str, path: Path) -> Path:
    """Create ``path`` (a :func:`dir_arg` value, with its parents) for ``flag``;
    what the file system refuses (a race, a full or read-only disk) is the parser's
    one-line error (exit status 2). Returns ``path``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"{flag} {path}: cannot create the directory: "
                     f"{exc.strerror or exc}")
    return path


def dtype_arg(text: str) -> str:
    """A dtype name: ``float32``, ``float16``, ``bfloat16`` or an alias (``bf16``)."""
    name = DTYPE_ALIASES.get(text.lower(), text.lower())
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(DTYPES)}; "
            f"aliases {', '.join(DTYPE_ALIASES)})")
    return name


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                        help: str = DEVICE_HELP) -> None:
    """``--device`` with the same name, metavar and default (``None``: cuda when present)
    everywhere."""
    parser.add_argument("--device", default=None, metavar="DEVICE", help=help)


def add_dtype_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                       help: str, default: str | None = None) -> None:
    """``--dtype`` through :func:`dtype_arg` (aliases accepted), one metavar everywhere.
    ``help`` says what the dtype applies to and its default."""
    parser.add_argument("--dtype", type=dtype_arg, default=default,
                        metavar="{" + ",".join(DTYPES) + "}",
                        help=f"{help}; bf16, fp16, fp32 are aliases")


def bench_out_dir(bench: str) -> Path:
    """The default output directory of the bench named ``bench`` (its ``kvstore bench``
    name): ``bench_out/<bench>``, ``-`` written ``_``."""
    return OUT_ROOT / bench.replace("-", "_")


def add_out_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, bench: str,
                     what: str) -> None:
    """``--out DIR``, the one output-directory flag of every bench that writes files;
    ``what`` names the files written there. Default: :func:`bench_out_dir`. The value is
    a :func:`dir_arg` (a file, or a path under one, is argparse's error), a ``Path``."""
    parser.add_argument("--out", type=dir_arg, default=str(bench_out_dir(bench)), metavar="DIR",
                        help=f"directory for {what} (created; default: %(default)s)")


def add_hidden_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str,
                     dest: str, **kwargs: object) -> None:
    """An old spelling ``old`` of a renamed flag that still parses into ``dest`` (for
    scripts that use it) but is shown neither in ``--help`` nor in the usage line."""
    parser.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                        **kwargs)  # type: ignore[arg-type]


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain_text(doc: str | None) -> str:
    """``doc`` (a module docstring in reStructuredText) as plain text for ``--help``:
    ``:func:`x``` becomes ``x``, double backquotes and ``**`` emphasis are dropped."""
    text = _ROLE.sub(r"\1", doc or "")
    return text.replace("``", "").replace("**", "")


def add_listen_arguments(p: argparse.ArgumentParser, *, host: str, port: int,
                         shutdown_timeout_s: float, credential: str, env: str,
                         credential_help: str) -> argparse._ArgumentGroup:
    """The ``listening`` group of a service: ``--host``, ``--port``, the credential flag
    (``--token``, ``--api-key``; its value defaults to ``$env``) and
    ``--shutdown-timeout``. Returns the group."""
    net = p.add_argument_group("listening")
    net.add_argument("--host", default=host,
                     help="address to bind (default: %(default)s; 0.0.0.0 = all interfaces, "
                          f"needs {credential})")
    net.add_argument("--port", type=port_arg, default=port,
                     help="TCP port (default: %(default)s; 0 = any free port, logged)")
    net.add_argument(credential, default=None, metavar=credential.upper().lstrip("-"),
                     help=f"{credential_help}; write {credential}=VALUE when it starts with '-' "
                          f"(default: ${env}; none)")
    net.add_argument("--shutdown-timeout", type=seconds_arg(allow_zero=True),
                     default=shutdown_timeout_s, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, time requests in flight get to finish "
                          "(default: %(default)s)")
    return net


def add_log_level(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                  default: str = "info") -> None:
    """``--log-level`` with the same choices in every command."""
    parser.add_argument("--log-level", default=default, choices=LOG_LEVELS,
                        help="logging level (default: %(default)s; debug adds details "
                             "such as an access log)")


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (one of :data:`LOG_LEVELS`), one format everywhere."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    if level != "debug":
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


__all__ = ["DEVICE_HELP", "DTYPES", "LOG_LEVELS", "SIZE_HELP", "add_device_argument",
           "add_dtype_argument", "add_hidden_alias", "add_listen_arguments", "add_log_level", "add_out_argument",
           "bench_out_dir", "configure_logging", "count_arg", "dir_arg", "dtype_arg",
           "make_dir", "plain_text",
           "port_arg", "seconds_arg", "size_arg"]

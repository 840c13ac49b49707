"""The device a bench runs on, resolved from ``--device`` the same way everywhere."""

from __future__ import annotations

import argparse

import torch


def bench_device(parser: argparse.ArgumentParser, requested: str | None) -> torch.device:
    """``requested`` (``--device``) as a device, or CUDA when present, else the CPU.

    A CUDA device that is not there, or a name torch does not know, is the parser's
    one-line error (exit status 2), never a traceback."""
    try:
        dev = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device {requested!r} is not a device name: use cuda, cuda:N or cpu")
    if dev.type not in ("cuda", "cpu"):
        parser.error(f"--device {requested}: the benches run on cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {requested}: no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        parser.error(f"--device {requested}: there are {torch.cuda.device_count()} CUDA "
                     f"GPUs (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev

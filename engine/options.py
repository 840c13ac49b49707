"""The engine flags ``kvstore chat`` and ``kvstore serve`` share: the same names, the
same defaults and the same help, turned into one :class:`engine.llm.EngineConfig`.

Sizes are bytes with units (``--gpu-kv-bytes 8GiB``, ``--host-bytes 16GiB``); the
engine turns them into whole KV blocks once the model's block size is known.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from engine.config import NAMED_SHAPES
from kvstore import env
from kvstore.args import add_device_argument, add_dtype_argument, dir_arg, size_arg
from kvstore.config import POLICIES
from kvstore.units import format_size
from radix.hashing import KV_FORMATS

DEFAULT_HOST_BYTES = 1 << 30
DEFAULT_DISK_BYTES = 4 << 30
DEFAULT_POLICY = "write-back"


def add_engine_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``model`` and ``KV-cache tiers`` argument groups; returns the model group."""
    model = p.add_argument_group("model")
    model.add_argument("--model", default="smollm2",
                       help="'smollm2' (the bundled SmolLM2-135M-Instruct), a local Hugging "
                            "Face checkpoint directory or a .gguf file (default: %(default)s); "
                            f"with --load-format dummy a shape name ({', '.join(NAMED_SHAPES)}) "
                            "or a config.json")
    model.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="auto: the model's weights; dummy: random weights of its shape "
                            "(deterministic, made on the device in seconds; for benchmarks "
                            "at real model shapes) (default: %(default)s)")
    model.add_argument("--tokenizer", default=None, metavar="NAME",
                       help="--load-format dummy only: 'none' (default; clients send token "
                            "ids to /v1/completions), 'smollm2' or a directory with a "
                            "tokenizer.json")
    add_device_argument(model)
    add_dtype_argument(model, "weights and KV dtype (default: bfloat16 on GPU, float32 on CPU)")
    model.add_argument("--no-warmup", action="store_true",
                       help="skip the start-up warm-up (on CUDA it runs every kernel variant "
                            "a request can hit and captures the decode CUDA graphs before the "
                            "first request, so the first reply is as fast as the next; on CPU "
                            "there is none): a faster start, a slower first request")
    model.add_argument("--model-cache-dir", default=None, metavar="DIR",
                       help="where converted model weights are kept (default: "
                            "$KVSTORE_HOME/models, $KVSTORE_HOME defaulting to "
                            "~/.cache/kvstore)")
    tiers = p.add_argument_group("KV-cache tiers")
    tiers.add_argument("--gpu-kv-bytes", type=size_arg, default=None, metavar="SIZE",
                       help="KV pool on the device (default: half the free GPU memory; "
                            "1GiB on CPU)")
    tiers.add_argument("--host-bytes", type=size_arg, default=DEFAULT_HOST_BYTES,
                       metavar="SIZE", help="host DRAM tier (default: 1GiB; 0 = none)")
    disk = tiers.add_mutually_exclusive_group()
    disk.add_argument("--disk", type=dir_arg, default=None, metavar="PATH",
                      help="directory of the LMDB disk tier, kept across restarts "
                           "(default: $KVSTORE_HOME/disk)")
    disk.add_argument("--no-disk", action="store_true", help="run without the disk tier")
    tiers.add_argument("--disk-bytes", type=size_arg, default=DEFAULT_DISK_BYTES,
                       metavar="SIZE", help="disk tier capacity (default: 4GiB)")
    tiers.add_argument("--redis", default=None, metavar="URL",
                       help="share blocks through Redis: redis://, rediss://, "
                            "redis+cluster://host:port,... (default: none)")
    tiers.add_argument("--remote", default=None, metavar="URL",
                       help="share blocks through a kvstore daemon, http://host:port; its "
                            "token is read from $KVSTORE_DAEMON_TOKEN (default: none)")
    tiers.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICIES,
                       help="write-back moves a block down the tiers when it is evicted; "
                            "write-through also copies it to host and disk as soon as it is "
                            "computed. Either way committed blocks are published to the "
                            "shared tiers (disk, Redis, daemon) at once, in the background "
                            "(default: %(default)s)")
    tiers.add_argument("--kv-format", default="exact", choices=KV_FORMATS,
                       help="format of the blocks in the shared tiers (disk, Redis, daemon): "
                            "exact keeps the model's KV bytes; int8 and fp8 store one byte a "
                            "value plus a bf16 scale per head vector (about half of bf16: "
                            "twice the blocks per byte and faster loads, at a small accuracy "
                            "cost, see docs/kv_format.md). The device and host pools stay "
                            "exact; stores of different formats never share blocks "
                            "(default: %(default)s)")
    tiers.add_argument("--no-prefix-reuse", action="store_true",
                       help="never reuse cached prefixes (for comparisons)")
    return model


def disk_path(args: argparse.Namespace) -> str | None:
    """The disk tier's directory: ``--disk``, else ``$KVSTORE_HOME/disk``; ``None`` with
    ``--no-disk``."""
    if args.no_disk:
        return None
    return str(Path(args.disk).expanduser() if args.disk else env.home() / "disk")


def check_engine_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse tier flags that cannot work, before the model loads: ``parser.error`` (exit
    2) naming the flag. ``--disk-bytes 0`` with a disk tier, ``--host-bytes`` beyond this
    machine's memory (the host tier is pinned DRAM); ``--disk`` itself is a
    :func:`kvstore.args.dir_arg`."""
    if disk_path(args) is not None and args.disk_bytes <= 0:
        parser.error("--disk-bytes must be > 0 for the disk tier (or --no-disk)")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if args.host_bytes > memory:
        parser.error(f"--host-bytes {format_size(args.host_bytes)} is more than this "
                     f"machine's memory ({format_size(memory)}): the host tier is pinned "
                     "DRAM; give less (0 = no host tier)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :class:`engine.llm.LLM` from the parsed flags."""
    return {"device": args.device, "dtype": args.dtype, "gpu_kv_bytes": args.gpu_kv_bytes,
            "host_bytes": args.host_bytes, "disk_path": disk_path(args),
            "disk_bytes": args.disk_bytes, "redis_url": args.redis,
            "remote_url": args.remote, "policy": args.policy, "kv_format": args.kv_format,
            "enable_cache": not args.no_prefix_reuse,
            "model_cache_dir": args.model_cache_dir, "load_format": args.load_format,
            "tokenizer": args.tokenizer, "warmup": False if args.no_warmup else None}

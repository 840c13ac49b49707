"""``LLM``: the embedded engine's public API.

    from engine.llm import LLM
    from engine.sampling import SamplingParams
    llm = LLM("smollm2", host_blocks=2048, disk_path="~/.cache/kvstore/disk")
    out = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))
    print(out.text, out.cached_tokens, out.ttft_s)

Every call goes through the tiered store: prompts that share a prefix with anything
cached (a system prompt, an earlier turn) reuse its KV blocks from whichever tier holds
them. ``enable_cache=False`` turns prefix reuse off (for comparisons).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from engine import warmup
from engine.engine import Engine
from engine.loader import resolve_model
from engine.model import CausalLM
from engine.sampling import SamplingParams
from engine.scheduler import SchedulerConfig
from engine.sequence import RequestOutput
from engine.warmup import WarmupReport
from kvstore import env
from kvstore.config import Policy, StoreConfig
from kvstore.events import open_events
from kvstore.store import KVStore
from kvstore.units import format_size
from kvstore.urls import redact_url
from radix import Namespace
from radix.hashing import KV_FORMATS
from tiers.layout import KVLayout

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

Prompt = str | Sequence[int] | np.ndarray | torch.Tensor
"""One prompt: text, or token ids (a sequence of ints, a 1-D integer array or tensor)."""
Messages = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class EngineConfig:
    """How to build an :class:`LLM`: model, device, cache tiers and batching.

    ``device`` ``None`` picks CUDA when present, else CPU; ``dtype`` ``None`` picks
    bfloat16 on CUDA and float32 on CPU. The device KV pool is ``gpu_blocks`` blocks of
    ``block_size`` tokens, or ``gpu_kv_bytes`` bytes (whole blocks), or when neither is
    given half the free device memory (CUDA) or 1 GiB (CPU). The host tier is
    ``host_blocks`` blocks or ``host_bytes`` bytes (0: none); ``disk_bytes`` is bytes.
    ``auth_token`` ``None`` reads the daemon's token from ``$KVSTORE_DAEMON_TOKEN``;
    ``model_cache_dir`` ``None`` is ``$KVSTORE_HOME/models``. ``load_format="dummy"``
    runs random weights of ``model``'s shape (a name such as ``"llama3-8b"`` or a
    ``config.json``) with ``tokenizer`` ``None`` (token ids only) or ``"smollm2"``
    (:func:`engine.loader.dummy_model`). ``kv_events_url``: a Redis URL to publish KV
    events to for routers (``kvstore.events``; ``None``: none), as ``replica_id``
    (``""``: hostname and process id). ``kv_format``: format of the blocks in the shared
    tiers, ``exact`` (default), ``int8`` or ``fp8`` (:class:`kvstore.config.StoreConfig`;
    the device and host pools stay exact). ``warmup``: run every kernel variant a request
    can hit and capture the decode CUDA graphs before the first request
    (:mod:`engine.warmup`); ``None`` (default) does so on CUDA only.
    """

    model: str = "smollm2"
    device: str | None = None
    dtype: str | None = None
    block_size: int = 16
    gpu_blocks: int | None = None
    gpu_kv_bytes: int | None = None
    host_blocks: int = 0
    host_bytes: int = 0
    disk_path: str | None = None
    disk_bytes: int = 4 << 30
    redis_url: str | None = None
    remote_url: str | None = None
    auth_token: str | None = None
    policy: Policy = "write-back"
    enable_cache: bool = True
    tenant: str = ""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    attention: str = "auto"
    model_cache_dir: str | None = None
    gpu_memory_fraction: float = 0.5
    load_format: str = "auto"
    tokenizer: str | None = None
    kv_events_url: str | None = None
    replica_id: str = ""
    kv_format: str = "exact"
    warmup: bool | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if self.gpu_blocks is not None and self.gpu_blocks < 1:
            raise ValueError(f"gpu_blocks must be >= 1 (or None for automatic), got {self.gpu_blocks}")
        if self.gpu_blocks is not None and self.gpu_kv_bytes is not None:
            raise ValueError("give gpu_blocks or gpu_kv_bytes, not both")
        if self.host_blocks and self.host_bytes:
            raise ValueError("give host_blocks or host_bytes, not both")
        for name in ("host_blocks", "host_bytes", "disk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                hint = (f" (a number of bytes: kvstore.units.parse_size({value!r}))"
                        if name.endswith("_bytes") and isinstance(value, str) else "")
                raise ValueError(f"{name} must be a non-negative int, got {value!r}{hint}")
        if self.device is not None:
            _check_device(self.device)
        if not 0 < self.gpu_memory_fraction <= 0.95:
            raise ValueError("gpu_memory_fraction must be in (0, 0.95]")
        if self.kv_format not in KV_FORMATS:
            raise ValueError(f"kv_format must be one of {', '.join(KV_FORMATS)} "
                             f"(--kv-format), got {self.kv_format!r}")


class LLM:
    """An embedded engine: a model, a tiered KV-cache store and a scheduler.

    Keyword arguments are the fields of :class:`EngineConfig`.
    """

    def __init__(self, model: str = "smollm2", **kwargs: Any) -> None:
        cfg = EngineConfig(model=model, **kwargs)
        self.config = cfg
        t0 = time.perf_counter()
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        loaded = resolve_model(cfg.model, cache_dir=cfg.model_cache_dir or env.home() / "models",
                               dtype=dtype_name, device=device, load_format=cfg.load_format,
                               tokenizer=cfg.tokenizer)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model = CausalLM.from_loaded(loaded, device=device, backend=cfg.attention)
        mc = loaded.config
        t1 = time.perf_counter()
        layout = KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.block_size,
                          _DTYPE_NAMES[self.model.dtype])
        disk = None if cfg.disk_path is None else str(Path(cfg.disk_path).expanduser())
        if 0 < cfg.host_bytes < layout.block_bytes:  # it would silently mean no host tier
            raise ValueError(f"host_bytes {cfg.host_bytes} holds no KV block of this model "
                             f"({layout.block_bytes} bytes a block): give at least that "
                             "(--host-bytes), or 0 for no host tier")
        store_cfg = StoreConfig(
            layout=layout, block_size=cfg.block_size,
            gpu_blocks=_gpu_blocks(device, layout, cfg),
            host_blocks=cfg.host_blocks or cfg.host_bytes // layout.block_bytes,
            disk_path=disk, disk_bytes=cfg.disk_bytes if disk else 0,
            redis_url=cfg.redis_url, remote_url=cfg.remote_url,
            auth_token=cfg.auth_token if cfg.auth_token is not None else env.daemon_token(),
            policy=cfg.policy, device=str(device), kv_format=cfg.kv_format,
            publish_queue_bytes=_write_queue_bytes(layout, cfg))
        self.namespace = Namespace(loaded.fingerprint, layout.dtype, cfg.block_size,
                                   tenant=cfg.tenant, kv_format=cfg.kv_format)
        self.replica_id = cfg.replica_id or _default_replica_id()
        events = open_events(cfg.kv_events_url, self.replica_id, self.namespace.root())
        self.store = KVStore(store_cfg, events=events)
        t2 = time.perf_counter()
        self.engine = Engine(self.model, self.tokenizer, self.store, self.namespace,
                             loaded.stop_token_ids,
                             SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                             cfg.enable_cache))
        self._ids = itertools.count()
        self.warmup_report: WarmupReport | None = None
        if warmup.enabled(device, cfg.warmup):
            self.warm_up()
        # Seconds each part of the start took: the model (weights on the device), the
        # store (pools allocated and pinned, tiers opened), the warm-up (0 without).
        self.startup_s = {"model": t1 - t0, "store": t2 - t1,
                          "warm-up": time.perf_counter() - t2}

    def warm_up(self) -> WarmupReport:
        """Run every kernel variant a request can hit and capture the decode CUDA graphs
        now, so that the first request pays none of it (:mod:`engine.warmup`; done at
        construction on CUDA unless ``warmup=False``). Changes no output."""
        self.warmup_report = warmup.warm_up(self.engine, self.tokenizer)
        return self.warmup_report

    # ---------------------------------------------------------------- inputs

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (or the ids themselves: a sequence of ints, or a
        1-D integer numpy array or torch tensor). ``TypeError`` for anything else."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return _token_ids(prompt, "prompt")

    def encode_chat(self, messages: Messages) -> list[int]:
        """Token ids of a conversation with the chat template applied."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer/chat template")
        return self.tokenizer.encode_chat(check_messages(messages))

    # ---------------------------------------------------------------- calls

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | None = None, *, use_tqdm: bool = False
                 ) -> list[RequestOutput]:
        """Run every prompt (text or token ids) to completion; outputs in input order.

        ``prompts``: one prompt (a ``str``, a sequence of int token ids, or a 1-D
        integer numpy array / torch tensor) or a list of prompts."""
        batch = _prompt_batch(prompts)
        params = _check_params(params)
        return self._run([self.encode(p) for p in batch], params, use_tqdm)

    def chat(self, messages: Messages | Sequence[Messages],
             params: SamplingParams | None = None, *, use_tqdm: bool = False
             ) -> RequestOutput | list[RequestOutput]:
        """Apply the chat template and generate the assistant's reply.

        One conversation (a list of ``{"role", "content"}`` dicts) returns one output;
        a list of conversations returns a list.
        """
        single = _is_conversation(messages, "chat")
        convs = [messages] if single else list(messages)
        params = _check_params(params)
        outs = self._run([self.encode_chat(cast(Messages, c)) for c in convs], params,
                         use_tqdm)
        return outs[0] if single else outs

    def stream(self, prompt: Prompt | Messages, params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Yield snapshots of one request as tokens arrive (chat messages or a prompt)."""
        if isinstance(prompt, Mapping):
            _is_conversation(prompt, "stream")  # raises: a message, not a conversation
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            ids = self.encode_chat(prompt)  # type: ignore[arg-type]
        else:
            ids = self.encode(_one_prompt(prompt))
        params = _check_params(params)
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, ids, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)

    def _run(self, prompts: list[list[int]], params: SamplingParams,
             use_tqdm: bool) -> list[RequestOutput]:
        """Queue every prompt and run them to completion. Every prompt is checked before
        any is queued; on any exception (``KeyboardInterrupt`` included) the requests of
        this call are aborted, so none is left in the engine to run with a later call."""
        for i, p in enumerate(prompts):
            try:
                self.engine.check_request(p)
            except ValueError as exc:
                if len(prompts) == 1:
                    raise
                raise ValueError(f"prompts[{i}] (of {len(prompts)}): {exc} (no prompt of "
                                 "this batch ran)") from None
        ids = [f"req-{next(self._ids)}" for _ in prompts]
        done: dict[str, RequestOutput] = {}
        try:
            for rid, p in zip(ids, prompts):
                self.engine.add_request(rid, p, params)
            with tqdm(total=len(ids), disable=not use_tqdm, desc="generating") as bar:
                for out in self.engine.run():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            if len(done) < len(ids):
                for rid in ids:
                    self.engine.abort(rid)
        return [done[r] for r in ids]

    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence (prompt + completion, tokens) this engine can run: the
        model's context window, capped by the KV pool (a longer one is never scheduled)."""
        store = self.store.config
        return min(self.loaded.config.max_context_len, store.gpu_blocks * store.block_size)

    def describe(self) -> list[str]:
        """Lines about the model and the cache tiers, for logs (no secrets)."""
        cfg = self.config
        store = self.store.config
        block = store.layout.block_bytes if store.layout is not None else 0
        lines = [f"model {self.loaded.name} ({self.loaded.fingerprint[:12]}) on "
                 f"{self.model.device}, "
                 f"{str(self.model.dtype).removeprefix('torch.')}, context "
                 f"{self.loaded.config.max_context_len} tokens (longest sequence served: "
                 f"{self.max_sequence_tokens}), up to {cfg.max_num_seqs} sequences per batch"]
        for tier in self.store.tiers:
            if tier == "gpu":
                where = "GPU" if self.model.device.type == "cuda" else "device (CPU)"
                text = (f"{where} pool: {store.gpu_blocks} blocks of {store.block_size} "
                        f"tokens ({format_size(store.gpu_blocks * block)})")
            elif tier == "host":
                text = (f"host DRAM: {store.host_blocks} blocks "
                        f"({format_size(store.host_blocks * block)})")
            elif tier == "disk":
                text = f"disk: LMDB in {store.disk_path}, {format_size(store.disk_bytes)}"
            elif tier == "redis":
                text = f"redis: {redact_url(store.redis_url or '')}"
            elif tier == "remote":
                text = f"remote daemon: {redact_url(store.remote_url or '')}"
            else:
                text = tier
            lines.append(f"tier {text}")
        reuse = "on" if cfg.enable_cache else "off"
        lines.append(f"policy {store.policy}; prefix reuse {reuse}")
        lines.append(f"started in {sum(self.startup_s.values()):.1f} s: " + ", ".join(
            f"{part} {s:.1f} s" for part, s in self.startup_s.items()))
        return lines

    def close(self) -> None:
        """Flush background writes and close the cache tiers."""
        self.store.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_messages(messages: Messages) -> list[Mapping[str, Any]]:
    """``messages`` as a list, each a mapping with a string ``role`` and ``content``;
    ``ValueError`` naming the first message that is not."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
    out = list(messages)
    for i, m in enumerate(out):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got "
                             f"{type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                what = "is missing" if key not in m else f"is {type(m[key]).__name__}"
                raise ValueError(f"messages[{i}]['{key}'] must be a string; it {what}")
    return out


def _is_integer(value: object) -> bool:
    """An int token id (a numpy integer too), not a bool."""
    return (isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_))


def _array_ids(value: np.ndarray | torch.Tensor, what: str) -> list[int]:
    """The ids of a 1-D integer numpy array or torch tensor."""
    if isinstance(value, torch.Tensor):
        integral = not value.is_floating_point() and not value.is_complex() and \
            value.dtype is not torch.bool
        kind = f"torch tensor of {str(value.dtype).removeprefix('torch.')}"
    else:
        integral = np.issubdtype(value.dtype, np.integer)
        kind = f"numpy array of {value.dtype}"
    if not integral:
        raise TypeError(f"{what} is a {kind}: token ids must be integers (convert it, "
                        "e.g. .astype(int) / .long(), or pass a str)")
    if value.ndim != 1:
        raise TypeError(f"{what} is a {value.ndim}-D {kind}: a prompt of token ids is 1-D; "
                        "pass a list of 1-D arrays for several prompts")
    return [int(t) for t in value.tolist()]


def _token_ids(prompt: object, what: str) -> list[int]:
    """``prompt`` as a list of int token ids; ``TypeError`` naming what to pass when it is
    not a sequence of ints (or a 1-D integer array/tensor)."""
    if isinstance(prompt, np.ndarray | torch.Tensor):
        return _array_ids(prompt, what)
    if isinstance(prompt, bytes | bytearray | memoryview):
        raise TypeError(f"{what} is {type(prompt).__name__}: pass text as a str (decode the "
                        "bytes first, e.g. .decode('utf-8')) or token ids as a list of ints")
    if isinstance(prompt, str) or not isinstance(prompt, Sequence):
        raise TypeError(f"{what} must be a str or a sequence of int token ids, got "
                        f"{type(prompt).__name__}")
    ids = list(prompt)
    for i, t in enumerate(ids):
        if not _is_integer(t):
            raise TypeError(f"{what}[{i}] is {type(t).__name__} {t!r}: token ids must be ints "
                            "(pass text as a str, several prompts as a list of str or of "
                            "token-id lists)")
    return [int(t) for t in ids]


def _one_prompt(prompt: object) -> Prompt:
    """``prompt`` if it is one prompt (text or token ids), else ``TypeError``."""
    return prompt if isinstance(prompt, str) else _token_ids(prompt, "prompt")


def _prompt_batch(prompts: object) -> list[Prompt]:
    """The prompts of :meth:`LLM.generate`'s argument: one prompt (text, token ids, a 1-D
    array/tensor) or a sequence of prompts. ``TypeError`` naming what to pass."""
    expected = ("a str, a list of int token ids (or a 1-D integer numpy array / torch "
                "tensor), or a list of those")
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray | torch.Tensor):
        return [_array_ids(prompts, "prompts")]
    if isinstance(prompts, bytes | bytearray | memoryview):
        raise TypeError(f"prompts is {type(prompts).__name__}: pass text as a str (decode "
                        "the bytes first, e.g. .decode('utf-8')) or token ids as a list of "
                        "ints")
    if isinstance(prompts, Mapping) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be {expected}; got {type(prompts).__name__}")
    items = list(prompts)
    if items and (_is_integer(items[0]) or isinstance(items[0], bool | np.bool_)):
        return [_token_ids(items, "prompt")]  # one prompt of token ids
    batch: list[Prompt] = []
    for i, p in enumerate(items):
        if isinstance(p, str):
            batch.append(p)
        elif isinstance(p, np.ndarray | torch.Tensor):
            batch.append(_array_ids(p, f"prompts[{i}]"))
        elif isinstance(p, Sequence) and not isinstance(p, bytes | bytearray | memoryview):
            batch.append(_token_ids(p, f"prompts[{i}]"))
        else:
            why = (" (a list mixing text and bare ints is neither)" if _is_integer(p)
                   else " (token ids are ints)" if isinstance(p, float) else "")
            raise TypeError(f"prompts[{i}] is {type(p).__name__} {p!r}: each prompt must be "
                            f"a str or a list of int token ids{why}")
    return batch


def _check_params(params: object) -> SamplingParams:
    """``params``, or the default :class:`SamplingParams` for ``None``; ``TypeError``
    otherwise (a dict of options included)."""
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        hint = (": build one with SamplingParams(**options)"
                if isinstance(params, Mapping) else "")
        raise TypeError(f"params must be an engine.sampling.SamplingParams (or None), got "
                        f"{type(params).__name__}{hint}")
    return params


def _is_conversation(messages: object, call: str) -> bool:
    """Whether ``messages`` is one conversation (a list of message dicts) rather than a
    list of conversations; ``TypeError`` when it is neither kind of list."""
    if isinstance(messages, Mapping):
        raise TypeError(f"{call}() takes a list of messages, got one message (a "
                        f"{type(messages).__name__}): wrap it in a list, [message]")
    if isinstance(messages, str | bytes | bytearray) or not isinstance(messages, Sequence):
        raise TypeError(f"{call}() takes a list of {{'role': str, 'content': str}} dicts "
                        f"(or a list of such lists), got {type(messages).__name__}")
    return bool(messages) and isinstance(messages[0], Mapping)


_OPTIONAL_STR = ("device", "dtype", "disk_path", "redis_url", "remote_url", "auth_token",
                 "model_cache_dir", "tokenizer", "kv_events_url")
_STR = ("model", "policy", "tenant", "attention", "load_format", "replica_id", "kv_format")
_PATHS = ("model", "disk_path", "model_cache_dir")
_INT = ("block_size", "max_num_seqs", "max_num_batched_tokens")  # host_*, disk_bytes: below
_OPTIONAL_INT = ("gpu_blocks", "gpu_kv_bytes")


def _check_types(cfg: EngineConfig) -> None:
    """``TypeError`` naming the first field of ``cfg`` whose value has the wrong type."""
    def bad(name: str, expected: str, hint: str = "") -> TypeError:
        value = getattr(cfg, name)
        return TypeError(f"{name} must be {expected}, got {type(value).__name__} "
                         f"{value!r}{hint}")

    for name in _STR + _OPTIONAL_STR:
        value = getattr(cfg, name)
        if value is None and name in _OPTIONAL_STR:
            continue
        if isinstance(value, str) or (name in _PATHS and isinstance(value, os.PathLike)):
            continue
        if name == "device" and isinstance(value, torch.device):
            continue
        if name == "dtype" and isinstance(value, torch.dtype):
            continue
        raise bad(name, "a str" + (" or None" if name in _OPTIONAL_STR else ""))
    for name in _INT + _OPTIONAL_INT:
        value = getattr(cfg, name)
        if value is None and name in _OPTIONAL_INT:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            continue
        hint = ""
        if name.endswith("_bytes") and isinstance(value, str):
            hint = (f": give a number of bytes, e.g. kvstore.units.parse_size({value!r}) or "
                    "1 << 30 for 1 GiB")
        raise bad(name, "an int" + (" or None" if name in _OPTIONAL_INT else ""), hint)
    if not (isinstance(cfg.gpu_memory_fraction, int | float)
            and not isinstance(cfg.gpu_memory_fraction, bool)):
        raise bad("gpu_memory_fraction", "a number in (0, 0.95]")
    if not isinstance(cfg.enable_cache, bool):
        raise bad("enable_cache", "True or False")
    if cfg.warmup is not None and not isinstance(cfg.warmup, bool):
        raise bad("warmup", "True, False or None")


def _default_replica_id() -> str:
    """``hostname:pid``: unique among the engines of one machine."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name: use cuda, cuda:N or "
                         "cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA device is available on this "
                             "machine (or torch was built without CUDA); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported: use cuda, cuda:N or cpu")


def _write_queue_bytes(layout: KVLayout, cfg: EngineConfig) -> int:
    """Bytes of the store's write queue (publications and write-back to the shared
    tiers): the store's default, or two steps' worth of committed blocks when that is
    more, so one long prefill's blocks are not dropped before the writer has seen them
    (Llama-3-8B, 8,192-token steps: 1,024 blocks, 2 GiB; the default holds 128)."""
    step_blocks = -(-cfg.max_num_batched_tokens // cfg.block_size)
    return max(StoreConfig.publish_queue_bytes, 2 * step_blocks * layout.block_bytes)


def _gpu_blocks(device: torch.device, layout: KVLayout, cfg: EngineConfig) -> int:
    """Blocks of the device pool: given, from ``gpu_kv_bytes``, or automatic."""
    if cfg.gpu_blocks is not None:
        return cfg.gpu_blocks
    if cfg.gpu_kv_bytes is not None:
        blocks = cfg.gpu_kv_bytes // layout.block_bytes
        if blocks < 1:
            raise ValueError(f"gpu_kv_bytes {cfg.gpu_kv_bytes} holds no KV block of this "
                             f"model ({layout.block_bytes} bytes each): give more")
        return blocks
    if device.type != "cuda":
        return max(1, (1 << 30) // layout.block_bytes)
    free, _ = torch.cuda.mem_get_info(device)
    return max(64, int(free * cfg.gpu_memory_fraction) // layout.block_bytes)

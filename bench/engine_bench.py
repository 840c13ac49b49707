"""Engine benchmark: TTFT cold vs cached from each tier, and offline throughput.

Run: ``python -m kvstore bench engine`` (``--help``). Three parts:

1. **TTFT** (any device; :mod:`bench.ttft_bench`): a named model shape with random
   weights (Llama-3-8B on CUDA, SmolLM2 on CPU) answers a question after shared
   prefixes of several lengths, cold and cached from each tier (GPU, host, disk, Redis
   with ``--redis``), with the load GB/s next to the raw pinned copy and the raw tier
   read measured in the same run, and the cost model's decision.
2. **Throughput** (CUDA only; ``--throughput``): ShareGPT-like requests (prompt and reply
   lengths from the real ShareGPT conversations, or from ``--requests-file``) through
   the engine (continuous batching, paged attention) next to Hugging Face transformers
   ``generate`` with static batching on the same model and GPU, in the same run, for
   SmolLM2 and a random-weight Llama-3-8B-shaped model in bf16, and next to
   transformers' continuous batching (``generate_batch``'s manager with each request's
   own ``max_new_tokens``; ``--no-hf-cb`` skips it). ``--compare-eager`` adds the engine
   with CUDA graphs off.
3. **First turn** (any device; ``--first-turn``): the chat demo's engine started in a
   fresh process, with and without the start-up warm-up (:mod:`engine.warmup`): seconds
   to ready, then the TTFT of the first and the second chat turn; on CUDA with an empty
   and with a filled Triton kernel cache.

``--profile`` instead breaks a decode step down (host and GPU time, kernels, top ops and
Python functions) at the workload's full batch; docs/kernels.md, "Engine step", has the
findings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import ttft_bench
from kvstore.args import SIZE_HELP, add_device_argument, add_dtype_argument, add_out_argument


def sharegpt_requests(n: int, tokenizer, max_input: int, max_output: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, reply length) pairs from the first turns of ShareGPT chats."""
    from bench.workloads import load_sharegpt_records, sharegpt_turns

    out: list[tuple[list[int], int]] = []
    for rec in load_sharegpt_records():
        turns = sharegpt_turns(rec)
        if not turns:
            continue
        user, reply = turns[0]
        ids = tokenizer.encode_chat([{"role": "user", "content": user}])
        n_out = len(tokenizer.encode(reply, add_special_tokens=False))
        if 4 <= len(ids) <= max_input and n_out >= 4:
            out.append((ids, min(n_out, max_output)))
        if len(out) == n:
            break
    return out


def _random_model(name: str, dev: torch.device, dtype: str = "bfloat16"):
    """A ``CausalLM`` of ``name``'s real shape with random weights in ``dtype`` (the
    loader's dummy weights), and its HF config dict. Throughput and TTFT do not depend on
    weight values."""
    from engine.loader import dummy_model
    from engine.model import CausalLM

    loaded = dummy_model(name, dtype=getattr(torch, dtype), device=dev)
    model = CausalLM.from_loaded(loaded, device=dev)
    return model, loaded.config.to_hf_dict()


def _bench_engine(model, name: str, cuda_graphs: bool | None):
    """An engine over a fresh store taking 60% of free GPU memory; prefix reuse off.

    ``cuda_graphs`` is passed to ``Engine`` unless ``None`` (so this also drives an
    engine that predates the switch)."""
    from engine.engine import Engine
    from engine.scheduler import SchedulerConfig
    from kvstore.config import StoreConfig
    from kvstore.store import KVStore
    from radix import Namespace
    from tiers.layout import KVLayout

    mc = model.config
    layout = KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, 16, "bfloat16")
    free, _ = torch.cuda.mem_get_info(model.device)
    store = KVStore(StoreConfig(layout=layout, gpu_blocks=int(free * 0.6) // layout.block_bytes,
                                device="cuda"))
    kw = {} if cuda_graphs is None else {"cuda_graphs": cuda_graphs}
    return Engine(model, None, store, Namespace(f"bench-{name}", "bfloat16", 16), frozenset(),
                  SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192,
                                  enable_cache=False), **kw)


def _load_requests(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    if args.requests_file:
        data = json.loads(Path(args.requests_file).read_text())
        return [(r["prompt"], r["output_len"]) for r in data][: args.num_requests]
    from engine.loader import resolve_model

    smol = resolve_model("smollm2", cache_dir=args.model_cache_dir)
    return sharegpt_requests(args.num_requests, smol.tokenizer, 1024, 256)


@dataclass
class ThroughputRow:
    """One model's offline throughput (output tokens/s) through each system, and how
    transformers' continuous batching ran (or why it did not)."""

    model: str
    engine: float
    eager: float | None = None
    hf_static: float | None = None
    hf_cb: float | None = None
    hf_cb_note: str = ""


def bench_throughput(args: argparse.Namespace) -> list[ThroughputRow]:
    """Per model: the engine (CUDA graphs on, and off with ``--compare-eager``), then
    transformers on the same weights and requests: static-batch ``generate`` and
    continuous batching (``generate_batch``'s manager; unless ``--no-hf-cb``)."""
    dev = torch.device("cuda")
    reqs = _load_requests(args)
    rows = []
    for name in args.models:
        model, cfg_dict = _random_model(name, dev)
        vocab = model.config.vocab_size
        ids = [([t % vocab for t in p], n) for p, n in reqs]
        n_out = sum(n for _, n in ids)
        modes: list[bool | None] = [None, False] if args.compare_eager else [None]
        rates: list[float] = []
        for graphs in modes:
            engine = _bench_engine(model, name, graphs)
            _capture(engine)
            _run_engine(engine, ids[:16])  # warm-up (kernel compilation, allocator)
            rates.append(n_out / _run_engine(engine, ids))
            engine.store.close()
            del engine
            torch.cuda.empty_cache()
        row = ThroughputRow(name, rates[0], rates[1] if len(rates) > 1 else None)
        rows.append(row)
        if args.no_hf:
            del model
            torch.cuda.empty_cache()
            continue
        hf = hf_model(model, cfg_dict, dev)
        del model
        torch.cuda.empty_cache()
        row.hf_static = n_out / hf_static_seconds(hf, ids, args.hf_batch)
        if not args.no_hf_cb:
            try:
                cb = hf_continuous_batching(hf, ids, cb_options=_cb_options(args))
            except BaselineUnavailable as exc:
                row.hf_cb_note = str(exc)
            else:
                row.hf_cb = cb.output_tokens / cb.seconds
                row.hf_cb_note = cb.describe()
        del hf
        torch.cuda.empty_cache()
    return rows


def hf_model(model, cfg_dict: dict, dev: torch.device):
    """A transformers ``LlamaForCausalLM`` in bf16 on ``dev`` holding ``model``'s weights
    (unfused), in eval mode."""
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items()
                                                  if k != "architectures"})
    # Built on the device (not on "meta" + to_empty, which would leave the rotary
    # embedding's computed inv_freq buffer uninitialised), then overwritten.
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=model.dtype)
    _copy_weights(model, hf)
    return hf.eval()


def hf_static_seconds(hf, ids: list[tuple[list[int], int]], batch: int) -> float:
    """Seconds for transformers ``generate`` (static batches of ``batch`` requests with
    left padding; every request of a batch runs to the batch's longest reply) to produce
    every request's output length."""
    dev = hf.device
    _sync(dev)
    t0 = time.perf_counter()
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        width = max(len(p) for p, _ in chunk)
        inp = torch.zeros(len(chunk), width, dtype=torch.long, device=dev)
        mask = torch.zeros_like(inp)
        for j, (p, _) in enumerate(chunk):
            inp[j, width - len(p):] = torch.tensor(p, device=dev)
            mask[j, width - len(p):] = 1
        with torch.no_grad():
            hf.generate(input_ids=inp, attention_mask=mask, do_sample=False,
                        max_new_tokens=max(n for _, n in chunk),
                        min_new_tokens=max(n for _, n in chunk), pad_token_id=0)
    _sync(dev)
    return time.perf_counter() - t0


class BaselineUnavailable(RuntimeError):
    """The installed transformers cannot run this baseline (the message says why)."""


@dataclass
class ContinuousResult:
    """One timed run of transformers' continuous batching: ``seconds`` from the first
    request in to the last result out, ``output_tokens`` generated, and how it ran."""

    seconds: float
    output_tokens: int
    method: str
    attention: str
    version: str
    output_ids: list[list[int]] = field(default_factory=list)

    def describe(self) -> str:
        return f"transformers {self.version} {self.method}, attention {self.attention}"


def _cb_options(args: argparse.Namespace) -> dict[str, int]:
    return {k: v for k, v in (("max_batch_tokens", args.hf_cb_max_batch_tokens),
                              ("num_blocks", args.hf_cb_num_blocks)) if v is not None}


def hf_continuous_batching(hf, requests: list[tuple[list[int], int]], *,
                           cb_options: dict[str, int] | None = None,
                           warmup_requests: int = 16,
                           timeout_s: float = 600.0) -> ContinuousResult:
    """Run every ``(prompt ids, output length)`` request greedily through transformers'
    continuous batching on ``hf`` (any device; EOS off, so each request generates
    exactly its output length) and time it.

    The path is ``generate_batch``'s own: ``continuous_batching_context_manager`` (the
    paged cache sized by transformers from free memory and workload hints, its CUDA-graph
    warm-up, a flash attention implementation when one is installed) and the manager's
    ``add_request``, which, unlike ``generate_batch``, takes each request's
    ``max_new_tokens``. Where the manager cannot, the requests are grouped by output
    length, one ``generate_batch`` call per group (the method says so). The first
    ``warmup_requests`` requests run once untimed first, as the engine's do. When the
    manager cannot start with the attention transformers picks (a flash kernel that does
    not load), it is retried once with sdpa, and the method says why.
    ``cb_options``: ``ContinuousBatchingConfig`` fields to set (``num_blocks``,
    ``max_batch_tokens``, ``block_size``, which is ``page_size`` since 5.17; names the
    installed version lacks are dropped). ``BaselineUnavailable`` when transformers has
    no continuous batching or it cannot start."""
    import inspect

    import transformers

    version = transformers.__version__
    manager_cm = getattr(hf, "continuous_batching_context_manager", None)
    if manager_cm is None and getattr(hf, "generate_batch", None) is None:
        raise BaselineUnavailable(f"transformers {version} has no continuous batching "
                                  "(generate_batch); install transformers >= 5")
    gen_cfg = transformers.GenerationConfig(
        max_new_tokens=max(n for _, n in requests), do_sample=False, eos_token_id=-1)
    if manager_cm is None or "max_new_tokens" not in inspect.signature(
            _manager_add_request()).parameters:
        return _generate_batch_by_length(hf, requests, gen_cfg, _cb_config(cb_options or {}),
                                         version)
    method = "continuous batching (generate_batch's manager, per-request max_new_tokens)"
    first_error: Exception | None = None
    for sdpa in (False, True):
        kwargs: dict[str, object] = {"generation_config": gen_cfg, "warmup": True}
        cb_config = _cb_config(cb_options or {}, no_flash=sdpa)
        if cb_config is not None:
            kwargs["continuous_batching_config"] = cb_config
        hints = _workload_hints(requests)
        if hints is not None and "workload_hints" in inspect.signature(manager_cm).parameters:
            kwargs["workload_hints"] = hints
        original = getattr(hf.config, "_attn_implementation", None)
        if sdpa and not _has_cb_field("auto_switch_to_flash"):
            hf.set_attn_implementation("paged|sdpa")  # 5.17: a paged attention is kept
        started = False
        try:
            with manager_cm(**kwargs) as manager:
                started = True
                attention = str(getattr(hf.config, "_attn_implementation", "?"))
                _cb_run(manager, requests[:warmup_requests], "w", timeout_s)
                _sync(hf.device)
                t0 = time.perf_counter()
                outputs = _cb_run(manager, requests, "r", timeout_s)
                _sync(hf.device)
                seconds = time.perf_counter() - t0
        except Exception as exc:
            if started:
                raise
            if sdpa:
                raise BaselineUnavailable(f"transformers {version} continuous batching did "
                                          f"not start: {first_error or exc}") from exc
            first_error = exc
            continue
        finally:
            if original is not None and getattr(hf.config, "_attn_implementation",
                                                None) != original:
                hf.set_attn_implementation(original)
        if first_error is not None:
            method += f"; retried with sdpa after: {str(first_error).splitlines()[0][:120]}"
        return ContinuousResult(seconds, sum(len(o) for o in outputs), method, attention,
                                version, outputs)
    raise AssertionError("unreachable")


def _manager_add_request():
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    return ContinuousBatchingManager.add_request


def _cb_fields() -> set[str] | None:
    """The fields of transformers' ``ContinuousBatchingConfig`` (``None``: no such class)."""
    import dataclasses

    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError:
        return None
    if not dataclasses.is_dataclass(ContinuousBatchingConfig):
        return set()
    return {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}


def _has_cb_field(name: str) -> bool:
    return name in (_cb_fields() or set())


def _cb_config(options: dict[str, int], no_flash: bool = False):
    """A ``ContinuousBatchingConfig`` with the ``options`` this version knows (its paged
    cache's block size is ``page_size`` since 5.17's ``block_size``) and, ``no_flash``,
    no switch to a flash attention; ``None`` when transformers has no such class."""
    names = _cb_fields()
    if names is None:
        return None
    from transformers.generation import ContinuousBatchingConfig

    kwargs: dict[str, object] = dict(options)
    if "block_size" in kwargs and "page_size" in names:
        kwargs["page_size"] = kwargs.pop("block_size")
    if no_flash:
        kwargs["auto_switch_to_flash"] = False
    return ContinuousBatchingConfig(**{k: v for k, v in kwargs.items() if k in names})


def _workload_hints(requests: list[tuple[list[int], int]]):
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        return None
    return WorkloadHints(max_prompt_length=max(len(p) for p, _ in requests),
                         max_generated_length=max(n for _, n in requests),
                         num_requests=len(requests))


def _cb_run(manager, requests: list[tuple[list[int], int]], tag: str,
            timeout_s: float) -> list[list[int]]:
    """Submit every request to a running manager and wait for all; the generated ids of
    each request in order. ``RuntimeError`` naming a failed or missing request."""
    ids = [f"{tag}{i}" for i in range(len(requests))]
    for rid, (prompt, n) in zip(ids, requests):
        manager.add_request(list(prompt), request_id=rid, max_new_tokens=n, eos_token_id=-1)
    done: dict[str, list[int]] = {}
    last = time.perf_counter()
    while len(done) < len(ids):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped with "
                                   f"{len(ids) - len(done)} requests unfinished")
            if time.perf_counter() - last > timeout_s:
                raise RuntimeError(f"transformers' continuous batching gave no result for "
                                   f"{timeout_s:.0f} s")
            continue
        last = time.perf_counter()
        if result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"transformers request {result.request_id} failed: "
                                   f"{result.error}")
            done[result.request_id] = list(result.generated_tokens)
    return [done[rid] for rid in ids]


def _generate_batch_by_length(hf, requests: list[tuple[list[int], int]], gen_cfg,
                              cb_config, version: str) -> ContinuousResult:
    """``generate_batch`` once per distinct output length (one ``max_new_tokens`` each),
    for a transformers whose manager takes no per-request length."""
    groups: dict[int, list[int]] = {}
    for i, (_, n) in enumerate(requests):
        groups.setdefault(n, []).append(i)
    kwargs = {} if cb_config is None else {"continuous_batching_config": cb_config}
    outputs: list[list[int]] = [[] for _ in requests]
    attention = str(getattr(hf.config, "_attn_implementation", "?"))
    hf.generate_batch(inputs=[list(requests[0][0])], generation_config=gen_cfg,
                      max_new_tokens=requests[0][1], **kwargs)  # untimed warm-up
    _sync(hf.device)
    t0 = time.perf_counter()
    for n, members in sorted(groups.items()):
        results = hf.generate_batch(inputs=[list(requests[i][0]) for i in members],
                                    generation_config=gen_cfg, max_new_tokens=n, **kwargs)
        for i, result in zip(members, results.values()):
            outputs[i] = list(result.generated_tokens)
    _sync(hf.device)
    seconds = time.perf_counter() - t0
    return ContinuousResult(seconds, sum(len(o) for o in outputs),
                            f"generate_batch per output length ({len(groups)} calls)",
                            attention, version, outputs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_decode(args: argparse.Namespace, out_dir: Path | None) -> None:
    """Where one decode step's time goes, per model: host ms per step (synchronised),
    GPU busy time and kernel count per step (torch.profiler), the top ops by host and by
    device time, and the top Python functions (cProfile). Decode steps are taken once
    every request of the workload is past its prefill; ``--cuda-graphs off`` profiles the
    eager path. Full tables go to ``out_dir`` when given."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    reqs = _load_requests(args)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    for name in args.models:
        model, _ = _random_model(name, dev)
        vocab = model.config.vocab_size
        ids = [([t % vocab for t in p], n) for p, n in reqs]
        engine = _bench_engine(model, name, graphs)
        capture_s = _capture(engine)
        _run_engine(engine, ids[:16])
        for i, (prompt, _) in enumerate(ids):
            engine.add_request(f"p{i}", prompt, _params(10_000))
        sched = engine.scheduler
        while sched.waiting or sched.loading or any(s.in_prefill for s in sched.running):
            engine.step()
        batch = len(sched.running)
        ctx = sum(s.num_tokens for s in sched.running) / max(1, batch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
        host_ms = (time.perf_counter() - t0) / 20 * 1e3
        steps = 10
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        dev_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(e.self_device_time_total for e in dev_events) / steps / 1e3
        kernels = sum(e.count for e in dev_events) / steps
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        pr.disable()
        py = io.StringIO()
        pstats.Stats(pr, stream=py).sort_stats("tottime").print_stats(15)
        by_host = events.table(sort_by="self_cpu_time_total", row_limit=15)
        by_dev = events.table(sort_by="self_device_time_total", row_limit=15)
        runner = getattr(engine, "_runner", None)
        mode = "eager" if runner is None or not runner.graph_steps else "graphs"
        captured = getattr(runner, "captured", [])
        print(f"\n[{name}] decode B={batch} mean context {ctx:.0f} ({mode}): host "
              f"{host_ms:.2f} ms/step, GPU busy {busy_ms:.2f} ms/step, {kernels:.0f} "
              f"kernels/step; {len(captured)} graphs captured in {capture_s:.2f} s")
        print(by_dev)
        print("\n".join(py.getvalue().splitlines()[:40]))
        if out_dir is not None:
            (out_dir / f"profile_{name}_{mode}.txt").write_text(
                f"{by_host}\n\n{by_dev}\n\n{py.getvalue()}")
        engine.store.close()
        del engine, model
        torch.cuda.empty_cache()


def _capture(engine) -> float:
    """Capture every decode graph up front (an engine without graphs does nothing);
    returns the seconds it took."""
    t0 = time.perf_counter()
    runner = getattr(engine, "runner", None)
    if runner is not None:
        runner.capture()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


MODEL_NAMES = ("smollm2", "llama3-8b")


def model_list(text: str) -> list[str]:
    """``--models``: a comma-separated list of :data:`MODEL_NAMES` (the CLI's list
    vocabulary, as ``--configs`` and ``--prefixes``)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in MODEL_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown model {', '.join(bad) or text!r}: give a comma-separated list of "
            f"{', '.join(MODEL_NAMES)}")
    return names


def _params(max_tokens: int):
    from engine.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def _run_engine(engine, ids: list[tuple[list[int], int]]) -> float:
    """Seconds to run every request to its output length (EOS ignored)."""
    for i, (prompt, n) in enumerate(ids):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", prompt, _params(n))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in engine.run():
        pass
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _copy_weights(model, hf) -> None:
    """Copy our fused weights into a transformers Llama model (same values)."""
    c = model.config
    q = c.num_heads * c.head_dim
    kv = c.num_kv_heads * c.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.embed_tokens.weight)
        hf.model.norm.weight.copy_(model.norm.weight)
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        hf.lm_head.weight.copy_(head)
        for ours, theirs in zip(model.layers, hf.model.layers):
            w = ours.self_attn.qkv_proj.weight
            theirs.self_attn.q_proj.weight.copy_(w[:q])
            theirs.self_attn.k_proj.weight.copy_(w[q:q + kv])
            theirs.self_attn.v_proj.weight.copy_(w[q + kv:])
            theirs.self_attn.o_proj.weight.copy_(ours.self_attn.o_proj.weight)
            gu = ours.mlp.gate_up_proj.weight
            half = gu.shape[0] // 2
            theirs.mlp.gate_proj.weight.copy_(gu[:half])
            theirs.mlp.up_proj.weight.copy_(gu[half:])
            theirs.mlp.down_proj.weight.copy_(ours.mlp.down_proj.weight)
            theirs.input_layernorm.weight.copy_(ours.input_layernorm.weight)
            theirs.post_attention_layernorm.weight.copy_(ours.post_attention_layernorm.weight)
        hf.model.rotary_emb.to(hf.device)


FIRST_TURNS = ("Name three colors.", "Which one is the darkest?")
"""The first-turn bench's two user turns (after the chat demo's default system prompt)."""
_CHILD_TAG = "first-turn-result "


def first_turn_once(spec: dict) -> dict:
    """In this process (started for it): build the chat demo's engine (``kvstore chat``'s
    flags and defaults, SmolLM2 with its real weights, a fresh disk tier under
    ``spec["home"]``), then run two chat turns as the demo does. Returns the seconds to
    import the engine and to construct it (ready: weights loaded, tiers open, warmed up
    when ``spec["warmup"]``; forced on CPU too), the warm-up's own seconds, and per
    turn the TTFT the demo prints, the prompt and cached tokens and the decode rate."""
    import io

    t0 = time.perf_counter()
    from engine.chat import DEFAULT_SYSTEM, ChatSession
    from engine.chat import build_parser as chat_parser
    from engine.llm import LLM
    from engine.options import engine_kwargs
    from engine.sampling import SamplingParams

    imported = time.perf_counter() - t0
    home = Path(spec["home"])
    argv = ["--disk", str(home / "disk")]
    for flag in ("device", "dtype", "model_cache_dir"):
        if spec.get(flag):
            argv += [f"--{flag.replace('_', '-')}", str(spec[flag])]
    if not spec["warmup"]:
        argv.append("--no-warmup")
    args = chat_parser().parse_args(argv)
    kwargs = engine_kwargs(args)
    if spec["warmup"]:
        kwargs["warmup"] = True
    t1 = time.perf_counter()
    llm = LLM(args.model, **kwargs)
    if llm.model.device.type == "cuda":
        torch.cuda.synchronize(llm.model.device)
    construct = time.perf_counter() - t1
    try:
        session = ChatSession(llm, DEFAULT_SYSTEM, home / "session.json",
                              SamplingParams(max_tokens=spec["max_tokens"]), io.StringIO())
        turns = []
        for text in FIRST_TURNS:
            fig = session.ask(text, echo=False)
            turns.append({k: fig[k] for k in ("prompt_tokens", "cached_tokens",
                                               "output_tokens", "tokens_per_s", "ttft_s")})
        report = llm.warmup_report
        return {"device": str(llm.model.device),
                "dtype": str(llm.model.dtype).removeprefix("torch."),
                "import_s": imported, "construct_s": construct,
                "warmup_s": None if report is None else report.seconds,
                "warmup": None if report is None else report.describe(), "turns": turns}
    finally:
        llm.close()


def bench_first_turn(args: argparse.Namespace) -> list[dict]:
    """The first chat turn's TTFT after start, with and without the start-up warm-up:
    each run is a fresh process (:func:`first_turn_once`). On CUDA twice: with an empty
    Triton kernel cache (``TRITON_CACHE_DIR`` a new directory: a fresh machine, every
    kernel compiled) and with a cache that a previous start filled (the usual restart).
    Returns one row per (kernel cache, warm-up) with the median of ``--first-turn-runs``
    runs; prints progress."""
    import os
    import shutil
    import statistics
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    caches = ["empty", "filled"] if device.startswith("cuda") else ["-"]
    work = Path(tempfile.mkdtemp(prefix="kvstore-first-turn-"))
    rows = []
    try:
        filled = work / "triton-filled"

        def child(warm: bool, cache: str, tag: str) -> dict:
            spec = {"home": str(work / tag), "warmup": warm, "device": args.device,
                    "dtype": args.dtype, "model_cache_dir": args.model_cache_dir,
                    "max_tokens": args.first_turn_max_tokens}
            env = dict(os.environ)
            if cache == "empty":
                env["TRITON_CACHE_DIR"] = str(work / tag / "triton")
            elif cache == "filled":
                env["TRITON_CACHE_DIR"] = str(filled)
            proc = subprocess.run([sys.executable, "-m", "bench.engine_bench",
                                   "--first-turn-child", json.dumps(spec)],
                                  cwd=root, env=env, capture_output=True, text=True,
                                  timeout=1800)
            found = [line for line in proc.stdout.splitlines() if line.startswith(_CHILD_TAG)]
            if proc.returncode != 0 or not found:
                raise RuntimeError(f"first-turn run failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
            return json.loads(found[-1][len(_CHILD_TAG):])

        if "filled" in caches:  # one start that compiles every kernel into the cache
            child(True, "filled", "prime")
        n = 0
        for cache in caches:
            for warm in (True, False):
                runs = []
                for _ in range(args.first_turn_runs):
                    n += 1
                    runs.append(child(warm, cache, f"run{n}"))
                    print(f"  first turn: kernel cache {cache}, warm-up {'on' if warm else 'off'}: "
                          f"TTFT {runs[-1]['turns'][0]['ttft_s'] * 1e3:.0f} ms", flush=True)

                def med(get, runs=runs) -> float | None:
                    values = [v for v in map(get, runs) if v is not None]
                    return statistics.median(values) if values else None

                rows.append({
                    "kernel_cache": cache, "warmup": warm, "runs": runs,
                    "device": runs[0]["device"], "dtype": runs[0]["dtype"],
                    "import_s": med(lambda r: r["import_s"]),
                    "construct_s": med(lambda r: r["construct_s"]),
                    "warmup_s": med(lambda r: r["warmup_s"]),
                    "ttft_ms": [med(lambda r, i=i: r["turns"][i]["ttft_s"] * 1e3)
                                for i in range(len(FIRST_TURNS))],
                    "tokens_per_s": [med(lambda r, i=i: r["turns"][i]["tokens_per_s"])
                                     for i in range(len(FIRST_TURNS))],
                    "prompt_tokens": [t["prompt_tokens"] for t in runs[0]["turns"]],
                    "cached_tokens": [t["cached_tokens"] for t in runs[0]["turns"]]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def print_first_turn(rows: list[dict], runs: int) -> None:
    first = rows[0]
    print(f"\nFirst chat turn after start: kvstore chat's engine (SmolLM2-135M-Instruct, real "
          f"weights) on {first['device']}, {first['dtype']}; a fresh process per run, median "
          f"of {runs}; turn 1: prompt {first['prompt_tokens'][0]} tokens, turn 2: prompt "
          f"{first['prompt_tokens'][1]} tokens of which {first['cached_tokens'][1]} cached")
    print(f"{'kernel cache':<13} {'warm-up':<8} {'import s':>9} {'start s':>8} "
          f"{'warm-up s':>10} {'TTFT 1 ms':>10} {'TTFT 2 ms':>10} {'tok/s 1':>8} "
          f"{'tok/s 2':>8}")
    for r in rows:
        print(f"{r['kernel_cache']:<13} {'on' if r['warmup'] else 'off':<8} "
              f"{r['import_s']:9.2f} {r['construct_s']:8.2f} {_num(r['warmup_s'], '.2f'):>10} "
              f"{_num(r['ttft_ms'][0], '.1f'):>10} {_num(r['ttft_ms'][1], '.1f'):>10} "
              f"{_num(r['tokens_per_s'][0], '.0f'):>8} {_num(r['tokens_per_s'][1], '.0f'):>8}")
    print("start s: constructing the engine until ready (weights, tiers, warm-up); TTFT as "
          "the chat demo prints it (request queued to first token).")


def _num(value: float | None, fmt: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore bench engine",
        description="Engine TTFT, cold vs cached from each tier; (on CUDA) offline "
                    "throughput next to transformers generate and generate_batch in the "
                    "same run; the first chat turn's TTFT after start, with and without "
                    "the warm-up.")
    add_device_argument(p)
    add_dtype_argument(p, "TTFT part: weights and KV dtype (default: bfloat16 on CUDA, "
                          "float32 on CPU)")
    p.add_argument("--repeat", type=int, default=3,
                   help="TTFT runs per row (median; default: %(default)s)")
    p.add_argument("--throughput", action="store_true",
                   help="also run the throughput comparison (needs CUDA)")
    p.add_argument("--no-ttft", action="store_true", help="skip the TTFT part")
    p.add_argument("--num-requests", type=int, default=256,
                   help="throughput: requests (default: %(default)s)")
    p.add_argument("--requests-file", default=None,
                   help="JSON list of {prompt: [ids], output_len: n} instead of ShareGPT "
                        "(default: none)")
    p.add_argument("--save-requests", default=None, metavar="FILE",
                   help="write the ShareGPT-like requests to FILE (for a machine without "
                        "the dataset) and exit (default: none)")
    p.add_argument("--models", type=model_list, default=["smollm2", "llama3-8b"],
                   metavar="M1,M2",
                   help="--throughput and --profile: models, comma-separated, of "
                        f"{', '.join(MODEL_NAMES)} (default: smollm2,llama3-8b)")
    p.add_argument("--hf-batch", type=int, default=64,
                   help="transformers static batch size (default: %(default)s)")
    p.add_argument("--no-hf", action="store_true",
                   help="throughput: skip the transformers baseline")
    p.add_argument("--no-hf-cb", action="store_true",
                   help="throughput: skip transformers' continuous batching (generate_batch)")
    p.add_argument("--hf-cb-max-batch-tokens", type=int, default=None, metavar="N",
                   help="throughput: transformers continuous batching's token budget per "
                        "step (default: transformers' own choice)")
    p.add_argument("--hf-cb-num-blocks", type=int, default=None, metavar="N",
                   help="throughput: blocks of transformers continuous batching's paged "
                        "cache (default: transformers' own choice, from free GPU memory)")
    p.add_argument("--compare-eager", action="store_true",
                   help="throughput: also run the engine with CUDA graphs off")
    p.add_argument("--first-turn", action="store_true",
                   help="also measure the first chat turn's TTFT after start, with and "
                        "without the start-up warm-up (fresh processes; any device)")
    p.add_argument("--first-turn-runs", type=int, default=1, metavar="N",
                   help="--first-turn: fresh processes per row (median; default: "
                        "%(default)s)")
    p.add_argument("--first-turn-max-tokens", type=int, default=64, metavar="N",
                   help="--first-turn: reply length limit of each turn (default: "
                        "%(default)s)")
    p.add_argument("--first-turn-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true",
                   help="profile decode steps (host time, GPU busy time, kernels, top ops "
                        "and Python functions) instead of the other parts (needs CUDA)")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="--profile: the engine's CUDA-graph switch (default: %(default)s)")
    add_out_argument(p, "engine", "--profile's full tables")
    p.add_argument("--model-cache-dir", default=None, help=argparse.SUPPRESS)
    ttft_bench.add_arguments(p)
    p.epilog = SIZE_HELP + "."
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.first_turn_child is not None:
        result = first_turn_once(json.loads(args.first_turn_child))
        print(_CHILD_TAG + json.dumps(result), flush=True)
        return 0
    if not 1 <= args.first_turn_runs <= 20 or args.first_turn_max_tokens < 1:
        p.error("--first-turn-runs must be 1..20 and --first-turn-max-tokens >= 1")
    if not 1 <= args.repeat <= 20:
        p.error("--repeat must be 1..20")
    ttft_bench.finish_arguments(p, args)
    if args.save_requests:
        from engine.loader import resolve_model

        smol = resolve_model("smollm2", cache_dir=args.model_cache_dir)
        reqs = sharegpt_requests(args.num_requests, smol.tokenizer, 1024, 256)
        Path(args.save_requests).write_text(json.dumps(
            [{"prompt": p, "output_len": n} for p, n in reqs]))
        print(f"wrote {len(reqs)} requests to {args.save_requests}")
        return 0
    if (args.throughput or args.profile) and not torch.cuda.is_available():
        p.error("--throughput and --profile need a CUDA GPU")
    if args.profile:
        profile_decode(args, Path(args.out))
        return 0
    if not args.no_ttft:
        ttft_bench.run(args, _random_model)
    if args.first_turn:
        first = bench_first_turn(args)
        print_first_turn(first, args.first_turn_runs)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "first_turn.json").write_text(json.dumps(first, indent=1))
    if args.throughput:
        print_throughput(bench_throughput(args), args)
    return 0


def print_throughput(rows: list[ThroughputRow], args: argparse.Namespace) -> None:
    """The throughput table: output tokens/s of the engine and of both transformers
    baselines, and the engine's ratio to each."""
    print(f"\nOffline throughput, {args.num_requests} ShareGPT-like requests, bf16, same "
          "weights and requests for all (output tokens/s)")
    print(f"{'model':<12} {'engine':>9} {'eager':>9} {'hf generate':>12} {'hf batch':>9} "
          f"{'x generate':>11} {'x batch':>8}")
    for r in rows:
        static = None if r.hf_static is None else r.engine / r.hf_static
        cb = None if r.hf_cb is None else r.engine / r.hf_cb
        print(f"{r.model:<12} {r.engine:9.0f} {_num(r.eager):>9} {_num(r.hf_static):>12} "
              f"{_num(r.hf_cb):>9} {_num(static, '.1f', 'x'):>11} {_num(cb, '.1f', 'x'):>8}")
    if not args.no_hf:
        print(f"hf generate: transformers generate, static batches of {args.hf_batch} "
              "(left padding; a batch runs to its longest reply).")
        for r in rows:
            if r.hf_cb_note:
                print(f"hf batch ({r.model}): {r.hf_cb_note}")


if __name__ == "__main__":
    sys.exit(main())

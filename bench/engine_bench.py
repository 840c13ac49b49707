"""Engine benchmark: TTFT cold vs cached from each tier, and offline throughput.

Run: ``python -m kvstore bench engine`` (``--help``). Two parts:

1. **TTFT** (any device; :mod:`bench.ttft_bench`): a named model shape with random
   weights (Llama-3-8B on CUDA, SmolLM2 on CPU) answers a question after shared
   prefixes of several lengths, cold and cached from each tier (GPU, host, disk, Redis
   with ``--redis``), with the load GB/s next to the raw pinned copy and the raw tier
   read measured in the same run, and the cost model's decision.
2. **Throughput** (CUDA only; ``--throughput``): ShareGPT-like requests (prompt and reply
   lengths from the real ShareGPT conversations, or from ``--requests-file``) through
   the engine (continuous batching, paged attention) next to Hugging Face transformers
   ``generate`` with static batching on the same model and GPU, in the same run, for
   SmolLM2 and a random-weight Llama-3-8B-shaped model in bf16. ``--compare-eager`` adds
   the engine with CUDA graphs off.

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


def bench_throughput(args: argparse.Namespace) -> list[tuple[str, float, float | None,
                                                             float | None]]:
    """Rows of (model, engine output tok/s, engine with CUDA graphs off or ``None``,
    transformers output tok/s or ``None``)."""
    dev = torch.device("cuda")
    reqs = _load_requests(args)
    rows = []
    for name in args.models:
        model, cfg_dict = _random_model(name, dev)
        vocab = model.config.vocab_size
        ids = [([t % vocab for t in p], n) for p, n in reqs]
        n_out = sum(n for _, n in ids)
        modes: list[bool | None] = [None, False] if args.compare_eager else [None]
        rates: list[float | None] = []
        for graphs in modes:
            engine = _bench_engine(model, name, graphs)
            _capture(engine)
            _run_engine(engine, ids[:16])  # warm-up (kernel compilation, allocator)
            rates.append(n_out / _run_engine(engine, ids))
            engine.store.close()
            del engine
            torch.cuda.empty_cache()
        eager_rate = rates[1] if len(rates) > 1 else None
        if args.no_hf:
            rows.append((name, rates[0], eager_rate, None))
            del model
            torch.cuda.empty_cache()
            continue
        rows.append((name, rates[0], eager_rate, n_out / _run_hf(model, cfg_dict, ids, args, dev)))
    return rows


def _run_hf(model, cfg_dict: dict, ids: list[tuple[list[int], int]], args: argparse.Namespace,
            dev: torch.device) -> float:
    """Seconds for transformers ``generate`` (same weights, static batches of
    ``--hf-batch`` with left padding) to produce every request's output length."""
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items()
                                                  if k != "architectures"})
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    hf = hf.to_empty(device=dev)
    _copy_weights(model, hf)
    del model
    torch.cuda.empty_cache()
    hf.eval()
    t0 = time.perf_counter()
    for start in range(0, len(ids), args.hf_batch):
        chunk = ids[start:start + args.hf_batch]
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
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del hf
    torch.cuda.empty_cache()
    return elapsed


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


def _num(value: float | None, fmt: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore bench engine",
        description="Engine TTFT, cold vs cached from each tier, and (on CUDA) offline "
                    "throughput next to transformers generate in the same run.")
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
    p.add_argument("--models", nargs="+", default=["smollm2", "llama3-8b"],
                   choices=["smollm2", "llama3-8b"],
                   help="throughput: models (default: smollm2 llama3-8b)")
    p.add_argument("--hf-batch", type=int, default=64,
                   help="transformers static batch size (default: %(default)s)")
    p.add_argument("--no-hf", action="store_true",
                   help="throughput: skip the transformers baseline")
    p.add_argument("--compare-eager", action="store_true",
                   help="throughput: also run the engine with CUDA graphs off")
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
    if args.throughput:
        rows2 = bench_throughput(args)
        print(f"\nOffline throughput, {args.num_requests} ShareGPT-like requests, bf16 "
              f"(output tokens/s; transformers: static batches of {args.hf_batch})")
        print(f"{'model':<12} {'engine':>10} {'eager':>10} {'transformers':>13} {'ratio':>7}")
        for name, ours, eager, theirs in rows2:
            print(f"{name:<12} {ours:10.0f} {_num(eager):>10} {_num(theirs):>13} "
                  f"{_num(None if theirs is None else ours / theirs, '.1f', 'x'):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

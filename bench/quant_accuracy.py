"""Accuracy of compressed lower-tier KV: exact KV against KV that went through a tier format.

Run: ``python -m bench.quant_accuracy`` (``--help``). On the real SmolLM2-135M-Instruct
over real ShareGPT conversations (chat template applied; turns up to the last user
message), for each prompt:

1. the prompt's prefix (all full blocks but the last ``--suffix`` tokens) is prefilled
   into the paged KV pool;
2. a copy of the pool has those prefix blocks replaced by what a tier in the format gives
   back (:func:`tiers.quant.round_trip`: quantize, dequantize in the pool) - exactly what
   a prefix hit from a compressed host, disk or Redis tier looks like;
3. the suffix is computed over each pool: logits at every suffix position, compared by
   next-token top-1 agreement and KL(exact || compressed) of the softmax distributions;
4. from each pool, ``--greedy-tokens`` tokens are generated greedily and compared: the
   share of prompts whose outputs are identical, and the mean number of tokens matching
   before the first difference.

The baseline row ``bfloat16`` (on an fp32 model) stores the prefix KV in bf16, the exact
format of a bf16 deployment: the noise floor every row should be judged against. The
issue's target: top-1 agreement >= 99%.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.batch import AttentionBatch, build_batch
from kvstore.args import add_device_argument, add_dtype_argument
from tiers import quant


@dataclass(frozen=True)
class Prompt:
    """Token ids of one prompt and where its cached prefix ends (tokens, whole blocks)."""

    ids: list[int]
    prefix: int


@dataclass
class FormatResult:
    """Accumulated comparison of one format against exact KV."""

    kv_format: str
    positions: int = 0
    top1_agree: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    prompts: int = 0
    greedy_identical: int = 0
    greedy_prefix_sum: int = 0

    @property
    def top1(self) -> float:
        return self.top1_agree / max(1, self.positions)

    @property
    def kl_mean(self) -> float:
        return self.kl_sum / max(1, self.positions)


def sharegpt_prompts(tokenizer, n: int, block_size: int, suffix: int, min_prefix: int,
                     max_tokens: int) -> list[Prompt]:
    """``n`` prompts: ShareGPT conversations up to a user turn, chat-templated, of
    ``min_prefix + suffix`` to ``max_tokens`` tokens. The prefix is the whole blocks
    before the last ``suffix`` tokens."""
    from bench.workloads import load_sharegpt_records, sharegpt_turns

    out: list[Prompt] = []
    for rec in load_sharegpt_records():
        turns = sharegpt_turns(rec)
        if not turns:
            continue
        messages: list[dict[str, str]] = []
        for user, reply in turns[:-1]:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": turns[-1][0]})
        while messages:
            ids = tokenizer.encode_chat(messages)
            if len(ids) <= max_tokens:
                break
            messages = messages[2:]  # drop the oldest exchange
        if not messages:
            continue
        prefix = (len(ids) - suffix) // block_size * block_size
        if prefix >= min_prefix:
            out.append(Prompt(ids, prefix))
        if len(out) == n:
            break
    return out


def _forward(model, pool: torch.Tensor, ids: Sequence[Sequence[int]], start: int,
             tables: Sequence[list[int]], block_size: int, all_logits: bool) -> torch.Tensor:
    """Logits of ``V`` sequences that share positions: sequence ``v`` runs tokens
    ``ids[v]`` at positions ``start..`` over the blocks ``tables[v]`` of ``pool``. Rows are
    every query (``all_logits``: ``[V x n, vocab]``, sequence-major) or each one's last."""
    dev = model.device
    n = len(ids[0])
    v = len(ids)
    batch, positions = build_batch(tables, [n] * v, [start + n] * v, block_size, dev)
    if all_logits:
        batch = AttentionBatch(batch.slot_mapping, batch.block_tables, batch.query_start_loc,
                               batch.seq_lens, torch.arange(n * v, device=dev))
    flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.int64, device=dev)
    return model(flat, positions, batch, pool)


def _greedy(model, pool: torch.Tensor, first: list[int], start: int,
            tables: Sequence[list[int]], block_size: int, n: int) -> list[list[int]]:
    """``n`` greedy tokens of each sequence; ``first[v]`` is the token sampled after
    position ``start - 1``."""
    out = [[t] for t in first]
    pos = start
    while len(out[0]) < n:
        logits = _forward(model, pool, [[o[-1]] for o in out], pos, tables, block_size, False)
        for o, t in zip(out, logits.argmax(-1).tolist()):
            o.append(int(t))
        pos += 1
    return out


def evaluate(model, prompts: Sequence[Prompt], formats: Sequence[str], block_size: int,
             greedy_tokens: int) -> list[FormatResult]:
    """Compare every format with exact KV on every prompt (see the module docstring).

    Exact and every format run as one batch: sequence 0 over the exact prefix blocks,
    sequence ``1 + i`` over a copy of them in format ``formats[i]``."""
    cfg = model.config
    dev = model.device
    longest = max(len(p.ids) for p in prompts) + greedy_tokens
    per_seq = -(-longest // block_size)
    variants = 1 + len(formats)
    shape = (variants * per_seq, cfg.num_layers, 2, block_size, cfg.num_kv_heads,
             cfg.head_dim)
    pool = torch.zeros(shape, dtype=model.dtype, device=dev)
    tables = [list(range(v * per_seq, (v + 1) * per_seq)) for v in range(variants)]
    results = [FormatResult(f) for f in formats]
    for p in tqdm(prompts, desc="prompts", unit="prompt"):
        nb = p.prefix // block_size
        prefix_ids, suffix_ids = p.ids[:p.prefix], p.ids[p.prefix:]
        _forward(model, pool, [prefix_ids], 0, tables[:1], block_size, False)
        exact = pool[:nb]
        for i, fmt in enumerate(formats):
            at = tables[1 + i][0]
            if fmt == "bfloat16":
                pool[at:at + nb] = exact.to(torch.bfloat16).to(model.dtype)
            else:
                pool[at:at + nb] = exact
                quant.round_trip(pool, fmt, list(range(at, at + nb)))
        s = len(suffix_ids)
        logits = _forward(model, pool, [suffix_ids] * variants, p.prefix, tables, block_size,
                          True).view(variants, s, -1)
        logp = F.log_softmax(logits, dim=-1)
        firsts = logits[:, -1].argmax(-1).tolist()
        outs = _greedy(model, pool, firsts, len(p.ids), tables, block_size, greedy_tokens)
        ref_top1 = logits[0].argmax(-1)
        for i, r in enumerate(results):
            got = logp[1 + i]
            kl = (logp[0].exp() * (logp[0] - got)).sum(dim=-1).clamp_min(0)
            r.positions += s
            r.top1_agree += int((ref_top1 == got.argmax(-1)).sum())
            r.kl_sum += float(kl.sum())
            r.kl_max = max(r.kl_max, float(kl.max()))
            same = next((k for k, (a, b) in enumerate(zip(outs[0], outs[1 + i])) if a != b),
                        greedy_tokens)
            r.prompts += 1
            r.greedy_identical += same == greedy_tokens
            r.greedy_prefix_sum += same
    return results


def format_table(results: Sequence[FormatResult], greedy_tokens: int) -> str:
    lines = [f"{'prefix KV format':<18} {'positions':>9} {'top-1 agree':>12} {'mean KL':>10} "
             f"{'max KL':>9} {'greedy identical':>17} {'tokens before diverging':>24}"]
    for r in results:
        lines.append(
            f"{r.kv_format:<18} {r.positions:>9,} {r.top1:>11.2%} {r.kl_mean:>10.2e} "
            f"{r.kl_max:>9.2e} {r.greedy_identical:>8}/{r.prompts:<8} "
            f"{r.greedy_prefix_sum / max(1, r.prompts):>16.1f} / {greedy_tokens}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.quant_accuracy",
        description="Next-token top-1 agreement, KL divergence and greedy agreement of "
                    "SmolLM2 with a prefix's KV from an int8 / fp8 tier against exact KV, "
                    "over real ShareGPT prompts.")
    p.add_argument("--prompts", type=int, default=64, help="ShareGPT prompts (default: 64)")
    p.add_argument("--suffix", type=int, default=32,
                   help="prompt tokens computed after the cached prefix; every one is a "
                        "compared position (default: 32)")
    p.add_argument("--min-prefix", type=int, default=128,
                   help="shortest cached prefix, tokens (default: 128)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="longest prompt, tokens (older turns dropped; default: 1024)")
    p.add_argument("--greedy-tokens", type=int, default=32,
                   help="greedy tokens compared per prompt (default: 32)")
    p.add_argument("--formats", default="int8,fp8",
                   help="comma-separated formats (default: int8,fp8)")
    add_device_argument(p)
    add_dtype_argument(p, "model and exact KV dtype (default: bfloat16 on CUDA, float32 on "
                          "CPU)")
    p.add_argument("--model-cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in quant.COMPRESSED_FORMATS]
    if bad or not formats:
        p.error(f"unknown format(s) {bad or args.formats!r}; choose from "
                f"{', '.join(quant.COMPRESSED_FORMATS)}")
    if min(args.prompts, args.suffix, args.greedy_tokens, args.min_prefix) < 1:
        p.error("--prompts, --suffix, --greedy-tokens and --min-prefix must be >= 1")
    from engine.loader import resolve_model
    from engine.model import CausalLM

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    loaded = resolve_model("smollm2", cache_dir=args.model_cache_dir, dtype=dtype, device=dev)
    model = CausalLM.from_loaded(loaded, device=dev)
    if model.dtype == torch.float32:
        formats = ["bfloat16"] + formats
    block_size = 16
    t0 = time.perf_counter()
    prompts = sharegpt_prompts(loaded.tokenizer, args.prompts, block_size, args.suffix,
                               args.min_prefix, args.max_tokens)
    if not prompts:
        print("quant_accuracy: no ShareGPT prompt is long enough; lower --min-prefix",
              file=sys.stderr)
        return 2
    lengths = sorted(len(x.ids) for x in prompts)
    print(f"SmolLM2-135M-Instruct ({loaded.name}), {dtype} on {dev}; {len(prompts)} ShareGPT "
          f"prompts of {lengths[0]}-{lengths[-1]} tokens (median "
          f"{lengths[len(lengths) // 2]}); prefix KV from the format, {args.suffix} suffix "
          f"tokens compared, {args.greedy_tokens} greedy tokens", flush=True)
    results = evaluate(model, prompts, formats, block_size, args.greedy_tokens)
    print()
    print(format_table(results, args.greedy_tokens))
    for r in results:
        if r.kv_format in quant.COMPRESSED_FORMATS:
            verdict = "meets" if r.top1 >= 0.99 else "MISSES"
            print(f"{r.kv_format}: top-1 agreement {r.top1:.2%} {verdict} the >= 99% target"
                  + ("" if math.isfinite(r.kl_mean) else " (KL not finite)"))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kvstore chat``: a multi-turn chat demo that shows the cache at work.

Each turn re-sends the whole conversation; the store serves the part it has seen before
(the system prompt, earlier turns and their replies) from whichever tier holds it, and
the demo prints after every reply: prompt tokens, cached tokens by tier, time to first
token and decode speed. The default store is the embedded one: GPU pool (or CPU when
there is no GPU) + host DRAM + an LMDB disk tier under ``$KVSTORE_HOME``, written
through, so a restarted demo that resumes its session (``--resume``) hits the disk tier.

Commands inside the chat: ``/stats`` (store counters), ``/reset`` (new conversation),
``/quit``. ``--script FILE`` runs the lines of FILE as user turns (and commands),
non-interactively.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from kvstore import env
from kvstore.units import format_size, parse_size

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore chat",
        description="Multi-turn chat on the embedded engine, showing after each reply how "
                    "much of the prompt the tiered KV cache served, from which tier, the "
                    "time to first token and tokens/s. Commands: /stats, /reset, /quit.",
        epilog="Examples:\n  kvstore chat\n  kvstore chat --resume\n"
               "  kvstore chat --script turns.txt --session demo\n"
               "  kvstore chat --redis redis://127.0.0.1:6379\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (bundled SmolLM2-135M-Instruct) or a local HF checkpoint dir")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256, help="reply length limit (tokens)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model and KV dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--gpu-blocks", type=int, default=None,
                   help="KV blocks of 16 tokens in the GPU pool (default: from free memory)")
    p.add_argument("--host-blocks", type=int, default=2048,
                   help="KV blocks in the host DRAM tier (default 2048; 0 disables it)")
    p.add_argument("--disk", default=None,
                   help="LMDB directory of the disk tier (default: $KVSTORE_HOME/disk)")
    p.add_argument("--disk-bytes", default="4GiB", help="disk tier capacity (default 4GiB)")
    p.add_argument("--no-disk", action="store_true", help="run without the disk tier")
    p.add_argument("--redis", default=None, metavar="URL",
                   help="also share blocks through Redis (redis://, rediss://, redis+cluster://)")
    p.add_argument("--remote", default=None, metavar="URL",
                   help="also share blocks through a kvstore daemon (http://host:port)")
    p.add_argument("--session", default="default",
                   help="conversation name; saved under $KVSTORE_HOME/chat/ (default 'default')")
    p.add_argument("--resume", action="store_true", help="continue the saved conversation")
    p.add_argument("--script", default=None, metavar="FILE",
                   help="run FILE's lines as user turns or commands, non-interactively")
    p.add_argument("--model-cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="do not echo the reply while it streams")
    return p


class ChatSession:
    """One conversation on an LLM, with its history saved after every turn."""

    def __init__(self, llm, system: str, path: Path, params, out: TextIO) -> None:
        self.llm = llm
        self.system = system
        self.path = path
        self.params = params
        self.out = out
        self.messages: list[dict[str, str]] = []
        self.turn = 0
        self.reset(save=False)

    def reset(self, save: bool = True) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turn = 0
        if save:
            self.save()

    def load(self) -> bool:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            raise SystemExit(f"kvstore chat: cannot read session {self.path}: {exc}") from None
        msgs = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
            raise SystemExit(f"kvstore chat: {self.path} is not a chat session file")
        self.messages = msgs
        self.turn = sum(m["role"] == "user" for m in msgs)
        return True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"messages": self.messages}, indent=1))
        tmp.replace(self.path)

    def ask(self, text: str, echo: bool = True) -> dict[str, object]:
        """Send one user turn, stream the reply, record it; returns the turn's figures."""
        self.messages.append({"role": "user", "content": text})
        self.turn += 1
        shown = 0
        last = None
        if echo:
            self.out.write("assistant> ")
        for snap in self.llm.stream(self.messages, self.params):
            last = snap
            if echo:
                text_now = snap.outputs[0].text
                self.out.write(text_now[shown:])
                self.out.flush()
                shown = len(text_now)
        assert last is not None
        reply = last.outputs[0].text
        if echo:
            self.out.write("\n")
        self.messages.append({"role": "assistant", "content": reply})
        self.save()
        n_out = len(last.outputs[0].token_ids)
        rate = n_out / last.decode_s if last.decode_s else float("nan")
        figures = {"turn": self.turn, "prompt_tokens": last.prompt_tokens,
                   "cached_tokens": last.num_cached_tokens, "by_tier": last.cached_tokens,
                   "ttft_s": last.ttft_s, "output_tokens": n_out, "tokens_per_s": rate}
        tiers = ", ".join(f"{t} {n}" for t, n in sorted(last.cached_tokens.items())) or "none"
        self.out.write(
            f"[turn {self.turn}] prompt {last.prompt_tokens} tok | cached "
            f"{last.num_cached_tokens} tok ({tiers}) | TTFT {last.ttft_s * 1e3:.0f} ms | "
            f"{n_out} tok at {rate:.1f} tok/s\n")
        self.out.flush()
        return figures

    def stats(self) -> None:
        s = self.llm.store.stats()
        hits = ", ".join(f"{t} {n}" for t, n in sorted(s.hit_tokens.items())) or "none"
        moved = ", ".join(f"{k} {format_size(v)}" for k, v in sorted(s.bytes_moved.items()))
        self.out.write(
            f"[stats] hit tokens: {hits} | missed tokens: {s.miss_tokens} | "
            f"GPU blocks {s.gpu_total - s.gpu_free}/{s.gpu_total} | host blocks "
            f"{s.host_total - s.host_free}/{s.host_total} | indexed blocks {s.index.blocks} | "
            f"moved: {moved or 'nothing'} | evictions {s.evictions} | corrupt "
            f"{s.corrupt_blocks} | tier errors {s.tier_errors}\n")


def _lines(args: argparse.Namespace) -> Iterable[str]:
    if args.script is not None:
        try:
            text = Path(args.script).read_text()
        except OSError as exc:
            raise SystemExit(f"kvstore chat: cannot read --script {args.script}: {exc}") from None
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                print(f"user> {line.strip()}", flush=True)
                yield line.strip()
        return
    while True:
        try:
            yield input("user> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        disk_bytes = parse_size(args.disk_bytes)
    except ValueError as exc:
        print(f"kvstore chat: --disk-bytes: {exc}", file=sys.stderr)
        return 2
    if args.max_tokens < 1 or args.temperature < 0:
        print("kvstore chat: --max-tokens must be >= 1 and --temperature >= 0", file=sys.stderr)
        return 2
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    home = env.home()
    disk = None if args.no_disk else str(Path(args.disk or home / "disk").expanduser())
    t0 = time.perf_counter()
    print("loading model and cache tiers...", file=sys.stderr, flush=True)
    try:
        llm = LLM(args.model, device=args.device, dtype=args.dtype, gpu_blocks=args.gpu_blocks,
                  host_blocks=args.host_blocks, disk_path=disk, disk_bytes=disk_bytes,
                  redis_url=args.redis, remote_url=args.remote, policy="write-through",
                  model_cache_dir=args.model_cache_dir)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"kvstore chat: {exc}", file=sys.stderr)
        return 2
    tiers = ", ".join(llm.store.tiers)
    print(f"ready in {time.perf_counter() - t0:.1f} s: model {llm.loaded.name} on "
          f"{llm.model.device} ({llm.model.dtype}), cache tiers: {tiers}"
          + (f" (disk at {disk})" if disk else ""), file=sys.stderr, flush=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    session = ChatSession(llm, args.system, home / "chat" / f"{args.session}.json", params,
                          sys.stdout)
    if args.resume and session.load():
        print(f"resumed session '{args.session}' with {session.turn} earlier turns",
              file=sys.stderr)
    elif not args.resume:
        session.reset()
    try:
        for line in _lines(args):
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/stats":
                session.stats()
            elif cmd == "/reset":
                session.reset()
                print("[new conversation]")
            elif cmd.startswith("/"):
                print(f"unknown command {cmd}; commands are /stats, /reset, /quit")
            else:
                session.ask(cmd, echo=not args.quiet)
    finally:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

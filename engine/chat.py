"""``kvstore chat``: a multi-turn chat demo that shows the cache at work.

Each turn re-sends the whole conversation; the store serves the part it has seen before
(the system prompt, earlier turns and their replies) from whichever tier holds it, and
the demo prints after every reply: prompt tokens, cached tokens by tier, time to first
token and decode speed. The default store is the embedded one: the device pool (GPU, or
CPU when there is none) + host DRAM + an LMDB disk tier under ``$KVSTORE_HOME``, to
which every computed block is published, so a restarted demo that resumes its session
(``--resume``) hits the disk tier.

A turn that cannot run (longer than the context or the KV pool) is refused in one line
and left out of the conversation; Ctrl-C during a reply stops that reply (it is left
out too) and returns to the prompt.

Commands inside the chat: ``/help``, ``/stats`` (store counters), ``/reset`` (new
conversation), ``/quit``. The model and tier flags (and their defaults) are
``kvstore serve``'s (:mod:`engine.options`). ``--script FILE`` runs the lines of FILE as user turns (and commands),
non-interactively.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from engine.options import add_engine_arguments, check_engine_arguments, engine_kwargs
from kvstore import env
from kvstore.args import SIZE_HELP, add_log_level, configure_logging, count_arg
from kvstore.units import format_size

if TYPE_CHECKING:  # torch loads only when the chat starts, so --help stays fast
    from engine.llm import LLM
    from engine.sampling import SamplingParams

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Session names: 1-64 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit, so the
file ``$KVSTORE_HOME/chat/<name>.json`` is always inside the chat directory."""
COMMANDS = {"/help": "list these commands", "/stats": "the store's counters",
            "/reset": "start a new conversation", "/quit": "leave (also /exit, Ctrl-D)"}


def _session_arg(text: str) -> str:
    if SESSION_RE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"invalid session name {text!r}: use 1-64 of A-Z a-z 0-9 _ . - starting with a "
            "letter or digit (sessions are files in $KVSTORE_HOME/chat/)")
    return text


def _temperature_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore chat`` argument parser (model and tier flags shared with serve)."""
    commands = "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="kvstore chat",
        description="Multi-turn chat on the embedded engine, showing after each reply how "
                    "much of the prompt the tiered KV cache served, from which tier, the "
                    "time to first token and tokens/s.",
        epilog=f"commands inside the chat:\n{commands}\n\n{SIZE_HELP}.\n\n"
               "examples:\n  kvstore chat\n  kvstore chat --resume\n"
               "  kvstore chat --script turns.txt --session demo\n"
               "  kvstore chat --redis redis://127.0.0.1:6379\n"
               "  KVSTORE_DAEMON_TOKEN=... kvstore chat --remote http://10.0.0.5:8470\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p)
    chat = p.add_argument_group("conversation")
    chat.add_argument("--system", default=DEFAULT_SYSTEM,
                      help="system prompt (default: SmolLM's own)")
    chat.add_argument("--max-tokens", type=count_arg(1), default=256, metavar="N",
                      help="reply length limit in tokens (default: %(default)s)")
    chat.add_argument("--temperature", type=_temperature_arg, default=0.0,
                      help="0 is greedy; > 0 samples (default: %(default)s)")
    chat.add_argument("--seed", type=int, default=None,
                      help="sampling seed, a 64-bit integer (default: none)")
    chat.add_argument("--session", type=_session_arg, default="default",
                      help="conversation name, saved as $KVSTORE_HOME/chat/NAME.json "
                           "(default: %(default)s)")
    chat.add_argument("--resume", action="store_true", help="continue the saved conversation")
    chat.add_argument("--script", default=None, metavar="FILE",
                      help="run FILE's lines as user turns or commands, non-interactively "
                           "(default: none, interactive)")
    chat.add_argument("--quiet", action="store_true",
                      help="do not echo the reply while it streams")
    add_log_level(p, default="warning")
    return p


def tier_label(tier: str, device: str) -> str:
    """How the demo names a tier: the device pool is ``gpu`` only on a GPU."""
    if tier == "gpu" and device != "cuda":
        return f"{device}-pool"
    return tier


def _moves(moved: Mapping[str, int], device: str) -> str:
    """``{"gpu->disk": bytes}`` in the demo's tier names."""
    def label(edge: str) -> str:
        src, _, dst = edge.partition("->")
        return f"{tier_label(src, device)}->{tier_label(dst, device)}"
    return ", ".join(f"{label(k)} {format_size(v)}" for k, v in sorted(moved.items()) if v)


def _counts(counts: Mapping[str, int], device: str) -> str:
    return ", ".join(f"{tier_label(t, device)} {n}" for t, n in sorted(counts.items())
                     if n) or "none"


class ChatSession:
    """One conversation on an LLM, with its history saved after every turn."""

    def __init__(self, llm: LLM, system: str, path: Path, params: SamplingParams,
                 out: TextIO) -> None:
        self.llm = llm
        self.device = llm.model.device.type
        self.system = system
        self.path = path
        self.params = params
        self.out = out
        self.messages: list[dict[str, str]] = []
        self.turn = 0
        self._unsaved = False  # a failed save was reported
        self.reset(save=False)

    def reset(self, save: bool = True) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turn = 0
        if save:
            self.save()

    def load(self) -> bool:
        """Read the saved conversation; False when there is none. ``SystemExit`` with one
        line when the file cannot be read or is not a valid conversation."""
        from engine.llm import check_messages

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
        if msgs:
            try:
                check_messages(msgs)
            except (TypeError, ValueError) as exc:
                raise SystemExit(f"kvstore chat: {self.path} is not a valid conversation "
                                 f"({exc}); start a new one without --resume") from None
        self.messages = msgs
        self.turn = sum(m["role"] == "user" for m in msgs)
        return True

    def save(self) -> None:
        """Write the conversation (atomically). A directory that cannot be written is
        reported once and the chat goes on unsaved."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"messages": self.messages}, indent=1))
            tmp.replace(self.path)
        except OSError as exc:
            if not self._unsaved:
                self._unsaved = True
                print(f"kvstore chat: cannot save the session to {self.path} ({exc}); the "
                      "conversation goes on unsaved (set KVSTORE_HOME to a writable "
                      "directory)", file=sys.stderr)

    def ask(self, text: str, echo: bool = True) -> dict[str, object] | None:
        """Send one user turn, stream the reply, record it; returns the turn's figures.

        ``None`` when the turn did not happen: the engine refused it (one line printed:
        too long for the context or the KV pool) or Ctrl-C stopped the reply; either
        way the conversation is left as it was before the turn."""
        before = len(self.messages)
        self.messages.append({"role": "user", "content": text})
        self.turn += 1
        shown = 0
        last = None
        interrupted = _Interrupt()
        if echo:
            self.out.write("assistant> ")
        try:
            with interrupted:
                for snap in self.llm.stream(self.messages, self.params):
                    last = snap
                    if echo:
                        text_now = snap.outputs[0].text
                        self.out.write(text_now[shown:])
                        self.out.flush()
                        shown = len(text_now)
                    if interrupted.pending:
                        break  # between steps: the stream aborts the request
        except ValueError as exc:  # refused before it ran (context, pool, text)
            del self.messages[before:]
            self.turn -= 1
            self.out.write(f"\n[turn refused: {exc}; shorten it or /reset]\n")
            self.out.flush()
            return None
        if interrupted.pending or last is None:
            del self.messages[before:]
            self.turn -= 1
            self.out.write("\n[reply stopped; the turn is left out]\n")
            self.out.flush()
            return None
        reply = last.outputs[0].text
        if echo:
            self.out.write("\n")
        self.messages.append({"role": "assistant", "content": reply})
        self.save()
        n_out = len(last.outputs[0].token_ids)
        # decode_s runs from the first token to the last: n_out - 1 tokens
        rate = (n_out - 1) / last.decode_s if n_out > 1 and last.decode_s else float("nan")
        figures = {"turn": self.turn, "prompt_tokens": last.prompt_tokens,
                   "cached_tokens": last.num_cached_tokens, "by_tier": last.cached_tokens,
                   "ttft_s": last.ttft_s, "output_tokens": n_out, "tokens_per_s": rate}
        tiers = _counts(last.cached_tokens, self.device)
        speed = f"{rate:.1f} tok/s" if math.isfinite(rate) else "- tok/s"
        self.out.write(
            f"[turn {self.turn}] prompt {last.prompt_tokens} tok | cached "
            f"{last.num_cached_tokens} tok ({tiers}) | TTFT {(last.ttft_s or 0.0) * 1e3:.0f} ms | "
            f"{n_out} tok at {speed}\n")
        if last.outputs[0].finish_reason == "length" and n_out < self.params.max_tokens:
            self.out.write(f"[reply cut at {n_out} tokens: the conversation reached the "
                           f"longest sequence this engine runs ({self.llm.max_sequence_tokens} "
                           "tokens); /reset, or give more --gpu-kv-bytes]\n")
        self.out.flush()
        return figures

    def stats(self) -> None:
        """One line of the store's counters, in words and numbers."""
        s = self.llm.store.stats()
        d = self.device
        moved = _moves(s.bytes_moved, d)
        pool = tier_label("gpu", d)
        self.out.write(
            f"[stats] hit tokens: {_counts(s.hit_tokens, d)} | missed tokens: "
            f"{s.miss_tokens} | {pool} blocks {s.gpu_total - s.gpu_free}/{s.gpu_total} | "
            f"host blocks {s.host_total - s.host_free}/{s.host_total} | indexed blocks: "
            f"{_counts(s.index.blocks, d)} | moved: {moved or 'nothing'} | evictions: "
            f"{_counts(s.evictions, d)} | corrupt {s.corrupt_blocks} | tier errors: "
            f"{_counts(s.tier_errors, d)}\n")

    def help(self) -> None:
        for name, text in COMMANDS.items():
            self.out.write(f"  {name:<8} {text}\n")


class _Interrupt:
    """While entered, Ctrl-C (SIGINT) only sets ``pending``, so a reply stops between
    engine steps, never inside one (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.pending = False
        self._old: object = None

    def __enter__(self) -> _Interrupt:
        try:
            self._old = signal.signal(signal.SIGINT, self._on_signal)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending = True


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
    """``kvstore chat``: 0 when the conversation ends, 2 for bad arguments or a model or
    tier that cannot be opened (one line, never a traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_engine_arguments(parser, args)
    if args.script is not None and not Path(args.script).is_file():
        parser.error(f"--script {args.script}: no such file")
    configure_logging(args.log_level)
    t0 = time.perf_counter()
    print("loading model and cache tiers...", file=sys.stderr, flush=True)
    try:
        from engine.llm import LLM
        from engine.sampling import SamplingParams

        llm = LLM(args.model, **engine_kwargs(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"kvstore chat: {exc}", file=sys.stderr)
        return 2
    if llm.tokenizer is None:
        llm.close()
        print(f"kvstore chat: model {args.model!r} has no tokenizer or chat template: give "
              "one with --tokenizer (e.g. --tokenizer smollm2)", file=sys.stderr)
        return 2
    warm = llm.warmup_report
    print(f"ready in {time.perf_counter() - t0:.1f} s"
          + (f" (warm-up {warm.seconds:.1f} s)" if warm is not None else ""), file=sys.stderr)
    for line in llm.describe():
        print(f"  {line}", file=sys.stderr)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                seed=args.seed)
    except ValueError as exc:  # the seed's range is the sampler's
        llm.close()
        print(f"kvstore chat: --seed: {exc}", file=sys.stderr)
        return 2
    session = ChatSession(llm, args.system, env.home() / "chat" / f"{args.session}.json",
                          params, sys.stdout)
    if args.resume and session.load():
        print(f"resumed session '{args.session}' with {session.turn} earlier turns",
              file=sys.stderr)
        saved_system = next((m["content"] for m in session.messages if m["role"] == "system"),
                            None)
        if args.system != DEFAULT_SYSTEM and args.system != saved_system:
            print("note: --system is ignored: the resumed session keeps its own system "
                  "prompt (/reset starts one with --system)", file=sys.stderr)
    elif args.resume:
        print(f"no saved session '{args.session}': starting a new one", file=sys.stderr)
        session.reset()
    else:
        session.reset()
    try:
        for line in _lines(args):
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/help":
                session.help()
            elif cmd == "/stats":
                session.stats()
            elif cmd == "/reset":
                session.reset()
                print("[new conversation]")
            elif cmd.startswith("/"):
                print(f"unknown command {cmd}; commands are {', '.join(COMMANDS)}")
            else:
                session.ask(cmd, echo=not args.quiet)
    finally:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The chat demo in scripted mode: per-turn statistics, reuse within a session, and a
restarted demo resuming its conversation from the disk tier."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TURN = re.compile(r"\[turn (\d+)\] prompt (\d+) tok \| cached (\d+) tok \((.*?)\) \| "
                  r"TTFT (\d+) ms \| (\d+) tok at ([0-9.]+|-) tok/s")


def chat(tmp_path: Path, cache: Path, lines: list[str], *extra: str,
         env_extra: dict[str, str] | None = None) -> list[tuple]:
    """Run a scripted chat; the turn lines it printed (its stdout in ``chat.stdout``)."""
    script = tmp_path / "script.txt"
    script.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "KVSTORE_DAEMON_TOKEN"}
    env.update(KVSTORE_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", **(env_extra or {}))
    out = subprocess.run(
        [sys.executable, "-m", "kvstore", "chat", "--script", str(script), "--device", "cpu",
         "--max-tokens", "12", "--gpu-kv-bytes", "90MiB", "--model-cache-dir", str(cache), *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    print(out.stdout)
    chat.stdout = out.stdout  # type: ignore[attr-defined]
    chat.stderr = out.stderr  # type: ignore[attr-defined]
    return [m.groups() for m in TURN.finditer(out.stdout)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "models"


def test_scripted_chat_reports_cached_tokens_and_resumes_from_disk(tmp_path, cache):
    turns = chat(tmp_path, cache, ["What is the capital of France?", "/stats", "/help",
                                   "And of Italy?", "/quit", "never sent"])
    assert [t[0] for t in turns] == ["1", "2"]
    stats_line = next(line for line in chat.stdout.splitlines()  # type: ignore[attr-defined]
                      if line.startswith("[stats]"))
    assert "{" not in stats_line and "Stats(" not in stats_line, stats_line
    assert "cpu-pool blocks" in stats_line and "GPU" not in stats_line
    assert "/reset" in chat.stdout and "unknown command /help" not in chat.stdout  # type: ignore[attr-defined]
    (_, p1, c1, _, _, _, _), (_, p2, c2, tiers2, _, n2, _) = turns
    assert int(c1) == 0 and int(c2) >= int(p1) // 16 * 16 > 0
    assert "cpu-pool" in tiers2 and "gpu" not in tiers2 and int(n2) > 0
    # A new process resuming the session: the history comes back from the disk tier.
    turns = chat(tmp_path, cache, ["Thanks!"], "--resume")
    (_, p3, c3, tiers3, _, _, _), = turns
    assert int(c3) >= int(p2) // 16 * 16 and "disk" in tiers3


def test_bad_flags_are_clear_errors(tmp_path, cache):
    env = dict(os.environ, KVSTORE_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-m", "kvstore", "chat", "--disk-bytes", "lots"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 2 and "not a size" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "kvstore", "chat", "--script", "/nonexistent",
                          "--model-cache-dir", str(cache), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 2 and "--script /nonexistent: no such file" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "kvstore", "chat", "--seed", str(2**70),
                          "--model-cache-dir", str(cache), "--device", "cpu", "--no-disk"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 2 and "--seed: " in out.stderr and "64-bit" in out.stderr
    assert "Traceback" not in out.stderr
    for name in ("../../etc/x", "a/b", ".hidden", ""):
        out = subprocess.run([sys.executable, "-m", "kvstore", "chat", "--session", name],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert out.returncode == 2 and "invalid session name" in out.stderr, out.stderr
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("shared", ["daemon", "daemon-with-token", "redis"])
def test_two_processes_share_a_conversation(tmp_path, cache, shared, redis_server):
    """Process 1 begins a chat; process 2 (no disk tier, empty index) continues it and
    fetches the earlier turn's KV from the shared daemon or Redis. A daemon with a token
    is reached with ``$KVSTORE_DAEMON_TOKEN``, as the README says."""
    from bench.servers import DaemonProcess

    daemon = None
    env_extra: dict[str, str] = {}
    if shared.startswith("daemon"):
        token = "chat-test-token-0123456789" if shared == "daemon-with-token" else None
        daemon = DaemonProcess(["--host-bytes", "256MiB"], token=token).start()
        flags = ["--remote", daemon.url]
        tier = "remote"
        if token is not None:
            env_extra["KVSTORE_DAEMON_TOKEN"] = token
    else:
        flags = ["--redis", redis_server.url]
        tier = "redis"
    try:
        first = chat(tmp_path, cache, ["Name three colors."], "--no-disk", "--host-bytes", "0",
                     "--session", "shared", *flags, env_extra=env_extra)
        (_, p1, _, _, _, n1, _), = first
        second = chat(tmp_path, cache, ["Which one is the darkest?"], "--no-disk",
                      "--host-bytes", "0", "--session", "shared", "--resume", *flags,
                      env_extra=env_extra)
        (_, p2, c2, tiers2, _, _, _), = second
        assert int(p2) > int(p1)
        assert int(c2) >= int(p1) // 16 * 16 and tier in tiers2
    finally:
        if daemon is not None:
            daemon.close()


def test_a_turn_that_cannot_run_is_refused_and_left_out(tmp_path, cache):
    """A message longer than the context is one line, not a traceback; the chat goes on
    and the refused message is not in the saved conversation. Resuming a session that
    does not exist says so."""
    turns = chat(tmp_path, cache, ["hello " * 9000, "What is the capital of France?"],
                 "--session", "long", "--resume")
    assert "no saved session 'long': starting a new one" in chat.stderr  # type: ignore[attr-defined]
    assert "[turn refused:" in chat.stdout and "context" in chat.stdout  # type: ignore[attr-defined]
    assert [t[0] for t in turns] == ["1"]
    saved = json.loads((tmp_path / "home" / "chat" / "long.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert "hello hello" not in saved[1]["content"]


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tmp_path, cache):
    script = tmp_path / "script.txt"
    script.write_text("Write a very long story about a dragon and a knight.\nWhat is 2+2?\n")
    env = dict(os.environ, KVSTORE_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "chat", "--script", str(script), "--device", "cpu",
         "--max-tokens", "2000", "--gpu-kv-bytes", "90MiB", "--no-disk",
         "--model-cache-dir", str(cache)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert proc.stdout is not None
    seen = ""
    while "assistant> " not in seen or len(seen.split("assistant> ", 1)[1]) < 20:
        ch = proc.stdout.read(1)
        assert ch, f"chat ended before replying: {proc.stderr.read() if proc.stderr else ''}"
        seen += ch
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    out = seen + out
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "[reply stopped; the turn is left out]" in out, out
    turns = [m.groups() for m in TURN.finditer(out)]
    assert [t[0] for t in turns] == ["1"], out  # the second line is the first turn kept

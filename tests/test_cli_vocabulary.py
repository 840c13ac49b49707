"""One command-line vocabulary across every ``kvstore`` command and bench.

Builds each command's and bench's real parser (the modules named in ``kvstore.cli``'s
COMMANDS and BENCHES) and checks that the same thing has the same name everywhere: sizes
are ``-bytes`` flags parsed by :func:`kvstore.args.size_arg`, every bench that writes
files takes ``--out DIR`` (default ``bench_out/<bench>``), dtypes go through
:func:`kvstore.args.dtype_arg`, every long-running command has ``--log-level``, help
texts show defaults as ``(default: ...)`` and carry no reStructuredText markup, and no
old spelling is shown.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.args import LOG_LEVELS, bench_out_dir, dir_arg, dtype_arg, size_arg
from kvstore.cli import BENCHES, COMMANDS

ROOT = Path(__file__).resolve().parents[1]

DEPRECATED = ("--host-blocks", "--memory-bytes", "--host-kv-bytes", "--disk-kv-bytes",
              "--disk-dir", "--gpu-kv", "--host-kv", "--out-dir", "--dir", "--host-memory",
              "--cpu-pool-blocks", "--load-batch-mib", "--gpu-blocks", "--memory",
              "--max-batched-tokens")
"""Old spellings: some still parse as hidden aliases, none may be shown."""
LONG_RUNNING = ("chat", "serve", "daemon", "router")
WRITES_FILES = ("hit-rate", "engine", "attention", "serve", "router", "fused")
"""Benches that write files (tables, CSVs, plots, logs, JSON)."""
SIZE_FLAGS = {"--gpu-kv-bytes", "--host-bytes", "--disk-bytes", "--max-body-bytes",
              "--load-batch-bytes"}
MARKUP = re.compile(r"``|:(?:func|mod|class|meth|data|attr):`|\*\*")
OLD_DEFAULT = re.compile(r"[(;,] ?default [^:]")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    found = {}
    for name, (module, _) in COMMANDS.items():
        found[name] = importlib.import_module(module).build_parser()
    for name, (module, _) in BENCHES.items():
        found[f"bench {name}"] = importlib.import_module(module).build_parser()
    return found


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return _parsers()


def _shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_every_command_and_bench_has_a_parser_builder(parsers):
    assert set(parsers) == set(COMMANDS) | {f"bench {b}" for b in BENCHES}


def test_no_old_spelling_is_shown(parsers):
    for name, parser in parsers.items():
        text = parser.format_help()
        for old in DEPRECATED:
            assert re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", text) is None, (name, old)
        if name.startswith("bench "):  # an output file is a directory's content: --out
            assert "--json" not in text, name


def test_every_size_flag_is_bytes_with_units(parsers):
    seen = set()
    for name, parser in parsers.items():
        for action in _shown(parser):
            flags = [f for f in action.option_strings if f.endswith("-bytes")]
            if action.type is size_arg or flags:
                assert action.type is size_arg, (name, action.option_strings)
                assert any(f in SIZE_FLAGS for f in action.option_strings), (
                    name, action.option_strings)
                assert action.metavar == "SIZE", (name, action.option_strings)
                parsed = parser.parse_args([action.option_strings[0], "8GiB",
                                            *_required(parser)])
                assert getattr(parsed, action.dest) == 8 << 30, (name, action.dest)
                seen.update(f for f in action.option_strings if f in SIZE_FLAGS)
    assert {"--gpu-kv-bytes", "--host-bytes", "--disk-bytes"} <= seen


def test_the_tier_flags_have_the_same_names_in_chat_serve_and_the_benches(parsers):
    for name in ("chat", "serve", "bench serve"):
        for flag in ("--gpu-kv-bytes", "--host-bytes", "--disk-bytes", "--disk", "--redis",
                     "--policy", "--dtype", "--device", "--model", "--load-format"):
            assert _action(parsers[name], flag) is not None, (name, flag)
    assert _action(parsers["daemon"], "--host-bytes").dest == "host_bytes"
    assert _action(parsers["daemon"], "--disk") is not None
    for name, flags in {"bench pressure": ("--gpu-kv-bytes", "--host-bytes"),
                        "bench plan": ("--gpu-kv-bytes",), "plan": ("--host-bytes",),
                        "bench tiers": ("--disk",), "bench engine": ("--disk",)}.items():
        for flag in flags:
            assert _action(parsers[name], flag) is not None, (name, flag)
    for name in ("bench serve", "bench tiers", "bench engine", "bench format"):
        assert _action(parsers[name], "--disk").type is dir_arg, name  # not a file


def test_every_bench_that_writes_files_takes_out_dir(parsers):
    for bench in WRITES_FILES:
        out = _action(parsers[f"bench {bench}"], "--out")
        assert out is not None, bench
        assert out.metavar == "DIR" and Path(out.default) == bench_out_dir(bench), bench
        assert Path(out.default).parts[0] == "bench_out"
        assert out.type is dir_arg, bench  # a file there is argparse's error
        assert isinstance(parsers[f"bench {bench}"].parse_args(
            _required(parsers[f"bench {bench}"])).out, Path), bench
    for bench in BENCHES:
        out = _action(parsers[f"bench {bench}"], "--out")
        if out is not None:
            assert bench in WRITES_FILES, f"bench {bench} writes files: list it in WRITES_FILES"


def test_every_long_running_command_has_log_level(parsers):
    for name in LONG_RUNNING:
        action = _action(parsers[name], "--log-level")
        assert action is not None, name
        assert tuple(action.choices) == LOG_LEVELS, name
        assert action.default in LOG_LEVELS


def test_the_services_listen_with_the_same_flags(parsers):
    for name in ("serve", "daemon", "router"):
        for flag in ("--host", "--port", "--shutdown-timeout"):
            assert _action(parsers[name], flag) is not None, (name, flag)
    assert _action(parsers["serve"], "--api-key").metavar \
        == _action(parsers["router"], "--api-key").metavar


def test_dtype_and_device_are_one_flag_everywhere(parsers):
    for name, parser in parsers.items():
        dtype = _action(parser, "--dtype")
        if dtype is not None:
            assert dtype.type is dtype_arg, name
            assert parser.parse_args(["--dtype", "bf16", *_required(parser)]).dtype \
                == "bfloat16", name
        device = _action(parser, "--device")
        if device is not None:
            assert device.metavar == "DEVICE" and device.default is None, name
            assert "cuda" in device.help and "cpu" in device.help, name


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """Values for a parser's required flags, so it parses."""
    args = []
    for action in parser._actions:
        if action.required and action.option_strings:
            value = {"--context": "64", "--model": "smollm2",
                     "--replica": "http://127.0.0.1:1"}[action.option_strings[0]]
            args += [action.option_strings[0], value]
    return args


def test_help_shows_defaults_one_way_and_no_markup(parsers):
    for name, parser in parsers.items():
        text = parser.format_help()
        assert MARKUP.search(text) is None, (name, MARKUP.search(text))
        for action in _shown(parser):
            assert OLD_DEFAULT.search(action.help or "") is None, (name, action.help)
            if action.nargs != 0 and not action.required:  # a flag with a value
                assert "default" in (action.help or ""), (name, action.option_strings)


def test_hidden_aliases_still_parse():
    from bench import serve_bench, tiers_bench
    from kvstore.daemon import cli as daemon_cli

    args = serve_bench.build_parser().parse_args(
        ["--host-kv-bytes", "8GiB", "--disk-kv-bytes", "1GiB", "--disk-dir", "/tmp/x"])
    assert (args.host_bytes, args.disk_bytes, args.disk) == (8 << 30, 1 << 30, Path("/tmp/x"))
    assert daemon_cli.build_parser().parse_args(["--memory-bytes", "2GiB"]).host_bytes == 2 << 30
    assert tiers_bench.build_parser().parse_args(["--dir", "/tmp/y"]).dir == Path("/tmp/y")


def test_a_bad_size_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "kvstore", "plan", "--model", "smollm2",
                           "--context", "64", "--host-bytes", "lots"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--host-bytes" in proc.stderr


def test_a_closed_pipe_ends_a_command_quietly() -> None:
    """``kvstore plan ... | head -1``: the reader leaves early; no traceback, exit 141."""
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", "plan", "--model", "llama3-8b",
                             "--context", "4096", "--gpu", "H100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err

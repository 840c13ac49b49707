"""The ``kvstore bench`` commands as a user meets them: a bad argument is argparse's
one-line error (exit status 2), a runtime failure one message (exit status 1), never a
traceback; explicit values are honoured; and the router bench runs end to end over a
real replica (a tiny model with random weights on the CPU). Functional only, never
timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstore import cli

ROOT = Path(__file__).resolve().parents[1]
TINY_REPLICA = ["--replica-arg=--model=tiny", "--replica-arg=--load-format=dummy",
                "--replica-arg=--tokenizer=smollm2", "--replica-arg=--dtype=float32"]


def _kvstore(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "kvstore", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``kvstore *argv`` exits with status 2 through argparse; its stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "error:" in err and "Traceback" not in err
    return err


# ------------------------------------------------------------------------- bench router


def test_bench_router_measures_both_paths_over_a_tiny_replica(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _kvstore("bench", "router", "--rate", "10", "--duration", "2", "--device", "cpu",
                   *TINY_REPLICA, "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "router overhead p50:" in run.stdout
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()
            if line.startswith(("direct ", "router ")) and "overhead" not in line}
    assert set(rows) == {"direct", "router"}, run.stdout
    for row in rows.values():  # path reqs p50 p99 errors
        assert int(row[1]) >= 1 and int(row[4]) == 0, row
    saved = json.loads((out / "router_overhead.json").read_text())
    assert saved["errors"] == {} and saved["lat"]["router"] and saved["lat"]["direct"]


def test_bench_router_says_why_a_replica_did_not_start(tmp_path: Path) -> None:
    run = _kvstore("bench", "router", "--duration", "1", "--device", "cpu",
                   *TINY_REPLICA, "--replica-arg=--no-such-flag", "--out", str(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("kvstore bench router: the server exited")
    assert "--no-such-flag" in run.stderr  # the replica's own complaint, from its log


@pytest.mark.parametrize("argv, needle", [
    (["--device", "foo"], "--device 'foo' is not a device name"),
    (["--startup-timeout", "-1"], "--startup-timeout"),
    (["--rate", "inf"], "--rate and --duration must be finite"),
])
def test_bench_router_refuses_bad_arguments(capsys: pytest.CaptureFixture[str],
                                            argv: list[str], needle: str) -> None:
    assert needle in _refused(capsys, "bench", "router", *argv)


# ------------------------------------------------------------------------- output dirs


@pytest.mark.parametrize("bench", ["router", "hit-rate", "serve", "engine", "fused",
                                   "attention"])
def test_out_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 bench: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    err = _refused(capsys, "bench", bench, "--out", str(afile))
    assert f"{afile} is a file, not a directory" in err
    err = _refused(capsys, "bench", bench, "--out", str(afile / "sub"))
    assert f"cannot create directory {afile / 'sub'}: {afile} is a file" in err


# ------------------------------------------------------------------------- Mooncake traces


@pytest.mark.parametrize("text, needle", [
    ("", "{path}: no records (an empty Mooncake trace)"),
    ("\n  \n", "{path}: no records"),
    ('{"timestamp": 0, "input_length": 10, "hash_ids": [1]}\n{"timestamp": 1,\n',
     "{path}:2: not JSON"),
    ('{"timestamp": 0, "input_length": 10}\n', "{path}:1: record lacks ['hash_ids']"),
    ('[1, 2]\n', "{path}:1: a list, not a JSON object"),
    ('{"timestamp": "x", "input_length": 10, "hash_ids": [1]}\n', "{path}:1: timestamp"),
    ('{"timestamp": 0, "input_length": 1000, "hash_ids": [1]}\n',
     "{path}:1: input_length 1000 needs 2 hash ids"),
    ('{"timestamp": 0, "input_length": 1, "hash_ids": [1]}\n\xff\n', "{path}:2: not UTF-8"),
])
def test_a_bad_mooncake_trace_names_the_file_and_line(tmp_path: Path, text: str,
                                                       needle: str) -> None:
    from bench.workloads import load_mooncake_records

    path = tmp_path / "trace.jsonl"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError) as exc:
        load_mooncake_records(path)
    assert needle.format(path=path) in str(exc.value)


def test_a_directory_is_not_a_mooncake_trace(tmp_path: Path) -> None:
    from bench.workloads import load_mooncake_records

    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_mooncake_records(tmp_path)


@pytest.mark.parametrize("bench", [["serve", "--workload", "mooncake"],
                                   ["hit-rate", "--workloads", "mooncake"]])
def test_the_benches_refuse_a_bad_trace_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], bench: list[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10}\n')
    out = ["--out", str(tmp_path / "out")]
    for trace, needle in ((empty, f"{empty}: no records"), (bad, f"{bad}:1: record lacks"),
                          (tmp_path, f"{tmp_path} is a directory")):
        err = _refused(capsys, "bench", *bench, "--trace", str(trace), *out)
        assert needle in err and len(err.strip().splitlines()[-1]) < 300


def test_serve_bench_sends_nothing_and_returns_for_no_conversations() -> None:
    """run_load over no conversations returns at once (it waited forever for an end that
    only a finished conversation queues)."""
    import asyncio

    from bench import serve_bench

    args = serve_bench.build_parser().parse_args(
        ["--max-parallel", "2", "--no-progress"])
    for args.max_parallel, args.request_rate in ((2, None), (None, 5.0), (None, None)):
        load = asyncio.run(asyncio.wait_for(serve_bench.run_load(
            "http://127.0.0.1:9", "m", [], args, 1000, {}, "none"), 60))
        assert load == serve_bench.Load([], 0, 0, 0.0)


# ------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("argv, needle", [
    (["hit-rate", "--capacities", "nan"], "--capacities: factors must be numbers > 0"),
    (["hit-rate", "--capacities", "1e400"], "got 1e400"),
    (["hit-rate", "--capacities", "1,x"], "--capacities takes comma-separated numbers"),
    (["hit-rate", "--conversations", "-5"], "--conversations: must be >= 1"),
    (["hit-rate", "--conversations", "0"], "--conversations: must be >= 1"),
    (["hit-rate", "--workloads", "nope"], "--workloads: unknown workload"),
    (["serve", "--gpu-kv-bytes", "0"], "--gpu-kv-bytes must be > 0"),
    (["serve", "--device", "foo"], "--device 'foo' is not a device name"),
    (["serve", "--startup-timeout", "-1"], "--startup-timeout"),
])
def test_bad_values_are_refused(capsys: pytest.CaptureFixture[str], argv: list[str],
                                needle: str) -> None:
    assert needle in _refused(capsys, "bench", *argv)


# ------------------------------------------------------------------------- bench radix


def _radix(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(["bench", "radix", "--no-progress", "--repeat", "1", *argv]) == 0
    return capsys.readouterr().out


def test_radix_evictors_each_evict_the_whole_asked_count_from_their_own_tree(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Both evictors free --evict blocks of the same tree: the naive one no longer
    empties the tree the other one is then timed on."""
    out = _radix(capsys, "--tokens", "16", "--tree-blocks", "1000", "--leaves", "100",
                 "--evict", "1000", "--evict-batch", "64")
    assert "evict 1000 blocks in 16 calls (1,001 blocks, 101 leaves)" in out, out


def test_radix_caps_the_last_eviction_call_and_keeps_explicit_sizes_over_quick(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench.radix_bench import eviction_batches

    assert eviction_batches(250, 100) == [100, 100, 50]
    assert eviction_batches(50, 100) == [50]
    out = _radix(capsys, "--quick", "--tokens", "2048", "--evict", "50",
                 "--evict-batch", "100")
    assert "hash 2k-token prompt" in out and "evict 50 blocks in 1 call (" in out, out
    assert "tree of 50k blocks" in out  # --quick's tree: only what was not given


@pytest.mark.parametrize("argv, needle", [
    (["--tokens", "10"], "--tokens: must be >= 16"),
    (["--evict", "0"], "--evict: must be >= 1"),
    (["--evict", "5000", "--tree-blocks", "4000", "--leaves", "10"],
     "--evict 5000 is more than the tree's --tree-blocks 4000"),
])
def test_radix_refuses_sizes_it_cannot_measure(capsys: pytest.CaptureFixture[str],
                                               argv: list[str], needle: str) -> None:
    assert needle in _refused(capsys, "bench", "radix", *argv)


@pytest.mark.parametrize("argv, needle", [
    (["tiers", "--blocks", "0"], "--blocks: must be >= 1"),
    (["format", "--tiers", ""], "--tiers: no tier given"),
    (["format", "--tiers", " , "], "--tiers: no tier given"),
    (["format", "--quick", "--blocks", "0"], "--blocks: must be >= 1"),
    (["engine", "--device", "foo"], "--device 'foo' is not a device name"),
    (["engine", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens: must be >= 1"),
    (["engine", "--redis", "notaurl"], "--redis: unsupported Redis URL 'notaurl'"),
    (["plan", "--device", "cpu", "--context", "0"], "--context: must be >= 1"),
    (["plan", "--device", "cpu", "--batch", "0"], "--batch: must be >= 1"),
    (["pressure", "--device", "cpu", "--configs", "off,nope"], "--configs: unknown ['nope']"),
    (["pressure", "--device", "cpu", "--model", "llama3-8b", "--weights", "real"],
     "use --weights random for llama3-8b"),
])
def test_bad_values_are_refused_before_any_work(capsys: pytest.CaptureFixture[str],
                                                argv: list[str], needle: str) -> None:
    assert needle in _refused(capsys, "bench", *argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
@pytest.mark.parametrize("bench", ["engine", "format", "pressure", "plan"])
def test_cuda_without_a_gpu_is_refused(capsys: pytest.CaptureFixture[str], bench: str) -> None:
    assert "--device cuda: no CUDA GPU is visible; use --device cpu" in _refused(
        capsys, "bench", bench, "--device", "cuda")


@pytest.mark.parametrize("argv", [["tiers"], ["format"], ["engine"], ["serve"]])
def test_disk_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  argv: list[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    err = _refused(capsys, "bench", *argv, "--disk", str(afile))
    assert f"argument --disk: {afile} is a file, not a directory" in err
    err = _refused(capsys, "bench", *argv, "--disk", str(afile / "sub"))
    assert f"cannot create directory {afile / 'sub'}: {afile} is a file" in err


def test_pressure_configs_take_a_comma_list_and_the_old_spaced_form() -> None:
    from bench.pressure_bench import _configs, build_parser

    p = build_parser()
    for argv, want in ((["--configs", "off,gpu"], ["off", "gpu"]),
                       (["--configs", "off", "gpu"], ["off", "gpu"]),
                       (["--configs", "host,off", "off"], ["host", "off"]),
                       ([], ["off", "gpu", "host"])):
        assert _configs(p, p.parse_args(argv).configs) == want


def test_format_quick_keeps_explicit_blocks_and_repeats_and_creates_disk(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "new" / "dir"
    assert cli.main(["bench", "format", "--quick", "--blocks", "4", "--repeats", "1",
                     "--tiers", "disk", "--formats", "exact", "--device", "cpu",
                     "--disk", str(disk)]) == 0
    captured = capsys.readouterr()
    assert "(4 a load;" in captured.out, captured.out
    assert captured.err.count("load 1/1") == 1 and "load 1/2" not in captured.err
    assert disk.is_dir() and not any(disk.iterdir())  # created; its temp dir removed


def test_tiers_latency_rows_show_no_bandwidth_and_say_their_latency() -> None:
    import math

    from bench.tiers_bench import Row, format_table, latency_lines

    rows = [Row("lmdb", "get", 4096, 64, 1.5, 1000.0, 2.0, 0.75),
            Row("redis", "get-down", 4096, 64, 0.0, 500.0, 0.0, math.nan)]
    table = format_table(rows).splitlines()
    assert "nan" not in "\n".join(table) and "0.00" not in table[3]
    assert table[3].split() == ["redis", "get-down", "(latency)", "4", "KiB", "64", "-", "500",
                                "-", "-"]
    assert table[2].split()[-4:] == ["1.50", "1,000", "2.00", "0.75"]
    assert latency_lines(rows) == [
        "redis get-down (4,096 byte blocks): a get of 64 blocks took 128.000 ms"]

"""``kvstore bench serve`` end to end on the CPU: real ``kvstore serve`` processes with the
real SmolLM2, a real Redis, one server per cache configuration. Functional only (the
harness works and reports), never timing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench import serve_bench
from bench.servers import RedisServer
from bench.workloads import MOONCAKE_BLOCK_TOKENS, MooncakeTokens


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_configuration_serves_and_reuses_the_history(
        tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    rc = serve_bench.main([
        "--device", "cpu", "--configs", "all", "--redis", redis_server.url,
        "--clients", "2", "--rounds", "2", "--new-tokens", "40", "--output-tokens", "4",
        "--gpu-kv-bytes", "16MiB", "--host-bytes", "32MiB", "--disk-bytes", "64MiB",
        "--disk", str(tmp_path / "disk"), "--warmup", "1", "--max-num-seqs", "4",
        "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    summary = {r["config"]: r for r in _rows(out / "summary.csv")}
    assert list(summary) == list(serve_bench.CONFIGS)
    for name, row in summary.items():
        assert name in printed
        assert int(row["requests"]) == 4 and int(row["errors"]) == 0, row
        assert float(row["ttft_p50_ms"]) > 0 and float(row["output_tok_per_s"]) > 0
    requests = _rows(out / "requests.csv")
    assert len(requests) == 4 * len(serve_bench.CONFIGS)
    for r in requests:
        assert int(r["completion_tokens"]) == 4 and not r["error"]
        assert int(r["prompt_tokens"]) == (40 if r["round"] == "0" else 40 + 4 + 40)
        if r["config"] == "off" or r["round"] == "0":
            assert int(r["cached_tokens"]) == 0, r
        else:  # round 1 re-sends round 0's prompt and reply: 43 tokens of KV, 2 blocks
            assert int(r["cached_tokens"]) == 32, r
    for name in serve_bench.CONFIGS[1:]:  # the simulation agrees on this small load
        assert float(summary[name]["sim_hit_rate"]) == pytest.approx(
            int(summary[name]["cached_tokens"]) / int(summary[name]["prompt_tokens"]), abs=1e-4)
    assert (out / "serve_bench.png").stat().st_size > 10_000
    assert (out / "server-gpu-host-disk-redis.log").is_file()
    assert (out / "stats-gpu-host-disk-redis.json").is_file()


def test_max_duration_cuts_a_configuration_and_reports_what_it_cut(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """200 turns that cannot all run in 3 s: the run stops at 3 s, the requests in flight
    are cancelled and counted in TTFT with their wait so far, the rest never sent."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    rc = serve_bench.main([
        "--device", "cpu", "--configs", "gpu", "--clients", "2", "--rounds", "100",
        "--new-tokens", "40", "--output-tokens", "8", "--max-parallel", "2",
        "--max-duration", "3", "--gpu-kv-bytes", "64MiB", "--warmup", "1",
        "--out", str(out), "--no-progress", "--no-plot", "--no-sim"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "cut at --max-duration 3 s" in printed
    assert "[gpu] the server started in " in printed  # model, store, warm-up seconds
    [row] = _rows(out / "summary.csv")
    finished, cut = int(row["requests"]), int(row["cut"])
    assert finished >= 1 and cut >= 1 and int(row["errors"]) == 0
    assert finished + cut + int(row["skipped"]) == 200
    assert float(row["duration_s"]) <= 3.0
    requests = _rows(out / "requests.csv")
    cancelled = [r for r in requests if r["cut"] == "1"]
    assert 1 <= len(cancelled) <= 2  # the two in flight at the limit
    for r in cancelled:
        assert not r["error"] and float(r["start_s"]) < 3.0 and float(r["ttft_ms"]) > 0
    for r in requests:
        if r["cut"] == "0":
            assert int(r["completion_tokens"]) == 8 and not r["error"]


def test_sigterm_stops_the_run_and_reports_the_configurations_that_finished(
        tmp_path: Path) -> None:
    """A time limit's SIGTERM while the second configuration's server starts: the server
    is stopped, the first configuration is reported (table, CSV), the exit code is 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "bench", "serve", "--device", "cpu",
         "--configs", "gpu,off", "--clients", "2", "--rounds", "2", "--new-tokens", "40",
         "--output-tokens", "4", "--gpu-kv-bytes", "16MiB", "--warmup", "1",
         "--max-num-seqs", "4", "--out", str(out), "--no-progress", "--no-plot", "--no-sim"],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[off] starting"):
            break
        assert time.monotonic() < deadline, "".join(seen)
    log = out / "server-off.log"
    while not log.is_file() or not log.stat().st_size:  # the server runs, and logs
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=180)
    printed = "".join(seen) + rest
    assert proc.returncode == 130, printed + err
    assert "[gpu] 4 ok" in printed and "interrupted; not measured: off" in err
    assert "config" in printed and "\ngpu " in printed  # the table, with the gpu row
    [row] = _rows(out / "summary.csv")
    assert row["config"] == "gpu" and int(row["requests"]) == 4
    holders = []  # processes still writing the interrupted server's log: none
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            holders += [fd_dir.parent.name for fd in fd_dir.iterdir()
                        if os.readlink(fd) == str(log)]
        except OSError:  # gone meanwhile, or not ours to read
            continue
    assert not holders, holders


def test_bad_arguments_are_refused_with_the_flag_named(
        capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in ((["--configs", "gpu,tpu"], "--configs"),
                         (["--configs", "gpu+host+disk+redis"], "--redis"),
                         (["--request-rate", "2", "--max-parallel", "3"], "not both"),
                         (["--clients", "0"], "--clients"),
                         (["--max-duration", "0"], "--max-duration")):
        with pytest.raises(SystemExit) as exc:
            serve_bench.main(argv)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


def test_mooncake_tokens_share_exactly_the_shared_hash_ids() -> None:
    tokens = MooncakeTokens(vocab_size=1000, seed=3)
    a = tokens.prompt({"input_length": 1100, "hash_ids": [5, 6, 7]})
    b = tokens.prompt({"input_length": 700, "hash_ids": [5, 9]})
    assert len(a) == 1100 and len(b) == 700
    n = MOONCAKE_BLOCK_TOKENS
    assert (a[:n] == b[:n]).all() and not (a[n:700] == b[n:700]).all()
    assert (MooncakeTokens(1000, seed=3).prompt({"input_length": 1100,
                                                  "hash_ids": [5, 6, 7]}) == a).all()
    assert a.max() < 1000
    with pytest.raises(ValueError, match="hash ids"):
        tokens.prompt({"input_length": 2000, "hash_ids": [1]})


def test_an_open_loop_run_that_fell_behind_says_what_rate_would_keep_up() -> None:
    import argparse

    import numpy as np

    def results(starts: list[float]) -> list[serve_bench.Result]:
        return [serve_bench.Result(0, i, s, np.zeros(1, np.int32), 1)
                for i, s in enumerate(starts)]

    trace = argparse.Namespace(workload="mooncake", request_rate=None, max_parallel=None,
                               time_scale=1.0)
    spread = results([0.0, 5.0, 10.0])
    note = serve_bench.keep_up_note(trace, spread, 30.0)  # 3x the 10 s of arrivals
    assert note is not None and "--time-scale 3.3 " in note
    assert serve_bench.keep_up_note(trace, spread, 12.0) is None  # kept up
    poisson = argparse.Namespace(workload="multiturn", request_rate=4.0, max_parallel=None,
                                 time_scale=1.0)
    note = serve_bench.keep_up_note(poisson, spread, 40.0)  # 4x behind
    assert note is not None and "--request-rate 0.909 " in note
    closed = argparse.Namespace(workload="multiturn", request_rate=None, max_parallel=4,
                                time_scale=1.0)
    assert serve_bench.keep_up_note(closed, spread, 40.0) is None


def test_round_spans_compare_configurations_round_by_round() -> None:
    """Each round's seconds run from its first request to the next round's first; a
    cached configuration's speed against the baseline is compared over the rounds both
    finished, so a baseline cut early still compares fairly."""
    import numpy as np

    def results(starts: list[list[float]]) -> list[serve_bench.Result]:
        out = []
        for rnd, times in enumerate(starts):
            for conv, t in enumerate(times):
                r = serve_bench.Result(conv, rnd, t, np.zeros(1, np.int32), 1)
                r.ttft_s, r.e2e_s = 0.1, 0.5
                out.append(r)
        return out

    tiered = serve_bench.summarize("gpu+host+disk", results(
        [[0.0, 0.2], [1.0, 1.1], [2.0, 2.3], [3.0, 3.5]]), 0, 4.0)
    gpu = serve_bench.summarize("gpu", results([[0.0, 0.1], [1.0, 1.2], [3.0, 3.1]]), 0, 4.0)
    assert tiered.round_s == {0: 1.0, 1: 1.0, 2: 1.0}
    assert gpu.round_s == {0: 1.0, 1: 2.0}  # its last round has no successor
    assert serve_bench.round_speed(tiered, gpu) == \
        "per round 1.00x (round 0) to 2.00x (round 1), range 1.00-2.00x"
    line = serve_bench.compare([tiered, gpu], closed=True)[0]
    assert line.startswith("gpu+host+disk vs gpu: throughput") and "per round 1.00x" in line
    assert "per round" not in serve_bench.compare([tiered, gpu])[0]  # open loop: none
    table = serve_bench.format_rounds([tiered, gpu], closed=True)
    assert "seconds / round" in table and "TTFT p50 ms / round" in table
    assert "seconds / round" not in serve_bench.format_rounds([tiered, gpu])

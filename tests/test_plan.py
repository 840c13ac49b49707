"""kvstore plan: the textbook figures exactly, parameter counts against the real model,
memory and roofline arithmetic, tier sizing over the store's simulation, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from bench import workloads as wl
from engine.config import ModelConfig
from engine.model import CausalLM
from kvstore import plan as kp

GiB = 1 << 30
MiB = 1 << 20


def _cfg(name: str) -> ModelConfig:
    return kp.resolve_model(name)[1]


def test_llama2_7b_fp16_textbook_figures():
    cfg = _cfg("llama2-7b")
    size = kp.model_size(cfg, "fp16")
    assert size.parameters == 6_738_415_616
    assert f"{size.parameters / 1e9:.2f}" == "6.74"
    assert size.weights_bytes == 2 * 6_738_415_616
    assert f"{size.weights_bytes / 1e9:.1f}" == "13.5"  # the textbook's "7B x 2 = 14 GB"
    assert size.kv_bytes_per_token == MiB // 2  # 0.5 MiB a token
    assert size.kv_bytes_per_token * 4096 == 2 * GiB  # 2 GiB for 4,096 tokens
    assert size.kv_bytes_per_block == 16 * MiB // 2


def test_llama3_8b_bf16_128_kib_a_token():
    size = kp.model_size(_cfg("llama3-8b"), "bf16")
    assert size.kv_bytes_per_token == 128 * 1024
    assert size.parameters == 8_030_261_248
    # the int8 tier format: a byte a value and a bf16 scale per head vector
    assert kp.int8_bytes_per_token(_cfg("llama3-8b")) == 2 * 32 * 8 * (128 + 2)


@pytest.mark.parametrize("name", ["smollm2", "llama2-7b", "qwen2-7b", "mistral-7b"])
def test_parameter_count_matches_the_engine_model(name):
    """The formula counts exactly the parameters the engine's model allocates (meta
    tensors: no memory), with tied embeddings counted once and Qwen2's QKV bias."""
    cfg = _cfg(name)
    model = CausalLM.empty(cfg, device="meta", backend="torch")
    assert kp.parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_mha_gqa_mqa_and_tied_embeddings_from_config_json(tmp_path):
    base = dict(kp.named_model_configs()["llama2-7b"])
    sizes = {}
    for label, kv in (("mha", 32), ("gqa", 8), ("mqa", 1)):
        path = tmp_path / label / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps({**base, "num_key_value_heads": kv}))
        name, cfg = kp.resolve_model(str(path))
        assert name == label
        sizes[label] = kp.model_size(cfg, "bfloat16")
    assert sizes["mha"].kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    assert sizes["gqa"].kv_bytes_per_token * 4 == sizes["mha"].kv_bytes_per_token
    assert sizes["mqa"].kv_bytes_per_token * 32 == sizes["mha"].kv_bytes_per_token
    tied = ModelConfig.from_hf_dict({**base, "tie_word_embeddings": True})
    assert kp.parameter_count(_cfg("llama2-7b")) - kp.parameter_count(tied) == 32000 * 4096
    # a directory holding config.json works too
    assert kp.resolve_model(str(tmp_path / "mqa"))[1].num_kv_heads == 1


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(kp.PlanError, match="unknown model 'gpt-5'.*smollm2.*llama3-8b"):
        kp.resolve_model("gpt-5")
    with pytest.raises(kp.PlanError, match="unknown dtype 'int3'.*bfloat16"):
        kp.dtype_bytes("int3")
    with pytest.raises(kp.PlanError, match="exceeds the model's context of 4096"):
        kp.make_plan("llama2-7b", _cfg("llama2-7b"), "fp16", 8192, 1, kp.GPUS["h200"])
    with pytest.raises(kp.PlanError, match="unknown GPU 'tpu'.*H200"):
        kp.resolve_gpu("tpu")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(kp.PlanError, match="cannot read"):
        kp.resolve_model(str(bad))
    bad.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(kp.PlanError, match="not supported"):
        kp.resolve_model(str(bad))


def test_memory_plan_and_largest_batch():
    cfg = _cfg("llama3-8b")
    gpu = kp.GPUS["h100-sxm"]
    plan = kp.make_plan("llama3-8b", cfg, "bf16", 4096, 300, gpu)
    m, s = plan.memory, plan.size
    assert m.usable == int(gpu.memory_bytes * kp.MEMORY_UTILIZATION)
    assert m.kv_pool_bytes == m.usable - s.weights_bytes - m.activations
    assert m.kv_pool_blocks == m.kv_pool_bytes // s.kv_bytes_per_block
    assert m.blocks_per_sequence == 256
    assert m.max_batch == m.kv_pool_blocks // 256
    assert 0 < m.max_batch < 300 and not m.fits
    assert any("exceeds the largest batch" in n for n in plan.notes)
    # 70B in bf16 does not fit one H100: an empty pool, said so
    big = kp.make_plan("llama3-70b", _cfg("llama3-70b"), "bf16", 4096, 1, gpu)
    assert big.memory.kv_pool_bytes == 0 and big.memory.max_batch == 0
    assert any("do not fit" in n for n in big.notes)


def test_roofline_prefill_compute_bound_decode_memory_bound():
    cfg = _cfg("llama3-8b")
    gpu = kp.GPUS["h200"]
    eff = kp.Efficiency()
    size = kp.model_size(cfg, "bf16")
    pre = kp.prefill_roofline(cfg, size, gpu, 4096, eff)
    assert pre.bound == "compute" and pre.steps == 1
    assert pre.seconds == pre.gpu_s > pre.host_s
    assert pre.compute_s > 0.9 * pre.gpu_s
    # linear layers: 2 FLOPs per matmul parameter per token dominate
    layer_params = size.matmul_parameters - cfg.vocab_size * cfg.hidden_size
    assert pre.flops > 2 * layer_params * 4096
    assert pre.flops == pytest.approx(2 * layer_params * 4096 + kp.attention_flops(cfg, 4096, 0)
                                      + 2 * cfg.vocab_size * cfg.hidden_size, rel=1e-3)
    assert pre.seconds > pre.flops / (gpu.flops * eff.gemm_compute)
    dec = kp.decode_roofline(cfg, size, gpu, 1, 4096, eff)
    assert dec.bound == "memory" and dec.seconds == dec.gpu_s > dec.host_s
    # the weights the GEMMs multiply (not the embedding table) and the context's KV
    assert dec.bytes > (layer_params + cfg.vocab_size * cfg.hidden_size) * 2 \
        + 4096 * size.kv_bytes_per_token
    assert dec.seconds > dec.bytes / (gpu.bandwidth * eff.gemm_memory)
    # a bigger batch reads the same weights: per-token time falls
    dec64 = kp.decode_roofline(cfg, size, gpu, 64, 4096, eff)
    assert dec64.seconds / 64 < dec.seconds / 4
    # a tiny model is bound by the host: the CUDA graph's replay and the step's work
    smol = _cfg("smollm2")
    tiny = kp.decode_roofline(smol, kp.model_size(smol, "bf16"), gpu, 1, 128, eff)
    assert tiny.bound == "host" and tiny.gpu_s < tiny.host_s
    assert tiny.seconds == pytest.approx(30 * kp.DECODE_HOST_S_PER_LAYER)
    # ... and its GPU time is mostly kernel floors
    assert tiny.floors_s > 0.9 * tiny.gpu_s


def test_a_step_is_the_sum_of_its_kernels():
    cfg = _cfg("llama3-8b")
    gpu = kp.GPUS["h200"]
    eff = kp.Efficiency()
    size = kp.model_size(cfg, "bf16")
    kernels = kp.step_kernels(cfg, size, gpu, 8, 1, 2047, True, eff)
    dec = kp.decode_roofline(cfg, size, gpu, 8, 2048, eff)
    assert dec.gpu_s == pytest.approx(sum(k.seconds for k in kernels))
    assert dec.flops == pytest.approx(sum(k.flops for k in kernels))
    assert dec.bytes == pytest.approx(sum(k.bytes for k in kernels))
    assert dec.compute_s + dec.memory_s + dec.floors_s == pytest.approx(dec.gpu_s)
    for k in kernels:  # each kernel: the largest of its three times
        assert k.seconds == max(k.compute_s, k.memory_s, k.floor_s) > 0
    names = [k.name for k in kernels]
    assert names.count("add + RMSNorm") == 2 and "split-KV merge" in names
    gemms = [k for k in kernels if k.name.endswith("GEMM")]
    assert [k.name for k in gemms] == ["QKV GEMM", "O GEMM", "gate/up GEMM", "down GEMM",
                                       "LM head GEMM"]
    assert [k.launches for k in gemms] == [32, 32, 32, 32, 1]
    assert all(k.floor_s == k.launches * kp.GEMM_FLOOR_S for k in gemms)
    attention = kernels[names.index("paged attention")]
    # each sequence's 2,048 tokens of KV, a layer at a time
    assert attention.bytes >= 8 * 2048 * size.kv_bytes_per_token
    # a batch that fills the GPU launches no merge kernel
    wide = kp.step_kernels(cfg, size, gpu, 64, 1, 2047, True, eff)
    assert "split-KV merge" not in [k.name for k in wide]
    # prefill in chunks: each chunk one step, attending to the chunks before it
    pre = kp.prefill_roofline(cfg, size, gpu, 3000, eff, chunk=1024)
    steps = [kp.step_kernels(cfg, size, gpu, 1, n, start, False, eff)
             for start, n in ((0, 1024), (1024, 1024), (2048, 952))]
    assert pre.steps == 3
    assert pre.gpu_s == pytest.approx(sum(k.seconds for step in steps for k in step))
    assert pre.host_s == pytest.approx(3 * 32 * kp.PREFILL_HOST_S_PER_LAYER)
    # the same FLOPs as one step, but for the logits row each chunk computes
    whole = kp.prefill_roofline(cfg, size, gpu, 3000, eff)
    assert pre.flops - whole.flops == pytest.approx(2 * 2 * cfg.vocab_size * cfg.hidden_size)
    # a kernel bound by its floor: SmolLM2's GEMMs at batch 1 take the floor
    smol = _cfg("smollm2")
    for k in kp.step_kernels(smol, kp.model_size(smol, "bf16"), gpu, 1, 1, 127, True, eff):
        if k.name in ("QKV GEMM", "O GEMM", "down GEMM"):
            assert k.bound == "floor" and k.seconds == pytest.approx(30 * kp.GEMM_FLOOR_S)


def test_efficiency_validation():
    with pytest.raises(kp.PlanError, match="efficiency gemm_compute must be in"):
        kp.Efficiency(gemm_compute=1.5)
    with pytest.raises(kp.PlanError, match="efficiency attention_memory must be in"):
        kp.Efficiency(attention_memory=0)
    with pytest.raises(kp.PlanError, match="floor gemm_floor must be >= 0"):
        kp.Efficiency(gemm_floor=-1e-6)
    with pytest.raises(kp.PlanError, match="floor decode_host_per_layer must be >= 0"):
        kp.Efficiency(decode_host_per_layer=float("nan"))
    with pytest.raises(kp.PlanError, match="batch >= 1"):
        kp.step_kernels(_cfg("smollm2"), kp.model_size(_cfg("smollm2"), "bf16"),
                        kp.GPUS["h200"], 0, 1, 10, True)
    eff = kp.Efficiency(kernel_floor=0, decode_host_per_layer=0)
    cfg = _cfg("smollm2")
    dec = kp.decode_roofline(cfg, kp.model_size(cfg, "bf16"), kp.GPUS["h200"], 1, 128, eff)
    assert dec.host_s == 0 and dec.seconds == dec.gpu_s


def test_bisection_finds_the_smallest_capacity():
    def rate(c: int) -> float:
        return min(1.0, c / 1000)

    cap, got, ok = kp.smallest_capacity(rate, 0.5, 4000, tolerance=0.001)
    assert ok and 500 <= cap <= 504 and got >= 0.5
    assert kp.smallest_capacity(rate, 0.0, 4000) == (0, 0.0, True)
    cap, got, ok = kp.smallest_capacity(rate, 2.0, 4000)
    assert not ok and cap == 4000


def test_tier_sizing_on_the_store_simulation():
    work = wl.generated_shared_prefix_workload(8, 4, system_prompt_len=256, question_len=32,
                                               output_len=32)
    largest = max(len(r.keys) for r in work.requests)
    tiers = kp.size_tiers(work, gpu_blocks=largest, kv_bytes_per_token=1000,
                          prefill_s_per_token=1e-4)
    assert tiers.infinite_hit_rate == pytest.approx(kp.infinite_hit_rate(work))
    assert tiers.infinite_hit_rate > 0.5
    assert tiers.gpu_hit_rate < 0.9 * tiers.infinite_hit_rate  # the GPU alone falls short
    caps = [t.blocks for t in tiers.host]
    assert caps == sorted(caps) and caps[0] > 0
    step = max(1, int(tiers.footprint_blocks * 0.02))
    for t in tiers.host:
        goal = t.fraction * tiers.infinite_hit_rate
        assert t.reachable and t.hit_rate >= goal
        assert t.hit_rate == kp.simulated_hit_rate(work, tiers.gpu_blocks, t.blocks)
        # smallest to within the bisection's tolerance
        assert kp.simulated_hit_rate(work, tiers.gpu_blocks, max(0, t.blocks - step - 1)) < goal
        assert t.bytes == t.blocks * work.block_size * 1000
        assert t.int8_bytes == t.blocks * work.block_size * 500  # default: half
        assert t.prefill_saved_s == pytest.approx(t.hit_rate * work.prompt_tokens * 1e-4)
    for t in tiers.disk:  # disk right behind the GPU (no host tier): write-through
        assert t.reachable and t.hit_rate >= t.fraction * tiers.infinite_hit_rate
        assert t.hit_rate == kp.simulated_hit_rate(work, tiers.gpu_blocks, 0, t.blocks,
                                                   "write-through")
    behind = kp.size_tiers(work, largest, 1000, 1e-4, host_blocks=tiers.host[0].blocks // 2)
    for t in behind.disk:  # behind a host tier too small alone: the write-back cascade
        assert t.reachable and t.blocks > 0
        assert t.hit_rate == kp.simulated_hit_rate(work, largest, behind.host_blocks, t.blocks)


def test_cli_text_json_and_errors(capsys):
    assert kp.main(["--model", "llama2-7b", "--dtype", "fp16", "--context", "4096",
                    "--gpu", "A100-80GB"]) == 0
    text = capsys.readouterr().out
    assert "6,738,415,616 (6.74 B)" in text and "13.48 GB" in text
    assert "512.0 KiB a token" in text and "2.0 GiB for 4,096 tokens" in text
    assert kp.main(["--model", "llama3-8b", "--context", "2048", "--concurrency", "8",
                    "--gpu", "H200", "--workload", "generated", "--quick", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["size"]["kv_bytes_per_token"] == 131072
    assert data["gpu"]["name"] == "H200"
    assert [t["fraction"] for t in data["tiers"]["host"]] == [0.9, 0.95, 0.99]
    assert kp.main(["--model", "nope", "--context", "10"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: one line, status 2
        kp.main(["--model", "smollm2", "--dtype", "fp4", "--context", "10"])
    assert exit_info.value.code == 2
    assert "argument --dtype: invalid choice: 'fp4'" in capsys.readouterr().err
    assert kp.main(["--model", "smollm2", "--context", "100000"]) == 2
    assert "exceeds the model's context of 8192" in capsys.readouterr().err


def test_measured_ceilings_on_this_device():
    spec = kp.measure_device("cuda" if torch.cuda.is_available() else "cpu", seconds=0.05)
    assert spec.source == "measured"
    assert spec.flops > 0 and spec.bandwidth > 0 and spec.pcie > 0 and spec.memory_bytes > 0


def test_plan_bench_on_cpu_measures_and_compares(capsys):
    """The validation bench end to end on this device at tiny sizes: every row has a plan
    and a measurement; with --gpu-kv-bytes both pools are that size, so the largest batch
    the store really holds must equal the plan's."""
    from bench import plan_bench

    block = 737_280  # SmolLM2's float32 KV block (16 tokens), the CPU run's dtype
    assert plan_bench.main(["--device", "cpu", "--context", "32", "--batch", "2", "--steps",
                            "2", "--repeat", "1", "--gpu-kv-bytes", str(12 * block),
                            "--chunk", "64"]) == 0
    out = capsys.readouterr().out
    assert "[smollm2]" in out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    largest = lines["largest batch at 32 tokens"].split()
    assert largest[-3] == largest[-2] == "6"  # 12 blocks / 2 blocks a sequence
    for key in ("TTFT, 32-token prompt", "decode step, batch 1", "decode step, batch 2",
                "decode step, batch 6 (largest)"):
        assert key in lines and lines[key].count(" ms") == 2


def test_a_table_gpu_plans_at_what_its_copy_and_matmul_reach():
    """The efficiencies are fractions of measured ceilings: a plan from the H200's data
    sheet lands within a few percent of one from the H200's measured ceilings."""
    name, cfg = kp.resolve_model("llama3-8b")
    table = kp.resolve_gpu("h200")
    measured = kp.GPUSpec("H200", table.memory_bytes, 4.131e12, 742.66e12, 55e9, "measured")
    assert measured.reached_bandwidth == measured.bandwidth
    assert table.reached_bandwidth < table.bandwidth and table.reached_flops < table.flops
    a = kp.make_plan(name, cfg, "bf16", 2048, 64, table)
    b = kp.make_plan(name, cfg, "bf16", 2048, 64, measured)
    for x, y in ((a.prefill, b.prefill), (a.decode_one, b.decode_one),
                 (a.decode_batch, b.decode_batch)):
        assert x.seconds == pytest.approx(y.seconds, rel=0.05)


@pytest.mark.parametrize(("change", "key"), [
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": [64]}, "hidden_size"),
    ({"hidden_size": 64.5}, "hidden_size"),
    ({"eos_token_id": {"a": 1}}, "eos_token_id"),
    ({"vocab_size": float("inf")}, "vocab_size"),
    ({"num_hidden_layers": "x"}, "num_hidden_layers"),
])
def test_a_malformed_config_json_is_one_line_naming_the_key(tmp_path, capsys, change, key):
    path = tmp_path / "x.json"
    # json.dumps writes inf as Infinity; a literal 1e400 reads back as inf too
    path.write_text(json.dumps({**kp.named_model_configs()["tiny"], **change}))
    assert kp.main(["--model", str(path), "--context", "10", "--gpu", "H100"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("kvstore plan: ")
    assert f"config.json {key} must be" in err


def _trace(path, lengths_and_ids):
    """A Mooncake trace file: one record a (input_length, hash_ids), 1 s apart."""
    path.write_text("".join(
        json.dumps({"timestamp": 1000 * i, "input_length": n, "output_length": 16,
                    "hash_ids": ids}) + "\n"
        for i, (n, ids) in enumerate(lengths_and_ids)))
    return path


def test_tier_sizing_simulates_the_real_pool_and_leaves_out_what_a_server_refuses(tmp_path):
    """The GPU tier is the pool the plan found, not inflated to the largest request; a
    request beyond the model's context or the pool is left out and counted."""
    trace = _trace(tmp_path / "t.jsonl", [
        (1024, [1, 2]), (1024, [1, 3]), (1024, [1, 2]), (2048, [1, 2, 4, 5]),
        (8192, list(range(1, 17))), (7000, list(range(1, 15)))])
    work = wl.mooncake_workload(trace)
    assert work.block_size == 512
    tiers = kp.size_tiers(work, gpu_blocks=3, kv_bytes_per_token=1000,
                          prefill_s_per_token=1e-4, context_tokens=4096)
    assert tiers.gpu_blocks == 3  # was max(3, 16 blocks of the largest request)
    assert (tiers.workload_requests, tiers.requests) == (6, 3)
    assert (tiers.over_context, tiers.over_pool) == (2, 1)  # 8,192 and 7,000; 2,048 > 1,536
    assert tiers.longest_tokens == 8192 and tiers.max_request_tokens == 3 * 512
    assert tiers.prompt_tokens == 3 * 1024
    admitted = wl.mooncake_workload(trace, limit=3)
    assert tiers.gpu_hit_rate == kp.simulated_hit_rate(admitted, 3)
    assert tiers.infinite_hit_rate == kp.infinite_hit_rate(admitted)
    with pytest.raises(kp.PlanError, match="no request of the workload mooncake fits"):
        kp.size_tiers(work, 1, 1000, 1e-4, context_tokens=4096)
    with pytest.raises(kp.PlanError, match="holds no 512-token block"):
        kp.size_tiers(work, 0, 1000, 1e-4)


def test_cli_says_how_many_requests_exceed_the_context(tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl", [
        (1024, [1, 2]), (1024, [1, 3]), (1024, [1, 2]), (4096, [1, 2, 4, 5, 6, 7, 8, 9])])
    args = ["--model", "tiny", "--context", "1024", "--gpu", "L4", "--workload", "mooncake",
            "--trace", str(trace)]
    assert kp.main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    t = data["tiers"]
    assert (t["workload_requests"], t["requests"], t["over_context"]) == (4, 3, 1)
    assert t["longest_tokens"] == 4096 and t["max_request_tokens"] == 2048
    assert t["gpu_blocks"] == data["memory"]["kv_pool_tokens"] // 512
    assert kp.main(args) == 0
    text = capsys.readouterr().out
    assert ("of 4: left out 1 longer than the model's context of 2,048 tokens (longest "
            "4,096 tokens), as a server refuses them") in text
    assert f"GPU pool alone ({t['gpu_blocks']:,} blocks of 512 = " in text


def test_activations_hold_logits_of_the_batch_that_can_run():
    """--concurrency beyond what fits sizes the logits for the largest batch, not for every
    requested sequence (150,000 rows of fp32 logits are 72 GiB: the plan blamed the
    weights, which fit)."""
    name, cfg = kp.resolve_model("llama3-8b")
    gpu = kp.GPUS["h100-sxm"]
    plan = kp.make_plan(name, cfg, "bf16", 8192, 150_000, gpu)
    m = plan.memory
    assert plan.runs and 0 < m.max_batch < 150_000 and not m.fits
    assert m.logits_rows == m.max_batch == plan.decode_batch_size
    assert m.activations == kp.activation_bytes(cfg, 2, kp.MAX_NUM_BATCHED_TOKENS, m.max_batch)
    assert not any("do not fit" in n for n in plan.notes)
    assert any(f"exceeds the largest batch ({m.max_batch})" in n for n in plan.notes)
    # the largest batch: it fits with its own logits, one more does not
    at = kp.make_plan(name, cfg, "bf16", 8192, m.max_batch, gpu).memory
    assert at.fits and at.max_batch == m.max_batch and at.kv_pool_bytes == m.kv_pool_bytes
    assert not kp.make_plan(name, cfg, "bf16", 8192, m.max_batch + 1, gpu).memory.fits


def test_nothing_fits_prints_no_latency_and_blames_the_right_part(capsys):
    cfg = _cfg("llama3-8b")
    # the weights fit 72% of an L4, the weights and one step's activations do not
    plan = kp.make_plan("llama3-8b", cfg, "bf16", 8192, 1, kp.GPUS["l4"], utilization=0.72)
    assert not plan.runs and plan.memory.kv_pool_bytes == 0
    assert plan.size.weights_bytes < plan.memory.usable
    assert any("(15.0 GiB) fit in 72%" in n and "activations" in n for n in plan.notes)
    assert kp.main(["--model", "llama3-8b", "--context", "8192", "--gpu", "L4",
                    "--memory-utilization", "0.72"]) == 0
    text = capsys.readouterr().out
    assert "decode     batch" not in text and "prefill    8,192" not in text
    assert "latency    none: no sequence of 8,192 tokens fits" in text
    assert kp.main(["--model", "llama3.1-8b", "--context", "131072", "--gpu", "L4",
                    "--workload", "generated", "--quick", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runs"] is False and data["memory"]["max_batch"] == 0
    assert data["tiers"] is None  # its prefill rate would be of a prefill that cannot run
    assert any(n.startswith("no tier sizing: it needs the prefill rate") for n in data["notes"])
    assert data["prefill"] is None and data["decode_one"] is None
    assert data["decode_batch"] is None
    assert any("one sequence of 131,072 tokens" in n for n in data["notes"])


def test_efficiencies_say_their_baseline(capsys):
    """--prefill/--decode-efficiency are fractions of what a matmul and a copy reach (for
    a table GPU 0.75 and 0.86 of its data sheet), not of the data sheet's peak: the help,
    the printout and the JSON say so."""
    help_text = kp.build_parser().format_help()
    assert "fraction of peak FLOP/s" not in help_text
    assert "fraction of HBM bandwidth" not in help_text
    assert "0.60 of a table GPU's peak" in " ".join(help_text.split())
    assert "0.77 of a table GPU's HBM bandwidth" in " ".join(help_text.split())
    args = ["--model", "llama3-8b", "--context", "2048", "--gpu", "H100"]
    assert kp.main([*args, "--prefill-efficiency", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "GEMMs 50% of FLOP/s = 38% of the data sheet's" in text  # 0.5 x 0.75
    assert "90% of bandwidth = 77% of the data sheet's" in text  # 0.9 x 0.86
    assert kp.main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"]["reached_flops"] == pytest.approx(989e12 * kp.TABLE_FLOPS_REACHED)
    assert data["gpu"]["reached_bandwidth"] == pytest.approx(3.35e12 * 0.86)
    assert "gpu.reached_flops" in data["efficiency_of"]
    # the roofline divides by the reached ceiling: a compute-bound GEMM's time shows it
    cfg = _cfg("llama3-8b")
    size = kp.model_size(cfg, "bf16")
    gemm = next(k for k in kp.step_kernels(cfg, size, kp.GPUS["h100-sxm"], 1, 2048, 0, False)
                if k.name == "gate/up GEMM")
    assert gemm.bound == "compute"
    assert gemm.compute_s == pytest.approx(gemm.flops / (989e12 * 0.75 * 0.8))


@pytest.mark.parametrize(("extra", "message"), [
    (["--host-bytes", "64GiB"], "--host-bytes only applies to sizing the host and disk tiers"),
    (["--quick"], "--quick only applies to sizing"),
    (["--trace", "t.jsonl", "--quick"], "--quick and --trace only apply to sizing"),
    (["--workload", "generated", "--trace", "t.jsonl"],
     "--trace is a Mooncake trace: give it with --workload mooncake"),
    (["--gpu", ""], "argument --gpu: the GPU name is empty"),
    (["--gpu", "  "], "argument --gpu: the GPU name is empty"),
])
def test_options_that_would_be_ignored_are_argparse_errors(capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        kp.main(["--model", "tiny", "--context", "100", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_model_names_empty_model_and_bad_trace(tmp_path, capsys):
    config = tmp_path / "audit" / "l2.json"
    config.parent.mkdir()
    config.write_text(json.dumps(kp.named_model_configs()["tiny"]))
    assert kp.resolve_model(str(config))[0] == "l2"  # the file, not its directory
    (tmp_path / "audit" / "config.json").write_text(config.read_text())
    assert kp.resolve_model(str(tmp_path / "audit" / "config.json"))[0] == "audit"
    assert kp.resolve_model(str(tmp_path / "audit"))[0] == "audit"
    with pytest.raises(kp.PlanError, match="--model is empty: give one of smollm2"):
        kp.resolve_model("")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(kp.PlanError, match="cannot read .* as JSON"):
        kp.resolve_model(str(binary))
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 1, "input_length": "x", "hash_ids": []}\n')
    assert kp.main(["--model", "tiny", "--context", "100", "--gpu", "L4", "--workload",
                    "mooncake", "--trace", str(trace)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kvstore plan: {trace}:1: input_length must be an integer >= 0, got 'x'"


def test_json_has_what_the_table_shows(capsys):
    assert kp.main(["--model", "llama3-8b", "--context", "4096", "--concurrency", "300",
                    "--gpu", "H100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["max_position_embeddings"] == 8192
    assert data["config"]["max_context_len"] == 8192
    assert 0 < data["decode_batch_size"] == data["memory"]["max_batch"] < 300
    assert data["runs"] is True

"""``kvstore bench engine``'s baselines and first-turn measurement, on CPU with small
models: transformers' continuous batching runs the engine's requests on the engine's
weights with each request's own output length (and, in fp32, gives the engine's greedy
tokens), and ``--first-turn`` starts fresh chat engines and reports their TTFTs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import engine_bench
from engine.llm import LLM
from engine.sampling import SamplingParams

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}
REQUESTS = [([5, 9, 33, 70, 2, 8], 7), ([100, 200, 300], 12), ([7] * 40, 3), ([11, 12], 9),
            ([400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415,
              416, 417], 5)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def engine_and_hf(tiny):
    """The engine's greedy tokens for REQUESTS (fp32, CPU) and a transformers model
    holding the same weights."""
    pytest.importorskip("transformers")
    with LLM(str(tiny), load_format="dummy", device="cpu", dtype="float32",
             gpu_blocks=64) as llm:
        ours = [llm.generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[0]
                .outputs[0].token_ids for p, n in REQUESTS]
        hf = engine_bench.hf_model(llm.model, llm.loaded.config.to_hf_dict(),
                                   torch.device("cpu"))
    return ours, hf


SMALL_CACHE = {"num_blocks": 16, "max_batch_tokens": 256, "block_size": 64}


def test_transformers_continuous_batching_runs_the_engines_requests(engine_and_hf):
    ours, hf = engine_and_hf
    result = engine_bench.hf_continuous_batching(hf, REQUESTS, cb_options=SMALL_CACHE,
                                                 warmup_requests=2)
    assert [len(o) for o in result.output_ids] == [n for _, n in REQUESTS]
    assert result.output_tokens == sum(n for _, n in REQUESTS) and result.seconds > 0
    assert "per-request max_new_tokens" in result.method and result.attention
    assert result.output_ids == ours  # same weights, same greedy tokens
    assert engine_bench.hf_static_seconds(hf, REQUESTS[:2], 2) > 0


def test_continuous_batching_retries_with_sdpa_when_it_cannot_start(engine_and_hf,
                                                                     monkeypatch):
    ours, hf = engine_and_hf
    real = hf.continuous_batching_context_manager
    seen = []

    def flaky(**kwargs):
        seen.append(kwargs.get("continuous_batching_config"))
        if len(seen) == 1:
            raise RuntimeError("flash kernel could not be loaded")
        return real(**kwargs)

    monkeypatch.setattr(hf, "continuous_batching_context_manager", flaky, raising=False)
    result = engine_bench.hf_continuous_batching(hf, REQUESTS, cb_options=SMALL_CACHE,
                                                 warmup_requests=1)
    assert "retried with sdpa after: flash kernel" in result.method
    assert result.output_ids == ours and len(seen) == 2
    assert "sdpa" in result.attention


def test_generate_batch_by_output_length(engine_and_hf):
    import transformers

    ours, hf = engine_and_hf
    gen_cfg = transformers.GenerationConfig(max_new_tokens=12, do_sample=False,
                                            eos_token_id=-1)
    result = engine_bench._generate_batch_by_length(
        hf, REQUESTS, gen_cfg, engine_bench._cb_config(SMALL_CACHE), "x")
    assert result.method == f"generate_batch per output length ({len(REQUESTS)} calls)"
    assert result.output_ids == ours


def test_continuous_batching_unavailable_is_one_clear_error():
    class Old:
        pass

    with pytest.raises(engine_bench.BaselineUnavailable, match="continuous batching"):
        engine_bench.hf_continuous_batching(Old(), REQUESTS)


def test_first_turn_child_starts_the_chat_engine_and_times_two_turns(tmp_path, capsys):
    spec = {"home": str(tmp_path), "warmup": True, "device": "cpu", "dtype": None,
            "model_cache_dir": None, "max_tokens": 3}
    assert engine_bench.main(["--first-turn-child", json.dumps(spec)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("first-turn-result ")
    result = json.loads(line.removeprefix("first-turn-result "))
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert 0 < result["warmup_s"] < result["construct_s"]
    first, second = result["turns"]
    assert first["cached_tokens"] == 0 and second["cached_tokens"] > 0
    assert first["ttft_s"] > 0 and second["ttft_s"] > 0
    assert (tmp_path / "disk").is_dir()  # a fresh disk tier, never the user's


def test_first_turn_runs_fresh_processes_and_prints_medians(tmp_path, capsys):
    # Real child processes: the chat demo's engine started fresh, with and without the
    # warm-up (on a CPU the warm-up is forced on for the "on" row), two turns each.
    out = tmp_path / "out"
    assert engine_bench.main(["--no-ttft", "--first-turn", "--first-turn-runs", "1",
                              "--first-turn-max-tokens", "3", "--device", "cpu",
                              "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "First chat turn after start" in text and "median of 1" in text
    rows = json.loads((out / "first_turn.json").read_text())
    assert [(r["kernel_cache"], r["warmup"]) for r in rows] == [("-", True), ("-", False)]
    for r in rows:
        assert r["device"] == "cpu" and len(r["runs"]) == 1
        assert r["construct_s"] > 0 and all(t > 0 for t in r["ttft_ms"])
        first, second = r["runs"][0]["turns"]
        assert first["cached_tokens"] == 0 and second["cached_tokens"] > 0
        assert first["output_tokens"] <= 3 and r["prompt_tokens"][1] > r["prompt_tokens"][0]
    assert rows[0]["warmup_s"] > 0 and rows[1]["warmup_s"] is None

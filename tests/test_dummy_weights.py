"""Dummy weights (``load_format="dummy"``): real shapes, deterministic random values,
their own fingerprint, and an engine on them that obeys the cache's correctness rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import NAMED_SHAPES, ModelConfig
from engine.llm import LLM
from engine.loader import (
    DummyWeights,
    available_host_memory,
    dummy_model,
    model_config,
    resolve_model,
)
from engine.sampling import SamplingParams

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50000,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY))
    return path


@pytest.mark.parametrize("name", sorted(NAMED_SHAPES))
def test_named_shapes_are_valid_configs(name: str) -> None:
    config = ModelConfig.from_hf_dict(NAMED_SHAPES[name])
    assert model_config(name, load_format="dummy") == config
    weights = DummyWeights(config)
    assert "model.embed_tokens.weight" in weights and "nope" not in weights
    assert len(weights) == len(list(weights))


def test_llama3_8b_shape_is_the_real_one() -> None:
    c = model_config("llama3-8b", load_format="dummy")
    params = (2 * c.vocab_size * c.hidden_size + c.num_layers * (
        c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size))
    assert 8.0e9 < params < 8.1e9  # Llama-3-8B: 8.03 B parameters
    assert c.kv_layout(16, "bfloat16").block_bytes == 16 * 32 * 2 * 8 * 128 * 2
    assert model_config("llama3.1-8b", load_format="dummy").max_context_len == 131072


def test_weights_are_deterministic_and_seeded(tiny_config: Path) -> None:
    a = dummy_model(tiny_config)
    b = dummy_model(tiny_config.parent)  # a directory holding config.json
    c = dummy_model(tiny_config, seed=1)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(a.weights[name], b.weights[name])
    assert torch.equal(a.weights[name], a.weights[name])  # every read is the same
    assert not torch.equal(a.weights[name], c.weights[name])
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint != dummy_model(tiny_config, dtype="bfloat16").fingerprint
    w = a.weights[name]
    assert w.shape == (64, 128) and w.dtype == torch.float32
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(a.weights["model.norm.weight"], torch.ones(64))
    assert a.tokenizer is None and a.path is None and a.name == "tiny-dummy"


def test_a_shape_too_large_for_memory_is_refused_before_allocating() -> None:
    # Llama-3-70B in fp32: 263 GiB of weights. It used to be accepted, then grew until
    # the OOM killer ended the process while the model copied the weights in.
    need = 70_553_706_496 * 4
    free = available_host_memory()
    assert free is not None and free > 0
    if free >= need:
        pytest.skip("this machine has room for Llama-3-70B in fp32")
    for build in (lambda: dummy_model("llama3-70b", device="cpu"),
                  lambda: resolve_model("llama3-70b", load_format="dummy", dtype="float32")):
        with pytest.raises(ValueError, match=r"llama3-70b: 262.8 GiB of float32 weights "
                                             r"\(70,553,706,496 parameters\), but only .* GiB of "
                                             r"host memory available; pick a smaller shape"):
            build()
    assert dummy_model("tiny").config.hidden_size == 64  # small shapes are unchanged


def test_dummy_model_differs_from_the_real_one() -> None:
    real = resolve_model("smollm2")
    fake = resolve_model("smollm2", load_format="dummy", tokenizer="smollm2")
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
             "num_kv_heads", "head_dim", "tie_word_embeddings", "rope_theta")
    assert all(getattr(fake.config, k) == getattr(real.config, k) for k in shape)
    assert fake.fingerprint != real.fingerprint
    assert fake.tokenizer is not None
    assert fake.tokenizer.encode("hello world") == real.tokenizer.encode("hello world")


def test_bad_arguments_name_what_to_change(tiny_config: Path) -> None:
    with pytest.raises(ValueError, match="unknown dummy model shape"):
        dummy_model("llama9-1t")
    with pytest.raises(ValueError, match="load format"):
        resolve_model("smollm2", load_format="fast")
    with pytest.raises(ValueError, match="only be chosen for dummy"):
        resolve_model("smollm2", tokenizer="smollm2")
    with pytest.raises(ValueError, match="tokenizer"):
        dummy_model(tiny_config, tokenizer="gpt5")
    small = dict(TINY, vocab_size=1000)
    tiny_config.write_text(json.dumps(small))
    with pytest.raises(ValueError, match="more than the 1000"):
        dummy_model(tiny_config, tokenizer="smollm2")


def test_activations_stay_finite_in_bf16(tiny_config: Path) -> None:
    """Every layer's output stays finite and moderate through a bf16 engine run."""
    deep = dict(TINY, num_hidden_layers=16, hidden_size=256, intermediate_size=768)
    tiny_config.write_text(json.dumps(deep))
    outputs: list[torch.Tensor] = []
    with LLM(str(tiny_config), load_format="dummy", device="cpu", dtype="bfloat16",
             gpu_blocks=64) as llm:
        for layer in llm.model.layers:  # a layer returns (mlp_out, residual): output = sum
            layer.register_forward_hook(
                lambda _m, _i, out: outputs.append((out[1] + out[0]).detach()))
        out = llm.generate(list(range(3, 60)), SamplingParams(max_tokens=4, temperature=0.0,
                                                              ignore_eos=True))[0]
    assert len(outputs) == 16 * 4 and len(out.outputs[0].token_ids) == 4
    for x in outputs:
        assert x.dtype == torch.bfloat16 and torch.isfinite(x).all()
        assert x.float().abs().max() < 1e3


def test_llm_on_dummy_weights_cached_equals_uncached(tiny_config: Path) -> None:
    """Token-id prompts through the engine: a prompt extending a cached one gives the
    same greedy tokens as with prefix reuse off."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prefix = [(7 * i + 3) % 50000 for i in range(70)]
    second = prefix + [11, 12, 13, 14, 15]
    with LLM(str(tiny_config), load_format="dummy", device="cpu", gpu_blocks=64) as llm, \
            LLM(str(tiny_config), load_format="dummy", device="cpu", gpu_blocks=64,
                enable_cache=False) as cold:
        first = llm.generate(prefix, params)[0]
        assert first.cached_tokens == {} or sum(first.cached_tokens.values()) == 0
        warm = llm.generate(second, params)[0]
        assert sum(warm.cached_tokens.values()) >= 64
        assert warm.outputs[0].token_ids == cold.generate(second, params)[0].outputs[0].token_ids
        assert len(warm.outputs[0].token_ids) == 12
        assert llm.tokenizer is None


def test_write_queue_holds_two_steps_of_committed_blocks(tiny_config: Path,
                                                         tmp_path: Path) -> None:
    """The store's write queue takes at least two steps' worth of blocks (so one long
    prefill's publications are not dropped before the writer sees them), and never less
    than the store's default."""
    from kvstore.config import StoreConfig

    wide = dict(TINY, vocab_size=1000, hidden_size=256, num_hidden_layers=12,
                num_attention_heads=4, num_key_value_heads=4)  # 384 KiB fp32 blocks
    tiny_config.write_text(json.dumps(wide))
    with LLM(str(tiny_config), load_format="dummy", device="cpu", gpu_blocks=64,
             disk_path=str(tmp_path / "disk"), max_num_batched_tokens=8192) as llm:
        block = llm.store.config.layout.block_bytes
        assert block == 384 << 10
        assert llm.store.config.publish_queue_bytes == 2 * (8192 // 16) * block  # 384 MiB
        assert llm.store.config.publish_queue_bytes > StoreConfig.publish_queue_bytes
    with LLM(str(tiny_config), load_format="dummy", device="cpu", gpu_blocks=64,
             max_num_batched_tokens=64) as llm:
        assert llm.store.config.publish_queue_bytes == StoreConfig.publish_queue_bytes


def test_describe_says_how_long_each_part_of_the_start_took(tiny_config: Path) -> None:
    """The server logs these lines at start: a slow start (a large pinned host tier, a
    long warm-up) shows which part it was."""
    with LLM(str(tiny_config), load_format="dummy", device="cpu", gpu_blocks=64) as llm:
        assert set(llm.startup_s) == {"model", "store", "warm-up"}
        assert all(s >= 0 for s in llm.startup_s.values())
        line = next(x for x in llm.describe() if x.startswith("started in "))
        for part in ("model", "store", "warm-up"):
            assert f"{part} " in line

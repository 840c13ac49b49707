"""Model config parsing, Hugging Face checkpoint loading, GGUF import and its disk cache,
and model fingerprints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ModelConfig, RopeScaling
from engine.loader import (
    MANIFEST,
    LoadedModel,
    import_gguf,
    load_checkpoint,
    resolve_dtype,
    resolve_model,
    smollm2_gguf_path,
    unpermute_qk,
)

transformers = pytest.importorskip("transformers")

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
}
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}
MISTRAL_V01 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
    "rope_theta": 10000.0, "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2,
}


def test_config_llama31() -> None:
    c = ModelConfig.from_hf_dict(LLAMA31_8B)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 8, 128)
    assert c.num_queries_per_kv == 4
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert c.eos_token_ids == (128001, 128008, 128009) and c.bos_token_id == 128000
    assert not c.attention_bias and not c.tie_word_embeddings
    assert c.max_context_len == 131072
    layout = c.kv_layout(16, "bfloat16")
    assert layout.block_shape == (32, 2, 16, 8, 128)
    assert layout.block_bytes == 32 * 2 * 16 * 8 * 128 * 2


def test_config_qwen2_and_mistral() -> None:
    q = ModelConfig.from_hf_dict(QWEN2_05B)
    assert q.attention_bias and not q.attention_out_bias and q.tie_word_embeddings
    assert q.sliding_window is None  # use_sliding_window is false
    m = ModelConfig.from_hf_dict(MISTRAL_V01)
    assert m.sliding_window == 4096 and m.max_context_len == 4096
    assert m.rms_norm_eps == 1e-6  # transformers' default when the key is absent


@pytest.mark.parametrize("hf", [LLAMA31_8B, QWEN2_05B, MISTRAL_V01])
def test_config_round_trips_through_hf_dict(hf: dict) -> None:
    c = ModelConfig.from_hf_dict(hf)
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c


def test_config_reads_transformers5_rope_parameters() -> None:
    hf = {**LLAMA31_8B, "rope_theta": None, "rope_scaling": None,
          "rope_parameters": {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}}
    assert ModelConfig.from_hf_dict(hf) == ModelConfig.from_hf_dict(LLAMA31_8B)
    legacy = {**LLAMA31_8B, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_hf_dict(legacy).rope_scaling == RopeScaling("linear", 2.0)


@pytest.mark.parametrize(("change", "message"), [
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "not supported"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "causal-LM head"),
    ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"vocab_size": None}, "vocab_size"),
    ({"eos_token_id": 200000}, "outside the vocabulary"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
])
def test_config_errors_say_what_to_change(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**LLAMA31_8B, **change})


@pytest.mark.parametrize(("change", "message"), [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"num_key_value_heads": -8}, "num_key_value_heads must be a positive integer"),
    ({"hidden_size": [4096]}, "hidden_size must be a positive integer"),
    ({"hidden_size": 4096.5}, "hidden_size must be a positive integer.*4096.5"),
    ({"hidden_size": True}, "hidden_size must be a positive integer"),
    ({"num_hidden_layers": "x"}, "num_hidden_layers must be a positive integer.*'x'"),
    ({"vocab_size": float("inf")}, "vocab_size must be a positive integer.*inf"),
    ({"vocab_size": 2**40}, "vocab_size must be a positive integer.*at most"),
    ({"intermediate_size": float("nan")}, "intermediate_size must be a positive integer"),
    ({"head_dim": 0}, "head_dim must be a positive integer"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ({"eos_token_id": {"a": 1}}, "eos_token_id must be a token id"),
    ({"eos_token_id": [128001, 1.5]}, "eos_token_id must be a token id"),
    ({"bos_token_id": "<s>"}, "bos_token_id must be a token id"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number"),
    ({"rope_theta": [500000.0]}, "rope_theta must be a finite number"),
    ({"rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": "8"}},
     "rope_scaling.factor must be a finite number"),
    ({"rope_scaling": {**LLAMA31_8B["rope_scaling"],
                       "original_max_position_embeddings": 8192.5}},
     "rope_scaling.original_max_position_embeddings must be a positive integer"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be an object"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"attention_bias": 1}, "attention_bias must be true or false"),
    ({"architectures": {"a": 1}}, "architectures must be a list"),
    ({"model_type": ["llama"]}, "model_type must be a string"),
    ({"torch_dtype": 16}, "torch_dtype must be a dtype name"),
])
def test_malformed_config_values_name_the_key(change: dict, message: str) -> None:
    """Wrong types and ranges are a ValueError naming the key, never a ZeroDivisionError,
    a TypeError, an OverflowError or a silently truncated float."""
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**LLAMA31_8B, **change})


def test_integral_floats_and_numpy_ints_still_load() -> None:
    """A size written 4096.0, or a numpy integer (GGUF metadata), is the same config."""
    as_floats = {**LLAMA31_8B, "hidden_size": 4096.0, "num_hidden_layers": np.int64(32),
                 "eos_token_id": [128001.0, 128008, 128009]}
    assert ModelConfig.from_hf_dict(as_floats) == ModelConfig.from_hf_dict(LLAMA31_8B)


def test_resolve_dtype() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (HF -> GGUF row order)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize(("heads", "head_dim", "cols"), [(9, 64, 576), (3, 64, 576), (4, 8, 0)])
def test_unpermute_inverts_llama_cpp_permute(heads: int, head_dim: int, cols: int) -> None:
    shape = (heads * head_dim, cols) if cols else (heads * head_dim,)  # weight or bias
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = llama_permute(w, heads)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_qk(permuted, heads), w)


def save_tiny(path: Path, *, tie: bool = False, dtype: torch.dtype = torch.float32,
              shard: str | None = None, seed: int = 0):
    """A random tiny Llama checkpoint saved by transformers; returns the HF model."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return model


def test_load_hf_checkpoint(tmp_path: Path) -> None:
    hf = save_tiny(tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", cache_dir=tmp_path / "cache")
    assert loaded.config.num_layers == 2 and loaded.config.num_kv_heads == 2
    assert loaded.tokenizer is None  # no tokenizer.json: a weights-only checkpoint
    assert loaded.path == (tmp_path / "ckpt").resolve() and not loaded.converted
    assert len(loaded.fingerprint) == 32
    reference = hf.state_dict()
    assert set(loaded.weights) == set(reference)
    for name, tensor in loaded.weights.items():
        assert torch.equal(tensor, reference[name]), name
    half = load_checkpoint(tmp_path / "ckpt", cache_dir=tmp_path / "cache", dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in half.weights.values())
    assert half.fingerprint == loaded.fingerprint  # identity of the stored weights


def test_load_sharded_and_tied_checkpoints(tmp_path: Path) -> None:
    save_tiny(tmp_path / "one")
    save_tiny(tmp_path / "sharded", shard="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one = load_checkpoint(tmp_path / "one", cache_dir=tmp_path / "cache")
    sharded = load_checkpoint(tmp_path / "sharded", cache_dir=tmp_path / "cache")
    assert one.fingerprint == sharded.fingerprint  # content, not file layout
    save_tiny(tmp_path / "tied", tie=True)
    tied = load_checkpoint(tmp_path / "tied", cache_dir=tmp_path / "cache")
    assert tied.config.tie_word_embeddings and "lm_head.weight" not in tied.weights


def test_fingerprint_tracks_weights_and_dtype(tmp_path: Path) -> None:
    save_tiny(tmp_path / "a", seed=0)
    save_tiny(tmp_path / "b", seed=1)
    save_tiny(tmp_path / "c", seed=0, dtype=torch.bfloat16)
    prints = {d: load_checkpoint(tmp_path / d, cache_dir=tmp_path / "cache").fingerprint
              for d in "abc"}
    assert len(set(prints.values())) == 3
    assert load_checkpoint(tmp_path / "a", cache_dir=tmp_path / "x").fingerprint == prints["a"]


def test_fingerprint_is_remembered_per_checkpoint_state(tmp_path: Path) -> None:
    save_tiny(tmp_path / "ckpt")
    first = load_checkpoint(tmp_path / "ckpt", cache_dir=tmp_path / "cache")
    remembered = list((tmp_path / "cache" / "fingerprints").glob("*.json"))
    assert len(remembered) == 1
    assert json.loads(remembered[0].read_text())["fingerprint"] == first.fingerprint
    # A later load reads the remembered value instead of hashing the weights again.
    remembered[0].write_text(json.dumps({"fingerprint": "f" * 32}))
    assert load_checkpoint(tmp_path / "ckpt", cache_dir=tmp_path / "cache").fingerprint == "f" * 32
    # Rewriting the weights changes the checkpoint state: hashed afresh.
    save_tiny(tmp_path / "ckpt", seed=5)
    os.utime(tmp_path / "ckpt" / "model.safetensors", ns=(1, 1))
    again = load_checkpoint(tmp_path / "ckpt", cache_dir=tmp_path / "cache")
    assert again.fingerprint not in ("f" * 32, first.fingerprint)


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
    hf = save_tiny(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        load_checkpoint(tmp_path / "bin")
    save_tiny(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ValueError, match="mlp.*shape"):
        load_checkpoint(tmp_path / "bad", cache_dir=tmp_path / "cache")


def test_resolve_model_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never downloaded"):
        resolve_model("meta-llama/Llama-3.1-8B-Instruct", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="never downloaded"):
        resolve_model(tmp_path / "missing", cache_dir=tmp_path)
    save_tiny(tmp_path / "ckpt")
    assert resolve_model(tmp_path / "ckpt", cache_dir=tmp_path).config.num_layers == 2


@pytest.fixture(scope="module")
def fresh_import(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    """SmolLM2 converted into an empty cache directory (this module's own)."""
    cache = tmp_path_factory.mktemp("fresh-cache")
    return cache, resolve_model("SmolLM2-135M-Instruct", cache_dir=cache)


def test_gguf_import_is_cached_on_disk(fresh_import: tuple[Path, LoadedModel]) -> None:
    cache, first = fresh_import
    assert first.converted
    assert first.path.parent == cache.resolve()
    assert first.path.name.startswith("SmolLM2-135M-Instruct-")
    files = {p.name for p in first.path.iterdir()}
    assert files == {"model.safetensors", "config.json", "generation_config.json",
                     "tokenizer.json", "tokenizer_config.json", MANIFEST}
    assert [p.name for p in cache.iterdir()] == [first.path.name]  # no temp dirs left
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns

    second = import_gguf(smollm2_gguf_path(), name="SmolLM2-135M-Instruct", cache_dir=cache)
    assert not second.converted
    assert (first.path / "model.safetensors").stat().st_mtime_ns == stamp
    assert second.path == first.path and second.fingerprint == first.fingerprint
    assert second.config == first.config
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.weight"):
        assert torch.equal(first.weights[name], second.weights[name])


def test_gguf_import_contents(fresh_import: tuple[Path, LoadedModel]) -> None:
    _, model = fresh_import
    c = model.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    assert model.stop_token_ids == frozenset({2})
    assert model.weights["model.embed_tokens.weight"].dtype == torch.float32
    manifest = json.loads((model.path / MANIFEST).read_text())
    assert manifest["fingerprint"] == model.fingerprint
    assert manifest["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_converted_fingerprint_is_a_function_of_content(
        fresh_import: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    """The converted checkpoint, seen as a plain HF dir without our manifest, hashes to the
    fingerprint recorded at conversion."""
    _, model = fresh_import
    for f in model.path.iterdir():
        if f.name != MANIFEST:
            (tmp_path / f.name).symlink_to(f)
    plain = load_checkpoint(tmp_path, cache_dir=tmp_path / "cache", dtype="bf16")
    assert plain.fingerprint == model.fingerprint
    assert plain.weights["model.norm.weight"].dtype == torch.bfloat16

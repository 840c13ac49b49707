"""The model's fused layout (residual stream carried apart, add + norm, RoPE + K/V write,
SiLU * up through engine/fused.py) against the unfused formulas it replaced, on the CPU.

On the CPU the model runs engine/fused.py's torch references, so its logits and the K/V it
writes must equal, bit for bit, the model as it was written before: ``x = x + attn(norm(x));
x = x + mlp(norm(x))`` with ``weight * F.rms_norm``, concatenated rotate-half RoPE,
``write_kv`` and ``F.silu(gate) * up`` (reproduced below from the model's own weights).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from engine import fused
from engine.attention import write_kv
from engine.batch import AttentionBatch, build_batch
from engine.config import ModelConfig
from engine.model import CausalLM

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 211,
        "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "max_position_embeddings": 512}
VARIANTS = {
    "llama3-gqa": {**BASE, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}},
    "mha-bias-tied": {**BASE, "num_key_value_heads": 6, "attention_bias": True,
                      "mlp_bias": True, "tie_word_embeddings": True},
    "qwen2": {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              "head_dim": 48, "num_attention_heads": 2, "num_key_value_heads": 1},
}


@torch.no_grad()
def unfused_forward(model: CausalLM, input_ids: Tensor, positions: Tensor,
                    batch: AttentionBatch, kv_pool: Tensor) -> Tensor:
    """The model's forward as written before engine/fused.py, on the same weights."""
    def norm(module: torch.nn.Module, x: Tensor) -> Tensor:
        return module.weight * F.rms_norm(x, (x.shape[-1],), eps=module.eps)

    def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    c = model.config
    x = model.embed_tokens(input_ids)
    freqs = positions[:, None].float() * model.rotary._inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        k_cache, v_cache = kv_pool[:, i, 0], kv_pool[:, i, 1]
        qkv = attn.qkv_proj(norm(layer.input_layernorm, x))
        t = qkv.shape[0]
        qk = qkv[:, :q_size + kv_size].view(t, c.num_heads + c.num_kv_heads, c.head_dim)
        q, k = rope(qk, cos, sin).split([c.num_heads, c.num_kv_heads], dim=1)
        v = qkv[:, q_size + kv_size:].view(t, c.num_kv_heads, c.head_dim)
        attn.backend.write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
        out = attn.backend.paged_attention(q, k_cache, v_cache, batch.block_tables,
                                           batch.query_start_loc, batch.seq_lens, attn.scale)
        x = x + attn.o_proj(out.reshape(t, q_size))
        gate, up = mlp.gate_up_proj(norm(layer.post_attention_layernorm, x)).chunk(2, dim=-1)
        x = x + mlp.down_proj(F.silu(gate) * up)
    x = norm(model.norm, x[batch.logits_indices])
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return F.linear(x, head).float()


def random_model(spec: dict, dtype: torch.dtype) -> CausalLM:
    model = CausalLM.empty(ModelConfig.from_hf_dict(spec), dtype=dtype, fused="torch")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return model


def two_steps(model: CausalLM, forward, pool: Tensor) -> list[Tensor]:
    """Prefills of two sequences, then one step mixing a prefill over a cached prefix, a
    decode, a fresh prefill and a padding row as the runner pads graphs (one token over
    block 5 that writes nothing: slot -1); logits of every token."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (64,), generator=gen)
    tables = [[6, 1, 4], [0, 3], [2, 7], [5]]
    out = []
    batch, pos = build_batch(tables[:2], [21, 9], [21, 9], 16)
    batch.logits_indices = torch.arange(30)
    out.append(forward(ids[:30], pos, batch, pool))
    batch, pos = build_batch(tables, [15, 1, 13, 1], [36, 10, 13, 1], 16)
    batch.slot_mapping[-1] = -1
    batch.logits_indices = torch.arange(30)
    out.append(forward(ids[30:60], pos, batch, pool))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_layout_equals_the_unfused_model(variant: str, dtype: torch.dtype) -> None:
    model = random_model(VARIANTS[variant], dtype)
    c = model.config
    stale = torch.randn(8, c.num_layers, 2, 16, c.num_kv_heads, c.head_dim,
                        generator=torch.Generator().manual_seed(4)).to(dtype)
    pools = [stale.clone(), stale.clone()]
    got = two_steps(model, model, pools[0])
    want = two_steps(model, lambda *a: unfused_forward(model, *a), pools[1])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert torch.equal(g, w), (g - w).abs().max()
    assert torch.equal(pools[0], pools[1])
    assert torch.equal(pools[0][5], stale[5])  # the padding row wrote nothing


def test_cpu_models_run_the_torch_formulas() -> None:
    model = random_model(VARIANTS["llama3-gqa"], torch.float32)
    assert not model.fused_kernels
    assert not model.set_fused("auto")
    assert not any(getattr(m, "use_triton", False) for m in model.modules())
    if fused.triton_usable("cpu"):  # TRITON_INTERPRET=1 with triton installed
        assert model.set_fused("triton") and model.fused_kernels
        assert all(m.self_attn.use_triton and m.mlp.use_triton for m in model.layers)
        assert not model.set_fused("torch")
    else:
        with pytest.raises(RuntimeError, match="cannot run"):
            model.set_fused("triton")


def test_select(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fused.select("cpu") is False
    assert fused.select("cpu", "torch") is False
    with pytest.raises(ValueError, match="prefer"):
        fused.select("cpu", "fastest")
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert fused.select("cuda") is False  # decided before any CUDA call
    assert fused.select("cuda", "torch") is False


@pytest.mark.skipif(_INTERPRET, reason="the dispatchers choose Triton under the interpreter")
def test_dispatchers_run_the_references_on_cpu() -> None:
    gen = torch.Generator().manual_seed(2)
    x, res, w = (torch.randn(5, 32, generator=gen) for _ in range(3))
    w = w[0]
    assert torch.equal(fused.rms_norm(x, w, 1e-5), fused.rms_norm_reference(x, w, 1e-5))
    for a, b in zip(fused.add_rms_norm(x, res, w, 1e-5),
                    fused.add_rms_norm_reference(x, res, w, 1e-5), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(fused.silu_mul(x), fused.silu_mul_reference(x))
    with pytest.raises(RuntimeError, match="cannot run"):
        fused.silu_mul(x, use_triton=True)
    pools = [torch.zeros(3, 1, 2, 4, 2, 8) for _ in range(2)]
    qkv = torch.randn(3, 6 * 8, generator=gen)
    cos, sin = torch.rand(3, 8, generator=gen), torch.rand(3, 8, generator=gen)
    slots = torch.tensor([0, -1, 9])
    q = fused.rope_write_kv(qkv, cos, sin, pools[0][:, 0, 0], pools[0][:, 0, 1], slots, 2, 2)
    q_ref = fused.rope_write_kv_reference(qkv, cos, sin, pools[1][:, 0, 0], pools[1][:, 0, 1],
                                          slots, 2, 2, write_kv)
    assert torch.equal(q, q_ref) and torch.equal(pools[0], pools[1])

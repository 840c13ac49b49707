"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over the paged KV pool.

Plain torch: RMSNorm, rotate-half RoPE (plain, linear or llama3-scaled frequencies),
grouped-query attention through an :class:`engine.attention.AttentionBackend`, SwiGLU
MLP, optional tied embeddings. Q/K/V and gate/up projections are fused into one matmul
each. Numerics follow transformers: norms in fp32, residual stream in the model dtype,
RoPE tables in fp32 cast to the model dtype, logits returned in fp32.

One :meth:`CausalLM.forward` runs a step of ``T`` tokens of ``B`` sequences (any mix
of prefill chunks and decodes), writing their K/V into the pool and returning logits
only for the rows named by ``batch.logits_indices``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import AttentionBackend, select_backend
from engine.batch import AttentionBatch
from engine.config import ModelConfig
from engine.loader import LoadedModel, resolve_dtype


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in fp32, returned in ``x``'s dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm upcasts to fp32 and casts the result back (one fused kernel on
        # CUDA); the weight multiplies in x's dtype, as in transformers.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse RoPE frequencies ``[head_dim / 2]`` fp32 (radians per position), with the
    config's linear or llama3 scaling applied."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary(nn.Module):
    """RoPE tables for the positions of one step. The inverse frequencies stay fp32
    whatever the model dtype (kept off the parameter/buffer lists on purpose)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self._inv_freq = rope_inv_freq(config)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` ``[T, 1, head_dim]`` in ``dtype`` for ``positions`` ``[T]``."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of ``x`` ``[T, heads, head_dim]`` by ``cos``/``sin`` ``[T, 1, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """GQA self-attention with fused QKV projection, over one layer of the KV pool."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        self.backend = backend
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_out_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """``x`` ``[T, hidden]`` -> ``[T, hidden]``; writes this step's K/V to the caches."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # RoPE on Q and K in one pass (the same elementwise ops, half the kernels).
        qk = qkv[:, :self.q_size + self.kv_size].view(
            num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        self.backend.write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
        out = self.backend.paged_attention(q, k_cache, v_cache, batch.block_tables,
                                           batch.query_start_loc, batch.seq_lens, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with gate and up fused."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size,
                                      bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size,
                                   bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """A Llama-family causal LM whose attention reads and writes the paged KV pool.

    Build with :meth:`from_loaded` (weights from a :class:`LoadedModel`) or
    :meth:`empty` + :meth:`load_weights`. Parameters live on one device in one dtype.
    """

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, backend)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    @classmethod
    def empty(cls, config: ModelConfig, *, dtype: torch.dtype | str = torch.float32,
              device: torch.device | str = "cpu",
              backend: AttentionBackend | str = "auto") -> CausalLM:
        """A model with uninitialised parameters (no random-init cost) in ``dtype`` on
        ``device``; ``backend`` is an :class:`AttentionBackend` or a ``select_backend``
        preference (``"auto"``, ``"torch"``, ``"triton"``)."""
        device = torch.device(device)
        if isinstance(backend, str):
            backend = select_backend(device, backend)
        with torch.device("meta"):
            model = cls(config, backend)
        # cast on the meta device first: never allocate (and copy) an fp32 copy of a
        # bf16 model (an 8B model would take 32 GB and seconds)
        model = model.to(resolve_dtype(dtype)).to_empty(device=device)
        return model.eval()

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu",
                    backend: AttentionBackend | str = "auto") -> CausalLM:
        """Build from a :class:`LoadedModel`; ``dtype`` ``None`` keeps the weights' dtype."""
        if dtype is None:
            dtype = loaded.weights["model.embed_tokens.weight"].dtype
        model = cls.empty(loaded.config, dtype=dtype, device=device, backend=backend)
        model.load_weights(loaded.weights)
        return model

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (also the dtype of the residual stream)."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.embed_tokens.weight.device

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, Tensor]) -> None:
        """Copy Hugging Face-named tensors in (cast to this model's dtype and device),
        fusing q/k/v and gate/up. Raises ``KeyError`` naming a missing tensor."""
        def take(name: str) -> Tensor:
            if name not in weights:
                raise KeyError(f"weights lack {name!r}")
            return weights[name]

        self.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
        self.norm.weight.copy_(take("model.norm.weight"))
        if self.lm_head is not None:
            self.lm_head.weight.copy_(take("lm_head.weight"))
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)  # ModuleList yields plain Modules
            p = f"model.layers.{i}."
            layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
            attn, mlp = layer.self_attn, layer.mlp
            for kind in ("weight", "bias"):
                fused = getattr(attn.qkv_proj, kind)
                if fused is not None:
                    fused.copy_(torch.cat([take(f"{p}self_attn.{n}_proj.{kind}")
                                           for n in ("q", "k", "v")], dim=0))
                if getattr(attn.o_proj, kind) is not None:
                    getattr(attn.o_proj, kind).copy_(take(f"{p}self_attn.o_proj.{kind}"))
                if getattr(mlp.gate_up_proj, kind) is not None:
                    getattr(mlp.gate_up_proj, kind).copy_(torch.cat(
                        [take(f"{p}mlp.gate_proj.{kind}"), take(f"{p}mlp.up_proj.{kind}")], dim=0))
                    getattr(mlp.down_proj, kind).copy_(take(f"{p}mlp.down_proj.{kind}"))

    def check_kv_pool(self, kv_pool: Tensor) -> None:
        """Raise ``ValueError`` unless ``kv_pool`` is
        ``[num_slots, num_layers, 2, block_size, num_kv_heads, head_dim]`` on our device."""
        c = self.config
        if (kv_pool.dim() != 6 or kv_pool.shape[1:3] != (c.num_layers, 2)
                or kv_pool.shape[4:] != (c.num_kv_heads, c.head_dim)):
            raise ValueError(
                f"kv_pool shape {tuple(kv_pool.shape)} is not [num_slots, {c.num_layers}, 2, "
                f"block_size, {c.num_kv_heads}, {c.head_dim}]")
        if kv_pool.device != self.device:
            raise ValueError(f"kv_pool is on {kv_pool.device}, the model on {self.device}")

    @torch.no_grad()
    def forward(self, input_ids: Tensor, positions: Tensor, batch: AttentionBatch,
                kv_pool: Tensor) -> Tensor:
        """Run one step and return fp32 logits ``[N, vocab]`` for ``batch.logits_indices``.

        ``input_ids`` ``[T]`` int64 token ids and ``positions`` ``[T]`` int64 absolute
        positions, in ``batch`` order. ``kv_pool``
        ``[num_slots, num_layers, 2, block_size, kv_heads, head_dim]`` receives this
        step's K/V at ``batch.slot_mapping`` and supplies the cached context.
        """
        self.check_kv_pool(kv_pool)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, batch, kv_pool[:, i, 0], kv_pool[:, i, 1])
        x = self.norm(x[batch.logits_indices])
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

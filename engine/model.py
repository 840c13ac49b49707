"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over the paged KV pool.

RMSNorm, rotate-half RoPE (plain, linear or llama3-scaled frequencies), grouped-query
attention through an :class:`engine.attention.AttentionBackend`, SwiGLU MLP, optional
tied embeddings. Q/K/V and gate/up projections are fused into one matmul each. Numerics
follow transformers: norms in fp32, residual stream in the model dtype, RoPE tables in
fp32 cast to the model dtype, logits returned in fp32.

The elementwise work between the matmuls runs through :mod:`engine.fused`, laid out as
vLLM does: each layer returns its MLP output and the residual stream apart, and the
next norm adds them (``add_rms_norm``), so a layer is norm, QKV matmul, RoPE + K/V write,
attention, O matmul, add + norm, gate/up matmul, SiLU * up, down matmul. On CUDA these
are single Triton kernels (:meth:`CausalLM.set_fused`); elsewhere the same formulas run
as plain torch ops, numerically the model before the fusion.

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

from engine import fused as fused_ops
from engine.attention import AttentionBackend, select_backend
from engine.batch import AttentionBatch
from engine.config import ModelConfig
from engine.loader import LoadedModel, resolve_dtype


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``: the norm in fp32 rounded to ``x``'s dtype,
    then the weight multiplies in that dtype, as in transformers."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.use_triton = False

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[T, size]`` -> ``[T, size]``."""
        return fused_ops.rms_norm(x, self.weight, self.eps, use_triton=self.use_triton)

    def add_forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """``(norm(residual + x), residual + x)`` for ``x``, ``residual`` ``[T, size]``
        (the sum in the model dtype); one kernel on the Triton path."""
        return fused_ops.add_rms_norm(x, residual, self.weight, self.eps,
                                  use_triton=self.use_triton)


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
        """``(cos, sin)`` ``[T, head_dim]`` in ``dtype`` for ``positions`` ``[T]``
        (rotate-half tables: the second half of each row repeats the first)."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


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
        self.use_triton = False
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_out_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """``x`` ``[T, hidden]`` -> ``[T, hidden]``; writes this step's K/V to the caches.
        ``cos``/``sin`` ``[T, head_dim]`` are the step's RoPE tables."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # RoPE on Q and K and the K/V write: one kernel on the Triton path.
        q = fused_ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, batch.slot_mapping,
                                self.num_heads, self.num_kv_heads,
                                write_kv=self.backend.write_kv, use_triton=self.use_triton)
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
        self.use_triton = False

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[T, hidden]`` -> ``[T, hidden]``."""
        act = fused_ops.silu_mul(self.gate_up_proj(x), use_triton=self.use_triton)
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block ``h = x + attn(norm(x)); out = h + mlp(norm(h))``, with
    the residual stream carried apart: the last add happens in the next layer's norm."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor,
                batch: AttentionBatch, k_cache: Tensor,
                v_cache: Tensor) -> tuple[Tensor, Tensor]:
        """``(mlp_out, stream)`` ``[T, hidden]`` each; the layer's output is their sum.

        ``x`` is the previous layer's ``mlp_out`` and ``residual`` its ``stream``; for the
        first layer ``x`` is the embeddings and ``residual`` is ``None``.
        """
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos, sin, batch, k_cache, v_cache)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


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
        self.fused_kernels = False

    @classmethod
    def empty(cls, config: ModelConfig, *, dtype: torch.dtype | str = torch.float32,
              device: torch.device | str = "cpu",
              backend: AttentionBackend | str = "auto", fused: str = "auto") -> CausalLM:
        """A model with uninitialised parameters (no random-init cost) in ``dtype`` on
        ``device``; ``backend`` is an :class:`AttentionBackend` or a ``select_backend``
        preference (``"auto"``, ``"torch"``, ``"triton"``); ``fused`` is the
        :meth:`set_fused` preference."""
        device = torch.device(device)
        if isinstance(backend, str):
            backend = select_backend(device, backend)
        with torch.device("meta"):
            model = cls(config, backend)
        # cast on the meta device first: never allocate (and copy) an fp32 copy of a
        # bf16 model (an 8B model would take 32 GB and seconds)
        model = model.to(resolve_dtype(dtype)).to_empty(device=device)
        model.set_fused(fused)
        return model.eval()

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu",
                    backend: AttentionBackend | str = "auto", fused: str = "auto") -> CausalLM:
        """Build from a :class:`LoadedModel`; ``dtype`` ``None`` keeps the weights' dtype."""
        if dtype is None:
            dtype = loaded.weights["model.embed_tokens.weight"].dtype
        model = cls.empty(loaded.config, dtype=dtype, device=device, backend=backend,
                          fused=fused)
        model.load_weights(loaded.weights)
        return model

    def set_fused(self, prefer: str = "auto") -> bool:
        """Choose the elementwise kernels (:func:`engine.fused.select`): ``"auto"`` runs
        the fused Triton kernels on CUDA when they pass their self-check (and
        ``KVSTORE_FUSED_KERNELS`` is not ``0``), the torch formulas elsewhere; ``"torch"``
        and ``"triton"`` force one. Returns whether the Triton kernels are on. Graphs
        captured before a change keep the kernels they captured."""
        on = fused_ops.select(self.device, prefer)
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.use_triton = on
        self.fused_kernels = on
        return on

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
        residual: Tensor | None = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, batch, kv_pool[:, i, 0], kv_pool[:, i, 1])
        rows = batch.logits_indices
        if residual is None:
            x = self.norm(x[rows])
        else:  # the last layer's residual add, on the sampled rows only
            x, _ = self.norm.add_forward(x[rows], residual[rows])
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

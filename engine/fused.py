"""Fused elementwise kernels of the decoder layer: residual add + RMSNorm, RoPE + K/V
write, SiLU(gate) * up.

Each op has a torch reference (the formulas :mod:`engine.model` used before these
kernels, and still uses on CPU), a Triton kernel, and a dispatcher that runs the kernel
when asked to and Triton can run on the tensor's device (CUDA, or the CPU under
``TRITON_INTERPRET=1``), else the reference. :func:`select` makes the one decision a
model uses for all its layers: Triton on CUDA when triton imports and the kernels agree
with the references on a small problem (checked once per device), unless
``KVSTORE_FUSED_KERNELS=0`` is set.

Numerics match the references up to float rounding: every intermediate that the
reference rounds to the model dtype (``dt``) the kernel rounds to ``dt`` too, so
(with floating-point contraction turned off in the kernels) the only differences come
from the fp32 reductions and transcendentals inside the kernels:

* :func:`add_rms_norm`: the residual sum is rounded to ``dt`` exactly as torch's
  ``residual + x`` does (bit-equal); the norm sums squares in fp32 in a different order
  from ``F.rms_norm`` and uses the device's ``rsqrt``, then rounds ``x * rstd`` to ``dt``
  and multiplies by the weight in fp32 rounded to ``dt``, as ``weight * F.rms_norm(x)``
  does in ``dt``. Outputs can differ by one unit in the last place of ``dt``, rarely.
* :func:`rope_write_kv`: ``x * cos`` and ``rotate_half(x) * sin`` are each rounded to
  ``dt`` and their sum rounded to ``dt``, as the reference's three ``dt`` ops do: bit-equal.
  The K/V the kernel stores are bit-equal to what ``write_kv`` stores.
* :func:`silu_mul`: ``g / (1 + exp(-g))`` in fp32 (IEEE division) rounded to ``dt``,
  times ``up`` rounded to ``dt``, as ``F.silu(gate) * up``. The kernel's ``exp`` is the
  device's ``exp2``-based one: its relative error, about ``|g| * 1e-7``, is a few fp32
  ulps next to torch's ``expf``, which changes a bf16 or fp16 result rarely.

Every launch reads only host-known shapes (no device-to-host sync, no data-dependent
host decision), so the kernels can be captured in a CUDA graph.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import attention
from engine.triton_attention import AVAILABLE, tl, triton  # one place decides Triton
from kvstore import env

log = logging.getLogger(__name__)

__all__ = [
    "AVAILABLE",
    "add_rms_norm",
    "add_rms_norm_reference",
    "add_rms_norm_triton",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_triton",
    "rope_write_kv",
    "rope_write_kv_reference",
    "rope_write_kv_triton",
    "select",
    "self_check",
    "silu_mul",
    "silu_mul_reference",
    "silu_mul_triton",
    "triton_usable",
]

WriteKV = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]

ENV_SWITCH = env.FUSED_KERNELS
"""Set to ``0`` to make :func:`select` choose the torch references on every device."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: triton imports and the device is
    CUDA, or the CPU while ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests)."""
    return AVAILABLE and (torch.device(device).type == "cuda" or _interpreting())


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# ---------------------------------------------------------------------------------------
# torch references: the formulas of the unfused model


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * rms_norm(x)`` over the last dimension: ``F.rms_norm`` upcasts to fp32
    and returns ``x``'s dtype, then the weight multiplies in that dtype (transformers'
    Llama numerics). ``x`` ``[T, hidden]``, ``weight`` ``[hidden]``."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor,
                           eps: float) -> tuple[Tensor, Tensor]:
    """``(rms_norm(residual + x) * weight, residual + x)``: the pre-norm block's residual
    add (in the model dtype) followed by the next norm. ``x``, ``residual``
    ``[T, hidden]``; returns two new ``[T, hidden]`` tensors."""
    summed = residual + x
    return rms_norm_reference(summed, weight, eps), summed


def apply_rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of ``x`` ``[T, heads, head_dim]`` by ``cos``/``sin`` ``[T, 1, D]``
    (full-width tables, ``cos[..., :D/2] == cos[..., D/2:]``), in ``x``'s dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_write_kv_reference(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                            v_cache: Tensor, slot_mapping: Tensor, num_heads: int,
                            num_kv_heads: int,
                            write_kv: WriteKV = attention.write_kv) -> Tensor:
    """RoPE on the Q and K heads of the fused projection output, K/V stored in the cache.

    ``qkv`` ``[T, (H + 2 * KVH) * D]``: each row is ``H`` query heads, then ``KVH`` key
    heads, then ``KVH`` value heads, ``D`` wide each. ``cos``/``sin`` ``[T, D]``: the
    rotate-half tables of each token's position in the model dtype (the second half of a
    row repeats the first, as rotate-half tables do).
    Rotated K and V go to ``k_cache``/``v_cache`` ``[num_slots, block_size, KVH, D]``
    (strided pool views) at ``slot_mapping`` ``[T]`` through ``write_kv`` (skipping
    negative entries). Returns the rotated queries ``[T, H, D]`` (a view into a new tensor).
    """
    num_tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qk = qkv[:, :q_size + kv_size].view(num_tokens, num_heads + num_kv_heads, head_dim)
    q, k = apply_rope_reference(qk, cos[:, None, :], sin[:, None, :]).split(
        [num_heads, num_kv_heads], dim=1)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    write_kv(k_cache, v_cache, k, v, slot_mapping)
    return q


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` in the input dtype, ``gate_up`` ``[T, 2 * I]`` = ``[gate | up]``;
    returns ``[T, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------
# Triton kernels

if AVAILABLE:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,  # rows of [T, N]; w [N]
        stride_x, stride_r, stride_o, stride_ro,
        n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        dt = x.dtype
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(dt)  # the model-dtype add
            tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.math.div_rn(tl.sum(xf * xf, 0), n_cols.to(tl.float32)) + eps)
        y = (xf * rstd).to(dt)  # F.rms_norm's result in the model dtype
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = y.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_write_kv_kernel(
        qkv_ptr,  # [T, (H + 2 KVH) * D], last dim contiguous
        cos_ptr, sin_ptr,  # [T, D]: only the first half is read
        slot_ptr,  # [T] int64
        q_ptr,  # [T, H, D] contiguous
        kc_ptr, vc_ptr,  # [num_slots, BLOCK_SIZE, KVH, D] (strided)
        stride_qkv, stride_cos, stride_sin,
        stride_kc_slot, stride_kc_tok, stride_kc_head,
        stride_vc_slot, stride_vc_tok, stride_vc_head,
        H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        # Program (t, j) handles heads j*BLOCK_H .. of token t in the concatenated index
        # space [q heads | k heads | v heads]; every head is D = 2 * HALF wide there.
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
        d = tl.arange(0, HALF_PAD)  # [HP]
        d_ok = d < HALF
        is_q = head < H
        is_k = (head >= H) & (head < H + KVH)
        is_v = (head >= H + KVH) & (head < H + 2 * KVH)
        ok = (head < H + 2 * KVH)[:, None] & d_ok[None, :]
        src = qkv_ptr + t * stride_qkv + (head * (2 * HALF))[:, None] + d[None, :]
        x1 = tl.load(src, mask=ok, other=0.0)
        x2 = tl.load(src + HALF, mask=ok, other=0.0)
        dt = x1.dtype
        c = tl.load(cos_ptr + t * stride_cos + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * stride_sin + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin with each product and the sum rounded to dt
        o1 = ((x1f * c).to(dt).to(tl.float32) - (x2f * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2f * c).to(dt).to(tl.float32) + (x1f * s).to(dt).to(tl.float32)).to(dt)
        rope = (is_q | is_k)[:, None]
        o1 = tl.where(rope, o1, x1)
        o2 = tl.where(rope, o2, x2)

        q_dst = q_ptr + t * (H * 2 * HALF) + (head * (2 * HALF))[:, None] + d[None, :]
        q_ok = is_q[:, None] & d_ok[None, :]
        tl.store(q_dst, o1, mask=q_ok)
        tl.store(q_dst + HALF, o2, mask=q_ok)

        # K and V of this token into the paged caches, unless its slot is negative
        kt = kc_ptr.dtype.element_ty
        vt = vc_ptr.dtype.element_ty
        k_ok = is_k[:, None] & d_ok[None, :]
        v_ok = is_v[:, None] & d_ok[None, :]
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            blk = slot // BLOCK_SIZE
            off = slot % BLOCK_SIZE
            k_dst = (kc_ptr + blk * stride_kc_slot + off * stride_kc_tok
                     + ((head - H) * stride_kc_head)[:, None] + d[None, :])
            tl.store(k_dst, o1.to(kt), mask=k_ok)
            tl.store(k_dst + HALF, o2.to(kt), mask=k_ok)
            v_dst = (vc_ptr + blk * stride_vc_slot + off * stride_vc_tok
                     + ((head - H - KVH) * stride_vc_head)[:, None] + d[None, :])
            tl.store(v_dst, o1.to(vt), mask=v_ok)
            tl.store(v_dst + HALF, o2.to(vt), mask=v_ok)

    @triton.jit
    def _silu_mul_kernel(
        gu_ptr,  # [T, 2 I], last dim contiguous
        out_ptr,  # [T, I] contiguous
        stride_gu, n_cols,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        base = gu_ptr + row * stride_gu + cols
        g = tl.load(base, mask=mask, other=0.0)
        u = tl.load(base + n_cols, mask=mask, other=0.0)
        dt = g.dtype
        gf = g.to(tl.float32)
        # F.silu in fp32 (IEEE division as torch's; exp is the device's fast exp2-based
        # one), rounded to dt
        act = tl.math.div_rn(gf, 1.0 + tl.exp(-gf)).to(dt)
        out = (act.to(tl.float32) * u.to(tl.float32)).to(dt)
        tl.store(out_ptr + row * n_cols + cols, out, mask=mask)


# Launch options shared by every kernel here: no fused multiply-add contraction, so
# each rounding happens where the reference's does.
_LAUNCH = {"enable_fp_fusion": False}


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError("triton is not available")


def _rows(name: str, t: Tensor) -> None:
    if t.dim() != 2 or t.stride(-1) != 1:
        raise ValueError(f"{name} must be 2-d with a contiguous last dimension, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")


def _norm_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Triton :func:`rms_norm_reference`: one program a row. ``x`` ``[T, N]`` (last dim
    contiguous), ``weight`` ``[N]`` contiguous; returns a new contiguous ``[T, N]`` in
    ``promote_types(x.dtype, weight.dtype)``."""
    _require()
    _rows("x", x)
    n = x.shape[1]
    if weight.shape != (n,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be [{n}] contiguous, got {tuple(weight.shape)}")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x.shape[0] == 0:
        return out
    block = _next_pow2(n)
    _rms_norm_kernel[(x.shape[0],)](
        x, x, weight, out, out, x.stride(0), x.stride(0), out.stride(0), out.stride(0),
        n, float(eps), HAS_RESIDUAL=False, BLOCK=block, num_warps=_norm_warps(block), **_LAUNCH)
    return out


def add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor,
                        eps: float) -> tuple[Tensor, Tensor]:
    """Triton :func:`add_rms_norm_reference`: reads ``x`` and ``residual`` once, writes the
    normed rows and the new residual in one launch. ``x``, ``residual`` ``[T, N]`` of
    one dtype (last dim contiguous), ``weight`` ``[N]`` contiguous; returns two new
    contiguous ``[T, N]`` tensors (the inputs are not modified)."""
    _require()
    _rows("x", x)
    _rows("residual", residual)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    n = x.shape[1]
    if weight.shape != (n,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be [{n}] contiguous, got {tuple(weight.shape)}")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0] == 0:
        return out, res_out
    block = _next_pow2(n)
    _rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, out, res_out,
        x.stride(0), residual.stride(0), out.stride(0), res_out.stride(0),
        n, float(eps), HAS_RESIDUAL=True, BLOCK=block, num_warps=_norm_warps(block), **_LAUNCH)
    return out, res_out


def _check_cache(name: str, cache: Tensor) -> None:
    if cache.dim() != 4 or cache.stride(-1) != 1:
        raise ValueError(f"{name} must be [num_slots, block_size, kv_heads, head_dim] with a "
                         f"contiguous last dimension, got shape {tuple(cache.shape)} "
                         f"strides {cache.stride()}")


def rope_write_kv_triton(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                         v_cache: Tensor, slot_mapping: Tensor, num_heads: int,
                         num_kv_heads: int, write_kv: WriteKV | None = None) -> Tensor:
    """Triton :func:`rope_write_kv_reference` in one launch: reads the projection output
    in place, writes the rotated queries to a new contiguous ``[T, H, D]`` tensor and the
    rotated keys and the values to the caches (cast to the cache dtype; negative slots
    skipped; slots must be distinct). Only the first half of each ``cos``/``sin`` row is
    read. ``write_kv`` is accepted for signature parity and not used: the kernel stores
    K/V itself under the same contract."""
    del write_kv
    _require()
    _rows("qkv", qkv)
    _rows("cos", cos)
    _rows("sin", sin)
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    num_tokens = qkv.shape[0]
    _, block_size, kv_heads, head_dim = k_cache.shape
    if (kv_heads != num_kv_heads or v_cache.shape != k_cache.shape or head_dim % 2
            or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim):
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {num_heads} + 2 x "
                         f"{num_kv_heads} heads of the caches {tuple(k_cache.shape)}")
    half = head_dim // 2
    if cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{num_tokens}, {head_dim}], got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    slot_mapping = slot_mapping.to(torch.int64)
    half_pad = _next_pow2(half)
    total = num_heads + 2 * num_kv_heads
    block_h = min(_next_pow2(total), max(1, 256 // half_pad))
    grid = (num_tokens, -(-total // block_h))
    _rope_write_kv_kernel[grid](
        qkv, cos, sin, slot_mapping, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H=num_heads, KVH=num_kv_heads, HALF=half, HALF_PAD=half_pad, BLOCK_H=block_h,
        BLOCK_SIZE=block_size, num_warps=max(1, min(4, block_h * half_pad // 256)), **_LAUNCH)
    return q


_SILU_BLOCK = 512


def silu_mul_triton(gate_up: Tensor) -> Tensor:
    """Triton :func:`silu_mul_reference`: ``gate_up`` ``[T, 2 * I]`` (last dim contiguous)
    read in place; returns a new contiguous ``[T, I]``."""
    _require()
    _rows("gate_up", gate_up)
    num_tokens, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up width {width} is not even")
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    block = min(_SILU_BLOCK, _next_pow2(inter))
    _silu_mul_kernel[(num_tokens, -(-inter // block))](
        gate_up, out, gate_up.stride(0), inter, BLOCK=block,
        num_warps=max(1, block // 256), **_LAUNCH)
    return out


# ---------------------------------------------------------------------------------------
# dispatchers


def _pick(t: Tensor, use_triton: bool | None) -> bool:
    if use_triton is False:
        return False
    if AVAILABLE and t.is_cuda:  # the common case first: no environment lookup
        return True
    usable = triton_usable(t.device)
    if use_triton and not usable:
        raise RuntimeError(f"the Triton kernels cannot run on {t.device}")
    return usable


def rms_norm(x: Tensor, weight: Tensor, eps: float, *,
             use_triton: bool | None = None) -> Tensor:
    """``weight * rms_norm(x)`` (:func:`rms_norm_reference`'s contract). ``use_triton``
    ``None`` runs the kernel wherever :func:`triton_usable`; ``True`` requires it;
    ``False`` runs the reference."""
    if _pick(x, use_triton):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, *,
                 use_triton: bool | None = None) -> tuple[Tensor, Tensor]:
    """``(normed, residual)`` of ``residual + x`` (:func:`add_rms_norm_reference`'s
    contract); ``use_triton`` as in :func:`rms_norm`."""
    if _pick(x, use_triton):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def rope_write_kv(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                  slot_mapping: Tensor, num_heads: int, num_kv_heads: int, *,
                  write_kv: WriteKV = attention.write_kv,
                  use_triton: bool | None = None) -> Tensor:
    """Rotated queries ``[T, H, D]``, with rotated K and V written to the caches
    (:func:`rope_write_kv_reference`'s contract). The reference stores through
    ``write_kv`` (pass the attention backend's); the kernel stores itself.
    ``use_triton`` as in :func:`rms_norm`."""
    if _pick(qkv, use_triton):
        return rope_write_kv_triton(qkv, cos, sin, k_cache, v_cache, slot_mapping,
                                    num_heads, num_kv_heads)
    return rope_write_kv_reference(qkv, cos, sin, k_cache, v_cache, slot_mapping,
                                   num_heads, num_kv_heads, write_kv)


def silu_mul(gate_up: Tensor, *, use_triton: bool | None = None) -> Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``[T, 2 * I]`` (:func:`silu_mul_reference`'s
    contract); ``use_triton`` as in :func:`rms_norm`."""
    if _pick(gate_up, use_triton):
        return silu_mul_triton(gate_up)
    return silu_mul_reference(gate_up)


# ---------------------------------------------------------------------------------------
# selection


def self_check(device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Raise ``AssertionError`` unless every kernel matches its reference on ``device``
    on a small problem (GQA, head_dim 64, a strided pool view, a skipped slot).
    ``dtype`` defaults to bf16 on CUDA and fp32 elsewhere (the interpreter)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    def close(name: str, got: Tensor, want: Tensor) -> None:
        err = float((got.float() - want.float()).abs().max())
        bound = tol * max(1.0, float(want.float().abs().max()))
        assert err <= bound, f"{name} differs from the reference by {err} (bound {bound})"

    tokens, hidden, heads, kv_heads, head_dim, block_size = 5, 96, 4, 2, 64, 4
    x, res, w = rand(tokens, hidden), rand(tokens, hidden), rand(hidden)
    close("rms_norm", rms_norm_triton(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    got, got_res = add_rms_norm_triton(x, res, w, 1e-5)
    want, want_res = add_rms_norm_reference(x, res, w, 1e-5)
    close("add_rms_norm", got, want)
    assert torch.equal(got_res, want_res), "add_rms_norm's residual differs"
    gate_up = rand(tokens, 2 * hidden)
    close("silu_mul", silu_mul_triton(gate_up), silu_mul_reference(gate_up))
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim)
    angles = torch.rand(tokens, head_dim // 2, generator=gen).repeat(1, 2) * 6.0
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    pool = rand(6, 2, 2, block_size, kv_heads, head_dim)
    slots = torch.tensor([5, 0, -1, 22, 9], dtype=torch.int64, device=device)
    pools = [pool.clone(), pool.clone()]
    q_got = rope_write_kv_triton(qkv, cos, sin, pools[0][:, 1, 0], pools[0][:, 1, 1], slots,
                                 heads, kv_heads)
    q_want = rope_write_kv_reference(qkv, cos, sin, pools[1][:, 1, 0], pools[1][:, 1, 1],
                                     slots, heads, kv_heads)
    close("rope_write_kv q", q_got, q_want)
    close("rope_write_kv pool", pools[0], pools[1])


_selected: dict[str, bool] = {}


def select(device: torch.device | str, prefer: str = "auto") -> bool:
    """Whether a model on ``device`` runs the Triton kernels (``True``) or the torch
    references (``False``).

    ``prefer="auto"``: Triton on CUDA when triton imports, ``KVSTORE_FUSED_KERNELS`` is not
    ``0``, and :func:`self_check` passes (once per device; a failure is logged and the
    references are used). ``"torch"``: the references. ``"triton"``: the kernels wherever
    :func:`triton_usable` (CUDA, or the interpreter on CPU), else ``RuntimeError``.
    """
    if prefer not in ("auto", "torch", "triton"):
        raise ValueError(f"prefer must be 'auto', 'torch' or 'triton', got {prefer!r}")
    device = torch.device(device)
    if prefer == "torch":
        return False
    if prefer == "triton":
        if not triton_usable(device):
            raise RuntimeError(f"the Triton kernels cannot run on {device}"
                               + ("" if AVAILABLE else ": triton is not installed"))
        return True
    if device.type != "cuda" or not AVAILABLE or not env.fused_kernels_enabled():
        return False
    key = str(device)
    if key not in _selected:
        try:
            with torch.cuda.device(device):  # kernels launch on the current device
                self_check(device)
            _selected[key] = True
        except Exception as exc:  # noqa: BLE001 - any failure means "use the references"
            log.warning("fused Triton kernels unusable on %s (%s); using torch", device, exc)
            _selected[key] = False
    return _selected[key]

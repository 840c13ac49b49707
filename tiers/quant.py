"""Compressed KV blocks for the lower tiers: int8 or fp8 (e4m3) with per-head scales.

A block is ``[num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]`` (see
:mod:`tiers.layout`). Quantization is symmetric with one bf16 scale per head vector:
per (layer, K/V, token, KV head) of each block, over that vector's ``head_dim`` values.

- ``int8``: ``scale = bf16(amax x fp32(1/127))``, ``code = round_half_even(x / scale)``
  clamped to ``[-127, 127]``; ``x' = code x scale``. The error of each value is at most
  about ``scale / 2`` (half a step; the bf16 rounding of the scale adds < 2**-8 of it).
- ``fp8``: ``scale = bf16(amax x fp32(1/448))``, ``code = e4m3(x / scale)`` (round to
  nearest even, clamped to +-448); ``x' = code x scale``. Relative error at most about
  2**-4 of the value (3 mantissa bits) above e4m3's subnormal range.

Why per head vector and not one scale per (layer, K/V, head) of the block: on SmolLM2
over ShareGPT (``bench/quant_accuracy.py``) one scale per block-head gave 97.9% next-token
top-1 agreement with exact KV, one per head vector 99.1%, for 1/head_dim more bytes.

A zero vector has scale 0 and decodes to zeros. Both ways are deterministic: the same
block gives the same bytes on every run and device.

A compressed block's bytes (:func:`encode_payload`) are its codes (one byte a value, in
the block's layout) followed by its scales (bf16, little-endian, ``[layers, 2,
block_size, kv_heads]``): :func:`compressed_block_bytes`, ``(head_dim + 2) / (2 x
head_dim)`` of a bf16/fp16 block (0.516 at head_dim 64, 0.508 at 128) and half that of
an fp32 one. The GPU pool stays exact; tiers below it may hold this format, and the
namespace names it (:attr:`radix.hashing.Namespace.kv_format`) so exact and compressed
blocks never share a key.

Two implementations with the same results: a torch reference (any device) and Triton
kernels (CUDA; one program per (block, layer, K/V, head)), chosen by :func:`quantize`
and :func:`dequantize_into` from the tensor's device. The kernels read the source
blocks straight from a pool through a slot index and write the destination pool's
slots, so no gathered copy is made.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from radix.hashing import KV_FORMATS
from tiers.layout import KVLayout

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference is used
    triton = None

COMPRESSED_FORMATS = tuple(f for f in KV_FORMATS if f != "exact")
"""Formats :func:`quantize` produces (``int8``, ``fp8``)."""

_QMAX = {"int8": 127.0, "fp8": 448.0}
# scale = amax x fp32(1 / qmax): one correctly rounded fp32 multiply gives the same bits
# on every device (a division by a scalar is a reciprocal multiply on CUDA, a true
# division on CPU, and the two differ in the last bit).
_INV_QMAX = {f: float(torch.tensor(1.0 / q, dtype=torch.float32)) for f, q in _QMAX.items()}
_CODE_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
SCALE_BYTES = 2
"""Bytes of one scale (bf16)."""


@dataclass(frozen=True)
class QuantizedBlocks:
    """``N`` compressed blocks: ``codes`` ``[N, layers, 2, block_size, kv_heads,
    head_dim]`` (int8 or float8_e4m3fn) and ``scales`` ``[N, layers, 2, block_size,
    kv_heads]`` bf16, on one device, in format ``kv_format``."""

    kv_format: str
    codes: Tensor
    scales: Tensor

    def __post_init__(self) -> None:
        check_format(self.kv_format)
        if self.codes.dim() != 6 or self.codes.dtype != _CODE_DTYPE[self.kv_format]:
            raise ValueError(f"codes must be a 6-d {_CODE_DTYPE[self.kv_format]} tensor, got "
                             f"{tuple(self.codes.shape)} {self.codes.dtype}")
        if tuple(self.scales.shape) != tuple(self.codes.shape[:5]) or \
                self.scales.dtype != torch.bfloat16:
            raise ValueError(f"scales must be bfloat16 {list(self.codes.shape[:5])}, got "
                             f"{tuple(self.scales.shape)} {self.scales.dtype}")

    @property
    def num_blocks(self) -> int:
        return int(self.codes.shape[0])


def check_format(kv_format: str) -> None:
    """Raise ``ValueError`` unless ``kv_format`` is a compressed format."""
    if kv_format not in COMPRESSED_FORMATS:
        raise ValueError(f"kv_format must be one of {', '.join(COMPRESSED_FORMATS)} for a "
                         f"compressed block, got {kv_format!r}")


def compressed_block_bytes(layout: KVLayout, kv_format: str) -> int:
    """Bytes of one compressed block: one byte a value plus the scales."""
    check_format(kv_format)
    layers, two, bs, heads, dim = layout.block_shape
    return layers * two * bs * heads * dim + layers * two * bs * heads * SCALE_BYTES


def compression_ratio(layout: KVLayout, kv_format: str) -> float:
    """Compressed bytes over exact bytes of one block of ``layout``."""
    return compressed_block_bytes(layout, kv_format) / layout.block_bytes


def _check_blocks(blocks: Tensor) -> None:
    if blocks.dim() != 6 or blocks.shape[2] != 2:
        raise ValueError("blocks must be [N, layers, 2, block_size, kv_heads, head_dim], got "
                         f"{tuple(blocks.shape)}")
    if blocks.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"blocks must be float32, float16 or bfloat16, got {blocks.dtype}")
    if not blocks.is_contiguous():
        raise ValueError("blocks must be contiguous (a pool tensor or a copy)")


def _slot_index(slots: Tensor | list[int] | None, n: int, device: torch.device) -> Tensor:
    """``slots`` as an int64 index on ``device``. Lists and host tensors are checked
    against ``[0, n)`` on the host; a CUDA tensor is the caller's to check (reading it
    back would synchronize its stream, which the load pipeline must not do)."""
    if slots is None:
        return torch.arange(n, dtype=torch.int64, device=device)
    if isinstance(slots, Tensor) and slots.is_cuda:
        if slots.dim() != 1:
            raise ValueError("slots must be a 1-d list of slot numbers")
        if slots.dtype == torch.int64 and slots.device == device:
            return slots  # the load path's index: no call (each one hands the GIL away)
        return slots.to(device=device, dtype=torch.int64)
    idx = torch.as_tensor(slots, dtype=torch.int64)
    if idx.dim() != 1:
        raise ValueError("slots must be a 1-d list of slot numbers")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"slots must be in [0, {n}), got {idx.tolist()[:8]}")
    return idx.to(device)


# --------------------------------------------------------------------- torch reference


def quantize_reference(blocks: Tensor, kv_format: str,
                       slots: Tensor | list[int] | None = None) -> QuantizedBlocks:
    """Quantize ``blocks[slots]`` (all blocks by default) with torch ops (any device)."""
    check_format(kv_format)
    _check_blocks(blocks)
    idx = _slot_index(slots, blocks.shape[0], blocks.device)
    x = blocks.index_select(0, idx).float()
    amax = x.abs().amax(dim=5)  # [N, L, 2, bs, H]
    scales = (amax * torch.tensor(_INV_QMAX[kv_format], dtype=torch.float32,
                                  device=amax.device)).to(torch.bfloat16)
    s32 = scales.float()
    inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
    y = x * inv[..., None]
    if kv_format == "int8":
        codes = torch.round(y).clamp_(-127, 127).to(torch.int8)
    else:
        codes = y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    return QuantizedBlocks(kv_format, codes, scales)


def dequantize_reference(q: QuantizedBlocks, dtype: torch.dtype) -> Tensor:
    """The blocks ``q`` stands for, in ``dtype``: ``code x scale`` computed in fp32."""
    x = q.codes.float() * q.scales.float()[..., None]
    return x.to(dtype)


# ---------------------------------------------------------------------- Triton kernels


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels can run here (triton importable and CUDA present)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _quantize_kernel(src, codes, scales, src_idx, block_size, heads, dim,
                         INV_QMAX: tl.constexpr, FP8: tl.constexpr, BS: tl.constexpr,
                         D: tl.constexpr):
        # One program: one (block n, layer l, K/V c, head h); grid (N, layers * 2, heads).
        n = tl.program_id(0)
        lc = tl.program_id(1)
        h = tl.program_id(2)
        slot = tl.load(src_idx + n).to(tl.int64)
        plane = block_size * heads * dim  # elements of one (layer, K/V) plane
        per_block = tl.num_programs(1) * plane
        t = tl.arange(0, BS)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = (t < block_size) & (d < dim)
        offs = t * (heads * dim) + h * dim + d
        x = tl.load(src + slot * per_block + lc * plane + offs, mask=mask, other=0.0)
        x = x.to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)  # [BS]: one per token (head vector)
        # bf16(amax x 1/qmax), rounded to nearest even on the bits (as torch's cast), so
        # the result does not depend on how a backend rounds fp32 -> bf16
        bits = (amax * INV_QMAX).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        s32 = bits.to(tl.float32, bitcast=True)
        scale = s32.to(tl.bfloat16)
        inv = tl.where(s32 > 0, tl.div_rn(tl.full([BS], 1.0, tl.float32), s32), 0.0)
        y = x * inv[:, None]
        if FP8:
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            code = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        else:
            y = tl.extra.cuda.libdevice.rint(y)
            code = tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int8)
        out = n.to(tl.int64) * per_block + lc * plane + offs
        tl.store(codes + out, code, mask=mask)
        tok = tl.arange(0, BS)
        at = ((n.to(tl.int64) * tl.num_programs(1) + lc) * block_size + tok) * heads + h
        tl.store(scales + at, scale, mask=tok < block_size)

    @triton.jit
    def _dequantize_kernel(codes, scales, dst, dst_idx, block_size, heads, dim,
                           BS: tl.constexpr, D: tl.constexpr):
        n = tl.program_id(0)
        lc = tl.program_id(1)
        h = tl.program_id(2)
        slot = tl.load(dst_idx + n).to(tl.int64)
        plane = block_size * heads * dim
        per_block = tl.num_programs(1) * plane
        t = tl.arange(0, BS)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = (t < block_size) & (d < dim)
        offs = t * (heads * dim) + h * dim + d
        # masked lanes are never stored, so they need no fill value (none casts to fp8)
        c = tl.load(codes + n.to(tl.int64) * per_block + lc * plane + offs, mask=mask)
        tok = tl.arange(0, BS)
        at = ((n.to(tl.int64) * tl.num_programs(1) + lc) * block_size + tok) * heads + h
        scale = tl.load(scales + at, mask=tok < block_size, other=0.0).to(tl.float32)
        x = c.to(tl.float32) * scale[:, None]
        tl.store(dst + slot * per_block + lc * plane + offs, x.to(dst.dtype.element_ty),
                 mask=mask)


def quantize_triton(blocks: Tensor, kv_format: str,
                    slots: Tensor | list[int] | None = None) -> QuantizedBlocks:
    """:func:`quantize_reference` as one Triton launch (CUDA tensors only)."""
    check_format(kv_format)
    _check_blocks(blocks)
    if not (triton_available() and blocks.is_cuda):
        raise ValueError("quantize_triton needs triton and a CUDA tensor")
    idx = _slot_index(slots, blocks.shape[0], blocks.device)
    _, layers, two, bs, heads, dim = blocks.shape
    n = idx.numel()
    codes = torch.empty((n, layers, two, bs, heads, dim), dtype=_CODE_DTYPE[kv_format],
                        device=blocks.device)
    scales = torch.empty((n, layers, two, bs, heads), dtype=torch.bfloat16,
                         device=blocks.device)
    if n:
        _quantize_kernel[(n, layers * two, heads)](
            blocks, codes, scales, idx, bs, heads, dim, INV_QMAX=_INV_QMAX[kv_format],
            FP8=kv_format == "fp8", BS=triton.next_power_of_2(bs),
            D=triton.next_power_of_2(dim))
    return QuantizedBlocks(kv_format, codes, scales)


def dequantize_into_triton(q: QuantizedBlocks, out: Tensor,
                           slots: Tensor | list[int] | None = None) -> None:
    """Write block ``i`` of ``q``, dequantized, to ``out[slots[i]]`` (one Triton launch)."""
    _check_blocks(out)
    if not (triton_available() and out.is_cuda and q.codes.device == out.device):
        raise ValueError("dequantize_into_triton needs triton and CUDA tensors on one device")
    if q.codes.shape[1:] != out.shape[1:]:
        raise ValueError(f"blocks of {tuple(q.codes.shape[1:])} do not fit a pool of "
                         f"{tuple(out.shape[1:])}")
    idx = _slot_index(slots, out.shape[0], out.device)
    if idx.numel() != q.num_blocks:
        raise ValueError(f"{q.num_blocks} blocks for {idx.numel()} slots")
    _, layers, two, bs, heads, dim = out.shape
    if q.num_blocks:
        _dequantize_kernel[(q.num_blocks, layers * two, heads)](
            q.codes, q.scales, out, idx, bs, heads, dim, BS=triton.next_power_of_2(bs),
            D=triton.next_power_of_2(dim))


# ----------------------------------------------------------------------- dispatching


def quantize(blocks: Tensor, kv_format: str,
             slots: Tensor | list[int] | None = None) -> QuantizedBlocks:
    """Quantize ``blocks[slots]`` (``blocks``: ``[N, layers, 2, block_size, kv_heads,
    head_dim]`` float32/float16/bfloat16, contiguous, e.g. a pool tensor): the Triton
    kernel on CUDA, the torch reference elsewhere. Raises ``ValueError`` for a bad
    format, shape, dtype or slot."""
    if blocks.is_cuda and triton_available():
        return quantize_triton(blocks, kv_format, slots)
    return quantize_reference(blocks, kv_format, slots)


@functools.cache
def _fp8_values(dtype: torch.dtype) -> Tensor:
    """The value of each of the 256 e4m3 codes in ``dtype`` (exact), by code byte."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(dtype)


def dequantize_into(q: QuantizedBlocks, out: Tensor,
                    slots: Tensor | list[int] | None = None) -> None:
    """Write the dequantized blocks of ``q`` into ``out[slots]`` (all of ``out`` in order
    by default): Triton on CUDA, torch elsewhere. ``out`` has the blocks' shape."""
    if out.is_cuda and triton_available() and q.codes.device == out.device:
        dequantize_into_triton(q, out, slots)
        return
    _check_blocks(out)
    if q.codes.shape[1:] != out.shape[1:]:
        raise ValueError(f"blocks of {tuple(q.codes.shape[1:])} do not fit a pool of "
                         f"{tuple(out.shape[1:])}")
    idx = _slot_index(slots, out.shape[0], out.device)
    if idx.numel() != q.num_blocks:
        raise ValueError(f"{q.num_blocks} blocks for {idx.numel()} slots")
    if out.dtype in (torch.bfloat16, torch.float32) and q.codes.device == out.device:
        # The same values as the reference in two passes instead of four: codes (int8,
        # e4m3) and bf16 scales are exact in bf16 and fp32, their product is exact in
        # fp32, and a bf16 multiply rounds that product once, as the reference does.
        scales = q.scales.to(out.dtype)[..., None]
        runs = _runs(idx)
        if runs and (len(runs) == 1 or 2 * len(runs) <= q.num_blocks):
            # Consecutive destination slots (a load's fresh slots): both passes write the
            # slots themselves, no temporary and no scatter (3.3x the three-pass path
            # on a 2 MiB block).
            for at, slot, n in runs:
                dst = out[slot:slot + n]
                _codes_into(q, at, n, dst)
                dst.mul_(scales[at:at + n])
            return
        x = torch.empty(q.codes.shape, dtype=out.dtype, device=out.device)
        _codes_into(q, 0, q.num_blocks, x)
        x.mul_(scales)
        out.index_copy_(0, idx, x)
        return
    out.index_copy_(0, idx, dequantize_reference(q, out.dtype).to(out.device))


def _runs(idx: Tensor) -> list[tuple[int, int, int]]:
    """``(first block, first slot, blocks)`` of each run of consecutive slots in
    ``idx`` (a CPU index; a device index is one scatter: ``[]``)."""
    if idx.device.type != "cpu" or not idx.numel():
        return []
    slots = idx.tolist()
    runs = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, slots[start], i - start))
            start = i
    return runs


def _codes_into(q: QuantizedBlocks, at: int, n: int, dst: Tensor) -> None:
    """Blocks ``at .. at + n`` of ``q``'s codes, as values of ``dst``'s dtype, into
    ``dst`` (contiguous, ``[n, *block_shape]``)."""
    codes = q.codes[at:at + n]
    if q.kv_format == "fp8" and dst.device.type == "cpu":
        # a 256-entry table gather is twice as fast as torch's e4m3 cast on the CPU
        flat = codes.view(torch.uint8).reshape(-1).to(torch.int32)
        torch.index_select(_fp8_values(dst.dtype), 0, flat, out=dst.view(-1))
    else:
        dst.copy_(codes)


def dequantize(q: QuantizedBlocks, dtype: torch.dtype) -> Tensor:
    """The ``N`` blocks of ``q`` as a new ``dtype`` tensor on ``q``'s device."""
    out = torch.empty(q.codes.shape, dtype=dtype, device=q.codes.device)
    dequantize_into(q, out)
    return out


def round_trip(pool: Tensor, kv_format: str, slots: Tensor | list[int] | None = None
               ) -> None:
    """Replace ``pool[slots]`` by what a tier in ``kv_format`` would give back (quantize,
    then dequantize in place): what a block looks like after a trip down and up."""
    idx = _slot_index(slots, pool.shape[0], pool.device)
    dequantize_into(quantize(pool, kv_format, idx), pool, idx)


# ---------------------------------------------------------------------- serialization


def encode_payload(q: QuantizedBlocks, i: int = 0) -> bytes:
    """Bytes of block ``i`` of ``q``: its codes (layout order) then its bf16 scales
    (little-endian). ``compressed_block_bytes`` long."""
    codes = q.codes[i].contiguous().view(torch.uint8).cpu()
    scales = q.scales[i].contiguous().view(torch.int16).cpu().numpy().astype("<i2")
    return codes.numpy().tobytes() + scales.tobytes()


def packed_view(data: Tensor, layout: KVLayout, kv_format: str, n: int) -> QuantizedBlocks:
    """``n`` blocks packed in one uint8 tensor as all their codes (``[n, *block_shape]``)
    then all their scales (``[n, layers, 2, block_size, kv_heads]`` bf16, little-endian),
    as views (no copy) on ``data``'s device. ``data`` holds at least ``n x
    compressed_block_bytes``."""
    check_format(kv_format)
    layers, two, bs, heads, dim = layout.block_shape
    n_codes = n * layers * two * bs * heads * dim
    n_scales = n * layers * two * bs * heads * SCALE_BYTES
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() < n_codes + n_scales:
        raise ValueError(f"packed blocks need a 1-d uint8 tensor of {n_codes + n_scales} "
                         f"bytes, got {data.dtype} {tuple(data.shape)}")
    return blocks_view(data[:n_codes], data[n_codes:n_codes + n_scales], layout, kv_format, n)


def blocks_view(codes: Tensor, scales: Tensor, layout: KVLayout, kv_format: str, n: int
                ) -> QuantizedBlocks:
    """``n`` blocks from two uint8 tensors, as views (no copy): ``codes`` holds their
    codes (``[n, *block_shape]``, one byte a value) and ``scales`` their scales (``[n,
    layers, 2, block_size, kv_heads]`` bf16, little-endian), each from its first byte.
    How the load path stages a batch: the two regions of a staging lane, wherever its
    good run ends, moved to the device in one copy."""
    check_format(kv_format)
    layers, two, bs, heads, dim = layout.block_shape
    n_codes = n * layers * two * bs * heads * dim
    n_scales = n * layers * two * bs * heads * SCALE_BYTES
    for what, t, need in (("codes", codes, n_codes), ("scales", scales, n_scales)):
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() < need:
            raise ValueError(f"{n} blocks' {what} need a 1-d uint8 tensor of {need} bytes, "
                             f"got {t.dtype} {tuple(t.shape)}")
    return QuantizedBlocks(
        kv_format, codes[:n_codes].view(_CODE_DTYPE[kv_format]).view(n, *layout.block_shape),
        scales[:n_scales].view(torch.bfloat16).view(n, layers, two, bs, heads))


def decode_payload(data: bytes | bytearray | memoryview, layout: KVLayout, kv_format: str,
                   device: torch.device | str = "cpu") -> QuantizedBlocks:
    """One block (``N = 1``) from :func:`encode_payload`'s bytes. Raises ``ValueError``
    when the length does not match ``layout`` and ``kv_format``."""
    check_format(kv_format)
    view = memoryview(data).cast("B")
    expected = compressed_block_bytes(layout, kv_format)
    if view.nbytes != expected:
        raise ValueError(f"compressed payload is {view.nbytes} bytes, {kv_format} blocks of "
                         f"{layout} take {expected}")
    layers, two, bs, heads, dim = layout.block_shape
    n_codes = layers * two * bs * heads * dim
    raw = bytes(view)
    codes = torch.frombuffer(bytearray(raw[:n_codes]), dtype=torch.uint8)
    codes = codes.view(_CODE_DTYPE[kv_format]).reshape(1, *layout.block_shape)
    scales = torch.from_numpy(np.frombuffer(raw[n_codes:], dtype="<i2").astype(np.int16))
    scales = scales.view(torch.bfloat16).reshape(1, layers, two, bs, heads)
    return QuantizedBlocks(kv_format, codes.to(device), scales.to(device))

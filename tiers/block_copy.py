"""One Triton kernel that copies whole blocks between slot pools: ``dst[d[i]] = src[s[i]]``.

Both pools are ``[num_slots, row]`` views of one integer dtype on one CUDA device; one
side may be a zero-copy alias of a page-locked host pool, so the same kernel moves blocks
host -> GPU (reads over PCIe), GPU -> host (writes over PCIe) and GPU -> GPU. Scattered
slots cost one launch in all, with no temporary and no per-block DMA: each program moves
one ``chunk``-element piece of one block with 16-byte accesses.

Available only where triton imports and a CUDA device is present (:func:`available`);
callers fall back to torch gather/scatter kernels otherwise.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernel is not used there
    triton = None

CHUNK_BYTES = 32 << 10
"""Bytes one program copies (a block of ``row`` elements takes ``ceil(row / chunk)``)."""
NUM_WARPS = 8


@functools.cache
def available() -> bool:
    """Whether the kernel can run here (triton importable and CUDA present)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _copy_blocks_kernel(src, dst, src_idx, dst_idx, row, CHUNK: tl.constexpr):
        pair = tl.program_id(0)
        part = tl.program_id(1)
        s = tl.load(src_idx + pair).to(tl.int64)  # int64: pools exceed 2**31 elements
        d = tl.load(dst_idx + pair).to(tl.int64)
        offs = part * CHUNK + tl.arange(0, CHUNK)
        mask = offs < row
        x = tl.load(src + s * row + offs, mask=mask, eviction_policy="evict_first")
        tl.store(dst + d * row + offs, x, mask=mask, eviction_policy="evict_first")


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor,
                dst_idx: torch.Tensor) -> None:
    """Enqueue ``dst[dst_idx[i]] = src[src_idx[i]]`` for every ``i`` on the current stream.

    ``src`` and ``dst``: ``[slots, row]`` contiguous CUDA tensors (or zero-copy aliases of
    pinned host memory) of the same dtype and row length; ``src_idx`` and ``dst_idx``:
    int64 CUDA tensors of equal length, destination slots distinct and, when ``src`` and
    ``dst`` share memory, disjoint from the source slots (the caller validates this).
    """
    n = src_idx.numel()
    if n == 0:
        return
    row = src.shape[1]
    chunk = max(16, min(triton.next_power_of_2(row), CHUNK_BYTES // src.element_size()))
    grid = (n, triton.cdiv(row, chunk))
    _copy_blocks_kernel[grid](src, dst, src_idx, dst_idx, row, CHUNK=chunk,
                              num_warps=NUM_WARPS)

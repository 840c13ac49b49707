"""Triton kernels for the paged KV cache: ``write_kv`` and ``paged_attention``.

Layout contract (shared with the CPU reference in ``engine/attention.py``):

* The KV pool is ``[num_slots, num_layers, 2, block_size, kv_heads, head_dim]``. For one
  layer, ``k_cache = pool[:, layer, 0]`` and ``v_cache = pool[:, layer, 1]`` are strided
  views ``[num_slots, block_size, kv_heads, head_dim]``; the kernels take their strides and
  never copy them. Only the last dimension must be contiguous (stride 1).
* ``write_kv`` scatters new keys and values ``[T, kv_heads, head_dim]`` to
  ``slot_mapping[t] = slot * block_size + offset``. A negative entry means "skip this
  token" (padding).
* ``paged_attention`` takes a packed ragged batch: the ``n_b = qsl[b+1] - qsl[b]`` queries
  of sequence ``b`` are the last ``n_b`` positions of a context of ``seq_lens[b]`` tokens,
  and query ``i`` attends to key positions ``0 .. seq_lens[b] - n_b + i``. Prefill (with
  or without a cached prefix) and decode (``n_b == 1``) mix freely in one launch. Query
  head ``h`` reads kv head ``h // (H // kv_heads)``. Scores and softmax are fp32.

Design (see docs/kernels.md for the numbers):

* One program owns ``BLOCK_M`` query rows = ``BLOCK_Q`` consecutive query tokens of one
  sequence times the ``G = H // kv_heads`` query heads sharing one kv head, so every K/V
  tile loaded from the pool serves all heads of its group (GQA reuse).
* The program streams the sequence's KV in tiles of ``BLOCK_N`` positions, gathered
  through the block table, with an online (flash) softmax in fp32. Tiles wholly below the
  causal diagonal run without masks; only the last few are masked.
* Programs find their sequence by a binary search over ``query_start_loc`` (q-tile ``j``
  of sequence ``b`` is program ``qsl[b] // BLOCK_Q + b + j``), so the launch needs no
  host-side view of the ragged batch and no device-to-host sync.
* Split-KV (flash-decoding): when the batch is decode-heavy and would not fill the GPU,
  each program's KV range is cut into ``num_splits`` parts that run in parallel and write
  fp32 partial results (unnormalised accumulator, running max, running sum); a second
  small kernel merges them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE: bool = True
except ImportError:
    triton = None
    tl = None
    AVAILABLE = False

__all__ = [
    "AVAILABLE",
    "KernelConfig",
    "choose_config",
    "paged_attention",
    "reference_paged_attention",
    "self_check",
    "write_kv",
]

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the attention kernel.

    ``block_m`` query rows (tokens x grouped heads) per program, ``block_n`` KV positions per
    tile, ``num_splits`` KV partitions per program (1 = no split-KV), Triton's
    ``num_warps`` and ``num_stages``.
    """

    block_m: int
    block_n: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


_SMEM_BUDGET = 180 * 1024


def _fit_smem(head_dim: int, elem_bytes: int, block_m: int, block_n: int, num_splits: int,
              num_warps: int, num_stages: int) -> KernelConfig:
    """A config whose pipelined K/V buffers plus Q tile fit ``_SMEM_BUDGET``: first fewer
    stages, then narrower KV tiles (matters for fp32)."""
    hd = _next_pow2(head_dim)

    def smem(bn: int, st: int) -> int:
        return ((st - 1) * 2 * bn + block_m) * hd * elem_bytes

    while smem(block_n, num_stages) > _SMEM_BUDGET and (num_stages > 2 or block_n > 16):
        if num_stages > 2:
            num_stages -= 1
        else:
            block_n //= 2
    return KernelConfig(block_m, block_n, num_splits, num_warps, num_stages)


def choose_config(
    num_tokens: int,
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_context: int,
    device: torch.device,
    elem_bytes: int = 2,
) -> KernelConfig:
    """Pick a launch configuration from host-known shapes only (no device sync).

    ``max_context`` is an upper bound on any sequence's length (block-table width times
    block size). Decode-like batches (few queries per sequence) get 16-row query tiles and,
    when the grid would not fill the GPU, split-KV; prefill-like batches get 128-row tiles,
    or 64-row ones where 128 would leave the GPU under-filled. Tuned on an H200; see
    docs/kernels.md. ``elem_bytes`` (4 for fp32) shrinks tiles to fit shared memory.
    """
    group = num_heads // num_kv_heads
    sms = _sm_count(device)
    if num_tokens * group <= 16 * num_seqs:
        # Decode-like: memory-bound; 16-row tiles (the MMA minimum) hold one token's group.
        block_m = max(16, _next_pow2(group))
        block_q = max(1, block_m // group)
        programs = max(num_tokens // block_q, num_seqs) * num_kv_heads
        # Under-filled grid: split each sequence's KV (>= 4 tiles a split) to ~2 programs/SM.
        kv_tiles = max(1, -(-max_context // 128))
        num_splits = 1
        if programs < 2 * sms:
            num_splits = max(1, min(-(-2 * sms // programs), kv_tiles // 4, 16))
        return _fit_smem(head_dim, elem_bytes, block_m, 128, num_splits, 4, 3)
    # Prefill-like: compute-bound; big tiles unless that leaves the GPU under-filled.
    block_m = max(128, _next_pow2(group))
    long_context = max_context >= 2048  # splitting the KV fills the GPU: keep big tiles
    if (num_tokens // max(1, block_m // group) + num_seqs) * num_kv_heads < 2 * sms \
            and not long_context:
        block_m = max(64, _next_pow2(group))
    if head_dim <= 64:
        block_n, warps, stages = 128, 4 if block_m <= 64 else 8, 2
    elif block_m <= 64:
        block_n, warps, stages = 64, 4, 2
    else:
        block_n, warps, stages = 128, 8, 3
    # A short chunk over a long cached context (a question after a long system prompt,
    # a chunked-prefill tail) leaves most SMs idle: split its KV like a decode (>= 4
    # tiles a split, ~2 programs an SM), with tiles big enough that each query tile
    # reads the context once. Without this, a 32-token question after 8k cached tokens
    # of Llama-3-8B runs 24 programs a layer.
    programs = (num_tokens // max(1, block_m // group) + num_seqs) * num_kv_heads
    num_splits = 1
    if programs < 2 * sms:
        kv_tiles = max(1, -(-max_context // block_n))
        num_splits = max(1, min(-(-2 * sms // programs), kv_tiles // 4, 16))
    return _fit_smem(head_dim, elem_bytes, block_m, block_n, num_splits, warps, stages)


if AVAILABLE:

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr,  # [T, KVH, HD]
        kc_ptr, vc_ptr,  # [num_slots, BLOCK_SIZE, KVH, HD] (strided)
        slot_ptr,  # [T] int64
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_kc_slot, stride_kc_tok, stride_kc_head,
        stride_vc_slot, stride_vc_tok, stride_vc_head,
        KVH: tl.constexpr, HD: tl.constexpr,
        KVH_PAD: tl.constexpr, HD_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot < 0:
            return
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        h = tl.arange(0, KVH_PAD)[:, None]
        d = tl.arange(0, HD_PAD)[None, :]
        mask = (h < KVH) & (d < HD)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(kc_ptr + blk * stride_kc_slot + off * stride_kc_tok + h * stride_kc_head + d,
                 k, mask=mask)
        tl.store(vc_ptr + blk * stride_vc_slot + off * stride_vc_tok + h * stride_vc_head + d,
                 v, mask=mask)

    @triton.jit
    def _attn_tiles(
        acc, m_i, l_i, q,  # [BM, HD_PAD] fp32, [BM], [BM], [BM, HD_PAD] input dtype
        kc_ptr, vc_ptr, bt_row_ptr,
        kv_head_off_k, kv_head_off_v,
        stride_kslot, stride_ktok, stride_vslot, stride_vtok,
        q_pos,  # [BM] int32: absolute position of each row's query
        kv_len,  # int32: keys at positions >= kv_len are never read
        t_lo, t_hi,  # KV tile range of this call
        qk_scale,  # softmax scale * log2(e)
        offs_d, d_mask,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        offs_n = tl.arange(0, BLOCK_N)
        for t in range(t_lo, t_hi):
            pos = t * BLOCK_N + offs_n  # [BN]
            if MASKED:
                pos_ok = pos < kv_len
                blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
                ld_mask = pos_ok[:, None] & d_mask[None, :]
            else:
                blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE).to(tl.int64)
                ld_mask = d_mask[None, :]
            off = pos % BLOCK_SIZE
            k_off = blk * stride_kslot + off * stride_ktok + kv_head_off_k
            v_off = blk * stride_vslot + off * stride_vtok + kv_head_off_v
            k = tl.load(kc_ptr + k_off[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
            v = tl.load(vc_ptr + v_off[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            s = s * qk_scale  # [BM, BN] fp32, in log2 units
            if MASKED:
                s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit(do_not_specialize=["num_seqs", "group", "block_q"])
    def _paged_attn_kernel(
        q_ptr,  # [T, H, HD]
        kc_ptr, vc_ptr,  # [num_slots, BLOCK_SIZE, KVH, HD] (strided)
        bt_ptr,  # [B, max_blocks] int32
        qsl_ptr,  # [B + 1] int32
        sl_ptr,  # [B] int32
        out_ptr,  # [T, H, HD]
        part_acc_ptr,  # [S, T, H, HD] fp32 (SPLIT only)
        part_ml_ptr,  # [S, T, H, 2] fp32 (SPLIT only)
        qk_scale,
        num_seqs, group, block_q,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kslot, stride_ktok, stride_khead,
        stride_vslot, stride_vtok, stride_vhead,
        stride_bt,
        stride_ps, stride_pt, stride_ph,
        stride_ms, stride_mt, stride_mh,
        HD: tl.constexpr, HD_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # Reversed: the last q-tiles of a sequence see the most keys; start them first.
        pid_q = tl.num_programs(0) - 1 - tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        num_splits = tl.num_programs(2)

        # Sequence b = largest index with qsl[b] // block_q + b <= pid_q.
        lo = 0  # type: tl.tensor  # (a tensor from the first tl.where; the JIT ignores comments)
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            start = tl.load(qsl_ptr + mid) // block_q + mid
            go_right = start <= pid_q
            lo = tl.where(go_right, mid + 1, lo)
            hi = tl.where(go_right, hi, mid)
        b = lo - 1
        q_start = tl.load(qsl_ptr + b)
        n_q = tl.load(qsl_ptr + b + 1) - q_start
        tile = pid_q - (q_start // block_q + b)
        if tile * block_q >= n_q:
            return
        seq_len = tl.load(sl_ptr + b)
        ctx_start = seq_len - n_q  # absolute position of query 0 of this sequence

        rows = tl.arange(0, BLOCK_M)
        q_idx = tile * block_q + rows // group  # query index within the sequence
        head = kvh * group + rows % group
        row_ok = (rows < block_q * group) & (q_idx < n_q)
        q_pos = ctx_start + q_idx
        offs_d = tl.arange(0, HD_PAD)
        d_mask = offs_d < HD
        tok = (q_start + q_idx).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_mask[None, :], other=0.0)

        last_q = tl.minimum((tile + 1) * block_q, n_q) - 1
        kv_len = ctx_start + last_q + 1  # keys this tile may attend to: [0, kv_len)
        num_tiles = tl.cdiv(kv_len, BLOCK_N)
        # Tiles entirely at or below the first row's diagonal need no mask.
        first_pos = ctx_start + tile * block_q
        full_tiles = (first_pos + 1) // BLOCK_N
        if SPLIT:
            per_split = tl.cdiv(num_tiles, num_splits)
            t_lo = split * per_split
            t_hi = tl.minimum(t_lo + per_split, num_tiles)
        else:
            t_lo = 0
            t_hi = num_tiles

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
        bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_bt
        kv_off_k = kvh * stride_khead
        kv_off_v = kvh * stride_vhead
        mid_t = tl.minimum(tl.maximum(full_tiles, t_lo), t_hi)
        acc, m_i, l_i = _attn_tiles(
            acc, m_i, l_i, q, kc_ptr, vc_ptr, bt_row_ptr, kv_off_k, kv_off_v,
            stride_kslot, stride_ktok, stride_vslot, stride_vtok,
            q_pos, kv_len, t_lo, mid_t, qk_scale, offs_d, d_mask,
            BLOCK_N, BLOCK_SIZE, False, DOT_PREC)
        acc, m_i, l_i = _attn_tiles(
            acc, m_i, l_i, q, kc_ptr, vc_ptr, bt_row_ptr, kv_off_k, kv_off_v,
            stride_kslot, stride_ktok, stride_vslot, stride_vtok,
            q_pos, kv_len, mid_t, t_hi, qk_scale, offs_d, d_mask,
            BLOCK_N, BLOCK_SIZE, True, DOT_PREC)

        st_mask = row_ok[:, None] & d_mask[None, :]
        if SPLIT:
            sp = split.to(tl.int64)
            p_off = sp * stride_ps + tok * stride_pt + head * stride_ph
            tl.store(part_acc_ptr + p_off[:, None] + offs_d[None, :], acc, mask=st_mask)
            m_off = sp * stride_ms + tok * stride_mt + head * stride_mh
            tl.store(part_ml_ptr + m_off, m_i, mask=row_ok)
            tl.store(part_ml_ptr + m_off + 1, l_i, mask=row_ok)
        else:
            out = acc / l_i[:, None]
            o_off = tok * stride_ot + head * stride_oh
            tl.store(out_ptr + o_off[:, None] + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=st_mask)

    @triton.jit(do_not_specialize=["num_splits"])
    def _merge_splits_kernel(
        part_acc_ptr,  # [S, T, H, HD] fp32
        part_ml_ptr,  # [S, T, H, 2] fp32
        out_ptr,  # [T, H, HD]
        num_splits,
        stride_ps, stride_pt, stride_ph,
        stride_ms, stride_mt, stride_mh,
        stride_ot, stride_oh,
        HD: tl.constexpr, HD_PAD: tl.constexpr, S_PAD: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, HD_PAD)
        s_ok = offs_s < num_splits
        m_off = offs_s.to(tl.int64) * stride_ms + t * stride_mt + h * stride_mh
        m = tl.load(part_ml_ptr + m_off, mask=s_ok, other=float("-inf"))
        l_s = tl.load(part_ml_ptr + m_off + 1, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_max))  # [S_PAD]
        denom = tl.sum(w * l_s, 0)
        a_off = offs_s.to(tl.int64)[:, None] * stride_ps + t * stride_pt + h * stride_ph
        a = tl.load(part_acc_ptr + a_off + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d[None, :] < HD), other=0.0)
        o = tl.sum(a * w[:, None], 0) / denom
        tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d,
                 o.to(out_ptr.dtype.element_ty), mask=offs_d < HD)


def _check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 4:
        raise ValueError(f"{name} must be [num_slots, block_size, kv_heads, head_dim], "
                         f"got shape {tuple(cache.shape)}")
    if cache.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, strides {cache.stride()}")


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new keys/values into the paged cache in place.

    ``k_cache``, ``v_cache``: ``[num_slots, block_size, kv_heads, head_dim]`` (strided views
    of the pool, last dim contiguous). ``k``, ``v``: ``[T, kv_heads, head_dim]``, cast to
    the cache dtype. ``slot_mapping``: ``[T]`` int64, ``slot * block_size + offset``;
    negative entries are skipped. Entries must be distinct (two tokens writing one position
    race).
    """
    if not AVAILABLE:
        raise RuntimeError("triton is not available")
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    _, block_size, kv_heads, head_dim = k_cache.shape
    if k.shape != (num_tokens, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k/v must be [T, {kv_heads}, {head_dim}], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    k = k.to(k_cache.dtype)
    v = v.to(v_cache.dtype)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    slot_mapping = slot_mapping.to(torch.int64)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KVH=kv_heads, HD=head_dim, KVH_PAD=_next_pow2(kv_heads), HD_PAD=_next_pow2(head_dim),
        BLOCK_SIZE=block_size,
        num_warps=1 if kv_heads * head_dim <= 1024 else 4,
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Causal attention of packed ragged queries over a paged KV cache.

    ``q``: ``[T, H, D]``; ``k_cache``/``v_cache``: ``[num_slots, block_size, kvh, D]``
    strided views (last dim contiguous); ``block_tables``: ``[B, max_blocks]`` int32;
    ``query_start_loc``: ``[B + 1]`` int32 (``qsl[0] == 0``, ``qsl[B] == T``); ``seq_lens``:
    ``[B]`` int32, with ``seq_lens[b] >= n_b`` and ``seq_lens[b] <= max_blocks * block_size``.
    The ``n_b`` queries of sequence ``b`` are its last ``n_b`` positions; query ``i``
    attends to keys ``0 .. seq_lens[b] - n_b + i``. ``H`` must be a multiple of ``kvh``.
    Returns ``[T, H, D]`` in ``q``'s dtype. ``config`` overrides the launch heuristic.
    """
    if not AVAILABLE:
        raise RuntimeError("triton is not available")
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, kv_heads, hd_cache = k_cache.shape
    if hd_cache != head_dim or num_heads % kv_heads != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError("q, k_cache and v_cache must share a dtype")
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables = block_tables.to(torch.int32)
    query_start_loc = query_start_loc.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32)
    group = num_heads // kv_heads
    if config is None:
        config = choose_config(num_tokens, num_seqs, num_heads, kv_heads, head_dim,
                               block_tables.shape[1] * block_size, q.device, q.element_size())
    block_m = max(config.block_m, _next_pow2(group))
    block_q = max(1, block_m // group)
    num_splits = config.num_splits
    hd_pad = max(16, _next_pow2(head_dim))
    grid = (num_tokens // block_q + num_seqs, kv_heads, num_splits)
    split = num_splits > 1
    if split:
        part_acc = torch.empty((num_splits, num_tokens, num_heads, head_dim),
                               dtype=torch.float32, device=q.device)
        part_ml = torch.empty((num_splits, num_tokens, num_heads, 2),
                              dtype=torch.float32, device=q.device)
    else:
        part_acc = out
        part_ml = out
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, part_acc, part_ml,
        float(scale) * _LOG2E,
        num_seqs, group, block_q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        part_ml.stride(0), part_ml.stride(1), part_ml.stride(2),
        HD=head_dim, HD_PAD=hd_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=config.block_n, SPLIT=split, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_ml, out, num_splits,
            part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
            part_ml.stride(0), part_ml.stride(1), part_ml.stride(2),
            out.stride(0), out.stride(1),
            HD=head_dim, HD_PAD=_next_pow2(head_dim), S_PAD=max(2, _next_pow2(num_splits)),
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out


def reference_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain torch version of :func:`paged_attention` (same contract), one sequence at a
    time, computed in ``compute_dtype`` and returned in that dtype."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=compute_dtype, device=q.device)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q0, q1 = qsl[b], qsl[b + 1]
        n = q1 - q0
        if n == 0:
            continue
        blocks = block_tables[b, : -(-seq_len // block_size)].long()
        k = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:seq_len].to(compute_dtype)
        v = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:seq_len].to(compute_dtype)
        k = k.repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.repeat_interleave(group, dim=1)
        qb = q[q0:q1].to(compute_dtype)  # [n, H, D]
        s = torch.einsum("nhd,lhd->hnl", qb, k) * scale
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hnl,lhd->nhd", torch.softmax(s, dim=-1), v)
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def self_check(device: torch.device | str) -> bool:
    """Run both kernels on small random inputs (strided pool views, GQA, a mixed
    prefill/decode batch, split-KV) and compare with :func:`reference_paged_attention`.

    Returns True only if every check passes; False if triton or the device is unusable or a
    result is off (relative Frobenius error over 2e-2 in bf16, or any NaN/unwritten value).
    """
    device = torch.device(device)
    if not AVAILABLE or (device.type != "cuda" and not _interpreting()):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        num_slots, num_layers, block_size, kv_heads, head_dim, num_heads = 40, 2, 16, 2, 64, 6
        pool = torch.randn((num_slots, num_layers, 2, block_size, kv_heads, head_dim),
                           generator=gen).to(device=device, dtype=dtype)
        k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
        seq_lens_l = [37, 1, 70, 20]
        n_q = [5, 1, 1, 20]
        max_blocks = 6
        perm = torch.randperm(num_slots, generator=gen)
        block_tables = perm[: len(seq_lens_l) * max_blocks].reshape(len(seq_lens_l), max_blocks)
        block_tables = block_tables.to(device=device, dtype=torch.int32)

        # write_kv: write the queried positions of every sequence, then read them back.
        tokens = sum(n_q)
        slots = []
        for b, (sl, n) in enumerate(zip(seq_lens_l, n_q, strict=True)):
            for p in range(sl - n, sl):
                slots.append(int(block_tables[b, p // block_size]) * block_size + p % block_size)
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        k_new = torch.randn((tokens, kv_heads, head_dim), generator=gen).to(device, dtype)
        v_new = torch.randn((tokens, kv_heads, head_dim), generator=gen).to(device, dtype)
        write_kv(k_cache, v_cache, k_new, v_new, slot_mapping)
        flat_k = k_cache.reshape(num_slots * block_size, kv_heads, head_dim)
        flat_v = v_cache.reshape(num_slots * block_size, kv_heads, head_dim)
        if not (torch.equal(flat_k[slot_mapping], k_new)
                and torch.equal(flat_v[slot_mapping], v_new)):
            return False

        q = torch.randn((tokens, num_heads, head_dim), generator=gen).to(device, dtype)
        qsl = torch.tensor([0, *torch.tensor(n_q).cumsum(0).tolist()], dtype=torch.int32,
                           device=device)
        seq_lens = torch.tensor(seq_lens_l, dtype=torch.int32, device=device)
        scale = head_dim ** -0.5
        ref = reference_paged_attention(q, k_cache, v_cache, block_tables, qsl, seq_lens, scale)
        for config in (None, KernelConfig(16, 32, 3), KernelConfig(64, 32, 1)):
            out = paged_attention(q, k_cache, v_cache, block_tables, qsl, seq_lens, scale,
                                  config=config).float()
            if not torch.isfinite(out).all():
                return False
            rel = (out - ref).norm() / ref.norm()
            if not float(rel) < 2e-2:
                return False
        return True
    except Exception:  # any failure means "do not use the kernel"
        return False


def _selftest_main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ok = self_check(dev)
    print(f"triton_attention self_check({dev}) = {ok}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    _selftest_main()


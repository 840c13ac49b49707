"""Paged attention over the KV pool: the torch reference and backend selection.

The KV pool has the layout of :mod:`tiers.layout`:
``[num_slots, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]``. One layer's
caches are the strided views ``k_cache = pool[:, layer, 0]`` and
``v_cache = pool[:, layer, 1]``, each ``[num_slots, block_size, kv_heads, head_dim]``.

Contract shared with ``engine.triton_attention`` (same names, same signatures):

``write_kv(k_cache, v_cache, k, v, slot_mapping) -> None``
    Store ``k``/``v`` ``[T, kv_heads, head_dim]`` at ``slot_mapping`` ``[T]`` int64
    (``slot * block_size + offset_in_block``; ``-1`` skips the token), cast to the
    cache dtype.

``paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)``
    ``q`` ``[T, num_heads, head_dim]`` holds the queries of ``B`` sequences back to back;
    ``block_tables`` ``[B, max_blocks]`` int32 (pool slots), ``query_start_loc``
    ``[B + 1]`` int32, ``seq_lens`` ``[B]`` int32 context lengths INCLUDING the queries.
    The ``n_b`` queries of sequence ``b`` are its last ``n_b`` positions: query ``i``
    attends to key positions ``0 .. seq_lens[b] - n_b + i``. Query head ``h`` reads KV
    head ``h // (num_heads // kv_heads)``. Softmax in fp32. Returns
    ``[T, num_heads, head_dim]`` in ``q``'s dtype. Cache contents past a sequence's
    length (stale or uninitialised, even NaN) never reach the output.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

WriteKV = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]
PagedAttention = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]

_DECODE_CHUNK_ELEMENTS = 1 << 26
"""Bound on gathered K elements per chunk of the batched decode path (fp32: 256 MiB)."""

_SCORE_CHUNK_ELEMENTS = 1 << 24
"""Bound on attention-score elements per query chunk of one sequence (fp32: 64 MiB)."""


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor,
             slot_mapping: Tensor) -> None:
    """Scatter ``k``/``v`` ``[T, kv_heads, head_dim]`` into the paged caches.

    ``k_cache``/``v_cache`` ``[num_slots, block_size, kv_heads, head_dim]`` may be strided
    views of the pool; they are written in place. ``slot_mapping`` ``[T]`` int64 is
    ``slot * block_size + offset``; negative entries are skipped.
    """
    if k.shape != v.shape or k.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping "
                         f"{tuple(slot_mapping.shape)} must agree on T")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"write_kv: k heads/dim {tuple(k.shape[1:])} do not match the cache "
                         f"{tuple(k_cache.shape[2:])}")
    if slot_mapping.numel() == 0:
        return
    slot_mapping = slot_mapping.long()
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    block_size = k_cache.shape[1]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - blocks * block_size
    k_cache.index_put_((blocks, offsets), k.to(k_cache.dtype))
    v_cache.index_put_((blocks, offsets), v.to(v_cache.dtype))


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    query_start_loc: Tensor, seq_lens: Tensor, scale: float) -> Tensor:
    """Causal attention of ``B`` sequences' queries over their paged KV (module contract).

    Torch reference: each sequence's K/V is gathered once through its block table and
    attended in fp32 (explicit matmul, mask, softmax; queries in chunks that bound the
    score matrix); a batch made only of decode queries (one per sequence) runs as one
    batched computation.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_heads {num_kv_heads}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    if len(starts) != len(lengths) + 1 or starts[-1] != num_tokens:
        raise ValueError(f"query_start_loc {starts} does not split {num_tokens} queries into "
                         f"{len(lengths)} sequences")
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    query_lens = [starts[b + 1] - starts[b] for b in range(len(lengths))]
    if all(n == 1 for n in query_lens):
        if min(lengths) < 1:
            raise ValueError(f"seq_lens {lengths} must count each sequence's query")
        _decode(q, k_cache, v_cache, block_tables, seq_lens, max(lengths), scale, out)
        return out
    block_size = k_cache.shape[1]
    group = num_heads // num_kv_heads
    for b, (start, n, length) in enumerate(zip(starts, query_lens, lengths, strict=False)):
        if n == 0:
            continue
        if not n <= length:
            raise ValueError(f"sequence {b}: {n} queries exceed its seq_len {length}")
        num_blocks = -(-length // block_size)
        table = block_tables[b, :num_blocks].long()
        # index_select, not k_cache[table]: advanced indexing of a strided pool view is
        # orders of magnitude slower on CPU.
        k = k_cache.index_select(0, table).reshape(-1, num_kv_heads, head_dim)[:length]
        v = v_cache.index_select(0, table).reshape(-1, num_kv_heads, head_dim)[:length]
        k = k.float().permute(1, 2, 0)  # [KVH, D, L]
        v = v.float().transpose(0, 1)  # [KVH, L, D]
        key_pos = torch.arange(length, device=q.device)
        rows = max(1, _SCORE_CHUNK_ELEMENTS // (num_heads * length))
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            # [m, H, D] -> [KVH, group * m, D]: one KV head's query group, g-major rows.
            qb = q[start + lo:start + hi].float().view(hi - lo, num_kv_heads, group, head_dim)
            qb = qb.permute(1, 2, 0, 3).reshape(num_kv_heads, group * (hi - lo), head_dim)
            query_pos = torch.arange(length - n + lo, length - n + hi, device=q.device)
            hidden = (key_pos[None, :] > query_pos[:, None]).repeat(group, 1)  # [g * m, L]
            scores = torch.matmul(qb, k).mul_(scale).masked_fill_(hidden, float("-inf"))
            ob = torch.matmul(scores.softmax(dim=-1), v)  # [KVH, group * m, D]
            ob = ob.view(num_kv_heads, group, hi - lo, head_dim).permute(2, 0, 1, 3)
            out[start + lo:start + hi] = ob.reshape(hi - lo, num_heads, head_dim).to(q.dtype)
    return out


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
            seq_lens: Tensor, max_len: int, scale: float, out: Tensor) -> None:
    """One query per sequence: gather every sequence's K/V padded to ``max_len``, mask the
    padding (zeroing it so stale NaNs cannot leak) and attend in one batched call."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-max_len // block_size)
    padded_len = num_blocks * block_size
    chunk = max(1, _DECODE_CHUNK_ELEMENTS // (padded_len * num_kv_heads * head_dim))
    block_idx = torch.arange(num_blocks, device=q.device)
    key_pos = torch.arange(padded_len, device=q.device)
    for lo in range(0, num_seqs, chunk):
        hi = min(num_seqs, lo + chunk)
        lens = seq_lens[lo:hi].long()
        table = block_tables[lo:hi, :num_blocks].long()
        table = torch.where(block_idx[None, :] * block_size < lens[:, None], table, 0)
        valid = key_pos[None, :] < lens[:, None]  # [b, L]
        shape = (hi - lo, padded_len, num_kv_heads, head_dim)
        k = k_cache.index_select(0, table.reshape(-1)).view(shape).float()
        v = v_cache.index_select(0, table.reshape(-1)).view(shape).float()
        k = k.masked_fill_(~valid[:, :, None, None], 0.0).permute(0, 2, 3, 1)  # [b, KVH, D, L]
        v = v.masked_fill_(~valid[:, :, None, None], 0.0).transpose(1, 2)  # [b, KVH, L, D]
        qb = q[lo:hi].float().view(hi - lo, num_kv_heads, group, head_dim)
        scores = torch.matmul(qb, k).mul_(scale)  # [b, KVH, group, L]
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        ob = torch.matmul(scores.softmax(dim=-1), v)  # [b, KVH, group, D]
        out[lo:hi] = ob.reshape(hi - lo, num_heads, head_dim).to(q.dtype)


@dataclass(frozen=True)
class AttentionBackend:
    """The pair of KV functions a model runs with, and the name of their implementation
    (``"torch"`` for this module's reference, ``"triton"`` for the CUDA kernels)."""

    name: str
    write_kv: WriteKV
    paged_attention: PagedAttention


TORCH_BACKEND = AttentionBackend("torch", write_kv, paged_attention)
"""The reference backend: any device, any dtype."""

_selected: dict[str, AttentionBackend] = {}


def select_backend(device: torch.device | str, prefer: str = "auto") -> AttentionBackend:
    """The attention backend for ``device``.

    ``prefer="auto"`` uses ``engine.triton_attention`` on CUDA when it imports and agrees
    with the reference on a small mixed prefill/decode problem (checked once per device),
    else the torch reference. ``"torch"`` forces the reference; ``"triton"`` requires the
    kernels and raises ``RuntimeError`` saying why they cannot be used.
    """
    if prefer not in ("auto", "torch", "triton"):
        raise ValueError(f"prefer must be 'auto', 'torch' or 'triton', got {prefer!r}")
    device = torch.device(device)
    if prefer == "torch" or (prefer == "auto" and device.type != "cuda"):
        return TORCH_BACKEND
    key = str(device)
    if key not in _selected:
        try:
            with torch.cuda.device(device):  # kernels launch on the current device
                _selected[key] = _load_triton(device)
        except Exception as exc:  # noqa: BLE001 - any failure means "use the reference"
            if prefer == "triton":
                raise RuntimeError(f"Triton attention unusable on {device}: {exc}") from exc
            log.warning("Triton attention unusable on %s (%s); using the torch reference",
                        device, exc)
            _selected[key] = TORCH_BACKEND
    backend = _selected[key]
    if prefer == "triton" and backend is TORCH_BACKEND:
        raise RuntimeError(f"Triton attention failed its self-check on {device} earlier")
    return backend


def _load_triton(device: torch.device) -> AttentionBackend:
    """Import ``engine.triton_attention`` and check it against the reference on ``device``."""
    if device.type != "cuda":
        raise RuntimeError("Triton kernels need a CUDA device")
    from engine import triton_attention  # lazy: needs triton and a GPU

    if not getattr(triton_attention, "AVAILABLE", True):
        raise RuntimeError("triton is not installed")
    own_check = getattr(triton_attention, "self_check", None)
    if own_check is not None and not own_check(device):
        raise RuntimeError("engine.triton_attention.self_check failed")
    backend = AttentionBackend("triton", triton_attention.write_kv,
                               triton_attention.paged_attention)
    self_check(backend, device)
    return backend


def self_check(backend: AttentionBackend, device: torch.device | str,
               dtype: torch.dtype = torch.bfloat16) -> None:
    """Raise ``AssertionError`` unless ``backend`` matches the reference on a small batch
    (GQA, non-contiguous block tables, a cached prefix, prefill and decode together)."""
    gen = torch.Generator().manual_seed(0)
    num_slots, num_layers, block_size, kv_heads, heads, head_dim = 16, 2, 16, 2, 4, 64
    pool = torch.randn(num_slots, num_layers, 2, block_size, kv_heads, head_dim, generator=gen)
    pool = pool.to(device=device, dtype=dtype)
    query_lens, seq_lens = [5, 1, 20, 1], [37, 16, 20, 9]
    perm = torch.randperm(num_slots, generator=gen).tolist()
    tables, used = [], 0
    for length in seq_lens:
        n = -(-length // block_size)
        tables.append(perm[used:used + n] + [0] * (3 - n))
        used += n
    total = sum(query_lens)
    q = torch.randn(total, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(total, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(total, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    slots = [tables[b][p // block_size] * block_size + p % block_size
             for b, (n, length) in enumerate(zip(query_lens, seq_lens, strict=True))
             for p in range(length - n, length)]
    block_tables = torch.tensor(tables, dtype=torch.int32, device=device)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32,
                          device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    scale = 1.0 / math.sqrt(head_dim)
    results = []
    for impl in (backend, TORCH_BACKEND):
        p = pool.clone()
        impl.write_kv(p[:, 1, 0], p[:, 1, 1], k, v, slot_mapping)
        o = impl.paged_attention(q, p[:, 1, 0], p[:, 1, 1], block_tables, starts, lens, scale)
        results.append((p, o))
    (p_test, o_test), (p_ref, o_ref) = results
    assert torch.equal(p_test, p_ref), "write_kv disagrees with the reference"
    err = (o_test.float() - o_ref.float()).abs().max().item()
    assert err < 2e-2, f"paged_attention differs from the reference by {err}"

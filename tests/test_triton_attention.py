"""GPU tests of engine/triton_attention.py against a float64 torch reference.

Skipped where CUDA or triton is absent (set TRITON_INTERPRET=1 to run a subset on the CPU
through Triton's interpreter). Every check draws fresh random inputs, reads the caches
through strided views of a real pool ``[slots, layers, 2, block_size, kvh, hd]``, uses
random non-contiguous block tables, fills every slot and position the kernel must not read
with NaN, and poisons the output memory before each launch.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from engine import triton_attention as ta

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not _INTERPRET else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ta.AVAILABLE or not (torch.cuda.is_available() or _INTERPRET),
                       reason="needs triton and a CUDA device"),
]

# Relative Frobenius error bounds (METHOD.md): fp32 runs IEEE dots; fp16/bf16 round the
# probabilities to the input dtype for the P@V product and the output to the input dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.2e-2}
BLOCK_SIZE = 16
NUM_LAYERS = 3
LAYER = 1
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def ref_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    qsl: list[int],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Float64 reference of the paged_attention contract; returns ``[T, H, D]`` float64."""
    num_tokens, num_heads, head_dim = q.shape
    kvh = k_cache.shape[2]
    group = num_heads // kvh
    out = torch.full((num_tokens, num_heads, head_dim), float("nan"), dtype=torch.float64,
                     device=q.device)
    for b, seq_len in enumerate(seq_lens):
        q0, q1 = qsl[b], qsl[b + 1]
        n = q1 - q0
        nblk = -(-seq_len // BLOCK_SIZE)
        blocks = block_tables[b, :nblk].long()
        k = k_cache[blocks].reshape(-1, kvh, head_dim)[:seq_len].double()
        v = v_cache[blocks].reshape(-1, kvh, head_dim)[:seq_len].double()
        k = k.repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.repeat_interleave(group, dim=1)
        k_pos = torch.arange(seq_len, device=q.device)
        for c0 in range(0, n, 1024):  # bound the [H, n, L] score memory
            c1 = min(n, c0 + 1024)
            qb = q[q0 + c0:q0 + c1].double()  # [c, H, D]
            s = torch.einsum("nhd,lhd->hnl", qb, k) * scale
            q_pos = torch.arange(seq_len - n + c0, seq_len - n + c1, device=q.device)
            s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
            out[q0 + c0:q0 + c1] = torch.einsum("hnl,lhd->nhd", torch.softmax(s, -1), v)
    return out


class Batch:
    """A random ragged batch on a NaN-poisoned paged pool."""

    def __init__(self, seqs: list[tuple[int, int]], num_heads: int, kvh: int, head_dim: int,
                 dtype: torch.dtype, seed: int, q_scale: float = 1.0) -> None:
        """``seqs``: ``(seq_len, n_queries)`` per sequence."""
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.seq_lens = [s for s, _ in seqs]
        self.n_q = [n for _, n in seqs]
        nblks = [-(-s // BLOCK_SIZE) for s in self.seq_lens]
        max_blocks = max(nblks) + 3
        num_slots = sum(nblks) + 7
        pool = torch.full((num_slots, NUM_LAYERS, 2, BLOCK_SIZE, kvh, head_dim), float("nan"),
                          dtype=dtype)
        perm = torch.randperm(num_slots, generator=gen).tolist()
        table = torch.tensor([[rng.randrange(num_slots) for _ in range(max_blocks)]
                              for _ in seqs], dtype=torch.int32)  # padding: random slots
        used = 0
        for b, (seq_len, nb) in enumerate(zip(self.seq_lens, nblks, strict=True)):
            slots = perm[used:used + nb]
            used += nb
            table[b, :nb] = torch.tensor(slots, dtype=torch.int32)
            for i, slot in enumerate(slots):
                valid = min(BLOCK_SIZE, seq_len - i * BLOCK_SIZE)  # tail stays NaN
                pool[slot, :, :, :valid] = torch.randn(
                    (NUM_LAYERS, 2, valid, kvh, head_dim), generator=gen).to(dtype)
        self.pool = pool.to(DEVICE)
        self.k_cache = self.pool[:, LAYER, 0]  # strided views
        self.v_cache = self.pool[:, LAYER, 1]
        self.block_tables = table.to(DEVICE)
        self.qsl = [0]
        for n in self.n_q:
            self.qsl.append(self.qsl[-1] + n)
        self.q = (torch.randn((self.qsl[-1], num_heads, head_dim), generator=gen)
                  * q_scale).to(dtype).to(DEVICE)
        self.scale = head_dim ** -0.5

    def run(self, config: ta.KernelConfig | None = None) -> torch.Tensor:
        """Launch the kernel on poisoned output memory; returns its output."""
        poison = torch.full_like(self.q, float("nan"))  # freed, then reused by the allocator
        del poison
        return ta.paged_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables,
            torch.tensor(self.qsl, dtype=torch.int32, device=DEVICE),
            torch.tensor(self.seq_lens, dtype=torch.int32, device=DEVICE),
            self.scale, config=config)

    def reference(self) -> torch.Tensor:
        return ref_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.qsl,
                             self.seq_lens, self.scale)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, label: str) -> float:
    """Assert the error bound; print the numbers for the record; return the rel. error."""
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), f"{label}: non-finite or unwritten output"
    diff = out.double() - ref
    rel = float(diff.norm() / ref.norm())
    max_abs = float(diff.abs().max())
    print(f"ERR {label} dtype={str(dtype).removeprefix('torch.')} rel={rel:.3e} "
          f"max_abs={max_abs:.3e}")
    assert rel < REL_TOL[dtype], f"{label}: relative error {rel:.3e}"
    return rel


# (seq_len, n_queries): fresh prefill, prefill over a cached prefix, decodes at block
# boundaries and off them, a chunk that ends mid-block, a one-token sequence.
MIXED = [(37, 37), (300, 77), (1000, 1), (16, 1), (1, 1), (513, 1), (130, 130), (257, 3),
         (64, 16)]

CONFIGS = {
    "auto": None,
    "small-tile": ta.KernelConfig(block_m=16, block_n=64, num_splits=1),
    "split": ta.KernelConfig(block_m=16, block_n=32, num_splits=4),
    "big-tile": ta.KernelConfig(block_m=128, block_n=64, num_splits=1, num_warps=8),
    "big-tile-split": ta.KernelConfig(block_m=64, block_n=64, num_splits=5),
    "biggest-tile-split": ta.KernelConfig(block_m=128, block_n=64, num_splits=3, num_warps=8),
}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_mixed_batch(dtype: torch.dtype, group: int, head_dim: int) -> None:
    if _INTERPRET and (dtype != torch.float32 or head_dim != 64):
        pytest.skip("interpreter: fp32, head_dim 64 only")
    kvh = 2
    batch = Batch(MIXED, group * kvh, kvh, head_dim, dtype, seed=group * 1000 + head_dim)
    ref = batch.reference()
    for name, config in CONFIGS.items():
        check(batch.run(config), ref, dtype, f"mixed g={group} hd={head_dim} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_long_context(dtype: torch.dtype) -> None:
    """8k contexts: decodes (split-KV by the heuristic) and a 512-query chunk on 8k."""
    if _INTERPRET:
        pytest.skip("too slow for the interpreter")
    kvh, group, head_dim = 2, 4, 128
    decode = Batch([(8192, 1), (8000, 1), (5000, 1), (8191, 1)], group * kvh, kvh, head_dim,
                   dtype, seed=7)
    ref = decode.reference()
    for name, config in CONFIGS.items():
        check(decode.run(config), ref, dtype, f"long-decode {name}")
    chunk = Batch([(8192, 512), (4096, 1), (8100, 1)], group * kvh, kvh, head_dim, dtype, seed=8)
    ref = chunk.reference()
    for name in ("auto", "big-tile", "big-tile-split", "biggest-tile-split"):
        check(chunk.run(CONFIGS[name]), ref, dtype, f"long-chunk {name}")
    # A 32-token question after 8k cached tokens: the heuristic splits its KV.
    question = Batch([(8032, 32)], group * kvh, kvh, head_dim, dtype, seed=9)
    auto = ta.choose_config(32, 1, group * kvh, kvh, head_dim, 8032, question.q.device,
                            question.q.element_size())
    assert auto.num_splits > 1 and auto.block_m >= 64
    check(question.run(), question.reference(), dtype, "question-after-8k auto")


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed: int) -> None:
    """Random shapes, lengths and query counts, peaked softmax (scaled queries)."""
    rng = random.Random(seed)
    dtype = [torch.bfloat16, torch.float16][seed % 2]
    if _INTERPRET:
        dtype = torch.float32
    group = rng.choice([1, 2, 3, 4, 5, 8])
    kvh = rng.choice([1, 2, 3])
    head_dim = rng.choice([64, 128]) if not _INTERPRET else 64
    seqs = []
    for _ in range(rng.randint(1, 12)):
        seq_len = rng.randint(1, 2500 if not _INTERPRET else 200)
        n = rng.choice([1, 1, rng.randint(1, seq_len)])
        seqs.append((seq_len, n))
    batch = Batch(seqs, group * kvh, kvh, head_dim, dtype, seed=100 + seed, q_scale=3.0)
    check(batch.run(), batch.reference(), dtype, f"random seed={seed} g={group} kvh={kvh}")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_write_kv(dtype: torch.dtype, head_dim: int) -> None:
    """Scatter into one layer of a strided pool; every other byte stays as it was."""
    gen = torch.Generator().manual_seed(head_dim)
    kvh, num_slots, tokens = 3, 50, 300
    pool = torch.randn((num_slots, NUM_LAYERS, 2, BLOCK_SIZE, kvh, head_dim),
                       generator=gen).to(dtype).to(DEVICE)
    positions = torch.randperm(num_slots * BLOCK_SIZE, generator=gen)[:tokens]
    slot_mapping = positions.clone()
    slot_mapping[::17] = -1  # padding tokens are skipped
    k = torch.randn((tokens, kvh, head_dim), generator=gen).to(dtype).to(DEVICE)
    v = torch.randn((tokens, kvh, head_dim), generator=gen).to(dtype).to(DEVICE)
    expected = pool.clone()
    keep = slot_mapping >= 0
    exp_k = expected[:, LAYER, 0].reshape(-1, kvh, head_dim)  # copies: write back below
    exp_v = expected[:, LAYER, 1].reshape(-1, kvh, head_dim)
    idx = slot_mapping[keep].to(DEVICE)
    exp_k[idx] = k[keep.to(DEVICE)]
    exp_v[idx] = v[keep.to(DEVICE)]
    expected[:, LAYER, 0] = exp_k.reshape(num_slots, BLOCK_SIZE, kvh, head_dim)
    expected[:, LAYER, 1] = exp_v.reshape(num_slots, BLOCK_SIZE, kvh, head_dim)
    ta.write_kv(pool[:, LAYER, 0], pool[:, LAYER, 1], k, v, slot_mapping.to(DEVICE))
    assert torch.equal(pool, expected)


def test_write_then_attend() -> None:
    """Decode step end to end: write the new token's K/V, then attend over it."""
    dtype = torch.bfloat16 if not _INTERPRET else torch.float32
    kvh, group, head_dim = 3, 3, 64
    batch = Batch([(100, 1), (33, 1), (16, 1)], group * kvh, kvh, head_dim, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    k_new = torch.randn((3, kvh, head_dim), generator=gen).to(dtype).to(DEVICE)
    v_new = torch.randn((3, kvh, head_dim), generator=gen).to(dtype).to(DEVICE)
    slots = []
    for b, seq_len in enumerate(batch.seq_lens):
        pos = seq_len - 1
        slots.append(int(batch.block_tables[b, pos // BLOCK_SIZE]) * BLOCK_SIZE
                     + pos % BLOCK_SIZE)
    ta.write_kv(batch.k_cache, batch.v_cache, k_new, v_new,
                torch.tensor(slots, dtype=torch.int64, device=DEVICE))
    check(batch.run(), batch.reference(), dtype, "write-then-attend")


def test_self_check() -> None:
    assert ta.self_check(DEVICE)


def test_matches_engine_reference() -> None:
    """Agreement with the engine's CPU torch reference (engine/attention.py), if present."""
    ref_mod = pytest.importorskip("engine.attention")
    if not hasattr(ref_mod, "paged_attention"):
        pytest.skip("engine.attention has no paged_attention yet")
    kvh, group, head_dim = 2, 4, 64
    batch = Batch(MIXED, group * kvh, kvh, head_dim, torch.float32, seed=11)
    qsl = torch.tensor(batch.qsl, dtype=torch.int32)
    lens = torch.tensor(batch.seq_lens, dtype=torch.int32)
    theirs = ref_mod.paged_attention(batch.q.cpu(), batch.k_cache.cpu(), batch.v_cache.cpu(),
                                     batch.block_tables.cpu(), qsl, lens, batch.scale)
    ours = batch.run().cpu()
    rel = float((ours.double() - theirs.double()).norm() / theirs.double().norm())
    print(f"ERR engine-reference dtype=float32 rel={rel:.3e}")
    assert rel < 1e-4

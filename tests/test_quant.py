"""Compressed KV blocks (tiers/quant.py): error bounds, size, determinism, serialization,
the namespace's format field, and the Triton kernels against the torch reference (GPU)."""

from __future__ import annotations

import pytest
import torch

from radix.hashing import Namespace
from tiers import quant
from tiers.layout import KVLayout

SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
LLAMA3 = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16)
SMALL = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)


def _blocks(layout: KVLayout, n: int, dtype: torch.dtype, device: str = "cpu",
            seed: int = 0) -> torch.Tensor:
    """Blocks with heads of very different magnitudes and a few outliers (like real K)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *layout.block_shape), generator=g)
    head_scale = torch.logspace(-2, 1, layout.num_kv_heads)
    x = x * head_scale[None, None, None, None, :, None]
    x[..., 0] *= 8  # an outlier channel, as RoPE'd keys have
    return x.to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_error_at_most_half_a_step_per_head_vector(dtype):
    x = _blocks(SMALL, 5, dtype)
    q = quant.quantize_reference(x, "int8")
    y = quant.dequantize_reference(q, torch.float32)
    err = (y - x.float()).abs()
    step = q.scales.float()[..., None]
    # half a step from rounding; a scale rounded down to bf16 can clamp the largest value
    # by at most 127 x 2**-9 of a step (< half a step); 1e-4 of a step for fp32 rounding
    assert bool((err <= step * (0.5 + 1e-4)).all())
    amax = x.float().abs().amax(dim=5)
    assert q.scales.dtype == torch.bfloat16 and q.scales.shape == amax.shape
    torch.testing.assert_close(q.scales.float(), amax / 127, rtol=2 ** -8, atol=0)
    assert int(q.codes.abs().max()) == 127  # vectors use the full range
    assert q.codes.dtype == torch.int8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_relative_error_bound(dtype):
    x = _blocks(SMALL, 5, dtype)
    q = quant.quantize_reference(x, "fp8")
    y = quant.dequantize_reference(q, torch.float32)
    xs = x.float()
    scale = q.scales.float()[..., None]
    # e4m3: 3 mantissa bits -> relative error <= 2**-4 for normal codes (|code| >= 2**-6);
    # below that the absolute error is at most half the subnormal step 2**-9, times scale.
    bound = torch.maximum(xs.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)
    assert bool(((y - xs).abs() <= bound).all())
    assert float(q.codes.float().abs().max()) == 448.0


def test_round_trip_to_block_dtype_is_close():
    x = _blocks(LLAMA3, 2, torch.bfloat16)
    for fmt, rel in (("int8", 0.04), ("fp8", 0.04)):
        y = quant.dequantize(quant.quantize(x, fmt), torch.bfloat16)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape
        # relative RMS error (an 8x outlier channel costs int8 resolution: ~3%)
        num = (y.float() - x.float()).pow(2).mean().sqrt()
        den = x.float().pow(2).mean().sqrt()
        assert float(num / den) < rel, fmt


def test_zero_head_has_zero_scale_and_decodes_to_zeros():
    x = _blocks(SMALL, 1, torch.bfloat16)
    x[0, 1, 0, :, 1, :] = 0  # layer 1, K, head 1
    for fmt in quant.COMPRESSED_FORMATS:
        q = quant.quantize_reference(x, fmt)
        assert bool((q.scales[0, 1, 0, :, 1] == 0).all())
        y = quant.dequantize_reference(q, torch.bfloat16)
        assert bool((y[0, 1, 0, :, 1, :] == 0).all())
        assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("layout", [SMOLLM2, LLAMA3], ids=["smollm2", "llama3-8b"])
def test_bytes_per_block_about_half_of_exact(layout):
    for fmt in quant.COMPRESSED_FORMATS:
        for dtype, bound in (("bfloat16", 0.52), ("float16", 0.52), ("float32", 0.26)):
            exact = KVLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim,
                             layout.block_size, dtype)
            ratio = quant.compression_ratio(exact, fmt)
            assert ratio <= bound, (fmt, dtype, ratio)
            q = quant.quantize(_blocks(exact, 1, getattr(torch, dtype)), fmt)
            assert len(quant.encode_payload(q)) == quant.compressed_block_bytes(exact, fmt)
    # int8 payload (1 byte a value) plus a 2-byte scale per head vector
    assert quant.compressed_block_bytes(SMOLLM2, "int8") == \
        30 * 2 * 16 * 3 * 64 + 30 * 2 * 16 * 3 * 2
    assert quant.compression_ratio(SMOLLM2, "int8") == (64 + 2) / (2 * 64)


def test_deterministic_and_slot_selection():
    pool = _blocks(SMALL, 6, torch.bfloat16, seed=3)
    a = quant.quantize(pool, "int8", [4, 1])
    b = quant.quantize(pool, "int8", [4, 1])
    assert quant.encode_payload(a, 0) == quant.encode_payload(b, 0)
    assert quant.encode_payload(a, 1) == quant.encode_payload(b, 1)
    one = quant.quantize(pool[1:2].clone(), "int8")
    assert quant.encode_payload(a, 1) == quant.encode_payload(one, 0)
    with pytest.raises(ValueError, match="slots must be in"):
        quant.quantize(pool, "int8", [6])


def test_serialization_round_trip_and_length_check():
    x = _blocks(SMOLLM2, 3, torch.bfloat16)
    for fmt in quant.COMPRESSED_FORMATS:
        q = quant.quantize(x, fmt)
        data = quant.encode_payload(q, 2)
        back = quant.decode_payload(data, SMOLLM2, fmt)
        assert back.num_blocks == 1
        assert torch.equal(back.codes.view(torch.uint8), q.codes[2:3].view(torch.uint8))
        assert torch.equal(back.scales, q.scales[2:3])
        with pytest.raises(ValueError, match="compressed payload is"):
            quant.decode_payload(data[:-1], SMOLLM2, fmt)
    with pytest.raises(ValueError, match="kv_format must be one of"):
        quant.quantize(x, "int4")


def test_dequantize_into_writes_only_the_given_slots():
    src = _blocks(SMALL, 2, torch.float16, seed=1)
    pool = torch.zeros((5, *SMALL.block_shape), dtype=torch.float16)
    q = quant.quantize(src, "int8")
    quant.dequantize_into(q, pool, [3, 0])
    ref = quant.dequantize_reference(q, torch.float16)
    assert torch.equal(pool[3], ref[0]) and torch.equal(pool[0], ref[1])
    assert bool((pool[[1, 2, 4]] == 0).all())
    with pytest.raises(ValueError, match="2 blocks for 1 slots"):
        quant.dequantize_into(q, pool, [1])


def test_round_trip_in_pool_changes_only_those_slots():
    pool = _blocks(SMALL, 4, torch.bfloat16, seed=2)
    before = pool.clone()
    quant.round_trip(pool, "int8", [1, 2])
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[3], before[3])
    assert not torch.equal(pool[1], before[1])
    expected = quant.dequantize_reference(quant.quantize_reference(before[1:3].clone(), "int8"),
                                          torch.bfloat16)
    assert torch.equal(pool[1:3], expected)


def test_namespace_names_the_format_and_exact_keys_are_unchanged():
    exact = Namespace("model-fp", "bfloat16", 16)
    assert exact.kv_format == "exact"
    assert exact.encode() == b"kvstore-ns-v1\x00model-fp\x00bfloat16\x0016\x001\x00"
    roots = {Namespace("model-fp", "bfloat16", 16, kv_format=f).root()
             for f in ("exact", "int8", "fp8")}
    assert len(roots) == 3  # exact and compressed blocks never share a key
    with pytest.raises(ValueError, match="kv_format must be one of"):
        Namespace("model-fp", kv_format="int4")


# ------------------------------------------------------------------------------ GPU


def _cuda_triton() -> None:
    if not quant.triton_available():
        pytest.skip("needs CUDA and triton")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", quant.COMPRESSED_FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", [SMOLLM2, LLAMA3, KVLayout(3, 5, 80, 12)],
                         ids=["smollm2", "llama3-8b", "odd-sizes"])
def test_triton_matches_reference(fmt, dtype, layout):
    _cuda_triton()
    pool = _blocks(layout, 9, dtype, "cuda", seed=4)
    slots = [7, 2, 5]
    q_t = quant.quantize_triton(pool, fmt, slots)
    q_r = quant.quantize_reference(pool, fmt, slots)
    assert torch.equal(q_t.scales, q_r.scales)
    assert torch.equal(q_t.codes.view(torch.uint8), q_r.codes.view(torch.uint8))
    out_t = torch.zeros_like(pool)
    out_r = torch.zeros_like(pool)
    quant.dequantize_into_triton(q_t, out_t, [0, 8, 3])
    out_r[[0, 8, 3]] = quant.dequantize_reference(q_r, dtype)
    assert torch.equal(out_t, out_r)
    # the CPU reference gives the same bytes as the GPU (deterministic across devices)
    q_cpu = quant.quantize_reference(pool.cpu(), fmt, slots)
    assert quant.encode_payload(q_cpu, 1) == quant.encode_payload(q_t, 1)

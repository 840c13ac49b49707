"""Compressed (int8/fp8) shared tiers wired into the store: real LMDB, real redis-server,
the real SmolLM2.

A block goes down quantized and comes back dequantized into GPU slots: its KV is the
quantizer's round trip of the original (within its error bound, not bit-exact). Stores of
different formats never read each other's blocks (the namespace differs), and a block
whose header names another format is a counted miss.
"""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest
import torch

from kvstore.config import StoreConfig
from kvstore.store import Allocated, KVStore
from radix import Namespace, hash_blocks
from tiers import quant
from tiers.codec import ExpectedBlocks, encode_block
from tiers.layout import KVLayout

BS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=BS, dtype="float32")
FORMATS = ("int8", "fp8")


def ns(kv_format: str) -> Namespace:
    return Namespace("kv-format-test-model", dtype="float32", block_size=BS,
                     kv_format=kv_format)


def make_store(kv_format: str, **kw) -> KVStore:
    return KVStore(StoreConfig(layout=LAYOUT, block_size=BS, kv_format=kv_format, **kw))


def disk(tmp_path: Path) -> dict:
    return {"disk_path": str(tmp_path / "disk"), "disk_bytes": 64 * LAYOUT.block_bytes}


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n,), generator=g).tolist()


def original(key: bytes) -> torch.Tensor:
    """The KV a block was computed with (seeded by its key; a wide range of magnitudes)."""
    g = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))
    scale = torch.logspace(-3, 2, LAYOUT.head_dim)[torch.randperm(LAYOUT.head_dim,
                                                                  generator=g)]
    return torch.randn(LAYOUT.block_shape, generator=g) * scale


def error_bound(x: torch.Tensor, kv_format: str) -> torch.Tensor:
    """Largest error the quantizer may make on each value of ``x`` (tiers/quant.py): half
    an int8 step, or 2**-4 of the value plus half the smallest fp8 step, with the bf16
    rounding of the scale (< 2**-8 relative)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    if kv_format == "int8":
        return amax / 127 * (0.5 + 2 ** -7) * (1 + 2 ** -8) + 1e-12
    step = amax / 448 * (1 + 2 ** -8)
    return x.abs() * 2 ** -4 + step * 2 ** -9 + 1e-12


def serve(store: KVStore, toks: list[int], kv_format: str) -> dict[str, int]:
    """Match, acquire, wait, check every hit block, compute the rest, commit, release."""
    chain = hash_blocks(ns(kv_format).root(), toks, BS)
    lease = store.acquire(store.match(chain))
    store.wait(lease)
    tiers = set(lease.cached_tokens)
    for i in range(lease.committed):
        got, want = store.gpu.block(lease.slots[i]).cpu(), original(chain.keys[i])
        if kv_format == "exact":
            assert torch.equal(got, want), i
            continue
        trip = quant.dequantize(quant.quantize(want[None], kv_format), torch.float32)[0]
        if tiers & {"gpu", "host"}:
            # the pools keep what they were given: computed KV, or KV promoted earlier
            # from the compressed tier
            assert torch.equal(got, want) or torch.equal(got, trip), i
        else:
            # through a compressed tier: the quantizer's round trip, within its bound
            assert not torch.equal(got, want)
            assert torch.equal(got, trip)
            assert bool(((got - want).abs() <= error_bound(want, kv_format)).all()), i
    res = store.allocate(lease, len(toks))
    assert isinstance(res, Allocated)
    for i in range(lease.committed, len(lease.slots)):
        key = chain.keys[i] if i < len(chain.keys) else bytes([i]) * 16
        store.gpu.block(lease.slots[i]).copy_(original(key))
    store.commit(lease, len(toks))
    store.check_integrity()
    store.release(lease)
    store.check_integrity()
    return lease.cached_tokens


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs CUDA"))])
@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("shared", ["disk", "redis"])
def test_round_trip_through_a_shared_tier(kv_format, shared, device, tmp_path, redis_server):
    """On CUDA: publication quantizes on the device (Triton), loads dequantize into the
    device pool (Triton) after one packed host -> device copy a batch."""
    kw = disk(tmp_path) if shared == "disk" else {"redis_url": redis_server.url}
    kw["device"] = device
    round_trip(kv_format, shared, kw)


@pytest.mark.parametrize("kv_format", FORMATS)
def test_round_trip_through_a_real_daemon(kv_format):
    """The daemon stores compressed blobs as given (it verifies them, format and all)."""
    from bench.servers import DaemonProcess

    with DaemonProcess(["--host-bytes", "64MiB"]) as daemon:
        round_trip(kv_format, "remote", {"remote_url": daemon.url})


def round_trip(kv_format: str, shared: str, kw: dict) -> None:
    first = make_store(kv_format, gpu_blocks=16, **kw)
    toks = tokens(1, 6 * BS + 1)
    assert serve(first, toks, kv_format) == {}
    first.flush()
    s = first.stats()
    assert s.index.blocks[shared] == 6 and s.blocks_moved[f"gpu->{shared}"] == 6
    # the tier holds compressed blobs, about half the exact ones
    blob = first.shared_tiers[shared].get([hash_blocks(ns(kv_format).root(), toks,
                                                       BS).keys[0]])[0]
    assert blob is not None
    assert len(blob) < LAYOUT.block_bytes * 0.6
    first.close()
    second = make_store(kv_format, gpu_blocks=16, **kw)  # another engine: empty index
    assert serve(second, toks, kv_format) == {shared: 6 * BS}
    assert second.stats().blocks_moved[f"{shared}->gpu"] == 6
    second.close()


@pytest.mark.parametrize("kv_format", FORMATS)
def test_host_demotion_quantizes_and_promotion_dequantizes(kv_format, tmp_path):
    """Write-back without publication: blocks reach the disk only by demotion from the
    (exact) host pool, and come back dequantized."""
    store = make_store(kv_format, gpu_blocks=4, host_blocks=4, publish=False,
                       **disk(tmp_path))
    a, b, c = tokens(1, 4 * BS), tokens(2, 4 * BS), tokens(3, 4 * BS)
    serve(store, a, kv_format)
    serve(store, b, kv_format)  # a -> host (exact)
    assert serve(store, a, kv_format) == {"host": 4 * BS}  # host stays exact: checked
    serve(store, b, kv_format)
    serve(store, c, kv_format)  # a -> disk, quantized (written in the background)
    store.flush()
    s = store.stats()
    assert s.blocks_moved["host->disk"] >= 4
    assert serve(store, a, kv_format) == {"disk": 4 * BS}
    store.close()


def test_exact_and_int8_stores_on_one_disk_never_mix(tmp_path):
    toks = tokens(7, 4 * BS)
    exact = make_store("exact", gpu_blocks=8, **disk(tmp_path))
    serve(exact, toks, "exact")
    exact.flush()
    exact.close()
    int8 = make_store("int8", gpu_blocks=8, **disk(tmp_path))
    assert serve(int8, toks, "int8") == {}  # other namespace keys: no hit
    int8.flush()
    assert int8.stats().corrupt_blocks == 0
    int8.close()
    exact = make_store("exact", gpu_blocks=8, **disk(tmp_path))
    assert serve(exact, toks, "exact") == {"disk": 4 * BS}  # exact KV, bit for bit
    exact.close()
    # both formats' blocks are on the disk, under different keys
    assert len(set(hash_blocks(ns("exact").root(), toks, BS).keys)
               & set(hash_blocks(ns("int8").root(), toks, BS).keys)) == 0


def test_header_of_another_format_is_a_counted_miss(tmp_path):
    """An fp8 blob stored under an int8 store's key (same chain, wrong format): the
    tier verifies it (a valid blob), the store refuses it as corrupt and recomputes."""
    toks = tokens(9, 3 * BS)
    chain = hash_blocks(ns("int8").root(), toks, BS)
    store = make_store("int8", gpu_blocks=8, **disk(tmp_path))
    serve(store, toks, "int8")
    store.flush()
    store.close()
    q = quant.quantize(original(chain.keys[1])[None], "fp8")
    wrong = encode_block(chain.keys[1], chain.keys[0], chain.blocks[1], LAYOUT,
                         quant.encode_payload(q), kv_format="fp8")
    env = lmdb.open(str(tmp_path / "disk"), max_dbs=16)
    with env.begin(write=True, db=env.open_db(b"blocks")) as txn:
        txn.put(chain.keys[1], wrong)
    env.close()
    fresh = make_store("int8", gpu_blocks=8, **disk(tmp_path))
    assert serve(fresh, toks, "int8") == {"disk": BS}  # the hit ends at the bad block
    assert fresh.stats().corrupt_blocks == 1
    assert serve(fresh, toks, "int8") == {"gpu": 3 * BS}
    fresh.close()


@pytest.mark.parametrize("kv_format", FORMATS + ("exact",))
def test_a_valid_header_in_another_field_order_still_loads(kv_format, tmp_path):
    """The load path recognizes our own headers by comparing bytes; a valid header that
    is not byte for byte ours (fields in another order: another writer's msgpack) is
    parsed instead and loads as before, neither a miss nor a corrupt block."""
    import msgpack  # the blob is rebuilt by hand, as another writer would write it

    toks = tokens(11, 3 * BS)
    chain = hash_blocks(ns(kv_format).root(), toks, BS)
    store = make_store(kv_format, gpu_blocks=8, **disk(tmp_path))
    serve(store, toks, kv_format)
    store.flush()
    blob = store.shared_tiers["disk"].get([chain.keys[1]])[0]
    store.close()
    assert blob is not None
    header_len = int.from_bytes(blob[4:8], "little")
    header = msgpack.unpackb(blob[8:8 + header_len], raw=False)
    reordered = msgpack.packb(dict(reversed(list(header.items()))), use_bin_type=True)
    assert reordered != blob[8:8 + header_len]
    other = blob[:4] + len(reordered).to_bytes(4, "little") + reordered + blob[8 + header_len:]
    expected = ExpectedBlocks(LAYOUT, kv_format)
    asked = (chain.keys[1], chain.keys[0], chain.blocks[1])
    assert expected.payload(blob, *asked) is not None and expected.payload(other, *asked) is None
    env = lmdb.open(str(tmp_path / "disk"), max_dbs=16)
    with env.begin(write=True, db=env.open_db(b"blocks")) as txn:
        txn.put(chain.keys[1], other)
    env.close()
    fresh = make_store(kv_format, gpu_blocks=8, **disk(tmp_path))
    assert serve(fresh, toks, kv_format) == {"disk": 3 * BS}  # serve checks the values
    assert fresh.stats().corrupt_blocks == 0
    fresh.close()


@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("kv_format", FORMATS)
def test_a_staging_lane_moves_a_batch_in_one_span(kv_format, dtype, mirror):
    """The load path's compressed staging (kvstore.mover._CompressedStaging): blocks
    staged in any order, then (with a mirror, as on CUDA) only the batch's span copied
    to the mirror, whose other bytes are garbage, and the host lane overwritten: the
    destination slots get the reference's bits, for a full lane and for a short good run
    (the scale rows past it are stale and unused), and no other slot is written."""
    from kvstore.mover import _CompressedStaging

    lay = KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, dtype=dtype)
    tdtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((6, *lay.block_shape), generator=g).to(tdtype)
    q = quant.quantize(x, kv_format)
    stale = quant.quantize(x.flip(0) * 3, kv_format)
    staging = _CompressedStaging(lay, kv_format, lanes=2, lane_blocks=6,
                                 device=torch.device("cpu"), mirror=mirror)
    assert (staging.device is not None) == mirror
    lane = staging.take()
    for i in range(6):  # an earlier batch's bytes in the lane
        staging.put(lane, i, quant.encode_payload(stale, i))
    for order in ((3, 0, 5, 1, 4, 2), (2, 0, 3, 1), (2, 0, 3, 1)):
        n = len(order)
        for i in order:
            staging.put(lane, i, quant.encode_payload(q, i))
        slots = [9, 10, 11, 2, 3, 7][:n]
        staging.put_slots(lane, slots)
        b = staging.batch(lane, n)  # the second batch of 4 reuses the first one's views
        if mirror:
            assert b.device is not None and staging.device is not None
            staging.device.fill_(0xA5)
            b.device.copy_(b.host)
            for i in range(6):
                staging.put(lane, i, quant.encode_payload(stale, i))
            staging.put_slots(lane, [0] * 6)
        assert b.slots.tolist() == slots
        pool = torch.zeros((12, *lay.block_shape), dtype=tdtype)
        quant.dequantize_into(b.blocks, pool, b.slots)
        ref = quant.dequantize_reference(
            quant.QuantizedBlocks(kv_format, q.codes[:n], q.scales[:n]), tdtype)
        bits = torch.int32 if dtype == "float32" else torch.int16
        assert torch.equal(pool[slots].view(bits), ref.view(bits))
        assert int(pool[[s for s in range(12) if s not in slots]].count_nonzero()) == 0
    assert staging.batch(lane, 4) is staging.batch(lane, 4)
    staging.give(lane)


def test_format_is_validated_and_must_match_the_namespace():
    with pytest.raises(ValueError, match="kv_format must be one of exact, int8, fp8"):
        StoreConfig(layout=LAYOUT, gpu_blocks=1, block_size=BS, kv_format="int4")
    store = make_store("int8", gpu_blocks=4)
    with pytest.raises(ValueError, match="kv_format exact differs from the store.s int8"):
        store.chain([1, 2, 3, 4], ns("exact"))
    cfg = StoreConfig(layout=LAYOUT, gpu_blocks=1, block_size=BS, kv_format="fp8",
                      disk_path="/nonexistent", disk_bytes=100 * LAYOUT.block_bytes)
    # the disk's block capacity counts compressed blocks
    assert cfg.shared_capacity("disk") == 100 * LAYOUT.block_bytes // \
        quant.compressed_block_bytes(LAYOUT, "fp8")
    store.close()


# ---------------------------------------------------------------- real SmolLM2


def test_smollm2_greedy_from_an_int8_disk(tmp_path, capsys):
    """int8 blocks from the disk feed the real model: the run works, the cached tokens
    come from the disk, the output is well formed. Agreement with exact KV is reported,
    not asserted (quantized KV may change a token)."""
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    system = ("You are a concise assistant for a bakery. You answer questions about bread, "
              "pastry, opening hours and prices. Keep answers short and friendly. ") * 3
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in ("What time do you open on Sunday?", "Do you sell rye bread?")]
    params = SamplingParams(max_tokens=24)
    common = dict(device="cpu", dtype="float32", gpu_blocks=256,
                  model_cache_dir=str(tmp_path / "models"), disk_bytes=1 << 30)
    exact = LLM("smollm2", enable_cache=False, **common)
    ref_outs = exact.chat(convs, params)
    assert isinstance(ref_outs, list)
    reference = [o.token_ids for o in ref_outs]
    exact.close()
    first = LLM("smollm2", disk_path=str(tmp_path / "disk"), kv_format="int8",
                policy="write-through", **common)
    first.chat(convs, params)
    first.close()
    second = LLM("smollm2", disk_path=str(tmp_path / "disk"), kv_format="int8", **common)
    outs = second.chat(convs, params)
    assert isinstance(outs, list)
    second.close()
    agree = 0
    # The shared system prompt comes from the int8 disk: once at least (a request
    # matched after another's load finished finds those blocks on the GPU), and every
    # request hits it somewhere.
    assert sum(out.cached_tokens.get("disk", 0) for out in outs) >= 16 * 4
    for out, ref in zip(outs, reference):
        assert sum(out.cached_tokens.values()) >= 16 * 4
        assert 0 < len(out.token_ids) <= params.max_tokens
        assert out.outputs[0].finish_reason in ("stop", "length")
        assert isinstance(out.text, str) and out.text.strip()
        agree += sum(a == b for a, b in zip(out.token_ids, ref))
    total = sum(len(r) for r in reference)
    with capsys.disabled():
        print(f"\nint8 disk vs exact greedy: {agree}/{total} tokens agree position by "
              f"position; identical outputs: "
              f"{sum(o.token_ids == r for o, r in zip(outs, reference))}/{len(outs)}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("kv_format", FORMATS)
def test_dequantize_into_equals_the_reference_bit_for_bit(dtype, kv_format):
    """The load path's CPU dequantization (two passes) gives the reference's bits, over
    magnitudes from subnormal scales to huge ones, zeros included, into scattered slots."""
    lay = KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, dtype="float32")
    g = torch.Generator().manual_seed(3)
    spread = torch.logspace(-30, 30, 64)[torch.randperm(64, generator=g)]
    x = (torch.randn((8, *lay.block_shape), generator=g) * spread).to(dtype)
    x[0, 0, 0, 0, 0] = 0
    x[1] *= 1e-38 if dtype != torch.float16 else 1e-7
    q = quant.quantize(x, kv_format)
    pool = torch.zeros((20, *lay.block_shape), dtype=dtype)
    slots = [17, 3, 4, 5, 0, 19, 8, 11]
    quant.dequantize_into(q, pool, slots)
    ref = quant.dequantize_reference(q, dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(pool[slots].view(bits), ref.view(bits))
    assert int(pool[[i for i in range(20) if i not in slots]].count_nonzero()) == 0

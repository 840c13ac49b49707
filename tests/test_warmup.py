"""The start-up warm-up (engine/warmup.py): it plans one step per kernel variant the
attention launch heuristic can pick, writes no KV, leaves the store, the engine's
counters and torch's RNG as they were, and changes no output. On CPU it is off by
default; the CUDA checks (no kernel compiled and no graph captured by the first request
after a warm-up) run on the GPU machine."""

from __future__ import annotations

import pytest
import torch

from engine import triton_attention, warmup
from engine.chat import build_parser as chat_parser
from engine.llm import LLM
from engine.options import engine_kwargs
from engine.sampling import SamplingParams
from engine.server.cli import build_parser as serve_parser

CPU = torch.device("cpu")
GREEDY = SamplingParams(max_tokens=12)
CHATS = [[{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Name three colors."}],
         [{"role": "user", "content": "Write one sentence about the sea."}]]


def _key_of(heads: int, kv_heads: int, head_dim: int, elem: int = 2):
    def key_of(num_tokens: int, num_seqs: int, width: int) -> warmup.Key:
        return warmup.triton_key(num_tokens, num_seqs, width, num_heads=heads,
                                 num_kv_heads=kv_heads, head_dim=head_dim, block_size=16,
                                 device=CPU, elem_bytes=elem)
    return key_of


@pytest.mark.parametrize("sms", [8, 132])
@pytest.mark.parametrize("shape", [(9, 3, 64), (32, 8, 128)], ids=["smollm2", "llama3-8b"])
def test_plan_covers_every_kernel_variant_a_step_can_launch(monkeypatch, sms, shape):
    monkeypatch.setattr(triton_attention, "_sm_count", lambda device: sms)
    key_of = _key_of(*shape)
    max_tokens, max_seqs, max_context = 96, 12, 16 * 70
    plan = warmup.plan_steps(key_of, block_size=16, max_tokens=max_tokens,
                             max_seqs=max_seqs, max_context=max_context)
    reachable = set()
    for t in range(1, max_tokens + 1):
        for b in range(1, min(t, max_seqs) + 1):
            longest = -(-t // b)
            least = -(-longest // 16)
            for width in range(least, max_context // 16 + 1):
                reachable.add(key_of(t, b, width))
    assert {s.key for s in plan} == reachable
    assert len(plan) == len(reachable)  # one step per variant
    for s in plan:
        assert key_of(s.num_tokens, len(s.seq_lens), s.width) == s.key
        assert all(1 <= q <= n <= s.width * 16 for q, n in zip(s.query_lens, s.seq_lens))
        assert -(-max(s.seq_lens) // 16) == s.width and s.num_tokens <= max_tokens
    assert any(n > q for s in plan for q, n in zip(s.query_lens, s.seq_lens))  # cached prefix
    kinds = {s.key[0] for s in plan}
    assert 16 in kinds and kinds & {64, 128}  # decode-like and prefill-like configs
    assert any("split" in s.key for s in plan)


def test_warmup_is_off_on_cpu_and_on_on_cuda_by_default():
    assert not warmup.enabled(CPU, None) and warmup.enabled(CPU, True)
    assert warmup.enabled(torch.device("cuda"), None)
    assert not warmup.enabled(torch.device("cuda"), False)
    for parser in (chat_parser(), serve_parser()):
        assert engine_kwargs(parser.parse_args([]))["warmup"] is None
        assert engine_kwargs(parser.parse_args(["--no-warmup"]))["warmup"] is False


def _greedy(llm: LLM) -> list[list[int]]:
    outs = llm.chat(CHATS, GREEDY)
    assert isinstance(outs, list)
    return [o.outputs[0].token_ids for o in outs]


def test_warmup_writes_no_kv_and_changes_no_output(tmp_path):
    common = {"device": "cpu", "dtype": "float32", "gpu_blocks": 96}
    with LLM("smollm2", **common) as cold:
        assert cold.warmup_report is None  # off on CPU by default
        want = _greedy(cold)
    with LLM("smollm2", warmup=False, **common) as llm:
        engine, store = llm.engine, llm.store
        pool = store.gpu.tensor
        pool.normal_(generator=torch.Generator().manual_seed(1))
        before = pool.clone()
        rng = torch.get_rng_state()
        free = store.gpu.num_free
        stats = store.stats()
        report = llm.warm_up()
        # Also every step of the Triton plan (SmolLM2's shapes, this pool's contexts),
        # through the CPU reference: each stages, runs and writes nothing.
        shapes = warmup.plan_steps(_key_of(9, 3, 64, 4), block_size=16, max_tokens=256,
                                   max_seqs=16, max_context=96 * 16)
        assert warmup.run_steps(engine, shapes) == len(shapes) > 10
        assert torch.equal(pool, before)
        assert torch.equal(torch.get_rng_state(), rng)
        assert not report.failed and report.eager_steps >= 4 and report.graphs == []
        assert engine.steps == 0 and store.gpu.num_free == free
        assert store.stats() == stats
        store.check_integrity()
        assert _greedy(llm) == want
    with LLM("smollm2", warmup=True, **common) as warm:
        assert warm.warmup_report is not None and not warm.warmup_report.failed
        assert _greedy(warm) == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_first_request_after_warmup_compiles_and_captures_nothing():
    """On CUDA: after the warm-up, a first chat turn and a batch of mixed requests
    launch no Triton kernel variant and capture no graph that the warm-up did not, and
    greedy tokens equal those of an engine that did not warm up."""
    common = {"gpu_kv_bytes": 1 << 30, "host_bytes": 64 << 20, "max_num_seqs": 16}
    with LLM("smollm2", warmup=False, **common) as cold:
        want = _greedy(cold)
    with LLM("smollm2", **common) as llm:
        report = llm.warmup_report
        assert report is not None and not report.failed, report
        runner = llm.engine.runner
        assert report.graphs == runner.graph_sizes == runner.captured
        kernels = _triton_variants()
        assert _greedy(llm) == want
        prompts = [[(13 * i + j) % 1000 + 10 for j in range(20 + 37 * i)] for i in range(12)]
        llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
        assert _triton_variants() == kernels
        assert runner.captured == report.graphs


def _triton_variants() -> dict[str, int]:
    """Compiled variants per Triton kernel of the engine (attention, merge, write_kv)."""
    out = {}
    for name in ("_paged_attn_kernel", "_merge_splits_kernel", "_write_kv_kernel"):
        fn = getattr(triton_attention, name)
        caches = getattr(fn, "device_caches", None) or getattr(fn, "cache", {})
        out[name] = sum(len(c[0] if isinstance(c, tuple) else c) for c in caches.values())
    return out

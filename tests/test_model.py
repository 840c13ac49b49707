"""The engine's model over the paged KV pool against transformers on the same weights.

References: SmolLM2-135M-Instruct as transformers imports it from the GGUF file itself
(independent of our conversion), and random tiny Llama / Qwen2 / Mistral checkpoints
saved by transformers. Comparisons run in fp32.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.batch import build_batch
from engine.loader import LoadedModel, load_checkpoint, resolve_model, smollm2_gguf_path
from engine.model import CausalLM

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]
NEW_TOKENS = 32


class PagedRunner:
    """Test-only decode loop: hand-made block tables over a real KV pool.

    Blocks come from a shuffled free list, so every sequence's table is non-contiguous.
    """

    def __init__(self, model: CausalLM, num_slots: int = 64, block_size: int = 16,
                 seed: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        shape = model.config.kv_layout(block_size, "float32").block_shape
        self.pool = torch.zeros((num_slots, *shape), dtype=model.dtype)
        self.free = list(range(num_slots))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Run ``chunks[seq]`` (new tokens of each sequence) as one batch; return each
        sequence's logits ``[vocab]`` at its last new token."""
        order = list(chunks)
        for seq in order:
            table = self.tables.setdefault(seq, [])
            new_len = self.lens.get(seq, 0) + len(chunks[seq])
            while len(table) * self.block_size < new_len:
                table.append(self.free.pop())
            self.lens[seq] = new_len
        batch, positions = build_batch([self.tables[s] for s in order],
                                       [len(chunks[s]) for s in order],
                                       [self.lens[s] for s in order], self.block_size)
        input_ids = torch.tensor([t for s in order for t in chunks[s]], dtype=torch.int64)
        logits = self.model(input_ids, positions, batch, self.pool)
        return dict(zip(order, logits, strict=True))

    def release(self, seq: int) -> None:
        self.free.extend(self.tables.pop(seq))
        del self.lens[seq]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """SmolLM2 imported once per session into a session-wide cache directory."""
    return resolve_model("smollm2", cache_dir=tmp_path_factory.getbasetemp() / "models")


@pytest.fixture(scope="module")
def ours(smollm2: LoadedModel) -> CausalLM:
    return CausalLM.from_loaded(smollm2, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' own import of the GGUF file (dequantize + its own un-permute)."""
    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def chat_ids(smollm2: LoadedModel, prompt: str) -> list[int]:
    assert smollm2.tokenizer is not None
    return smollm2.tokenizer.encode_chat([{"role": "user", "content": prompt}])


def hf_logits(hf, ids: list[int], last_only: bool = False) -> torch.Tensor:
    """transformers' fp32 logits ``[len(ids), vocab]`` (or ``[1, vocab]`` if ``last_only``)."""
    with torch.no_grad():
        return hf(torch.tensor([ids]), logits_to_keep=1 if last_only else 0).logits[0].float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), f"max abs diff {err}"


def test_gguf_weights_match_transformers_gguf_import(smollm2: LoadedModel, hf_gguf) -> None:
    """Dequantization, names and the Q/K un-permute agree with transformers' importer."""
    reference = hf_gguf.state_dict()
    names = set(smollm2.weights)
    assert names == set(reference) - {"lm_head.weight"}  # tied: lm_head is the embedding
    for name in sorted(names):
        assert torch.equal(smollm2.weights[name], reference[name]), name


def test_smollm2_prefill_logits_match_transformers(smollm2: LoadedModel, ours: CausalLM,
                                                   hf_gguf) -> None:
    ids = chat_ids(smollm2, PROMPTS[0])
    runner = PagedRunner(ours)
    batch, positions = build_batch([runner.free[:4]], [len(ids)], [len(ids)], 16)
    batch.logits_indices = torch.arange(len(ids))  # every position, not just the last
    logits = ours(torch.tensor(ids), positions, batch, runner.pool)
    assert logits.shape == (len(ids), smollm2.config.vocab_size)
    assert logits.dtype == torch.float32
    assert_close(logits, hf_logits(hf_gguf, ids))


def test_smollm2_mixed_batch_matches_transformers(smollm2: LoadedModel, ours: CausalLM,
                                                  hf_gguf) -> None:
    """One step holding a full prefill, a prefill over a cached prefix and decodes."""
    seqs = [chat_ids(smollm2, p) for p in PROMPTS]
    runner = PagedRunner(ours, seed=1)
    runner.step({0: seqs[0][:-1], 1: seqs[1][:20], 2: seqs[2][:-3]})
    last = runner.step({1: seqs[1][20:], 0: seqs[0][-1:], 2: seqs[2][-3:-2]})
    for seq, ids in ((0, seqs[0]), (1, seqs[1]), (2, seqs[2][:-2])):
        assert_close(last[seq], hf_logits(hf_gguf, ids, last_only=True)[-1])


def greedy_paged(runner: PagedRunner, prompts: list[list[int]], stop: frozenset[int],
                 max_new: int) -> list[list[int]]:
    """Greedy decoding of all prompts together: the first prompt's prefill is chunked so
    its second chunk runs alongside the others' first decode step."""
    out: list[list[int]] = [[] for _ in prompts]
    first = {i: p for i, p in enumerate(prompts)}
    first[0] = prompts[0][:16]
    pending = {i: lg for i, lg in runner.step(first).items() if i != 0}
    chunk0 = prompts[0][16:]
    active = set(range(len(prompts)))
    while active:
        step: dict[int, list[int]] = {}
        for i, logits in pending.items():
            token = int(logits.argmax())
            out[i].append(token)
            if token in stop or len(out[i]) == max_new:
                active.discard(i)
                runner.release(i)
            else:
                step[i] = [token]
        if chunk0:
            step[0], chunk0 = chunk0, []
        if not step:
            break
        pending = runner.step(step)
    return out


def test_smollm2_greedy_matches_transformers_generate(smollm2: LoadedModel, ours: CausalLM,
                                                      hf_gguf) -> None:
    prompts = [chat_ids(smollm2, p) for p in PROMPTS]
    runner = PagedRunner(ours, seed=2)
    generated = greedy_paged(runner, prompts, smollm2.stop_token_ids, NEW_TOKENS)
    assert sorted(runner.free) == list(range(64))  # every block came back
    for ids, got in zip(prompts, generated, strict=True):
        with torch.no_grad():
            ref = hf_gguf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                   max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=smollm2.config.eos_token_ids[0])
        expected = ref[0, len(ids):].tolist()
        assert got == expected
        assert len(got) > 5
    assert smollm2.tokenizer is not None
    assert "Paris" in smollm2.tokenizer.decode(generated[0])


def test_smollm2_bf16_agrees_with_fp32(smollm2: LoadedModel, ours: CausalLM) -> None:
    """The bf16 path (bf16 weights and KV, fp32 softmax) stays close to fp32."""
    model = CausalLM.from_loaded(smollm2, dtype=torch.bfloat16)
    ids = chat_ids(smollm2, PROMPTS[1])
    got = PagedRunner(model).step({0: ids})[0]
    ref = PagedRunner(ours).step({0: ids})[0]
    assert got.dtype == torch.float32
    assert int(got.argmax()) == int(ref.argmax())
    assert_close(got, ref, rel=0.1)


def test_forward_rejects_a_wrong_pool(ours: CausalLM) -> None:
    batch, positions = build_batch([[0]], [1], [1], 16)
    bad = torch.zeros(4, ours.config.num_layers, 2, 16, ours.config.num_kv_heads + 1,
                      ours.config.head_dim)
    with pytest.raises(ValueError, match="kv_pool shape"):
        ours(torch.tensor([1]), positions, batch, bad)


TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_configs() -> dict[str, object]:
    return {
        "llama3-rope-gqa": transformers.LlamaConfig(
            **TINY, rope_theta=500000.0, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "llama-bias-tied-mha": transformers.LlamaConfig(
            **{**TINY, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=True),
        "llama-linear-rope": transformers.LlamaConfig(
            **TINY, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        "qwen2": transformers.Qwen2Config(**TINY),
        "qwen2-tied": transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
        "mistral": transformers.MistralConfig(**TINY, sliding_window=None),
    }


@pytest.mark.parametrize("kind", list(tiny_configs()))
def test_tiny_random_models_match_transformers(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_configs()[kind]
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms and biases (their init is ones / zeros)
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    hf.save_pretrained(tmp_path)
    loaded = load_checkpoint(tmp_path, cache_dir=tmp_path / "cache")
    model = CausalLM.from_loaded(loaded, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    lengths = [70, 45, 5]
    seqs = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    runner = PagedRunner(model, block_size=8, seed=3)
    runner.step({0: seqs[0][:-1], 1: seqs[1][:30], 2: seqs[2]})
    last = runner.step({0: seqs[0][-1:], 1: seqs[1][30:]})
    expected = {b: hf_logits(hf, seqs[b], last_only=True)[-1] for b in (0, 1)}
    for b in (0, 1):
        assert_close(last[b], expected[b])

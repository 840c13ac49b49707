"""The engine tokenizer against transformers: ids, chat template, streaming decode.

The SmolLM2 tokenizer is built by our GGUF import from ``tokenizer.ggml.*`` metadata and
checked against the tokenizer transformers builds from the same GGUF file.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.loader import LoadedModel, resolve_model, smollm2_gguf_path
from engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing spaces   ",
    "Tabs\tand\nnew\n\nlines\r\n",
    "In 2024, 12345 apples cost $3.50 (or 3,50 €).",
    "Ünïcödé: naïve café, Straße, ÅÄÖ, ł, ğ, ş",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️ 🧑🏽‍💻",
    "RTL: مرحبا بالعالم — שלום עולם",
    "Combining: e\u0301 a\u0308 n\u0303, zero\u200bwidth",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2.5, null], "nested": {"a": "b"}}',
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "Mathematics: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ = ∫ f(x) dx",
    "",
    " ",
    "a" * 300,
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Tell me a joke about 😀 and ünïcödé."}],
    [{"role": "user", "content": "code:\n```py\nprint(1)\n```"},
     {"role": "assistant", "content": "It prints 1.", "tool_calls": None}],
]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """SmolLM2 imported once per session into a session-wide cache directory."""
    return resolve_model("smollm2", cache_dir=tmp_path_factory.getbasetemp() / "models")


@pytest.fixture(scope="module")
def ours(smollm2: LoadedModel) -> Tokenizer:
    assert smollm2.tokenizer is not None
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def hf_gguf_tokenizer():
    """transformers' own tokenizer conversion of the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_gguf_tokenizer(ours: Tokenizer, hf_gguf_tokenizer,
                                                    text: str) -> None:
    expected = hf_gguf_tokenizer.encode(text, add_special_tokens=True)
    assert ours.encode(text) == expected
    assert ours.decode(expected) == hf_gguf_tokenizer.decode(expected)
    assert ours.decode(expected, skip_special_tokens=True) == hf_gguf_tokenizer.decode(
        expected, skip_special_tokens=True)


def test_digits_are_split_individually(ours: Tokenizer) -> None:
    """llama.cpp's 'smollm' pre-tokenizer isolates every digit before BPE."""
    ids = ours.encode("x 2024")
    pieces = [ours.decode([i]) for i in ids]
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_special_tokens(ours: Tokenizer, hf_gguf_tokenizer) -> None:
    assert ours.bos_token == hf_gguf_tokenizer.bos_token == "<|im_start|>"
    assert ours.eos_token == hf_gguf_tokenizer.eos_token == "<|im_end|>"
    assert ours.bos_token_id == 1 and ours.eos_token_id == 2
    assert ours.vocab_size == len(hf_gguf_tokenizer)
    assert ours.special_ids == frozenset(hf_gguf_tokenizer.all_special_ids) | set(range(17))
    assert ours.encode("<|im_end|>") == [2]


def test_converted_dir_loads_in_transformers(smollm2: LoadedModel, hf_gguf_tokenizer) -> None:
    """The tokenizer files we write are a valid Hugging Face tokenizer."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2.path))
    for text in TEXTS:
        assert hf.encode(text) == hf_gguf_tokenizer.encode(text)
    assert hf.apply_chat_template(CHATS[1], tokenize=False) == \
        hf_gguf_tokenizer.apply_chat_template(CHATS[1], tokenize=False)


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours: Tokenizer, hf_gguf_tokenizer,
                                            messages: list[dict],
                                            add_generation_prompt: bool) -> None:
    expected = hf_gguf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == expected
    expected_ids = hf_gguf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids


def test_chat_template_default_system_prompt(ours: Tokenizer) -> None:
    text = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def _custom(ours: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(ours.backend, chat_template=template, special_tokens=ours.special_tokens)


def test_chat_template_environment(ours: Tokenizer) -> None:
    """HF template conventions: raise_exception, bos/eos variables, tojson, trim_blocks."""
    strict = _custom(ours, "{% if messages[0]['role'] != 'user' %}"
                           "{{ raise_exception('first message must be from the user') }}"
                           "{% endif %}{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}")
    assert strict.apply_chat_template([{"role": "user", "content": "x"}]) == \
        "<|im_start|>x<|im_end|>"
    with pytest.raises(jinja2.TemplateError, match="first message must be from the user"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])
    blocks = _custom(ours, "{% for m in messages %}\n  {{ m | tojson }}\n{% endfor %}")
    assert blocks.apply_chat_template([{"role": "user", "content": "é"}]) == \
        '  {"role": "user", "content": "é"}\n'


def test_chat_template_is_sandboxed(ours: Tokenizer) -> None:
    evil = _custom(ours, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template_is_a_clear_error(ours: Tokenizer) -> None:
    bare = Tokenizer(ours.backend, special_tokens=ours.special_tokens)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    dec = tok.stream(skip_special_tokens=skip)
    chunks = [dec.push(i) for i in ids]
    chunks.append(dec.flush())
    assert dec.text == "".join(chunks)
    return chunks


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_decode_reconstructs_text(ours: Tokenizer, text: str) -> None:
    ids = ours.encode(text)
    chunks = _stream(ours, ids)
    assert "".join(chunks) == ours.decode(ids) == text
    # A character cut across tokens is held back, never released as U+FFFD.
    assert not any("\ufffd" in c for c in chunks)


def test_streaming_holds_back_partial_characters(ours: Tokenizer) -> None:
    ids = ours.encode("😀")
    assert len(ids) > 1  # the emoji's four bytes span several tokens
    dec = ours.stream()
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "😀"
    assert dec.flush() == ""


def test_streaming_flushes_an_incomplete_character(ours: Tokenizer) -> None:
    ids = ours.encode("ab😀")[:-1]
    dec = ours.stream()
    out = "".join(dec.push(i) for i in ids)
    assert out == "ab"
    assert out + dec.flush() == ours.decode(ids)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=40), skip=st.booleans())
def test_streaming_decode_equals_decode_for_any_ids(ours: Tokenizer, ids: list[int],
                                                    skip: bool) -> None:
    """Arbitrary ids include lone UTF-8 continuation bytes and special tokens."""
    assert "".join(_stream(ours, ids, skip)) == ours.decode(ids, skip_special_tokens=skip)


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> Tokenizer:
    """A small SentencePiece-style (Metaspace) BPE trained here, whose decoder drops the
    leading space of the first token: the case incremental decoding gets wrong when it
    decodes tokens one by one."""
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    corpus = [t for t in TEXTS if t.strip()] * 3
    backend.train_from_iterator(corpus, trainer=trainer)
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


@pytest.mark.parametrize("text", ["Hello world, again and again.", "def f(x):\n    return x"])
def test_streaming_with_metaspace_tokenizer(metaspace_tokenizer: Tokenizer, text: str) -> None:
    ids = metaspace_tokenizer.encode(text)
    assert "".join(_stream(metaspace_tokenizer, ids)) == metaspace_tokenizer.decode(ids)


def test_from_dir_reads_chat_template_file(tmp_path: Path, ours: Tokenizer) -> None:
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": "config", "eos_token": {"content": "<|im_end|>"}}', encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("file {{ eos_token }}", encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_id == 2
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "file <|im_end|>"

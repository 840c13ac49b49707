"""Model hyper-parameters of a Llama-family decoder, read from a Hugging Face config.

:class:`ModelConfig` is the one description of a model the engine computes with. It is
built from a ``config.json`` dict with :meth:`ModelConfig.from_hf_dict` and validated on
construction: every error names the key to change and the accepted values.

Supported architectures: Llama 2/3 (``llama``, incl. llama3 RoPE scaling), Mistral
(``mistral``) and Qwen2 (``qwen2``, bias on the Q/K/V projections). SmolLM2 is a Llama.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

from tiers.layout import KVLayout

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""``model_type`` values of ``config.json`` this engine runs."""

_ARCHITECTURE_OF = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_MODEL_TYPE_OF = {arch: mt for mt, arch in _ARCHITECTURE_OF.items()}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
"""RoPE variants implemented by :mod:`engine.model`."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_scaling`` / ``rope_parameters`` of config.json).

    ``linear`` divides every inverse frequency by ``factor``. ``llama3`` (Llama 3.1+)
    divides low frequencies by ``factor``, keeps high ones, and interpolates between
    the wavelengths ``original_max_position_embeddings / low_freq_factor`` and
    ``original_max_position_embeddings / high_freq_factor`` (in tokens).
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(
                f"rope_scaling.rope_type must be one of 'linear', 'llama3' "
                f"(omit rope_scaling for plain RoPE), got {self.rope_type!r}")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor!r}")
        if self.rope_type == "llama3":
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError(
                    "rope_scaling needs high_freq_factor > low_freq_factor > 0 for llama3, got "
                    f"low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}")
            if self.original_max_position_embeddings <= 0:
                raise ValueError(
                    "rope_scaling.original_max_position_embeddings must be a positive number "
                    f"of tokens, got {self.original_max_position_embeddings!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family causal LM. Validated on construction.

    Sizes are element counts; ``head_dim`` is the per-head width of Q, K and V;
    ``rope_theta`` is the RoPE base; ``max_position_embeddings`` and ``sliding_window``
    are in tokens. ``attention_bias`` means the Q/K/V projections carry a bias (Qwen2,
    or Llama with ``attention_bias: true``); ``attention_out_bias`` the output
    projection does (Llama only). ``eos_token_ids`` lists every id that ends generation.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; use a checkpoint whose "
                f"config.json has model_type in {list(SUPPORTED_MODEL_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(
                f"sliding_window must be a positive number of tokens or null, got {self.sliding_window!r}")
        for tid in ((self.bos_token_id,) if self.bos_token_id is not None else ()) + self.eos_token_ids:
            if not isinstance(tid, int) or not 0 <= tid < self.vocab_size:
                raise ValueError(
                    f"special token id {tid!r} is outside the vocabulary [0, {self.vocab_size}); "
                    "fix bos_token_id / eos_token_id in config.json")

    @property
    def num_queries_per_kv(self) -> int:
        """Query heads sharing one KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def max_context_len(self) -> int:
        """Longest context (tokens) computed exactly: paged attention attends to the whole
        context, so a model with a sliding window is exact only up to that window."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    def kv_layout(self, block_size: int = 16, dtype: str = "bfloat16") -> KVLayout:
        """The KV block layout of this model (``block_size`` in tokens, ``dtype`` a name)."""
        return KVLayout(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, block_size=block_size, dtype=dtype)

    def identity(self) -> str:
        """Canonical JSON of every field that changes what the model computes.

        Token ids (bos/eos), the context limit and the stored dtype are left out: they do
        not change the KV bytes of a given token sequence under given weights.
        """
        data = asdict(self)
        for name in ("bos_token_id", "eos_token_ids", "max_position_embeddings", "torch_dtype",
                     "architecture"):
            data.pop(name)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x style).

        Missing optional keys take the defaults transformers uses for the model type.
        Raises ``ValueError`` naming the key to fix for anything unsupported.
        """
        model_type = hf.get("model_type")
        archs = hf.get("architectures")
        archs = [] if archs is None else archs
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError("config.json architectures must be a list of class names such "
                             f"as [\"LlamaForCausalLM\"], got {archs!r}")
        if model_type is not None and not isinstance(model_type, str):
            raise ValueError("config.json model_type must be a string such as 'llama', got "
                             f"{model_type!r}")
        if model_type is None and archs:
            model_type = _MODEL_TYPE_OF.get(archs[0])
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type {model_type!r} (architectures {archs}) is not supported; "
                f"supported model types: {list(SUPPORTED_MODEL_TYPES)}")
        architecture = archs[0] if archs else _ARCHITECTURE_OF[model_type]
        if architecture != _ARCHITECTURE_OF[model_type]:
            raise ValueError(
                f"config.json architectures[0] is {architecture!r}; only the causal-LM head "
                f"{_ARCHITECTURE_OF[model_type]!r} is supported for model_type {model_type!r}")

        def need(key: str) -> Any:
            if hf.get(key) is None:
                raise ValueError(f"config.json lacks required key {key!r}")
            return hf[key]

        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"config.json hidden_act must be 'silu' (SwiGLU MLP), got {hidden_act!r}")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ValueError("config.json pretraining_tp must be 1 (tensor-parallel "
                             "pretraining slices are not supported)")
        if hf.get("quantization_config"):
            raise ValueError("quantized checkpoints (quantization_config in config.json) are not "
                             "supported; use an unquantized bf16/fp16/fp32 checkpoint")

        num_heads = _hf_int(need("num_attention_heads"), "num_attention_heads")
        hidden_size = _hf_int(need("hidden_size"), "hidden_size")
        num_kv_heads = hf.get("num_key_value_heads")
        num_kv_heads = (num_heads if num_kv_heads is None
                        else _hf_int(num_kv_heads, "num_key_value_heads"))
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"config.json hidden_size ({hidden_size}) is not a multiple of "
                    f"num_attention_heads ({num_heads}); set head_dim in config.json")
            head_dim = hidden_size // num_heads
        else:
            head_dim = _hf_int(head_dim, "head_dim")

        rope_theta, rope_scaling = _parse_rope(hf)

        if model_type == "qwen2":
            attention_bias, attention_out_bias = True, False
        else:
            attention_bias = attention_out_bias = _hf_bool(hf, "attention_bias", False)

        sliding_window = None
        if model_type == "mistral":
            sliding_window = hf.get("sliding_window", 4096)
        elif model_type == "qwen2" and _hf_bool(hf, "use_sliding_window", False):
            sliding_window = hf.get("sliding_window")

        eos = hf.get("eos_token_id")
        eos_ids = tuple(_hf_int(e, "eos_token_id", minimum=0) for e in eos) if isinstance(
            eos, list) else (() if eos is None else (_hf_int(eos, "eos_token_id", minimum=0),))
        bos = hf.get("bos_token_id")
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        max_pos = hf.get("max_position_embeddings")
        default_max_pos = {"llama": 2048, "mistral": 32768, "qwen2": 32768}[model_type]
        rms_norm_eps = hf.get("rms_norm_eps")
        torch_dtype = hf.get("torch_dtype") or hf.get("dtype")
        if torch_dtype is not None and not isinstance(torch_dtype, str):
            raise ValueError("config.json torch_dtype must be a dtype name such as "
                             f"'bfloat16' (or null), got {torch_dtype!r}")
        return cls(
            vocab_size=_hf_int(need("vocab_size"), "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_hf_int(need("intermediate_size"), "intermediate_size"),
            num_layers=_hf_int(need("num_hidden_layers"), "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=1e-6 if rms_norm_eps is None else _hf_float(rms_norm_eps,
                                                                     "rms_norm_eps"),
            tie_word_embeddings=_hf_bool(hf, "tie_word_embeddings", False),
            attention_bias=attention_bias,
            attention_out_bias=attention_out_bias,
            mlp_bias=_hf_bool(hf, "mlp_bias", False),
            max_position_embeddings=(default_max_pos if max_pos is None
                                     else _hf_int(max_pos, "max_position_embeddings")),
            sliding_window=(None if sliding_window is None
                            else _hf_int(sliding_window, "sliding_window")),
            bos_token_id=None if bos is None else _hf_int(bos, "bos_token_id", minimum=0),
            eos_token_ids=eos_ids,
            architecture=architecture,
            model_type=model_type,
            torch_dtype=torch_dtype,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers and :meth:`from_hf_dict` both read back."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else asdict(self.rope_scaling),
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                             else self.eos_token_ids[0]),
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        return out


def _parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, rope_scaling)`` from legacy (``rope_theta`` + ``rope_scaling``) or
    transformers-5 (``rope_parameters``) keys."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"config.json {key} must be an object such as "
                             f'{{"rope_type": "linear", "factor": 2.0}} or null, got {value!r}')
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json rope_parameters per layer type is not supported; "
                         "use one rope_parameters dict for every layer")
    theta = hf.get("rope_theta")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    if theta is None and isinstance(scaling, dict):
        theta = scaling.get("rope_theta")
    theta = 10000.0 if theta is None else _hf_float(theta, "rope_theta")
    spec = scaling if isinstance(scaling, dict) and scaling else params
    if not isinstance(spec, dict) or not spec:
        return theta, None
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json RoPE type {rope_type!r} is not supported; supported: "
            f"{list(SUPPORTED_ROPE_TYPES)} (set rope_scaling to null for plain RoPE)")
    if spec.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json partial_rotary_factor must be 1.0 (RoPE on the whole head)")
    if rope_type == "default":
        return theta, None
    if "factor" not in spec:
        raise ValueError(f"config.json RoPE type {rope_type!r} needs a 'factor'")
    key = "rope_scaling" if spec is scaling else "rope_parameters"
    factor = _hf_float(spec["factor"], f"{key}.factor")
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if name not in spec:
            raise ValueError(f"config.json llama3 RoPE scaling needs {name!r}")
    return theta, RopeScaling(
        "llama3", factor, _hf_float(spec["low_freq_factor"], f"{key}.low_freq_factor"),
        _hf_float(spec["high_freq_factor"], f"{key}.high_freq_factor"),
        _hf_int(spec["original_max_position_embeddings"],
                f"{key}.original_max_position_embeddings"))


HF_INT_MAX = 2**31 - 1
"""Largest integer :meth:`ModelConfig.from_hf_dict` accepts for a size, a count or a token
id (int32, the range the engine's indices and token ids use)."""


def _hf_int(value: Any, key: str, minimum: int = 1) -> int:
    """``value`` of config.json ``key`` as an int: a JSON integer (a float only when it has
    no fraction), not a bool, in ``[minimum, HF_INT_MAX]``. ``ValueError`` naming the key
    otherwise."""
    kind = ("a positive integer" if minimum == 1 else
            "a token id (an integer >= 0; eos_token_id may be a list of them)"
            if key in ("eos_token_id", "bos_token_id") else f"an integer >= {minimum}")
    what = f"config.json {key} must be {kind} (at most {HF_INT_MAX:,})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what}, got {value!r}")
    if not isinstance(value, numbers.Integral) and not (
            math.isfinite(value) and float(value).is_integer()):
        raise ValueError(f"{what}, got {value!r}")
    number = operator.index(value) if isinstance(value, numbers.Integral) else int(float(value))
    if not minimum <= number <= HF_INT_MAX:
        raise ValueError(f"{what}, got {value!r}")
    return number


def _hf_float(value: Any, key: str) -> float:
    """``value`` of config.json ``key`` as a finite float (a JSON number, not a bool).
    ``ValueError`` naming the key otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value):
        raise ValueError(f"config.json {key} must be a finite number, got {value!r}")
    return float(value)


def _hf_bool(hf: dict[str, Any], key: str, default: bool) -> bool:
    """``hf[key]`` as a bool (``default`` when absent or null); ``ValueError`` naming the key
    for anything but true or false (the string "false" is not false)."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config.json {key} must be true or false, got {value!r}")
    return value


# ------------------------------------------------------------------ named shapes

_LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "max_position_embeddings": 8192, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16"}

NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16"},
    "llama3-8b": _LLAMA3_8B,
    # Two narrow layers over SmolLM2's vocabulary (its tokenizer fits): a model that
    # answers in about a millisecond on a CPU, for measuring plumbing (the router's or
    # the server's overhead) at rates a real model could not sustain there.
    "tiny": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32"},
    "llama3.1-8b": {
        **_LLAMA3_8B, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "eos_token_id": [128001, 128008, 128009]},
    "llama2-7b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float16"},
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32768,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None,
        "max_position_embeddings": 32768, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16"},
    "qwen2-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "use_sliding_window": False, "tie_word_embeddings": False,
        "max_position_embeddings": 32768, "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16"},
    "qwen2-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "use_sliding_window": False, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16"},
    "llama2-13b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 4096,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"},
    "llama3-70b": {**_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_hidden_layers": 80, "num_attention_heads": 64},
}
"""Named model shapes (dummy weights, ``kvstore plan``): the ``config.json`` of the public
checkpoints (Meta-Llama-3-8B and -70B, Llama-3.1-8B, Llama-2-7b and -13b,
Mistral-7B-v0.3, Qwen2-7B, Qwen2-0.5B, SmolLM2-135M)."""

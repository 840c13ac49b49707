"""OpenAI's request shapes: validating the bodies of ``/v1/chat/completions`` and
``/v1/completions``, and OpenAI's error object.

Every refusal is an :class:`APIError` (400 naming the field, 404 for an unknown model);
unknown fields are refused as OpenAI does, and so are features this server does not
implement (log probabilities, penalties, tools, structured output).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from aiohttp import web

from engine.sampling import SamplingParams
from kvstore.service import HTTPError

MAX_BODY_BYTES = 16 << 20
"""Largest request body (bytes); larger bodies get 413."""
MAX_STOP = 16
"""Most stop strings in one request."""
MAX_CHOICES = 128
"""Most sequences one request may generate (prompts x ``n``)."""
MIN_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (dividing logits by less overflows to NaN)."""
SEED_RANGE = (-(1 << 63), (1 << 63) - 1 - 64)
"""Seeds torch accepts, leaving room for ``seed + i`` of ``n`` sequences."""

_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user",
               "assistant": "assistant"}
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
"""Accepted and ignored: they do not change what is generated."""
_COMMON = frozenset({"model", "stream", "stream_options", "temperature", "top_p", "top_k",
                     "seed", "n", "stop", "max_tokens", "presence_penalty",
                     "frequency_penalty", "logit_bias", "logprobs", "ignore_eos",
                     "stop_token_ids", "return_token_ids"}) | _IGNORED
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                          "tool_choice", "functions", "function_call", "response_format",
                          "modalities", "audio", "prediction", "reasoning_effort",
                          "web_search_options"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}


class APIError(HTTPError):
    """A refusal, answered as an OpenAI error object with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``type`` is ``invalid_request_error`` for 4xx statuses and
    ``server_error`` for 5xx."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def render_error(exc: HTTPError) -> web.Response:
    """An :class:`HTTPError` (an :class:`APIError` or a shared refusal) as OpenAI's
    error object."""
    return web.json_response(error_body(exc.status, exc.message, getattr(exc, "param", None),
                                        getattr(exc, "code", None)),
                             status=exc.status, headers=exc.headers)


def bad(message: str, param: str | None = None) -> APIError:
    """A 400 naming ``param``."""
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float,
            *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {json_kind(value)}", name)
    low_ok = value > lo if lo_open else value >= lo
    if not (low_ok and value <= hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(f"'{name}' must be in {interval}, got {value!r}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int | None = None,
             hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {json_kind(value)}", name)
    if lo is not None and value < lo:
        raise bad(f"'{name}' must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise bad(f"'{name}' must be <= {hi}, got {value}", name)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be a boolean, got {json_kind(value)}", name)
    return value


def _unsupported(name: str, what: str = "") -> APIError:
    return APIError(400, f"'{name}' is not supported by this server{what}", param=name,
                    code="unsupported_parameter")


@dataclass(frozen=True)
class Options:
    """The parts of a request body shared by both generation endpoints."""

    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    n: int
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    return_token_ids: bool = False  # non-standard: add each choice's generated token ids


def parse_options(body: Mapping[str, Any], kind: str, model_names: Sequence[str]) -> Options:
    """Validate the common fields of a ``chat`` or ``completion`` body (``APIError``
    400 naming the field; 404 for an unknown model). Unknown fields are refused, as
    OpenAI does, and so are features this server does not implement (log probabilities,
    penalties, tools, structured output)."""
    allowed = _CHAT_FIELDS if kind == "chat" else _COMPLETION_FIELDS
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}",
                       param=unknown[0], code="unknown_parameter")
    model = body.get("model", model_names[0])
    if not isinstance(model, str):
        raise bad(f"'model' must be a string, got {json_kind(model)}", "model")
    if model not in model_names:
        raise APIError(404, f"The model '{model}' does not exist; this server serves "
                            f"{', '.join(model_names)}", param="model",
                       code="model_not_found")
    _refuse_unsupported(body, kind)
    stream = _flag(body, "stream")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(stream_options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        extra = sorted(set(stream_options) - {"include_usage"})
        if extra:
            raise bad(f"unknown 'stream_options' field(s): {', '.join(extra)}", "stream_options")
        include_usage = _flag(stream_options, "include_usage")
    max_tokens = _integer(body, "max_tokens", lo=1)
    if kind == "chat":
        max_completion = _integer(body, "max_completion_tokens", lo=1)
        if max_completion is not None:
            if max_tokens is not None and max_tokens != max_completion:
                raise bad("give 'max_completion_tokens' or 'max_tokens', not both",
                           "max_completion_tokens")
            max_tokens = max_completion
    elif max_tokens is None:
        max_tokens = 16  # the legacy completions API's default
    top_k = _integer(body, "top_k", lo=-1)
    n = _integer(body, "n", lo=1, hi=64)
    if kind == "completion":
        best_of = _integer(body, "best_of", lo=1)
        if best_of is not None and best_of != (n or 1):
            raise _unsupported("best_of", " (other than equal to 'n')")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    return Options(
        model=model, stream=stream, include_usage=include_usage, max_tokens=max_tokens,
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=0 if top_k in (None, -1) else int(top_k), seed=_integer(body, "seed", *SEED_RANGE),
        n=n or 1, stop=_stop_strings(body.get("stop")),
        stop_token_ids=_token_list(body.get("stop_token_ids"), "stop_token_ids",
                                   allow_empty=True),
        ignore_eos=_flag(body, "ignore_eos"), return_token_ids=_flag(body, "return_token_ids"))


def _refuse_unsupported(body: Mapping[str, Any], kind: str) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise _unsupported(name, " (only 0)")
    if body.get("logit_bias"):
        raise _unsupported("logit_bias")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise _unsupported("logprobs")
    if kind == "chat":
        if body.get("top_logprobs") is not None:
            raise _unsupported("top_logprobs")
        for name in ("tools", "functions", "audio", "prediction", "web_search_options"):
            if body.get(name):
                raise _unsupported(name)
        for name in ("tool_choice", "function_call"):
            if body.get(name) not in (None, "none"):
                raise _unsupported(name)
        if body.get("reasoning_effort") is not None:
            raise _unsupported("reasoning_effort")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise _unsupported("response_format", " (only {\"type\": \"text\"})")
        modalities = body.get("modalities")
        if modalities is not None and modalities != ["text"]:
            raise _unsupported("modalities", " (only [\"text\"])")
    else:
        if _flag(body, "echo"):
            raise _unsupported("echo")
        if body.get("suffix") is not None:
            raise _unsupported("suffix")


def _stop_strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if len(items) > MAX_STOP:
        raise bad(f"'stop' may hold at most {MAX_STOP} strings, got {len(items)}", "stop")
    if any(not s for s in items):
        raise bad("'stop' strings must not be empty", "stop")
    return tuple(_text(s, "stop") for s in items)


def _token_list(value: object, name: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    if value is None:
        return ()
    if (not isinstance(value, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        raise bad(f"'{name}' must be an array of integer token ids", name)
    if not value and not allow_empty:
        raise bad(f"'{name}' must not be empty", name)
    if any(t < 0 for t in value):
        raise bad(f"'{name}' must hold token ids >= 0, got {min(value)}", name)
    return tuple(value)


def parse_messages(value: object) -> list[dict[str, str]]:
    """Chat ``messages`` as ``[{"role", "content"}]`` strings for the chat template.

    ``developer`` is an alias of ``system``; content may be a string or an array of
    ``{"type": "text", "text": ...}`` parts (joined with newlines). Tool calls and
    non-text parts are refused (``APIError`` 400)."""
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty array of {\"role\", \"content\"} objects",
                   "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object, got {json_kind(message)}", where)
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise bad(f"{where}.role must be one of {', '.join(_CHAT_ROLES)}, got {role!r}",
                       f"{where}.role")
        extra = sorted(set(message) - {"role", "content", "name", "refusal"})
        if extra:
            raise APIError(400, f"{where}: {', '.join(extra)} not supported by this server",
                           param=f"{where}.{extra[0]}", code="unsupported_parameter")
        out.append({"role": _CHAT_ROLES[role],
                    "content": _content(message.get("content"), role, where)})
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: str, param: str) -> str:
    """``value`` unless it holds a lone UTF-16 surrogate (JSON's ``"\\ud800"``), which no
    tokenizer can encode: ``APIError`` 400 naming ``param``."""
    if not value.isascii() and _SURROGATE.search(value):
        raise bad(f"'{param}' contains an unpaired UTF-16 surrogate (\\ud800-\\udfff "
                  "without its pair): send valid Unicode text", param)
    return value


def _content(content: object, role: str, where: str) -> str:
    if isinstance(content, str):
        return _text(content, f"{where}.content")
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}] must be {{\"type\": \"text\", \"text\": "
                           "string}} (only text is supported)", f"{where}.content")
            texts.append(_text(part["text"], f"{where}.content[{j}].text"))
        return "\n".join(texts)
    raise bad(f"{where}.content must be a string or an array of text parts", f"{where}.content")


def parse_prompts(value: object) -> list[str | list[int]]:
    """A completion ``prompt``: a string, an array of token ids, or an array of either
    (a batch). ``APIError`` 400 otherwise."""
    message = ("'prompt' must be a string, an array of token ids, or an array of strings "
               "or of token-id arrays")

    def is_ids(v: object) -> TypeGuard[list[int]]:
        return isinstance(v, list) and bool(v) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        return [_text(value, "prompt")]
    if is_ids(value):
        return [list(value)]
    if isinstance(value, list) and value and all(isinstance(p, str) or is_ids(p) for p in value):
        return [_text(p, f"prompt[{i}]") if isinstance(p, str) else list(p)
                for i, p in enumerate(value)]
    raise bad(message, "prompt")


def sampling_params(opts: Options, prompt_lens: Sequence[int], max_context: int,
                    prompt_param: str = "messages") -> SamplingParams:
    """``SamplingParams`` for the request, with ``max_tokens`` defaulting to the rest of
    the context window; ``APIError`` 400 when a prompt leaves no room or the request asks
    for more than the window holds."""
    longest = max(prompt_lens)
    room = max_context - longest
    if room < 1:
        raise bad(f"This server's maximum context length is {max_context} tokens; your "
                   f"prompt has {longest} tokens, leaving no room for a completion",
                   prompt_param)
    if opts.max_tokens is None:
        max_tokens = room
    else:
        max_tokens = opts.max_tokens
        if max_tokens > room:
            raise bad(f"This server's maximum context length is {max_context} tokens. "
                       f"However, you requested {longest + max_tokens} tokens ({longest} in "
                       f"the prompt, {max_tokens} for the completion). Please reduce the "
                       "prompt or the completion length.", "max_tokens")
    if len(prompt_lens) * opts.n > MAX_CHOICES:
        raise bad(f"at most {MAX_CHOICES} sequences per request (prompts x n), got "
                   f"{len(prompt_lens) * opts.n}",
                  "n" if opts.n > 1 else prompt_param)
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=opts.temperature,
                              top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed, n=opts.n,
                              stop_token_ids=opts.stop_token_ids, stop=opts.stop,
                              ignore_eos=opts.ignore_eos)
    except ValueError as exc:
        raise bad(str(exc)) from None



"""A request's block keys, computed exactly as the replicas compute them.

The router fetches the replicas' tokenizer (``GET /v1/kv/tokenizer``) and namespace
(``GET /v1/kv/namespace``: chain root and block size) once, so it needs no model files
and cannot disagree with them: a replica whose root or tokenizer digest differs is kept
out of rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.tokenizer import Tokenizer
from radix import hash_blocks


@dataclass(frozen=True)
class KeySpace:
    """The replicas' namespace root (16 bytes), block size (tokens), tokenizer and its
    digest (``engine.server.routing.tokenizer_digest``)."""

    root: bytes
    block_size: int
    tokenizer: Tokenizer | None
    digest: str

    @classmethod
    def from_replica(cls, namespace: dict[str, Any], tokenizer: dict[str, Any]) -> KeySpace:
        """From the JSON of ``/v1/kv/namespace`` and ``/v1/kv/tokenizer``.
        ``ValueError`` when they are malformed."""
        import tokenizers

        try:
            root = bytes.fromhex(str(namespace["root"]))
            block_size = int(namespace["block_size"])
            tok = None
            if tokenizer.get("tokenizer"):
                tok = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer["tokenizer"]),
                                chat_template=tokenizer.get("chat_template"),
                                special_tokens=tokenizer.get("special_tokens") or {})
            return cls(root, block_size, tok, str(namespace["tokenizer_digest"]))
        except Exception as exc:  # tokenizers raises its own exception types
            raise ValueError(f"malformed namespace or tokenizer from a replica: {exc}") from None

    def token_ids(self, kind: str, body: Any) -> list[int] | None:
        """The prompt's token ids as the replica will compute them; ``None`` when the
        body is not a request the replica would run (it will answer the error)."""
        from engine.server.schema import parse_messages

        if not isinstance(body, dict):
            return None
        tok = self.tokenizer
        try:
            if kind == "chat":
                if tok is None or tok.chat_template is None:
                    return None
                return tok.encode_chat(parse_messages(body.get("messages")))
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                prompt = prompt[0]  # several prompts: route by the first
            if isinstance(prompt, str):
                return tok.encode(prompt) if tok is not None else None
            if isinstance(prompt, list) and all(type(t) is int for t in prompt):
                return prompt
        except Exception:  # a bad request: the replica answers it
            return None
        return None

    def keys(self, token_ids: list[int]) -> list[bytes]:
        """Block keys of the full blocks of ``token_ids``."""
        try:
            return hash_blocks(self.root, token_ids, self.block_size).keys
        except ValueError:
            return []

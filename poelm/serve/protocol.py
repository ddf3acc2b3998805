"""The OpenAI API shapes the server speaks: request bodies (validated), responses, errors, stop strings.

Design choices:
- Request bodies are pydantic models that forbid unknown fields: a field poelm does not implement
  (`presence_penalty`, `logit_bias`, ...) is a 400 naming it, never silently ignored. Defaults are
  OpenAI's (`max_tokens` 16 for completions, `temperature` 1, `top_p` 1, `n` 1). poelm's own options
  sit beside the standard ones: `exit_stage`, `speculative` and `draft_stage`.
- Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status OpenAI uses.
- A text prompt is the tokenizer's encoding after `<|bos|>` (how every poelm model saw documents);
  token-id prompts are used as given. Chat messages are rendered with the tokenizer's chat format.
- Stop strings (`poelm.infer.stops.TextStream`): the text is cut before the first occurrence of any
  stop string, which is not included, even across streamed chunks. Stop tokens (`<|assistant_end|>`,
  `<|bos|>`) end a row and are never text.
- `logprobs` are the model's own log-probabilities (its predictor, before temperature) of each token
  given the tokens before it: from one scoring forward over prompt + completion after decoding, or,
  streamed, from the scores of the step that chose the token (equal to float rounding; the engine's
  modes only). Streamed, a chunk carries the entries of the tokens whose text it releases.
  `text_offset` counts characters of the tokens decoded one by one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.tokenizer import Tokenizer


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Common(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # poelm's own
    exit_stage: int | None = Field(None, ge=0)
    speculative: int | None = Field(None, ge=1)
    draft_stage: int | None = Field(None, ge=0)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tok: Tokenizer, scores: list[dict], start: int, stop: int, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs` object for scored tokens [start, stop) (`score_prompt` entries)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in scores[start:stop]:
        text = tok.decode([entry["token"]])
        tokens.append(text)
        token_logprobs.append(entry["logprob"])
        top.append(None if entry["logprob"] is None else {tok.decode([i]): lp for i, lp in entry["top"]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tok: Tokenizer, scores: list[dict]) -> dict:
    """OpenAI's chat `logprobs` object: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    content = []
    for entry in scores:
        text = tok.decode([entry["token"]])
        content.append({"token": text, "logprob": entry["logprob"], "bytes": list(text.encode()),
                        "top_logprobs": [{"token": tok.decode([i]), "logprob": lp, "bytes": list(tok.decode([i]).encode())}
                                         for i, lp in entry["top"]]})
    return {"content": content}


def chunk(kind: str, rid: str, model: str, created: int, choices: list[dict], extra: dict | None = None) -> dict:
    """One streamed event's object (`text_completion` or `chat.completion.chunk`)."""
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **(extra or {})}


def field_name(loc: Any) -> str:
    """A pydantic error location as a dotted field name, without the body prefix."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"

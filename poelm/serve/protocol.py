"""The OpenAI API shapes the server speaks: request bodies (validated), responses, errors
(docs/serving.md, "The API's shapes", says what each choice is and why).

- Strict types and no unknown fields; what changes nothing is accepted (zero penalties, an empty
  `logit_bias`), what would change the result and is not implemented is a 400 naming the field — and
  the published schema says exactly that.
- Every size is bounded before work starts (options.LIMITS).
- What a client gets back of its prompt (`echo`, its `logprobs`) is exactly what it sent, never the
  `<|bos|>` poelm adds.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from ..core.tokenizer import Tokenizer
from .options import LIMITS


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request bodies -----------------------------------------------------------------------------------

def _zero(value: float) -> float:
    if value != 0:
        raise ValueError(f"{value} would change the result and poelm implements no penalties; send 0 or leave it out")
    return value


def _empty(value: dict | None) -> dict | None:
    if value:
        raise ValueError("a non-empty logit_bias would change the result and poelm does not implement it; "
                         "send {} or leave it out")
    return value


Penalty = Annotated[StrictFloat, Field(json_schema_extra={"minimum": 0, "maximum": 0},
                                       description="accepted as 0 only (no penalties are implemented)"),
                    AfterValidator(_zero)]
LogitBias = Annotated[dict[str, StrictFloat] | None, Field(json_schema_extra={"maxProperties": 0},
                                                           description="accepted empty only"), AfterValidator(_empty)]
StopText = Annotated[str, Field(max_length=LIMITS.stop_chars)]
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
Ids = Annotated[list[TokenId], Field(min_length=1, max_length=1 << 20)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Stage = Annotated[StrictInt, Field(ge=0, le=1024)]
Alternatives = Annotated[StrictInt, Field(ge=0, le=LIMITS.logprobs)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class Common(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(max_length=256)]
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] = 1.0
    seed: Seed | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=LIMITS.stops)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=LIMITS.n)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: LogitBias = None
    # poelm's own
    exit_stage: Stage | None = None
    speculative: Annotated[StrictInt, Field(ge=1, le=64)] | None = None
    draft_stage: Stage | None = None

    def stops(self) -> list[str]:
        """The stop strings; an empty one stops nothing."""
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


class CompletionRequest(Common):
    prompt: Annotated[str, Field(max_length=LIMITS.body_bytes)] | Annotated[
        list[str], Field(min_length=1, max_length=LIMITS.prompts)] | Ids | Annotated[
        list[Ids], Field(min_length=1, max_length=LIMITS.prompts)]
    max_tokens: Annotated[StrictInt, Field(ge=0, le=1 << 24)] = 16
    echo: StrictBool = False
    logprobs: Alternatives | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: Annotated[str, Field(max_length=256)] | None = None

    def rendered(self) -> dict[str, str]:
        """The message as the chat format takes it: `developer` is the system message, text parts joined."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Common):
    messages: Annotated[list[Message], Field(min_length=1, max_length=LIMITS.messages)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=1 << 24)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=1 << 24)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Alternatives | None = None


# ---- responses (declared in the OpenAPI schema; the routes build them through these models) ----------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str] | None = None


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entries of these error statuses (all in OpenAI's error shape)."""
    words = {400: "invalid request (the field is named)", 401: "missing or wrong API key",
             404: "no such model or path", 413: "body larger than the server accepts",
             429: "the server's queue is full", 500: "internal error", 503: "the models are loading or failed to"}
    return {s: {"model": ErrorResponse, "description": words[s]} for s in statuses}


STREAMED = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events: `data: {chunk}` "
                                             "lines, then `data: [DONE]`"}}}


# ---- helpers ----------------------------------------------------------------------------------------

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


_UNION_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def field_name(loc: Any) -> str:
    """A pydantic error location as a dotted field name, without the body prefix and the tags pydantic
    gives the members of a union (`prompt.constrained-str`, `stop.list[...]`, `function-after[...]`)."""
    def tag(p: Any) -> bool:
        return isinstance(p, str) and (p in _UNION_TAGS or "[" in p or p.startswith(("constrained-", "function-")))

    return ".".join(str(p) for p in loc if p != "body" and not tag(p)) or "body"

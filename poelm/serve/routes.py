"""The routes of the OpenAI API (`router`) and the handlers that turn every error into OpenAI's shape
(`ERROR_HANDLERS`). A route reads the server's state from `request.app.state.poelm`; tokenizing and
rendering run in a thread, never on the event loop; every check runs before anything is queued."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import PoelmError
from .guard import error_response
from .prompts import check_fits, prompts_of
from .protocol import (STREAMED, ApiError, ChatCompletion, ChatRequest, Completion, CompletionRequest, Health,
                       ModelList, chat_logprobs, completion_logprobs, errors, field_name, usage)
from .run import Run, sse
from .state import ServerState

router = APIRouter()
ANSWERS = {200: {"content": STREAMED}, **errors(400, 401, 404, 413, 429, 500, 503)}


def state_of(request: Request) -> ServerState:
    return request.app.state.poelm


@router.get("/health", response_model=Health, response_model_exclude_none=True, responses=errors(503))
async def health(request: Request):
    """Liveness: `{"status": "ok"}` once the models are loaded; their names too when the request
    carries the key (or none is set)."""
    state = state_of(request)
    if not state.ready.is_set():
        raise state.unavailable()
    if not state.authorized(request.scope["headers"]):
        return {"status": "ok"}
    return {"status": "ok", "models": list(state.served)}


@router.get("/v1/models", response_model=ModelList, responses=errors(401, 503))
async def models(request: Request):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "poelm",
                                        "root": str(s.directory)} for name, s in state_of(request).served.items()]}


@router.post("/v1/completions", response_model=Completion, responses=ANSWERS)
async def completions(body: CompletionRequest, request: Request):
    served = state_of(request).model(body.model)
    tok = served.tokenizer
    if body.max_tokens == 0 and (not body.echo or body.stream):
        raise ApiError(400, "max_tokens: 0 generates nothing; with echo=true and stream=false it scores the "
                       "prompt", param="max_tokens")
    prompts = await asyncio.to_thread(prompts_of, body.prompt, served)
    choices = [p for p in prompts for _ in range(body.n)]
    runs = await Run.start(state_of(request), served, body, [p.ids for p in choices], body.max_tokens,
                           body.logprobs if body.stream else None)
    if body.stream:
        return sse(runs.completion_events(body, tok, choices), runs)
    results = await runs.wait(request)
    out = []
    for index, (prompt, result) in enumerate(zip(choices, results)):
        logprobs = None
        if body.logprobs is not None:
            scores = await runs.score(prompt.ids + result.tokens, body.logprobs)
            first = prompt.start if body.echo else len(prompt.ids)
            logprobs = completion_logprobs(tok, scores, first, len(prompt.ids) + result.kept)
        out.append({"index": index, "text": (prompt.text if body.echo else "") + result.text,
                    "logprobs": logprobs, "finish_reason": result.reason})
    return {"id": runs.id, "object": "text_completion", "created": runs.created, "model": body.model,
            "choices": out, "usage": usage(sum(len(p.ids) for p in prompts), sum(r.count for r in results))}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ANSWERS)
async def chat(body: ChatRequest, request: Request):
    served = state_of(request).model(body.model)
    tok = served.tokenizer
    messages = [m.rendered() for m in body.messages]
    check_fits(sum(len(m["content"].encode()) for m in messages), served, "messages")
    try:
        prompt = await asyncio.to_thread(tok.render_prompt, messages)
    except PoelmError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    max_tokens = body.max_completion_tokens or body.max_tokens or served.model.config.sequence_len - len(prompt)
    runs = await Run.start(state_of(request), served, body, [prompt] * body.n, max(max_tokens, 1),
                           (body.top_logprobs or 0) if body.stream and body.logprobs else None)
    if body.stream:
        return sse(runs.chat_events(body, tok), runs)
    results = await runs.wait(request)
    out = []
    for index, result in enumerate(results):
        logprobs = None
        if body.logprobs:
            scores = await runs.score(prompt + result.tokens, body.top_logprobs or 0)
            logprobs = chat_logprobs(tok, scores[len(prompt):len(prompt) + result.kept])
        out.append({"index": index, "message": {"role": "assistant", "content": result.text},
                    "logprobs": logprobs, "finish_reason": result.reason})
    return {"id": runs.id, "object": "chat.completion", "created": runs.created, "model": body.model,
            "choices": out, "usage": usage(len(prompt), sum(r.count for r in results))}


# ---- errors in OpenAI's shape -----------------------------------------------------------------------
async def api_error(request: Request, e: ApiError):
    return error_response(e)


async def invalid_body(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {"loc": ("body",), "msg": "invalid body"}
    if first.get("type") == "json_invalid":
        name, message = "body", f"not valid JSON ({(first.get('ctx') or {}).get('error', first.get('msg'))})"
    else:
        name, message = field_name(first.get("loc", ())), str(first.get("msg")).removeprefix("Value error, ")
    return error_response(ApiError(400, f"{name}: {message}", param=name))


async def http_error(request: Request, e: StarletteHTTPException):  # unknown paths, methods, unparsable bodies
    if e.status_code == 400:  # FastAPI could not parse the body: too deep, an integer past 4300 digits, ...
        cause = f" ({type(e.__cause__).__name__}: {str(e.__cause__)[:200]})" if e.__cause__ else ""
        return error_response(ApiError(400, f"body: not valid JSON{cause}", param="body"))
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind))


ERROR_HANDLERS = {ApiError: api_error, RequestValidationError: invalid_body, StarletteHTTPException: http_error}

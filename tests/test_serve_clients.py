"""`poelm serve` against the clients and tools people point at it (issue 24 Done-when 2 and 3):

- schemathesis, a property-based fuzzer driven by the server's own `/openapi.json`: a bounded number of
  generated requests per operation (valid and invalid ones) find no 500, no undeclared status, and no
  response that contradicts the declared schema;
- langchain-openai's `OpenAI` (completions: it always sends zero penalties, `top_p`, `n`, `logit_bias`)
  and `ChatOpenAI`, with `invoke`, `stream` and `batch`, unchanged, each answer equal to the engine's.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from serving import greedy, running, text_of, tokenizer_of  # noqa: E402

PROMPTS = ["def add(a, b):", "x = "]
QUESTION = "write a loop"


@pytest.fixture(scope="module")
def live(serve_dirs):
    with running(serve_dirs, max_batch=8, max_queue=64) as (url, app):
        yield url, app


def integral(value):
    """JSON Schema's `integer` admits 1.0, and generators produce it; poelm refuses a float where it takes a
    token id, a count or a seed (issue 24 #8: `[1.0, 2.0]` are not token ids). A valid request carries
    such numbers as integers: integral floats are sent as ints (a `number` field takes either)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral(v) for v in value]
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_operation_keeps_its_published_schema(live, mode):
    """For every operation of `/openapi.json`, 30 generated requests (valid ones, or ones that break the
    schema): no 500, only declared statuses and content types, every response body valid against the
    schema, valid requests accepted (400 only where the schema cannot say it: a model's stage numbers or
    its context) and invalid ones refused with a 4xx."""
    from hypothesis import given

    url, _ = live
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "GET /health", "GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions"}
    for operation in operations:
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # nothing to break: no parameters, no body
        @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            if mode == "positive":
                case.body = integral(case.body)
            case.call_and_validate()

        check()


def test_langchain_openai_completions_invoke_stream_and_batch(live, serve_dirs):
    from langchain_openai import OpenAI

    url, _ = live
    base = serve_dirs[0]
    tok = tokenizer_of(base)
    want = [text_of(base, greedy(base, [tok.bos_id] + tok.encode(p), 8)) for p in PROMPTS]
    llm = OpenAI(base_url=f"{url}/v1", api_key="none", model=base.name, max_tokens=8, temperature=0, max_retries=0)
    assert llm.invoke(PROMPTS[0]) == want[0]
    assert "".join(llm.stream(PROMPTS[0])) == want[0]
    assert llm.batch(PROMPTS) == want


def test_langchain_chat_openai_invoke_stream_and_batch(live, serve_dirs):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    url, _ = live
    alpha = serve_dirs[1]
    tok = tokenizer_of(alpha)

    def alone(messages):
        return text_of(alpha, greedy(alpha, tok.render_prompt(messages), 8))

    chat = ChatOpenAI(base_url=f"{url}/v1", api_key="none", model="alpha", max_tokens=8, temperature=0,
                      max_retries=0)
    want = alone([{"role": "user", "content": QUESTION}])
    assert chat.invoke(QUESTION).content == want
    assert "".join(chunk.content for chunk in chat.stream(QUESTION)) == want
    conversation = [SystemMessage("be brief"), AIMessage("How can I help?"), HumanMessage(QUESTION)]
    answers = [m.content for m in chat.batch([QUESTION, conversation])]
    assert answers == [want, alone([{"role": "system", "content": "be brief"},
                                    {"role": "assistant", "content": "How can I help?"},
                                    {"role": "user", "content": QUESTION}])]

"""Chat rendering: exact ids and loss masks, system merge, an opening assistant greeting, role errors,
generation prompts."""

from __future__ import annotations

import pytest

from poelm.core.errors import PoelmError


def _ids(tok):
    return {n: tok.token_id(n) for n in ("bos", "user_start", "user_end", "assistant_start", "assistant_end")}


def test_conversation_ids_and_mask_exact(tiny_tokenizer):
    tok = tiny_tokenizer
    s = _ids(tok)
    assert (s["bos"], s["user_start"], s["user_end"], s["assistant_start"], s["assistant_end"]) == (503, 504, 505, 506, 507)
    hi, hello, more, ok = (tok.encode(t) for t in ("Hi there", "Hello! 3.14", "More?", "Sure."))
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! 3.14"},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Sure."},
    ]
    ids, mask = tok.render_conversation(messages)
    expected_ids = (
        [503]
        + [504, *hi, 505]
        + [506, *hello, 507]
        + [504, *more, 505]
        + [506, *ok, 507]
    )
    expected_mask = (
        [0]
        + [0] * (len(hi) + 2)
        + [0] + [1] * len(hello) + [1]
        + [0] * (len(more) + 2)
        + [0] + [1] * len(ok) + [1]
    )
    assert ids == expected_ids
    assert mask == expected_mask
    # the masked-in tokens are exactly the assistant text and its <|assistant_end|>
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello! 3.14<|assistant_end|>Sure.<|assistant_end|>"


def test_tiny_conversation_by_hand(tiny_tokenizer):
    tok = tiny_tokenizer
    a, b = tok.encode("a"), tok.encode("b")
    assert a == [ord("a")] and b == [ord("b")]  # single bytes keep their byte value as id
    ids, mask = tok.render_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert ids == [503, 504, 97, 505, 506, 98, 507]
    assert mask == [0, 0, 0, 0, 0, 1, 1]


def test_system_message_merges_into_first_user(tiny_tokenizer):
    tok = tiny_tokenizer
    with_system = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    merged = [{"role": "user", "content": "You are terse.\n\nHi"}, {"role": "assistant", "content": "Yo"}]
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert tok.render_prompt(with_system[:2]) == tok.render_prompt(merged[:1])


def test_assistant_first_conversation_ids_and_mask_exact(tiny_tokenizer):
    """An app's greeting opens the conversation (OpenAI-style clients send it): it renders as any
    assistant turn and is trained on (mask 1 on its text and <|assistant_end|>)."""
    tok = tiny_tokenizer
    greet, hi, ok = (tok.encode(t) for t in ("Hello! How can I help?", "Hi there", "Sure."))
    messages = [
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Sure."},
    ]
    ids, mask = tok.render_conversation(messages)
    assert ids == [503] + [506, *greet, 507] + [504, *hi, 505] + [506, *ok, 507]
    assert mask == [0] + [0] + [1] * len(greet) + [1] + [0] * (len(hi) + 2) + [0] + [1] * len(ok) + [1]
    trained = "Hello! How can I help?<|assistant_end|>Sure.<|assistant_end|>"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == trained
    assert tok.render_prompt(messages[:2]) == [503, 506, *greet, 507, 504, *hi, 505, 506]
    # a greeting alone is a conversation, but not a prompt
    assert tok.render_conversation(messages[:1]) == ([503, 506, *greet, 507], [0, 0] + [1] * len(greet) + [1])
    with pytest.raises(PoelmError, match="^message 0: a prompt must end with a 'user' message, got 'assistant'$"):
        tok.render_prompt(messages[:1])


def test_system_before_an_assistant_greeting_merges_into_the_first_user(tiny_tokenizer):
    tok = tiny_tokenizer
    greet, merged, ok = (tok.encode(t) for t in ("Hello!", "Be terse.\n\nHi", "Yo"))
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    ids, mask = tok.render_conversation(messages)
    assert ids == [503] + [506, *greet, 507] + [504, *merged, 505] + [506, *ok, 507]
    assert mask == [0] + [0] + [1] * len(greet) + [1] + [0] * (len(merged) + 2) + [0] + [1] * len(ok) + [1]
    assert tok.render_prompt(messages[:3]) == [503, 506, *greet, 507, 504, *merged, 505, 506]


def test_literal_special_strings_in_content_stay_text(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = tok.render_conversation(
        [{"role": "user", "content": "<|assistant_end|>"}, {"role": "assistant", "content": "<|bos|>"}]
    )
    specials = set(tok.special_ids.values())
    assert [i for i in ids if i in specials] == [503, 504, 505, 506, 507]
    assert len(ids) == len(mask)


def test_prompt_ends_with_assistant_start(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    prompt = tok.render_prompt(messages)
    assert prompt[-1] == tok.token_id("assistant_start") == 506
    assert prompt[:-1] == tok.render_conversation(messages)[0]
    assert prompt == [503, 504, *tok.encode("Q1"), 505, 506, *tok.encode("A1"), 507, 504, *tok.encode("Q2"), 505, 506]
    with pytest.raises(PoelmError, match="message 1: a prompt must end with a 'user' message, got 'assistant'"):
        tok.render_prompt(messages[:2])


def test_max_tokens_truncates_ids_and_mask(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "x " * 50}, {"role": "assistant", "content": "y " * 50}]
    full_ids, full_mask = tok.render_conversation(messages)
    ids, mask = tok.render_conversation(messages, max_tokens=20)
    assert ids == full_ids[:20] and mask == full_mask[:20]
    with pytest.raises(PoelmError, match="max_tokens must be >= 1"):
        tok.render_conversation(messages, max_tokens=0)


U, A, S = "user", "assistant", "system"


@pytest.mark.parametrize(
    "roles, expected",
    [
        ([U, A, A], "message 2: expected role 'user' after 'assistant', got 'assistant'"),
        ([U, U], "message 1: expected role 'assistant' after 'user', got 'user'"),
        ([A, A], "message 1: expected role 'user' after 'assistant', got 'assistant'"),
        ([S, A, A], "message 2: expected role 'user' after 'assistant', got 'assistant'"),
        ([A, U, U], "message 2: expected role 'assistant' after 'user', got 'user'"),
        ([S, A], "message 0: a 'system' message must be followed by a 'user' message"),
        ([A, S, U], "message 1: role 'system' is only allowed as the first message"),
        ([U, S], "message 1: role 'system' is only allowed as the first message"),
        ([U, A, S, U], "message 2: role 'system' is only allowed as the first message"),
        ([S], "message 0: a 'system' message must be followed by a 'user' message"),
        ([U, "tool"], "message 1: unknown role 'tool'; expected 'user' or 'assistant'"),
    ],
)
def test_role_order_errors_name_the_message(tiny_tokenizer, roles, expected):
    messages = [{"role": r, "content": f"m{i}"} for i, r in enumerate(roles)]
    with pytest.raises(PoelmError) as err:
        tiny_tokenizer.render_conversation(messages)
    assert str(err.value) == expected


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], "no messages"),
        ("hello", "expected a list of messages, got str"),
        ([{"role": "user", "content": "a"}, "b"], "message 1: expected a dict"),
        ([{"role": "user"}], r"message 0: expected keys 'role' and 'content', got \['role'\]"),
        ([{"role": "user", "content": ["a"]}], "message 0: 'content' must be a str, got list"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], "message 1: 'content' must be a str"),
    ],
)
def test_malformed_messages(tiny_tokenizer, messages, expected):
    with pytest.raises(PoelmError, match=expected):
        tiny_tokenizer.render_conversation(messages)

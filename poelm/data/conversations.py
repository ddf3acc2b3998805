"""Conversation records: the shapes users' SFT data comes in, each turned into checked messages
[{role, content}] (`to_messages`).

Design choices (the whole of them: docs/data.md, "Record shapes and the conversation check"):
- A record's shape is detected per record, first match wins: `messages`, ShareGPT `conversations`,
  Alpaca, Evol-Instruct, Magicoder OSS-Instruct; extra keys are ignored.
- A conversation is checked with the tokenizer's own rules (`chat_turns`, called, not copied) plus
  SFT's: it ends with an assistant reply, user and assistant contents are not blank, and contents are
  valid Unicode. A blank system message is dropped.
- A bad record raises `BadRecord` naming where it is and carrying a reason from `REASONS`, which
  `--skip-invalid` counts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..core.errors import PoelmError
from ..core.tokenizer import chat_turns
from .records import INVALID_JSON, NOT_UTF8, BadRecord

Messages = list[dict[str, str]]


class Conversation(NamedTuple):
    """One conversation: where it came from (`path:LINE`, `path[ROW]` or `hf:NAME@SPLIT[ROW]`) and its
    messages [{role, content}]."""

    where: str
    messages: Messages


# Reasons a record is bad, the keys of LoadReport.skipped[file]: records.py's NOT_UTF8 and INVALID_JSON
# (a JSONL line that does not parse), and these.
NOT_OBJECT, UNKNOWN_SHAPE, BAD_CONVERSATION = "not an object", "unknown shape", "bad conversation"
REASONS = (NOT_UTF8, INVALID_JSON, NOT_OBJECT, UNKNOWN_SHAPE, BAD_CONVERSATION)

_SHAPES = ('{"messages": [{"role", "content"}, ...]}, ShareGPT {"conversations": [{"from", "value"}, ...]}, '
           'Alpaca {"instruction", "input", "output"}, Evol-Instruct {"instruction", "response"} or '
           'Magicoder {"problem", "solution"}')
# single-turn shapes, in the order they are tried: (prompt key, reply key, name); Alpaca adds "input"
_PAIRS = (("instruction", "output", "Alpaca"), ("instruction", "response", "Evol-Instruct"),
          ("problem", "solution", "Magicoder"))
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _string(record: dict, key: str, where: str, what: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"{where}: {what} field {key!r} is {type(value).__name__}; expected a string",
                        BAD_CONVERSATION)
    return value


def _message_list(record: dict, key: str, role_key: str, text_key: str, where: str) -> Messages:
    items = record[key]
    if not isinstance(items, list):
        raise BadRecord(f"{where}: field {key!r} is {type(items).__name__}; expected a list of messages",
                        BAD_CONVERSATION)
    messages = []
    for i, m in enumerate(items):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            got = f"keys {sorted(m)}" if isinstance(m, dict) else type(m).__name__
            raise BadRecord(f"{at}: expected an object with {role_key!r} and {text_key!r}, got {got}",
                            BAD_CONVERSATION)
        role = m[role_key]
        if key == "conversations":
            if not isinstance(role, str) or role not in _SHAREGPT_ROLES:  # a list or object is unhashable
                raise BadRecord(f"{at}: unknown 'from' {role!r}; expected one of {sorted(_SHAREGPT_ROLES)}",
                                BAD_CONVERSATION)
            role = _SHAREGPT_ROLES[role]
        elif role not in ("system", "user", "assistant"):
            raise BadRecord(f"{at}: unknown role {role!r}; expected 'system', 'user' or 'assistant'",
                            BAD_CONVERSATION)
        content = m[text_key]
        if not isinstance(content, str):
            raise BadRecord(f"{at}: {text_key!r} is {type(content).__name__}; expected a string", BAD_CONVERSATION)
        messages.append({"role": role, "content": content})
    return messages


def check_messages(messages: Messages, where: str) -> Messages:
    """Check a conversation with the tokenizer's rules (`chat_turns`) plus SFT's (module docstring); return
    it with a blank system message dropped. Errors name `where` and the message index."""
    if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages = messages[1:]
    if not messages:
        raise BadRecord(f"{where}: no messages; expected a user message and an assistant reply", BAD_CONVERSATION)
    try:  # the role rules live in one place, the tokenizer's
        chat_turns(messages)
    except PoelmError as e:
        raise BadRecord(f"{where}: {e}", BAD_CONVERSATION) from None
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role != "system" and not content.strip():
            raise BadRecord(f"{where}: message {i}: {role!r} content is blank; expected text", BAD_CONVERSATION)
        try:  # JSON escapes can spell a lone surrogate ("\ud800"), which no tokenizer can encode
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRecord(f"{where}: message {i}: content has an unpaired surrogate at character {e.start}; "
                            f"expected valid Unicode", BAD_CONVERSATION) from None
    if messages[-1]["role"] != "assistant":
        raise BadRecord(f"{where}: message {len(messages) - 1}: the conversation ends with a "
                        f"{messages[-1]['role']!r} message; expected a final 'assistant' reply", BAD_CONVERSATION)
    return messages


def to_messages(record: Any, where: str) -> Messages:
    """One JSON record -> checked messages [{"role", "content"}] (new dicts, other keys dropped).

    The shape is detected per record (module docstring). Raises PoelmError naming `where` for an
    unknown shape, a non-object, a wrong field type or a bad conversation.
    """
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: a JSON {type(record).__name__}; expected an object: {_SHAPES}", NOT_OBJECT)
    if "messages" in record:
        messages = _message_list(record, "messages", "role", "content", where)
    elif "conversations" in record:
        messages = _message_list(record, "conversations", "from", "value", where)
    elif (pair := next((p for p in _PAIRS if p[0] in record and p[1] in record), None)) is not None:
        prompt, reply, shape = pair
        user = _string(record, prompt, where, shape)
        extra = _string(record, "input", where, shape) if shape == "Alpaca" and "input" in record else ""
        if extra:
            user += "\n\n" + extra
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _string(record, reply, where, shape)}]
    else:
        raise BadRecord(f"{where}: unknown record shape with keys {sorted(record)}; expected {_SHAPES}",
                        UNKNOWN_SHAPE)
    return check_messages(messages, where)

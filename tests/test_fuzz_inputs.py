"""Property-based fuzz tests (hypothesis) of everything that reads untrusted input: the tokenizer's
encode/decode/stream decoder, chat rendering (and the HF chat template), and the JSONL readers of
`poelm.data.documents` and `poelm.data.sources`.

Each property states the documented result exactly (an oracle written from the module docstrings),
or that the input is refused with a one-line `PoelmError` naming where it is bad; any other
exception type is a failure. Settings: bounded example counts, `derandomize=True` (the same
examples on every run), no example database. Files are written into fresh temporary directories
inside each example (a function-scoped `tmp_path` would be shared between examples).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from poelm.data.conversations import BAD_CONVERSATION, NOT_OBJECT, UNKNOWN_SHAPE, Conversation
from poelm.data.documents import Document, read_documents
from poelm.data.records import INVALID_JSON, NOT_UTF8
from poelm.data.sources import load_conversations, parse_spec
from poelm.core.errors import PoelmError
from poelm.core.tokenizer import SPECIAL_TOKENS

REPLACEMENT = "\ufffd"


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def assert_one_line_poelm_error(exc: BaseException, prefix: str) -> str:
    """`exc` is exactly a PoelmError whose one-line message starts with `prefix`; return the message."""
    assert type(exc) is PoelmError, f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(prefix), (prefix, msg)
    return msg


# ---- text strategies -----------------------------------------------------------------------------

CHARS = st.characters(exclude_categories=("Cs",))  # lone surrogates: tiktoken replaces them (documented)
FRAGMENTS = [
    "the", " model", "  ", "\n", "\r\n", "\t", " \n\n ", "3.14159", "2024", "12345678901", "x_1", "'s", "'LL",
    "café", "naïve", "größe", "日本語", "данные", "😀", "👩\u200d👩\u200d👧", "e\u0301", "<|bos|>", "<|assistant_end|>",
    "<|", "|>", "\u2028", "\x85", "\x00", "\x1c", "\ufeff", "\ufffd", "\U0010ffff", "{}", "()", '"', "\\",
]
texts = st.lists(st.one_of(st.text(CHARS, max_size=16), st.sampled_from(FRAGMENTS)), max_size=10).map("".join)
nonblank_texts = texts.map(lambda s: s if s.strip() else s + "ok")


def _table(tok) -> list[bytes]:
    """id -> bytes from the public ranks and SPECIAL_TOKENS alone (not from the decoder under test)."""
    table = [b""] * tok.vocab_size
    for token, rank in tok.mergeable_ranks.items():
        table[rank] = token
    for k, name in enumerate(SPECIAL_TOKENS):
        table[tok.n_merges + k] = name.encode()
    return table


def expected_decode(table: list[bytes], ids) -> str:
    """The documented decode: bytes of in-range ids, UTF-8 with U+FFFD for invalid/partial sequences;
    an id outside [0, vocab_size) ends the bytes so far (decoded on their own) and is one U+FFFD."""
    out, run = [], b""
    for i in ids:
        i = int(i)
        if 0 <= i < len(table):
            run += table[i]
        else:
            out.append(run.decode("utf-8", errors="replace") + REPLACEMENT)
            run = b""
    return "".join(out) + run.decode("utf-8", errors="replace")


def stream(tok, ids) -> tuple[list[str], str]:
    sd = tok.stream_decoder()
    pieces = [sd.push(i) for i in ids]
    return pieces, sd.flush()


# ---- 1. tokenizer: encode/decode -----------------------------------------------------------------


@fuzz(200)
@given(s=texts)
def test_encode_decode_round_trips_any_text(tiny_tokenizer, s):
    """Any str without lone surrogates: encode gives BPE ids only (no specials, even for literal
    "<|bos|>"), decode(encode(s)) == s, the ids' bytes concatenate to s's UTF-8, streaming the ids
    gives s too, and encode_batch agrees with encode."""
    tok = tiny_tokenizer
    ids = tok.encode(s)
    assert all(type(i) is int and 0 <= i < tok.n_merges for i in ids)
    assert tok.decode(ids) == s
    assert b"".join(tok.id_to_bytes(i) for i in ids) == s.encode("utf-8")
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == s and tail == ""
    assert tok.encode_batch([s, s[::-1]], num_threads=1) == [ids, tok.encode(s[::-1])]


@fuzz(200)
@given(data=st.binary(max_size=64) | st.lists(st.sampled_from([b"\xf0\x9f\x98", b"\x80", b"\xe6\x97", b"\xed\xa0\x80",
                                                               b"\xc0\xaf", b"\xff", b"a", b"\xc3\xa9"]),
                                              max_size=8).map(b"".join))
def test_single_byte_ids_decode_like_python_utf8_replace(tiny_tokenizer, data):
    """Any bytes spelled as single-byte token ids: decode == data.decode("utf-8", "replace") for a
    list, a tuple and an int64 array; the stream decoder gives the same string, and every prefix of
    its pushes is a prefix of it (held-back bytes are never emitted early and then revised)."""
    tok = tiny_tokenizer
    ranks = tok.mergeable_ranks
    ids = [ranks[bytes([b])] for b in data]
    expected = data.decode("utf-8", errors="replace")
    assert tok.decode(ids) == tok.decode(tuple(ids)) == tok.decode(np.array(ids, dtype=np.int64)) == expected
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == expected
    emitted = ""
    for p in pieces:
        emitted += p
        assert expected.startswith(emitted)


_INT_IDS = st.one_of(
    st.integers(0, 511),  # every valid id of the tiny tokenizer: bytes, merges, specials (503..511)
    st.integers(503, 511),
    st.integers(512, 2**80),
    st.integers(-(2**80), -1),
    st.sampled_from([2**63, 2**63 - 1, 2**64, 10**30, -(2**63), 2**31, -1, 512]),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.integers(-128, 127).map(np.int8),
    st.integers(0, 2**16 - 1).map(np.uint16),
    st.integers(-(2**31), 2**31 - 1).map(np.int32),
)


# UTF-8 of random text cut at a random byte with an id (often out of range) in the cut: partial
# characters next to invalid ids; bytes items stand for their single-byte token ids.
_CUT_TEXT = st.builds(lambda data, k, sep: [data[: k % (len(data) + 1)], sep, data[k % (len(data) + 1):]],
                      texts.map(str.encode), st.integers(0, 64), _INT_IDS)


@fuzz(250)
@given(items=st.lists(_INT_IDS.map(lambda i: [i]) | _CUT_TEXT, max_size=10))
def test_any_integer_ids_decode_and_stream_identically(tiny_tokenizer, items):
    """Any list of integers (valid, special, huge, negative, numpy ints of any width, mixed, and the
    single-byte ids of UTF-8 text cut mid-character by another id): decode never raises and gives the documented text (out-of-range ids are U+FFFD, partial UTF-8 U+FFFD,
    specials their literal names); tuple, iterator and (when it fits) int64-array input decode the
    same; the StreamDecoder, pushed id by id then flushed, gives exactly the same string; id_to_bytes
    is the id's bytes, or b"" outside the vocabulary."""
    tok = tiny_tokenizer
    ranks = tok.mergeable_ranks
    ids = [x for item in items for part in item
           for x in ([ranks[bytes([b])] for b in part] if isinstance(part, bytes) else [part])]
    table = _table(tok)
    expected = expected_decode(table, ids)
    assert tok.decode(ids) == tok.decode(tuple(ids)) == tok.decode(iter(ids)) == expected
    if all(-(2**63) <= int(i) < 2**63 for i in ids):
        assert tok.decode(np.array([int(i) for i in ids], dtype=np.int64)) == expected
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == expected
    for i in ids:
        assert tok.id_to_bytes(i) == (table[int(i)] if 0 <= int(i) < len(table) else b"")


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=3), st.binary(max_size=3),
    st.complex_numbers(max_magnitude=10, allow_nan=False), st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.floats(width=32).map(np.float32), st.booleans().map(np.bool_), st.text(max_size=2).map(np.str_),
)
_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64, np.float32,
                           np.float64, np.bool_, np.complex64, "U2", "datetime64[s]"]),
    shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
)
_JUNK = st.recursive(
    st.one_of(_SCALARS, _ARRAYS),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
                            st.dictionaries(st.integers(-3, 600), inner, max_size=3)),
    max_leaves=8,
)


def _flat_ints(x) -> list[int] | None:
    """x as the documented list of integer ids (list/tuple/array/scalar of ints), else None."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, int):
        return [x]
    if isinstance(x, (list, tuple)):
        out = []
        for e in x:
            e = e.tolist() if hasattr(e, "tolist") else e
            if not isinstance(e, int):
                return None
            out.append(e)
        return out
    return None


@fuzz(300)
@given(junk=_JUNK)
def test_decode_and_push_accept_ints_and_refuse_everything_else_with_poelm_error(tiny_tokenizer, junk):
    """Arbitrary values (None, floats, strings, bytes, complex, numpy scalars and arrays of every
    dtype, nested lists/tuples/dicts): decode returns a str -- exactly the documented text
    when the value is a flat sequence of integers (a numpy/torch-like array included) -- or raises
    exactly PoelmError with a one-line "decode: ..." message. StreamDecoder.push on any element
    likewise returns a str or raises exactly PoelmError ("StreamDecoder.push: ...")."""
    tok = tiny_tokenizer
    flat = _flat_ints(junk)
    try:
        out = tok.decode(junk)
    except Exception as e:  # noqa: BLE001 -- the property is about the exception's exact type
        assert_one_line_poelm_error(e, "decode: ")
        assert flat is None, f"refused a flat integer sequence {junk!r}: {e}"
    else:
        assert type(out) is str
        if flat is not None:
            assert out == expected_decode(_table(tok), flat)
    elements = junk if isinstance(junk, (list, tuple)) else [junk]
    sd = tok.stream_decoder()
    for e in elements:
        try:
            assert type(sd.push(e)) is str
        except Exception as err:  # noqa: BLE001
            assert_one_line_poelm_error(err, "StreamDecoder.push: ")
            value = e.tolist() if hasattr(e, "tolist") else e
            assert not isinstance(value, int)
    assert type(sd.flush()) is str


# ---- 2. chat rendering ---------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")
_BAD_ROLES = st.one_of(st.sampled_from(["User", "ASSISTANT", "tool", "", "system ", "human", "gpt", "function"]),
                       st.none(), st.integers(-2, 2), st.lists(st.text(max_size=2), max_size=2),
                       st.text(max_size=4), st.builds(lambda: np.array(["user", "user"])),
                       st.builds(lambda: [np.zeros((2, 1))]))
_BAD_CONTENT = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.binary(max_size=3),
                         st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=2), st.text(max_size=2),
                                                                                     max_size=2))
_EXTRA_KEYS = st.dictionaries(st.one_of(st.sampled_from(["name", "tool_calls", "weight"]), st.integers(0, 3), st.none()),
                              st.integers(), max_size=2)


def _valid_message(role):
    return st.builds(lambda c, extra: {**extra, "role": role, "content": c}, texts, _EXTRA_KEYS)


_VALID_MESSAGE = {role: _valid_message(role) for role in _ROLES}  # built once, not per draw
_MESSAGE = st.one_of(
    st.sampled_from(_ROLES).flatmap(_VALID_MESSAGE.__getitem__),
    st.sampled_from(_ROLES).flatmap(_VALID_MESSAGE.__getitem__),  # twice: valid messages are the common case
    st.builds(lambda r, c: {"role": r, "content": c}, _BAD_ROLES, texts),
    st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(_ROLES), _BAD_CONTENT),
    st.builds(lambda keep, r, c, extra: {**extra, **{k: v for k, v in (("role", r), ("content", c)) if k in keep}},
              st.sampled_from([(), ("role",), ("content",)]), st.sampled_from(_ROLES), texts, _EXTRA_KEYS),
    st.one_of(st.none(), st.text(max_size=3), st.integers(), st.lists(st.text(max_size=3), max_size=2),
              st.tuples(st.sampled_from(_ROLES), texts)),
)


def _alternating(n_pairs_max: int = 3):
    """A valid conversation: optional system, maybe an assistant greeting, user/assistant pairs, maybe a
    final user turn (always one when a system message has no pair to merge into)."""
    def build(system, greeting, pairs, last_user):
        msgs = [{"role": "system", "content": system}] if system is not None else []
        if greeting is not None:
            msgs.append({"role": "assistant", "content": greeting})
        for u, a in pairs:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        if last_user is not None or not msgs or (system is not None and not pairs):
            msgs.append({"role": "user", "content": last_user or ""})
        return msgs
    return st.builds(build, st.none() | texts, st.none() | texts,
                     st.lists(st.tuples(texts, texts), max_size=n_pairs_max), st.none() | texts)


def _mutate(draw_list):
    """A valid conversation with one message replaced, dropped or duplicated: mostly-valid input."""
    def apply(msgs, op, k, new):
        msgs = list(msgs)
        k %= len(msgs)
        if op == "replace":
            msgs[k] = new
        elif op == "drop":
            del msgs[k]
        else:
            msgs.insert(k, msgs[k])
        return msgs
    return st.builds(apply, draw_list, st.sampled_from(["replace", "drop", "dup"]), st.integers(0, 20), _MESSAGE)


conversations = st.one_of(_alternating(), _alternating(), _mutate(_alternating()), st.lists(_MESSAGE, max_size=6))


def chat_oracle(messages) -> tuple[int | None, list[tuple[str, str]]]:
    """The documented chat rules: (index of the first bad message or None, the (role, text) turns with
    a leading system message merged into the first user message as system + "\\n\\n" + user). After
    the system message, user and assistant turns alternate, beginning with either."""
    turns: list[tuple[str, str]] = []
    system = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m or not isinstance(m["content"], str):
            return i, turns
        role, content = m["role"], m["content"]
        if isinstance(role, str) and role == "system":
            if i != 0:
                return i, turns
            system = content
            continue
        if not (isinstance(role, str) and role in ("user", "assistant")) or (turns and role == turns[-1][0]):
            return i, turns
        if system is not None and role == "user":
            content, system = system + "\n\n" + content, None
        turns.append((role, content))
    if system is not None:
        return 0, turns
    return None, turns


def _check_rendering(tok, turns, ids, mask):
    """The exact documented rendering of `turns` as (ids, mask)."""
    s = tok.special_ids
    starts = {"user": s["<|user_start|>"], "assistant": s["<|assistant_start|>"]}
    ends = {"user": s["<|user_end|>"], "assistant": s["<|assistant_end|>"]}
    expected_ids, expected_mask = [tok.bos_id], [0]
    for role, text in turns:
        body = tok.encode(text)
        expected_ids += [starts[role], *body, ends[role]]
        expected_mask += [0] + [int(role == "assistant")] * (len(body) + 1)
    assert ids == expected_ids
    assert mask == expected_mask
    # the same facts read back from the output alone
    assert ids[0] == tok.bos_id and len(mask) == len(ids)
    specials = set(s.values())
    assert [i for i in ids if i in specials] == [tok.bos_id] + [x for r, _ in turns for x in (starts[r], ends[r])]
    inside = False  # mask is 1 exactly after <|assistant_start|> through its <|assistant_end|>
    for i, m in zip(ids, mask):
        assert m == int(inside), (ids, mask)
        if i == s["<|assistant_start|>"]:
            inside = True
        elif i == s["<|assistant_end|>"]:
            inside = False
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(
        t + "<|assistant_end|>" for r, t in turns if r == "assistant")
    assert tok.decode(ids) == "<|bos|>" + "".join(f"<|{r}_start|>{t}<|{r}_end|>" for r, t in turns)


@fuzz(300)
@given(messages=conversations, as_tuple=st.booleans(), max_tokens=st.none() | st.integers(-2, 80))
def test_render_conversation_and_prompt_render_exactly_or_name_the_bad_message(
        tiny_tokenizer, messages, as_tuple, max_tokens):
    """Random conversations (valid ones, some opening with an assistant greeting, one-message mutations
    of valid ones, random message lists with bad roles, missing keys, non-str content, non-dict
    messages, system in the wrong place): a valid one renders to exactly bos + per-turn
    start/encode(text)/end with the system text merged into the first user turn, mask 1 exactly on
    assistant text and its <|assistant_end|> (decoding the masked ids gives the assistant contents, each
    + <|assistant_end|>); `max_tokens` keeps exactly that prefix (< 1 is refused); every valid prefix of
    the conversation renders to a prefix of it; render_prompt is the rendering + <|assistant_start|>
    when the last turn is the user's, else a PoelmError naming the last message. An invalid one raises
    exactly PoelmError whose one-line message starts "message I:" with I the first bad message's index
    ("conversation:" when empty)."""
    tok = tiny_tokenizer
    given_messages = tuple(messages) if as_tuple else messages
    bad, turns = chat_oracle(messages)
    event("valid" if messages and bad is None else "invalid")
    if not messages:
        for call in (tok.render_conversation, tok.render_prompt):
            with pytest.raises(Exception) as info:
                call(given_messages)
            assert_one_line_poelm_error(info.value, "conversation: ")
        return
    if bad is not None:
        for call in (tok.render_conversation, tok.render_prompt):
            with pytest.raises(Exception) as info:
                call(given_messages)
            assert_one_line_poelm_error(info.value, f"message {bad}: ")
        return
    ids, mask = tok.render_conversation(given_messages)
    _check_rendering(tok, turns, ids, mask)
    if max_tokens is not None:
        if max_tokens < 1:
            with pytest.raises(Exception) as info:
                tok.render_conversation(given_messages, max_tokens=max_tokens)
            assert_one_line_poelm_error(info.value, "render_conversation: max_tokens must be >= 1")
        else:
            assert tok.render_conversation(given_messages, max_tokens=max_tokens) == (ids[:max_tokens], mask[:max_tokens])
    for k in range(1, len(messages)):
        if chat_oracle(messages[:k])[0] is None:
            sub_ids, sub_mask = tok.render_conversation(messages[:k])
            assert ids[: len(sub_ids)] == sub_ids and mask[: len(sub_mask)] == sub_mask
    if turns[-1][0] == "user":
        prompt = tok.render_prompt(given_messages)
        assert prompt == ids + [tok.token_id("assistant_start")]
        reply = {"role": "assistant", "content": "fine."}
        full_ids, _ = tok.render_conversation([*messages, reply])
        assert full_ids[: len(prompt)] == prompt
    else:
        with pytest.raises(Exception) as info:
            tok.render_prompt(given_messages)
        assert_one_line_poelm_error(info.value, f"message {len(messages) - 1}: a prompt must end with a 'user' message")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer_dir):
    pytest.importorskip("transformers")
    from poelm.core.tokenization_poelm import PoelmTokenizer

    return PoelmTokenizer.from_pretrained(str(tiny_tokenizer_dir))


_PLAIN = (st.text(CHARS, max_size=12) | st.lists(st.sampled_from([f for f in FRAGMENTS if "<|" not in f]),
                                                 max_size=6).map("".join)).filter(lambda t: "<|" not in t)


@fuzz(100)
@given(roles=st.lists(st.sampled_from(_ROLES), min_size=1, max_size=5)
       | _alternating().map(lambda msgs: [m["role"] for m in msgs][:5]), contents=st.lists(_PLAIN, min_size=5, max_size=5),
       generation=st.booleans())
def test_hf_chat_template_agrees_with_render(tiny_tokenizer, hf_tokenizer, roles, contents, generation):
    """The shipped chat template through PoelmTokenizer.apply_chat_template, on random role sequences
    with text that spells no special token (assistant-first ones among them): where the Tokenizer
    accepts the conversation, the template's ids equal render_conversation's ids (+ <|assistant_start|>
    with add_generation_prompt, which is render_prompt when the last turn is the user's); where the
    Tokenizer refuses it, the template raises with the Tokenizer's message, word for word."""
    tok = tiny_tokenizer
    messages = [{"role": r, "content": contents[i]} for i, r in enumerate(roles)]
    bad, turns = chat_oracle(messages)
    event("valid" if bad is None else "invalid")
    call = (lambda: hf_tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True,
                                                     return_dict=False))
    if bad is None:
        expected = tok.render_conversation(messages)[0] + ([tok.token_id("assistant_start")] if generation else [])
        assert call() == expected
    else:
        with pytest.raises(PoelmError) as refused:
            tok.render_conversation(messages)
        assert str(refused.value).startswith(f"message {bad}: "), str(refused.value)
        with pytest.raises(Exception) as info:
            call()
        assert str(info.value) == str(refused.value)


# ---- 3. JSONL readers ----------------------------------------------------------------------------

_EOL = st.sampled_from([b"\n", b"\r\n"])
_BLANK = st.sampled_from([b"", b" ", b"\t", b"  \t "])
_GARBAGE = st.binary(min_size=1, max_size=24).map(lambda b: b.replace(b"\n", b"")).filter(lambda b: b.strip())
_PATHOLOGICAL = st.sampled_from([
    b"1" * 5000,  # over Python's 4300-digit int limit
    b'{"text": "x", "n": ' + b"9" * 4400 + b"}",
    b'{"messages": [], "n": ' + b"9" * 4400 + b"}",
    b"[" * 100_000,  # deeper than the recursion limit
    b'{"text": ' * 50_000,
    b'{"text": "a\x00b"}',
    b"\x00",
    b'{"text": "\xff"}',
    b"\xef\xbb\xbf{}",
])
_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(),
                       st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "", " ", "\ud800"]),
                       texts)
_JSON_KEYS = st.sampled_from(["text", "messages", "conversations", "role", "content", "from", "value", "instruction",
                              "input", "output", "response", "problem", "solution", "id"]) | st.text(max_size=4)
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_JSON_KEYS, inner, max_size=4),
                     max_leaves=12)


def _dumps(value, ascii_only: bool) -> bytes:
    """One JSONL line; a lone surrogate is always written as a JSON escape ("\\ud800")."""
    try:
        return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True).encode("utf-8")


def _spots(value, out: list) -> list:
    """Every (container, key) inside a JSON value, depth first."""
    if isinstance(value, (dict, list)):
        for key in (list(value) if isinstance(value, dict) else range(len(value))):
            out.append((value, key))
            _spots(value[key], out)
    return out


def _mutated(record, k: int, delete: bool, new):
    """A copy of `record` with one nested value (picked by k) deleted or replaced by `new`."""
    record = copy.deepcopy(record)
    spots = _spots(record, [])
    if spots:
        container, key = spots[k % len(spots)]
        if delete:
            del container[key]
        else:
            container[key] = new
    return record


def _weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """one_of with integer weights (hypothesis' one_of favours its simplest branches)."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


def _file_lines(records: st.SearchStrategy, odd_records: st.SearchStrategy, dirty: bool) -> st.SearchStrategy:
    """The raw lines (no newline) of one file. Clean: valid records and blank lines. Dirty: also
    records that break a content rule (`odd_records`), valid records cut at a random byte, garbage
    bytes, pathological JSON, random JSON values, and records with one nested value deleted or
    replaced by random JSON (wrong types, nested wrong shapes, missing fields)."""
    valid = st.builds(_dumps, records, st.booleans())
    if not dirty:
        return st.lists(_weighted((6, valid), (1, _BLANK)), min_size=1, max_size=8)

    def cut(line, k):
        return line[: 1 + k % (len(line) - 1)]
    truncated = st.builds(cut, valid, st.integers(0, 10**6))
    wrong = st.builds(_dumps, _JSON, st.booleans())
    mutated = st.builds(_dumps, st.builds(_mutated, records, st.integers(0, 10**6), st.booleans(), _JSON), st.booleans())
    odd = st.builds(_dumps, odd_records, st.booleans())
    return st.lists(_weighted((4, valid), (2, odd), (1, _BLANK), (1, truncated), (1, _GARBAGE), (1, _PATHOLOGICAL),
                              (1, wrong), (3, mutated)), min_size=1, max_size=8)


def _write_file(directory: str, name: str, lines: list[bytes], eol: bytes, final_eol: bool, bom: bool = False) -> str:
    path = os.path.join(directory, name)
    data = eol.join(lines) + (eol if final_eol and lines else b"")
    with open(path, "wb") as f:
        f.write((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def _physical_lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return f.read().split(b"\n")


def _parse(raw: bytes, strip_bom: bool):
    """(reason, value): how the documented JSONL rules classify the bytes of one non-blank line."""
    if b"\x00" in raw:
        return NOT_UTF8, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return NOT_UTF8, None
    if strip_bom:
        text = text.removeprefix("\ufeff")
    try:
        return None, json.loads(text)
    except (ValueError, RecursionError):  # invalid JSON, or JSON Python cannot parse (huge int, deep nesting)
        return INVALID_JSON, None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def text_oracle(raw: bytes) -> tuple[bool, str | None]:
    """A non-blank JSONL line for read_documents: (valid, text); a null "text" is valid and holds none."""
    reason, record = _parse(raw, strip_bom=False)  # a NUL byte is never valid JSON either
    if reason is not None or not isinstance(record, dict) or "text" not in record:
        return False, None
    if record["text"] is None:
        return True, None
    if not isinstance(record["text"], str) or not _encodable(record["text"]):
        return False, None
    return True, record["text"]


_text_records = st.builds(lambda t, extra: {**extra, "text": t}, _weighted((4, texts.map(lambda t: t or "doc")),
                                                                         (1, st.just("")), (1, st.none())),
                          st.dictionaries(st.sampled_from(["id", "meta", "source"]), _JSON_LEAF, max_size=2))


# The strategies of clean and of dirty files, built once (a flatmap that built them on every draw spent
# more time building strategies than drawing from them; the examples are the same).
_TEXT_FILES = {dirty: st.lists(st.tuples(_file_lines(_text_records, _text_records, dirty), _EOL, st.booleans()),
                               min_size=1, max_size=2) for dirty in (False, True)}


@fuzz(150)
@given(files=st.booleans().flatmap(_TEXT_FILES.__getitem__))
def test_read_documents_jsonl_yields_exactly_the_valid_records_or_names_the_first_bad_line(files):
    """read_documents over 1-2 .jsonl files of fuzzed lines (valid {"text"} records with extra keys
    and empty or null texts, blank lines, valid lines cut at a random byte, garbage bytes incl. invalid
    UTF-8 and NUL, over-long integers and over-deep nesting, random JSON of wrong shapes), LF or CRLF:
    with no bad line, it yields exactly the records with a non-empty "text", as Document("path:LINE",
    text), in order, and counts the null texts (none at all: PoelmError "no documents in [...]");
    otherwise it yields exactly the documents before the first bad line, then raises exactly PoelmError
    with a one-line message starting "PATH:LINE: " for that line (1-based). An empty file is refused up front, naming it."""
    with tempfile.TemporaryDirectory() as d:
        paths = [_write_file(d, f"f{k}.jsonl", lines, eol, final) for k, (lines, eol, final) in enumerate(files)]
        expected: list[Document] = []
        first_bad, nulls = None, 0
        for path in paths:
            for lineno, raw in enumerate(_physical_lines(path), start=1):
                if not raw.strip():
                    continue
                ok, text = text_oracle(raw)
                if not ok:
                    first_bad = f"{path}:{lineno}: "
                    break
                nulls += text is None
                if text:
                    expected.append(Document(f"{path}:{lineno}", text))
            if first_bad:
                break
        empty = next((p for p in paths if os.path.getsize(p) == 0), None)
        if empty is not None:
            event("empty file")
            with pytest.raises(Exception) as info:
                read_documents(paths)
            assert_one_line_poelm_error(info.value, f"{empty}: empty file")
            return
        event("bad line" if first_bad else f"{min(len(expected), 3)}+ documents")
        reader = read_documents(paths)
        got: list[Document] = []
        error = None
        try:
            for doc in reader:
                got.append(doc)
        except Exception as e:  # noqa: BLE001
            error = e
        assert got == expected
        if first_bad is not None:
            assert error is not None
            assert_one_line_poelm_error(error, first_bad)
        elif expected:
            assert error is None and reader.documents == len(expected) and reader.null_texts == nulls
        else:
            msg = assert_one_line_poelm_error(error, "no documents in ")
            assert all(p in msg for p in paths)


# -- chat records --

_SHAREGPT_FROM = {"system": ["system"], "user": ["human", "user"], "assistant": ["gpt", "assistant"]}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _chat_records(odd: bool = False):
    """Records of every shape, messages and ShareGPT ones now and then opening with an assistant
    greeting; valid ones, or with `odd` about one content in three blank, unicode blank or a lone
    surrogate, and a blank system message now and then (which is dropped)."""
    rare = st.sampled_from(["", " ", "\u3000", "a\ud800"])
    content = _weighted((2, nonblank_texts), (1, rare)) if odd else nonblank_texts
    system = st.none() | content | (st.sampled_from(["", " \n"]) if odd else st.nothing())
    greeting = st.none() | content
    pairs = st.lists(st.tuples(content, content), min_size=1, max_size=3)
    extra = st.dictionaries(st.sampled_from(["id", "source", "meta"]), _JSON_LEAF, max_size=2)

    def turns(system, greeting, pairs):
        out = [("system", system)] if system is not None else []
        out += [("assistant", greeting)] if greeting is not None else []
        return out + [(r, c) for u, a in pairs for r, c in (("user", u), ("assistant", a))]

    def messages(system, greeting, pairs, extra):
        return {**extra, "messages": [{"role": r, "content": c} for r, c in turns(system, greeting, pairs)]}

    def sharegpt(system, greeting, pairs, extra, pick):
        conv = [{"from": _SHAREGPT_FROM[r][pick % len(_SHAREGPT_FROM[r])], "value": c}
                for r, c in turns(system, greeting, pairs)]
        return {**extra, "conversations": conv}

    alpaca = st.builds(lambda i, inp, o, extra: {**extra, "instruction": i, "output": o,
                                                 **({} if inp is None else {"input": inp})},
                       content, st.none() | st.just("") | texts, content, extra)
    evol = st.builds(lambda i, r, extra: {**extra, "instruction": i, "response": r}, content, content, extra)
    magicoder = st.builds(lambda p, s, extra: {**extra, "problem": p, "solution": s}, content, content, extra)
    return st.one_of(st.builds(messages, system, greeting, pairs, extra),
                     st.builds(sharegpt, system, greeting, pairs, extra, st.integers(0, 1)), alpaca, evol, magicoder)


def _message_list(items, role_key, text_key, roles):
    if not isinstance(items, list):
        return None
    out = []
    for m in items:
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            return None
        role, content = m[role_key], m[text_key]
        if not isinstance(role, str) or role not in roles or not isinstance(content, str):
            return None
        out.append({"role": roles[role], "content": content})
    return out


def chat_record_oracle(record):
    """(reason, messages) by the module docstring: shape detected per record, first match wins; then
    the tokenizer's conversation rules (system first, then alternating turns beginning with either
    role, a user turn after the system message) plus SFT's (ends with assistant, user/assistant not
    blank, no lone surrogates); a blank leading system message is dropped."""
    if not isinstance(record, dict):
        return NOT_OBJECT, None
    if "messages" in record:
        msgs = _message_list(record["messages"], "role", "content", {r: r for r in _ROLES})
    elif "conversations" in record:
        msgs = _message_list(record["conversations"], "from", "value", _SHAREGPT_ROLES)
    elif "instruction" in record and ("output" in record or "response" in record):
        answer = record["output"] if "output" in record else record["response"]
        extra = record.get("input", "") if "output" in record else ""
        user = record["instruction"]
        if not all(isinstance(x, str) for x in (user, answer, extra)):
            return BAD_CONVERSATION, None
        msgs = [{"role": "user", "content": user + ("\n\n" + extra if extra else "")},
                {"role": "assistant", "content": answer}]
    elif "problem" in record and "solution" in record:
        if not (isinstance(record["problem"], str) and isinstance(record["solution"], str)):
            return BAD_CONVERSATION, None
        msgs = [{"role": "user", "content": record["problem"]}, {"role": "assistant", "content": record["solution"]}]
    else:
        return UNKNOWN_SHAPE, None
    if msgs is None:
        return BAD_CONVERSATION, None
    if msgs and msgs[0]["role"] == "system" and not msgs[0]["content"].strip():
        msgs = msgs[1:]
    system = bool(msgs) and msgs[0]["role"] == "system"
    body = [m["role"] for m in msgs[1:]] if system else [m["role"] for m in msgs]
    if (not body or "system" in body or any(r == s for r, s in zip(body, body[1:])) or body[-1] != "assistant"
            or (system and "user" not in body)):
        return BAD_CONVERSATION, None
    if any(m["role"] != "system" and not m["content"].strip() for m in msgs):
        return BAD_CONVERSATION, None
    if not all(_encodable(m["content"]) for m in msgs):
        return BAD_CONVERSATION, None
    return None, msgs


def chat_line_oracle(raw: bytes, lineno: int):
    reason, record = _parse(raw, strip_bom=lineno == 1)
    if reason is not None:
        return reason, None
    return chat_record_oracle(record)


_CHAT_SPECS = {dirty: st.lists(st.tuples(  # built once, as _TEXT_FILES
    st.lists(st.tuples(_file_lines(_chat_records(), _chat_records(odd=True), dirty), _EOL, st.booleans()),
             min_size=1, max_size=2),
    st.none() | st.integers(1, 4), st.booleans(), st.booleans()), min_size=1, max_size=2) for dirty in (False, True)}


@fuzz(150)
@given(specs=st.booleans().flatmap(_CHAT_SPECS.__getitem__), skip_invalid=st.booleans())
def test_load_conversations_returns_exactly_the_valid_records_or_names_the_first_bad_line(specs, skip_invalid):
    """load_conversations over 1-2 SPECs (`PATH[:EPOCHS]`, PATH a JSONL file or a directory of 2), each
    file of fuzzed lines (valid messages/ShareGPT/Alpaca/Evol-Instruct/Magicoder records, messages and
    ShareGPT ones sometimes opening with an assistant greeting, some with blank or surrogate contents,
    blank lines, cut lines, garbage bytes incl. invalid UTF-8 and NUL, over-long integers, over-deep
    nesting, random JSON of wrong shapes; LF or CRLF; a BOM before a valid first record). Without
    skip_invalid: exactly the valid conversations (where "path:LINE", checked messages, EPOCHS parsed),
    or PoelmError, exactly, one line, "PATH:LINE: " of the first bad record. With skip_invalid: the same
    conversations, and report.skipped counts every bad record per file and reason, first_error naming
    each reason's first line. Either way an empty file is refused naming it and a SPEC without a valid
    conversation naming the SPEC's path."""
    with tempfile.TemporaryDirectory() as d:
        plan = []  # (spec, path, epochs, files)
        for k, (files, epochs, as_dir, bom) in enumerate(specs):
            as_dir = as_dir and len(files) > 1
            where = os.path.join(d, f"dir{k}") if as_dir else d
            os.makedirs(where, exist_ok=True)
            paths = []
            for j, (lines, eol, final) in enumerate(files):
                first_valid = bool(lines) and chat_line_oracle(lines[0], 1)[0] is None and lines[0].strip() != b""
                paths.append(_write_file(where, f"s{k}_{j}.jsonl", lines, eol, final, bom=bom and first_valid))
            path = where if as_dir else paths[0]
            if not as_dir:
                paths = paths[:1]
            plan.append((path if epochs is None else f"{path}:{epochs}", path, epochs or 1, paths))

        expected_sources, skipped, first_error, error = [], {}, {}, None
        for spec, path, epochs, paths in plan:
            convs = []
            for f in paths:
                records = 0
                for lineno, raw in enumerate(_physical_lines(f), start=1):
                    if not raw.strip():
                        continue
                    records += 1
                    reason, msgs = chat_line_oracle(raw, lineno)
                    if reason is None:
                        convs.append(Conversation(f"{f}:{lineno}", msgs))
                    elif not skip_invalid:
                        error = error or f"{f}:{lineno}: "
                    else:
                        skipped.setdefault(f, Counter())[reason] += 1
                        first_error.setdefault(reason, f"{f}:{lineno}: ")
                    if error:
                        break
                if not error and records == 0:
                    error = f"{f}: empty file"
                if error:
                    break
            if not error and not convs:
                error = f"{path}: no valid conversations"
            if error:
                break
            expected_sources.append((path, epochs, convs, paths))

        event(f"skip_invalid={skip_invalid}: " + (error.split(": ")[-1] if error else "loaded"))
        try:
            sources, report = load_conversations([spec for spec, *_ in plan], skip_invalid=skip_invalid, progress=False)
        except Exception as e:  # noqa: BLE001
            assert error is not None, f"unexpected {type(e).__name__}: {e}"
            assert_one_line_poelm_error(e, error)
            return
        assert error is None, f"expected an error {error!r}"
        assert [(s.path, s.epochs, s.conversations, s.files) for s in sources] == expected_sources
        assert report.conversations == sum(len(c) for _, _, c, _ in expected_sources)
        assert report.skipped == {f: dict(c) for f, c in skipped.items()}
        assert set(report.first_error) == set(first_error)
        for reason, prefix in first_error.items():
            msg = report.first_error[reason]
            assert "\n" not in msg and msg.startswith(prefix), (prefix, msg)


@fuzz(200)
@given(path=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12), epochs=st.integers(-3, 10**6))
def test_parse_spec_takes_only_a_trailing_integer_as_epochs(path, epochs):
    """For any non-empty PATH (':' anywhere in it): "PATH:N" is (PATH, N) for N >= 1, and refused with a
    one-line PoelmError naming the SPEC for N < 1."""
    spec = f"{path}:{epochs}"
    if epochs >= 1:
        assert parse_spec(spec) == (path, epochs)
    else:
        with pytest.raises(Exception) as info:
            parse_spec(spec)
        assert_one_line_poelm_error(info.value, f"data SPEC {spec!r}: ")

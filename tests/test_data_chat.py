"""Conversations for SFT: SPECs (poelm.data.sources), record shapes and errors (conversations), skip_invalid, the
mixture (val split, epochs, case augmentation: mixture), best-fit packing with document boundaries, ChatLoader and
eval_batches (packing).

Packing and loader tests use token ids that identify their conversation (and position), so every
row, target and batch can be checked from the arrays alone.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import poelm.data.sources as sources_module
from poelm.data.conversations import Conversation, to_messages
from poelm.data.mixture import build_mixture, greeting_span
from poelm.data.packing import ChatLoader, eval_batches, pack, render_conversations
from poelm.data.sources import Source, load_conversations, parse_spec
from poelm.core.errors import PoelmError


def _write(path, lines) -> str:
    """Write JSONL: dicts are dumped, strings written as they are."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def _u(text: str) -> dict:
    return {"role": "user", "content": text}


def _a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _s(text: str) -> dict:
    return {"role": "system", "content": text}


VALID = {"instruction": "Add 1 and 2.", "output": "3"}

# ---- SPEC --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("code.jsonl", ("code.jsonl", 1)),
    ("code.jsonl:3", ("code.jsonl", 3)),
    ("data/dir:12", ("data/dir", 12)),
    ("s3:bucket/a.jsonl", ("s3:bucket/a.jsonl", 1)),  # ':' inside the path is the path's
    ("s3:bucket/a.jsonl:2", ("s3:bucket/a.jsonl", 2)),
    ("a:b:c.jsonl", ("a:b:c.jsonl", 1)),
    ("run:2024.jsonl:x1", ("run:2024.jsonl:x1", 1)),  # not all digits: still the path
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec, expected", [
    ("code.jsonl:0", "EPOCHS is 0; expected a positive int"),
    ("code.jsonl:-2", "EPOCHS is -2"),
    ("code.jsonl:", "nothing after ':'"),
    (":3", "no PATH before ':'"),
    ("", "expected PATH[:EPOCHS]"),
])
def test_parse_spec_errors(spec, expected):
    with pytest.raises(PoelmError, match=expected.replace("[", r"\[")):
        parse_spec(spec)


# ---- record shapes -----------------------------------------------------------------------------------


def test_every_record_shape_converts(tmp_path):
    records = [
        {"messages": [_s("Be brief."), _u("Hi"), _a("Hello."), _u("Sum 2+2?"), _a("4")], "id": 7},
        {"instruction": "Write a loop.", "input": "n = 3", "output": "for i in range(n): pass"},
        {"instruction": "Say yes.", "input": "", "output": "yes"},
        {"instruction": "No input key.", "output": "ok"},
        {"instruction": "Reverse a list.", "response": "xs[::-1]"},
        {"problem": "Square x.", "solution": "x * x", "lang": "python"},
        {"conversations": [{"from": "human", "value": "What is 3*3?"}, {"from": "gpt", "value": "9"},
                           {"from": "human", "value": "And 4*4?"}, {"from": "gpt", "value": "16"}]},
        {"conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "Name?"},
                           {"from": "gpt", "value": "Bot."}]},
        {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}]},  # a blank system message is dropped
    ]
    path = _write(tmp_path / "mixed.jsonl", records)
    sources, report = load_conversations([path], progress=False)
    got = [c.messages for c in sources[0].conversations]
    assert got == [
        [_s("Be brief."), _u("Hi"), _a("Hello."), _u("Sum 2+2?"), _a("4")],
        [_u("Write a loop.\n\nn = 3"), _a("for i in range(n): pass")],
        [_u("Say yes."), _a("yes")],
        [_u("No input key."), _a("ok")],
        [_u("Reverse a list."), _a("xs[::-1]")],
        [_u("Square x."), _a("x * x")],
        [_u("What is 3*3?"), _a("9"), _u("And 4*4?"), _a("16")],
        [_s("You are terse."), _u("Name?"), _a("Bot.")],
        [_u("Q"), _a("A")],
    ]
    assert [c.where for c in sources[0].conversations] == [f"{path}:{i}" for i in range(1, 10)]
    assert report.conversations == 9 and report.total_skipped == 0
    assert to_messages({"problem": "p", "solution": "s"}, "x:1") == [_u("p"), _a("s")]


def test_rendered_conversation_follows_the_tokenizer(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    path = _write(tmp_path / "c.jsonl", [{"conversations": [{"from": "system", "value": "S"},
                                                             {"from": "human", "value": "U"},
                                                             {"from": "gpt", "value": "A"}]}])
    (conv,) = load_conversations([path], progress=False)[0][0].conversations
    ((ids, mask),) = render_conversations([conv], tok)
    assert (ids, mask) == tok.render_conversation([_u("S\n\nU"), _a("A")])  # system merged into the first user


def test_assistant_first_records_load_and_render_as_the_tokenizer_does(tiny_tokenizer, tmp_path):
    """An app's greeting opening a conversation is kept (the tokenizer's rule, not a copy of it), the
    system text still merged into the first user turn, the greeting trained on."""
    tok = tiny_tokenizer
    greeting = [_s("S"), _a("Hello!"), _u("U"), _a("A")]
    path = _write(tmp_path / "g.jsonl", [
        {"messages": greeting},
        {"conversations": [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "U"},
                           {"from": "gpt", "value": "A"}]},
    ])
    first, second = load_conversations([path], progress=False)[0][0].conversations
    assert first.messages == greeting and second.messages == greeting[1:]
    (ids, mask), _ = render_conversations([first, second], tok)
    assert (ids, mask) == tok.render_conversation([_a("Hello!"), _u("S\n\nU"), _a("A")])
    assert ids[:2] == [tok.bos_id, tok.token_id("assistant_start")] and mask[2] == 1


@pytest.mark.parametrize("line, expected", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "a JSON list; expected an object"),
    ({"text": "plain"}, "unknown record shape with keys ['text']; expected"),
    ({"messages": [_a("A"), _a("A2"), _u("U"), _a("A3")]},
     "message 1: expected role 'user' after 'assistant', got 'assistant'"),
    ({"messages": [_s("S"), _a("A")]}, "message 0: a 'system' message must be followed by a 'user' message"),
    ({"messages": [_u("U"), _u("U2"), _a("A")]}, "message 1: expected role 'assistant' after 'user', got 'user'"),
    ({"messages": [_u("U"), _a("A"), _s("S")]}, "message 2: role 'system' is only allowed as the first message"),
    ({"messages": [_u("U"), {"role": "assistant", "content": 3}]}, "messages[1]: 'content' is int; expected a string"),
    ({"messages": [_u("U"), {"role": "tool", "content": "x"}]}, "messages[1]: unknown role 'tool'"),
    ({"messages": []}, "no messages; expected a user message and an assistant reply"),
    ({"messages": [_u("U"), _a("A"), _u("more?")]}, "message 2: the conversation ends with a 'user' message"),
    ({"messages": [_u("U"), _a("  \n")]}, "message 1: 'assistant' content is blank"),
    ({"conversations": [{"from": "human", "value": "U"}, {"from": "tool", "value": "x"}]},
     "conversations[1]: unknown 'from' 'tool'"),
    ({"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "U"}]},
     "message 1: the conversation ends with a 'user' message"),
    ({"instruction": "I", "output": None}, "Alpaca field 'output' is NoneType; expected a string"),
    ({"instruction": ["I"], "response": "R"}, "Evol-Instruct field 'instruction' is list"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "A"}]}',
     "message 0: content has an unpaired surrogate"),
])
def test_bad_records_name_file_and_line(tmp_path, line, expected):
    path = _write(tmp_path / "data.jsonl", [VALID, line])  # the bad record is on line 2
    with pytest.raises(PoelmError) as e:
        load_conversations([path], progress=False)
    assert str(e.value).startswith(f"{path}:2: ") and expected in str(e.value), str(e.value)


def test_json_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "alpaca.jsonl"  # a .json file is a JSON array (test_every_format_gives_the_same_conversations)
    path.write_text("[\n" + json.dumps(VALID) + "\n]\n")
    with pytest.raises(PoelmError, match=r"alpaca\.jsonl:1: not valid JSON .*looks like one JSON array: name it"):
        load_conversations([str(path)], progress=False)


@pytest.mark.parametrize("content", ["", "\n \n"])
def test_empty_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(PoelmError, match=f"^{path}: empty file"):
        load_conversations([str(path)], progress=False)
    with pytest.raises(PoelmError, match=f"^{path}: empty file"):  # inside a directory too
        load_conversations([str(tmp_path)], skip_invalid=True, progress=False)


def test_directories_missing_paths_and_files_read_twice(tmp_path):
    d = tmp_path / "ds"
    (d / "sub").mkdir(parents=True)
    _write(d / "b.jsonl", [{"problem": "b", "solution": "B"}])
    _write(d / "a.jsonl", [{"problem": "a", "solution": "A"}])
    _write(d / "sub" / "c.jsonl", [{"problem": "c", "solution": "C"}])
    (d / "README.md").write_text("# dataset card\n")
    sources, report = load_conversations([f"{d}:2"], progress=False)
    assert sources[0].path == str(d) and sources[0].epochs == 2
    assert [c.messages[0]["content"] for c in sources[0].conversations] == ["a", "b", "c"]  # sorted walk
    assert report.ignored_files == [str(d / "README.md")] and report.files == 3
    with pytest.raises(PoelmError, match="no such file or directory"):
        load_conversations([str(tmp_path / "nope.jsonl")], progress=False)
    with pytest.raises(PoelmError, match=f"{d / 'a.jsonl'}: read twice"):
        load_conversations([str(d), f"{d / 'a.jsonl'}:3"], progress=False)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("x")
    with pytest.raises(PoelmError, match="a directory without .jsonl, .json or .parquet files"):
        load_conversations([str(tmp_path / "docs")], progress=False)


def test_skip_invalid_counts_per_file_and_reason(tmp_path, capsys):
    f1 = _write(tmp_path / "one.jsonl", [VALID, "{oops", {"text": "t"}, "{also bad", VALID])
    f2 = _write(tmp_path / "two.jsonl", [{"messages": [_u("U")]}, {"problem": "p", "solution": "s"}])
    sources, report = load_conversations([f1, f"{f2}:2"], skip_invalid=True)  # progress on: lines on stderr
    assert [len(s.conversations) for s in sources] == [2, 1]
    assert [c.where for c in sources[0].conversations] == [f"{f1}:1", f"{f1}:5"]
    assert report.skipped == {f1: {"invalid JSON": 2, "unknown shape": 1}, f2: {"bad conversation": 1}}
    assert report.total_skipped == 4 and report.conversations == 3
    assert report.skipped_by_reason() == {"invalid JSON": 2, "unknown shape": 1, "bad conversation": 1}
    assert report.first_error["invalid JSON"].startswith(f"{f1}:2: not valid JSON")
    assert report.first_error["bad conversation"].startswith(f"{f2}:1: message 0")
    assert "skipped 4 invalid record(s) in 2 file(s)" in report.summary()
    assert report.summary() in capsys.readouterr().err
    assert json.loads(json.dumps(report.to_dict()))["skipped_total"] == 4
    bad = _write(tmp_path / "bad.jsonl", ["{x", {"text": "t"}])
    with pytest.raises(PoelmError, match=f"{bad}: no valid conversations \\(2 invalid record"):
        load_conversations([bad], skip_invalid=True, progress=False)


# ---- mixture -----------------------------------------------------------------------------------------


def _source(name: str, n: int, epochs: int, first_user=lambda i: f"question {i}") -> Source:
    return Source(name, epochs, [Conversation(f"{name}:{i + 1}", [_u(first_user(i)), _a(f"answer {i}")])
                                 for i in range(n)])


def test_mixture_counts_split_and_determinism():
    sources = [_source("a", 10, 3), _source("b", 6, 2)]
    mix = build_mixture(sources, val_conversations=4, seed=0)
    val = {c.where for c in mix.val}
    train_wheres = [c.where for c in mix.train]
    assert len(mix.val) == len(val) == 4 and not val & set(train_wheres)  # disjoint by identity
    assert val | set(train_wheres) == {c.where for s in sources for c in s.conversations}
    a, b = mix.sources
    assert a.held_out + b.held_out == 4 and (a.read, b.read) == (10, 6)
    assert (a.train, b.train) == ((10 - a.held_out) * 3, (6 - b.held_out) * 2)
    assert len(mix.train) == a.train + b.train and mix.case_augmented == 0
    for where in set(train_wheres):  # every held-in conversation exactly EPOCHS times
        assert train_wheres.count(where) == (3 if where.startswith("a:") else 2)
    assert mix.conversations == 16 and "val 4, train" in mix.summary()
    assert json.loads(json.dumps(mix.stats()))["sources"][0]["epochs"] == 3
    again = build_mixture(sources, val_conversations=4, seed=0)
    assert again.val == mix.val and again.train == mix.train
    other = build_mixture(sources, val_conversations=4, seed=1)
    assert {c.where for c in other.val} != val or other.train != mix.train
    assert train_wheres != sorted(train_wheres, key=lambda w: (w[0], int(w[2:])))  # shuffled


def test_mixture_val_size_limits():
    sources = [_source("a", 3, 5)]
    assert len(build_mixture(sources, 2, seed=0).train) == 5  # one conversation left, x5
    assert build_mixture(sources, 0, seed=0).val == []
    with pytest.raises(PoelmError, match="val_conversations is 3 but the data holds 3 conversation"):
        build_mixture(sources, 3, seed=0)


GREETINGS = ["Hello there, help me", "hi! what is x", "  Good   morning, sort this", "HEY you", "Greetings.",
             "howdy partner", "good evening", "Good Afternoon all"]
NOT_GREETINGS = ["Highlights of the code", "history of python", "Say hello", "hello_world() fails", "Hithere",
                 "what is hi"]


@pytest.mark.parametrize("text, span", [("Hello there", (0, 5)), ("  Good   morning, x", (2, 16)),
                                        ("hey", (0, 3)), ("Hey, hi", (0, 3)), ("Hithere", None),
                                        ("Say hello", None)])
def test_greeting_span(text, span):
    assert greeting_span([_u(text), _a("a")]) == (None if span is None else (0, *span))


def test_case_augmentation_duplicates_greetings_once_never_val():
    firsts = GREETINGS + NOT_GREETINGS
    convs = [Conversation(f"g:{i + 1}", [_u(t), _a(f"answer {i}")]) for i, t in enumerate(firsts)]
    convs.append(Conversation("g:sys", [_s("Be nice."), _u("Hello, system first"), _a("hi")]))
    sources = [Source("g", 2, convs)]
    before = copy.deepcopy(convs)
    plain = build_mixture(sources, val_conversations=3, seed=5)
    mix = build_mixture(sources, val_conversations=3, seed=5, case_augment=True)
    assert mix.val == plain.val  # augmentation moves nothing between splits
    val = {c.where for c in mix.val}
    greeting_train = {c.where for c in convs if c.where not in val and greeting_span(c.messages) is not None}
    assert len(greeting_train) >= 5 and any(greeting_span(c.messages) for c in mix.val)  # greetings on both sides
    dups = [c for c in mix.train if c.where.endswith(" (case-augmented)")]
    originals = {c.where: c for c in convs}
    assert sorted(c.where.removesuffix(" (case-augmented)") for c in dups) == sorted(greeting_train)  # once each
    assert mix.case_augmented == len(dups) == mix.sources[0].case_augmented
    assert len(mix.train) == len(plain.train) + len(dups) == (len(convs) - 3) * 2 + len(dups)
    for dup in dups:
        orig = originals[dup.where.removesuffix(" (case-augmented)")]
        k, start, end = greeting_span(orig.messages)
        old, new = orig.messages[k]["content"], dup.messages[k]["content"]
        assert new != old and new.lower() == old.lower()  # only the case changed ...
        assert new[:start] + new[end:] == old[:start] + old[end:]  # ... and only in the greeting
        assert new[start:end] in (old[start:end].lower(), old[start:end].upper(),
                                  old[start].upper() + old[start + 1:end].lower())
        assert [m for i, m in enumerate(dup.messages) if i != k] == [m for i, m in enumerate(orig.messages) if i != k]
    assert convs == before  # the originals are untouched
    assert [c.where for c in build_mixture(sources, 3, seed=5, case_augment=True).train] == \
        [c.where for c in mix.train]  # deterministic in the seed
    assert "case-augmented" in mix.summary()


# ---- packing -----------------------------------------------------------------------------------------


def test_pack_small_row_by_hand():
    a = ([100, 1, 2, 3, 4], [0, 0, 0, 1, 1])
    b = ([100, 5, 6], [1, 1, 1])  # mask 1 on its first token: the boundary alone must stop that target
    rows = pack([b, a], seq_len=9, pad_id=99)  # longest first: a, then b
    assert rows.row_conversations == [(1, 0)]
    assert rows.inputs.tolist() == [[100, 1, 2, 3, 4, 100, 5, 6, 99]]
    assert rows.targets.tolist() == [[-1, -1, 3, 4, -1, 5, 6, -1, -1]]
    assert rows.doc_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2]]  # padding: its own id
    assert rows.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0]]
    s = rows.stats
    assert (s.rows, s.conversations, s.tokens, s.supervised_tokens, s.truncated) == (1, 2, 8, 4, 0)
    assert s.fill_ratio == 8 / 10 and rows.seq_len == 9 and len(rows) == 1
    assert [x.dtype for x in (rows.inputs, rows.targets, rows.doc_ids, rows.positions)] == \
        [np.int32, np.int32, np.int16, np.int16]  # int16 holds every id and position below seq_len + 1
    assert all(x.shape == (1, 9) for x in (rows.inputs, rows.targets, rows.doc_ids, rows.positions))
    assert pack([b, a], seq_len=40000, pad_id=0).doc_ids.dtype == np.int32  # int16 would overflow


def test_pack_is_best_fit_not_first_fit():
    # rows of 10 tokens; lengths 7, 4, 4, 2. First fit puts the 2 beside the 7 (the first row with
    # room); best fit puts it in the row with the least room that fits: beside the two 4s.
    convs = [([i] * n, [0] * n) for i, n in enumerate([4, 7, 2, 4])]
    rows = pack(convs, seq_len=9, pad_id=0)
    assert rows.row_conversations == [(1,), (0, 3, 2)]
    assert rows.stats.rows == 2
    assert rows.inputs.tolist() == [[1] * 7 + [0, 0], [0] * 4 + [3] * 4 + [2]]


def test_pack_truncates_long_conversations_and_counts_them():
    long = (list(range(1, 15)), [0, 0] + [1] * 12)  # 14 tokens into rows of 6
    short = ([20, 21, 22], [0, 1, 1])
    rows = pack([short, long], seq_len=5, pad_id=0)
    assert rows.row_conversations == [(1,), (0,)]
    assert rows.inputs.tolist() == [[1, 2, 3, 4, 5], [20, 21, 22, 0, 0]]
    assert rows.targets.tolist() == [[-1, 3, 4, 5, 6], [21, 22, -1, -1, -1]]
    s = rows.stats
    assert (s.truncated, s.truncated_tokens, s.truncated_supervised) == (1, 8, 8)
    assert "1 truncated to 6 tokens" in s.summary()


def test_pack_rejects_bad_input():
    with pytest.raises(PoelmError, match="no conversations"):
        pack([], seq_len=4, pad_id=0)
    with pytest.raises(PoelmError, match="conversation 1 has 2 ids and 1 mask"):
        pack([([1], [0]), ([1, 2], [0])], seq_len=4, pad_id=0)
    with pytest.raises(PoelmError, match="masks of 0/1"):
        pack([([1, 2], [0, 2])], seq_len=4, pad_id=0)


@pytest.mark.parametrize("seq_len", [8, 31])
def test_pack_keeps_conversations_whole_and_every_target_once(seq_len):
    rng = random.Random(seq_len)
    convs, next_id = [], 1
    for _ in range(60):  # token ids unique over all conversations: a target names its source token
        n = rng.randint(2, 2 * seq_len)
        ids = list(range(next_id, next_id + n))
        next_id += n
        convs.append((ids, [0] + [rng.randint(0, 1) for _ in range(n - 1)]))
    rows = pack(convs, seq_len, pad_id=0)
    C = seq_len + 1
    placed = sorted(i for r in rows.row_conversations for i in r)
    assert placed == list(range(len(convs)))  # each conversation in exactly one row
    expected_targets = []
    for r, members in enumerate(rows.row_conversations):
        assert sum(min(len(convs[i][0]), C) for i in members) <= C
        off = 0
        for d, i in enumerate(members):
            n = min(len(convs[i][0]), C)
            seg = slice(off, min(off + n, seq_len))  # the row's last token is a target only
            assert rows.inputs[r, seg].tolist() == convs[i][0][: seg.stop - off]  # whole, contiguous
            assert (rows.doc_ids[r, seg] == d).all()
            assert rows.positions[r, seg].tolist() == list(range(seg.stop - off))
            off += n
        assert (rows.doc_ids[r, off:] == len(members)).all() and (rows.inputs[r, off:] == 0).all()
        assert (rows.targets[r, max(off - 1, 0):] == -1).all()  # no target from a last token or padding
        if len(members) == 1 and len(convs[members[0]][0]) >= C:
            assert off == C
    for i, (ids, mask) in enumerate(convs):
        if len(ids) <= C:  # untruncated: every supervised token except the first is a target
            expected_targets += [t for t, m in zip(ids[1:], mask[1:]) if m]
    got = rows.targets[rows.targets != -1].tolist()
    untruncated = {t for ids, _ in convs if len(ids) <= C for t in ids}
    assert sorted(t for t in got if t in untruncated) == sorted(expected_targets)  # exactly once each
    assert rows.stats.supervised_tokens == len(got)
    assert rows.stats.truncated == sum(len(ids) > C for ids, _ in convs) > 0
    assert rows.stats.fill_ratio == rows.stats.tokens / (rows.stats.rows * C)


def test_pack_rendered_conversations(tiny_tokenizer):
    tok = tiny_tokenizer
    convs = [Conversation(f"c:{i}", [_u(f"the model {i}"), _a("return " * (i + 1)), _u("and?"), _a("data")])
             for i in range(12)]
    rendered = render_conversations(convs, tok)
    rows = pack(rendered, seq_len=64, pad_id=tok.bos_id)
    assert rows.stats.supervised_tokens == sum(sum(m) for _, m in rendered)  # <|bos|> is never supervised
    end = tok.special_ids["<|assistant_end|>"]
    assert (rows.targets == end).sum() == 2 * len(convs)
    assert not np.isin(rows.targets, [tok.bos_id, tok.special_ids["<|user_start|>"]]).any()
    with pytest.raises(PoelmError, match="^bad:1: "):
        render_conversations([Conversation("bad:1", [_a("x"), _a("y")])], tok)


# ---- loading rows ------------------------------------------------------------------------------------


def _rows(n: int, seq_len: int = 4):
    """n rows, one conversation each, whose first input token is the row's number * 10."""
    return pack([([10 * i + k for k in range(seq_len + 1)], [0] + [1] * seq_len) for i in range(n)], seq_len, 0)


def _ids(batch) -> list[int]:
    return (batch.inputs[:, 0] // 10).tolist()


def test_loader_batches_shapes_and_epochs():
    rows = _rows(7)
    assert [len(rows.row_conversations[i]) for i in range(7)] == [1] * 7
    loader = ChatLoader(rows, 3, seed=3)
    batch = loader.next_batch()
    assert all(t.dtype == torch.int64 and t.shape == (3, 4) for t in batch)
    assert torch.equal(batch.targets[:, :], batch.inputs + 1)  # one conversation per row, all supervised
    seen = _ids(batch) + _ids(loader.next_batch()) + _ids(loader.next_batch())  # 9 slots: epoch rolls mid-batch
    assert sorted(seen[:7]) == list(range(7)) and loader.epoch == 1 and loader.cursor == 2
    assert loader.rows_per_epoch == 7
    ordered = ChatLoader(rows, 7, shuffle=False)
    assert _ids(ordered.next_batch()) == list(range(7))


def test_loader_resumes_exactly():
    rows = _rows(11)
    a = ChatLoader(rows, 2, world_size=2, rank=1, seed=9)
    for _ in range(4):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = ChatLoader(rows, 2, world_size=2, rank=1, seed=9)
    b.load_state_dict(state, "ckpt/loader.json")
    for _ in range(8):
        assert all(torch.equal(x, y) for x, y in zip(a.next_batch(), b.next_batch()))
    with pytest.raises(PoelmError, match="ckpt: data loader state has data="):
        ChatLoader(_rows(11, seq_len=5), 2, world_size=2, rank=1, seed=9).load_state_dict(
            {**state, "seq_len": 5}, "ckpt")
    with pytest.raises(PoelmError, match="has seed=9 but this run has seed=1"):
        ChatLoader(rows, 2, world_size=2, rank=1, seed=1).load_state_dict(state, "ckpt")
    with pytest.raises(PoelmError, match="'cursor' is 11"):
        b.load_state_dict({**state, "cursor": 11}, "ckpt")


@pytest.mark.parametrize("shuffle", [True, False])
def test_ddp_ranks_together_equal_one_process(shuffle):
    rows, K, B = _rows(9), 5, 2
    one = ChatLoader(rows, B, seed=4, shuffle=shuffle)
    ranks = [ChatLoader(rows, B, rank=r, world_size=2, seed=4, shuffle=shuffle) for r in range(2)]
    for _ in range(K):
        for r in range(2):  # call k on world 2 == calls 2k (rank 0) and 2k+1 (rank 1) on world 1
            got, want = ranks[r].next_batch(), one.next_batch()
            assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert ranks[0].state_dict() == ranks[1].state_dict()


def test_eval_batches_fixed_and_sharded():
    rows = _rows(7)
    assert [_ids(b) for b in eval_batches(rows, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [_ids(b) for b in eval_batches(rows, 2, rank=0, world_size=2)] == [[0, 2], [4, 6]]
    assert [_ids(b) for b in eval_batches(rows, 2, rank=1, world_size=2)] == [[1, 3], [5]]  # smaller, not padded
    with pytest.raises(PoelmError, match="rank must be in"):
        eval_batches(rows, 2, rank=2, world_size=2)


# ---- formats: JSON arrays, Parquet, compressed JSONL, `datasets` folders, hf: SPECs --------------------

# Shapes a table unifies: messages with a system turn and a message with an extra key (struct fields
# unified inside the list), Alpaca with and without `input` (None in a table), ShareGPT, Evol-Instruct
# and Magicoder beside them (every other shape's columns None in their rows).
FORMAT_RECORDS = [
    {"messages": [_s("Be brief."), _u("Hi"), _a("Hello."), _u("Sum 2+2?"), _a("4")], "id": 7},
    {"instruction": "Write a loop.", "input": "n = 3", "output": "for i in range(n): pass"},
    {"instruction": "No input key.", "output": "ok"},
    {"instruction": "Say yes.", "input": "", "output": "yes"},
    {"messages": [{"role": "user", "content": "Who?", "name": "bob"}, _a("Me.")]},
    {"conversations": [{"from": "human", "value": "What is 3*3?"}, {"from": "gpt", "value": "9"}]},
    {"instruction": "Reverse a list.", "response": "xs[::-1]"},
    {"problem": "Square x.", "solution": "x * x", "lang": "python"},
]
FORMAT_MESSAGES = [
    [_s("Be brief."), _u("Hi"), _a("Hello."), _u("Sum 2+2?"), _a("4")],
    [_u("Write a loop.\n\nn = 3"), _a("for i in range(n): pass")],
    [_u("No input key."), _a("ok")],
    [_u("Say yes."), _a("yes")],
    [_u("Who?"), _a("Me.")],
    [_u("What is 3*3?"), _a("9")],
    [_u("Reverse a list."), _a("xs[::-1]")],
    [_u("Square x."), _a("x * x")],
]


def _columns(records) -> dict:
    """Records as table columns: every key of any record, None where a record lacks it (as a table has it)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def _parquet(path, records) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pydict(_columns(records)), str(path), row_group_size=3)  # several row groups
    return str(path)


def _dataset(records):
    import datasets

    return datasets.Dataset.from_dict(_columns(records))


def _jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


class _CountingProgress(sources_module.ByteProgress):
    updates: list[int] = []

    def update(self, n: int) -> None:
        type(self).updates.append(n)
        super().update(n)


def test_every_format_gives_the_same_conversations(tmp_path, monkeypatch):
    import datasets
    import zstandard

    recs, n = FORMAT_RECORDS, len(FORMAT_RECORDS)
    jsonl = _write(tmp_path / "c.jsonl", recs)
    (tmp_path / "c.json").write_text(json.dumps(recs, indent=1))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(recs)))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(recs)))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(_jsonl_bytes(recs)))  # explicit, unknown inner suffix: JSONL
    _dataset(recs).save_to_disk(str(tmp_path / "ds"))
    other = [{"problem": "not train", "solution": "no"}]
    datasets.DatasetDict({"test": _dataset(other), "train": _dataset(recs)}).save_to_disk(str(tmp_path / "dd"))
    paths = {
        "jsonl": (jsonl, [f"{jsonl}:{i + 1}" for i in range(n)]),
        "json": (str(tmp_path / "c.json"), None),
        "parquet": (_parquet(tmp_path / "c.parquet", recs), None),
        "gzip": (str(tmp_path / "c.jsonl.gz"), None),
        "zstd": (str(tmp_path / "c.jsonl.zst"), None),
        "txt.gz": (str(tmp_path / "c.txt.gz"), None),
        "datasets": (str(tmp_path / "ds"), None),
        "DatasetDict": (str(tmp_path / "dd"), None),
    }
    monkeypatch.setattr(sources_module, "ByteProgress", _CountingProgress)
    for kind, (path, wheres) in paths.items():
        rows = kind in ("json", "parquet", "datasets", "DatasetDict")
        wheres = wheres or ([f"{path}[{i}]" for i in range(n)] if rows else [f"{path}:{i + 1}" for i in range(n)])
        _CountingProgress.updates = []
        sources, report = load_conversations([f"{path}:2"], progress=True)
        (source,) = sources
        assert [c.messages for c in source.conversations] == FORMAT_MESSAGES, kind
        assert [c.where for c in source.conversations] == wheres, kind
        assert (source.path, source.epochs, source.files) == (path, 2, [path]), kind
        size = (sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
                if os.path.isdir(path) else os.path.getsize(path))
        assert report.bytes == sum(_CountingProgress.updates) == size, kind  # progress reaches the size on disk
        assert report.files == 1 and report.total_skipped == 0, kind
    monkeypatch.undo()
    # all of them at once, one SPEC each: no input is read twice
    sources, report = load_conversations([p for p, _ in paths.values()], progress=False)
    assert report.conversations == n * len(paths)


def test_table_rows_none_cells_and_sequence_columns():
    import datasets

    # a None cell is a missing key: Alpaca without input; the unknown shape lists only the keys present
    assert sources_module._table_row({"instruction": "I", "input": None, "output": "O", "messages": None}) == \
        {"instruction": "I", "output": "O"}
    # `datasets` stores a Sequence of structs as a dict of lists: back to a list of messages
    features = datasets.Features({"conversations": datasets.Sequence({"from": datasets.Value("string"),
                                                                     "value": datasets.Value("string")})})
    ds = datasets.Dataset.from_dict({"conversations": [{"from": ["human", "gpt"], "value": ["Q", "A"]}]},
                                    features=features)
    row = ds[0]
    assert row == {"conversations": {"from": ["human", "gpt"], "value": ["Q", "A"]}}  # what the library gives
    assert to_messages(sources_module._table_row(row), "x[0]") == [_u("Q"), _a("A")]
    with pytest.raises(PoelmError, match=r"^x\[0\]: field 'conversations' is dict"):  # JSON records stay as they are
        to_messages(row, "x[0]")
    with pytest.raises(PoelmError, match="Alpaca field 'output' is NoneType"):  # a JSON null stays a value
        to_messages({"instruction": "I", "output": None}, "x:1")


def test_bad_rows_name_path_and_row(tmp_path):
    good = {"instruction": "Add 1 and 2.", "output": "3"}
    array = tmp_path / "a.json"
    array.write_text(json.dumps([good, {"text": "t"}, None, good, 3]))
    pq_path = _parquet(tmp_path / "p.parquet", [good, good, {"text": "t"}, {"instruction": "I", "output": " "}, good])
    ds_path = str(tmp_path / "ds")
    _dataset([good, {"instruction": "I", "output": " "}, good]).save_to_disk(ds_path)
    for path, bad in [(str(array), f"{array}[1]: unknown record shape with keys ['text']"),
                      (pq_path, f"{pq_path}[2]: unknown record shape with keys ['text']"),  # None cells dropped
                      (ds_path, f"{ds_path}[1]: message 1: 'assistant' content is blank")]:
        with pytest.raises(PoelmError) as e:
            load_conversations([path], progress=False)
        assert str(e.value).startswith(bad), str(e.value)
    sources, report = load_conversations([str(array), pq_path, ds_path], skip_invalid=True, progress=False)
    assert [[c.where for c in s.conversations] for s in sources] == [
        [f"{array}[0]", f"{array}[3]"], [f"{pq_path}[0]", f"{pq_path}[1]", f"{pq_path}[4]"],
        [f"{ds_path}[0]", f"{ds_path}[2]"]]
    assert report.skipped == {str(array): {"unknown shape": 1, "not an object": 2},
                              pq_path: {"unknown shape": 1, "bad conversation": 1},
                              ds_path: {"bad conversation": 1}}
    assert report.first_error["not an object"].startswith(f"{array}[2]: a JSON NoneType; expected an object")
    assert report.first_error["bad conversation"].startswith(f"{pq_path}[3]: message 1: 'assistant' content is blank")
    only_bad = tmp_path / "bad.json"
    only_bad.write_text(json.dumps([{"text": "t"}]))
    with pytest.raises(PoelmError, match=rf"^{only_bad}: no valid conversations \(1 invalid record"):
        load_conversations([str(only_bad)], skip_invalid=True, progress=False)


def test_json_files_that_are_not_arrays_and_directories_of_every_format(tmp_path):
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps(VALID))
    for content, expected in [(json.dumps(VALID), f"{obj}: a JSON dict; expected a JSON array of records"),
                              ("[1, 2", f"{obj}: not valid JSON"),
                              ("", f"{obj}: empty file (no records); expected a JSON array"),
                              ("[]", f"{obj}: empty file (no records); expected a JSON array")]:
        obj.write_text(content)
        with pytest.raises(PoelmError) as e:
            load_conversations([str(obj)], skip_invalid=True, progress=False)
        assert type(e.value) is PoelmError and "\n" not in str(e.value), str(e.value)
        assert str(e.value).startswith(expected), str(e.value)
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    _write(d / "c.jsonl", [{"problem": "c", "solution": "C"}])
    (d / "a.json").write_text(json.dumps([{"problem": "a1", "solution": "A"}, {"problem": "a2", "solution": "A"}]))
    _parquet(d / "b.parquet", [{"problem": "b", "solution": "B"}])
    (d / "sub" / "e.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes([{"problem": "e", "solution": "E"}])))
    (d / "d.parquet.txt").write_text("not data")
    (d / "README.md").write_text("# card\n")
    sources, report = load_conversations([str(d)], progress=False)
    assert [c.messages[0]["content"] for c in sources[0].conversations] == ["a1", "a2", "b", "c", "e"]
    assert sources[0].files == [str(d / "a.json"), str(d / "b.parquet"), str(d / "c.jsonl"),
                                str(d / "sub" / "e.jsonl.gz")]
    assert report.ignored_files == [str(d / "README.md"), str(d / "d.parquet.txt")] and report.files == 4
    assert "ignored 2 file(s) not .jsonl/.json/.parquet" in report.summary()
    # a `datasets` folder: read twice through two SPECs (by its real path); inside a directory, one input of it
    ds = tmp_path / "ds"
    _dataset([VALID]).save_to_disk(str(ds))
    os.symlink(ds, tmp_path / "ds-link")
    with pytest.raises(PoelmError, match=f"^{tmp_path / 'ds-link'}: read twice"):
        load_conversations([str(ds), f"{tmp_path / 'ds-link'}:2"], progress=False)
    _dataset([{"problem": "s", "solution": "S"}]).save_to_disk(str(d / "sub" / "saved"))
    sources, report = load_conversations([str(d)], progress=False)
    assert [c.messages[0]["content"] for c in sources[0].conversations] == ["a1", "a2", "b", "c", "e", "s"]
    assert sources[0].files[-1] == str(d / "sub" / "saved") and report.files == 5


def test_hf_spec_parsing_and_loading_without_a_network(monkeypatch):
    import datasets

    assert parse_spec("hf:a/b@test:3") == ("hf:a/b@test", 3)
    assert parse_spec("hf:sahil2801/CodeAlpaca-20k") == ("hf:sahil2801/CodeAlpaca-20k", 1)
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name == "owner/missing":
            raise FileNotFoundError("Couldn't find a dataset script\nat owner/missing")
        return _dataset(FORMAT_RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sources, report = load_conversations(["hf:owner/name:2", "hf:owner/name@test"], progress=False)
    assert calls == [("owner/name", "train"), ("owner/name", "test")]
    assert [(s.path, s.epochs, s.files) for s in sources] == [("hf:owner/name", 2, ["hf:owner/name@train"]),
                                                              ("hf:owner/name@test", 1, ["hf:owner/name@test"])]
    assert [c.messages for c in sources[0].conversations] == FORMAT_MESSAGES
    assert [c.where for c in sources[1].conversations] == [f"hf:owner/name@test[{i}]"
                                                           for i in range(len(FORMAT_RECORDS))]
    with pytest.raises(PoelmError, match=r"^hf:owner/name@train: read twice"):
        load_conversations(["hf:owner/name", "hf:owner/name@train:2"], progress=False)
    with pytest.raises(PoelmError) as e:
        load_conversations(["hf:owner/missing"], progress=False)
    assert str(e.value) == ("hf:owner/missing: could not load split 'train' from the Hugging Face Hub "
                            "(FileNotFoundError: Couldn't find a dataset script); without a network only datasets "
                            "already in the cache (~/.cache/huggingface/datasets, or $HF_DATASETS_CACHE) load")
    for bad in ("hf:@train", "hf:a/b@"):
        with pytest.raises(PoelmError, match=rf"^data SPEC '{bad}': expected hf:NAME\[@SPLIT\]"):
            load_conversations([bad], progress=False)
    with pytest.raises(PoelmError, match="^data SPEC 'hf:': nothing after ':'"):
        load_conversations(["hf:"], progress=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(PoelmError, match=r"^hf:owner/name: .*needs the optional extra: pip install 'poelm\[data\]'"):
        load_conversations(["hf:owner/name"], progress=False)


def test_hf_spec_offline_is_one_error_line(tmp_path):
    # `datasets` reads HF_HUB_OFFLINE at import: a fresh interpreter, with an empty cache of its own
    path = _write(tmp_path / "c.jsonl", [VALID])
    script = (
        "import sys\n"
        "from poelm.data.sources import load_conversations\n"
        "from poelm.core.errors import PoelmError\n"
        f"load_conversations([{path!r}], progress=False)\n"
        "print('datasets imported' if 'datasets' in sys.modules else 'datasets not imported')\n"
        "for spec in ['hf:poelm-tests/certainly-not-cached-7f3a:2', 'hf:poelm-tests/certainly-not-cached-7f3a@test']:\n"
        "    try:\n"
        "        load_conversations([spec], progress=False)\n"
        "    except PoelmError as e:\n"
        "        print('ERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "datasets not imported"  # a JSONL SPEC does not import `datasets`
    tail = (r"; without a network only datasets already in the cache \(~/\.cache/huggingface/datasets, or "
            r"\$HF_DATASETS_CACHE\) load")
    assert len(lines) == 3, out.stdout
    for line, split in zip(lines[1:], ["train", "test"]):
        assert re.fullmatch(rf"ERROR hf:poelm-tests/certainly-not-cached-7f3a: could not load split '{split}' from "
                            rf"the Hugging Face Hub \(\w+: [^\n]+\){tail}", line), line

"""Pretraining text: reading documents (poelm.data.documents), the tokenized train/val split (corpus), TokenLoader
and eval_batches (loader).

Loader tests use `np.arange(N)` as the token stream, so a token's value is its stream position and
every row and target can be identified from the batch alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from poelm.data.corpus import TextCorpus, document_hash
from poelm.data.documents import read_documents
from poelm.data.loader import TokenLoader, eval_batches, n_rows
from poelm.core.errors import PoelmError

# ---- reading documents ---------------------------------------------------------------------------


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_documents_from_files_directories_and_jsonl(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub" / "__pycache__").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "b.txt").write_text("bee\n")
    (d / "a.md").write_text("ay ü\n")
    (d / "sub" / "c.py").write_text("print('c')\n")
    (d / "sub" / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # binary: skipped, counted
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: skipped, counted
    (d / "empty.txt").write_text("")  # no document, no error inside a directory
    (d / ".hidden.txt").write_text("hidden")
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / "sub" / "__pycache__" / "c.cpython-311.pyc").write_bytes(b"\x00\x01")
    _jsonl(d / "sub" / "recs.jsonl", [{"text": "r1"}, {"text": ""}, {"text": "r3", "id": 3}])
    single = tmp_path / "single.txt"
    single.write_text("one file, one document")
    top = tmp_path / "top.jsonl"
    top.write_text('{"text": "first"}\n\n{"text": "third line", "meta": {"x": 1}}\n')

    reader = read_documents([str(single), str(d), top])
    docs = list(reader)
    assert [(doc.source, doc.text) for doc in docs] == [
        (str(single), "one file, one document"),
        (str(d / "a.md"), "ay ü\n"),  # a directory's own files in sorted order, then its subdirectories
        (str(d / "b.txt"), "bee\n"),
        (str(d / "sub" / "c.py"), "print('c')\n"),
        (f"{d / 'sub' / 'recs.jsonl'}:1", "r1"),
        (f"{d / 'sub' / 'recs.jsonl'}:3", "r3"),
        (f"{top}:1", "first"),
        (f"{top}:3", "third line"),
    ]
    assert reader.skipped == [str(d / "latin1.txt"), str(d / "sub" / "img.png")]
    assert reader.documents == len(docs)


def test_on_bytes_reaches_the_total(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "b.bin").write_bytes(bytes(range(256)))
    _jsonl(tmp_path / "c.jsonl", [{"text": f"record {i}"} for i in range(10)])
    seen: list[int] = []
    reader = read_documents([tmp_path], on_bytes=seen.append)
    assert len(list(reader)) == 11 and reader.skipped == [str(tmp_path / "b.bin")]
    assert sum(seen) == reader.total_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("nope.txt", None, r"nope.txt: no such file or directory"),
        ("e.txt", b"", r"e.txt: empty file"),
        ("b.bin", b"\xff\xfe\x00", r"b.bin: not UTF-8 text"),
        ("d.jsonl", b'{"text": "ok"}\n\n{"text": broken}\n', r"d.jsonl:3: not valid JSON"),
        ("d.jsonl", b'{"text": "ok"}\n{"content": "x"}\n',
         r"d.jsonl:2: expected an object with a 'text' field, got an object with keys \['content'\]"),
        ("d.jsonl", b'{"text": 5}\n', r"d.jsonl:1: 'text' is a number; expected a string \(or null: no text\)"),
        ("d.jsonl", b'["text"]\n', r"d.jsonl:1: expected an object with a 'text' field, got an array"),
        ("d.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"d.jsonl:2: not UTF-8"),
        ("d.jsonl", b'{"text": "a\\ud800b"}\n', r"d.jsonl:1: 'text' has an unpaired surrogate at character 1"),
    ],
    ids=["missing", "empty", "binary", "bad-json", "no-text", "text-not-str", "not-object", "jsonl-not-utf8",
         "surrogate"],
)
def test_reader_errors_name_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PoelmError, match=expected):
        list(read_documents([str(path)]))
    if content:  # inside a directory malformed JSONL is still an error; binary files are skipped
        (tmp_path / "ok.txt").write_text("fine")
        if name.endswith(".jsonl"):
            with pytest.raises(PoelmError, match=expected):
                list(read_documents([tmp_path]))
        else:
            reader = read_documents([tmp_path])
            assert [d.text for d in reader] == ["fine"] and reader.skipped == [str(path)]


def test_no_documents_lists_the_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.txt").write_text("")
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00\x01")
    recs = _jsonl(tmp_path / "r.jsonl", [{"text": ""}])
    expected = r"no documents in \['[^']*/d', '[^']*/r.jsonl'\] .*skipped 1 non-UTF-8 file\(s\) in input directories"
    with pytest.raises(PoelmError, match=expected):
        list(read_documents([tmp_path / "d", recs]))
    with pytest.raises(PoelmError, match="no input paths given"):
        read_documents([])


def test_tokenizer_training_reads_through_the_same_reader(tmp_path):
    from poelm.data.tokenizer_train import train_tokenizer

    (tmp_path / "e.txt").write_text("")
    with pytest.raises(PoelmError, match=r"e.txt: empty file"):  # the reader's check, before any training
        train_tokenizer([str(tmp_path / "e.txt")], 300, progress=False)


# ---- the tokenized corpus and its split ----------------------------------------------------------


def _docs(n: int) -> list[str]:
    return [f"Document {i}: the value is {i * 37 % 101}, and {'x' * (i % 7)} ends here.\n" for i in range(n)]


def _segments(tokens: np.ndarray, bos: int) -> list[list[int]]:
    """A split's stream cut at each <|bos|>; the stream must start with one."""
    starts = np.flatnonzero(tokens == bos)
    assert len(tokens) == 0 or starts[0] == 0
    return [tokens[a + 1 : b].tolist() for a, b in zip(starts, [*starts[1:], len(tokens)])]


def test_corpus_bos_before_every_document_and_stats(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    texts = _docs(60)
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    c = TextCorpus.build([path], tok, val_fraction=0.2, progress=False)
    assert c.train_tokens.dtype == c.val_tokens.dtype == np.int32 and c.train_tokens.ndim == 1
    val = {t for t in texts if document_hash(t) % 10**6 < 0.2 * 10**6}
    assert 0 < len(val) < len(texts)  # the hash rule alone decides here (no fallback)
    train_texts = [t for t in texts if t not in val]
    val_texts = [t for t in texts if t in val]
    # every document is [bos] + encode(text), in input order, in exactly one split
    assert _segments(c.train_tokens, tok.bos_id) == tok.encode_batch(train_texts)
    assert _segments(c.val_tokens, tok.bos_id) == tok.encode_batch(val_texts)
    assert (c.train.documents, c.val.documents) == (len(train_texts), len(val_texts))
    assert (c.train.tokens, c.val.tokens) == (len(c.train_tokens), len(c.val_tokens))
    assert c.train.bytes == sum(len(t.encode()) for t in train_texts)
    assert c.val.bytes == sum(len(t.encode()) for t in val_texts)
    assert c.bos_id == tok.bos_id and c.skipped == []
    json.dumps(c.stats())


def test_split_is_deterministic_disjoint_complete_and_order_free(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    texts = _docs(40)
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i:02d}.txt").write_text(t)
    files = sorted(str(p) for p in tmp_path.iterdir())

    def split(paths):
        c = TextCorpus.build(paths, tok, val_fraction=0.1, progress=False)
        decode = lambda arr: {tok.decode(s) for s in _segments(arr, tok.bos_id)}
        return decode(c.train_tokens), decode(c.val_tokens), c

    train, val, c = split(files)
    assert val and not (train & val) and train | val == set(texts)
    assert c.train.documents + c.val.documents == len(texts)
    again = split(files)
    assert again[0] == train and again[1] == val
    assert np.array_equal(again[2].train_tokens, c.train_tokens)  # bit-identical rebuild
    reversed_ = split(files[::-1])
    assert reversed_[0] == train and reversed_[1] == val  # follows the text, not the file order
    as_dir = split([str(tmp_path)])
    assert as_dir[1] == val


def test_tiny_corpus_still_holds_out_one_document(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    texts = ["alpha beta\n", "gamma delta\n", "epsilon\n"]
    path = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    c = TextCorpus.build([path], tok, val_fraction=0.0, progress=False)
    assert c.val.documents == 1 and _segments(c.val_tokens, tok.bos_id) == [tok.encode(texts[-1])]  # the last
    assert c.train.documents == 2 and _segments(c.train_tokens, tok.bos_id) == [tok.encode(t) for t in texts[:2]]
    # every document below the threshold: the last one stays for training
    c = TextCorpus.build([path], tok, val_fraction=0.999999, progress=False)
    assert (c.train.documents, c.val.documents) == (1, 2)
    assert _segments(c.train_tokens, tok.bos_id) == [tok.encode(texts[-1])]

    one = _jsonl(tmp_path / "one.jsonl", [{"text": "ab"}])  # <|bos|> + 1-2 tokens: no tail to hold out
    with pytest.raises(PoelmError, match=r"one.jsonl:1: the only document of the inputs, \d tokens: too short to "
                                         r"hold out its last 2 tokens"):
        TextCorpus.build([one], tok, progress=False)
    with pytest.raises(PoelmError, match=r"val_fraction must be a number in \[0, 1\), got 1.5"):
        TextCorpus.build([path], tok, val_fraction=1.5)


def test_corpus_progress_lines(tmp_path, tiny_tokenizer, capsys):
    (tmp_path / "d").mkdir()
    for i, t in enumerate(_docs(8)):
        (tmp_path / "d" / f"{i}.txt").write_text(t)
    (tmp_path / "d" / "z.bin").write_bytes(b"\x00\xff")
    TextCorpus.build([tmp_path / "d"], tiny_tokenizer, progress=False)
    assert capsys.readouterr().err == ""
    c = TextCorpus.build([tmp_path / "d"], tiny_tokenizer)
    err = capsys.readouterr().err.splitlines()  # stderr is not a terminal here: plain lines
    assert 2 <= len(err) <= 6 and err[0].startswith("data: reading")
    assert err[-1] == c.summary() and "skipped 1 non-UTF-8 file(s)" in err[-1]


# ---- TokenLoader ---------------------------------------------------------------------------------


def _row_ids(x: torch.Tensor, T: int) -> list[int]:
    """Which stream row each batch row is (tokens are np.arange, so x[:, 0] = row * T)."""
    return (x[:, 0] // T).tolist()


@pytest.mark.parametrize("N, T", [(101, 10), (100, 10), (11, 10), (2, 5), (37, 1)])
def test_rows_cover_every_target_once_per_epoch(N, T):
    tokens = np.arange(N, dtype=np.int32)
    loader = TokenLoader(tokens, 1, T, seed=3, pad_id=7)
    R = loader.rows_per_epoch
    assert R == n_rows(N, T) == -(-(N - 1) // T)
    xs, ys = zip(*(loader.next_batch() for _ in range(R)))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (R, T)
    targets = y[y >= 0]
    assert sorted(targets.tolist()) == list(range(1, N))  # every token but the first, exactly once
    assert sorted(_row_ids(x, T)) == list(range(R))  # each row once, in a shuffled order
    assert loader.epoch == 1 and loader.cursor == 0
    # inside a row the targets are the inputs shifted by one; padding only at the stream's end
    valid = y >= 0
    assert torch.equal(y[valid], x[valid] + 1)
    n_pad = R * T - (N - 1)
    assert int((~valid).sum()) == n_pad and int((x[~valid] == 7).sum()) == n_pad
    last = x[:, 0] == (R - 1) * T
    assert torch.equal(y[last][0, T - n_pad :], torch.full((n_pad,), -1))
    assert torch.equal(x[last][0, T - n_pad :], torch.full((n_pad,), 7))


def test_long_stream_is_continued_not_cut():
    # one "document" of 25 tokens with T=8: 24 targets fill rows 0..2 exactly, each continuing the last
    tokens = np.arange(25, dtype=np.int32)
    x, y = next(iter(eval_batches(tokens, 4, 8, pad_id=0)))
    assert x.shape == (3, 8)
    assert x.flatten().tolist() == list(range(24)) and y.flatten().tolist() == list(range(1, 25))
    # one token more: a fourth row holds the last target, padded after it
    x, y = next(iter(eval_batches(np.arange(26, dtype=np.int32), 4, 8, pad_id=0)))
    assert y[3].tolist() == [25] + [-1] * 7 and x[3].tolist() == [24] + [0] * 7


def test_shuffle_is_seeded_and_reproducible():
    tokens = np.arange(1001, dtype=np.int32)
    T, R = 10, 100

    def rows(seed, shuffle=True, calls=25, B=8):
        loader = TokenLoader(tokens, B, T, seed=seed, shuffle=shuffle, pad_id=0)
        return [r for _ in range(calls) for r in _row_ids(loader.next_batch()[0], T)]

    a = rows(5)
    assert a == rows(5) and a != rows(6)
    expected = [torch.randperm(R, generator=torch.Generator().manual_seed(5 + e)).tolist() for e in range(2)]
    assert a == (expected[0] + expected[1])[:200]  # epoch e's order is seeded with seed + e
    assert a[:R] != a[R : 2 * R]  # a new order every epoch
    assert rows(5, shuffle=False) == list(range(R)) + list(range(R))


def test_batches_straddle_epochs():
    tokens = np.arange(71, dtype=np.int32)  # R = 7 rows of T = 10
    loader = TokenLoader(tokens, 3, 10, shuffle=False, pad_id=0)
    got = [_row_ids(loader.next_batch()[0], 10) for _ in range(5)]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 3, 4], [5, 6, 0]]
    assert (loader.epoch, loader.cursor) == (2, 1)
    # a batch larger than an epoch spans several
    big = TokenLoader(np.arange(31, dtype=np.int32), 7, 10, shuffle=False, pad_id=0)
    assert _row_ids(big.next_batch()[0], 10) == [0, 1, 2, 0, 1, 2, 0] and (big.epoch, big.cursor) == (2, 1)


@pytest.mark.parametrize("skip", [3, 10, 12])  # 12 * 3 rows = 36 of 41 per epoch: the next 5 cross epochs
def test_state_dict_resumes_at_the_exact_position(skip):
    tokens = np.arange(405, dtype=np.int32)  # R = 41 rows of T = 10 (the last one is short)
    make = lambda: TokenLoader(tokens, 3, 10, seed=11, pad_id=0)
    a = make()
    for _ in range(skip):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    expected = [a.next_batch() for _ in range(5)]
    b = make()
    b.load_state_dict(state, "ckpt/meta.json")
    got = [b.next_batch() for _ in range(5)]
    for (xa, ya), (xb, yb) in zip(expected, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.state_dict() == a.state_dict()
    if skip == 12:
        assert state["epoch"] == 0 and a.epoch == 1


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(batch_size=4), "batch_size=3 but this run has batch_size=4"),
        (dict(seq_len=20), "seq_len=10 but this run has seq_len=20"),
        (dict(world_size=2), "world_size=1 but this run has world_size=2"),
        (dict(tokens=np.arange(501, dtype=np.int32)), "rows_per_epoch=41 but this run has rows_per_epoch=50"),
        (dict(seed=1), "seed=11 but this run has seed=1"),
    ],
)
def test_load_state_dict_checks_the_settings(change, expected):
    args = dict(tokens=np.arange(405, dtype=np.int32), batch_size=3, seq_len=10, world_size=1, seed=11)
    state = TokenLoader(**args, pad_id=0).state_dict()
    other = TokenLoader(**{**args, **change}, pad_id=0)
    with pytest.raises(PoelmError, match=f"ckpt/loader.json: data loader state has {expected}"):
        other.load_state_dict(state, "ckpt/loader.json")


def test_load_state_dict_checks_the_position():
    loader = TokenLoader(np.arange(405, dtype=np.int32), 3, 10, pad_id=0)
    with pytest.raises(PoelmError, match=r"ck.json: data loader state 'cursor' is 41; expected an int >= 0 and < 41"):
        loader.load_state_dict({**loader.state_dict(), "cursor": 41}, "ck.json")
    with pytest.raises(PoelmError, match=r"ck.json: data loader state lacks 'seq_len'"):
        loader.load_state_dict({"epoch": 0, "cursor": 0, "rows_per_epoch": 41, "batch_size": 3}, "ck.json")


@pytest.mark.parametrize("shuffle", [True, False])
def test_ddp_ranks_together_equal_one_process(shuffle):
    tokens = np.arange(231, dtype=np.int32)  # R = 23 rows of T = 10: 6 calls of 2 x 2 rows cross an epoch
    B, K, T = 2, 9, 10
    one = TokenLoader(tokens, B, T, seed=4, shuffle=shuffle, pad_id=0)
    ranks = [TokenLoader(tokens, B, T, rank=r, world_size=2, seed=4, shuffle=shuffle, pad_id=0) for r in range(2)]
    single = [one.next_batch() for _ in range(2 * K)]  # gradient accumulation: 2 micro-batches a step
    for k in range(K):
        (x0, y0), (x1, y1) = ranks[0].next_batch(), ranks[1].next_batch()
        assert torch.equal(torch.cat([x0, x1]), torch.cat([single[2 * k][0], single[2 * k + 1][0]]))
        assert torch.equal(torch.cat([y0, y1]), torch.cat([single[2 * k][1], single[2 * k + 1][1]]))
    assert ranks[0].state_dict() == ranks[1].state_dict()  # one shared position
    assert (ranks[0].epoch, ranks[0].cursor) == (one.epoch, one.cursor) == divmod(2 * K * B, 23)


def test_loader_argument_checks():
    with pytest.raises(PoelmError, match="rank must be in"):
        TokenLoader(np.arange(10), 1, 4, rank=2, world_size=2, pad_id=0)
    with pytest.raises(PoelmError, match="TokenLoader: expected a 1-D integer token array of at least 2 tokens"):
        TokenLoader(np.arange(1), 1, 4, pad_id=0)
    with pytest.raises(PoelmError, match="batch_size must be an int >= 1"):
        TokenLoader(np.arange(10), 0, 4, pad_id=0)
    with pytest.raises(PoelmError, match="eval_batches: expected a 1-D integer"):
        eval_batches(np.zeros((2, 3), dtype=np.int32), 1, 4)


# ---- eval_batches --------------------------------------------------------------------------------


def test_eval_batches_fixed_and_sharded():
    tokens = np.arange(95, dtype=np.int32)  # 10 rows of T = 10, the last one short
    T = 10
    rows = lambda **kw: [r for x, _ in eval_batches(tokens, 3, T, **kw) for r in _row_ids(x, T)]
    assert rows() == list(range(10)) == rows()  # in order, the same every time
    shards = [rows(rank=r, world_size=3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert rows(max_rows=7) == list(range(7))
    assert [rows(max_rows=7, rank=r, world_size=2) for r in range(2)] == [[0, 2, 4, 6], [1, 3, 5]]
    batches = list(eval_batches(tokens, 3, T, pad_id=9))
    assert [tuple(x.shape) for x, _ in batches] == [(3, T)] * 3 + [(1, T)]
    x, y = batches[-1]
    assert x[0].tolist() == list(range(90, 94)) + [9] * 6 and y[0].tolist() == list(range(91, 95)) + [-1] * 6
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys[ys >= 0].tolist()) == list(range(1, 95))


def test_one_document_holds_out_the_tail_of_its_tokens(tmp_path, tiny_tokenizer):
    """A one-file corpus (the most common small corpus) trains on its head and holds out its last
    max(2, ceil(val_fraction * N)) tokens; the two streams are the document's tokens, cut once."""
    import math

    tok = tiny_tokenizer
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200))
    (tmp_path / "book.txt").write_text(text)
    c = TextCorpus.build([tmp_path / "book.txt"], tok, val_fraction=0.05, progress=False)
    tokens = [tok.bos_id] + tok.encode(text)
    k = max(2, math.ceil(0.05 * len(tokens)))
    assert c.tail_tokens == k and len(c.val_tokens) == k
    assert np.array_equal(np.concatenate([c.train_tokens, c.val_tokens]), np.array(tokens))
    assert "val is the last" in c.summary() and c.split() == {"val_fraction": 0.05, "by": "tail", "tail_tokens": k}

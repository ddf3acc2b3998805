"""Pretraining text from every input format (records.py under text.read_documents): each format gives
exactly the documents of its JSONL equivalent, with the same sources' kind of names, progress that
reaches the bytes on disk, resumable positions, and one-line errors naming file and row."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from poelm.core.errors import PoelmError
from poelm.data.records import classify, records
from poelm.data.documents import read_documents

TEXTS = ["def f(x):\n    return x\n", "", "héllo wörld ✓\n" * 3, "class A:\n    pass\n", "x = 1\n" * 50,
         "# the last one\n"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def rows():
    return [{"text": t, "id": i} for i, t in enumerate(TEXTS)]


def _docs(paths, **kw):
    reader = read_documents(paths, **kw)
    return [d.text for d in reader], reader


def test_every_format_gives_the_documents_of_its_jsonl(tmp_path, rows):
    import datasets

    expected = [t for t in TEXTS if t]
    jsonl = _jsonl(tmp_path / "a.jsonl", rows)
    assert _docs([jsonl])[0] == expected
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl.read_bytes()))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.read_bytes()))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)  # several row groups
    pq.write_table(table.rename_columns(["content", "id"]), tmp_path / "b.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    for name in ("a.json", "a.jsonl.gz", "a.jsonl.zst", "a.parquet", "ds", "dd"):
        got, reader = _docs([tmp_path / name])
        assert got == expected, name
        seen = []
        reader2 = read_documents([tmp_path / name], on_bytes=seen.append)
        list(reader2)
        assert sum(seen) == reader2.total_bytes > 0, name  # progress reaches the bytes on disk
    assert _docs([tmp_path / "b.parquet"], text_column="content")[0] == expected
    sources = [d.source for d in read_documents([tmp_path / "a.parquet"])]
    assert sources == [f"{tmp_path / 'a.parquet'}[{i}]" for i, t in enumerate(TEXTS) if t]


def test_text_files_compressed_and_in_directories(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.py").write_text("print(1)\n")
    (d / "b.py.gz").write_bytes(gzip.compress(b"print(2)\n"))
    (d / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"print(3)\n"))
    (d / "d.jsonl").write_text('{"text": "print(4)\\n"}\n')
    (d / "package.json").write_text('{"name": "x"}')  # inside a directory a .json file is text
    pq.write_table(pa.table({"text": ["print(5)\n", None]}), d / "e.parquet")  # a null cell: no document
    (d / "f.gz").write_bytes(b"not gzip at all")  # does not decompress: skipped like a binary file
    got, reader = _docs([d])
    assert got == ["print(1)\n", "print(2)\n", "print(3)\n", "print(4)\n", "print(5)\n", '{"name": "x"}']
    assert reader.skipped == [str(d / "f.gz")]
    assert (reader.null_texts, reader.first_null) == (1, f"{d / 'e.parquet'}[1]")  # counted, not dropped silently
    with pytest.raises(PoelmError, match=r"f.gz: cannot read the gzip stream"):
        list(read_documents([d / "f.gz"]))


@pytest.mark.parametrize("name, write, message", [
    ("m.parquet", lambda p: pq.write_table(pa.table({"body": ["a", "b"]}), p),
     r"m.parquet: no column 'text'; it has \['body'\] \(choose one with --text-column\)"),
    ("n.parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p),
     r"n.parquet\[0\]: column 'text' holds int; expected strings"),
    ("o.json", lambda p: p.write_text('{"text": "not an array"}'), r"o.json: a JSON dict; expected a JSON array"),
    ("p.json", lambda p: p.write_text('[{"text": "ok"}, {"body": "x"}]'),
     r"p.json\[1\]: expected an object with a 'text' field, got an object with keys \['body'\]"),
    ("q.jsonl.gz", lambda p: p.write_bytes(gzip.compress(b'{"text": "ok"}\n' * 100)[:-20]),
     r"q.jsonl.gz: cannot read the gzip stream"),
    ("r.parquet", lambda p: p.write_bytes(b"PAR1 but not really"), r"r.parquet: not a readable Parquet file"),
    ("s.jsonl", lambda p: p.write_text('{"text": "ok"}\n{"text": \n'), r"s.jsonl:2: not valid JSON"),
    ("t.jsonl", lambda p: p.write_text('{"text": "ok"}\n\nnull\n'),
     r"t.jsonl:3: expected an object with a 'text' field, got null"),
    ("u.json", lambda p: p.write_text('{"text": "a"}\n{"text": "b"}\n'), r"u.json: not valid JSON .*name it .jsonl"),
    ("v.jsonl", lambda p: p.write_text('{"text": "ok"}\n\ufeff{"text": "b"}\n'), r"v.jsonl:2: not valid JSON"),
])
def test_format_errors_name_file_and_row(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(PoelmError, match=message) as e:
        list(read_documents([tmp_path / name]))
    assert "\n" not in str(e.value)


def test_missing_datasets_extra_is_named(tmp_path, monkeypatch):
    import sys

    import datasets

    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(PoelmError, match=r"needs the optional extra: pip install 'poelm\[data\]'"):
        list(read_documents([tmp_path / "ds"]))


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.json", "a.parquet"])
def test_start_skips_records_without_changing_the_rest(tmp_path, rows, name):
    """A resumed reader (start=(file, index)) yields exactly the documents after that point, and the
    bytes it reports still add up to the total."""
    jsonl = _jsonl(tmp_path / "a.jsonl", rows)
    if name == "a.jsonl.gz":
        (tmp_path / name).write_bytes(gzip.compress(jsonl.read_bytes()))
    elif name == "a.json":
        (tmp_path / name).write_text(json.dumps(rows))
    elif name == "a.parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / name, row_group_size=2)
    (tmp_path / "z.txt").write_text("after\n")
    paths = [tmp_path / name, tmp_path / "z.txt"]
    full = list(read_documents(paths))
    for k, doc in enumerate(full):
        seen = []
        reader = read_documents(paths, on_bytes=seen.append)
        reader.start = (doc.file, doc.index)
        assert [d.text for d in reader] == [d.text for d in full[k:]]
        assert sum(seen) == reader.total_bytes


def test_records_report_bytes_and_positions(tmp_path, rows):
    f = classify(str(_jsonl(tmp_path / "a.jsonl", rows)), explicit=True)
    recs = list(records(f))
    assert [r.index for r in recs] == list(range(len(rows)))
    assert [r.where for r in recs] == [f"{f.path}:{i + 1}" for i in range(len(rows))]
    assert sum(r.nbytes for r in recs) == f.size


def test_null_texts_are_one_rule_in_every_format(tmp_path):
    """A null text is no document and is counted, whether it is a Parquet null cell, a JSONL or JSON-array
    `{"text": null}` or a `datasets` null; every non-null text before and after it is read."""
    import datasets

    texts = ["a\n", None, "b\n", None, None, "c\n"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "t.json").write_text(json.dumps([{"text": t} for t in texts]))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    for name, first in (("t.parquet", "t.parquet[1]"), ("t.jsonl", "t.jsonl:2"), ("t.json", "t.json[1]"),
                        ("ds", "ds[1]")):
        got, reader = _docs([tmp_path / name])
        assert got == ["a\n", "b\n", "c\n"], name
        assert (reader.null_texts, reader.first_null) == (3, str(tmp_path / first)), name
    (tmp_path / "only-null.jsonl").write_text('{"text": null}\n' * 3)
    with pytest.raises(PoelmError, match=r"no documents .*skipped 3 record\(s\) whose text is null"):
        list(read_documents([tmp_path / "only-null.jsonl"]))

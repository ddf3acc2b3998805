"""Tokenized data folders (data/shards.py): `poelm data tokenize` and `pretrain --data DATADIR`.

The sharded stream is the in-memory stream (same split, same rows, same order, on one and two
processes); a tokenize interrupted anywhere resumes to byte-identical shards; every way a folder can
be wrong is one line naming the file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from poelm.app.cli import main
from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.core.tokenizer import Tokenizer
from poelm.data.shards import INDEX, PROGRESS, ShardedTokens, ShardWriter, TokenFolder, token_dtype, tokenize
from poelm.data.corpus import TextCorpus
from poelm.data.loader import TokenLoader, eval_batches
from poelm.train.pretrain import PretrainArgs, pretrain

from conftest import tiny_corpus_text

SHAPE = dict(n_layer=3, n_head=2, n_kv_head=1, n_embd=64, sequence_len=64, poe_stage_layers=[2, 1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~60 KB in 40 documents of three kinds: text files in a directory, JSONL records, one Parquet file;
    4 records among them have a null text (no document, counted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    lines = tiny_corpus_text().splitlines(keepends=True)
    docs = ["".join(lines[i * 37 : (i + 1) * 37]) for i in range(40)]
    (d / "files").mkdir()
    for i in range(14):
        (d / "files" / f"doc{i:02d}.txt").write_text(docs[i], encoding="utf-8")
    records = [t for i, doc in enumerate(docs[14:30]) for t in ([doc, None] if i % 5 == 2 else [doc])]  # 3 nulls
    (d / "records.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records), encoding="utf-8")
    pq.write_table(pa.table({"text": docs[30:35] + [None] + docs[35:]}), d / "table.parquet", row_group_size=3)
    return [str(d / "files"), str(d / "records.jsonl"), str(d / "table.parquet")]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_stream_is_the_in_memory_stream(tmp_path, tiny_tokenizer, corpus, workers):
    """Same tokens per split, same statistics, and the loaders give the same batches in the same order on
    one process and on each rank of two, across an epoch boundary; eval batches too."""
    tok = tiny_tokenizer
    mem = TextCorpus.build(corpus, tok, val_fraction=0.1, progress=False)
    index = tokenize(corpus, tok, tmp_path / "data", workers=workers, shard_tokens=997, val_fraction=0.1,
                     progress=False)
    folder = TokenFolder(tmp_path / "data")
    assert len(index["train"]["shards"]) > 10  # documents straddle many shard boundaries
    assert index["dtype"] == "uint16" and folder.train_tokens.dtype == np.uint16
    assert np.array_equal(np.asarray(folder.train_tokens), mem.train_tokens)
    assert np.array_equal(np.asarray(folder.val_tokens), mem.val_tokens)
    assert (folder.train, folder.val) == (mem.train, mem.val) and mem.val.documents >= 2
    assert sum(s["documents"] for s in index["train"]["shards"]) == mem.train.documents
    assert index["null_texts"] == mem.null_texts == folder.null_texts == 4 and folder.stats()["null_texts"] == 4
    for world in (1, 2):
        for rank in range(world):
            a = TokenLoader(mem.train_tokens, 3, 32, rank=rank, world_size=world, seed=5, pad_id=tok.bos_id)
            b = TokenLoader(folder.train_tokens, 3, 32, rank=rank, world_size=world, seed=5, pad_id=tok.bos_id)
            for _ in range(a.rows_per_epoch // (3 * world) + 3):  # into the second epoch
                (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert a.state_dict() == b.state_dict() and b.epoch == 1
        ea = list(eval_batches(mem.val_tokens, 4, 32, rank=0, world_size=world, pad_id=tok.bos_id))
        eb = list(eval_batches(folder.val_tokens, 4, 32, rank=0, world_size=world, pad_id=tok.bos_id))
        assert len(ea) == len(eb) > 0 and all(torch.equal(p, q) for a, b in zip(ea, eb) for p, q in zip(a, b))
    # the shards are plain safetensors files the library reads
    first = tmp_path / "data" / index["train"]["shards"][0]["file"]
    assert np.array_equal(load_file(str(first))["tokens"], mem.train_tokens[:997])


def test_workers_do_not_change_the_folder(tmp_path, tiny_tokenizer, corpus):
    tokenize(corpus, tiny_tokenizer, tmp_path / "one", workers=1, shard_tokens=1500, progress=False)
    tokenize(corpus, tiny_tokenizer, tmp_path / "two", workers=2, shard_tokens=1500, progress=False)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")


def test_tiny_corpus_fallback_is_the_same_in_both_paths(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("aa bb", "cc dd", "ee")))
    for fraction in (0.0, 0.999999):
        mem = TextCorpus.build([tmp_path / "t.jsonl"], tok, val_fraction=fraction, progress=False)
        tokenize([str(tmp_path / "t.jsonl")], tok, tmp_path / "d", shard_tokens=4, val_fraction=fraction,
                 progress=False, workers=0, overwrite=True)
        folder = TokenFolder(tmp_path / "d")
        assert np.array_equal(np.asarray(folder.val_tokens), mem.val_tokens)
        assert np.array_equal(np.asarray(folder.train_tokens), mem.train_tokens)
        assert min(mem.train.documents, mem.val.documents) >= 1


@pytest.mark.parametrize("stop_after", [1, 4])
def test_interrupted_tokenize_resumes_byte_identical(tmp_path, tiny_tokenizer, corpus, stop_after):
    tok = tiny_tokenizer
    tokenize(corpus, tok, tmp_path / "ref", workers=0, shard_tokens=800, progress=False)
    with pytest.raises(KeyboardInterrupt):
        tokenize(corpus, tok, tmp_path / "out", workers=0, shard_tokens=800, progress=False,
                 _stop_after_checkpoints=stop_after)
    partial = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists() and (partial / PROGRESS).is_file()
    state = json.loads((partial / PROGRESS).read_text())
    assert sum(len(s["shards"]) for s in state["splits"].values()) >= stop_after
    tokenize(corpus, tok, tmp_path / "out", workers=2, shard_tokens=800, progress=False)
    assert files_of(tmp_path / "ref") == files_of(tmp_path / "out")
    assert not partial.exists()


def test_sigkilled_tokenize_resumes_byte_identical(tmp_path, tiny_tokenizer_dir, capsys):
    """A SIGKILL at an arbitrary moment (mid-shard, mid-write) loses nothing already checkpointed: the
    same command again (in this process; only the killed run needs processes of its own) continues
    and writes the folder an uninterrupted run writes."""
    lines = tiny_corpus_text().splitlines(keepends=True)
    # ~1.6 MB, 400 documents, ~150 shards: the kill lands after the 11th, with ~140 (over a second) to go.
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as f:
        for k in range(100):
            for i in range(4):
                f.write(json.dumps({"text": f"# part {k}.{i}\n" + "".join(lines[i * 300 : i * 300 + 100])}) + "\n")
    command = ["data", "tokenize", "--tokenizer", str(tiny_tokenizer_dir), "--input", str(tmp_path / "big.jsonl"),
               "--shard-tokens", "3000"]
    victim = subprocess.Popen([sys.executable, "-m", "poelm", *command, "--workers", "1", "--out",
                               str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    progress = tmp_path / "out.partial" / PROGRESS
    deadline = time.time() + 120
    while victim.poll() is None and time.time() < deadline:
        try:
            if json.loads(progress.read_text())["splits"]["train"]["shards"][10:]:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.005)
    os.killpg(victim.pid, signal.SIGKILL)  # the main process and its workers
    victim.wait()
    assert not (tmp_path / "out").exists(), "the run finished before it was killed"
    capsys.readouterr()
    assert main([*command, "--workers", "1", "--out", str(tmp_path / "out")]) == 0
    assert "continuing" in capsys.readouterr().err
    # The uninterrupted reference without workers (the folder does not depend on them:
    # test_workers_do_not_change_the_folder).
    assert main([*command, "--workers", "0", "--out", str(tmp_path / "ref")]) == 0
    assert files_of(tmp_path / "ref") == files_of(tmp_path / "out")


def test_resume_refuses_other_settings(tmp_path, tiny_tokenizer, corpus):
    tok = tiny_tokenizer
    with pytest.raises(KeyboardInterrupt):
        tokenize(corpus, tok, tmp_path / "out", workers=0, shard_tokens=800, progress=False,
                 _stop_after_checkpoints=1)
    with pytest.raises(PoelmError, match=r"out.partial: an interrupted tokenize with other settings is here \(it "
                                         r"had shard_tokens=800, this run 900\)"):
        tokenize(corpus, tok, tmp_path / "out", workers=0, shard_tokens=900, progress=False)
    Path(corpus[1]).touch()  # an input changed since
    try:
        with pytest.raises(PoelmError, match=r"the inputs changed since"):
            tokenize(corpus, tok, tmp_path / "out", workers=0, shard_tokens=800, progress=False)
    finally:
        pass


def test_uint32_when_the_vocabulary_does_not_fit_16_bits(tmp_path, tiny_tokenizer):
    ranks = dict(tiny_tokenizer.mergeable_ranks)
    n = len(ranks)
    for i in range(66000 - n):
        ranks[b"\xff" + (n + i).to_bytes(3, "big")] = n + i
    big = Tokenizer(ranks)
    assert token_dtype(big.vocab_size) == "uint32" and big.bos_id > 65535
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 5}) + "\n" for i in range(30)))
    mem = TextCorpus.build([tmp_path / "a.jsonl"], big, val_fraction=0.2, progress=False)
    tokenize([str(tmp_path / "a.jsonl")], big, tmp_path / "d", workers=0, shard_tokens=50, val_fraction=0.2,
             progress=False)
    folder = TokenFolder(tmp_path / "d")
    assert folder.train_tokens.dtype == np.uint32
    assert np.array_equal(np.asarray(folder.train_tokens), mem.train_tokens)
    assert int(np.asarray(folder.train_tokens)[0]) == big.bos_id


def test_sharded_slices_across_shard_boundaries(tmp_path):
    w = ShardWriter(tmp_path, "train", "uint16", 7)
    data = np.arange(50, dtype=np.int32)
    for a, b in ((0, 3), (3, 20), (20, 21), (21, 50)):
        w.add(data[a:b])
    w.close()
    shards = [{"file": f"train-{k:05d}.safetensors", "tokens": min(7, 50 - 7 * k)} for k in range(8)]
    s = ShardedTokens(tmp_path, shards, "uint16")
    assert len(s) == 50 and [sh["documents"] for sh in w.shards] == [2, 0, 1, 1, 0, 0, 0, 0]
    for a in range(0, 51, 3):
        for b in range(a, 51, 5):
            assert np.array_equal(s[a:b], data[a:b])


# ---- pretrain --data DATADIR --------------------------------------------------------------------


def _args(tmp_path, tokenizer_dir, data, name, **changes):
    base = dict(data=[str(d) for d in data], out=str(tmp_path / name), tokenizer=str(tokenizer_dir),
                config=PoEConfig(vocab_size=512, **SHAPE), steps=5, device_batch_size=4, eval_every=5,
                eval_tokens=512, seq_len=32, sample_tokens=0, device="cpu", total_batch_tokens=8 * 32)
    base.update(changes)
    return PretrainArgs(**base)


def _weights(run_dir):
    from safetensors.torch import load_file as load_torch

    return load_torch(str(Path(run_dir) / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_tokenizer_dir, corpus):
    out = tmp_path_factory.mktemp("tokenized") / "data"
    assert main(["data", "tokenize", "--tokenizer", str(tiny_tokenizer_dir), "--input", *corpus, "--out", str(out),
                 "--shard-tokens", "1000", "--val-fraction", "0.1", "--workers", "1"]) == 0
    return out


def test_pretrain_from_a_folder_equals_raw_inputs(tmp_path, tiny_tokenizer_dir, corpus, data_dir):
    """One process: pretraining from the folder ends bit for bit where pretraining from the raw inputs
    ends (the same rows in the same order). On two processes: the slow variant below; what it composes
    is checked fast by test_folder_stream_is_the_in_memory_stream (each rank of two reads the same
    batches from the folder as from the inputs) and test_pretrain.py::test_two_processes_equal_one
    (torchrun's two replicas end where one process ends)."""
    raw = pretrain(_args(tmp_path, tiny_tokenizer_dir, corpus, "raw", val_fraction=0.1))
    sharded = pretrain(_args(tmp_path, tiny_tokenizer_dir, [data_dir], "sharded"))
    a, b = _weights(tmp_path / "raw"), _weights(tmp_path / "sharded")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same rows in the same order
    assert raw["val_bpb"] == sharded["val_bpb"]
    run = json.loads((tmp_path / "sharded" / "run.json").read_text())
    assert run["data"] == [str(data_dir)]


@pytest.mark.slow
def test_pretrain_from_a_folder_on_two_processes_equals_raw_inputs_on_one(tmp_path, tiny_tokenizer_dir, corpus,
                                                                          data_dir):
    """torchrun's two replicas, each memory-mapping the folder, end where one process pretraining from
    the raw inputs ends (slow: a launcher and two fresh interpreters; the fast test above and the two
    it names cover its parts)."""
    pretrain(_args(tmp_path, tiny_tokenizer_dir, corpus, "raw", val_fraction=0.1))
    a = _weights(tmp_path / "raw")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["pretrain", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "3", "--n-embd", "64", "--n-head", "2",
            "--n-kv-head", "1", "--seq-len", "32", "--poe-stage-layers", "2,1", "--data", str(data_dir),
            "--out", str(tmp_path / "two"), "--device-batch-size", "4", "--eval-every", "5", "--eval-tokens", "512",
            "--sample-tokens", "0", "--device", "cpu", "--steps", "5", "--total-batch-tokens", str(8 * 32)]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "poelm", *argv], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 data replica(s) x 1 accumulation" in r.stderr and "memory-mapped" in r.stderr
    c = _weights(tmp_path / "two")
    assert a.keys() == c.keys()
    for k in a:
        assert (a[k] - c[k]).abs().max() <= 1e-4, k


def test_folder_loader_state_is_a_few_integers(tmp_path, tiny_tokenizer_dir, data_dir):
    folder = TokenFolder(data_dir)
    loader = TokenLoader(folder.train_tokens, 4, 32, seed=1, pad_id=folder.bos_id)
    loader.next_batch()
    state = loader.state_dict()
    assert all(isinstance(v, (int, bool)) for v in state.values()) and len(state) <= 8


# ---- one-line errors ----------------------------------------------------------------------------


def one_line_error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("poelm: ")]
    assert code == 2 and len(err) == 1 and err[0].startswith("poelm: error: "), err
    return err[0]


def _pretrain_argv(tokenizer_dir, data, out):
    return ["pretrain", "--tokenizer", tokenizer_dir, "--depth", "3", "--n-embd", "64", "--n-head", "2",
            "--n-kv-head", "1", "--seq-len", "32", "--poe-stage-layers", "2,1", "--data", data, "--out", out,
            "--steps", "1", "--device", "cpu", "--sample-tokens", "0"]


def test_parquet_without_the_column_is_one_line(tmp_path, capsys, tiny_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a b c", "d e f"]}), tmp_path / "t.parquet")
    err = one_line_error(capsys, "data", "tokenize", "--tokenizer", tiny_tokenizer_dir, "--input",
                         tmp_path / "t.parquet", "--out", tmp_path / "d", "--workers", "0")
    assert "t.parquet: no column 'text'; it has ['content'] (choose one with --text-column)" in err
    assert not (tmp_path / "d").exists()
    assert main(["data", "tokenize", "--tokenizer", str(tiny_tokenizer_dir), "--input", str(tmp_path / "t.parquet"),
                 "--out", str(tmp_path / "d"), "--workers", "0", "--text-column", "content"]) == 0


def test_truncated_or_corrupted_shard_is_one_line(tmp_path, capsys, tiny_tokenizer_dir, data_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    shard = bad / "train-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    err = one_line_error(capsys, *_pretrain_argv(tiny_tokenizer_dir, bad, tmp_path / "run"))
    assert f"{shard}: " in err and "bytes" in err and "(truncated?)" in err
    assert not (tmp_path / "run" / "final").exists()
    # same size, flipped bytes: caught by the digest the first time the shard is read
    shutil.rmtree(bad)
    shutil.copytree(data_dir, bad)
    data = bytearray(shard.read_bytes())
    data[-16 * 1 - 7] ^= 0xFF  # a token (the last 16 bytes are the one block's digest)
    shard.write_bytes(bytes(data))
    folder = TokenFolder(bad)  # opening checks sizes only: start-up does not read the corpus
    with pytest.raises(PoelmError, match=r"train-00002.safetensors: tokens 0..[0-9,]+ do not match their stored "
                                         r"digest \(corrupted\)"):
        np.asarray(folder.train_tokens)


def test_folder_of_another_tokenizer_is_one_line(tmp_path, capsys, tiny_tokenizer, data_dir):
    from poelm.models.directory import save_tokenizer_dir

    ranks = dict(tiny_tokenizer.mergeable_ranks)
    last = max(ranks, key=ranks.get)
    ranks[b"\xfe\xfe"] = ranks.pop(last)  # one merge differs
    other = save_tokenizer_dir(Tokenizer(ranks), tmp_path / "other", overwrite=True)
    err = one_line_error(capsys, *_pretrain_argv(other, data_dir, tmp_path / "run"))
    assert f"{data_dir / INDEX}: tokenized with tokenizer" in err and "tokenize the data again" in err
    assert not (tmp_path / "run").exists() or not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("extra, message", [
    (["--val-fraction", "0.3"], "--val-fraction 0.3: {d} was split with 0.1 when it was tokenized"),
    (["--data", "{c}"], "a tokenized data folder must be the only --data path"),
])
def test_folder_misuse_is_one_line(tmp_path, capsys, tiny_tokenizer_dir, data_dir, corpus, extra, message):
    argv = _pretrain_argv(tiny_tokenizer_dir, data_dir, tmp_path / "run")
    if extra[0] == "--data":
        argv[argv.index("--data") + 1 : argv.index("--data") + 2] = [str(data_dir), corpus[1]]
    else:
        argv += extra
    err = one_line_error(capsys, *argv)
    assert message.format(d=data_dir, c=corpus[1]) in err


def test_tokenize_refuses_overlapping_or_existing_output(tmp_path, capsys, tiny_tokenizer_dir, corpus):
    err = one_line_error(capsys, "data", "tokenize", "--tokenizer", tiny_tokenizer_dir, "--input", corpus[0],
                         "--out", Path(corpus[0]) / "tokens")
    assert "the output lies inside the input" in err
    (tmp_path / "exists").mkdir()
    err = one_line_error(capsys, "data", "tokenize", "--tokenizer", tiny_tokenizer_dir, "--input", corpus[1],
                         "--out", tmp_path / "exists")
    assert "already exists" in err
    for flag, value in (("--workers", "-1"), ("--shard-tokens", "1"), ("--val-fraction", "1.0")):
        err = one_line_error(capsys, "data", "tokenize", "--tokenizer", tiny_tokenizer_dir, "--input", corpus[1],
                             "--out", tmp_path / "x", flag, value)
        assert f"{flag} {value}" in err or f"{flag} {float(value)}" in err


def test_folders_are_not_read_as_text(tmp_path, capsys, tiny_tokenizer, tiny_tokenizer_dir, data_dir, corpus):
    """A data folder given where text is expected, an unfinished one given to pretrain, and a corpus
    directory that merely holds an index.json are each told apart."""
    from poelm.data.shards import is_token_folder
    from poelm.data.documents import read_documents

    with pytest.raises(PoelmError, match=r"a tokenized data folder; `poelm pretrain --data` reads it"):
        read_documents([data_dir])
    with pytest.raises(KeyboardInterrupt):
        tokenize(corpus, tiny_tokenizer, tmp_path / "t", workers=0, shard_tokens=800, progress=False,
                 _stop_after_checkpoints=1)
    err = one_line_error(capsys, *_pretrain_argv(tiny_tokenizer_dir, tmp_path / "t.partial", tmp_path / "run"))
    assert "an unfinished `poelm data tokenize`" in err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "index.json").write_text('{"pages": [1, 2]}')
    (tmp_path / "plain" / "a.txt").write_text("some text")
    assert not is_token_folder(tmp_path / "plain") and is_token_folder(data_dir)
    assert [d.text for d in read_documents([tmp_path / "plain"])] == ["some text", '{"pages": [1, 2]}']


def test_blocks_are_verified_where_a_slice_touches_them(tmp_path, monkeypatch):
    """Each block's digest is checked when a slice first touches it: a corrupted block is named, the
    blocks around it still read, and a shard written with another block size is refused."""
    import poelm.data.shards as shards

    monkeypatch.setattr(shards, "BLOCK_TOKENS", 4)
    w = ShardWriter(tmp_path, "train", "uint16", 30)
    data = np.arange(30, dtype=np.int32) + 1000
    w.add(data)
    w.close()
    path = tmp_path / "train-00000.safetensors"
    assert load_file(str(path))["block_xxh3"].shape == (8, 16)  # 30 tokens in blocks of 4
    raw = bytearray(path.read_bytes())
    offset = len(shards.shard_header("uint16", 30, "train", 0))
    raw[offset + 2 * 9] ^= 0x01  # token 9: block 2
    path.write_bytes(bytes(raw))
    s = ShardedTokens(tmp_path, [{"file": path.name, "tokens": 30}], "uint16")
    assert np.array_equal(s[0:8], data[0:8]) and np.array_equal(s[12:30], data[12:30])
    with pytest.raises(PoelmError, match=r"train-00000.safetensors: tokens 8..12 do not match their stored digest"):
        s[7:9]
    monkeypatch.setattr(shards, "BLOCK_TOKENS", 8)
    with pytest.raises(PoelmError, match=r"header is not the one .* describes \(30 uint16 tokens in blocks of 8\)"):
        ShardedTokens(tmp_path, [{"file": path.name, "tokens": 30}], "uint16")[0:1]


def test_a_one_file_corpus_pretrains_with_a_tail_hold_out(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, capsys):
    """One text file: the folder holds the same head/tail streams as the in-memory path, and a pretrain
    from the file says so in its log and records it in run.json."""
    (tmp_path / "book.txt").write_text(tiny_corpus_text(), encoding="utf-8")
    mem = TextCorpus.build([tmp_path / "book.txt"], tiny_tokenizer, val_fraction=0.05, progress=False)
    index = tokenize([str(tmp_path / "book.txt")], tiny_tokenizer, tmp_path / "d", workers=0, shard_tokens=5000,
                     val_fraction=0.05, progress=False)
    folder = TokenFolder(tmp_path / "d")
    assert index["split"]["tail_tokens"] == folder.tail_tokens == mem.tail_tokens == len(mem.val_tokens) > 2
    assert np.array_equal(np.asarray(folder.val_tokens), mem.val_tokens)
    assert np.array_equal(np.asarray(folder.train_tokens), mem.train_tokens)
    pretrain(_args(tmp_path, tiny_tokenizer_dir, [tmp_path / "book.txt"], "run", val_fraction=0.05, steps=2))
    assert "val is the last" in capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data_split"] == {"val_fraction": 0.05, "by": "tail", "tail_tokens": mem.tail_tokens}
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    resumed = pretrain(_args(tmp_path, tiny_tokenizer_dir, [tmp_path / "book.txt"], "run", val_fraction=0.05,
                             steps=2, resume=True))  # run.json's data_split does not stand in a resume's way
    assert resumed["steps"] == 2

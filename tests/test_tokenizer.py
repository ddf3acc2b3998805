"""Tokenizer: special ids, encode/decode, streaming, files, training inputs, nanochat import, HF class."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import warnings

import pytest
import tiktoken
import torch

from poelm.core.errors import PoelmError
from poelm.core.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, TOKEN_BYTES_FILE, TOKENIZER_FILE, StreamDecoder, Tokenizer
from poelm.models.directory import shipped_code_files
from poelm.models.convert_nanochat import load_nanochat_tokenizer
from poelm.data.embedded import stdlib_corpus
from poelm.data.tokenizer_train import train_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]
MIXED = "naïve café — 日本語 данные 😀👍🏽 \t\r\n  x=3.14159; y = 1234567890 + 007\n<|bos|><|assistant_end|>"


def _stdlib_text(*names: str) -> str:
    return "".join(open(os.path.join(STDLIB, n), encoding="utf-8").read() for n in names)


# ---- special ids ------------------------------------------------------------------------------------


def test_special_ids_follow_the_merges(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.vocab_size == 512 and tok.n_merges == 503
    assert tok.bos_id == tok.vocab_size - 9 == 503
    assert list(tok.special_ids) == list(SPECIAL_TOKENS)
    assert list(tok.special_ids.values()) == list(range(503, 512))
    assert tok.token_id("<|assistant_start|>") == tok.token_id("assistant_start") == 506
    with pytest.raises(PoelmError, match="unknown special token 'eos'"):
        tok.token_id("eos")


def test_vocab_32768_puts_bos_at_32759():
    # The seed's quick start hard-codes BOS, USR_S, USR_E, ASS_S = 32759..32762.
    ranks = {bytes([b]): b for b in range(256)}
    pairs = ((a, b) for a in range(256) for b in range(256))
    while len(ranks) < 32768 - 9:
        ranks[bytes(next(pairs))] = len(ranks)
    tok = Tokenizer(ranks)
    assert tok.vocab_size == 32768
    assert [tok.token_id(n) for n in ("bos", "user_start", "user_end", "assistant_start")] == [32759, 32760, 32761, 32762]
    assert tok.token_id("output_end") == 32767


def test_bad_ranks_are_refused():
    with pytest.raises(PoelmError, match="byte 0x00 is not a token"):
        Tokenizer({bytes([b]): b - 1 for b in range(1, 257) if b < 256} | {b"ab": 255})
    with pytest.raises(PoelmError, match="ranks must be the integers 0..256"):
        Tokenizer({bytes([b]): b for b in range(256)} | {b"ab": 300})
    with pytest.raises(PoelmError, match="pattern: not a valid split regex"):
        Tokenizer({bytes([b]): b for b in range(256)}, pattern="(unclosed")


# ---- encode / decode ---------------------------------------------------------------------------------


def test_round_trip_stdlib_source(tiny_tokenizer):
    text = _stdlib_text("json/decoder.py", "textwrap.py", "string.py")
    ids = tiny_tokenizer.encode(text)
    assert len(ids) < len(text.encode())  # it does compress
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.encode_batch([text, MIXED]) == [ids, tiny_tokenizer.encode(MIXED)]


def test_round_trip_mixed_and_literal_specials_are_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode(MIXED)
    assert tiny_tokenizer.decode(ids) == MIXED
    assert not set(ids) & set(tiny_tokenizer.special_ids.values())  # "<|bos|>" in text is plain text
    assert tiny_tokenizer.encode("") == [] and tiny_tokenizer.decode([]) == ""
    with pytest.raises(PoelmError, match="encode: expected str, got bytes"):
        tiny_tokenizer.encode(b"hi")


@pytest.mark.parametrize("text", ["3.14159 1234567890 007", "-0.5e-10, 1,000,000 and 99999999999999999999", "v1.2.3 0x1F 00"])
def test_numbers_round_trip_in_groups_of_at_most_two_digits(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    for i in ids:
        piece = tiny_tokenizer.decode([i])
        assert sum(c.isdigit() for c in piece) <= 2, piece


@pytest.mark.parametrize(
    "convert",
    [
        lambda ids: ids,
        tuple,
        lambda ids: np.array(ids, dtype=np.int64),
        lambda ids: np.array(ids, dtype=np.int32),
        lambda ids: [np.int64(i) for i in ids],
        lambda ids: torch.tensor(ids, dtype=torch.int64),
        lambda ids: torch.tensor(ids, dtype=torch.int32),
        lambda ids: torch.tensor(ids, dtype=torch.int16),
    ],
    ids=["list", "tuple", "np.int64", "np.int32", "list-of-np", "torch.int64", "torch.int32", "torch.int16"],
)
def test_decode_accepts_arrays_and_tensors(tiny_tokenizer, convert):
    ids = tiny_tokenizer.encode(MIXED) + [tiny_tokenizer.bos_id]
    assert tiny_tokenizer.decode(convert(ids)) == MIXED + "<|bos|>"


def test_decode_small_dtypes_and_scalars(tiny_tokenizer):
    ids = [i for i in tiny_tokenizer.encode("Hello, world!") if i < 128]  # fits int8
    text = tiny_tokenizer.decode(ids)
    assert tiny_tokenizer.decode(torch.tensor(ids, dtype=torch.int8)) == text
    assert tiny_tokenizer.decode(torch.tensor(ids, dtype=torch.uint8)) == text
    assert tiny_tokenizer.decode(torch.tensor(65)) == "A"  # 0-d tensor
    assert tiny_tokenizer.decode(np.int16(65)) == "A"
    assert tiny_tokenizer.decode(65) == "A"
    assert tiny_tokenizer.decode(torch.tensor(tiny_tokenizer.bos_id)) == "<|bos|>"


def test_decode_never_fails_on_out_of_range_and_partial_utf8(tiny_tokenizer):
    tok = tiny_tokenizer
    hi = tok.encode("hi")
    # ids >= vocab_size (embedding padding rows) and negatives decode to U+FFFD
    assert tok.decode(hi + [tok.vocab_size, 10**12, -1] + hi) == "hi\ufffd\ufffd\ufffdhi"
    assert tok.decode(torch.tensor(hi + [600])) == "hi\ufffd"
    emoji = tok.encode("😀")
    assert len(emoji) >= 2  # the tiny vocab spells it in byte tokens
    assert tok.decode(emoji[:-1]) == b"\xf0\x9f\x98".decode("utf-8", "replace") == "\ufffd"
    assert tok.decode(emoji[:-1] + tok.encode("ok")) == "\ufffdok"
    assert tok.decode(emoji[:-1] + [tok.vocab_size] + emoji[-1:]) == "\ufffd\ufffd\ufffd"


def test_decode_refuses_non_integers(tiny_tokenizer):
    with pytest.raises(PoelmError, match="expected an integer token id"):
        tiny_tokenizer.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(PoelmError, match="nested sequence"):
        tiny_tokenizer.decode(torch.tensor([[1, 2]]))
    with pytest.raises(PoelmError, match="got str"):
        tiny_tokenizer.decode("abc")


def test_token_bytes(tiny_tokenizer):
    tok = tiny_tokenizer
    tb = tok.token_bytes
    assert len(tb) == tok.vocab_size
    assert tb[tok.n_merges :] == [0] * 9 and min(tb[: tok.n_merges]) >= 1
    ids = tok.encode(MIXED)
    assert sum(tb[i] for i in ids) == len(MIXED.encode("utf-8"))


# ---- streaming -----------------------------------------------------------------------------------


def test_stream_decoder_emits_whole_characters_only(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "Größe 日本語 😀👍🏽 done"
    ids = tok.encode(text) + [tok.token_id("assistant_end")]
    sd = StreamDecoder(tok)
    pieces = [sd.push(i) for i in ids]
    tail = sd.flush()
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + tail == tok.decode(ids) == text + "<|assistant_end|>"
    assert tail == ""
    assert any(p == "" for p in pieces)  # multi-byte characters were held back at some point


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_stream_decoder_matches_decode_on_broken_input(tiny_tokenizer, cut):
    tok = tiny_tokenizer
    emoji = tok.encode("😀")
    ids = tok.encode("a") + emoji[:cut] + tok.encode("b") + emoji[:cut] + [tok.vocab_size + 5] + emoji + emoji[:cut]
    sd = tok.stream_decoder()
    out = "".join(sd.push(torch.tensor(i)) for i in ids) + sd.flush()
    assert out == tok.decode(ids)


# ---- files ---------------------------------------------------------------------------------------


def test_save_load_round_trip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["digests.json", TOKENIZER_FILE, TOKEN_BYTES_FILE]
    assert "tokenizer.json" not in os.listdir(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.mergeable_ranks == tiny_tokenizer.mergeable_ranks
    assert back.special_ids == tiny_tokenizer.special_ids and back.pattern == SPLIT_PATTERN
    assert back.encode(MIXED) == tiny_tokenizer.encode(MIXED)
    doc = json.loads((tmp_path / TOKENIZER_FILE).read_text())
    assert doc["format_version"] == 1 and doc["vocab_size"] == 512
    assert doc["mergeable_ranks"][65] == [base64.b64encode(b"A").decode(), 65]
    assert json.loads((tmp_path / TOKEN_BYTES_FILE).read_text())["token_bytes"] == tiny_tokenizer.token_bytes


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _swap_rank(doc):
    doc["mergeable_ranks"][300][1] = 999


def _dup_rank(doc):
    doc["mergeable_ranks"][300][1] = 299


@pytest.mark.parametrize(
    "file, damage, expected",
    [
        (TOKENIZER_FILE, lambda p: p.unlink(), "poelm_tokenizer.json: missing"),
        (TOKENIZER_FILE, lambda p: p.write_text('{"format": "poelm-tokenizer",\n oops}'), r"not valid JSON \(line 2"),
        (TOKENIZER_FILE, lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d.update(format="other")), "field 'format' is 'other'"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d.pop("format")), "field 'format' is missing"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d.update(format_version=2)), "field 'format_version' is 2"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d.pop("pattern")), "field 'pattern' is missing"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d.update(pattern=5)), "field 'pattern' must be str"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d.update(pattern="(")), "not a valid split regex"),
        (TOKENIZER_FILE, lambda p: _edit(p, _swap_rank), r"field 'mergeable_ranks'.*rank 999; ranks must be the integers 0..502"),
        (TOKENIZER_FILE, lambda p: _edit(p, _dup_rank), r"field 'mergeable_ranks': rank 299 is used twice"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d["mergeable_ranks"].pop()), "field 'special_tokens': '<|bos|>' has id 503, expected 502"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d["mergeable_ranks"][3].__setitem__(0, "@@")), "entry 3: '@@' is not valid base64"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d["mergeable_ranks"].__setitem__(3, "AA==")), r"entry 3: expected \[base64 string, rank\]"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d["special_tokens"].update({"<|user_end|>": 504})), "'<|user_end|>' has id 504, expected 505"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d["special_tokens"].update({"<|eot|>": 512})), r"unexpected entries \['<\|eot\|>'\]"),
        (TOKENIZER_FILE, lambda p: _edit(p, lambda d: d.update(vocab_size=1000)), "field 'vocab_size' is 1000"),
        (TOKEN_BYTES_FILE, lambda p: p.unlink(), "token_bytes.json: missing"),
        (TOKEN_BYTES_FILE, lambda p: p.write_text("{"), "token_bytes.json: not valid JSON"),
        (TOKEN_BYTES_FILE, lambda p: _edit(p, lambda d: d.pop("token_bytes")), "field 'token_bytes' is missing"),
        (TOKEN_BYTES_FILE, lambda p: _edit(p, lambda d: d.update(format="x")), "field 'format' is 'x'"),
        (TOKEN_BYTES_FILE, lambda p: _edit(p, lambda d: d.update(format_version="1")), "field 'format_version' must be int"),
        (TOKEN_BYTES_FILE, lambda p: _edit(p, lambda d: d["token_bytes"].pop()), "field 'token_bytes' has 511 entries; expected 512"),
        (TOKEN_BYTES_FILE, lambda p: _edit(p, lambda d: d["token_bytes"].__setitem__(7, 5)), "field 'token_bytes' entry 7 is 5; the ranks give 1"),
    ],
)
def test_load_errors_name_file_and_field(tiny_tokenizer, tmp_path, file, damage, expected):
    """With digests the damage is named by its digest; without (a directory of an older poelm), by the
    reader's own check of the field."""
    tiny_tokenizer.save(tmp_path)
    damage(tmp_path / file)
    with pytest.raises(PoelmError, match=f"{file}: (content does not match digests.json|missing)"):
        Tokenizer.load(tmp_path)
    (tmp_path / "digests.json").unlink()
    with pytest.raises(PoelmError, match=expected) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the directory now has no digests: said in a warning
        Tokenizer.load(tmp_path)
    assert file in str(err.value)


def test_load_missing_directory(tmp_path):
    with pytest.raises(PoelmError, match="poelm_tokenizer.json: missing"):
        Tokenizer.load(tmp_path / "nope")


# ---- training inputs -----------------------------------------------------------------------------


def _text_lines(n: int) -> str:
    return "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(n))


def test_train_vocab_size_checks(tmp_path):
    (tmp_path / "a.txt").write_text(_text_lines(50))
    with pytest.raises(PoelmError, match="vocab_size must be an int > 265"):
        train_tokenizer([str(tmp_path / "a.txt")], 265)
    with pytest.raises(PoelmError, match="yields only .* merges; vocab_size 5000 needs 4735"):
        train_tokenizer([str(tmp_path / "a.txt")], 5000, progress=False)


def test_train_missing_path_and_explicit_binary(tmp_path):
    with pytest.raises(PoelmError, match="nope.txt: no such file or directory"):
        train_tokenizer([str(tmp_path / "nope.txt")], 300)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    with pytest.raises(PoelmError, match="blob.bin: not UTF-8 text"):
        train_tokenizer([str(tmp_path / "blob.bin")], 300, progress=False)


def test_train_directory_skips_binaries_and_hidden(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text(_text_lines(100))
    (tmp_path / "sub" / "b.py").write_text(_text_lines(100))
    (tmp_path / "sub" / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    tok = train_tokenizer([str(tmp_path)], 300, progress=False)
    assert tok.vocab_size == 300 and tok.bos_id == 291
    err = capsys.readouterr().err
    assert "skipped 2 non-UTF-8 file(s)" in err
    assert err.count("\n") == 1  # progress=False: only the skip notice


def test_train_progress_plain_lines_when_not_a_tty(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(_text_lines(100))
    train_tokenizer([str(tmp_path / "a.txt")], 300)
    err = capsys.readouterr().err.splitlines()
    assert 2 <= len(err) <= 6 and err[-1].startswith("tokenizer: trained vocab 300")


def test_train_jsonl(tmp_path):
    rows = [{"text": line, "id": i} for i, line in enumerate(_text_lines(200).splitlines(keepends=True))]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    tok = train_tokenizer([str(path)], 320, progress=False)
    text = "".join(r["text"] for r in rows)
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text) / 2  # it learned the records' text, not the JSON


@pytest.mark.parametrize(
    "lines, expected",
    [
        (['{"text": "ok"}', '{"text": "fine"}', '{"text": broken}'], r"data.jsonl:3: not valid JSON"),
        (['{"text": "ok"}', '{"content": "x"}'],
         r"data.jsonl:2: expected an object with a 'text' field, got an object with keys \['content'\]"),
        (['{"text": 5}'], r"data.jsonl:1: 'text' is a number; expected a string"),
        (['["text"]'], r"data.jsonl:1: expected an object with a 'text' field, got an array"),
    ],
)
def test_train_jsonl_errors_name_file_and_line(tmp_path, lines, expected):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PoelmError, match=expected):
        train_tokenizer([str(path)], 300, progress=False)


def test_stdlib_corpus_is_deterministic_and_sized():
    paths = stdlib_corpus(200_000)
    assert paths == stdlib_corpus(200_000) and paths == sorted(paths)
    total = sum(os.path.getsize(p) for p in paths)
    assert 200_000 <= total < 200_000 + max(os.path.getsize(p) for p in paths) + 1
    assert all(p.endswith(".py") and "site-packages" not in p for p in paths)


# ---- nanochat import -----------------------------------------------------------------------------


def _nanochat_encoding(tok: Tokenizer, specials: dict[str, int] | None = None) -> tiktoken.Encoding:
    # What nanochat's RustBPETokenizer builds and pickles as tokenizer.pkl.
    n = tok.n_merges
    return tiktoken.Encoding(
        name="rustbpe",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=tok.mergeable_ranks,
        special_tokens=specials or {t: n + i for i, t in enumerate(SPECIAL_TOKENS)},
    )


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_nanochat_pickle_loads(tiny_tokenizer, tmp_path, protocol):
    enc = _nanochat_encoding(tiny_tokenizer)
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc, protocol=protocol))
    tok = load_nanochat_tokenizer(tmp_path)  # the directory form
    assert tok.special_ids == tiny_tokenizer.special_ids
    assert tok.mergeable_ranks == tiny_tokenizer.mergeable_ranks
    assert tok.encode(MIXED) == enc.encode_ordinary(MIXED)
    ids = [tok.bos_id] + tok.encode(MIXED)
    assert tok.decode(ids) == enc.decode(ids)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PoelmError, match=r"tokenizer.pkl: refused to load global '(posix|os|nt)\.system'"):
        load_nanochat_tokenizer(path)
    assert not marker.exists()


def test_pickle_of_other_objects_refused(tmp_path):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(PoelmError, match="holds dict; expected a tiktoken Encoding"):
        load_nanochat_tokenizer(path)
    path.write_bytes(pickle.dumps(tiktoken.Encoding)[:-3])
    with pytest.raises(PoelmError, match="tokenizer.pkl"):
        load_nanochat_tokenizer(path)
    with pytest.raises(PoelmError, match="file not found"):
        load_nanochat_tokenizer(tmp_path / "missing.pkl")


def test_registered_encoding_by_name_refused(tiny_tokenizer, tmp_path, monkeypatch):
    # tiktoken pickles a registered encoding as just its name; unpickling would fetch it from the net.
    enc = _nanochat_encoding(tiny_tokenizer)
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "rustbpe", enc)
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(enc))
    with pytest.raises(PoelmError, match="registered encoding 'rustbpe' by name"):
        load_nanochat_tokenizer(path)


def test_nanochat_specials_in_another_order_refused(tiny_tokenizer, tmp_path):
    n = tiny_tokenizer.n_merges
    specials = {t: n + i for i, t in enumerate(reversed(SPECIAL_TOKENS))}
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(_nanochat_encoding(tiny_tokenizer, specials)))
    with pytest.raises(PoelmError, match=r"tokenizer.pkl: special tokens are .*right after the 503 merges"):
        load_nanochat_tokenizer(path)


# ---- Hugging Face remote code, in a fresh process -------------------------------------------------

HF_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoTokenizer
    d, texts, ids, messages, greeting, out = sys.argv[1], *map(json.loads, sys.argv[2:6]), sys.argv[6]
    t = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    res = {
        "class": type(t).__name__,
        "encode": [t.encode(s) for s in texts],
        "call": t(texts[0])["input_ids"], "mask": t(texts[0])["attention_mask"],
        "literal": t("<|bos|><|user_start|>hi")["input_ids"],
        "decode_list": t.decode(ids), "decode_tensor": t.decode(torch.tensor(ids)),
        "decode_skip": t.decode(torch.tensor(ids), skip_special_tokens=True),
        "batch": t.batch_decode(torch.tensor([ids[:3], ids[-3:]])),
        "chat": t.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False),
        "chat_text": t.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        "greeting": t.apply_chat_template(greeting, add_generation_prompt=True, tokenize=True, return_dict=False),
        "special": [t.bos_token_id, t.eos_token_id, t.pad_token_id, len(t)],
    }
    try:
        t.apply_chat_template([{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}],
                              tokenize=False)
        res["order_error"] = None
    except Exception as e:
        res["order_error"] = str(e)
    t.save_pretrained(out)
    t2 = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    res["resaved"] = [t2.encode(s) for s in texts]
    print(json.dumps(res))
    """
)


def test_hf_auto_tokenizer_fresh_process(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    tok = tiny_tokenizer
    assert {p.name for p in shipped_code_files()} <= set(os.listdir(tiny_tokenizer_dir))
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_poelm.PoelmTokenizer", None]}
    texts = [_stdlib_text("textwrap.py")[:3000], MIXED.replace("<|bos|><|assistant_end|>", ""), "3.14159 1234567890 007"]
    ids = tok.encode(MIXED[:40]) + [tok.bos_id, tok.vocab_size + 3] + tok.encode("😀")[:2] + tok.encode(" end")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3.14159 * 2?"},
    ]
    greeting = [  # an app's greeting first (OpenAI-style clients send it); the system text joins the user turn
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Hello! Ask me anything."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, str(tiny_tokenizer_dir), json.dumps(texts), json.dumps(ids),
         json.dumps(messages), json.dumps(greeting), str(tmp_path / "resaved")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["class"] == "PoelmTokenizer"
    assert res["encode"] == [tok.encode(s) for s in texts] == res["resaved"]
    assert res["call"] == tok.encode(texts[0]) and res["mask"] == [1] * len(res["call"])
    assert res["literal"] == [tok.bos_id, tok.token_id("user_start")] + tok.encode("hi")
    assert res["decode_list"] == res["decode_tensor"] == tok.decode(ids)
    specials = set(tok.special_ids.values())
    assert res["decode_skip"] == tok.decode([i for i in ids if i not in specials])
    assert res["batch"] == [tok.decode(ids[:3]), tok.decode(ids[-3:])]
    assert res["chat"] == tok.render_prompt(messages)
    assert res["chat_text"].startswith("<|bos|><|user_start|>Be brief.\n\nWhat is 2+2?<|user_end|>")
    assert res["greeting"] == tok.render_prompt(greeting)
    assert res["order_error"] == "message 1: expected role 'user' after 'assistant', got 'assistant'"
    assert res["special"] == [tok.bos_id, tok.token_id("assistant_end"), tok.token_id("assistant_end"), 512]


def test_stdlib_5mb_at_the_seed_vocabulary(tmp_path):
    """Done-when 3 of the foundation issue, through the CLI: ~5 MB of stdlib source, vocab 32768."""
    import subprocess
    import sys

    paths = stdlib_corpus(5_000_000)
    assert 4_900_000 <= sum(os.path.getsize(p) for p in paths) <= 5_500_000
    r = subprocess.run([sys.executable, "-m", "poelm", "tokenizer", "train", "--input", *paths,
                        "--vocab-size", "32768", "--out", str(tmp_path / "tok")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.bos_id == 32759 and tok.token_id("<|assistant_start|>") == 32762
    assert tok.special_ids["<|user_start|>"] == 32760 and tok.special_ids["<|user_end|>"] == 32761
    text = "".join(open(p, encoding="utf-8").read() for p in paths)
    assert tok.decode(tok.encode(text)) == text

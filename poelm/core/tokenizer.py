"""The runtime tokenizer: byte-level BPE over tiktoken (nanochat's split pattern), special tokens that
text can never forge, decoding that never fails, and chat rendering with loss masks (`chat_turns`, the
one copy of the chat rules). Ships as remote code: standard library, tiktoken and its siblings only
(docs/model.md §4, §9.4).
"""

from __future__ import annotations

import base64
import codecs
import json
import os
from typing import Any, Iterable, Sequence

import tiktoken
import xxhash

from .files import TOKEN_BYTES_FILE, TOKENIZER_FILE, read_json, read_manifest, record_files, warn_unverified, write_text
from .errors import PoelmError

# nanochat's pre-tokenization regex (GPT-4's, with numbers in groups of 1-2 digits).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Order matters: ids are n_merges + index (docs/model.md §4).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

FORMAT_NAME = "poelm-tokenizer"
TOKEN_BYTES_FORMAT_NAME = "poelm-token-bytes"
FORMAT_VERSION = 1

REPLACEMENT = "\ufffd"


def _check_ranks(ranks: Any, where: str) -> None:
    """Raise PoelmError unless `ranks` is a byte-level BPE table: bytes -> 0..N-1, all 256 bytes."""
    if not isinstance(ranks, dict) or not ranks:
        raise PoelmError(f"{where}: expected a non-empty dict of token bytes -> rank")
    n = len(ranks)
    seen = bytearray(n)
    for token, rank in ranks.items():
        if not isinstance(token, bytes) or not token:
            raise PoelmError(f"{where}: token {token!r} is not a non-empty bytes object")
        if type(rank) is not int or not 0 <= rank < n:
            raise PoelmError(
                f"{where}: token {token!r} has rank {rank!r}; ranks must be the integers 0..{n - 1} "
                f"(one per token, no gaps)"
            )
        if seen[rank]:
            raise PoelmError(f"{where}: rank {rank} is used twice; ranks must be 0..{n - 1} without repeats")
        seen[rank] = 1
    # Byte-level BPE must be able to spell any byte string, so every single byte is a token.
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise PoelmError(
            f"{where}: byte 0x{missing[0]:02x} is not a token ({len(missing)} single bytes missing); "
            f"a byte-level BPE needs all 256 single bytes"
        )


def _show(value: Any, limit: int = 80) -> str:
    """A bounded one-line repr of a bad value for an error message (numpy/torch reprs span lines)."""
    text = " ".join(line.strip() for line in repr(value).splitlines())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_ids(ids: Any) -> list[int]:
    """Normalise a model's output (list, tuple, numpy array/scalar, torch tensor, int) to list[int]."""
    if hasattr(ids, "tolist"):  # numpy arrays and scalars, torch tensors (0-d gives a plain int)
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise PoelmError(f"decode: expected a sequence of integer token ids, got {type(ids).__name__}")
    out = []
    for i, x in enumerate(ids):
        if hasattr(x, "tolist"):  # numpy integer scalars inside a Python list
            x = x.tolist()
        if not isinstance(x, int):
            kind = "a nested sequence (decode one sequence at a time)" if isinstance(x, (list, tuple)) else _show(x)
            raise PoelmError(f"decode: element {i} is {kind}; expected an integer token id")
        out.append(x)
    return out


def chat_turns(messages: Any) -> list[tuple[str, str]]:
    """Check a conversation by the chat rules; return its (role, text) turns with the system merged in.

    `messages` is a list (or tuple) of dicts with a 'role' and a str 'content' (other keys ignored):
    an optional 'system' message first, then 'user' and 'assistant' turns alternating, beginning with
    either (an assistant turn first is an app's greeting). The system text is merged into the first
    user turn as system + blank line + user (nanochat's convention), also when an assistant turn comes
    before that, so a system message needs a user message after it. Raises PoelmError naming the
    first bad message by index ("conversation:" for a non-list or an empty one).
    """
    if not isinstance(messages, (list, tuple)):
        raise PoelmError(f"conversation: expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise PoelmError("conversation: no messages; expected at least one 'user' message")
    turns: list[tuple[str, str]] = []
    system: str | None = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PoelmError(f"message {i}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m or "content" not in m:
            raise PoelmError(f"message {i}: expected keys 'role' and 'content', got {_show(sorted(m, key=repr))}")
        role, content = m["role"], m["content"]
        if not isinstance(content, str):
            raise PoelmError(f"message {i}: 'content' must be a str, got {type(content).__name__}")
        if not isinstance(role, str) or role not in ("system", "user", "assistant"):
            raise PoelmError(f"message {i}: unknown role {_show(role)}; expected 'user' or 'assistant'")
        if role == "system":
            if i != 0:
                raise PoelmError(f"message {i}: role 'system' is only allowed as the first message")
            system = content
            continue
        if turns and role == turns[-1][0]:
            expected = "user" if role == "assistant" else "assistant"
            raise PoelmError(f"message {i}: expected role {expected!r} after {role!r}, got {role!r}")
        if role == "user" and system is not None:  # nanochat's convention: system text + blank line + user text
            content, system = system + "\n\n" + content, None
        turns.append((role, content))
    if system is not None:
        raise PoelmError("message 0: a 'system' message must be followed by a 'user' message")
    return turns


class Tokenizer:
    """Byte-level BPE (tiktoken) plus the nine poelm special tokens right after the merges."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, name: str = "poelm"):
        _check_ranks(mergeable_ranks, "mergeable_ranks")
        if not isinstance(pattern, str) or not pattern:
            raise PoelmError(f"pattern: expected a non-empty regex string, got {pattern!r}")
        self._ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.name = name
        self._fingerprint: str | None = None
        n = len(self._ranks)
        self._special_ids = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        try:
            self._enc = tiktoken.Encoding(
                name, pat_str=pattern, mergeable_ranks=self._ranks, special_tokens=self._special_ids
            )
        except ValueError as e:  # tiktoken reports a bad regex as ValueError
            raise PoelmError(f"pattern: not a valid split regex ({e})") from None
        # id -> bytes for the slow decode paths; specials decode to their literal text.
        self._id_bytes: list[bytes] = [b""] * (n + len(SPECIAL_TOKENS))
        for token, rank in self._ranks.items():
            self._id_bytes[rank] = token
        for tok, i in self._special_ids.items():
            self._id_bytes[i] = tok.encode("utf-8")

    # ---- vocabulary -----------------------------------------------------------------------------

    @property
    def n_merges(self) -> int:
        """Number of BPE tokens (256 single bytes + learned merges); specials start at this id."""
        return len(self._ranks)

    @property
    def vocab_size(self) -> int:
        """BPE tokens + 9 specials: the number of embedding rows a model needs (at least)."""
        return len(self._ranks) + len(SPECIAL_TOKENS)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._ranks)

    @property
    def special_ids(self) -> dict[str, int]:
        """Special token string -> id, in SPECIAL_TOKENS order."""
        return dict(self._special_ids)

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|bos|>"]

    @property
    def fingerprint(self) -> str:
        """What the ids mean, as one digest: xxh3-128 of the split pattern, every (token bytes, rank)
        and the specials. Equal for two tokenizers exactly when they encode every text alike (the
        name is left out); a tokenized data folder records it and pretraining checks it."""
        if self._fingerprint is None:
            h = xxhash.xxh3_128()
            h.update(json.dumps([self.pattern, self._special_ids]).encode("utf-8"))
            for token, rank in sorted(self._ranks.items(), key=lambda kv: kv[1]):
                h.update(len(token).to_bytes(2, "little") + token + rank.to_bytes(4, "little"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def token_id(self, name: str) -> int:
        """Id of a special token, by full name ("<|assistant_end|>") or short name ("assistant_end")."""
        full = name if name.startswith("<|") else f"<|{name}|>"
        if full not in self._special_ids:
            raise PoelmError(f"token_id: unknown special token {name!r}; expected one of {list(SPECIAL_TOKENS)}")
        return self._special_ids[full]

    @property
    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of every id (specials count 0): the denominator of bits-per-byte."""
        n = self.n_merges
        return [len(b) if i < n else 0 for i, b in enumerate(self._id_bytes)]

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes one id decodes to (a special's literal text; b"" outside the vocabulary)."""
        return self._id_bytes[token_id] if 0 <= token_id < len(self._id_bytes) else b""

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added and none recognised (literal "<|bos|>" is text)."""
        if not isinstance(text, str):
            raise PoelmError(f"encode: expected str, got {type(text).__name__}")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` over many texts, in parallel threads inside tiktoken."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise PoelmError(f"encode_batch: element {i} is {type(t).__name__}, expected str")
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Any) -> str:
        """Ids -> text. Never fails on model output: partial UTF-8 and ids outside
        [0, vocab_size) become U+FFFD; specials become their literal strings."""
        if hasattr(ids, "tolist"):  # numpy / torch: one conversion to Python ints, 0-d gives an int
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if isinstance(ids, (list, tuple)):
            try:  # fast path: every id valid (Rust rejects negatives, floats and unknown ids)
                return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")
            except (KeyError, OverflowError, TypeError, ValueError):
                pass
        ids = _as_ids(ids)
        parts, run, limit = [], [], len(self._id_bytes)
        for i in ids:
            if 0 <= i < limit:
                run.append(self._id_bytes[i])
            else:  # an embedding padding row: decode the bytes so far on their own, then U+FFFD
                parts.append(b"".join(run).decode("utf-8", errors="replace"))
                parts.append(REPLACEMENT)
                run = []
        parts.append(b"".join(run).decode("utf-8", errors="replace"))
        return "".join(parts)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    # ---- chat -----------------------------------------------------------------------------------

    def render_conversation(self, messages: list[dict], max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """Conversation (the rules of `chat_turns`) -> (ids, mask): mask is 1 on the text tokens of
        every assistant turn and its <|assistant_end|>, a leading assistant turn (a greeting) included:
        it is the model's speech like any other, and a data set that should not teach it can leave it
        out. 0 on <|bos|>, user turns and <|assistant_start|>. `max_tokens` truncates both."""
        s = self._special_ids
        ids, mask = [s["<|bos|>"]], [0]
        for role, text in chat_turns(messages):
            body = self.encode(text)
            if role == "user":
                ids += [s["<|user_start|>"], *body, s["<|user_end|>"]]
                mask += [0] * (len(body) + 2)
            else:
                ids += [s["<|assistant_start|>"], *body, s["<|assistant_end|>"]]
                mask += [0] + [1] * (len(body) + 1)
        if max_tokens is not None:
            if max_tokens < 1:
                raise PoelmError(f"render_conversation: max_tokens must be >= 1, got {max_tokens}")
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Prompt for generation: the conversation (ending with a user turn) + <|assistant_start|>."""
        turns = chat_turns(messages)
        if turns[-1][0] != "user":
            raise PoelmError(
                f"message {len(messages) - 1}: a prompt must end with a 'user' message, got {turns[-1][0]!r}"
            )
        ids, _ = self.render_conversation(messages)
        return ids + [self._special_ids["<|assistant_start|>"]]

    # ---- files ----------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write poelm_tokenizer.json and token_bytes.json into `directory` (created if needed), and record
        their digests (digests.record_files)."""
        os.makedirs(directory, exist_ok=True)
        ordered = sorted(self._ranks.items(), key=lambda kv: kv[1])
        head = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "n_merges": self.n_merges,
            "vocab_size": self.vocab_size,
            "special_tokens": self._special_ids,
        }
        # One [base64, rank] pair per line: a 32k vocabulary stays readable and diffable.
        lines = json.dumps(head, indent=1, ensure_ascii=False)[:-2] + ',\n "mergeable_ranks": [\n'
        lines += ",\n".join(json.dumps([base64.b64encode(t).decode("ascii"), r]) for t, r in ordered)
        lines += "\n ]\n}\n"
        write_text(os.path.join(directory, TOKENIZER_FILE), lines)
        tb = {
            "format": TOKEN_BYTES_FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "token_bytes": self.token_bytes,
        }
        write_text(os.path.join(directory, TOKEN_BYTES_FILE), json.dumps(tb) + "\n")
        record_files(directory, [TOKENIZER_FILE, TOKEN_BYTES_FILE])  # digests, read back on every load

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read poelm_tokenizer.json alone (what the Hugging Face class downloads)."""
        path = os.fspath(path)
        doc = read_json(path)
        field = _field_reader(doc, path, FORMAT_NAME)
        pattern = field("pattern", str)
        name = doc.get("name", "poelm")
        pairs = field("mergeable_ranks", list)
        ranks: dict[bytes, int] = {}
        for k, pair in enumerate(pairs):
            where = f"{path}: field 'mergeable_ranks' entry {k}"
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and type(pair[1]) is int):
                raise PoelmError(f"{where}: expected [base64 string, rank], got {pair!r}")
            try:
                token = base64.b64decode(pair[0], validate=True)
            except ValueError:
                raise PoelmError(f"{where}: {pair[0]!r} is not valid base64") from None
            if token in ranks:
                raise PoelmError(f"{where}: token {token!r} appears twice")
            ranks[token] = pair[1]
        try:
            _check_ranks(ranks, f"{path}: field 'mergeable_ranks'")
        except PoelmError as e:
            raise PoelmError(str(e)) from None
        specials = field("special_tokens", dict)
        expected = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        if specials != expected:
            wrong = [t for t in SPECIAL_TOKENS if specials.get(t) != expected[t]]
            extra = sorted(set(specials) - set(expected))
            what = (
                f"{wrong[0]!r} has id {specials.get(wrong[0])!r}, expected {expected[wrong[0]]}"
                if wrong
                else f"unexpected entries {extra}"
            )
            raise PoelmError(
                f"{path}: field 'special_tokens': {what}; the nine specials must follow the "
                f"{len(ranks)} merges in the order {list(SPECIAL_TOKENS)}"
            )
        for key, value in (("n_merges", len(ranks)), ("vocab_size", len(ranks) + len(SPECIAL_TOKENS))):
            if key in doc and doc[key] != value:
                raise PoelmError(f"{path}: field {key!r} is {doc[key]!r}, but the ranks and specials give {value}")
        try:
            return cls(ranks, pattern=pattern, name=name)
        except PoelmError as e:
            raise PoelmError(f"{path}: {e}") from None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read a directory written by `save`, checking token_bytes.json against the ranks (and both
        files against the directory's digests, when it has them)."""
        tok = cls.from_file(os.path.join(directory, TOKENIZER_FILE))
        if read_manifest(directory) is None:
            warn_unverified(directory, "tokenizer")
        path = os.path.join(directory, TOKEN_BYTES_FILE)
        doc = read_json(path)
        field = _field_reader(doc, path, TOKEN_BYTES_FORMAT_NAME)
        lengths = field("token_bytes", list)
        expected = tok.token_bytes
        if len(lengths) != len(expected):
            raise PoelmError(
                f"{path}: field 'token_bytes' has {len(lengths)} entries; expected {len(expected)} "
                f"(vocab_size of {TOKENIZER_FILE})"
            )
        if lengths != expected:
            i = next(i for i, (a, b) in enumerate(zip(lengths, expected)) if a != b)
            raise PoelmError(f"{path}: field 'token_bytes' entry {i} is {lengths[i]!r}; the ranks give {expected[i]}")
        return tok

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id})"


class StreamDecoder:
    """Incremental decode: `push(id)` returns only complete characters; `flush()` the rest.

    The concatenation of all pushes and the flush equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: Any) -> str:
        if hasattr(token_id, "tolist"):
            token_id = token_id.tolist()
        if not isinstance(token_id, int):
            raise PoelmError(f"StreamDecoder.push: expected an integer token id, got {_show(token_id)}")
        if 0 <= token_id < self._tok.vocab_size:
            return self._utf8.decode(self._tok.id_to_bytes(token_id), final=False)
        # Out-of-vocabulary id: same rule as Tokenizer.decode (bytes so far end here, then U+FFFD).
        return self.flush() + REPLACEMENT

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character becomes U+FFFD) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---- file helpers -------------------------------------------------------------------------------


def _field_reader(doc: dict, path: str, format_name: str):
    """A typed field getter for `doc`, after checking its `format` and `format_version`."""

    def field(key: str, kind: type) -> Any:
        if key not in doc:
            raise PoelmError(f"{path}: field {key!r} is missing")
        value = doc[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PoelmError(f"{path}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
        return value

    fmt = field("format", str)
    if fmt != format_name:
        raise PoelmError(f"{path}: field 'format' is {fmt!r}; expected {format_name!r}")
    version = field("format_version", int)
    if version != FORMAT_VERSION:
        raise PoelmError(f"{path}: field 'format_version' is {version}; this poelm reads version {FORMAT_VERSION}")
    return field

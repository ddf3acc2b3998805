"""`PoelmTokenizer`: the Hugging Face face of poelm's Tokenizer (`AutoTokenizer`, remote code): token
strings for transformers, ids always from poelm's `Tokenizer`, no special tokens added by `encode`
(docs/model.md §9.5).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AddedToken, PreTrainedTokenizer

from .files import record_files, verify_file
from .tokenizer import SPECIAL_TOKENS, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable latin-1 maps to itself)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class PoelmTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        bos_token: str = "<|bos|>",
        eos_token: str = "<|assistant_end|>",
        pad_token: str = "<|assistant_end|>",
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ):
        self.vocab_file = vocab_file
        self.poelm = Tokenizer.from_file(vocab_file)  # checked against the directory's digests
        here = os.path.dirname(os.path.abspath(vocab_file))
        for name in (TOKEN_BYTES_FILE, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if os.path.isfile(os.path.join(here, name)):  # what transformers read beside it
                verify_file(os.path.join(here, name))
        byte_char = _bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in byte_char.items()}
        self._id_to_str = ["".join(byte_char[b] for b in self.poelm.id_to_bytes(i)) for i in range(self.poelm.n_merges)]
        self._str_to_id = {s: i for i, s in enumerate(self._id_to_str)}
        self._vocab = {**self._str_to_id, **self.poelm.special_ids}
        # Register the specials before the base __init__ so they keep their ids (not appended).
        self._added_tokens_decoder = {
            i: AddedToken(t, lstrip=False, rstrip=False, normalized=False, single_word=False, special=True)
            for t, i in self.poelm.special_ids.items()
        }
        named = {bos_token, eos_token, pad_token}
        kwargs.setdefault("extra_special_tokens", [t for t in SPECIAL_TOKENS if t not in named])
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.poelm.vocab_size

    def get_vocab(self) -> dict[str, int]:
        # poelm's tokens plus any added with add_tokens (these get ids past vocab_size)
        return {**self._vocab, **getattr(self, "_added_tokens_encoder", {})}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self._id_to_str[i] for i in self.poelm.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        if token not in self._vocab:
            raise KeyError(f"{token!r} is not a poelm token (no unknown token exists in byte-level BPE)")
        return self._vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < len(self._id_to_str):
            return self._id_to_str[index]
        if 0 <= index < self.poelm.vocab_size:
            return SPECIAL_TOKENS[index - self.poelm.n_merges]
        return "\ufffd"  # an embedding padding row, as Tokenizer.decode renders it

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out = bytearray()
        for t in tokens:
            if t in self._str_to_id:
                out += bytes(self._byte_decoder[c] for c in t)
            else:  # specials and any added token are literal text
                out += t.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            skip = set(self.poelm.special_ids.values()) | set(self.all_special_ids)
            ids = [i for i in ids if i not in skip]
        # Tokens added after loading (add_tokens) live past poelm's vocabulary: decode them as text.
        added = {i: t.content for i, t in self._added_tokens_decoder.items() if i >= self.poelm.vocab_size}
        if not added:
            text = self.poelm.decode(ids)
        else:
            parts, run = [], []
            for i in ids:
                if i in added:
                    parts += [self.poelm.decode(run), added[i]]
                    run = []
                else:
                    run.append(i)
            text = "".join(parts) + self.poelm.decode(run)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def save_pretrained(self, save_directory, *args, **kwargs) -> tuple[str, ...]:
        """transformers' save, then the digests of the files written are recorded (files.py): merged
        into the directory's digests.json, or a new one when the directory holds nothing else."""
        from pathlib import Path

        files = super().save_pretrained(save_directory, *args, **kwargs)
        directory = Path(save_directory)
        record_files(directory, {Path(f).name for f in files
                                 if Path(f).parent.resolve() == directory.resolve() and Path(f).is_file()})
        return files

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        # poelm's file names are fixed (the loader looks for them), so filename_prefix is not applied.
        self.poelm.save(save_directory)
        return (os.path.join(save_directory, TOKENIZER_FILE), os.path.join(save_directory, TOKEN_BYTES_FILE))

"""A request's prompts as the model reads them, and what the client sent; a text that cannot fit the
model's context at all is refused before it is tokenized."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import ServedModel
from .protocol import ApiError


def check_fits(nbytes: int, served: ServedModel, param: str) -> None:
    """Refuse, before tokenizing, a text that cannot fit the context whatever its tokens: more bytes than
    sequence_len tokens of the longest token's bytes."""
    config = served.model.config
    most = config.sequence_len * served.longest_token
    if nbytes > most:
        raise ApiError(400, f"{param}: {nbytes} bytes of text cannot fit the model's context of "
                       f"{config.sequence_len} tokens (at most {most} bytes)", param=param)


@dataclass
class Prompt:
    """What the model reads (`ids`: <|bos|> and the prompt's tokens), and what the client sent: its text
    (`text`) and where its own tokens begin in `ids` (`start`: 1 when poelm added the <|bos|>)."""

    ids: list[int]
    start: int
    text: str


def prompts_of(prompt: Any, served: ServedModel) -> list[Prompt]:
    """A completions `prompt` (text, texts, token ids, lists of token ids) as Prompts (in a thread: it
    tokenizes)."""
    tok = served.tokenizer
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    out = []
    for item in items:
        if isinstance(item, str):
            check_fits(len(item.encode()), served, "prompt")
            out.append(Prompt([tok.bos_id] + tok.encode(item), 1, item))
        else:
            added = 0 if item[:1] == [tok.bos_id] else 1
            bad = [i for i in item if i >= tok.vocab_size]
            if bad:
                raise ApiError(400, f"prompt: token ids {bad[:5]} are not in [0, {tok.vocab_size})", param="prompt")
            out.append(Prompt([tok.bos_id] * added + list(item), added, tok.decode(item)))
    return out

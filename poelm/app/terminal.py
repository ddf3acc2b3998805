"""An answer on the terminal, as `poelm generate` and `poelm chat` print it: stdout carries the answer
and nothing else (whole characters as they come, stop tokens never printed, a newline at the end);
the stats line goes to stderr."""

from __future__ import annotations

import sys

from ..core.tokenizer import Tokenizer
from ..infer import Decoder, SamplingParams


def stream_answer(decoder: Decoder, tok: Tokenizer, ids: list[int], params: SamplingParams, *,
                  interruptible: bool = False) -> tuple[list[int], bool, bool]:
    """Print the answer to `ids` on stdout as it comes. Returns its ids (stop tokens left out), whether
    a stop token ended it, and whether Ctrl-C stopped it: with `interruptible` Ctrl-C ends the answer
    where it stands (what was produced is kept), otherwise it goes up to the caller."""
    text, out, ended, stopped = tok.stream_decoder(), [], False, False
    tokens = decoder.stream(ids, params)  # the request is checked here, before any output
    try:
        for token in tokens:
            if token in decoder.stop_ids:
                ended = True
                continue  # the stream ends right after it
            out.append(token)
            sys.stdout.write(text.push(token))
            sys.stdout.flush()
    except KeyboardInterrupt:
        if not interruptible:
            raise
        stopped = True
    finally:
        tokens.close()  # records the decoder's last_stats when stopped between tokens
    sys.stdout.write(text.flush() + "\n")
    sys.stdout.flush()
    return out, ended, stopped


def stats_line(decoder: Decoder) -> str:
    """What the decoder's last call did: '12 tokens in 0.31s (38.7 tok/s); engine; prompt 5 tokens'."""
    s = decoder.last_stats
    return f"{s.generated_tokens} tokens in {s.seconds:.2f}s ({s.tokens_per_s:.1f} tok/s); {decoder.describe()}"

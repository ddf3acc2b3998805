"""What a server allows, declared once: `ServeOptions` (each field a flag of `poelm serve`,
common/options.py; `create_app`, `background` and `Scheduler` take their defaults from it) and `Limits`
(what one request may ask for; the schema in protocol.py is built from `LIMITS`). No FastAPI or
pydantic here: the command line builds its parser without the `serve` extras."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.options import option


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the README lists these with their defaults)."""

    body_bytes: int = 1 << 20  # a larger body is refused (413) before it is read
    prompts: int = 64  # prompts in one completions request
    n: int = 16  # choices per prompt
    stops: int = 16  # stop strings (OpenAI allows 4)
    stop_chars: int = 1000  # characters per stop string
    logprobs: int = 20  # alternatives per token (completions `logprobs`, chat `top_logprobs`)
    messages: int = 1024  # chat messages


LIMITS = Limits()


@dataclass(frozen=True)
class ServeOptions:
    host: str = option("127.0.0.1", "the address to listen on", resume=None)
    port: int = option(8000, "the port", resume=None)
    max_batch: int = option(16, "rows decoded at once", resume=None)
    max_queue: int = option(64, "requests waiting at most (then 429)", resume=None)
    api_key: str | None = option(None, "require Authorization: Bearer KEY (visible to other users in `ps`: prefer "
                                 "--api-key-file or $POELM_API_KEY)", resume=None, metavar="KEY")
    api_key_file: str | None = option(None, "the key on the first line of FILE", resume=None, metavar="FILE")
    max_body_bytes: int = option(LIMITS.body_bytes, "refuse request bodies larger than N bytes (413; default 1 MiB)",
                                 resume=None, metavar="N")
    device: str = option("cpu", "where the models run", resume=None)
    dtype: str | None = option(None, "compute in this dtype (default: the dtype the models are stored in)",
                               resume=None, choices=("float32", "bfloat16", "float16"))


DEFAULTS = ServeOptions()

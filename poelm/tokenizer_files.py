"""The tokenizer's files in a model directory, for `AutoTokenizer.from_pretrained(..., trust_remote_code=True)`.

Design choices:
- Not shipped: it writes what is shipped. One call puts everything a directory needs to load the
  tokenizer on its own: poelm's JSON files, `tokenizer_config.json` (auto_map as the `[slow, fast]`
  list transformers 5 unpacks, per HF_NOTES), `special_tokens_map.json`, `chat_template.jinja`,
  and the three code files copied verbatim from this package (`TOKENIZER_CODE_FILES`).
- The config is written by hand rather than by `save_pretrained`, so its content is fixed by poelm
  and not by whatever a transformers version chooses to serialise; `save_pretrained` of the
  loaded tokenizer still works and re-emits equivalent files.
- The chat template renders MODEL.md §4 as text with literal special tokens; PoelmTokenizer splits
  those back into ids, so `apply_chat_template(..., add_generation_prompt=True)` gives exactly
  `Tokenizer.render_prompt` (for message text that does not itself spell a special token).
"""

from __future__ import annotations

import json
import os

from .core.tokenizer import SPECIAL_TOKENS, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer


BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|assistant_end|>"
PAD_TOKEN = "<|assistant_end|>"  # see tokenization_poelm.py: eos padding keeps generate() from masking BOS

# Jinja: system text + blank line is prepended to the first user message; roles must alternate
# user/assistant starting with user (the same rules as Tokenizer.render_conversation).
CHAT_TEMPLATE = """\
{%- set ns = namespace(system='', expect='user') -%}
<|bos|>
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception('message ' ~ loop.index0 ~ ": role 'system' is only allowed as the first message") -}}
        {%- endif -%}
        {%- set ns.system = message['content'] + '\\n\\n' -%}
    {%- elif message['role'] != ns.expect -%}
        {{- raise_exception('message ' ~ loop.index0 ~ ": expected role '" ~ ns.expect ~ "', got '"
                            ~ message['role'] ~ "'") -}}
    {%- elif message['role'] == 'user' -%}
        {{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}
        {%- set ns.system = '' -%}
        {%- set ns.expect = 'assistant' -%}
    {%- else -%}
        {{- '<|assistant_start|>' + message['content'] + '<|assistant_end|>' -}}
        {%- set ns.expect = 'user' -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant_start|>' -}}
{%- endif -%}
"""


def _dump(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_hf_tokenizer_files(
    directory: str | os.PathLike, tokenizer: Tokenizer, model_max_length: int | None = None
) -> list[str]:
    """Write the tokenizer files and code of a model directory; return the file names written.

    model_max_length: the model's context length, recorded for transformers' truncation warnings.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(directory)
    specials = tokenizer.special_ids
    named = {BOS_TOKEN, EOS_TOKEN, PAD_TOKEN}
    extra = [t for t in SPECIAL_TOKENS if t not in named]
    config = {
        "tokenizer_class": "PoelmTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_poelm.PoelmTokenizer", None]},
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "extra_special_tokens": extra,
        # Specials keep their ids and are never stripped or normalised (they split text verbatim).
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for t, i in specials.items()
        },
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    _dump(os.path.join(directory, "tokenizer_config.json"), config)
    _dump(
        os.path.join(directory, "special_tokens_map.json"),
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "extra_special_tokens": extra},
    )
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    from .modeldir import copy_shipped_code

    copy_shipped_code(directory)
    return [TOKENIZER_FILE, TOKEN_BYTES_FILE, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]

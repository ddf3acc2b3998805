"""Model directories: the one module that knows their layout, writes them, and opens them.

`open(directory) -> Chain` is the one public way to open a model directory (base or stage): the
directory's own config.json and tokenizer first (so their errors name it), then the whole chain through
the cascade loader that ships in the directory (core/cascade.py, the code `from_pretrained` runs), every
file checked against its digests. Why one way, and which others it replaced: docs/architecture.md.

Writing: bases, stages and tokenizer-only directories are filled by one function (`write_directory`),
atomically (common/atomic.AtomicDir), never over an input. File names live in core/files.py; what a
directory holds, and why the tokenizer's transformers files are written by hand: docs/formats.md.
Tensors are stored in float32 or bfloat16 (`STORAGE_DTYPES`, recorded as config.json `dtype`) and
written as a stream (core/tensorfile.py): one tensor converted at a time, the file's digest and the
fingerprint computed in the pass that writes it; `init_model_dir` creates a new model one tensor at a
time and never holds it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .card import model_card
from ..core.cascade import DTYPE_NAMES, DTYPES, Chain, Mapped, locate, open_chain
from ..core.config import PoEConfig
from ..core.errors import PoelmError
from ..core.files import (CARD, CHAT_TEMPLATE_FILE, CONFIG, DELTA, GENERATION_CONFIG, SPECIAL_TOKENS_MAP,
                         TOKEN_BYTES_FILE, TOKENIZER_CONFIG, TOKENIZER_FILE, WEIGHTS, read_json, write_json,
                         write_manifest, write_text)
from ..core.init_plan import init_plan
from ..core.model import PoEGPT, disk_name, state_shapes, to_disk
from ..core.tensorfile import Fingerprint, TensorWriter, digest_and_fingerprint, save_tensors
from ..core.tokenizer import SPECIAL_TOKENS, Tokenizer
from ..common.atomic import AtomicDir, Inputs

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "core"
STORAGE_DTYPES = ("float32", "bfloat16")  # what poelm writes (float32: training's; bfloat16: the releases')
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|assistant_end|>"
PAD_TOKEN = "<|assistant_end|>"  # = eos: generate() then never masks a BOS (core/tokenization_poelm.py)

CHAT_TEMPLATE = """\
{#- core/tokenizer.py `chat_turns`, rule for rule and message for message: an optional system message
    first, then user and assistant turns alternating, beginning with either; the system text goes into
    the first user turn, after a leading assistant turn if there is one. Renders render_conversation's
    ids; add_generation_prompt appends <|assistant_start|> (render_prompt, after a user turn). -#}
{%- if not messages -%}
    {{- raise_exception("conversation: no messages; expected at least one 'user' message") -}}
{%- endif -%}
{%- set ns = namespace(system=none, last=none) -%}
<|bos|>
{%- for message in messages -%}
    {%- set role = message['role'] -%}
    {%- if role == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception('message ' ~ loop.index0 ~ ": role 'system' is only allowed as the first message") -}}
        {%- endif -%}
        {%- set ns.system = message['content'] -%}
    {%- elif role != 'user' and role != 'assistant' -%}
        {{- raise_exception('message ' ~ loop.index0 ~ ": unknown role '" ~ role
                            ~ "'; expected 'user' or 'assistant'") -}}
    {%- elif role == ns.last -%}
        {{- raise_exception('message ' ~ loop.index0 ~ ": expected role '"
                            ~ ('user' if role == 'assistant' else 'assistant') ~ "' after '" ~ role
                            ~ "', got '" ~ role ~ "'") -}}
    {%- elif role == 'user' -%}
        {{- '<|user_start|>' + (ns.system + '\\n\\n' if ns.system is not none else '') + message['content']
            + '<|user_end|>' -}}
        {%- set ns.system = none -%}
    {%- else -%}
        {{- '<|assistant_start|>' + message['content'] + '<|assistant_end|>' -}}
    {%- endif -%}
    {%- set ns.last = role -%}
{%- endfor -%}
{%- if ns.system is not none -%}
    {{- raise_exception("message 0: a 'system' message must be followed by a 'user' message") -}}
{%- endif -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant_start|>' -}}
{%- endif -%}
"""



# --------------------------------------------------------------------------------------- writing
def shipped_code_files() -> list[Path]:
    """The files every directory ships: all of `poelm/core` but its `__init__.py`."""
    return sorted(p for p in SHIPPED_DIR.glob("*.py") if p.name != "__init__.py")


def copy_shipped_code(directory: str | os.PathLike) -> None:
    """Copy the shipped code into a directory, as it is (transformers imports it from there)."""
    for path in shipped_code_files():
        shutil.copyfile(path, Path(directory) / path.name)


def hf_config_dict(config: PoEConfig, tokenizer: Tokenizer | None, dtype: str = "float32",
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json: the poelm fields plus what `transformers` needs to find the remote code."""
    data: dict[str, Any] = {
        "model_type": "poelm",
        "architectures": ["PoelmForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_poelm.PoelmConfig",
            "AutoModelForCausalLM": "modeling_poelm.PoelmForCausalLM",
        },
        "dtype": dtype,
        "tie_word_embeddings": False,
    }
    if tokenizer is not None:
        data["bos_token_id"] = tokenizer.bos_id
        data["eos_token_id"] = tokenizer.token_id("<|assistant_end|>")
    data.update(config.to_dict())
    data.update(extra or {})
    return data


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    end = tokenizer.token_id("<|assistant_end|>")
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": [end, tokenizer.bos_id], "pad_token_id": end}


def write_tokenizer_files(
    directory: str | os.PathLike, tokenizer: Tokenizer, model_max_length: int | None = None
) -> list[str]:
    """Write the tokenizer's files into a directory (not its code, not its digests); return their names.

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
    write_json(os.path.join(directory, TOKENIZER_CONFIG), config)
    write_json(
        os.path.join(directory, SPECIAL_TOKENS_MAP),
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "extra_special_tokens": extra},
    )
    write_text(os.path.join(directory, CHAT_TEMPLATE_FILE), CHAT_TEMPLATE)
    return [TOKENIZER_FILE, TOKEN_BYTES_FILE, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE]


def write_directory(tmp: Path, tokenizer: Tokenizer, *, tensors_file: str | None = None,
                    tensors: dict[str, torch.Tensor] | None = None, dtype: str | None = None,
                    metadata: dict[str, str] | None = None, config: dict[str, Any] | None = None,
                    card: str | None = None, fingerprint: str | None = None, parent_fingerprint: str = "",
                    known: dict[str, dict[str, Any]] | None = None) -> str | None:
    """Fill a (temporary) directory: tensors (floating ones stored in `dtype` when given), config and
    generation config (a model), the tokenizer's files, the shipped code, the card, and last the
    digests of it all. The fingerprint recorded is `fingerprint`, else that of the tensors written
    (chained with `parent_fingerprint`); `known`: digest entries of files already written. Returns the
    fingerprint recorded."""
    known = dict(known or {})
    if tensors is not None:
        known[tensors_file], fingerprint = save_tensors(tmp / tensors_file, tensors,
                                                        {"format": "pt", **(metadata or {})},
                                                        DTYPES[dtype] if dtype else None, parent_fingerprint)
    if config is not None:
        write_json(tmp / CONFIG, config)
        write_json(tmp / GENERATION_CONFIG, generation_config(tokenizer))
    write_tokenizer_files(tmp, tokenizer)
    copy_shipped_code(tmp)
    if card is not None:
        write_text(tmp / CARD, card)
    write_manifest(tmp, fingerprint=fingerprint, known=known)
    return fingerprint


def save_tokenizer_dir(tokenizer: Tokenizer, out: str | os.PathLike, *, overwrite: bool = False,
                       inputs: Inputs = ()) -> Path:
    """A directory holding only a tokenizer (what `poelm tokenizer train` writes), atomically."""
    with AtomicDir(out, overwrite, inputs) as tmp:
        write_directory(tmp, tokenizer)
    return Path(out)


def storage_dtype(dtype: str | None, default: torch.dtype = torch.float32) -> str:
    """A storage dtype's name, checked (`STORAGE_DTYPES`); None: `default` (what was loaded) where poelm
    stores it, else float32 (a float16 model from elsewhere is written in float32, losing nothing)."""
    if dtype is None:
        name = DTYPE_NAMES.get(default, "float32")
        return name if name in STORAGE_DTYPES else "float32"
    if dtype not in STORAGE_DTYPES:
        raise PoelmError(f"dtype {dtype!r}: poelm stores {' or '.join(STORAGE_DTYPES)}")
    return dtype


def save_model_dir(model: PoEGPT, out: str | os.PathLike, tokenizer: Tokenizer, *,
                   card: str | None = None, dtype: str = "float32", overwrite: bool = False,
                   extra_config: dict[str, Any] | None = None, inputs: Inputs = ()) -> Path:
    """Write a complete, self-contained base model directory (docs/formats.md) atomically, its tensors
    stored in `dtype` (converted one at a time); `out` must not overlap `inputs` (outputs.check_output)."""
    config = model.config
    if tokenizer.vocab_size != config.vocab_size:
        raise PoelmError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size {config.vocab_size}")
    dtype = storage_dtype(dtype)
    with AtomicDir(out, overwrite, inputs) as tmp:
        write_directory(tmp, tokenizer, tensors_file=WEIGHTS, tensors=to_disk(model.state_dict()), dtype=dtype,
                        config=hf_config_dict(config, tokenizer, dtype, extra_config),
                        card=card if card is not None else model_card(model, Path(out).name))
    return Path(out)


def init_model_dir(config: PoEConfig, tokenizer: Tokenizer, out: str | os.PathLike, *, seed: int = 0,
                   dtype: str = "float32", overwrite: bool = False, inputs: Inputs = ()) -> Path:
    """`poelm init`: a new base directory whose tensors are `PoEGPT(config).init_weights(seed)`'s, bit for
    bit, made one at a time in the order the generator is drawn from (core/init_plan.py) and written as
    each is made (one drawn while the one before is written): nothing but two tensors are held. The
    fingerprint is computed from the bytes as they are written (it combines by name, not by order)."""
    dtype = storage_dtype(dtype)
    if tokenizer.vocab_size != config.vocab_size:
        raise PoelmError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size {config.vocab_size}")
    shapes, plan = dict(state_shapes(config)), list(init_plan(config))
    if sorted(n for n, _ in plan) != sorted(shapes):
        raise AssertionError("init_plan does not cover the model's tensors")
    with torch.device("meta"):
        skeleton = PoEGPT(config)  # for the card: shapes and counts only
    g, target = torch.Generator().manual_seed(seed), DTYPES[dtype]
    with AtomicDir(out, overwrite, inputs) as tmp:
        fp = Fingerprint()
        with torch.no_grad(), TensorWriter(tmp / WEIGHTS, [(disk_name(n), target, shapes[n]) for n, _ in plan],
                                           {"format": "pt"}, fp) as writer:
            for name, fill in plan:
                t = torch.empty(shapes[name])
                fill(t, g)
                writer.write(disk_name(name), t)  # converted to `target`, hashed and written in the background
        entry = writer.close()
        write_directory(tmp, tokenizer, config=hf_config_dict(config, tokenizer, dtype),
                        card=model_card(skeleton, Path(out).name), fingerprint=fp.hexdigest(),
                        known={WEIGHTS: entry})
    return Path(out)


# --------------------------------------------------------------------------------------- reading
def open(directory: str | os.PathLike, verify: bool = True, mapped: Mapped | None = None) -> Chain:  # noqa: A001
    """Open any base or stage directory (a stage brings its whole chain): `.config`, `.model(device,
    dtype)`, `.tokenizer()`, `.path`, `.links`, `.fingerprint`. Its own config.json and tokenizer (when
    it has one: `save_pretrained` writes none) are checked first, so their errors name this directory;
    then every link, strictly and against its digests (`verify=False` skips only the digests, for
    measuring what they cost). Tensor files are mapped, not read (core/cascade.py); `mapped`: one dict
    passed to several opens maps a file they share once (a server's base)."""
    path = Path(directory)
    if not path.is_dir():
        raise PoelmError(f"{directory}: not a directory (expected a poelm model directory)")
    config = PoEConfig.from_dict(read_json(path / CONFIG, verify), source=str(path / CONFIG))
    tok = Tokenizer.load(path) if (path / TOKENIZER_FILE).is_file() else None
    if tok is not None and tok.vocab_size != config.vocab_size:
        raise PoelmError(f"{directory}: tokenizer has {tok.vocab_size} tokens but config.json says "
                         f"vocab_size {config.vocab_size}")
    return open_chain(path, verify, mapped)


def record_digests(directory: str | os.PathLike) -> dict[str, Any]:
    """Re-record `digests.json` from the directory's files as they are now: after a deliberate edit, or
    for a directory written before poelm recorded digests. A stage's fingerprint chains its parent's,
    so the parent's chain is opened (and verified) for it. Every file is streamed: nothing but headers
    is held."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PoelmError(f"{directory}: not a directory")
    fingerprint, known = None, {}
    if (directory / CONFIG).is_file():
        data = read_json(directory / CONFIG, verify=False)
        if data.get("base_model_name_or_path") is not None:
            parent = open(locate(str(data["base_model_name_or_path"]), directory))
            known[DELTA], fingerprint = digest_and_fingerprint(directory / DELTA, parent.fingerprint)
        else:
            known[WEIGHTS], fingerprint = digest_and_fingerprint(directory / WEIGHTS)
    return write_manifest(directory, fingerprint=fingerprint, known=known)

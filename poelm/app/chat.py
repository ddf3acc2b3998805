"""The interactive chat of `poelm chat`: a conversation with any decoder, with a banner, commands,
multi-line messages, line editing and history (docs/cli.md, `chat`, has every rule and why).

- stdout carries the answers and nothing else (app/terminal.py prints them); everything else goes to
  stderr, so piped answers stay clean.
- A line starting with `/` is a command and never reaches the model; Ctrl-C stops an answer (what it
  said is kept), at the prompt it clears the line, twice in a row it leaves.
- Turn t samples with seed + t; /reset starts again at turn 0, so a reset chat answers as a fresh one.
- The conversation changes in one assignment after an answer, so a Ctrl-C anywhere leaves it whole.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from ..core.tokenizer import Tokenizer
from ..infer import DecodeMode, Decoder, SamplingParams
from .terminal import stats_line, stream_answer

PROMPT, MORE, BLOCK = "> ", "... ", '"""'
LEAVE = "/help for commands, /exit or Ctrl-D to leave"
MULTILINE = 'a line ending in \\ continues on the next; """ alone on a line opens a block, """ again closes it'
HELP = r'''commands (never sent to the model):
  /help           this list
  /reset          forget the conversation and start a new one
  /stats on|off   a stats line after each answer (tokens, tok/s, the decoder's figures), or none
  /exit, /quit    leave (so do Ctrl-D, and Ctrl-C twice at the prompt)
messages:
  a line ending in \ continues on the next line
  """ alone on a line opens a block sent as one message; """ alone again closes it
  //text sends /text
  Ctrl-C stops an answer (what it said stays in the conversation); at the prompt it clears the line'''
HISTORY_LINES = 1000


def run_chat(decoder: Decoder, tok: Tokenizer, params: SamplingParams, model_dir: str | os.PathLike,
             mode: DecodeMode | None = None) -> int:
    """Hold a conversation on stdin/stdout until /exit, /quit or the end of input; the exit status."""
    interactive = sys.stdin.isatty()
    chat = Chat(decoder, tok, params, interactive=interactive)
    if interactive:
        note(banner(model_dir, decoder, params, mode, chat.stats))
    history = History(history_path()) if interactive else None
    try:
        return chat.run()
    finally:
        if history is not None:
            history.save()


class Chat:
    """One conversation: reads messages and commands, streams answers (see the module docstring)."""

    def __init__(self, decoder: Decoder, tok: Tokenizer, params: SamplingParams, *, interactive: bool):
        self.decoder, self.tok, self.params = decoder, tok, params
        self.interactive = interactive
        self.stats = True
        self.messages: list[dict[str, str]] = []
        self.turn = 0

    def run(self) -> int:
        interrupts = 0
        while True:
            try:
                entry = self.read_message()
                interrupts = 0
                if entry is None:
                    break
                kind, text = entry
                if kind == "command":
                    if not self.command(text):
                        return 0
                elif text.strip():
                    self.answer(text)
            except KeyboardInterrupt:  # at the prompt: answers catch their own
                if not self.interactive:
                    raise
                interrupts += 1
                if interrupts == 2:
                    break
                note("\n(Ctrl-C again, Ctrl-D or /exit to leave)")
        if self.interactive:
            note("")  # after Ctrl-D or Ctrl-C: the shell's prompt on a line of its own
        return 0

    # ---- input ---------------------------------------------------------------------------------
    def read_line(self, prompt: str) -> str | None:
        """One line without its newline; None at the end of input."""
        if not self.interactive:
            line = sys.stdin.readline()
            return line.rstrip("\r\n") if line else None
        try:
            if sys.stdout.isatty():
                return input(prompt)  # readline draws the prompt and edits the line
            sys.stderr.write(prompt)  # stdout is a file: keep the prompt out of it
            sys.stderr.flush()
            return input()
        except EOFError:
            return None

    def read_message(self) -> tuple[str, str] | None:
        """The next ("command", line) or ("message", text); None at the end of input."""
        line = self.read_line(PROMPT)
        while line is not None and not line.strip():
            line = self.read_line(PROMPT)
        if line is None:
            return None
        if line.strip() == BLOCK:
            lines = []
            while (line := self.read_line(MORE)) is not None and line.strip() != BLOCK:
                lines.append(line)
            return "message", "\n".join(lines)
        head = line.lstrip()
        if head.startswith("/") and not head.startswith("//"):
            return "command", line.strip()
        if head.startswith("//"):
            line = line.replace("/", "", 1)
        lines = []
        while line is not None and line.endswith("\\"):
            lines.append(line[:-1])
            line = self.read_line(MORE)
        if line is not None:
            lines.append(line)
        return "message", "\n".join(lines)

    def command(self, line: str) -> bool:
        """Run one command; False to leave."""
        name, *rest = line.lower().split()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            note(HELP)
        elif name == "/reset":
            self.messages, self.turn = [], 0
            note("(a new conversation)")
        elif name == "/stats" and rest in (["on"], ["off"]):
            self.stats = rest == ["on"]
            note(f"(stats {rest[0]})")
        elif name == "/stats":
            note(f"/stats takes on or off (stats are {'on' if self.stats else 'off'})")
        else:
            note(f"unknown command {name}: /help lists the commands")
        return True

    # ---- answers -------------------------------------------------------------------------------
    def answer(self, text: str) -> None:
        """Stream the model's answer to `text`; the conversation gains both, or stays as it was."""
        messages = self.fit(self.messages + [{"role": "user", "content": text}])
        if messages is None:
            return
        ids = self.tok.render_prompt(messages)
        params = dataclasses.replace(self.params, seed=self.params.seed + self.turn)
        tokens, ended, stopped = stream_answer(self.decoder, self.tok, ids, params, interruptible=self.interactive)
        if tokens or not stopped:
            self.messages = messages + [{"role": "assistant", "content": self.tok.decode(tokens)}]
            self.turn += 1
        stats = self.decoder.last_stats
        if stopped:
            note("(stopped)")
        elif not ended and stats and len(ids) + stats.generated_tokens >= self.decoder.config.sequence_len:
            note(f"(the answer reached the end of the model's context, {self.decoder.config.sequence_len} tokens)")
        if self.stats and stats is not None:
            note(stats_line(self.decoder))

    def fit(self, messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
        """`messages` without their oldest exchanges until the prompt leaves room to answer; None (and
        one line saying so) when the last message does not fit alone."""
        limit = self.decoder.config.sequence_len
        alone = len(self.tok.render_prompt(messages[-1:]))
        if alone >= limit:
            note(f"(not sent: the message is {alone} tokens in the chat template, and the model's context "
                 f"holds {limit})")
            return None
        dropped = 0
        while len(self.tok.render_prompt(messages)) >= limit:
            messages, dropped = messages[2:], dropped + 1  # one user + assistant exchange
        if dropped:
            note(f"(the conversation outgrew the model's context of {limit} tokens: dropped the oldest "
                 f"{dropped} exchange{'s' if dropped > 1 else ''})")
        return messages


# ---- what the chat says about itself ---------------------------------------------------------------
def note(text: str) -> None:
    """One message to the person at the terminal: stderr, after whatever the answer printed."""
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)


def banner(model_dir: str | os.PathLike, decoder: Decoder, params: SamplingParams, mode: DecodeMode | None,
           stats: bool) -> str:
    """What is loaded, how it decodes, and how to get help and leave."""
    from ..core.cascade import resolve_chain

    links, parts, prev = resolve_chain(model_dir, verify=False), [], 0  # the load verified them
    for link in links:
        name, layers = link.data.get("stage_name", link.path.name), link.config.n_layer
        n = layers - prev
        parts.append(f"stage {name!r} +{n} layer{'s' * (n != 1)}" if link.is_stage else f"base {name!r} {layers} layers")
        prev = layers
    c = decoder.config
    how = decoder.name
    if mode is not None and mode.compose:
        how += f" (with {', '.join(str(p) for p in mode.compose)})"
    return (f"poelm chat: {model_dir} ({' -> '.join(parts)})\n"
            f"  {c.n_layer} layers in stages {list(c.poe_stage_layers)}, context {c.sequence_len} tokens\n"
            f"  decoding: {how}, predictor {decoder.output}; {sampling_text(params)}; "
            f"stats {'on' if stats else 'off'}\n"
            f"{LEAVE}\n"
            f"{MULTILINE}")


def sampling_text(params: SamplingParams) -> str:
    """The sampling settings in words: 'greedy; at most 256 new tokens per answer'."""
    p = params
    if p.temperature == 0:
        how = "greedy"
    else:
        how = f"sampling at temperature {p.temperature:g}"
        how += f", top-k {p.top_k}" if p.top_k is not None else ""
        how += f", top-p {p.top_p:g}" if p.top_p is not None else ""
        how += f", seed {p.seed} (+1 per turn)"
    if p.repetition_penalty != 1:
        how += f", repetition penalty {p.repetition_penalty:g}"
    return f"{how}; at most {p.max_new_tokens} new tokens per answer"


# ---- line editing and history ----------------------------------------------------------------------
def history_path() -> Path:
    """$XDG_CACHE_HOME/poelm/chat_history (an absolute $XDG_CACHE_HOME), else ~/.cache/poelm/chat_history."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(cache) if os.path.isabs(cache) else Path.home() / ".cache") / "poelm" / "chat_history"


class History:
    """readline's line editing and history for one session; nothing at all when readline is missing.
    Importing readline is what makes `input()` edit lines: process-wide, as for any REPL."""

    def __init__(self, path: Path):
        self.path = path
        try:
            import readline
        except ImportError:  # e.g. Windows without pyreadline: plain input
            self.readline: Any = None
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LINES)
        try:
            readline.read_history_file(path)
        except OSError:  # the first session, or unreadable: start with none
            pass

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.path)
            os.chmod(self.path, 0o600)  # conversations are private
        except OSError as e:
            note(f"(history not saved to {self.path}: {e.strerror or e})")

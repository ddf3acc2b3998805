"""`poelm chat` as a chat: on a pseudo-terminal (banner, commands, multi-line messages, Ctrl-C, EOF,
history) and piped (answers alone on stdout, commands still commands), against the answers the
decoder gives the same conversation directly (greedy, so exact).

Every read from a terminal has a deadline, and every child is killed at the end of its test: a hung
chat fails a test, it never hangs the suite.
"""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poelm.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPT, MORE = b"\r\n> ", b"\r\n... "
STATS = re.compile(r"\d+ tokens in [\d.]+s \(")  # the stats line after an answer
# The child makes the terminal its controlling terminal (so Ctrl-C there is SIGINT to it) and gives SIGINT
# its default action back, as a shell does for a job in the foreground (a suite started in the background
# with `&` inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler); then it runs
# `python -m poelm ARGS` in its place.
CHILD = ("import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
         "signal.signal(signal.SIGINT, signal.SIG_DFL); "
         "os.execv(sys.executable, [sys.executable, '-m', 'poelm', *sys.argv[1:]])")


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    """`poelm init` with a 4096-token context: greedy answers at init never meet a stop token, so an
    answer lasts as long as --max-new-tokens asks (seconds at 4000: long enough to interrupt)."""
    out = tmp_path_factory.mktemp("chat_repl") / "m"
    assert main(["init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2", "--n-embd", "64", "--n-head", "2",
                 "--n-kv-head", "1", "--seq-len", "4096", "--out", str(out)]) == 0
    return out


def reference(model_dir, turns: list[str], max_new_tokens: int = 8) -> list[tuple[int, str]]:
    """What a fresh chat answers to `turns`, turn by turn: (prompt tokens, answer text)."""
    from poelm.infer import SamplingParams, make_decoder
    from poelm import models
    from poelm.core.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir)
    decoder = make_decoder(models.open(model_dir).model(), tokenizer=tok)
    messages, out = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        ids = tok.render_prompt(messages)
        answer = tok.decode([t for t in decoder.generate(ids, SamplingParams(max_new_tokens=max_new_tokens))
                             if t not in decoder.stop_ids])
        messages.append({"role": "assistant", "content": answer})
        out.append((len(ids), answer))
    return out


def shown(text: str) -> bytes:
    """`text` as the terminal shows it (newlines become CR LF)."""
    return text.encode().replace(b"\n", b"\r\n")


class Terminal:
    """`python -m poelm ARGS` on a pseudo-terminal: type into it, read what it shows (with deadlines)."""

    def __init__(self, args: list[str], home: Path):
        env = dict(os.environ, TERM="dumb", HOME=str(home), XDG_CACHE_HOME=str(home / "cache"),
                   PYTHONPATH=str(ROOT))
        master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True, env=env, cwd=ROOT)
        os.close(slave)
        self.fd, self.buf = master, b""

    def _read(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.fd], [], [], left)[0]:
            return b""
        try:
            return os.read(self.fd, 65536) or b"<EOF>"
        except OSError:  # EIO: the child has gone
            return b"<EOF>"

    def expect(self, pattern: bytes, timeout: float = 10.0) -> bytes:
        """Everything shown up to and including `pattern` (consumed)."""
        deadline = time.monotonic() + timeout
        while pattern not in self.buf:
            data = self._read(deadline)
            if not data or data == b"<EOF>":
                why = "the chat ended" if data else f"nothing more within {timeout}s"
                raise AssertionError(f"{why} before {pattern!r}; it showed ...{self.buf[-1500:]!r}")
            self.buf += data
        end = self.buf.index(pattern) + len(pattern)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def expect_more(self, n: int, timeout: float = 10.0) -> None:
        """Wait until at least `n` more bytes are shown (kept for the next `expect`)."""
        deadline, want = time.monotonic() + timeout, len(self.buf) + n
        while len(self.buf) < want:
            data = self._read(deadline)
            if not data or data == b"<EOF>":
                raise AssertionError(f"{n} more bytes did not come within {timeout}s: ...{self.buf[-1500:]!r}")
            self.buf += data

    def type(self, line: str, until: bytes = PROMPT) -> bytes:
        """Type `line` and Enter; what the chat shows until `until` (by default: the next prompt)."""
        os.write(self.fd, line.encode() + b"\r")
        return self.expect(until)

    def ctrl_c_at_the_prompt(self) -> None:
        # CPython's readline checks for signals only when its select() is interrupted: a SIGINT that
        # lands just before the select (right after the prompt is drawn) waits for the next key.
        # A person is never that fast; give the chat a moment to be waiting.
        time.sleep(0.2)
        os.write(self.fd, b"\x03")

    def exit_status(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if self._read(min(deadline, time.monotonic() + 0.1)) == b"<EOF>":
                break
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def terminal(tmp_path):
    opened = []

    def start(*args: str) -> Terminal:
        opened.append(Terminal(["chat", *map(str, args)], tmp_path))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


def test_chat_on_a_terminal(model_dir, terminal, tmp_path):
    (n_hello, hello), (n_again, _) = reference(model_dir, ["hello", "hello"])
    (n_lines, lines), = reference(model_dir, ["line one \nline two"])
    (n_code, code), = reference(model_dir, ["def f(x):\n    return x \\"])
    chat = terminal(model_dir, "--max-new-tokens", "8")

    banner = chat.expect(PROMPT).decode()
    assert f"poelm chat: {model_dir} (base 'm' 2 layers)" in banner
    assert "greedy; at most 8 new tokens per answer" in banner
    assert "/help for commands, /exit or Ctrl-D to leave" in banner and '"""' in banner

    shows = chat.type("/help").decode()
    assert all(c in shows for c in ("/help", "/reset", "/stats on|off", "/exit, /quit", '"""', "//text"))
    assert not STATS.search(shows)  # nothing went to the model: no answer, so no stats line

    shows = chat.type("hello")
    assert shown(hello) in shows and f"tok/s); engine; prompt {n_hello} tokens".encode() in shows
    assert f"prompt {n_again} tokens".encode() in chat.type("hello")  # the conversation goes on
    assert b"(a new conversation)" in chat.type("/reset")
    shows = chat.type("hello")  # as in a fresh chat
    assert shown(hello) in shows and f"prompt {n_hello} tokens".encode() in shows

    assert b"(stats off)" in chat.type("/stats off")
    chat.type("/reset")
    shows = chat.type("hello")
    assert shown(hello) in shows and not STATS.search(shows.decode(errors="replace"))
    chat.type("/stats on")

    # multi-line: a trailing backslash continues; a """ block is verbatim (its backslash stays)
    chat.type("/reset")
    chat.type("line one \\", until=MORE)
    shows = chat.type("line two")
    assert shown(lines) in shows and f"prompt {n_lines} tokens".encode() in shows
    chat.type("/reset")
    for line in ('"""', "def f(x):", "    return x \\"):
        chat.type(line, until=MORE)
    shows = chat.type('"""')
    assert shown(code) in shows and f"prompt {n_code} tokens".encode() in shows

    assert b"unknown command /nope: /help lists the commands" in chat.type("/nope")
    chat.ctrl_c_at_the_prompt()  # a hint, and the chat stays
    assert b"Ctrl-C again, Ctrl-D or /exit to leave" in chat.expect(PROMPT)
    os.write(chat.fd, b"\x04")  # Ctrl-D
    assert chat.exit_status() == 0
    history = (tmp_path / "cache" / "poelm" / "chat_history").read_text()
    assert "/help" in history and "line one \\" in history


def test_ctrl_c_stops_an_answer_and_twice_at_the_prompt_leaves(model_dir, terminal):
    """Ctrl-C in an answer stops it and the chat goes on (twice: the stopped answer stays in the
    conversation); at the prompt Ctrl-C discards the typed line with a hint, and Ctrl-C again leaves with
    status 0. One terminal session for both (each costs a fresh interpreter); /exit: the piped test."""
    from poelm.core.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir)
    chat = terminal(model_dir, "--max-new-tokens", "4000")
    chat.expect(PROMPT)
    stopped = []
    for text in ("hello", "hi"):
        os.write(chat.fd, text.encode() + b"\r")
        chat.expect(text.encode() + b"\r\n")
        chat.expect_more(40)  # the answer has begun (seconds before its end)
        os.write(chat.fd, b"\x03")
        shows = chat.expect(PROMPT).decode(errors="replace")
        m = re.search(r"\(stopped\)\r\n(\d+) tokens in .*; engine; prompt (\d+) tokens", shows)
        assert m, shows
        stopped.append((int(m[1]), int(m[2])))
    (n1, _), (n2, prompt2) = stopped
    assert 0 < n1 < 4000 and 0 < n2 < 4000
    # The stopped answer stays in the conversation: the next prompt holds more than an empty answer would.
    empty = tok.render_prompt([{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""},
                               {"role": "user", "content": "hi"}])
    assert prompt2 > len(empty)
    assert b"/reset" in chat.type("/help")
    os.write(chat.fd, b"half a line")
    chat.expect(b"half a line")
    chat.ctrl_c_at_the_prompt()  # the typed line is discarded
    assert b"(Ctrl-C again" in chat.expect(PROMPT)
    chat.ctrl_c_at_the_prompt()
    assert chat.exit_status() == 0


def test_piped_answers_alone_on_stdout(model_dir, capsys, monkeypatch):
    (_, hello), (_, quit_) = reference(model_dir, ["hello", "/quit"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\nhello\n/stats off\n/reset\nhello\n//quit\n/nope\n"
                                                  "/stats maybe\n/quit\nnot read\n"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{hello}\n{hello}\n{quit_}\n"  # the second hello after /reset; //quit sends /quit
    assert "poelm chat:" not in err and "> " not in out  # no banner, no prompt
    assert "/stats on|off" in err and "unknown command /nope" in err and "/stats takes on or off" in err
    assert len(STATS.findall(err)) == 1  # stats on until /stats off
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\nhello\n"))  # /exit leaves as /quit does
    assert main(["chat", str(model_dir), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == f"{hello}\n"


def test_too_long_conversations_drop_their_oldest_exchanges(tiny_tokenizer_dir, tmp_path, capsys, monkeypatch):
    from poelm.core.tokenizer import Tokenizer

    model = tmp_path / "short"
    assert main(["init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2", "--n-embd", "64", "--n-head", "2",
                 "--n-kv-head", "1", "--seq-len", "64", "--out", str(model)]) == 0
    capsys.readouterr()
    tok = Tokenizer.load(model)
    message = "the model " * 16
    assert 32 <= len(tok.render_prompt([{"role": "user", "content": message}])) < 64 - 8  # one turn fits, two do not
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{message}\n{message}\n{'the model ' * 40}\nhello\n"))
    assert main(["chat", str(model), "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "(the conversation outgrew the model's context of 64 tokens: dropped the oldest 1 exchange)" in err
    assert "(not sent: the message is" in err and "the model's context holds 64)" in err
    assert len(STATS.findall(err)) == 3  # the message that did not fit was not answered; the chat went on


def test_message_grammar(monkeypatch):
    from poelm.app.chat import Chat

    text = ('one \\\ntwo\n\n   \n"""\nx \\\n\n  y\n"""\n//path\n /Help me\n"""\n"""\n'
            "/stats on\nlast \\\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    chat = Chat(None, None, None, interactive=False)
    entries = []
    while (entry := chat.read_message()) is not None:
        entries.append(entry)
    assert entries == [("message", "one \ntwo"), ("message", "x \\\n\n  y"), ("message", "/path"),
                       ("command", "/Help me"), ("message", ""), ("command", "/stats on"), ("message", "last ")]


def test_banner_names_the_chain_and_the_mode(model_dir, tmp_path):
    from poelm.app.chat import banner
    from poelm.infer import DecodeMode, SamplingParams, make_decoder
    from poelm import models
    from poelm.core.tokenizer import Tokenizer

    stage = tmp_path / "code"
    assert main(["specialist", "attach", str(model_dir), "--layers", "1", "--name", "code", "--out", str(stage)]) == 0
    mode = DecodeMode(exit_stage=0)
    decoder = make_decoder(models.open(stage).model(), mode, tokenizer=Tokenizer.load(stage))
    params = SamplingParams(max_new_tokens=32, temperature=0.7, top_k=5, seed=3)
    text = banner(stage, decoder, params, mode, stats=False)
    assert f"poelm chat: {stage} (base 'm' 2 layers -> stage 'code' +1 layer)" in text
    assert "3 layers in stages [1, 1, 1], context 4096 tokens" in text
    assert ("decoding: engine, exit stage 0, predictor " in text
            and "sampling at temperature 0.7, top-k 5, seed 3 (+1 per turn); at most 32 new tokens per answer; "
                "stats off" in text)

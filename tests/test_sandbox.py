"""The sandbox (poelm/eval/sandbox.py, _sandbox_box.py) against hostile programs.

Every attack is put into a HumanEval-shaped task (entry point `add`, a test that checks `add(2, 3) == 5`
and `add(-1, 1) == 0`), at module level or inside `add`, and run through `run_program`/`run_many` with
that test. Design choices:
- Each attack test is parametrized over the user configurations this machine has (`who`): "current"
  (as the tests run; as root that is a root that drops the samples to nobody) and, where the tests run
  as root, "root-allowed" (allow_root=True with the drop simulated as failed: the samples run as root
  without capabilities). An ordinary user has "current" only.
- Each run must fail with exactly the reason the OS gave. Attacks past the Python guard (ctypes, the
  real FileIO class, shm_open, a socket bind) report the OS's answer ("EROFS", "EAGAIN", ...) as the
  value `add` returns, which TELLING_TEST shows in its assertion message: the expected answer is
  derived from the layers `isolation()` reports for that configuration, so a layer that stops working
  fails a test. Where isolation() says the machine lacks a layer, the attack that needs it is skipped
  with isolation's words; `test_isolation_matches_an_independent_oracle` checks those words against
  plain subprocesses, so a layer cannot silently go missing either way.
- The autouse fixtures check every test: `caller` keeps a results file, a model directory and a canary
  in a world-writable directory (so only the guard and the OS's read-only view protect them, not file
  permissions) plus a private canary, all byte-, mode- and link-count identical afterwards; `leftovers`
  checks that each sandbox directory is gone, that the verifier's and the sample's processes are gone,
  that no process has its cwd or command line in a box, and that no file carrying MARK (every name an
  attack creates outside its box carries it) is left in /tmp, /dev/shm or /var/tmp.
- Reasons never carry the program's own text: `test_program_text_never_reaches_the_reason` tries every
  channel (output, exception messages, class names, guard-shaped messages, exit codes, line numbers).
- A known gap is recorded as a strict xfail, so that closing it fails the test until the mark goes:
  a unix socket in the file system that the sample's uid may connect to is reachable.
- Where no configuration can change the outcome (the verdict protocol, the exit words, the resource
  limits: the verifier sets them before the sample takes its identity, and no configuration leaves the
  sample a capability to raise them, which test_identity_and_limits_inside checks in each), the test runs
  in the first configuration in `make test` and in the others under `-m slow` (SAME_FOR_EVERY_USER).
  Every attack whose outcome depends on the user (files, forks, signals, processes, namespaces, what
  isolation() says) runs in every configuration.
- Small limits (a 0.5 s wall clock where a timeout is the point) and run_many batches keep the file short.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from poelm.core.errors import PoelmError
from poelm.eval import sandbox
from poelm.eval.sandbox import Limits, Outcome, Task, isolation, run_many, run_program

FAST = Limits(timeout_s=3, cpu_s=2, memory_mb=256, output_mb=1)
MARK = f"poelm-hostile-{os.getpid()}"  # in every name an attack creates outside its box
SHARED_DIRS = ("/tmp", "/dev/shm", "/var/tmp")
CANNOT_DROP = "chown to uid 65534 failed: EPERM (simulated)"

TEST = """
def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0

check(add)
"""
# The same test, whose message shows what `add` returned: how an attack reports what the OS told it.
TELLING_TEST = """
def check(candidate):
    got = candidate(2, 3)
    assert got == 5, f"got {got!r}"
    assert candidate(-1, 1) == 0

check(add)
"""
HONEST = "def add(a, b):\n    return a + b\n"
# Raw calls past the guard: `answer` turns a libc return value, `tried` a Python call, into what the OS
# said ("ok" or an errno's name); an attack stores its answers in R and `add` returns them.
RAW = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)

def answer(ret):
    return "ok" if ret >= 0 else errno.errorcode[ctypes.get_errno()]

def tried(fn, *args):
    try:
        fn(*args)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__)
"""


def at_load(snippet: str) -> str:
    """The snippet at module level, before an honest `add`: only the snippet can make it fail."""
    return textwrap.dedent(snippet).strip("\n") + "\n\n" + HONEST


def in_add(snippet: str) -> str:
    """The snippet inside `add`, run when the test calls it."""
    return "def add(a, b):\n" + textwrap.indent(textwrap.dedent(snippet).strip("\n"), "    ") + "\n    return a + b\n"


def raw(snippet: str) -> str:
    """A raw attack that stores what the OS answered in R, which `add` returns (see TELLING_TEST)."""
    return RAW + textwrap.dedent(snippet).strip("\n") + "\n\ndef add(a, b):\n    return R\n"


def got(value) -> str:
    return f"AssertionError: got {value!r}"


def refused(what: str, when: str = "while loading") -> str:
    return f"the program raised PermissionError {when}: sandbox: {what}"


def outside(function: str) -> str:
    return f"{function} outside the work directory is disabled"


def writing(function: str) -> str:
    return f"{function} for writing outside the work directory is disabled"


# --- who runs the samples ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Who:
    name: str
    allow_root: bool
    words: dict  # isolation(allow_root) under this configuration
    uid: int  # the identity the kernel checks file permissions against (outside any user namespace)
    gids: frozenset

    @property
    def forks_refused(self) -> bool:
        return "fork refused by the OS (EAGAIN: RLIMIT_NPROC=0)" in self.words["processes"]

    @property
    def pid_ns(self) -> bool:
        return self.words["processes"].startswith("own PID namespace")

    @property
    def files_confined(self) -> bool:
        return "own mount namespace" in self.words["files"] and "refused by the OS (" in self.words["files"]

    @property
    def net_ns(self) -> bool:
        return self.words["network"].startswith("own network namespace")

    def needs(self, layer: str) -> None:
        """Skip, with isolation's words, an attack that only the missing layer `layer` would stop."""
        key = {"pid_ns": "processes", "files_confined": "files", "net_ns": "network"}[layer]
        if not getattr(self, layer):
            pytest.skip(f"{self.name}: this machine gives no such layer ({self.words[key]})")

    def run(self, program: str, test: str = TELLING_TEST, limits: Limits = FAST) -> Outcome:
        return run_program(program, limits, test=test, entry_point="add", allow_root=self.allow_root)

    def cases(self, cases: list[tuple[str, str | set[str]]], test: str = TELLING_TEST, limits: Limits = FAST,
              workers: int = 2) -> list[Outcome]:
        """Run each (program, reason) two at a time: every one must fail with exactly its reason (or one of
        a set of reasons, where the OS's scheduling decides between two failures)."""
        tasks = [Task(program, test, entry_point="add") for program, _ in cases]
        outcomes = run_many(tasks, limits, workers=workers, allow_root=self.allow_root)
        # a set of reasons is matched by any of its members (and shown whole, so the diff stays readable)
        shown = [r if not isinstance(r, str) and o.reason in r else o.reason for o, (_, r) in zip(outcomes, cases)]
        assert [(o.passed, reason) for o, reason in zip(outcomes, shown)] == [(False, r) for _, r in cases]
        return outcomes


def _users() -> list[str]:
    if os.geteuid() != 0:
        return ["current"]
    try:
        sandbox._sandbox_user(allow_root=False)
    except PoelmError:
        return ["root-allowed"]  # a root that really cannot drop: only the caller's permission runs it
    return ["current", "root-allowed"]


USERS = _users()
_ROOT_WORDS: dict = {}  # isolation(True) of a root that cannot drop, probed once
_CURRENT_WORDS: dict = {}  # isolation() as the tests run, probed once (the root-allowed teardown clears
# sandbox's own cache, which would otherwise cost a probe in every "current" test after a "root-allowed" one)
# `who` for a test that no configuration can change (see the module docstring): the first configuration in
# make test, every other one under -m slow.
SAME_FOR_EVERY_USER = pytest.mark.parametrize(
    "who", [USERS[0], *(pytest.param(user, marks=pytest.mark.slow) for user in USERS[1:])], indirect=True)


@pytest.fixture(params=USERS)
def who(request, monkeypatch) -> Who:
    if request.param == "current":
        user = sandbox._sandbox_user(allow_root=False)  # None: not root, the samples keep the caller's ids
        ids = (user["uid"], {user["gid"]}) if user else (os.getuid(), {os.getgid(), *os.getgroups()})
        if not _CURRENT_WORDS:
            _CURRENT_WORDS.update(isolation())
        yield Who("current", False, dict(_CURRENT_WORDS), ids[0], frozenset(ids[1]))  # a dropped sample has no groups
        return
    monkeypatch.setattr(sandbox, "_can_hand_over", lambda uid, gid: CANNOT_DROP)
    sandbox._probe.cache_clear()  # isolation(True) must be probed under the simulated failure
    if not _ROOT_WORDS:
        _ROOT_WORDS.update(isolation(allow_root=True))
    yield Who("root-allowed", True, dict(_ROOT_WORDS), 0, frozenset({0, *os.getgroups()}))
    sandbox._probe.cache_clear()  # and its words must not outlive the simulation


# --- what every test checks afterwards ---------------------------------------------------------------

@dataclass(frozen=True)
class Caller:
    dir: Path  # world-writable, in /tmp: only the guard and the OS's read-only view protect it
    results: Path
    model: Path
    canary: Path
    private: Path  # a canary in the test's own tmp_path (0600)


def _snapshot(root: Path) -> dict:
    """Every entry under root: its type, mode, owner, link count and bytes."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = Path(path).read_bytes() if os.path.isfile(path) and not os.path.islink(path) else None
            seen[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, data)
    return seen


@pytest.fixture(autouse=True)
def caller(tmp_path) -> Caller:
    top = Path(tempfile.mkdtemp(prefix="poelm-caller-"))
    top.chmod(0o777)
    (top / "model").mkdir(mode=0o777)
    (top / "model").chmod(0o777)
    files = {top / "results.jsonl": b'{"task_id": "HumanEval/0", "passed": false}\n',
             top / "canary.txt": b"canary outside the box\n",
             top / "model" / "config.json": b'{"n_layer": 2}\n',
             top / "model" / "model.safetensors": bytes(range(256)) * 4,
             tmp_path / "canary.txt": b"the caller's private canary\n"}
    for path, data in files.items():
        path.write_bytes(data)
        path.chmod(0o600 if path.parent == tmp_path else 0o666)
    before = (_snapshot(top), _snapshot(tmp_path))
    try:
        yield Caller(top, top / "results.jsonl", top / "model", top / "canary.txt", tmp_path / "canary.txt")
        assert (_snapshot(top), _snapshot(tmp_path)) == before, "the caller's files changed"
    finally:
        shutil.rmtree(top)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited


def _in_boxes(boxes: list[str]) -> list[str]:
    """Every process whose cwd or command line names one of the boxes."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if _running(int(pid)) and any(box in cwd or box in cmdline for box in boxes):
            found.append(f"{pid}: {cmdline[:200]!r} in {cwd!r}")
    return found


@pytest.fixture(autouse=True)
def leftovers(monkeypatch):
    """Record every box, verifier and sample; afterwards all are gone, and nothing carries MARK."""
    boxes, verifiers, samples = [], [], []
    real_mkdtemp, real_popen, real_wait_gone = tempfile.mkdtemp, subprocess.Popen, sandbox._wait_gone

    def mkdtemp(*args, **kwargs):
        path = real_mkdtemp(*args, **kwargs)
        if os.path.basename(path).startswith("poelm-sandbox-"):
            boxes.append(path)
        return path

    def popen(args, *rest, **kwargs):
        proc = real_popen(args, *rest, **kwargs)
        if str(sandbox.BOX) in map(str, args):
            verifiers.append(proc.pid)
        return proc

    def wait_gone(pid, *args, **kwargs):
        samples.append(pid)
        return real_wait_gone(pid, *args, **kwargs)

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(sandbox.subprocess, "Popen", popen)
    monkeypatch.setattr(sandbox, "_wait_gone", wait_gone)
    yield
    marked = [os.path.join(d, n) for d in SHARED_DIRS if os.path.isdir(d) for n in os.listdir(d) if MARK in n]
    for path in marked:  # one test's leftover must not fail the next
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    assert marked == [], "files left outside the box"
    assert [b for b in boxes if os.path.lexists(b)] == [], "sandbox directories left"
    assert len(samples) == len(verifiers), "a verifier did not report its sample"
    assert all(type(pid) is int and pid > 0 for pid in samples), samples
    assert [pid for pid in verifiers + samples if _running(pid)] == [], "a verifier or sample still runs"
    assert _in_boxes(boxes) == [], "processes left in a box"


@pytest.fixture
def victim():
    """A process of the caller's, with MARK in its command line: it must survive and stay unseen."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{MARK}-victim"])
    yield proc
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    assert alive, f"the caller's process was killed: {proc.returncode}"


# --- ordinary programs -------------------------------------------------------------------------------------

def test_ordinary_outcomes():
    """Right, wrong, broken and missing entry points, with and without a test."""
    cases = [(HONEST, True, "passed"),
             (HONEST.replace("a + b", "a - b"), False, "AssertionError"),
             ("def add(a, b:\n    return a + b\n", False, "the program raised SyntaxError while loading (line 1)"),
             ("def add(a, b):\n    return a + c\n", False, "the program raised NameError during the tests"),
             ("def plus(a, b):\n    return a + b\n", False, "the program raised NameError during the tests"),
             ("for i in range(1000):\n    print(i)\n" + HONEST, True, "passed"),  # output within the limit
             (HONEST.replace("a + b", "(a, b)"), False, "AssertionError")]
    outcomes = run_many([Task(p, TEST, entry_point="add") for p, _, _ in cases], FAST, workers=2)
    assert [(o.passed, o.reason) for o in outcomes] == [(p, r) for _, p, r in cases]
    assert all(0 < o.seconds < FAST.timeout_s for o in outcomes)
    shown = run_program(HONEST.replace("a + b", "a * b"), FAST, test=TELLING_TEST, entry_point="add")
    assert not shown.passed and shown.reason == got(6)  # the test's own message is its words
    bare = run_many(["x = 1", "assert 1 == 2, 'one is not two'"], FAST)  # no test: the program's own word
    assert [(o.passed, o.reason) for o in bare] == [(True, "passed"),
                                                    (False, "the program raised AssertionError while loading")]
    setup = run_program(HONEST, FAST, test=TEST, setup="raise ValueError('bad prompt')", entry_point="add")
    assert not setup.passed and setup.reason == "the test's setup failed: ValueError: bad prompt"


def test_stdlib_and_clean_environment(monkeypatch):
    """The program sees the stdlib (also after the drop), exactly the five variables, hash seed 0, an
    empty private directory as cwd, HOME and TMPDIR; not the caller's variables."""
    monkeypatch.setenv("POELM_SECRET", "s3cret")
    outcome = run_program(at_load("""
        import collections.abc, decimal, fractions, hashlib, json, math, os, re, statistics, sys, typing
        assert "x".encode("cp1252") == b"x"  # a codec imported after the sandbox was set up
        assert math.gcd(12, 18) == 6 and hashlib.md5(b"").hexdigest().startswith("d41d8")
        assert sorted(os.environ) == ["HOME", "LANG", "PATH", "PYTHONHASHSEED", "TMPDIR"]
        assert os.environ["PATH"] == "/usr/bin:/bin" and os.environ["LANG"] == "C.UTF-8"
        assert os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd()
        assert os.path.basename(os.getcwd()) == "work" and os.listdir(".") == []
        assert sys.flags.hash_randomization == 0
        open("scratch.txt", "w").write("mine")  # its own directory is writable
        os.makedirs("a/b")
        os.rename("scratch.txt", "a/b/moved.txt")
    """), FAST, test=TEST, entry_point="add")
    assert outcome.passed, outcome.reason


def test_program_is_not_in_argv_or_environment():
    """The program reaches the sample's process on a pipe: neither argv nor the environment carries it."""
    outcome = run_program(at_load("""
        # program_marker_7f3a
        import os, sys
        mark = "program_" + "marker_7f3a"
        assert not any(mark in a for a in sys.argv)
        assert not any(mark in v for v in os.environ.values())
        assert not any(mark in open(f"/proc/{p}/cmdline").read() for p in os.listdir("/proc") if p.isdigit())
    """), FAST, test=TEST, entry_point="add")
    assert outcome.passed, outcome.reason


# --- forged passes -------------------------------------------------------------------------------------------

def forge_all_fds(end: bytes, write: str = "os.write(fd, data)") -> str:
    """A snippet writing forged reports, each followed by `end`, to every fd from 3 to 63."""
    return textwrap.dedent(f"""
        for fd in range(3, 64):
            for report in (b'{{"passed": true}}', b'{{"passed": true, "reason": "passed"}}', b'{{"loaded": true}}'):
                data = report + {end!r}
                try:
                    {write}
                except OSError:
                    pass
    """)


@SAME_FOR_EVERY_USER
def test_forged_reports_then_exit_fail(who):
    """A report written to every inherited fd, then an exit before a failing assert: the verdict is the
    verifier's, so nothing written shows, only the exit. A whole line on fd 3 (the reply pipe) is read
    as the answer to the load; whether the sample is gone before the verifier's next request decides
    between two failures."""
    exited = "the program exited before the tests finished (exit code 0)"
    not_a_value = "the program answered with something that is not a value"
    wrong = HONEST.replace("a + b", "a - b")
    who.cases([
        ("import os\n" + forge_all_fds(b" ") + "os._exit(0)\nassert False\n" + wrong, exited),
        ("import os\n" + forge_all_fds(b"\n") + "os._exit(0)\nassert False\n" + wrong, {exited, not_a_value}),
        (RAW + forge_all_fds(b" ", "libc.write(fd, data, len(data))") + "libc._exit(0)\n" + wrong, exited),
        (at_load("print('{\"passed\": true}', flush=True)\nimport os\nos._exit(0)"), exited),
        ("import os\n" + in_add(forge_all_fds(b"\n") + "os._exit(0)"), not_a_value),  # its line was the reply
    ], test=TEST)


@SAME_FOR_EVERY_USER
def test_forged_reports_then_endless_loop_is_a_timeout(who):
    """A timeout is a failure whatever was written before it. (Whole lines on fd 3 would be read as the
    answers, and fail at once as in test_forged_reports_then_exit_fail.)"""
    limits = Limits(timeout_s=0.5, cpu_s=10, memory_mb=256, output_mb=1)  # the wall clock, not the CPU, ends it
    loop = "while True:\n    pass\n"  # reports without a newline: the verifier waits on, for an answer
    outcomes = who.cases([(at_load("import os\n" + forge_all_fds(b" ") + loop), "timeout after 0.5 s"),
                          ("import os\n" + in_add(forge_all_fds(b" ") + loop), "timeout after 0.5 s")],
                         test=TEST, limits=limits)
    assert all(0.5 <= o.seconds < 2.5 for o in outcomes)


@SAME_FOR_EVERY_USER
def test_forged_answers_pass_only_with_the_expected_values(who):
    """Lines forged on the reply pipe are answers like any other: the control with the right values
    passes (it is what a right program returns); every wrong value, however it is written, fails."""
    forge = "import os\nos.write(3, {lines!r})\n" + HONEST.replace("a + b", "None")
    right = who.run(forge.format(lines=b'{"loaded": true}\n{"ok": 5}\n{"ok": 0}\n'), test=TEST)
    assert right.passed, right.reason
    wrong_value = "AssertionError"
    not_a_value = "the program answered with something that is not a value"
    cases = [(b'{"ok": 6}\n{"ok": 0}\n', wrong_value),
             (b'{"ok": "5"}\n', wrong_value),
             (b'{"ok": [5]}\n', wrong_value),
             (b'{"ok": {"t": [5]}}\n', wrong_value),  # the tuple (5,)
             (b'{"ok": {"b": "5"}}\n', wrong_value),  # the bytes b"5"
             (b'{"ok": true}\n', wrong_value),
             (b'{"ok": null}\n', wrong_value),
             (b'{"ok": 5}\n{"ok": 1}\n', wrong_value),  # right once, then wrong
             (b'{"ok": {"t": 5}}\n', not_a_value),  # a tag without a list
             (b'{"ok": {"x": [5]}}\n', not_a_value),  # an unknown tag
             (b'{"ok": {"d": [[[1], 2]]}}\n', not_a_value),  # an unhashable key
             (b'{"passed": true}\n', not_a_value),
             (b'{"ok": 5, "passed": true}\n{"passed": true}\n', not_a_value),
             (b'["ok", 5]\n', "the program was killed by signal 9"),  # not an object: the protocol ends
             (b'{"ok": 5\n', "the program was killed by signal 9")]
    who.cases([(forge.format(lines=b'{"loaded": true}\n' + lines), reason) for lines, reason in cases], test=TEST)
    # The program's own json made to answer 5 to everything: right once, wrong for add(-1, 1). And floods
    # of the reply pipe, endless or one line of a 50-million-digit number: the verifier gives up on them
    # (or its RLIMIT_CPU ends it first, on a slower machine): a failure either way.
    patched = at_load("import json\nreal = json.dumps\njson.dumps = lambda m: real({'ok': 5} if 'ok' in m else m)")
    flooded = {"the program was killed by signal 9", "the sandbox's verifier ended without a verdict"}
    who.cases([(patched, "AssertionError"),
               (at_load("import os\nchunk = b'7' * 2**20\nwhile True:\n    os.write(3, chunk)"), flooded),
               (at_load("import os\nos.write(3, b'{\"ok\": ' + b'9' * 50_000_000 + b'}\\n')"), flooded)], test=TEST)


@SAME_FOR_EVERY_USER
def test_objects_that_claim_equality_never_pass(who):
    """Only plain data crosses: an object whose __eq__ is always True, and subclasses of int, str, list,
    float and dict (even holding the right value), are refused before any comparison."""
    not_plain = "the program returned a value, which is not plain data"
    who.cases([
        (at_load("class Same:\n    def __eq__(self, other):\n        return True\n")
         + "def add(a, b):\n    return Same()\n", not_plain),
        ("class I(int):\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return I(a + b)\n",
         not_plain),
        ("class S(str):\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return S('5')\n",
         not_plain),
        ("class L(list):\n    __eq__ = lambda self, other: True\n\ndef add(a, b):\n    return L([a + b])\n", not_plain),
        ("class F(float):\n    pass\n\ndef add(a, b):\n    return F(a + b)\n", not_plain),
        ("class D(dict):\n    pass\n\ndef add(a, b):\n    return D()\n", not_plain),
        ("class Same:\n    __eq__ = lambda self, other: True\n\ndef add(a, b):\n    return [Same()]\n",
         "the program returned a list, which is not plain data"),
        ("import types\ndef add(a, b):\n    return types.SimpleNamespace(value=a + b)\n",
         "the program returned a SimpleNamespace, which is not plain data"),
        ("def add(a, b):\n    return (x for x in [a + b])\n",
         "the program returned a generator, which is not plain data"),
    ], test=TEST)


# --- the program's own text ----------------------------------------------------------------------------------

SECRET = "s3cret" + "x" * 291 + "END"  # 300 characters


@SAME_FOR_EVERY_USER
def test_program_text_never_reaches_the_reason(who):
    """Reasons are worded from facts: no output, exception message, class name, guard-shaped message,
    exit code or line number of the program's carries its text into the results."""
    number = int.from_bytes(SECRET.encode(), "big")
    s = repr(SECRET)
    cases = [
        (at_load(f"import sys\nprint({s})\nsys.stderr.write({s} * 2)\nassert False, {s}"),
         "the program raised AssertionError while loading"),
        (at_load(f"raise ValueError({s})"), "the program raised ValueError while loading"),
        (f"def add(a, b):\n    raise KeyError({s})\n", "the program raised KeyError during the tests"),
        (f"import sys\ndef add(a, b):\n    print({s}, file=sys.stderr)\n    return {s}\n", "AssertionError"),
        (at_load("class s3cret_in_a_class_name(Exception):\n    pass\n\nraise s3cret_in_a_class_name()"),
         "the program raised an exception while loading"),
        (at_load("raise PermissionError('sandbox: os.s3cret_shaped_like_the_guard is disabled')"),
         "the program raised PermissionError while loading"),
        (at_load(f"raise SystemExit({number})"), "the program exited before the tests finished (SystemExit)"),
        (at_load(f"raise SystemExit({s})"), "the program exited before the tests finished (SystemExit: None)"),
        (at_load(f"raise SyntaxError({s}, ('program.py', {number}, 1, {s}))"),
         "the program raised SyntaxError while loading"),
        (f"def add(a, b):\n    {SECRET}\n", "the program raised NameError during the tests"),
        ("class s3cret_type(int):\n    pass\n\ndef add(a, b):\n    return s3cret_type(5)\n",
         "the program returned a value, which is not plain data"),
        (at_load("import os\nos.write(3, b'{\"error\": {\"type\": \"s3cret\", \"line\": " + str(number)
                 + ", \"guard\": \"sandbox: s3cret is disabled\"}}\\n')\nimport time\ntime.sleep(5)"),
         "the program raised an exception while loading"),  # forged facts are checked too
    ]
    outcomes = who.cases(cases, test=TEST)
    for outcome in outcomes:
        assert "s3cret" not in outcome.reason and str(number)[:20] not in outcome.reason


# --- limits ---------------------------------------------------------------------------------------------------

@SAME_FOR_EVERY_USER
def test_memory_bombs(who):
    """RLIMIT_AS, the only layer for memory: the bomb ends in a MemoryError, also past Python (malloc)."""
    memory = "memory limit (MemoryError)"
    who.cases([(at_load("x = bytearray(10**10)"), memory),
               (at_load("x = []\nwhile True:\n    x.append(' ' * 10**6)"), memory),
               (at_load("def grow(n):\n    return [0] * n + grow(2 * n)\n\ngrow(10**6)"), memory),
               (in_add("x = [0] * 10**10"), memory),
               (raw("R = 'ENOMEM' if libc.malloc(1 << 30) == 0 else 'allocated'"), got("ENOMEM"))])


@SAME_FOR_EVERY_USER
def test_output_floods(who):
    """RLIMIT_FSIZE on the output files and on files of its own: the limit ends the run quickly."""
    output = "output limit (1 MB)"
    outcomes = who.cases([
        (at_load("import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)"), output),
        (at_load("import sys\nwhile True:\n    print('y' * 2**16, file=sys.stderr)"), output),
        (at_load("print('z' * 2**21)"), output),
        (at_load("with open('big', 'wb') as f:\n    f.write(b'0' * 2**21)"), output),
        (at_load("import os\nwhile True:\n    os.write(1, b'w' * 2**16)"), output),
        (in_add("print('z' * 2**21)"), output),
        (raw("buf = b'v' * 2**16\nwhile libc.write(1, buf, len(buf)) > 0:\n    pass\nR = answer(-1)"), got("EFBIG")),
    ])
    assert all(o.seconds < 2.5 for o in outcomes)  # the limit, not the 3 s timeout, ended them


@SAME_FOR_EVERY_USER
def test_cpu_limit(who):
    """RLIMIT_CPU ends a busy loop before a long wall clock, even one that ignores SIGXCPU: the reason is
    the CPU limit, not the timeout (no tighter wall bound: on a loaded machine one CPU-second takes longer)."""
    limits = Limits(timeout_s=10, cpu_s=1, memory_mb=256, output_mb=1)
    outcomes = who.cases([(at_load("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n"
                                   "    pass"), "cpu time limit"),
                          (in_add("while True:\n    pass"), "cpu time limit")], limits=limits)
    assert all(o.seconds < limits.timeout_s for o in outcomes)


@SAME_FOR_EVERY_USER
def test_wall_clock(who):
    """A sleeper uses no CPU: the wall clock ends it, at module level or inside add."""
    limits = Limits(timeout_s=0.5, cpu_s=10, memory_mb=256, output_mb=1)
    outcomes = who.cases([(at_load("import time\ntime.sleep(100)"), "timeout after 0.5 s"),
                          ("import time\n" + in_add("while True:\n    time.sleep(1)"), "timeout after 0.5 s")],
                         limits=limits)
    assert all(0.5 <= o.seconds < 2.5 for o in outcomes)


# --- processes -----------------------------------------------------------------------------------------------

def test_fork_and_thread_bombs(who):
    """Through Python, every way to a new process is refused by the guard; past it (ctypes) the OS
    refuses forks where RLIMIT_NPROC binds (not root), and the children of a root that may fork die
    with the sample's PID namespace (the `leftovers` fixture checks)."""
    cases = [(at_load("import os\nwhile True:\n    os.fork()"), refused("os.fork is disabled")),
             (at_load("import multiprocessing\nmultiprocessing.Process(target=print).start()"),
              refused("os.fork is disabled")),
             (at_load("import pty\npty.fork()"), refused("os.fork is disabled")),
             (at_load("import subprocess\nsubprocess.run(['true'])"), refused("subprocess.Popen is disabled")),
             (at_load("import os\nos.system('true')"), refused("os.system is disabled")),
             (at_load("import os\nos.posix_spawn('/bin/true', ['true'], {})"), refused("os.posix_spawn is disabled")),
             (at_load("import os\nos.execv('/bin/true', ['true'])"), refused("os.execv is disabled")),
             (at_load("import _posixsubprocess\n_posixsubprocess.fork_exec()"), refused("subprocess is disabled")),
             ("import os\n" + in_add("os.fork()"), refused("os.fork is disabled", "during the tests")),
             (at_load("import threading, time\nwhile True:\n"
                      "    threading.Thread(target=time.sleep, args=(9,)).start()"),
              "the program raised RuntimeError while loading")]  # RLIMIT_NPROC, or as root RLIMIT_AS
    forks = """
        forked = 0
        for _ in range(8):
            pid = libc.fork()
            if pid == 0:
                libc.pause()  # a child that would outlive the sample without its PID namespace
                os._exit(0)
            if pid < 0:
                break
            forked += 1
        R = answer(pid) if forked == 0 else f"forked {forked}"
    """
    thread = ("import threading\ntry:\n    threading.Thread(target=print).start()\n    R = 'ok'\n"
              "except RuntimeError:\n    R = 'RuntimeError'\n")
    if who.forks_refused:
        cases += [(raw(forks), got("EAGAIN")), (raw(thread), got("RuntimeError")),
                  (raw("R = libc.system(b'touch /tmp/%s-system') >> 8" % MARK), got(127))]
    else:
        who.needs("pid_ns")  # only the PID namespace then ends the children
        cases += [(raw(forks), got("forked 8")), (raw(thread), got("ok"))]
    who.cases(cases)


def test_a_setsid_child_is_gone_when_the_run_returns(who):
    """A ctypes fork whose child leaves the session, sleeps and then writes a file: refused where forks
    are; otherwise (root allowed) the child is killed with the sample's PID namespace, before it writes."""
    outcome = who.run(raw(f"""
        pid = libc.fork()
        if pid == 0:
            libc.setsid()
            libc.usleep(500000)
            for path in (b"/tmp/{MARK}-late", b"late"):
                libc.close(libc.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            os._exit(0)
        R = answer(pid)
    """))
    if who.forks_refused:
        assert not outcome.passed and outcome.reason == got("EAGAIN")  # no child: nothing to wait for
    else:
        who.needs("pid_ns")
        assert not outcome.passed and outcome.reason == got("ok")  # forked: the OS let root fork
        time.sleep(1.0)  # past the child's sleep: had it survived, its file would be there now
    assert not os.path.exists(f"/tmp/{MARK}-late")


def test_signals_to_the_caller(who, victim):
    """Killing the parent, its group, everyone, or a process of the caller's: refused by the guard;
    past it, nothing outside the sample's PID namespace can even be named."""
    who.cases([(at_load("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"), refused("os.kill is disabled")),
               (at_load("import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)"),
                refused("os.killpg is disabled")),
               (at_load("import os, signal\nos.kill(-1, signal.SIGKILL)"), refused("os.kill is disabled")),
               (at_load(f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)"), refused("os.kill is disabled")),
               (at_load("import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)"),
                refused("os.pidfd_open is disabled")),
               (at_load("import signal, threading\nsignal.pthread_kill(threading.main_thread().ident, 9)"),
                refused("signal.pthread_kill is disabled"))])
    who.needs("pid_ns")
    who.cases([(raw(f"""
        R = [os.getppid(),
             answer(libc.kill({victim.pid}, 9)),  # a process of the caller's
             answer(libc.kill({os.getpid()}, 0)),  # the caller itself (signal 0: only asks)
             answer(libc.syscall(434, {victim.pid}, 0)),  # pidfd_open
             answer(libc.kill(-1, 9))]  # everyone it can reach: nobody but itself, which it spares
    """), got([0, "ESRCH", "ESRCH", "ESRCH", "ESRCH"]))])
    os.kill(os.getpid(), 0)  # the caller is still here


def test_other_processes_are_invisible(who, victim):
    """Every /proc/*/cmdline it can read is its own: the caller's processes (the victim carries MARK)
    are not in its PID namespace."""
    who.needs("pid_ns")
    who.cases([(raw(f"""
        seen = [p for p in os.listdir("/proc") if p.isdigit()]
        lines = [open(f"/proc/{{p}}/cmdline", "rb").read() for p in seen]
        R = [seen, any(b"{MARK}" in line for line in lines), all(b"sample" in line for line in lines)]
    """), got([["1"], False, True]))])


# --- exits --------------------------------------------------------------------------------------------------

@SAME_FOR_EVERY_USER
def test_exit_tricks(who):
    """Every way to end before (or during) the tests is a failure that says how it ended."""
    exited = "the program exited before the tests finished"
    cases = [(at_load("import sys\nsys.exit(0)"), f"{exited} (SystemExit: 0)"),
             (at_load("import sys\nsys.exit(3)"), f"{exited} (SystemExit: 3)"),
             (at_load("raise SystemExit"), f"{exited} (SystemExit: None)"),
             (at_load("import sys\nsys.exit('done')"), f"{exited} (SystemExit: None)"),
             (at_load("import os\nos._exit(0)"), f"{exited} (exit code 0)"),
             (at_load("import os\nos._exit(7)"), f"{exited} (exit code 7)"),
             (at_load("exit(0)"), refused("exit is disabled")),
             (at_load("quit()"), refused("quit is disabled")),
             (at_load("raise KeyboardInterrupt"), "the program raised KeyboardInterrupt while loading"),
             (at_load("import os\nos.kill(os.getpid(), 9)"), refused("os.kill is disabled")),
             ("import sys\n" + in_add("sys.exit(0)"), f"{exited} (SystemExit: 0)"),
             ("import os\n" + in_add("os._exit(0)"), f"{exited} (exit code 0)"),
             (RAW + in_add("libc._exit(0)"), f"{exited} (exit code 0)")]
    who.cases(cases, test=TEST)
    aborted = who.run(at_load("import os\nos.abort()"), test=TEST)
    # SIGABRT, or (as PID 1 of its namespace, which ignores it) the fault abort() falls back to
    assert not aborted.passed and aborted.reason in {f"the program was killed by signal {int(s)}" for s in
                                                     (signal.SIGABRT, signal.SIGSEGV, signal.SIGILL, signal.SIGTRAP)}


# --- files ---------------------------------------------------------------------------------------------------

def test_writes_to_the_callers_files(who, caller):
    """Results, model directory and canary: every Python way to write, remove or rename them is refused
    by the guard (fds and the _io module included); past it, the OS's read-only view refuses."""
    r, m, c = str(caller.results), str(caller.model), str(caller.canary)
    cases = [(at_load(f"open({r!r}, 'a').write('{{\"passed\": true}}')"), refused(writing("open"))),
             (at_load(f"open({r!r}, 'r+').write('x')"), refused(writing("open"))),
             (at_load(f"import io\nio.open({r!r}, 'ab')"), refused(writing("open"))),
             (at_load(f"import _io\n_io.open({r!r}, 'a')"), refused(writing("open"))),
             (at_load(f"import io\nio.FileIO({r!r}, 'a')"), refused(writing("FileIO"))),
             (at_load(f"import _io\n_io.FileIO({r!r}, 'w')"), refused(writing("FileIO"))),
             (at_load(f"import pathlib\npathlib.Path({c!r}).write_text('x')"), refused(writing("open"))),
             (at_load(f"import os\nos.close(os.open({c!r}, os.O_WRONLY | os.O_TRUNC))"), refused(writing("os.open"))),
             (at_load(f"import shutil\nopen('mine', 'w').write('x')\nshutil.copy('mine', {c!r})"),
              refused(writing("open"))),
             (at_load(f"import os\nos.remove({r!r})"), refused(outside("os.remove"))),
             (at_load(f"import os\nos.rename({r!r}, 'stolen')"), refused(outside("os.rename"))),
             (at_load(f"import os\nopen('mine', 'w').close()\nos.replace('mine', {r!r})"),
              refused(outside("os.replace"))),
             (at_load(f"import os\nos.truncate({c!r}, 0)"), refused(outside("os.truncate"))),
             (at_load(f"import os\nos.utime({c!r}, (0, 0))"), refused(outside("os.utime"))),
             (at_load(f"import os\nos.mkdir({m!r} + '/new')"), refused(outside("os.mkdir"))),
             (at_load(f"import shutil\nshutil.rmtree({m!r})"), refused("shutil.rmtree is disabled")),
             (at_load(f"import shutil\nshutil.move({m!r}, 'here')"), refused("shutil.move is disabled")),
             (at_load(f"import os\nos.chdir({m!r})\nopen('config.json', 'w')"), refused("os.chdir is disabled")),
             # chmod and chown of an fd opened for reading: the fd counts as the file it refers to
             (at_load(f"import os\nos.chmod(os.open({c!r}, os.O_RDONLY), 0o777)"),
              refused(outside("os.chmod"))),
             (at_load(f"import os\nos.chown(os.open({c!r}, os.O_RDONLY), 0, 0)"),
              refused(outside("os.chown"))),
             (at_load(f"import os\nos.fchmod(os.open({c!r}, os.O_RDONLY), 0o777)"),
              refused(outside("os.fchmod"))),
             (at_load(f"import os\nos.fchown(os.open({c!r}, os.O_RDONLY), 0, 0)"),
              refused(outside("os.fchown"))),
             (at_load(f"import os\nos.ftruncate(os.open({c!r}, os.O_RDONLY), 0)"),
              refused(outside("os.ftruncate")))]
    who.cases(cases)
    who.needs("files_confined")
    past = raw(f"""
        fd = os.open({c!r}, os.O_RDONLY)
        R = [answer(libc.open({r.encode()!r}, os.O_WRONLY | os.O_APPEND)),
             tried(type(sys.stdout.buffer.raw), {r!r}, "a"),  # the real FileIO class, past the guard's
             answer(libc.fchmod(fd, 0o777)), answer(libc.fchown(fd, 0, 0)),
             answer(libc.unlink({r.encode()!r})), answer(libc.rename({r.encode()!r}, {r.encode() + b".x"!r})),
             answer(libc.truncate({m.encode() + b"/config.json"!r}, 0)), answer(libc.rmdir({m.encode()!r})),
             answer(libc.creat({m.encode() + b"/new"!r}, 0o666)),
             answer(libc.rename({c.encode()!r}, b"stolen"))]  # into its own directory: another mount
    """)
    who.cases([(past, got(["EROFS"] * 9 + ["EXDEV"]))])


def test_writes_through_symlinks_and_hardlinks(who, caller):
    """A link in its own directory does not make a file outside its own: the guard resolves links (and
    refuses links to outside files); past it, a hard link crosses out of its private mount (EXDEV) and
    a write through a symlink meets the read-only view. The box's removal follows no link either."""
    r, c, m = str(caller.results), str(caller.canary), str(caller.model)
    who.cases([(at_load(f"import os\nos.symlink({r!r}, 'link')\nopen('link', 'a').write('x')"),
                refused(writing("open"))),
               (at_load(f"import os\nos.symlink({c!r}, 'link')\nos.open('link', os.O_WRONLY)"),
                refused(writing("os.open"))),
               (at_load(f"import os\nos.symlink({m!r}, 'dir')\nopen('dir/config.json', 'w')"),
                refused(writing("open"))),
               (at_load(f"import os\nos.link({r!r}, 'hard')"), refused(outside("os.link"))),
               (at_load(f"import os\nos.symlink('/etc/passwd', {m!r} + '/link')"),
                refused(outside("os.symlink")))])
    # Links left in the box for its removal: a symlink to the model directory, another to the results
    # file, in a directory made unreadable. The `caller` fixture checks they were not followed.
    left = who.run(at_load(f"""
        import os
        os.symlink({m!r}, "model")
        os.makedirs("d/e")
        os.symlink({r!r}, "d/e/results")
        os.chmod("d/e", 0)
        os.chmod("d", 0)
    """), test=TEST)
    assert left.passed, left.reason
    who.needs("files_confined")
    who.cases([(raw(f"""
        os.symlink({c!r}, "link")
        R = [answer(libc.link({r.encode()!r}, b"hard")), answer(libc.open(b"link", os.O_WRONLY)),
             answer(libc.open(b"link", os.O_RDONLY))]
    """), got(["EXDEV", "EROFS", "ok"]))])


def test_files_in_tmp_and_dev_shm(who):
    """Files in /tmp and /dev/shm: refused by the guard; past it (ctypes, shm_open, a socket's file) the
    OS refuses, and nothing carrying MARK is there afterwards (the `leftovers` fixture checks)."""
    who.cases([(at_load(f"open('/tmp/{MARK}-a', 'w')"), refused(writing("open"))),
               (at_load(f"import os\nos.mkdir('/dev/shm/{MARK}-b')"), refused(outside("os.mkdir"))),
               (at_load(f"import os\nos.mkfifo('/tmp/{MARK}-c')"), refused(outside("os.mkfifo"))),
               (at_load("import tempfile\ntempfile.mkstemp(dir='/tmp')"), refused(writing("os.open"))),
               (at_load("import tempfile\ntempfile.NamedTemporaryFile(dir='/dev/shm')"), refused(writing("open")))])
    who.needs("files_confined")
    who.cases([(raw(f"""
        import socket
        from multiprocessing import shared_memory
        R = [answer(libc.open(b"/tmp/{MARK}-d", os.O_WRONLY | os.O_CREAT, 0o666)),
             answer(libc.open(b"/dev/shm/{MARK}-e", os.O_WRONLY | os.O_CREAT, 0o666)),
             answer(libc.open(b"/var/tmp/{MARK}-f", os.O_WRONLY | os.O_CREAT, 0o666)),
             answer(libc.mkdir(b"/tmp/{MARK}-g", 0o777)),
             tried(shared_memory.SharedMemory, "{MARK}-h", True, 16),  # shm_open: not a guarded function
             tried(socket.socket(socket.AF_UNIX).bind, "/tmp/{MARK}-i"),  # bind creates a file
             answer(libc.chdir(b"/tmp")),  # its cwd may move (no write follows from that)
             answer(libc.open(b"{MARK}-j", os.O_WRONLY | os.O_CREAT, 0o666))]
    """), got(["EROFS", "EROFS", "EROFS", "EROFS", "EROFS", "EROFS", "ok", "EROFS"]))])


def test_a_user_namespace_of_its_own_does_not_reopen_anything(who):
    """The sample may make a user namespace of its own (the kernel allows it), but the read-only mounts
    stay locked in it and RLIMIT_NPROC still counts its real uid."""
    who.needs("files_confined")
    outcome = who.run(raw(f"""
        R = [answer(libc.unshare(0x10000000 | 0x00020000))]  # CLONE_NEWUSER | CLONE_NEWNS
        if R == ["ok"]:
            points = [line.split()[4] for line in open("/proc/self/mountinfo") if line.split()[4] != os.getcwd()]
            R.append([p for p in points if libc.mount(None, p.encode(), None, 32 | 4096, None) == 0])  # rw again
            R.append([p for p in points if libc.umount2(p.encode(), 2) == 0])  # MNT_DETACH
            R.append(answer(libc.open(b"/tmp/{MARK}-userns", os.O_WRONLY | os.O_CREAT, 0o666)))
            pid = libc.fork()
            if pid == 0:
                os._exit(0)
            R.append(answer(pid))
    """))
    if outcome.reason.startswith(got(["ok"])[:-1]):
        assert outcome.reason == got(["ok", [], [], "EROFS", "EAGAIN" if who.forks_refused else "ok"])
    else:  # the kernel refused it a user namespace: nothing to try with
        assert outcome.reason in {got([name]) for name in ("EPERM", "EINVAL", "ENOSPC", "EUSERS")}, outcome.reason


def test_reading_root_and_shadow(who):
    """/root and /etc/shadow: what the OS answers is what their permission bits give the sample's uid
    (no capability is left to override them); whatever it read, none of it reaches the reason."""
    def may_read(path: str) -> bool:
        st = os.stat(path)
        bits = st.st_mode >> 6 if st.st_uid == who.uid else st.st_mode >> 3 if st.st_gid in who.gids else st.st_mode
        return bool(bits & 0o4)

    expected = ["ok" if may_read(p) else "EACCES" for p in ("/root", "/etc/shadow")]
    who.cases([(raw("""
        R = [tried(os.listdir, "/root"), tried(lambda: open("/etc/shadow", "rb").read())]
    """), got(expected)), (raw("""
        R = answer(libc.open(b"/etc/shadow", os.O_RDONLY))
    """), got(expected[1]))])
    leak = who.run(at_load("""
        import os, sys
        secret = open("/etc/shadow", "rb").read() + "".join(os.listdir("/root")).encode()
        print(secret)
        sys.stderr.write(repr(secret))
        raise SystemExit(int.from_bytes(secret, "big"))
    """), test=TEST)
    assert not leak.passed
    assert leak.reason == ("the program exited before the tests finished (SystemExit)" if expected == ["ok", "ok"]
                           else "the program raised PermissionError while loading")
    if os.access("/etc/shadow", os.R_OK):  # the test's own view: no line of the file is in the reason
        assert not any(line and line in leak.reason for line in Path("/etc/shadow").read_text().splitlines())


# --- network -------------------------------------------------------------------------------------------------

def test_network_is_unreachable(who):
    """A TCP server, a UDP socket and an abstract unix socket of the caller's on loopback: out of reach
    in the sample's own network namespace (only a loopback that is down), and none of them hears a thing."""
    who.needs("net_ns")
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_UNIX) as abstract:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        udp.bind(("127.0.0.1", 0))
        abstract.bind(f"\0{MARK}-abstract")
        abstract.listen(1)
        who.cases([(raw(f"""
            import socket
            def reach(family, kind, address):
                s = socket.socket(family, kind)
                s.settimeout(1)
                return tried(lambda: (s.connect(address), s.send(b"forged")))
            R = [reach(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", {tcp.getsockname()[1]})),
                 tried(socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto, b"forged",
                       ("127.0.0.1", {udp.getsockname()[1]})),
                 reach(socket.AF_UNIX, socket.SOCK_STREAM, "\\0{MARK}-abstract"),
                 [name for _, name in socket.if_nameindex()]]
        """), got(["ENETUNREACH", "ENETUNREACH", "ECONNREFUSED", ["lo"]]))])
        for server in (tcp, udp, abstract):
            server.setblocking(False)
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(16)
        with pytest.raises(BlockingIOError):
            abstract.accept()


@pytest.mark.xfail(strict=True, reason="known gap: a unix socket in the file system is reachable from the sample "
                                       "wherever its permissions let the sample's uid connect (the network "
                                       "namespace does not cover AF_UNIX path sockets; the read-only view does not "
                                       "stop a connect)")
def test_a_unix_socket_of_the_callers_in_the_file_system(who):
    where = Path(tempfile.mkdtemp(prefix="poelm-caller-socket-"))
    where.chmod(0o777)
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(where / "s"))
            (where / "s").chmod(0o777)  # as /run/dbus/system_bus_socket, an X11 socket, a 0666 docker.sock
            server.listen(1)
            outcome = who.run(raw(f"""
                import socket
                R = tried(socket.socket(socket.AF_UNIX).connect, {str(where / "s")!r})
            """))
            server.setblocking(False)
            with pytest.raises(BlockingIOError):  # nobody connected
                server.accept()
        assert outcome.reason != got("ok")
    finally:
        shutil.rmtree(where)


# --- identity and limits inside ------------------------------------------------------------------------------

def test_identity_and_limits_inside(who):
    """What the sample's process is: its uid, no capability, no new privileges, the resource limits."""
    outcome = who.run(raw("""
        import resource
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
        R = [os.getresuid()[0], status["CapEff"].strip(), status["CapPrm"].strip(), status["NoNewPrivs"].strip(),
             [resource.getrlimit(getattr(resource, f"RLIMIT_{n}")) for n in ("NPROC", "AS", "CPU", "FSIZE", "CORE")]]
    """))
    root_inside = who.allow_root or "inside its own user namespace" in who.words["files"]
    uid = 0 if root_inside else who.uid
    mb = 1 << 20
    assert not outcome.passed and outcome.reason == got(
        [uid, "0" * 16, "0" * 16, "1", [(0, 0), (256 * mb, 256 * mb), (2, 3), (mb, mb), (0, 0)]])
    if who.allow_root:
        assert who.words["user"] == f"root, allowed by the caller ({CANNOT_DROP}); every capability dropped"


# --- a root that cannot drop ---------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops the samples to nobody")
def test_root_that_cannot_drop_is_refused(monkeypatch):
    """Refused before anything starts: run_program, run_many (no on_done) and isolation()."""
    monkeypatch.setattr(sandbox, "_can_hand_over", lambda uid, gid: CANNOT_DROP)
    sandbox._probe.cache_clear()
    try:
        message = "cannot drop the samples to nobody .*" + "--sandbox-allow-root"
        with pytest.raises(PoelmError, match=message):
            run_program(HONEST, FAST, test=TEST, entry_point="add")
        calls = []
        with pytest.raises(PoelmError, match=message):
            run_many([HONEST, HONEST], FAST, on_done=lambda i, o: calls.append(i))
        assert calls == []
        with pytest.raises(PoelmError, match=message):
            isolation()
        assert run_many([], FAST) == []  # nothing to refuse
    finally:
        sandbox._probe.cache_clear()


# --- run_many and the API ------------------------------------------------------------------------------------

def test_run_many_keeps_input_order_and_reports_each_once():
    programs = ["import time\ntime.sleep(1)\n" + HONEST,  # slow and first: finishes last
                HONEST.replace("a + b", "a - b"),
                "def add(a, b:",
                "import sys\nsys.exit(0)",
                "import time\ntime.sleep(1)\n" + HONEST.replace("a + b", "0"),
                HONEST]
    calls = []
    start = time.monotonic()
    outcomes = run_many([Task(p, TEST, entry_point="add") for p in programs], FAST, workers=2,
                        on_done=lambda i, o: calls.append((i, o, threading.current_thread())))
    elapsed = time.monotonic() - start
    assert [(o.passed, o.reason) for o in outcomes] == [
        (True, "passed"), (False, "AssertionError"), (False, "the program raised SyntaxError while loading (line 1)"),
        (False, "the program exited before the tests finished (SystemExit: 0)"), (False, "AssertionError"),
        (True, "passed")]
    assert sorted(i for i, _, _ in calls) == list(range(len(programs)))
    assert all(outcomes[i] is o for i, o, _ in calls)
    assert all(t is threading.current_thread() for _, _, t in calls)  # on_done runs in the caller's thread
    assert calls[0][0] != 0  # reported as finished, not in input order: the first sleeps a second
    assert elapsed < 2.0  # one after the other, the two one-second sleepers alone would take 2 s
    assert run_many([], FAST) == []


def test_run_many_on_done_error_propagates():
    def fail(i, outcome):
        raise RuntimeError("callback")

    with pytest.raises(RuntimeError, match="callback"):
        run_many(["x = 1", "x = 2", "x = 3"], FAST, workers=1, on_done=fail)


def test_bad_limits_workers_and_tasks_are_refused():
    with pytest.raises(PoelmError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(PoelmError, match="memory_mb"):
        Limits(memory_mb=-1)
    with pytest.raises(PoelmError, match="output_mb"):
        Limits(output_mb=0)
    with pytest.raises(PoelmError, match="workers"):
        run_many(["x = 1"], FAST, workers=0)
    with pytest.raises(PoelmError, match="entry point"):
        Task("x = 1", test=TEST)


def test_isolation_returns_a_copy():
    facts = isolation()
    assert set(facts) == {"user", "network", "processes", "files", "verdict"}
    assert all(isinstance(v, str) and v for v in facts.values())
    facts["user"] = "changed"
    assert isolation()["user"] != "changed"  # the cached probe cannot be altered


# --- isolation() against an oracle independent of the sandbox ------------------------------------------------

def machine_allows(code: str) -> bool:
    """Does a plain Python process here manage `code` (ctypes, no sandbox code)? `enter(flags, userns)`
    unshares the namespaces in flags, inside a new user namespace mapping this uid to root if userns."""
    prelude = textwrap.dedent("""
        import ctypes, os, socket
        libc = ctypes.CDLL(None, use_errno=True)

        def enter(flags, userns):
            uid, gid = os.getuid(), os.getgid()
            assert libc.unshare(flags | (0x10000000 if userns else 0)) == 0
            if userns:
                for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
    """)
    return subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          timeout=30).returncode == 0


DROP = "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
NEWNS, NEWPID, NEWNET = 0x00020000, 0x20000000, 0x40000000


def test_isolation_matches_an_independent_oracle(who):
    """Each layer a plain process shows this machine allows is reported as given, and each it refuses
    as missing: a drop, an unshare or a limit that silently stops working fails here."""
    words = who.words
    root = os.geteuid() == 0
    if who.allow_root:
        assert words["user"].startswith("root, allowed by the caller (") and words["user"].endswith(
            "every capability dropped" if machine_allows("assert libc.prctl(24, 0, 0, 0, 0) == 0") else ")")
    elif root:
        assert machine_allows(DROP)  # else this configuration is refused (test_root_that_cannot_drop_...)
        assert words["user"] == "dropped from root to nobody (uid 65534)"
    else:
        assert words["user"] == f"the caller's user (uid {os.getuid()}; not root: cannot change)"
    # The sandbox unshares as root where it can, else inside a user namespace of its own: so does the oracle.
    userns = not (root and machine_allows(f"enter({NEWNS | NEWPID | NEWNET}, userns=False)"))
    namespaces = machine_allows(f"enter({NEWNS | NEWPID | NEWNET}, userns={userns})")
    inside = ", inside its own user namespace" if userns else ""
    assert who.pid_ns == namespaces and words["processes"].startswith(
        f"own PID namespace{inside}: it sees only its own processes, all killed with it") == namespaces
    if namespaces:
        assert "it sees 1 process(es) in /proc" in words["processes"]
    network = namespaces or machine_allows(f"enter({NEWNET}, userns={not root})")  # its fallback: NEWNET alone
    assert who.net_ns == network, words["network"]
    if namespaces:
        assert words["network"] == f"own network namespace (interfaces: lo){inside}"
        assert machine_allows(f"""
            enter({NEWNET}, userns={userns})
            s = socket.socket()
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.1", 9)) != 0 and [n for _, n in socket.if_nameindex()] == ["lo"]
        """)
    d = tempfile.mkdtemp(prefix=f"{MARK}-oracle-")
    try:  # a mount namespace in which the mount holding d is read-only: d refuses a new file
        read_only = machine_allows(f"""
            enter({NEWNS}, userns={userns})
            assert libc.mount(None, b"/", None, 16384 | (1 << 18), None) == 0  # MS_REC | MS_PRIVATE
            point = max((l.split()[4] for l in open("/proc/self/mountinfo") if {d!r}.startswith(l.split()[4])), key=len)
            assert libc.mount(None, point.encode(), None, 4096 | 32 | 1, None) == 0  # MS_BIND|MS_REMOUNT|MS_RDONLY
            assert libc.open({d!r}.encode() + b"/x", os.O_WRONLY | os.O_CREAT, 0o600) == -1
            assert ctypes.get_errno() == 30  # EROFS
        """)
    finally:
        shutil.rmtree(d)
    assert who.files_confined == read_only, words["files"]
    if read_only:
        assert words["files"].startswith(f"own mount namespace{inside}: only its private directory is writable")
    fork = ("resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))\ntry:\n    pid = os.fork()\n"
            "except BlockingIOError:\n    pass\nelse:\n    os._exit(0) if pid == 0 else os.waitpid(pid, 0)\n"
            "    raise SystemExit(1)\n")  # imported before the drop: nobody cannot reach a stdlib under /root
    refused_as_sample = machine_allows("import resource\n" + ("" if who.allow_root or not root else DROP) + fork)
    assert who.forks_refused == refused_as_sample, words["processes"]
    if not refused_as_sample:
        assert "fork blocked only by the Python guard (the OS allowed it: RLIMIT_NPROC does not bind root)" in \
            words["processes"]
    assert words["verdict"] == "decided by a verifier process that runs the test; the sample only answers its calls"


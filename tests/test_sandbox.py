"""The sandbox (poelm/eval/sandbox.py) against adversarial programs: each fails with its reason, the
evaluator survives, and nothing outside the sandbox changes.

Every test, through the autouse `leftovers` fixture, also checks that each sandbox directory it made is
gone and each program's process group is empty afterwards. The tests that go around the Python guard
(ctypes) assert what `isolation()` says this machine gives: as root the OS refuses (uid nobody,
RLIMIT_NPROC, a network namespace); as an ordinary user only what the machine allowed holds. Both are
the documented behaviour, so neither case is skipped. Small limits keep the file to ~10 s (the
timeout, CPU and run_many tests take 1-3 s each; every other run ~40 ms).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from poelm.core.errors import PoelmError
from poelm.eval import sandbox
from poelm.eval.sandbox import Limits, Outcome, isolation, run_many, run_program

FAST = Limits(timeout_s=3, cpu_s=2, memory_mb=256, output_mb=1)
GUARD = "sandbox:"  # every reason the Python guard gives starts with this


def run(program: str, limits: Limits = FAST) -> Outcome:
    return run_program(textwrap.dedent(program), limits)


def os_refuses(key: str) -> bool:
    """Whether this machine's OS layer (not only the Python guard) holds for `key`."""
    words = isolation()[key]
    return {"user": words.startswith("dropped"), "network": words.startswith("own network namespace"),
            "processes": "refused by the OS" in words, "files": "and by the OS" in words}[key]


@pytest.fixture(autouse=True)
def leftovers(monkeypatch):
    """Record every sandbox directory and child process; after the test, all must be gone."""
    dirs, pids = [], []
    real_mkdtemp, real_popen = tempfile.mkdtemp, subprocess.Popen

    def mkdtemp(*args, **kwargs):
        dirs.append(real_mkdtemp(*args, **kwargs))
        return dirs[-1]

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        pids.append(proc.pid)
        return proc

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(sandbox.subprocess, "Popen", popen)
    yield
    monkeypatch.undo()
    assert [d for d in dirs if os.path.lexists(d)] == []
    for pid in pids:  # start_new_session: the child's pid is its process group's id
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


@pytest.fixture
def caller_file(tmp_path):
    """A file of the caller's, beside nothing else; returns (path, a snapshot check)."""
    path = tmp_path / "caller.txt"
    path.write_text("original")

    def unchanged() -> bool:
        return sorted(p.name for p in tmp_path.iterdir()) == ["caller.txt"] and path.read_text() == "original"

    return path, unchanged


# --- outcomes of ordinary programs ----------------------------------------------------------------------

def test_passing_failing_and_syntax_error():
    humaneval_shaped = '''
        def add(a, b):
            """Add two numbers."""
            return a + b

        def check(candidate):
            assert candidate(2, 3) == 5
            assert candidate(-1, 1) == 0

        check(add)
    '''
    right = run(humaneval_shaped)
    assert right.passed and right.reason == "passed" and 0 < right.seconds < FAST.timeout_s
    wrong = run(humaneval_shaped.replace("a + b", "a - b"))
    assert not wrong.passed and wrong.reason == "AssertionError"
    message = run("assert 1 == 2, 'one is not two'")
    assert not message.passed and message.reason == "AssertionError: one is not two"
    syntax = run("def f(:\n    pass\n")
    assert not syntax.passed and syntax.reason.startswith("SyntaxError: ") and "line 1" in syntax.reason
    other = run("raise ValueError('bad value')")
    assert not other.passed and other.reason == "ValueError: bad value"


def test_stdlib_imports_and_clean_environment(monkeypatch):
    """The program sees the stdlib (also after a uid drop), exactly the five variables, hash seed 0."""
    monkeypatch.setenv("POELM_SECRET", "s3cret")
    outcome = run("""
        import collections.abc, decimal, fractions, hashlib, json, math, os, re, statistics, sys, typing
        assert "x".encode("cp1252") == b"x"  # a codec module imported after the sandbox was set up
        assert math.gcd(12, 18) == 6 and hashlib.md5(b"").hexdigest().startswith("d41d8")
        assert sorted(os.environ) == ["HOME", "LANG", "PATH", "PYTHONHASHSEED", "TMPDIR"], dict(os.environ)
        assert os.environ["PATH"] == "/usr/bin:/bin" and os.environ["LANG"] == "C.UTF-8"
        assert os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd()
        assert sys.flags.hash_randomization == 0
        assert os.listdir(".") == []  # a fresh, empty working directory
    """)
    assert outcome.passed, outcome.reason


def test_caller_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("POELM_SECRET", "s3cret")
    outcome = run("import os\nassert os.environ['POELM_SECRET'] == 's3cret'")
    assert not outcome.passed and outcome.reason == "KeyError: 'POELM_SECRET'"


def test_program_is_not_in_argv_or_environment():
    """The program reaches the child through a file: neither argv nor the environment carries its text."""
    outcome = run("""
        # program_marker_7f3a
        import os, sys
        mark = "program_" + "marker_7f3a"
        assert not any(mark in a for a in sys.argv), "in argv"
        assert not any(mark in v for v in os.environ.values()), "in the environment"
    """)
    assert outcome.passed, outcome.reason


# --- limits -----------------------------------------------------------------------------------------------

def test_infinite_loop_hits_cpu_limit_or_timeout():
    outcome = run("while True:\n    pass\n")
    assert not outcome.passed and outcome.reason in ("cpu time limit", "timeout after 3.0 s")
    assert outcome.seconds < FAST.timeout_s + 2


def test_sleep_forever_times_out_on_the_wall_clock():
    outcome = run("import time\ntime.sleep(100)\n")
    assert not outcome.passed and outcome.reason == "timeout after 3.0 s"
    assert FAST.timeout_s <= outcome.seconds < FAST.timeout_s + 2


def test_cpu_limit_is_reported_as_such():
    """A CPU-bound program with a wall clock well past its CPU limit ends at the CPU limit."""
    outcome = run("while True:\n    pass\n", Limits(timeout_s=20, cpu_s=1, memory_mb=256, output_mb=1))
    assert not outcome.passed and outcome.reason == "cpu time limit"
    assert outcome.seconds < 10


@pytest.mark.parametrize("program", ["x = bytearray(10**10)",
                                     "x = []\nwhile True:\n    x.append(' ' * 10**6)\n",
                                     "def grow(n):\n    return [0] * n + grow(2 * n)\ngrow(10**6)\n"])
def test_memory_bomb_hits_memory_limit(program):
    outcome = run(program)
    assert not outcome.passed and outcome.reason == "memory limit (MemoryError)"


@pytest.mark.parametrize("program", ["import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)\n",
                                     "import sys\nwhile True:\n    print('y' * 2**16, file=sys.stderr)\n",
                                     "print('z' * 2**21)\n",
                                     "with open('big', 'wb') as f:\n    f.write(b'0' * 2**21)\n"])
def test_gigabytes_of_output_hit_output_limit_quickly(program):
    outcome = run(program)
    assert not outcome.passed and outcome.reason == "output limit (1 MB)"
    assert outcome.seconds < 1.5  # the limit, not the 3 s timeout, ended it


def test_output_within_limit_passes():
    outcome = run("for i in range(1000):\n    print(i)\n")
    assert outcome.passed, outcome.reason


# --- processes ----------------------------------------------------------------------------------------------

def test_fork_bomb_fails_and_leaves_no_process():
    outcome = run("import os\nwhile True:\n    os.fork()\n")
    assert not outcome.passed and outcome.reason == "PermissionError: sandbox: os.fork is disabled"
    for program in ("import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
                    "import pty\npty.fork()\n"):
        outcome = run(program)
        assert not outcome.passed and GUARD in outcome.reason and "fork" in outcome.reason


def test_fork_past_the_guard():
    """ctypes forks past the guard: refused by RLIMIT_NPROC where isolation() says so; where it is not,
    the forked children (sleeping) are still killed with the group (the `leftovers` fixture checks)."""
    outcome = run("""
        import ctypes, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        for _ in range(3):
            pid = libc.fork()
            if pid == 0:
                time.sleep(100)  # a child that would outlive the program if the group were not killed
                os._exit(0)
        assert pid == -1, f"forked {pid}"
    """)
    if os_refuses("processes"):
        assert outcome.passed, outcome.reason
    else:
        assert not outcome.passed and outcome.reason.startswith("AssertionError: forked")


def test_threads_cannot_start_where_forks_are_refused():
    outcome = run("import threading\nthreading.Thread(target=print).start()\n")
    if os_refuses("processes"):
        assert not outcome.passed and outcome.reason.startswith("RuntimeError: can't start new thread")
    else:
        assert outcome.passed, outcome.reason


@pytest.mark.parametrize("call", ["os.system('touch {target}')",
                                  "subprocess.run(['touch', '{target}'])",
                                  "subprocess.check_output('touch {target}', shell=True)",
                                  "os.popen('touch {target}').read()",
                                  "os.execv('/usr/bin/touch', ['touch', '{target}'])",
                                  "os.spawnv(os.P_WAIT, '/usr/bin/touch', ['touch', '{target}'])",
                                  "os.posix_spawn('/usr/bin/touch', ['touch', '{target}'], {{}})"])
def test_shell_and_subprocess_are_disabled(call, tmp_path):
    target = tmp_path / "touched"
    outcome = run(f"import os, subprocess\n{call.format(target=target)}\n")
    assert not outcome.passed and outcome.reason.startswith(f"PermissionError: {GUARD}")
    assert "disabled" in outcome.reason
    assert not target.exists()


def test_system_past_the_guard_cannot_start_a_process():
    """libc's system() forks a shell: it cannot (status 127) where forks are refused."""
    outcome = run("import ctypes\nassert ctypes.CDLL(None).system(b'true') == 127 << 8, 'a shell ran'\n")
    if os_refuses("processes"):
        assert outcome.passed, outcome.reason
    else:
        assert not outcome.passed and outcome.reason == "AssertionError: a shell ran"


@pytest.mark.parametrize("program", ["import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
                                     "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n",
                                     "import os, signal\nos.kill(-1, signal.SIGKILL)\n"])
def test_killing_the_evaluator_is_disabled(program):
    outcome = run(program)
    assert not outcome.passed and outcome.reason.startswith(f"PermissionError: {GUARD} os.kill")
    os.kill(os.getpid(), 0)  # still here (the test would not have got this far otherwise)


def test_signal_past_the_guard():
    """kill(parent, 0) via ctypes probes permission without sending anything: refused once the uid dropped."""
    outcome = run("""
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.kill(os.getppid(), 0) == -1 and ctypes.get_errno() == errno.EPERM, "may signal the caller"
    """)
    if os_refuses("user"):
        assert outcome.passed, outcome.reason
    else:
        assert not outcome.passed and outcome.reason == "AssertionError: may signal the caller"


# --- exits before the tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("program, reason", [
    ("import sys\nsys.exit(0)\nassert False\n", "exited before the tests finished (SystemExit: 0)"),
    ("import sys\nsys.exit(3)\n", "exited before the tests finished (SystemExit: 3)"),
    ("raise SystemExit\n", "exited before the tests finished (SystemExit: None)"),
    ("import os\nos._exit(0)\nassert False\n", "exited before the tests finished (exit code 0, no result)"),
    ("import os\nos._exit(7)\n", "exited before the tests finished (exit code 7, no result)"),
    ("exit(0)\n", "PermissionError: sandbox: exit is disabled"),
    ("quit()\n", "PermissionError: sandbox: quit is disabled"),
])
def test_exit_before_the_tests_fails(program, reason):
    outcome = run(program)
    assert not outcome.passed and outcome.reason == reason


def test_no_result_keeps_the_end_of_stderr():
    outcome = run("import os, sys\nsys.stderr.write('x' * 1000 + 'the last words\\n')\nsys.stderr.flush()\nos._exit(1)\n")
    assert not outcome.passed
    assert outcome.reason.startswith("exited before the tests finished (exit code 1, no result): ...")
    assert outcome.reason.endswith("the last words") and len(outcome.reason) < 400


def test_killed_by_a_signal():
    outcome = run("import os\nos.abort()\n")
    assert not outcome.passed and outcome.reason == f"killed by signal {int(signal.SIGABRT)}"


# --- files --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", [
    "open(PATH, 'w').write('overwritten')",
    "open(PATH, 'a').write('appended')",
    "open(PATH, 'r+').write('changed')",
    "open(PATH.replace('caller.txt', 'new.txt'), 'x').write('new')",
    "import io\nio.open(PATH, 'wb').write(b'overwritten')",
    "import pathlib\npathlib.Path(PATH).write_text('overwritten')",
    "import pathlib\npathlib.Path(PATH).with_name('new.txt').touch()",
    "import os\nos.close(os.open(PATH, os.O_WRONLY | os.O_TRUNC))",
    "import os\nos.remove(PATH)",
    "import os\nos.unlink(PATH)",
    "import os\nos.rename(PATH, PATH + '.moved')",
    "open('mine', 'w').write('x')\nos.replace('mine', PATH)",
    "import os\nos.truncate(PATH, 0)",
    "import os\nos.chmod(PATH, 0o777)",
    "import os\nos.mkdir(PATH + '.dir')",
    "import os\nos.symlink('/etc/passwd', PATH + '.link')",
    "import os\nos.link(PATH, 'hardlink')",
    "import shutil\nshutil.rmtree(os.path.dirname(PATH))",
    "import shutil\nshutil.move(PATH, 'here.txt')",
    "import shutil\nopen('mine', 'w').write('x')\nshutil.copy('mine', PATH)",
    "import os\nos.symlink(PATH, 'link')\nopen('link', 'w').write('through a link')",
    "import os\nos.chdir(os.path.dirname(PATH))\nopen('caller.txt', 'w').write('after chdir')",
])
def test_writing_outside_the_sandbox_is_refused(action, caller_file):
    path, unchanged = caller_file
    outcome = run(f"import os\nPATH = {str(path)!r}\n{action}\n")
    assert not outcome.passed and outcome.reason.startswith(f"PermissionError: {GUARD}"), outcome.reason
    assert "disabled" in outcome.reason
    assert unchanged()


def test_writing_past_the_guard(caller_file):
    """A raw open(2) for writing via ctypes: refused by the OS where isolation() says so."""
    path, unchanged = caller_file
    outcome = run(f"""
        import ctypes, os
        fd = ctypes.CDLL(None, use_errno=True).open({str(path).encode()!r}, os.O_WRONLY)
        assert fd == -1, "opened for writing"
    """)
    if os_refuses("files"):
        assert outcome.passed, outcome.reason
    else:
        assert not outcome.passed and outcome.reason == "AssertionError: opened for writing"
    assert unchanged()  # opened, never written


def test_writing_inside_the_sandbox_works():
    outcome = run("""
        import os, pathlib, shutil, tempfile
        with open("out.txt", "w") as f:
            f.write("hello")
        assert open("out.txt").read() == "hello"
        open("out.txt", "a").write("!")
        os.makedirs("a/b/c")
        pathlib.Path("a/b/c/d.txt").write_text("deep")
        os.rename("out.txt", "a/moved.txt")
        os.remove("a/moved.txt")
        with tempfile.NamedTemporaryFile("w", delete=False) as f:  # TMPDIR is the work directory
            f.write("temp")
        assert os.path.dirname(f.name) == os.getcwd()
        with open(os.path.expanduser("~/home.txt"), "w") as f:  # so is HOME
            f.write("home")
    """)
    assert outcome.passed, outcome.reason


def test_sandbox_directory_is_removed_even_when_made_unreadable():
    outcome = run("""
        import os
        os.makedirs("d/e")
        open("d/e/f", "w").write("x")
        os.chmod("d/e", 0)
        os.chmod("d", 0)
        assert False, os.getcwd()
    """)
    work = outcome.reason.removeprefix("AssertionError: ")
    assert os.path.basename(work) == "work" and not os.path.exists(os.path.dirname(work))


def test_network_is_isolated_where_the_machine_allows():
    """A server the caller listens with on loopback: out of reach where there is a network namespace."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        outcome = run(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
            except OSError:
                pass
            else:
                raise AssertionError("reached the caller's server")
            assert [name for _, name in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
        """)
    if os_refuses("network"):
        assert outcome.passed, outcome.reason
    else:
        assert not outcome.passed and outcome.reason == "AssertionError: reached the caller's server"


# --- run_many and isolation() ----------------------------------------------------------------------------

def test_run_many_keeps_input_order_and_reports_each_once():
    programs = ["import time\ntime.sleep(1)\n",  # slow and first: finishes last
                "assert False, 'second'",
                "def f(:",
                "import sys\nsys.exit(0)",
                "import time\ntime.sleep(1)\nassert False, 'fifth'",
                "x = 1"]
    calls = []
    start = time.monotonic()
    outcomes = run_many(programs, FAST, workers=2,
                        on_done=lambda i, o: calls.append((i, o, threading.current_thread())))
    elapsed = time.monotonic() - start
    assert [o.passed for o in outcomes] == [True, False, False, False, False, True]
    assert outcomes[1].reason == "AssertionError: second" and outcomes[2].reason.startswith("SyntaxError")
    assert outcomes[3].reason.startswith("exited before") and outcomes[4].reason == "AssertionError: fifth"
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


def test_bad_limits_and_workers_are_refused():
    with pytest.raises(PoelmError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(PoelmError, match="memory_mb"):
        Limits(memory_mb=-1)
    with pytest.raises(PoelmError, match="workers"):
        run_many(["x = 1"], FAST, workers=0)


def test_isolation_reports_four_facts():
    facts = isolation()
    assert set(facts) == {"user", "network", "processes", "files"}
    assert all(isinstance(v, str) and v for v in facts.values())
    facts["user"] = "changed"
    assert isolation()["user"] != "changed"  # a copy: the cached probe cannot be altered
    if os.geteuid() == 0:
        assert isolation()["user"].startswith(("dropped from root to ", "root (not dropped: "))
    else:
        assert isolation()["user"] == f"the caller's user (uid {os.getuid()}; not root: cannot change)"
    assert isolation()["network"].startswith(("own network namespace", "not isolated: unshare("))


def machine_allows(code: str) -> bool:
    """An oracle independent of the sandbox: does a plain Python process here manage `code`?"""
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], capture_output=True).returncode == 0


DROP = "import os\nos.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
UNSHARE = "import ctypes\nassert ctypes.CDLL(None, use_errno=True).unshare({flags}) == 0\n"
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000


def test_isolation_reports_every_layer_the_machine_allows():
    """isolation() is not only self-consistent: each layer that a plain process shows this machine
    allows is reported as achieved (so a broken drop or unshare fails here, not silently everywhere)."""
    facts = isolation()
    root = os.geteuid() == 0
    if root and machine_allows(DROP):
        assert facts["user"] == "dropped from root to nobody (uid 65534)"
        assert "refused by the Python guard and by the OS (EACCES as uid 65534)" in facts["files"]
    if root and machine_allows(UNSHARE.format(flags=CLONE_NEWNET)):
        assert facts["network"] == "own network namespace (interfaces: lo)"
    else:
        netns = machine_allows((DROP if root else "") + UNSHARE.format(flags=CLONE_NEWUSER | CLONE_NEWNET))
        assert facts["network"].startswith("own network namespace (interfaces: lo)") == netns, facts["network"]
    if machine_allows(DROP if root else "pass"):  # RLIMIT_NPROC binds every uid but root
        assert "fork refused by the OS (EAGAIN: RLIMIT_NPROC=0)" in facts["processes"]

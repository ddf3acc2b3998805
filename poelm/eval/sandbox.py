"""Run untrusted Python programs (model-written HumanEval completions) in a sandbox, with a verdict the
program cannot forge (docs/sandbox.md: the threat model, every layer in order, and why).

- Two processes per sample (_sandbox_box.py): the sample's runs the program, confined (its own PID,
  mount and network namespaces, nobody or no capabilities, no forks, limits, the Python guard); the
  verifier runs the trusted setup and test, calling the sample's entry point with plain data. The
  verdict is the test's outcome in the verifier and reaches this process on a pipe the sample never
  holds; without a test, it is the sample's own (forgeable) report that it ran to its end.
- Root: samples run as nobody; a root that cannot drop is refused unless `allow_root=True`
  (`--sandbox-allow-root`), then they run as root without any capability.
- Nothing of a sample outlives its call: a fresh directory per sample, removed whatever happened; on
  the wall-clock limit the verifier's group is killed and the sample dies with it.
- `run_many` calls `on_done` from the calling thread, one at a time: a callback needs no lock.
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

BOX = Path(__file__).with_name("_sandbox_box.py")
SANDBOX_USER = "nobody"  # the uid a root caller's programs run as


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then everything of the sample is killed
    cpu_s: int = 10  # RLIMIT_CPU: SIGXCPU at cpu_s (PID 1 of its namespace, the sample ignores it), SIGKILL at +1
    memory_mb: int = 1024  # RLIMIT_AS
    output_mb: int = 16  # RLIMIT_FSIZE: stdout/stderr go to files in the sandbox directory

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "output_mb"):
            if not getattr(self, name) > 0:
                raise PoelmError(f"Limits.{name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Task:
    """One sandboxed run: `program` is untrusted (it runs in the sample's process); `setup` and `test` are
    trusted (they run in the verifier, with `entry_point` bound to a proxy that calls the program's)."""

    program: str
    test: str | None = None
    setup: str = ""
    entry_point: str | None = None

    def __post_init__(self) -> None:
        if self.test is not None and not self.entry_point:
            raise PoelmError("sandbox: a test needs the name of the entry point it checks")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", or why not: "AssertionError", "timeout after 10.0 s", "cpu time limit", ...
    seconds: float  # wall clock from the start of the sandbox to its end


def run_program(program: str | Task, limits: Limits = Limits(), *, test: str | None = None, setup: str = "",
                entry_point: str | None = None, allow_root: bool = False) -> Outcome:
    """Run `program` in the sandbox. With `test`, it passes when the test (run in the verifier, calling
    `entry_point` in the program's process) raises nothing; without, when the program runs to its end
    (its own report: see the module docstring)."""
    task = program if isinstance(program, Task) else Task(program, test, setup, entry_point)
    return _run(task, limits, probe=False, allow_root=allow_root)[0]


def run_many(tasks: list[str | Task], limits: Limits = Limits(), workers: int = 1,
             on_done: Callable[[int, Outcome], None] | None = None, allow_root: bool = False) -> list[Outcome]:
    """Outcomes in input order, `workers` programs at a time; on_done(index, outcome) as each finishes."""
    if workers < 1:
        raise PoelmError(f"run_many: workers must be at least 1, got {workers}")
    if tasks:
        preflight(allow_root)  # a root that may not run samples is told before any of them starts
    outcomes: list[Outcome | None] = [None] * len(tasks)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
    try:
        pending = {pool.submit(run_program, t, limits, allow_root=allow_root): i for i, t in enumerate(tasks)}
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


def preflight(allow_root: bool = False) -> None:
    """Raise the PoelmError a run would raise for this user (a root that may not run samples), before
    any work is done."""
    _sandbox_user(allow_root)


def isolation(allow_root: bool = False) -> dict[str, str]:
    """What this machine gives a sample, in words: {"user", "network", "processes", "files", "verdict"}."""
    return dict(_probe(allow_root))


@functools.cache
def _probe(allow_root: bool) -> tuple[tuple[str, str], ...]:
    outcome, result = _run(Task("pass"), Limits(timeout_s=60), probe=True, allow_root=allow_root)
    if not outcome.passed or "isolation" not in result:
        raise PoelmError(f"sandbox: the isolation probe failed: {outcome.reason}")
    return tuple(result["isolation"].items())


def _sandbox_user(allow_root: bool) -> dict | None:
    """The uid/gid a root caller's samples run as (None: not root, nothing to change). A root that cannot
    hand a directory to that uid is refused unless `allow_root`; then {..., "failed": why}."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
        user = {"name": SANDBOX_USER, "uid": entry.pw_uid, "gid": entry.pw_gid}
    except KeyError:
        user = {"name": "uid 65534", "uid": 65534, "gid": 65534}  # the kernel's overflow uid
    why = _can_hand_over(user["uid"], user["gid"])
    if why is None:
        return user
    if not allow_root:
        raise PoelmError(f"sandbox: running as root and cannot drop the samples to {user['name']} ({why}): "
                         f"refusing to run untrusted code as root; run as an ordinary user, or pass "
                         f"--sandbox-allow-root (allow_root=True) to run the samples as root without capabilities")
    return {**user, "failed": why}


@functools.cache
def _can_hand_over(uid: int, gid: int) -> str | None:
    """None when this root can chown a file to uid:gid (what the drop needs), else why not."""
    probe = tempfile.mkdtemp(prefix="poelm-sandbox-probe-")
    try:
        os.chown(probe, uid, gid)
        return None
    except OSError as e:
        return f"chown to uid {uid} failed: {errno.errorcode.get(e.errno, e.errno)}"
    finally:
        os.rmdir(probe)


def _hand_over(box: Path, work: Path, user: dict | None) -> None:
    """As root, give the work directory to the uid the samples run as; BOX stays root's, 0711."""
    if user is None or "failed" in user:
        return
    os.chown(work, user["uid"], user["gid"])
    box.chmod(0o711)  # the uid may pass through to work, not list or write the box
    # It reaches work (HOME, TMPDIR) by its absolute path, so every parent must be searchable by others:
    # say so here rather than fail inside every program.
    for parent in box.parents:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            raise PoelmError(f"sandbox: {parent} is not searchable by uid {user['uid']}, which the programs "
                             f"run as; set TMPDIR to a directory every user can enter, such as /tmp")


def _run(task: Task, limits: Limits, probe: bool, allow_root: bool) -> tuple[Outcome, dict]:
    """One task in a fresh sandbox directory: its outcome and the verifier's raw verdict ({} if none)."""
    user = _sandbox_user(allow_root)
    box = Path(tempfile.mkdtemp(prefix="poelm-sandbox-"))
    fds: list[int] = []
    try:
        work = box / "work"
        work.mkdir(mode=0o700)
        _hand_over(box, work, user)
        out = os.open(box / "sample.out", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        err = os.open(box / "sample.err", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        read_fd, write_fd = os.pipe()
        fds += [out, err, read_fd, write_fd]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": str(work),
               "TMPDIR": str(work)}
        config = {"program": task.program, "test": task.test, "setup": task.setup, "entry_point": task.entry_point,
                  "work": str(work), "user": user, "caller_uid": os.getuid(), "probe": probe, "env": env,
                  "cpu_s": int(limits.cpu_s), "memory_mb": int(limits.memory_mb), "output_mb": int(limits.output_mb),
                  "result_fd": write_fd, "stdout_fd": out, "stderr_fd": err}
        with open(box / "verifier.err", "wb") as verifier_err:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-B", "-S", str(BOX), "verifier"], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=verifier_err, cwd=work, env=env,
                                    pass_fds=(write_fd, out, err), start_new_session=True)
        for fd in (write_fd, out, err):  # the verifier holds them now: EOF on the result pipe once it is gone
            os.close(fd)
            fds.remove(fd)
        try:
            try:
                proc.stdin.write(json.dumps(config).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            timed_out = not _exited_within(proc.pid, limits.timeout_s)
        finally:  # on a KeyboardInterrupt too: nothing of the sample outlives this call
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the verifier, if still running (the sample dies with it)
            except ProcessLookupError:
                pass
            os.waitpid(proc.pid, 0)
            proc.returncode = 0  # reaped here, so Popen must not wait again
        seconds = time.monotonic() - start
        lines = _read_lines(read_fd)
        _wait_gone(lines[0].get("sample_pid") if lines else None)
        verdict = lines[1] if len(lines) > 1 and isinstance(lines[1].get("passed"), bool) else {}
        if timed_out:
            outcome = Outcome(False, f"timeout after {float(limits.timeout_s)} s", seconds)
        elif not verdict:
            outcome = Outcome(False, "the sandbox's verifier ended without a verdict", seconds)
        else:
            reason = str(verdict["reason"])
            if verdict.get("limit") == "output":
                reason = f"output limit ({limits.output_mb} MB)"
            outcome = Outcome(verdict["passed"], reason, seconds)
    finally:
        for fd in fds:
            os.close(fd)
        _remove_tree(box)
    return outcome, (verdict if not timed_out else {})


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


def _read_lines(fd: int) -> list[dict]:
    """The verifier's JSON lines (its sample's pid, then the verdict); what is not a JSON object ends them."""
    os.set_blocking(fd, False)  # nothing holds the write end any more: never blocks
    data = b""
    try:
        while len(data) < 1 << 20:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    lines = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            break
        if not isinstance(value, dict):
            break
        lines.append(value)
    return lines


def _wait_gone(pid: object, timeout: float = 10.0) -> None:
    """Return once the sample's process (killed with its verifier: PR_SET_PDEATHSIG) has exited; as PID 1
    of its own namespace, every process it started has then exited too."""
    if type(pid) is not int or pid <= 0:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return  # gone (and reaped)
        if state in ("Z", "X"):
            return  # exited: a zombie waiting for init to reap it
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return
        time.sleep(0.002)
    raise PoelmError(f"sandbox: the sample's process {pid} did not exit within {timeout} s of being killed")


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

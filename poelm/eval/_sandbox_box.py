"""The inside of the sandbox: a verifier process and the sample's process, confined (docs/sandbox.md
lists each step in order and says why; sandbox.py is the caller's side).

sandbox.py runs this file as a script, never imports it: `python -B -S _sandbox_box.py verifier` with
the box's config as JSON on stdin; the verifier starts the sample as `... _sandbox_box.py sample CONFIG`.
Standard library only (it runs without site-packages), and this directory is off sys.path, so its one
sibling, _sandbox_sample.py (the guard, the failure words, the plain-data codec), is loaded by path at
start, before either process drops a privilege.

The verdict protocol is one-way: the verifier runs the trusted setup and test with the entry point
bound to a proxy that calls the sample; nothing the sample writes or exits with can make the test
pass, only the plain values its entry point returns can.
"""

import sys

if __name__ == "__main__":
    del sys.path[0]  # this script's directory (poelm/eval): nothing in it may shadow the stdlib

import builtins
import ctypes
import errno
import fcntl
import json
import os
import resource
import signal
import socket
import traceback
import types


def _load_sibling(name: str) -> types.ModuleType:
    """A file beside this script, loaded by path (it is not importable: see above)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_side = _load_sibling("_sandbox_sample")  # now: the sample may not read this directory once it drops its uid
encode, decode, guard, sample_error, sample_failure = (_side.encode, _side.decode, _side.guard, _side.sample_error,
                                                       _side.sample_failure)

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
BALLAST = 4 << 20  # freed before a failure is reported, so a MemoryError still leaves room to report it
MAX_REPLY = 64 << 20  # bytes of one reply the verifier reads at most

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
        try:
            _write_line(self.requests, message)
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


def sample(config: dict) -> None:
    """The sample's process: confined, guarded, then the program loaded and its entry point called on
    the verifier's requests until the verifier closes them."""
    _confine_sample(config)
    work = config["work"]
    os.chdir(work)
    if config["probe"]:  # the verifier reads it (the probe program is ours: nothing forges it)
        with open(os.path.join(work, ".probe"), "w") as f:
            json.dump(_sample_probe(work), f)
    guard(work)
    requests, buffer = os.fdopen(4, "rb", buffering=0), b""
    module = types.ModuleType("__main__")  # the program's own globals, not this script's
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    while True:
        while b"\n" not in buffer:
            chunk = requests.read(1 << 16)
            if not chunk:
                os._exit(0)
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        answer = _answer(json.loads(line), module, config["entry_point"])
        try:
            _write_line(3, answer)  # fd 3: the replies
        except (TypeError, ValueError, RecursionError):
            _write_line(3, {"error": {"returned": "an unsendable value"}})


def _confine_sample(config: dict) -> None:
    """Dies with the verifier; a /proc of its own as PID 1 of its namespace; then the uid dropped (as
    root) or every capability (in a user namespace, or root allowed to stay root); no new privileges,
    no forks."""
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


def _answer(request: dict, module: types.ModuleType, entry_point: str) -> dict:
    """One request of the verifier ("load" the program, or "call" its entry point), answered with plain
    data, or the facts of the failure (`sample_failure`)."""
    ballast = bytearray(BALLAST)
    try:
        if request["op"] == "load":
            exec(compile(request["program"].encode("utf-8", "surrogatepass"), "program.py", "exec",
                         dont_inherit=True), module.__dict__)
            answer = {"loaded": True}
        else:
            fn = module.__dict__.get(entry_point)
            if not callable(fn):
                raise NameError(f"the program defines no function {entry_point!r}")
            result = fn(*decode(request["args"]), **decode(request["kwargs"]))
            try:
                answer = {"ok": encode(result)}
            except (TypeError, ValueError, RecursionError):
                answer = {"error": {"returned": type(result).__name__}}
        sys.stdout.flush()  # output that does not fit the limit fails here, inside the call
        sys.stderr.flush()
    except BaseException as e:
        del ballast  # room to report the failure in, see BALLAST
        answer = {"error": sample_failure(e)}
        try:
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.__stderr__)
            sys.__stderr__.flush()
        except BaseException:
            pass
        e.__traceback__ = None
    return answer


if __name__ == "__main__":
    if sys.argv[1] == "verifier":
        verifier()
    else:
        sample(json.loads(sys.argv[2]))

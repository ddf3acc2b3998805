"""Memory and disk at real sizes: every `poelm` command on a model of the card's shapes, each in its own
process, its wall time against the disk's limit and its peak RSS against the tensor bytes it must hold.

It builds the card's shapes (base d24, width 1536, 12 heads, vocabulary 32768, stages 6,6,6,6; a 4-layer
code specialist with its own head; or any --depth/--n-embd/--vocab...; `--quick` for a small run that
checks the script in about a minute) in a temporary folder and, for each of --dtypes (float32 and
bfloat16, each through its own directories), runs as child processes: `poelm init`, `poelm specialist
attach`, `poelm inspect`, `poelm digest`, `poelm export` (a chain as one merged directory), `poelm convert
nanochat` (of a nanochat checkpoint written from the base's own tensors, untimed), `poelm generate` (16
tokens), transformers `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` + 8 greedy
tokens, and `poelm serve` of the base with 1, 2 and 4 specialists (one completion per model).

Measured, not sampled: a command's peak RSS is its `ru_maxrss` from `os.wait4`; the server's is VmHWM in
/proc/PID/status after it answered one request per model. Wall times include the interpreter's start
(its own rows: `python -c "import poelm"` and `import poelm, torch`). Before each command the files it
reads are flushed and evicted from the page cache (`posix_fadvise(DONTNEED)`), so its disk limit is
bytes read / the disk's cold read speed + bytes written / its write speed (write + fsync of a probe
file), both measured here first, with the memory's read bandwidth (best of several `torch.sum` over
1 GiB): the limit a decoder's tokens/s is held against (bytes of weights read per token / bandwidth).
What each column means, and the table at the card's size: docs/memory.md. A benchmark, not a test.

    python benchmarks/real_size.py [--quick] [--depth 24 --n-embd 1536 --n-head 12 --vocab 32768
        --stages 6,6,6,6 --stage-layers 4] [--dtypes float32,bfloat16] [--keep DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from poelm.core.errors import PoelmError

CARD = {"depth": 24, "n_embd": 1536, "n_head": 12, "vocab": 32768, "stages": "6,6,6,6", "stage_layers": 4}
QUICK = {"depth": 4, "n_embd": 256, "n_head": 2, "vocab": 4096, "stages": "2,2", "stage_layers": 2}
DTYPES = ("float32", "bfloat16")
ELEMENT = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = {"F64", "F32", "BF16", "F16"}
EMBEDDINGS = re.compile(r"(^|\.)(wte|value_embeds)(\.|$)|^wte_rows\.")  # read one row per token
PROMPT = "def fibonacci(n):"
GB = 1e9

TRANSFORMERS_CHILD = """\
import json, sys, time, torch
from transformers import AutoModelForCausalLM
path, dtype, bos, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=getattr(torch, dtype))
ids = torch.tensor([[bos] + list(sys.argv[5].encode())])
t0 = time.perf_counter()
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
seconds = time.perf_counter() - t0
print(json.dumps({"tokens": out.shape[1] - ids.shape[1], "seconds": seconds}))
"""

LAUNCHER = """\
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall, "maxrss_kib": usage.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""

NANOCHAT_CHILD = """\
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
base, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
torch.save(load_file(str(base / "model.safetensors")), out / "model_000001.pt")
c = json.loads((base / "config.json").read_text())
fields = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
(out / "meta_000001.json").write_text(json.dumps({"step": 1, "model_config": {k: c[k] for k in fields}}))
"""


# ------------------------------------------------------------------------------------------- sizes
def header(path: Path) -> dict[str, tuple[str, int]]:
    """A safetensors file's tensors as name -> (dtype, elements), from its header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        data = json.loads(f.read(n))
    data.pop("__metadata__", None)
    out = {}
    for name, t in data.items():
        elements = 1
        for d in t["shape"]:
            elements *= d
        out[name] = (t["dtype"], elements)
    return out


def tensor_bytes(files: list[Path], dtype: str | None = None, skip: re.Pattern | None = None,
                 assembled: bool = False) -> int:
    """Bytes of the files' tensors, floating ones in `dtype` (None: as stored); `assembled` leaves out a
    delta's bookkeeping (its changed embedding rows replace rows the base already has; declared overrides)."""
    size = {"float32": 4, "bfloat16": 2}.get(dtype)
    total = 0
    for path in files:
        for name, (kind, elements) in header(path).items():
            if (skip is not None and skip.search(name)) or (
                    assembled and (name.startswith("wte_rows.") or name.startswith("parent_overrides."))):
                continue
            total += elements * (size if size is not None and kind in FLOATS else ELEMENT[kind])
    return total


def dir_bytes(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())


# ------------------------------------------------------------------------------------------- machine
def evict(*paths: Path) -> None:
    """Flush every dirty page, then drop these files from the page cache: the next read is the disk's."""
    os.sync()
    for p in paths:
        for f in (p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


PAUSE_S = 2.0  # between evicting a file and reading it back (see disk_speeds)


def disk_speeds(folder: Path, size: int) -> dict:
    """Write + fsync a `size`-byte file (bytes/s), evict it, read it back cold (bytes/s): each the median
    of three. The probe is several GB of data that never repeats, and only the writes and the fsync are
    timed: this project's virtual disk took a repeated 16 MiB chunk at 0.8-1.1 GB/s and fresh random
    data at 0.53-0.60 (measured), and a 1 GiB probe at 270-890 MB/s from one run to the next. Each read
    begins as a command's does, seconds after its files were evicted: a read that follows the previous
    read of the file at once is served ~2.5x faster (1.6-2.3 GB/s against 0.45-0.8 after a pause of 0.5 s
    or more), and no command's read starts sooner than its interpreter, 1.5 s."""
    import numpy as np

    rng, path, writes = np.random.default_rng(0), folder / "disk_probe.bin", []
    for _ in range(3):
        fd, spent, written = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 0.0, 0
        try:
            while written < size:
                chunk = rng.bytes(16 << 20)  # made outside the timed write: the disk's speed, not the generator's
                t0 = time.perf_counter()
                written += os.write(fd, chunk)
                spent += time.perf_counter() - t0
            t0 = time.perf_counter()
            os.fsync(fd)
            spent += time.perf_counter() - t0
        finally:
            os.close(fd)
        writes.append(spent)
    write_s = sorted(writes)[1]
    buf, reads = bytearray(16 << 20), []
    for _ in range(3):
        evict(path)
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        reads.append(time.perf_counter() - t0)
    read_s = sorted(reads)[1]
    path.unlink()
    return {"probe_bytes": written, "write_Bps": written / write_s, "read_Bps": written / read_s}


def hash_speeds(size: int = 256 << 20) -> dict:
    """Bytes/s of the hashes a command may run over every byte, on one thread: xxh3-128 (the files'
    digests in digests.json, and the tensors' fingerprint) and blake2b (the fingerprint an older poelm
    recorded, recomputed only to check a stage that names its parent so): the floor they put under a
    command that reads a model is bytes / speed, whatever the disk does."""
    import hashlib

    import xxhash

    data = os.urandom(size)
    out = {}
    for name, fn in (("xxh3_Bps", lambda: xxhash.xxh3_128(data).digest()),
                     ("blake2b_Bps", lambda: hashlib.blake2b(data, digest_size=16).digest())):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = size / best
    return out


def memory_bandwidth(size: int = 1 << 30, rounds: int = 10) -> float:
    """The memory's read bandwidth (bytes/s): the best of `rounds` float32 sums over `size` bytes."""
    import torch

    x = torch.ones(size // 4)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return size / best


# ------------------------------------------------------------------------------------------- children
@dataclass
class Row:
    """One measured command: what it is, how long it took against the disk's limit, its peak RSS against
    the tensor bytes it must hold (0: it must hold none; the ratio is then left out)."""

    command: str
    dtype: str
    wall_s: float
    read_bytes: int = 0
    written_bytes: int = 0
    disk_limit_s: float = 0.0
    peak_rss: int = 0
    tensor: int = 0
    tok_s: float | None = None
    limit_tok_s: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def finish(self, speeds: dict) -> "Row":
        self.disk_limit_s = self.read_bytes / speeds["read_Bps"] + self.written_bytes / speeds["write_Bps"]
        return self

    def ratios(self) -> dict:
        return {"wall_over_limit": self.wall_s / self.disk_limit_s if self.disk_limit_s else None,
                "rss_over_tensor": self.peak_rss / self.tensor if self.tensor else None,
                "tok_s_over_limit": self.tok_s / self.limit_tok_s if self.tok_s and self.limit_tok_s else None}


def child(argv: list[str], label: str, logs: Path, env: dict | None = None) -> tuple[float, int, str, str]:
    """Run a child to its end: (wall s, peak RSS bytes from wait4's ru_maxrss, stdout, stderr); a failure
    is one line naming the command and its last line on stderr. The child is started by a small launcher
    process (LAUNCHER): Linux carries the forking process's peak RSS into the child's ru_maxrss (fork
    copies the address space, exec keeps the high-water mark), so forking it from this process, which
    holds torch, would report at least this process's size."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path, usage_path = (logs / f"{label}.{ext}" for ext in ("out", "err", "usage"))
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        r = subprocess.run([sys.executable, "-c", LAUNCHER, str(usage_path), *argv], stdout=out, stderr=err,
                           stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    if r.returncode != 0:
        last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "(no output)")
        raise PoelmError(f"{label}: exited {r.returncode}: {last}")
    usage = json.loads(usage_path.read_text())
    return usage["wall_s"], usage["maxrss_kib"] * 1024, stdout, stderr


def poelm(*args: str) -> list[str]:
    return [sys.executable, "-m", "poelm", *map(str, args)]


def has_flag(command: list[str], flag: str) -> bool:
    """Whether `poelm COMMAND --help` lists `flag` (what this poelm supports)."""
    r = subprocess.run(poelm(*command, "--help"), capture_output=True, text=True)
    return re.search(rf"(^|[\s\[,]){re.escape(flag)}([\s\]=,]|$)", r.stdout) is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a running process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def serve_once(directories: list[Path], flags: list[str], logs: Path, label: str, ready_s: float = 1800) -> dict:
    """`poelm serve` on a free port: seconds until /health says 200, one greedy completion per model,
    then VmHWM/VmRSS; stopped on the way out."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{label}.err", "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(poelm("serve", *directories, "--port", port, *flags), stdout=err, stderr=err,
                                stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                if proc.poll() is not None:
                    last = (logs / f"{label}.err").read_text(errors="replace").strip().splitlines()[-1:]
                    raise PoelmError(f"{label}: poelm serve exited {proc.returncode}: {' '.join(last)}")
                try:
                    status, health = get_json(f"{url}/health", timeout=5)
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.perf_counter() - t0 > ready_s:
                    raise PoelmError(f"{label}: poelm serve not ready after {ready_s:.0f} s")
                time.sleep(0.2)
            ready = time.perf_counter() - t0
            for model in health["models"]:
                status, _ = get_json(f"{url}/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4,
                                                                "temperature": 0})
                if status != 200:
                    raise PoelmError(f"{label}: a completion for {model!r} answered HTTP {status}")
            return {"ready_s": ready, "models": len(health["models"]), **proc_status(proc.pid)}
        finally:
            proc.terminate()
            proc.wait(timeout=120)


# ------------------------------------------------------------------------------------------- the run
def shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small shape (d4, width 256, vocab 4096, stages 2,2, "
                   "a 2-layer specialist) that checks the script in about a minute; flags given still win")
    for flag, kind, what in (("--depth", int, "base layers"), ("--n-embd", int, "width"),
                             ("--n-head", int, "query heads"), ("--vocab", int, "vocabulary size"),
                             ("--stages", str, "base layers per stage, e.g. 6,6,6,6"),
                             ("--stage-layers", int, "layers of each specialist")):
        p.add_argument(flag, type=kind, help=f"{what} (default: the card's, {CARD[flag[2:].replace('-', '_')]})")
    p.add_argument("--seq-len", type=int, default=2048, help="context length (default 2048)")


def resolve(args: argparse.Namespace) -> dict:
    preset = QUICK if args.quick else CARD
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    shape["seq_len"] = args.seq_len
    try:
        stages = [int(s) for s in shape["stages"].split(",")]
    except ValueError:
        raise PoelmError(f"--stages {shape['stages']}: expected layers per stage, e.g. 6,6,6,6") from None
    if sum(stages) != shape["depth"]:
        raise PoelmError(f"--stages {shape['stages']}: sums to {sum(stages)}, but --depth is {shape['depth']}")
    for name in ("depth", "n_embd", "n_head", "vocab", "stage_layers", "seq_len"):
        if shape[name] < 1:
            raise PoelmError(f"--{name.replace('_', '-')} {shape[name]}: expected a positive int")
    return shape


def parse_dtypes(text: str) -> list[str]:
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes) or len(set(dtypes)) != len(dtypes):
        raise PoelmError(f"--dtypes {text}: expected float32 and/or bfloat16, comma-separated")
    return dtypes


def supported_flags() -> dict[str, str | None]:
    """Which dtype flag each command takes in this poelm (None: none; the command runs as it is)."""
    found = {}
    for name, command in (("init", ["init"]), ("attach", ["specialist", "attach"]), ("export", ["export"]),
                          ("convert", ["convert", "nanochat"]), ("generate", ["generate"]), ("serve", ["serve"])):
        found[name] = next((f for f in ("--dtype", "--save-dtype") if has_flag(command, f)), None)
    return found


def startup_rows(logs: Path) -> list[Row]:
    rows = []
    for label, code in (("python -c 'import poelm'", "import poelm"),
                        ("python -c 'import poelm, torch'", "import poelm, torch")):
        walls = [child([sys.executable, "-c", code], "startup", logs) for _ in range(3)]
        wall, rss, _, _ = min(walls)
        rows.append(Row(label, "-", wall, peak_rss=rss, note="best of 3"))
    return rows


class Suite:
    """Every command of one dtype in its own folder: `run()` returns the rows, in order."""

    def __init__(self, root: Path, tok: Path, shape: dict, dtype: str, flags: dict, speeds: dict, bos: int):
        self.root, self.tok, self.shape, self.dtype, self.flags, self.speeds = root, tok, shape, dtype, flags, speeds
        self.bos, self.logs, self.rows = bos, root / "logs", []
        self.base, self.code = root / "base", root / "code"

    def dtype_flag(self, command: str) -> list[str]:
        flag = self.flags.get(command)
        return [flag, self.dtype] if flag is not None else []

    def load_dtype(self, command: str) -> str | None:
        """The dtype a loading command holds: the flag's, else the files' own (None)."""
        return self.dtype if self.flags.get(command) else None

    def timed(self, name: str, argv: list[str], reads: list[Path], writes: list[Path], tensor: int = 0,
              env: dict | None = None, note: str = "") -> tuple[Row, str, str]:
        evict(*reads)
        load = os.getloadavg()[0]  # the 1-minute load average as it starts: other work slows the wall
        wall, rss, out, err = child(argv, f"{self.dtype}-{name.split()[0]}", self.logs, env)
        row = Row(name, self.dtype, wall, read_bytes=dir_bytes(*reads),
                  written_bytes=dir_bytes(*[w for w in writes if w.exists()]), peak_rss=rss, tensor=tensor,
                  note=note, extra={"load": load}).finish(self.speeds)
        self.rows.append(row)
        return row, out, err

    def chain_files(self, *stages: Path) -> list[Path]:
        return [self.base / "model.safetensors", *(s / "delta.safetensors" for s in stages)]

    def decode_limit(self, row: Row, dtype: str | None) -> None:
        """Tokens/s the memory's bandwidth allows: every weight but the embedding tables, read once a token."""
        per_token = tensor_bytes(self.chain_files(self.code), dtype, skip=EMBEDDINGS, assembled=True)
        row.limit_tok_s = self.speeds["mem_Bps"] / per_token
        row.extra["weight_bytes_per_token"] = per_token

    def run(self) -> list[Row]:
        s = self.shape
        self.timed("init", poelm("init", "--tokenizer", self.tok, "--depth", s["depth"], "--n-embd", s["n_embd"],
                                 "--n-head", s["n_head"], "--seq-len", s["seq_len"], "--poe-stage-layers",
                                 s["stages"], "--out", self.base, *self.dtype_flag("init")),
                   [self.tok], [self.base])
        self.rows[-1].tensor = tensor_bytes([self.base / "model.safetensors"])
        self.timed(f"specialist attach --layers {s['stage_layers']}", self.attach_argv(self.code, "code", 0),
                   [self.base], [self.code])
        self.rows[-1].tensor = tensor_bytes(self.chain_files(self.code), assembled=True)
        self.timed("inspect STAGE", poelm("inspect", self.code), [self.base, self.code], [])
        self.timed("digest BASE STAGE", poelm("digest", self.base, self.code), [self.base, self.code], [])
        self.export()
        self.convert()
        self.generate()
        self.transformers()
        self.serve()
        return self.rows

    def attach_argv(self, out: Path, name: str, seed: int) -> list[str]:
        return poelm("specialist", "attach", self.base, "--layers", self.shape["stage_layers"], "--name", name,
                     "--seed", seed, "--out", out, *self.dtype_flag("attach"))

    def export(self) -> None:
        merged = self.root / "merged"
        self.timed("export STAGE", poelm("export", self.code, "--out", merged, *self.dtype_flag("export")),
                   [self.base, self.code], [merged])
        self.rows[-1].tensor = tensor_bytes([merged / "model.safetensors"])
        shutil.rmtree(merged)

    def convert(self) -> None:
        checkpoint, out = self.root / "nanochat", self.root / "converted"
        child([sys.executable, "-c", NANOCHAT_CHILD, str(self.base), str(checkpoint)], f"{self.dtype}-nanochat",
              self.logs)
        self.timed("convert nanochat", poelm("convert", "nanochat", "--checkpoint", checkpoint, "--tokenizer",
                                             self.tok, "--out", out, *self.dtype_flag("convert")),
                   [checkpoint, self.tok], [out], note="checkpoint: the base's tensors, torch.save")
        self.rows[-1].tensor = tensor_bytes([out / "model.safetensors"])
        shutil.rmtree(checkpoint)
        shutil.rmtree(out)

    def generate(self) -> None:
        dtype = self.load_dtype("generate")
        row, _, err = self.timed("generate STAGE (16 tokens)",
                                 poelm("generate", self.code, "--prompt", PROMPT, "--max-new-tokens", 16,
                                       "--temperature", 0, *self.dtype_flag("generate")),
                                 [self.base, self.code], [],
                                 tensor=tensor_bytes(self.chain_files(self.code), dtype, assembled=True))
        m = re.search(r"(\d+) tokens in ([\d.]+)s \(([\d.]+) tok/s\)", err)
        if m:
            row.tok_s = float(m.group(3))
            row.extra.update(tokens=int(m.group(1)), decode_s=float(m.group(2)))
        self.decode_limit(row, dtype)

    def transformers(self) -> None:
        row, out, _ = self.timed("transformers from_pretrained + 8 tokens",
                                 [sys.executable, "-c", TRANSFORMERS_CHILD, str(self.code), self.dtype, str(self.bos),
                                  "8", PROMPT], [self.base, self.code], [],
                                 tensor=tensor_bytes(self.chain_files(self.code), self.dtype, assembled=True),
                                 env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
        result = json.loads(out.strip().splitlines()[-1])
        row.tok_s = result["tokens"] / result["seconds"]
        row.extra.update(tokens=result["tokens"], decode_s=result["seconds"])
        self.decode_limit(row, self.dtype)

    def serve(self) -> None:
        extras = [self.root / f"extra{i}" for i in (1, 2, 3)]
        for i, path in enumerate(extras, 1):  # untimed: the same command as the attach row
            child(self.attach_argv(path, f"extra{i}", i), f"{self.dtype}-attach-extra{i}", self.logs)
        dtype = self.load_dtype("serve")
        for n in (1, 2, 4):
            stages = [self.code, *extras][:n]
            evict(self.base, *stages)
            load = os.getloadavg()[0]
            r = serve_once([self.base, *stages], self.dtype_flag("serve"), self.logs, f"{self.dtype}-serve{n}")
            row = Row(f"serve BASE + {n} specialist{'s' * (n > 1)}", self.dtype, r["ready_s"],
                      read_bytes=dir_bytes(self.base, *stages), peak_rss=r["VmHWM"],
                      tensor=tensor_bytes(self.chain_files(*stages), dtype),
                      note="wall: until /health is 200; RSS: VmHWM after one completion per model",
                      extra={"VmRSS": r["VmRSS"], "models": r["models"], "load": load}).finish(self.speeds)
            self.rows.append(row)


# ------------------------------------------------------------------------------------------- output
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(result: dict) -> None:
    m, s = result["machine"], result["shape"]
    print(f"shape: d{s['depth']} width {s['n_embd']} heads {s['n_head']} vocab {s['vocab']} stages {s['stages']}, "
          f"+{s['stage_layers']}-layer specialist; {m['cpus']} CPUs, {m['ram_gb']:.1f} GB RAM; disk write "
          f"{m['write_Bps'] / 1e6:.0f} MB/s (fsync'd {m['probe_bytes'] / GB:.1f} GB), cold read "
          f"{m['read_Bps'] / 1e6:.0f} MB/s; memory read {m['mem_Bps'] / GB:.1f} GB/s; one thread hashes "
          f"{m['xxh3_Bps'] / GB:.1f} GB/s (xxh3-128: digests, fingerprints), {m['blake2b_Bps'] / GB:.2f} GB/s "
          f"(blake2b: old fingerprints); load average {m['load_before']:.1f} before, {m.get('load_after', 0):.1f} after (other "
          f"work on the machine slows the walls, not the memory)")
    print(f"poelm {result['poelm']}")
    for line in result["notes"]:
        print(line)
    head = (f"{'command':<42} {'dtype':<8} {'wall s':>8} {'disk-limit s':>12} {'wall/limit':>10} "
            f"{'peak RSS GB':>11} {'tensor GB':>9} {'RSS/tensor':>10} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['command']:<42} {r['dtype']:<8} {r['wall_s']:8.2f} {fmt(r['disk_limit_s'] or None, '12.2f'):>12} "
              f"{fmt(r['wall_over_limit'], '10.2f'):>10} {r['peak_rss'] / GB:11.3f} "
              f"{fmt(r['tensor'] / GB if r['tensor'] else None, '9.3f'):>9} {fmt(r['rss_over_tensor'], '10.3f'):>10} "
              f"{fmt(r['extra'].get('load'), '5.1f'):>5}")
    decoders = [r for r in result["rows"] if r["tok_s"] is not None]
    if decoders:
        print(f"\n{'decoding (prefill included)':<42} {'dtype':<8} {'tok/s':>8} {'limit tok/s':>12} {'tok/s/limit':>11} "
              f"{'GB read/token':>13} {'decode s':>8} {'wall-decode s':>13} {'/disk-limit':>11}")
        for r in decoders:
            e = r["extra"]
            rest = r["wall_s"] - e["decode_s"]
            print(f"{r['command']:<42} {r['dtype']:<8} {r['tok_s']:8.2f} {r['limit_tok_s']:12.2f} "
                  f"{r['tok_s_over_limit']:11.3f} {e['weight_bytes_per_token'] / GB:13.3f} {e['decode_s']:8.2f} "
                  f"{rest:13.2f} {rest / r['disk_limit_s']:11.2f}")
    if result["bf16_over_f32"]:
        print("\nbfloat16 / float32 peak RSS: " + ", ".join(f"{k} {v:.2f}" for k, v in result["bf16_over_f32"].items()))
    print()
    start = next((r["peak_rss"] for r in result["rows"] if r["command"].endswith("import poelm, torch'")), 0)
    largest = max((r["tensor"] for r in result["rows"]), default=0)
    if largest < 10 * start:
        print(f"(at this size the interpreter's own RSS, {start / GB:.2f} GB with torch, outweighs the tensors "
              f"(at most {largest / GB:.3f} GB): the bounds below are meant for the card's size)")
    for check in result["checks"]:
        print(f"{'holds' if check['holds'] else 'FAILS'}: {check['what']} ({check['measured']})")


def bf16_over_f32(rows: list[dict]) -> dict[str, float]:
    by = {(r["command"], r["dtype"]): r for r in rows}
    return {c: by[(c, "bfloat16")]["peak_rss"] / by[(c, "float32")]["peak_rss"]
            for c, d in by if d == "float32" and (c, "bfloat16") in by}


# The issue's "done when": which rows each bound applies to (commands by their first words).
RSS_BOUND = ("init", "specialist attach", "generate", "transformers", "serve BASE + 4")
BYTE_MOVING = ("init", "specialist attach", "digest", "export", "convert")
# Writers that never hold the model: their peak RSS is the interpreter (~0.24 GB) and the tensor or two
# in flight (init draws each in float32, as init_weights does, before storing it), so it does not halve
# with the stored dtype; held against 1.15x the bytes they write, not against float32's RSS.
STREAMING = ("init", "specialist attach")


def checks(rows: list[dict], halves: dict[str, float]) -> list[dict]:
    """Each bound the issue sets, with what this run measured: RSS <= 1.15x the tensor bytes held;
    inspect under 0.5 GB; the byte-moving commands within 2x the disk limit; bfloat16 about half the
    float32 peak RSS (0.4-0.6x) for the commands that hold tensors."""
    out = []
    for r in rows:
        c, where = r["command"], f"{r['command']} [{r['dtype']}]"
        if c.startswith(RSS_BOUND) and r["rss_over_tensor"] is not None:
            out.append({"what": f"{where}: peak RSS <= 1.15x tensor bytes", "holds": r["rss_over_tensor"] <= 1.15,
                        "measured": f"{r['rss_over_tensor']:.3f}x"})
        if c.startswith("inspect"):
            out.append({"what": f"{where}: peak RSS < 0.5 GB", "holds": r["peak_rss"] < 0.5 * GB,
                        "measured": f"{r['peak_rss'] / GB:.3f} GB"})
        if c.startswith(BYTE_MOVING) and r["wall_over_limit"] is not None:
            out.append({"what": f"{where}: wall <= 2x disk limit", "holds": r["wall_over_limit"] <= 2,
                        "measured": f"{r['wall_over_limit']:.2f}x"})
    holding = {r["command"] for r in rows if r["tensor"] and not r["command"].startswith(STREAMING)}
    for c, v in halves.items():
        if c in holding:
            out.append({"what": f"{c}: bfloat16 peak RSS about half of float32's", "holds": 0.4 <= v <= 0.6,
                        "measured": f"{v:.2f}x"})
    return out


def library_version() -> str:
    """Which poelm this measured: the git commit, and a digest of its source as it is (edits included)."""
    import hashlib

    import poelm

    root = Path(poelm.__file__).resolve().parent
    h = hashlib.blake2b(digest_size=6)
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return f"{r.stdout.strip() or 'no git'} + source {h.hexdigest()}"


def ram_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_args(p)
    p.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16 (default both)")
    p.add_argument("--probe-mb", type=int, default=4096,
                   help="size of the disk-speed probe file (default 4096: larger than a virtual disk's write cache)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR (must not exist) and keep it, logs included")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = p.parse_args()
    shape, dtypes = resolve(args), parse_dtypes(args.dtypes)
    if args.probe_mb < 1:
        raise PoelmError(f"--probe-mb {args.probe_mb}: expected a positive int")
    if args.keep is not None and os.path.exists(args.keep):
        raise PoelmError(f"--keep {args.keep}: exists (give a new folder)")
    if args.keep is not None:
        os.makedirs(args.keep)
        run(Path(args.keep), shape, dtypes, args)
    else:
        with tempfile.TemporaryDirectory(prefix="real_size.") as tmp:
            run(Path(tmp), shape, dtypes, args)


def run(root: Path, shape: dict, dtypes: list[str], args: argparse.Namespace) -> None:
    from load import synthetic_tokenizer  # benchmarks/load.py: 256 bytes + filler tokens
    from poelm.models.directory import save_tokenizer_dir

    version = library_version()
    machine = {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "ram_gb": ram_bytes() / GB,
               **disk_speeds(root, args.probe_mb << 20),
               "mem_Bps": memory_bandwidth(), **hash_speeds()}
    flags, notes = supported_flags(), []
    if "bfloat16" in dtypes and flags["init"] is None:
        notes.append("bfloat16: not supported by this poelm (no --dtype on init)")
        dtypes = [d for d in dtypes if d != "bfloat16"]
    missing = [c for c, f in flags.items() if f is None]
    if "bfloat16" in dtypes and missing:
        notes.append(f"bfloat16: no dtype flag on {', '.join(missing)}: those run as they are (the files' dtype)")
    tok = synthetic_tokenizer(shape["vocab"])
    save_tokenizer_dir(tok, root / "tokenizer")
    rows = startup_rows(root / "logs")
    for dtype in dtypes:
        folder = root / dtype
        folder.mkdir()
        rows += Suite(folder, root / "tokenizer", shape, dtype, flags, machine, tok.bos_id).run()
        if args.keep is None:
            shutil.rmtree(folder)
    machine["load_after"] = os.getloadavg()[0]
    if library_version() != version:
        notes.append(f"poelm's source changed during the run (it began with {version})")
    result = {"shape": shape, "machine": machine, "flags": flags, "notes": notes, "poelm": version,
              "rows": [{**asdict(r), **r.ratios()} for r in rows]}
    result["bf16_over_f32"] = bf16_over_f32(result["rows"])
    result["checks"] = checks(result["rows"], result["bf16_over_f32"])
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    from entry import run as run_main  # one line on bad input, never a traceback (benchmarks/entry.py)

    run_main(main)

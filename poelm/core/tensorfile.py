"""Safetensors files as poelm reads and writes them: headers parsed and checked here, tensors mapped
rather than copied, files written as a stream with their digest and fingerprint computed on the way
(docs/formats.md, "Tensor files").

Design choices:
- The header is read by poelm, not by the safetensors library: bounded (100 MB, the library's own
  bound), every entry's dtype, shape and byte range checked, and the ranges must cover the data section
  exactly (no gap, no overlap, nothing after), so a truncated or extended file is refused by its header.
- Reading maps the whole file privately (`torch.UntypedStorage.from_file(shared=False)`: copy-on-write)
  and views each tensor into the mapping: a load holds no second copy, its pages are read from disk
  when first touched, and writing a loaded tensor never reaches the file. A tensor whose offset is not
  a multiple of its item size cannot be a view; it is copied (poelm's files place only a stage's int64
  row ids so, and only sometimes). A file truncated by someone else while mapped faults when touched.
- Writing streams: the header is computed from names, dtypes and shapes first (padded with spaces to
  8 bytes, as safetensors does), then each tensor's bytes follow in the order given, so a writer holds
  one tensor at a time; the xxh3-128 digest is computed from the bytes as they are written.
- The fingerprint (a hash over each tensor's name, dtype, shape and bytes, by name) is one definition,
  computed from tensors in memory or streamed from a file without mapping it. Its hash is xxh3-128, as
  for the files' digests: it tells models apart (a stage on the wrong parent), it is not a signature,
  and at ~14 GB/s on one core it costs a 1.3B model 0.4 s where blake2b (poelm before 0.4, ~1 GB/s)
  cost 5: a value's scheme is its prefix, and a recorded `blake2b-128:` value is still checked, by
  recomputing in that scheme (docs/formats.md, "digests.json").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import xxhash

from .errors import PoelmError
from .files import ALGORITHM, CHUNK_BYTES, read_sequentially, write_behind

# Past its first GiB a file is written behind (files.write_behind): the kernel's dirty limit would
# throttle it (a 5.5 GB init: 22 -> 16 s). A smaller file stays in the page cache and its command exits
# at once (a 0.65 GB attach written behind waited 4 s more for the disk).
WRITE_BEHIND_AFTER = 1 << 30

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's bound on the JSON header
HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
FILE_DTYPES = {dtype: name for name, dtype in HEADER_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a safetensors header describes it, before any of its bytes are read: shape, dtype and
    its bytes [start, end) within the data section."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class Header:
    """A checked header: the tensors (in file order), the metadata, where the data section starts and
    the file's size (data_start + the last tensor's end)."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    size: int


def _bad(path: str | os.PathLike, why: str) -> PoelmError:
    return PoelmError(f"{path}: unreadable safetensors file ({why})")


def _entry(path: str | os.PathLike, name: Any, value: Any) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of non-negative ints, a byte range of its size."""
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
    dtype = HEADER_DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    if dtype is None:
        raise PoelmError(f"{path}: tensor {name!r} has dtype {value['dtype']}, which poelm does not store")
    shape, offsets = value["shape"], value["data_offsets"]
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise _bad(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets!r} is not a byte range [start, end)")
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise _bad(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of "
                         f"{value['dtype']} ({math.prod(shape) * dtype.itemsize} expected)")
    return TensorInfo(tuple(shape), dtype, offsets[0], offsets[1])


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the name {key!r} appears twice")
        out[key] = value
    return out


def read_header(path: str | os.PathLike) -> Header:
    """The file's header, checked (see the module docstring); reads only the header's bytes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes: shorter than the 8-byte header length")
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise _bad(path, f"a header of {length} bytes in a file of {size} (at most {MAX_HEADER_BYTES})")
            raw = f.read(length)
    except FileNotFoundError:
        raise PoelmError(f"{path}: missing") from None
    except OSError as e:
        raise _bad(path, e.strerror or str(e)) from None
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"the header is not a JSON object: {e}") from None
    if not isinstance(data, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = data.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _bad(path, "__metadata__ must map names to strings")
    tensors = {name: _entry(path, name, value) for name, value in data.items()}
    tensors = dict(sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)))
    end = 0
    for name, info in tensors.items():
        if info.start != end:
            raise _bad(path, f"tensor {name!r} starts at byte {info.start} of the data, the previous one ends at "
                             f"{end} (a gap or an overlap)")
        end = info.end
    if 8 + length + end != size:
        raise _bad(path, f"{size} bytes, but the header describes {8 + length + end}: truncated or extended")
    return Header(tensors, metadata, 8 + length, size)


def map_tensors(path: str | os.PathLike, header: Header) -> dict[str, torch.Tensor]:
    """Every tensor of the file, as a view into one private (copy-on-write) mapping of it."""
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=header.size)
    except RuntimeError as e:  # the file changed size since its header was read
        raise _bad(path, str(e).splitlines()[0]) from None
    out = {}
    for name, info in header.tensors.items():
        offset, item = header.data_start + info.start, info.dtype.itemsize
        if offset % item == 0:
            out[name] = torch.empty(0, dtype=info.dtype).set_(storage, offset // item, info.shape)
        else:  # cannot be a view at this offset: copied (see the module docstring)
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (info.end - info.start,))
            out[name] = raw.clone().view(info.dtype).reshape(info.shape)
    return out


# ------------------------------------------------------------------------------------- writing
class TensorWriter:
    """A safetensors file written as a stream: the header from `plan` (name, dtype, shape) first, then
    `write` each tensor in the plan's order. `close()` returns {"bytes", "xxh3_128"} of what was written.
    Write into a directory that is renamed into place when complete (common/atomic.AtomicDir).

    Each tensor is converted to its planned dtype, hashed (the file's digest, and `fingerprint` when
    given) and written in a background thread while the caller makes the next one (torch's conversions,
    the hashes and file writes release the GIL), so a writer that computes its tensors (`init`,
    `attach`) costs about the larger of the two rather than their sum; at most one tensor waits. A
    failed write is raised by the next `write` or by `close`."""

    def __init__(self, path: str | os.PathLike, plan: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, fingerprint: "Fingerprint | None" = None):
        self.path, self.plan = Path(path), [(n, d, tuple(s)) for n, d, s in plan]
        header: dict[str, Any] = {}
        offset = 0
        for name, dtype, shape in self.plan:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": FILE_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        if metadata:
            header["__metadata__"] = dict(metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.path, "wb")
        self._hash, self._next, self.bytes, self.fingerprint = xxhash.xxh3_128(), 0, 0, fingerprint
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poelm-write")
        self._pending: Future | None = None
        self._behind: tuple[int, int] | None = None
        self._put(len(raw).to_bytes(8, "little") + raw)

    def _put(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)
        if self.bytes >= WRITE_BEHIND_AFTER and len(data) >= 1 << 20:  # a large file's large tensors
            self._file.flush()
            write_behind(self._file.fileno(), self.bytes, len(data), self._behind)
            self._behind = (self.bytes, len(data))
        self.bytes += len(data)

    def _store(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        t = tensor.detach().to("cpu", dtype)
        data = tensor_bytes(t)
        if self.fingerprint is not None:
            self.fingerprint.tensor(name, t.dtype, t.shape).update(data)
        if len(data):
            self._put(data)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the plan: its name and shape must be the planned ones, and its dtype
        too unless both are floating (it is then converted). It must not change until the next call."""
        want = self.plan[self._next] if self._next < len(self.plan) else None
        if (want is None or (name, tuple(tensor.shape)) != (want[0], want[2])
                or (tensor.dtype != want[1] and not (tensor.is_floating_point() and want[1].is_floating_point))):
            raise ValueError(f"{self.path}: wrote {name!r} {tensor.dtype} {tuple(tensor.shape)}, planned {want}")
        self._wait()
        self._pending = self._pool.submit(self._store, name, tensor, want[1])
        self._next += 1

    def _shut(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()
            self._file.close()

    def close(self) -> dict[str, Any]:
        self._shut()
        if self._next != len(self.plan):
            raise ValueError(f"{self.path}: {self._next} of {len(self.plan)} planned tensors written")
        return {"bytes": self.bytes, ALGORITHM: self._hash.hexdigest()}

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            try:
                self._shut()
            except Exception:  # the body's error is the one to report
                pass


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order, as a buffer (no copy for a contiguous CPU tensor)."""
    t = tensor.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


# A fingerprint's scheme is the prefix of its value. poelm writes FINGERPRINT; LEGACY is read (a stage an
# older poelm recorded names its parent in it) and recomputed only to check such a stage.
FINGERPRINT, LEGACY = "xxh3-128", "blake2b-128"
SCHEMES = (FINGERPRINT, LEGACY)


def scheme_of(fingerprint: str) -> str:
    """The scheme a fingerprint value was computed in (its prefix); an unknown one is refused."""
    scheme = fingerprint.partition(":")[0] if isinstance(fingerprint, str) else None
    if scheme not in SCHEMES:
        raise PoelmError(f"fingerprint {fingerprint!r}: expected '<scheme>:<hex>' with a scheme of "
                         f"{', '.join(SCHEMES)}")
    return scheme


class Fingerprint:
    """xxh3-128 of the parent's fingerprint, then, by tensor name, each tensor's `name|dtype|shape|` and
    the xxh3-128 digest of its bytes. Tensors may be fed in any order (a file in its own order, `init` in
    its generator's): each is hashed alone, and only the combination is by name."""

    def __init__(self, parent: str = ""):
        self.parent, self._tensors = parent, {}

    def tensor(self, name: str, dtype: torch.dtype, shape: Iterable[int]) -> Any:
        """Start a tensor; returns its hash, to `update` with its bytes in memory order."""
        h = self._tensors[name] = (dtype, list(shape), xxhash.xxh3_128())
        return h[2]

    def hexdigest(self) -> str:
        top = xxhash.xxh3_128(self.parent.encode())
        for name in sorted(self._tensors):
            dtype, shape, h = self._tensors[name]
            top.update(f"{name}|{dtype}|{shape}|".encode())
            top.update(h.digest())
        return f"{FINGERPRINT}:{top.hexdigest()}"


def _legacy(path_or_tensors: Any, parent: str) -> str:
    """The blake2b-128 fingerprint an older poelm recorded: one blake2b over the parent's fingerprint,
    then each tensor's `name|dtype|shape|` and bytes, in name order."""
    h = hashlib.blake2b(parent.encode(), digest_size=16)
    if isinstance(path_or_tensors, Mapping):
        for name in sorted(path_or_tensors):
            t = path_or_tensors[name]
            h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
            h.update(tensor_bytes(t))
        return f"{LEGACY}:{h.hexdigest()}"
    header = read_header(path_or_tensors)
    with open(path_or_tensors, "rb") as f:
        for name in sorted(header.tensors):
            info = header.tensors[name]
            h.update(f"{name}|{info.dtype}|{list(info.shape)}|".encode())
            f.seek(header.data_start + info.start)
            _stream(f, info.end - info.start, h.update, path_or_tensors, name)
    return f"{LEGACY}:{h.hexdigest()}"


def _stream(f: Any, length: int, sink: Callable[[memoryview], Any], path: Any, name: str) -> None:
    """Feed `length` bytes of `f` from where it stands to `sink`, a chunk at a time."""
    buf = memoryview(bytearray(min(CHUNK_BYTES, length)))
    while length:
        n = f.readinto(buf[:min(length, len(buf))])
        if not n:
            raise _bad(path, f"tensor {name!r}: the file ended while it was read")
        sink(buf[:n])
        length -= n


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor], parent: str = "", scheme: str = FINGERPRINT) -> str:
    """The content identity of a set of tensors (chained with the parent's for a stage)."""
    if scheme == LEGACY:
        return _legacy(tensors, parent)
    fp = Fingerprint(parent)
    for name, t in tensors.items():
        fp.tensor(name, t.dtype, t.shape).update(tensor_bytes(t))
    return fp.hexdigest()


def fingerprint_file(path: str | os.PathLike, parent: str = "", scheme: str = FINGERPRINT) -> str:
    """`fingerprint_tensors` of a file's tensors, streamed from the file (nothing mapped or held)."""
    return _legacy(path, parent) if scheme == LEGACY else digest_and_fingerprint(path, parent)[1]


def digest_and_fingerprint(path: str | os.PathLike, parent: str = "") -> tuple[dict[str, Any], str]:
    """The file's digest entry ({"bytes", "xxh3_128"}) and its tensors' fingerprint, from one sequential
    read of it (the tensors in the file's order)."""
    header, whole, fp = read_header(path), xxhash.xxh3_128(), Fingerprint(parent)
    with open(path, "rb") as f:
        read_sequentially(f)
        _stream(f, header.data_start, whole.update, path, "(the header)")
        for name, info in header.tensors.items():  # in file order
            h = fp.tensor(name, info.dtype, info.shape)

            def both(chunk: memoryview, h: Any = h) -> None:
                whole.update(chunk)
                h.update(chunk)
            _stream(f, info.end - info.start, both, path, name)
    return {"bytes": header.size, ALGORITHM: whole.hexdigest()}, fp.hexdigest()


def stream_tensors(path: str | os.PathLike, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                   produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None,
                   parent: str = "") -> tuple[dict[str, Any], str]:
    """Write the tensors `plan` names, in name order, each made by `produce(name)` when its turn comes (and
    converted to its planned dtype), so the file's digest and the fingerprint are computed in the one pass
    that writes it and only one tensor is held; returns (the digest entry, the fingerprint)."""
    if [n for n, _, _ in plan] != sorted(n for n, _, _ in plan):
        raise ValueError(f"{path}: stream_tensors writes in name order (the fingerprint's)")
    fp = Fingerprint(parent)
    with TensorWriter(path, plan, metadata, fp) as w:
        for name, _, _ in plan:
            w.write(name, produce(name))
        return w.close(), fp.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
                 parent: str = "") -> tuple[dict[str, Any], str]:
    """`stream_tensors` of tensors in memory, the floating ones stored in `dtype` when given (converted one
    at a time)."""
    def stored(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    plan = [(n, stored(tensors[n]), tuple(tensors[n].shape)) for n in sorted(tensors)]
    return stream_tensors(path, plan, tensors.__getitem__, metadata, parent)

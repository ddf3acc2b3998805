"""Files: written whole (a temporary sibling renamed over the target), and read only if they are what
was written (each directory's `digests.json`, xxh3-128, hashed while the file loads); one JSON reader
with one set of errors naming the file (docs/model.md §9.3, docs/formats.md).

A file is hashed by streaming it through a reused buffer (`read`, never a mapping): a load maps its
tensor files once (tensorfile.py), and a second mapping of the same file in one process would count
its pages twice in the resident set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import xxhash

from .errors import PoelmError

# The files of a poelm directory (docs/formats.md), named here once.
CONFIG = "config.json"
WEIGHTS = "model.safetensors"  # a base's tensors
DELTA = "delta.safetensors"  # a stage's tensors
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILE = "poelm_tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CARD = "README.md"
MANIFEST = "digests.json"
FORMAT = "poelm-digests"
FORMAT_VERSION = 1
ALGORITHM = "xxh3_128"
UNLISTED_SUFFIXES = (".py", ".tmp")
PARENT_FIELD = "base_model_name_or_path"  # the one config.json field a user may edit (see above)
UNLINKED = ALGORITHM + "_unlinked"
UNLISTED_NAMES = frozenset({MANIFEST, CARD})
# Small JSON files read before anything is checked against them: bounded, so parsing costs little (a
# 1024-layer config.json is ~20 kB).
MAX_JSON_BYTES = {CONFIG: 1 << 20, GENERATION_CONFIG: 1 << 20}
CHUNK_BYTES = 1 << 18  # what a streamed hash reads at a time (larger is no faster: the kernel's readahead,
                       # raised by `read_sequentially`, decides a cold read's speed)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """A JSON object from a file, checked against its directory's digests first (when it has them); a
    file of a kind `MAX_JSON_BYTES` bounds is refused by its size before it is read."""
    path = Path(path)
    if not path.is_file():
        raise PoelmError(f"{path}: missing")
    limit = MAX_JSON_BYTES.get(path.name)
    if limit is not None and path.stat().st_size > limit:
        raise PoelmError(f"{path}: {path.stat().st_size} bytes; a {path.name} holds at most {limit} "
                         f"(poelm's bound: a config lists a few hundred values)")
    if verify:
        verify_file(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise PoelmError(f"{path}: not UTF-8 text; expected JSON") from None
    except json.JSONDecodeError as e:
        raise PoelmError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except (ValueError, RecursionError) as e:  # an integer past Python's digit limit, deep nesting
        raise PoelmError(f"{path}: JSON too large to parse ({e})") from None
    if not isinstance(data, dict):
        raise PoelmError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def digest_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def read_sequentially(f: Any) -> None:
    """Hint that `f` is read front to back: the kernel reads further ahead, so a cold read runs at the
    disk's speed while the reader hashes (where the OS has no such hint, nothing)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _libc() -> Any:
    """The C library when it has Linux's sync_file_range, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    if not hasattr(lib, "sync_file_range"):
        return None
    lib.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lib


_LIBC = _libc()
_SYNC_WRITE, _SYNC_WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER


def write_behind(fd: int, start: int, length: int, previous: tuple[int, int] | None) -> None:
    """A large file written as a stream, at the disk's speed: start writing [start, start + length) back
    now, wait for the range before it and drop that from the page cache. Left to the kernel, gigabytes of
    dirty pages pile up until its dirty limit throttles the writer (measured: 0.29 GB/s for a 5.5 GB
    `init` on a disk that takes 0.55 GB/s). Hints only: Linux's; elsewhere, or refused, nothing."""
    if _LIBC is None:
        return
    _LIBC.sync_file_range(fd, start, length, _SYNC_WRITE)
    if previous is not None:
        _LIBC.sync_file_range(fd, previous[0], previous[1], _SYNC_WAIT)
        try:
            os.posix_fadvise(fd, previous[0], previous[1], os.POSIX_FADV_DONTNEED)
        except OSError:  # advice a filesystem may decline; the bytes are written either way
            pass


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"bytes": size, "xxh3_128": hex digest} of one file, streamed through one buffer (nothing held)."""
    h, size = xxhash.xxh3_128(), 0
    with open(path, "rb") as f:
        read_sequentially(f)
        buf = bytearray(min(CHUNK_BYTES, os.fstat(f.fileno()).st_size))  # a small file: a small buffer
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"bytes": size, ALGORITHM: h.hexdigest()}


def _top_level_span(text: str, key: str) -> tuple[int, int] | None:
    """(start, end) of the value of `key` in the JSON object `text`, when it is there exactly once at the
    top level; None otherwise (absent, twice, or `text` not a JSON object)."""
    decoder, ws = json.JSONDecoder(), " \t\n\r"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    try:
        i, spans = skip(0), []
        if text[i] != "{":
            return None
        i = skip(i + 1)
        while text[i] != "}":
            name, i = json.decoder.scanstring(text, i + 1) if text[i] == '"' else (None, -1)
            i = skip(i)
            if name is None or text[i] != ":":
                return None
            start = skip(i + 1)
            _, end = decoder.raw_decode(text, start)
            if name == key:
                spans.append((start, end))
            i = skip(end)
            if text[i] == ",":
                i = skip(i + 1)
            elif text[i] != "}":
                return None
    except (ValueError, IndexError):
        return None
    return spans[0] if len(spans) == 1 else None


def replace_value(text: str, key: str, value: Any) -> str:
    """`text` (a JSON object) with the value of its top-level `key` replaced by `value`, every other
    character kept."""
    span = _top_level_span(text, key)
    if span is None:
        raise PoelmError(f"expected exactly one top-level {key!r} in a JSON object")
    return text[:span[0]] + json.dumps(value, ensure_ascii=False) + text[span[1]:]


def unlinked_digest(data: bytes) -> str | None:
    """The digest of a config.json with its parent reference's value replaced by `null`; None for a file
    without exactly one top-level `base_model_name_or_path` (a base, or not a JSON object)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _top_level_span(text, PARENT_FIELD) is None:
        return None
    return digest_bytes(replace_value(text, PARENT_FIELD, None).encode("utf-8"))


def manifest_entry(path: str | os.PathLike) -> dict[str, Any]:
    """A manifest's entry for one file: `file_digest`, plus the unlinked digest of a stage's config.json."""
    entry = file_digest(path)
    if Path(path).name == CONFIG:
        unlinked = unlinked_digest(Path(path).read_bytes())
        if unlinked is not None:
            entry[UNLINKED] = unlinked
    return entry


def listed_files(directory: str | os.PathLike) -> list[str]:
    """The files of `directory` a manifest covers: every regular, non-hidden file but the card,
    code files and the manifest itself."""
    return sorted(p.name for p in Path(directory).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in UNLISTED_NAMES
                  and not p.name.endswith(UNLISTED_SUFFIXES))


def _write(directory: Path, data: dict[str, Any]) -> None:
    write_text(directory / MANIFEST, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_manifest(directory: str | os.PathLike, fingerprint: str | None = None,
                   known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Record every listed file of `directory` (and the model's fingerprint); replaces any manifest.
    `known`: entries of files whose digest was computed as they were written (not read again)."""
    directory = Path(directory)
    known = known or {}
    data: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "algorithm": ALGORITHM,
                            "files": {name: known.get(name) or manifest_entry(directory / name)
                                      for name in listed_files(directory)}}
    if fingerprint is not None:
        data["fingerprint"] = fingerprint
    _write(directory, data)
    return data


def update_manifest(directory: str | os.PathLike, names: Iterable[str],
                    fingerprint: str | None = None) -> dict[str, Any]:
    """Record (or re-record) `names` in the manifest, keeping its other entries; creates one if absent."""
    directory = Path(directory)
    data = read_manifest(directory) or {"format": FORMAT, "format_version": FORMAT_VERSION,
                                        "algorithm": ALGORITHM, "files": {}}
    for name in names:
        data["files"][name] = manifest_entry(directory / name)
    if fingerprint is not None:
        data["fingerprint"] = fingerprint
    _write(directory, data)
    return data


def record_files(directory: str | os.PathLike, names: Iterable[str]) -> bool:
    """Record files just written into a directory: merged into its manifest, or a new manifest when
    they are all the directory holds (a directory of other, unrecorded files gets none: listing only
    some of its files would make the rest unreadable). Returns whether they were recorded."""
    names = set(names)
    if read_manifest(directory) is None and not set(listed_files(directory)) <= names:
        return False
    update_manifest(directory, sorted(names & set(listed_files(directory))))
    return True


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The directory's manifest, checked for shape; None when it has none."""
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PoelmError(f"{path}: unreadable ({e.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise PoelmError(f"{path}: not valid JSON{where}; the directory's digests cannot be read") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION \
            or data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
        raise PoelmError(f"{path}: expected a JSON object with format {FORMAT!r} version {FORMAT_VERSION}, "
                         f"algorithm {ALGORITHM!r} and a 'files' object")
    for name, entry in files.items():
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise PoelmError(f"{path}: entry {name!r} is not a file name in this directory; a manifest lists only "
                             f"its own directory's files (the manifest is malformed: rewrite it with "
                             f"`poelm digest {path.parent}` if the files are the ones you mean)")
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and isinstance(entry.get(ALGORITHM), str)
                and isinstance(entry.get(UNLINKED, ""), str)):
            raise PoelmError(f"{path}: entry {name!r} must be {{\"bytes\": int, \"{ALGORITHM}\": str}}")
    fp = data.get("fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise PoelmError(f"{path}: 'fingerprint' must be a string")
    return data


def verify_file(path: str | os.PathLike, manifest: dict[str, Any] | None = None) -> bool:
    """Check one file against its directory's manifest (read here unless given).

    True: listed and identical. False: the directory has no manifest (nothing to verify against).
    A file that is missing, unlisted, of another size or of another digest is a PoelmError.
    """
    path = Path(path)
    if manifest is None:
        manifest = read_manifest(path.parent)
        if manifest is None:
            return False
    if not path.is_file():
        raise PoelmError(f"{path}: missing")
    entry = manifest["files"].get(path.name)
    if entry is None:
        raise PoelmError(f"{path}: not listed in {path.parent / MANIFEST}; the directory has changed since "
                         f"poelm wrote it (`poelm digest {path.parent}` records its files as they are now)")
    found = file_digest(path)
    if found == {"bytes": entry["bytes"], ALGORITHM: entry[ALGORITHM]}:
        return True
    if UNLINKED in entry and unlinked_digest(path.read_bytes()) == entry[UNLINKED]:
        return True  # only the parent reference moved; the parent's fingerprint is checked where it is loaded
    what = (f"{found['bytes']} bytes, {entry['bytes']} recorded: truncated, extended or edited"
            if found["bytes"] != entry["bytes"] else
            f"{ALGORITHM} {found[ALGORITHM]}, {entry[ALGORITHM]} recorded: corrupted or edited")
    relink = (f"; {PARENT_FIELD} alone may be edited freely, or set by "
              f"`poelm specialist relink {path.parent} --parent DIR`" if UNLINKED in entry else "")
    raise PoelmError(f"{path}: content does not match {MANIFEST} ({what}); if the edit is deliberate, "
                     f"`poelm digest {path.parent}` records it{relink}")


@contextmanager
def verifying(paths: Iterable[str | os.PathLike], manifest: dict[str, Any] | None = None) -> Iterator[None]:
    """Check `paths` (see `verify_file`) in a background thread while the body reads them. Leaving the block
    waits for the check: a mismatch is raised even when the body succeeded, and replaces the body's
    own error when both fail (a corrupt file is the cause worth naming)."""
    paths = [Path(p) for p in paths]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="poelm-verify") as pool:
        check = pool.submit(lambda: [verify_file(p, manifest) for p in paths])
        try:
            yield
        except BaseException:
            check.result()
            raise
        check.result()


def verify_all(directory: str | os.PathLike) -> int | None:
    """Check every file the directory's manifest lists; the number checked, or None without one."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    for name in sorted(manifest["files"]):
        verify_file(Path(directory) / name, manifest)
    return len(manifest["files"])


def warn_unverified(directory: str | os.PathLike, what: str) -> None:
    """Say that `directory` records no digests, so its files were read unverified."""
    warnings.warn(f"{directory}: no {MANIFEST}; the {what}'s files were read without verification "
                  f"(`poelm digest {directory}` records them)", stacklevel=3)

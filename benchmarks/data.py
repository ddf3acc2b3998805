"""Data at scale, measured side by side in one run: `poelm data tokenize` throughput with 1 and 2 worker
processes (and in-process, `--workers 0`, for reference), the tokenize command's peak memory on a corpus
and on one 10x larger, and the pretraining loader's start-up time on the two tokenized folders.

Corpora (offline, deterministic, written to a temporary folder): the demo-sized corpus is
`poelm.data.embedded.stdlib_corpus(--small-bytes)` (about 400 standard-library .py files, ~5 MB) as one
JSONL file of {"text"} records; the 10x corpus is the same documents `--copies` times, each copy's text
suffixed by a distinct comment line ("# copy K") so no two documents are equal (the split is by content
hash). Both runs of a comparison read the same format.

1. Throughput: the whole command `python -m poelm data tokenize --tokenizer TOK --input CORPUS --out DIR
   --workers N --shard-tokens S` in a subprocess, wall time from launch to exit (interpreter start-up,
   worker spawn and the final digests included), on the 10x corpus; MB/s = the input file's bytes
   (1 MB = 10**6 B) / seconds; and the tokenization itself, timed by the command (its closing line:
   from the reader's set-up to the renamed folder — workers spawned, every input read, tokenized and
   written, the index and digests written), which is what the goal is about. Workers 1, 2 and 0 run
   interleaved, `--repeats` times each, after the untimed memory runs below have warmed the page cache;
   the median is reported, and 2 workers / 1. Goal: >= 1.7x on the tokenization's MB/s. Beside them,
   for reading the ratio: the CPU seconds of each run's process tree (getrusage of waited-for children),
   the fixed start-up of the same command (`--help`: interpreter, imports — torch, through the parser's
   training and decoding options —, argument parsing), timed in the same rotation, and the whole
   command's ratio with and without that start-up (no goal: on a real corpus the start-up vanishes).
2. Peak memory: the same command (`--workers --memory-workers`, default 2) on the small and on the 10x
   corpus, with a sampler in this process summing the resident set (psutil: VmRSS) of the command and
   all its descendants (the spawned workers and their resource tracker) every ~20 ms; the peak of that
   sum (split into the command, its workers and the rest at that sample), and 10x / small. Shared pages
   (libraries) are counted once per process, as RSS does; a child forked but not yet exec'd (its command
   line still the parent's) shares the parent's pages and is left out. Goal: <= 1.2x.
3. Loader start-up: a fresh subprocess per measurement (this file with `--loader-child`) imports torch
   and poelm first (a pretraining run has them already), then times from before `TokenFolder(path)` to
   after the first `TokenLoader(folder.train_tokens, 8, 256, seed=0, pad_id=folder.bos_id).next_batch()`
   (index and digests read, each shard's size checked, the row permutation, the headers of the
   shards and the digests of the blocks the 8 rows touch checked, 8 rows gathered), printed as JSON. Each folder is opened once untimed
   first (the page cache is then the only warm thing), then `--repeats` times, interleaved; medians
   and 10x / small. Goal: within 1.2x.

The CPU time other processes on the machine used during the tokenize runs (all busy CPU time less this
benchmark's children's) is printed as a note when it exceeds a quarter of a core: the throughput ratio
needs the cores to itself.

Figures are ratios measured in the same run on the same machine; absolute times are printed for
reference and asserted nowhere. A benchmark, not a test.

    python benchmarks/data.py [--tokenizer runs/demo/tokenizer] [--repeats 3] [--copies 10]
                              [--shard-tokens 16777216] [--memory-workers 2] [--keep DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from poelm.core.errors import PoelmError

GOALS = {"workers2_vs_1_throughput": (">=", 1.7), "big_vs_small_peak_rss": ("<=", 1.2),
         "big_vs_small_loader_startup": ("<=", 1.2)}


def write_corpus(paths: list[str], copies: int, out: Path) -> tuple[int, int]:
    """`paths`' texts as JSONL {"text"} records, `copies` times (with more than one copy, copy k's texts end in
    "\\n# copy k\\n" so that no two documents are equal; one copy: the texts unchanged); returns (documents, bytes)."""
    texts = [Path(p).read_bytes().decode("utf-8") for p in paths]
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for k in range(copies):
            suffix = f"\n# copy {k}\n" if copies > 1 else ""
            for t in texts:
                f.write(json.dumps({"text": t + suffix}) + "\n")
                n += 1
    return n, out.stat().st_size


def tree_rss(root, root_cmdline: list[str]) -> dict[str, int]:
    """Resident bytes now of `root` and each of its descendants, by role: "main" (the command), "workers"
    (processes spawned by multiprocessing: the tokenizing workers), "other" (the resource tracker...). A child
    whose command line is still the root's has been forked but not yet exec'd: it shares the root's pages
    (vfork), so it is left out rather than counted twice. Processes that vanish meanwhile count 0."""
    import psutil

    out = {"main": 0, "workers": 0, "other": 0}
    try:
        children = root.children(recursive=True)
        out["main"] = root.memory_info().rss
    except psutil.Error:
        return out
    for p in children:
        try:
            cmdline = p.cmdline()
            if cmdline == root_cmdline:
                continue
            line = " ".join(cmdline)
            role = "workers" if "spawn_main" in line and "resource_tracker" not in line else "other"
            out[role] += p.memory_info().rss
        except psutil.Error:
            pass
    return out


def tokenize_cmd(args, corpus: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "poelm", "data", "tokenize", "--tokenizer", args.tokenizer, "--input", str(corpus),
            "--out", str(out), "--workers", str(workers), "--shard-tokens", str(args.shard_tokens)]


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for descendants so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (all processes) so far."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def run_command(cmd: list[str], sample_memory: bool = False) -> dict:
    """One subprocess: wall seconds, its tree's CPU seconds, the cores other processes on the machine used
    meanwhile, and with `sample_memory` the peak of the tree's summed RSS (sampled every ~20 ms)."""
    import psutil

    cpu0, busy0 = children_cpu(), busy_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: dict[str, int] = {"sum": 0}
    samples = 0
    stop = threading.Event()

    def sampler() -> None:
        nonlocal peak, samples
        try:
            root = psutil.Process(proc.pid)
            root_cmdline = root.cmdline()
        except psutil.Error:
            return
        while not stop.is_set():
            now = tree_rss(root, root_cmdline)
            if sum(now.values()) > peak["sum"]:
                peak = {"sum": sum(now.values()), **now}
            samples += 1
            stop.wait(0.02)

    thread = threading.Thread(target=sampler, daemon=True) if sample_memory else None
    if thread is not None:
        thread.start()
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    if thread is not None:
        thread.join()
    cpu = children_cpu() - cpu0
    if proc.returncode != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {proc.returncode}"
        raise PoelmError(f"`{' '.join(cmd)}` failed: {last}")
    phase = re.search(r" in ([0-9.]+)s with \d+ worker", stderr)  # the command's own timer (tokenize only)
    return {"seconds": seconds, "phase": float(phase.group(1)) if phase else seconds, "cpu_s": cpu,
            "other_cores": max(0.0, busy_cpu() - busy0 - cpu) / seconds, "peak_rss": peak, "samples": samples}


def run_tokenize(args, corpus: Path, out: Path, workers: int, sample_memory: bool = False) -> dict:
    """One `poelm data tokenize` subprocess (see `run_command`), into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    return run_command(tokenize_cmd(args, corpus, out, workers), sample_memory)


def loader_child(folder: str) -> None:
    """In a fresh interpreter: the seconds from opening the folder to the first batch, as JSON on stdout."""
    import torch  # noqa: F401 - imported before the clock: a pretraining process has it already

    from poelm.data.shards import TokenFolder
    from poelm.data.loader import TokenLoader

    t0 = time.perf_counter()
    f = TokenFolder(folder)
    t1 = time.perf_counter()
    loader = TokenLoader(f.train_tokens, 8, 256, seed=0, pad_id=f.bos_id)
    t2 = time.perf_counter()
    x, _ = loader.next_batch()
    t3 = time.perf_counter()
    assert x.shape == (8, 256)
    print(json.dumps({"seconds": t3 - t0, "open": t1 - t0, "loader": t2 - t1, "first_batch": t3 - t2,
                      "train_tokens": len(f.train_tokens), "shards": len(f.train_tokens.shards),
                      "rows": loader.rows_per_epoch}))


def run_loader(folder: Path) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--loader-child", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit status {r.returncode}"
        raise PoelmError(f"loader start-up on {folder} failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def verdict(name: str, value: float) -> dict:
    op, goal = GOALS[name]
    return {"value": round(value, 3), "goal": f"{op} {goal}", "met": value >= goal if op == ">=" else value <= goal}


def bench(args, work: Path) -> dict:
    from poelm.data.embedded import stdlib_corpus

    paths = stdlib_corpus(args.small_bytes)
    small, big = work / "small.jsonl", work / f"x{args.copies}.jsonl"
    small_docs, small_bytes = write_corpus(paths, 1, small)
    big_docs, big_bytes = write_corpus(paths, args.copies, big)
    log(f"corpora: small {small_docs} documents, {small_bytes / 1e6:.1f} MB; x{args.copies} {big_docs} documents, "
        f"{big_bytes / 1e6:.1f} MB (JSONL)")

    # 2. peak memory (first: these runs also warm the page cache and leave the folders the loader opens)
    memory = {}
    for name, corpus in (("small", small), ("big", big)):
        memory[name] = r = run_tokenize(args, corpus, work / f"data-{name}", args.memory_workers, sample_memory=True)
        log(f"memory: {name}: peak {r['peak_rss']['sum'] / 2**20:.0f} MiB ({r['samples']} samples in "
            f"{r['seconds']:.1f} s)")

    # 1. throughput on the big corpus, interleaved; and the command's fixed start-up (`--help`)
    runs: dict[str, list[dict]] = {"workers1": [], "workers2": [], "workers0": [], "startup": []}
    help_cmd = [sys.executable, "-m", "poelm", "data", "tokenize", "--help"]
    for rep in range(args.repeats):
        for key in runs:
            r = (run_command(help_cmd) if key == "startup" else
                 run_tokenize(args, big, work / "data-throughput", int(key[-1])))
            runs[key].append(r)
            log(f"throughput: repeat {rep + 1} {key}: {r['seconds']:.2f} s, {r['cpu_s']:.1f} CPU s, "
                f"others used {r['other_cores']:.2f} cores")
    shutil.rmtree(work / "data-throughput", ignore_errors=True)

    # 3. loader start-up, warmed once each, then interleaved
    loads: dict[str, list[dict]] = {"small": [], "big": []}
    for name in loads:
        run_loader(work / f"data-{name}")
    for _ in range(args.repeats):
        for name in loads:
            loads[name].append(run_loader(work / f"data-{name}"))

    corpus = {"small": {"documents": small_docs, "bytes": small_bytes},
              "big": {"documents": big_docs, "bytes": big_bytes, "copies": args.copies}}
    return summarize(args, corpus, memory, runs, loads)


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarize(args, corpus: dict, memory: dict, runs: dict, loads: dict) -> dict:
    """The measurements as the JSON line: medians, throughput, peak memory, loader start-up, the ratios."""
    big_bytes = corpus["big"]["bytes"]
    tput = {k: big_bytes / 1e6 / med(v, "seconds") for k, v in runs.items() if k != "startup"}
    phase = {k: big_bytes / 1e6 / med(v, "phase") for k, v in runs.items() if k != "startup"}
    load = {name: {k: med(rows, k) for k in ("seconds", "open", "loader", "first_batch")} for name, rows in
            loads.items()}
    other = [r["other_cores"] for v in runs.values() for r in v] + [r["other_cores"] for r in memory.values()]
    return {
        "corpus": corpus,
        "settings": {"repeats": args.repeats, "shard_tokens": args.shard_tokens, "memory_workers": args.memory_workers,
                     "cpus": os.cpu_count()},
        "tokenize_seconds": {k: [round(r["seconds"], 3) for r in v] for k, v in runs.items()},
        "tokenize_cpu_s": {k: round(med(v, "cpu_s"), 2) for k, v in runs.items()},
        "tokenize_mb_per_s": {k: round(v, 2) for k, v in tput.items()},
        "tokenize_phase_seconds": {k: [round(r["phase"], 3) for r in v] for k, v in runs.items() if k != "startup"},
        "tokenize_phase_mb_per_s": {k: round(v, 2) for k, v in phase.items()},
        "workers2_vs_1_whole_command": round(tput["workers2"] / tput["workers1"], 3),
        "workers2_vs_1_less_startup": round((med(runs["workers1"], "seconds") - med(runs["startup"], "seconds"))
                                            / (med(runs["workers2"], "seconds") - med(runs["startup"], "seconds")), 3),
        "other_processes_cores": {"median": round(statistics.median(other), 2), "max": round(max(other), 2)},
        "peak_rss_mib": {name: {k: round(v / 2**20, 1) for k, v in r["peak_rss"].items()}
                         for name, r in memory.items()},
        "loader_startup_ms": {name: {k: round(1e3 * v, 2) for k, v in d.items()} for name, d in load.items()},
        "loader_rows": {name: {"train_tokens": rows[0]["train_tokens"], "shards": rows[0]["shards"],
                               "rows": rows[0]["rows"]} for name, rows in loads.items()},
        "ratios": {"workers2_vs_1_throughput": verdict("workers2_vs_1_throughput",
                                                       phase["workers2"] / phase["workers1"]),
                   "big_vs_small_peak_rss": verdict("big_vs_small_peak_rss", memory["big"]["peak_rss"]["sum"]
                                                    / memory["small"]["peak_rss"]["sum"]),
                   "big_vs_small_loader_startup": verdict("big_vs_small_loader_startup",
                                                          load["big"]["seconds"] / load["small"]["seconds"])},
    }


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def report(s: dict) -> None:
    c, k, st = s["corpus"], s["corpus"]["big"]["copies"], s["settings"]
    print(f"corpus: small {c['small']['documents']} docs, {c['small']['bytes'] / 1e6:.1f} MB; "
          f"x{k} {c['big']['documents']} docs, {c['big']['bytes'] / 1e6:.1f} MB (JSONL); {st['cpus']} CPUs; "
          f"medians of {st['repeats']}; --shard-tokens {st['shard_tokens']}")
    print(f"\n{'tokenize x' + str(k):<28}{'command s':>10}{'MB/s':>7}{'tokenize s':>11}{'MB/s':>7}{'CPU s':>7}")
    for key, label in (("workers1", "--workers 1"), ("workers2", "--workers 2"),
                       ("workers0", "--workers 0 (in-process)"), ("startup", "start-up only (--help)")):
        mbs = f"{s['tokenize_mb_per_s'][key]:>7.1f}" if key in s["tokenize_mb_per_s"] else f"{'':>7}"
        ph = (f"{statistics.median(s['tokenize_phase_seconds'][key]):>11.2f}{s['tokenize_phase_mb_per_s'][key]:>7.1f}"
              if key in s["tokenize_phase_seconds"] else f"{'':>18}")
        print(f"  {label:<26}{statistics.median(s['tokenize_seconds'][key]):>10.2f}{mbs}{ph}"
              f"{s['tokenize_cpu_s'][key]:>7.1f}")
    print(f"\n{'':<36}{'small':>9}{'x' + str(k):>8}")
    rss = s["peak_rss_mib"]
    print(f"  {'peak RSS of the tree (MiB), -w ' + str(st['memory_workers']):<34}"
          f"{rss['small']['sum']:>9.0f}{rss['big']['sum']:>8.0f}")
    for part in ("main", "workers", "other"):
        print(f"    {part:<32}{rss['small'][part]:>9.0f}{rss['big'][part]:>8.0f}")
    ls = s["loader_startup_ms"]
    for key, label in (("seconds", "loader start-up (ms)"), ("open", "  TokenFolder()"), ("loader", "  TokenLoader()"),
                       ("first_batch", "  first next_batch()")):
        print(f"  {label:<34}{ls['small'][key]:>9.1f}{ls['big'][key]:>8.1f}")
    lr = s["loader_rows"]
    print(f"  {'  rows of 256 / train shards':<34}{lr['small']['rows']:>9,}{lr['big']['rows']:>8,}  "
          f"({lr['small']['shards']} / {lr['big']['shards']} shard(s))")
    print()
    for name, label in (("workers2_vs_1_throughput", "2 workers vs 1, tokenize MB/s"),
                        ("big_vs_small_peak_rss", f"x{k} vs small, peak RSS"),
                        ("big_vs_small_loader_startup", f"x{k} vs small, loader start-up")):
        r = s["ratios"][name]
        print(f"  {label:<34}{r['value']:>6.2f}x   goal {r['goal']}x: {'met' if r['met'] else 'MISSED'}")
        if name == "workers2_vs_1_throughput":
            print(f"    {'the whole command (start-up included)':<32}{s['workers2_vs_1_whole_command']:>6.2f}x")
            print(f"    {'the command less --help start-up':<32}{s['workers2_vs_1_less_startup']:>6.2f}x")
    o = s["other_processes_cores"]
    if o["max"] > 0.25:
        print(f"  note: other processes on this machine used {o['median']:.2f} cores (median; max {o['max']:.2f}) "
              f"during the runs: timings are contended")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="runs/demo/tokenizer", help="a tokenizer or model directory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copies", type=int, default=10, help="the big corpus: the small one this many times")
    p.add_argument("--small-bytes", type=int, default=5_000_000, help="stdlib_corpus(max_bytes) of the small corpus")
    p.add_argument("--shard-tokens", type=int, default=1 << 24)
    p.add_argument("--memory-workers", type=int, default=2, help="--workers of the memory runs")
    p.add_argument("--keep", metavar="DIR", help="write corpora and folders here and keep them (a new or empty dir)")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every figure")
    p.add_argument("--loader-child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loader_child:
        loader_child(args.loader_child)
        return 0
    try:
        for name, low in (("repeats", 1), ("copies", 2), ("small_bytes", 1), ("shard_tokens", 2),
                          ("memory_workers", 0)):
            if getattr(args, name) < low:
                raise PoelmError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an int >= {low}")
        if not os.path.isdir(args.tokenizer):
            raise PoelmError(f"{args.tokenizer}: no tokenizer directory; make one with `make demo` (writes "
                             f"runs/demo/tokenizer) or `poelm tokenizer train --input <files> --vocab-size 8192 "
                             f"--out DIR`, then pass --tokenizer DIR")
        args.tokenizer = os.path.abspath(args.tokenizer)
        if args.keep:
            keep = Path(args.keep)
            if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
                raise PoelmError(f"--keep {keep}: exists and is not an empty directory")
            keep.mkdir(parents=True, exist_ok=True)
            summary = bench(args, keep)
        else:
            with tempfile.TemporaryDirectory(prefix="poelm-data-bench-") as tmp:
                summary = bench(args, Path(tmp))
    except PoelmError as e:
        print(f"data benchmark: {e}", file=sys.stderr)
        return 2
    report(summary)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)

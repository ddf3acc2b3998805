"""Serving throughput and latency, measured side by side in one run: 1, 4 and 16 concurrent streaming
clients (one thread each, reading the stream with httpx, or with `--client openai` the official client)
against `poelm serve` (its own process) on a base and its stage;
a batch of 16 rows split over two specialists against 16 rows of one; and the memory the server holds
with N = 1, 2, 4 specialists of one base.

Each client streams one greedy completion of at most `--tokens` tokens (a stop token may end it
sooner; the tokens counted are the server's `usage`). Reported per setting: aggregate tokens/s (all clients' tokens
over the wall time from the first request to the last token), p50/p95 time to first token and
inter-token latency (the gaps between streamed chunks); each setting runs `--repeats` times, interleaved,
and the run with the median tokens/s is reported. Memory: the parameter bytes the server holds
(shared storage counted once) against the base alone plus each specialist's delta file, and against
N + 1 unshared models. Extra specialists for N = 2 and 4 are attached
to the base (a fresh block each, `poelm.specialist.attach`) in a temporary directory. A benchmark,
not a test.

    python benchmarks/serve.py BASEDIR STAGEDIR [--tokens 48] [--client http|openai] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from poelm.serve.models import load_served
from poelm.models.specialist import attach, save_specialist

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self", "import os\n\ndef walk(", "    return self.",
           "for i in range(", "with open(path) as f:", "try:\n    import json", "x = [i * i for i in"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def streamer(url: str, kind: str, timeout: float = 600):
    """A client (built now, before the clock starts) as a function from a request body to the streamed
    chunks as dicts: the official `openai` client (`kind` "openai": its pydantic objects, dumped) or
    the stream read straight off HTTP ("http": httpx, one `json.loads` per server-sent event — the
    lighter client, so that on a small machine the clients' own CPU crowds out less of the server's)."""
    if kind == "openai":
        import openai

        c = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=timeout)

        def chunks(body: dict):
            for event in c.completions.create(**body):
                yield event.model_dump()

        return chunks
    import httpx

    h = httpx.Client(base_url=url, timeout=timeout)

    def chunks(body: dict):
        with h.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()}")
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    yield json.loads(line[6:])

    return chunks


def load(url: str, models: list[str], clients: int, tokens: int, kind: str = "http") -> dict:
    """`clients` concurrent streaming completions (client i asks models[i % len(models)])."""
    ttft, gaps, counts, errors = [], [], [0] * clients, []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        body = {"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        chunks = streamer(url, kind)
        start.wait()
        t0 = last = time.perf_counter()
        try:
            for event in chunks(body):
                now = time.perf_counter()
                if event.get("usage"):
                    counts[i] = event["usage"]["completion_tokens"]
                if event["choices"] and event["choices"][0]["text"]:
                    (ttft.append(now - t0) if last == t0 else gaps.append(now - last))
                    last = now
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"serve benchmark: {len(errors)} client errors, first: {errors[0]}")
    return {"clients": clients, "tokens": sum(counts), "seconds": round(seconds, 3),
            "tok_per_s": round(sum(counts) / seconds, 1),
            "ttft_p50_ms": round(1e3 * percentile(ttft, 0.5), 1), "ttft_p95_ms": round(1e3 * percentile(ttft, 0.95), 1),
            "itl_p50_ms": round(1e3 * percentile(gaps, 0.5), 1), "itl_p95_ms": round(1e3 * percentile(gaps, 0.95), 1)}


@contextlib.contextmanager
def server(directories: list[str]):
    """`poelm serve` in its own process (the clients' threads must not share its interpreter), on a
    free port; yields (base URL, model ids) once /health answers 200; stops it on exit."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "poelm", "serve", *directories, "--name", "base",
                             "--port", str(port), "--max-batch", "16"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve benchmark: poelm serve exited with {proc.returncode}")
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("serve benchmark: poelm serve not ready after 300 s")
            time.sleep(0.2)
        yield url, health.json()["models"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def nbytes(p) -> int:
    return p.numel() * p.element_size()


def memory(base: Path, stages: list[Path]) -> dict:
    """Tensor bytes held with N specialists (parameters and buffers, each storage once) against the base plus the
    specialists' delta files, and against N + 1 unshared models."""
    out = {}
    for n in (1, 2, 4):
        models = [s.model for s in load_served([str(base)] + [str(s) for s in stages[:n]]).values()]
        tensors = {t.data_ptr(): t for m in models for t in (*m.parameters(), *m.buffers())}  # each storage once
        base_bytes = sum(nbytes(p) for p in models[0].parameters())
        own = sum(nbytes(t) for t in tensors.values()) - base_bytes
        files = sum((s / "delta.safetensors").stat().st_size for s in stages[:n])
        unshared = sum(nbytes(p) for m in models for p in m.parameters())
        out[f"N={n}"] = {"held_mb": round((base_bytes + own) / 2**20, 2), "base_mb": round(base_bytes / 2**20, 2),
                         "delta_files_mb": round(files / 2**20, 2), "unshared_mb": round(unshared / 2**20, 2),
                         "held_over_base_plus_deltas": round((base_bytes + own) / (base_bytes + files), 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("stage")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting; the median is reported")
    p.add_argument("--client", choices=("http", "openai"), default="http",
                   help="read the stream with httpx (default: light) or the official openai client")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        extra = [save_specialist(attach(args.base, 1, seed=i)[0], args.base, Path(tmp) / f"extra{i}", f"extra{i}")
                 for i in range(3)]
        stages = [Path(args.stage)] + extra
        result = {"memory": memory(Path(args.base), stages)}
        with server([args.base, args.stage, str(extra[0])]) as (url, models):
            stage, other = models[1:3]
            load(url, [stage, other], 4, 4, args.client)  # warm-up, untimed
            settings = {f"{n} clients": ([stage], n) for n in (1, 4, 16)}
            settings["16 clients, two specialists"] = ([stage, other], 16)
            tries: dict[str, list[dict]] = {name: [] for name in settings}
            for _ in range(args.repeats):  # interleaved, so a noisy moment hits every setting alike
                for name, (names, clients) in settings.items():
                    tries[name].append(load(url, names, clients, args.tokens, args.client))
            runs = {name: sorted(t, key=lambda r: r["tok_per_s"])[len(t) // 2] for name, t in tries.items()}
    one, sixteen = runs["1 clients"], runs["16 clients"]
    result.update({"tokens_per_request": args.tokens, "client": args.client, "repeats": args.repeats, "runs": runs,
                   "x16_vs_1": round(sixteen["tok_per_s"] / one["tok_per_s"], 2),
                   "mixed_cost": round(sixteen["tok_per_s"] / runs["16 clients, two specialists"]["tok_per_s"], 3)})
    if args.json:
        print(json.dumps(result))
        return
    for name, r in runs.items():
        print(f"{name:<30} {r['tok_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms p95 {r['ttft_p95_ms']:7.1f} ms"
              f"  ITL p50 {r['itl_p50_ms']:6.1f} ms p95 {r['itl_p95_ms']:6.1f} ms")
    print(f"16 clients vs 1: {result['x16_vs_1']}x aggregate tokens/s (goal >= 5.5x); a batch mixing two specialists "
          f"costs {result['mixed_cost']}x one specialist's (goal <= 1.3x)")
    for n, m in result["memory"].items():
        print(f"memory {n}: held {m['held_mb']} MB = {m['held_over_base_plus_deltas']}x the base ({m['base_mb']} MB) "
              f"+ its delta files ({m['delta_files_mb']} MB); {m['unshared_mb']} MB without sharing")


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)

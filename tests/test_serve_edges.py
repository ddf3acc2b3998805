"""`poelm serve` at its edges (issue 24): exact text for every client and no request that can harm another.

- Stop strings that occur and that never occur, streamed and not, completions and chat: the engine's
  text cut at the first stop string (through the official `openai` client).
- Echo returns the prompt as sent, with the log-probabilities of exactly its tokens; a text prompt and
  the same prompt as token ids echo alike.
- Hostile requests (extreme temperature and top_p, a seed past 64 bits, a prompt far past the context, a
  body past the limit, 1,000 stop strings, deep JSON, a 5,000-digit integer) beside three normal rows of
  three models leave those rows' outputs exactly as alone, and `/health` answers within 100 ms meanwhile.
- A non-streamed client that goes away frees its row within a second; a failure keeps the connection.
- What common clients send that changes nothing is accepted; what would change the result is a 400
  naming the field; strict types; keys from a file or the environment, compared in constant time, and
  every path but a bare liveness answer behind them; the OpenAPI schema declares bodies and statuses.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from poelm.app.cli import main  # noqa: E402
from poelm.core.errors import PoelmError  # noqa: E402

from serving import client, greedy, running, text_of, tokenizer_of  # noqa: E402

PROMPT = "def add(a, b):"
MESSAGES = [{"role": "user", "content": "write a loop"}]


@pytest.fixture(scope="module")
def live(serve_dirs):
    with running(serve_dirs, max_batch=8, max_queue=32) as (url, app):
        yield url, app


def slowed(monkeypatch, seconds: float) -> None:
    """Every batch step of the engine takes at least `seconds` (so requests overlap in a test)."""
    from poelm.infer.batch import Batch

    step = Batch.step
    monkeypatch.setattr(Batch, "step", lambda self: (time.sleep(seconds), step(self))[1])


def cut(text: str, stops: list[str], ended_by_token: bool) -> tuple[str, str]:
    """The engine's text cut before the first occurrence of any non-empty stop string, and the reason."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if hits:
        return text[:min(hits)], "stop"
    return text, "stop" if ended_by_token else "length"


# ---- exact text ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_stop_strings_that_occur_or_never_do_cut_the_engines_text(live, serve_dirs, api, stream):
    url, _ = live
    directory = serve_dirs[0] if api == "completions" else serve_dirs[1]
    tok = tokenizer_of(directory)
    ids = [tok.bos_id] + tok.encode(PROMPT) if api == "completions" else tok.render_prompt(MESSAGES)
    tokens = greedy(directory, ids, 24)
    full = text_of(directory, tokens)
    ended = len(tokens) < 24
    assert len(full) > 12
    c = client(url)
    for stops in ([], ["zzz"], "zzz", "", [""], ["zzz", ""], [full[5:7]], [full[10:12], full[3:5]], [full[-2:]],
                  [full[2:4], "zzz"], [full]):
        kw = dict(max_tokens=24, temperature=0, stop=stops)
        if api == "completions":
            if stream:
                events = list(c.completions.create(model=directory.name, prompt=PROMPT, stream=True, **kw))
                text = "".join(e.choices[0].text for e in events)
                reason = events[-1].choices[0].finish_reason
            else:
                choice = c.completions.create(model=directory.name, prompt=PROMPT, **kw).choices[0]
                text, reason = choice.text, choice.finish_reason
        elif stream:
            events = list(c.chat.completions.create(model="alpha", messages=MESSAGES, stream=True, **kw))
            text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
            reason = events[-1].choices[0].finish_reason
        else:
            choice = c.chat.completions.create(model="alpha", messages=MESSAGES, **kw).choices[0]
            text, reason = choice.message.content, choice.finish_reason
        as_list = [stops] if isinstance(stops, str) else stops
        assert (text, reason) == cut(full, as_list, ended), stops


def test_echo_returns_the_prompt_as_sent_and_its_own_tokens(live, serve_dirs):
    url, _ = live
    base = serve_dirs[0]
    tok = tokenizer_of(base)
    ids = tok.encode(PROMPT)
    c = client(url)
    as_text = c.completions.create(model=base.name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2).choices[0]
    as_ids = c.completions.create(model=base.name, prompt=ids, max_tokens=0, echo=True, logprobs=2).choices[0]
    assert as_text.text == PROMPT and as_ids.text == PROMPT  # no <|bos|>: exactly what was sent
    for lp in (as_text.logprobs, as_ids.logprobs):
        assert lp.tokens == [tok.decode([i]) for i in ids] and "".join(lp.tokens) == PROMPT
        assert lp.text_offset[0] == 0 and lp.token_logprobs[0] is not None  # the first token follows <|bos|>
    assert as_text.logprobs.model_dump() == as_ids.logprobs.model_dump()
    generated = c.completions.create(model=base.name, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                     logprobs=0).choices[0]
    alone = text_of(base, greedy(base, [tok.bos_id] + ids, 6))
    assert generated.text == PROMPT + alone and generated.logprobs.tokens[:len(ids)] == as_text.logprobs.tokens
    events = list(c.completions.create(model=base.name, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                       logprobs=1, stream=True))
    assert events[0].choices[0].text == PROMPT and events[0].choices[0].logprobs.tokens == as_text.logprobs.tokens
    assert "".join(e.choices[0].text for e in events) == PROMPT + alone


# ---- no request harms another ---------------------------------------------------------------------------

HOSTILE = [  # (body changes, the status it gets)
    ({"temperature": 1e-300}, 200), ({"temperature": 5e-324}, 200), ({"temperature": 1e-45, "top_p": 5e-324}, 200),
    ({"top_p": 5e-324}, 200), ({"seed": 2**70}, 400), ({"seed": 2**63 - 1, "n": 2}, 200),
    ({"prompt": "x" * 900_000}, 400), ({"stop": [f"s{i}" for i in range(1000)]}, 400),
    ({"stop": ["x" * 5000]}, 400), ({"n": 10_000}, 400), ({"logprobs": 10_000}, 400),
]
RAW = [  # (body, the status it gets)
    (b"[" * 100_000 + b"]" * 100_000, 400),
    (b'{"model": "perturbed", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", 400),
    (b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413),
]
# The hostile clients and the /health poller run in a process of their own, so the latency measured is the
# server's, not this process's threads building multi-megabyte bodies. It starts when told "go".
ATTACKER = r"""
import json, sys, threading, time
import httpx
url = sys.argv[1]
hostile, raw = json.loads(sys.stdin.readline())  # the go: the requests to send
statuses, latencies, done = {}, [], threading.Event()
def post(key, **kw):
    statuses[key] = httpx.post(url + "/v1/completions", timeout=60, **kw).status_code
def poll():
    with httpx.Client() as h:
        h.get(url + "/health")  # the connection is open before the measured polls
        while not done.is_set():
            t0 = time.perf_counter()
            assert h.get(url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
threads = [threading.Thread(target=post, args=(str(i),), kwargs={"json": {
    "model": "perturbed", "prompt": "a", "max_tokens": 30, **changes}}) for i, changes in enumerate(hostile)]
threads += [threading.Thread(target=post, args=("raw" + str(i),), kwargs={
    "content": data.encode("latin-1"), "headers": {"content-type": "application/json"}}) for i, data in enumerate(raw)]
poller = threading.Thread(target=poll)
poller.start()
for t in threads:
    t.start()
for t in threads:
    t.join()
time.sleep(0.2)
done.set()
poller.join()
print(json.dumps({"statuses": statuses, "latencies": latencies}))
"""


def test_hostile_requests_leave_other_rows_as_alone_and_health_answers(live, serve_dirs, monkeypatch):
    """Three normal greedy rows of three models (the base, alpha, beta) decode while every hostile request
    arrives (steps slowed to 5 ms so they overlap): each normal answer equals that model alone, each hostile
    one gets its status, and `/health` keeps answering at once throughout (see the bound below)."""
    url, app = live
    base, alpha, beta = serve_dirs
    assert base.name == "perturbed"
    tok = tokenizer_of(alpha)
    n = 120
    want = {"base": text_of(base, greedy(base, [tok.bos_id] + tok.encode(PROMPT), n)),
            "alpha": text_of(alpha, greedy(alpha, tok.render_prompt(MESSAGES), n)),
            "beta": text_of(beta, greedy(beta, tok.render_prompt(MESSAGES), n))}
    attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
    slowed(monkeypatch, 0.005)
    c = client(url)
    got = {}

    def normal(name):
        if name == "base":
            got[name] = c.completions.create(model=base.name, prompt=PROMPT, max_tokens=n, temperature=0).choices[0].text
        else:
            got[name] = c.chat.completions.create(model=name, messages=MESSAGES, max_tokens=n,
                                                  temperature=0).choices[0].message.content

    threads = [threading.Thread(target=normal, args=(name,)) for name in want]
    for t in threads:
        t.start()
    scheduler = app.state.poelm.scheduler
    deadline = time.time() + 10
    while scheduler.active < 3 and time.time() < deadline:
        time.sleep(0.002)
    assert scheduler.active == 3  # the normal rows decode while the attack runs
    requests = json.dumps([[c for c, _ in HOSTILE], [d.decode("latin-1") for d, _ in RAW]])
    out, _ = attacker.communicate(requests + "\n", timeout=120)
    for t in threads:
        t.join()
    assert got == want
    report = json.loads(out)
    assert report["statuses"] == {**{str(i): s for i, (_, s) in enumerate(HOSTILE)},
                                  **{f"raw{i}": s for i, (_, s) in enumerate(RAW)}}
    latencies = sorted(report["latencies"])
    # At once, but for polls the OS did not schedule (2 cores shared by the server, the attacker, this test
    # and another test worker: 5% of polls took 0.1-0.25 s on a slow machine): half within 50 ms, 90%
    # within 200 ms, none past a second. A blocked event loop (a prompt tokenized on it, stop strings
    # scanned on it) holds every poll that meets it for seconds.
    assert len(latencies) > 5 and latencies[len(latencies) // 2] < 0.05, latencies
    assert latencies[int(0.9 * (len(latencies) - 1))] < 0.2 and latencies[-1] < 1.0, latencies[-5:]


def test_a_non_streamed_client_that_goes_away_frees_its_row_within_a_second(live, serve_dirs, monkeypatch):
    url, app = live
    scheduler = app.state.poelm.scheduler
    slowed(monkeypatch, 0.02)  # 300 tokens would take 6 s
    before = scheduler.cancelled_rows
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    body = json.dumps({"model": serve_dirs[0].name, "prompt": "a", "max_tokens": 300, "temperature": 0.9}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.time() + 5
    while scheduler.active == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.active == 1
    time.sleep(0.2)
    sock.close()
    t0 = time.time()
    while scheduler.active and time.time() - t0 < 1.0:
        time.sleep(0.01)
    assert scheduler.active == 0 and scheduler.cancelled_rows == before + 1


def test_bad_json_and_failures_keep_the_connection_and_say_one_line(live, serve_dirs, capfd):
    url, _ = live
    with httpx.Client(base_url=url) as h:
        for data in (b"[" * 50_000 + b"]" * 50_000, b'{"max_tokens": ' + b"1" * 5000 + b"}", b"\xff\xfe", b"{"):
            r = h.post("/v1/completions", content=data, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "body", (data[:20], r.text)
            ok = h.post("/v1/completions", json={"model": serve_dirs[0].name, "prompt": "a", "max_tokens": 2})
            assert ok.status_code == 200  # the same keep-alive connection still serves
        r = h.get("/nowhere")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = h.delete("/v1/completions")
        assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in capfd.readouterr().err


# ---- what clients send ---------------------------------------------------------------------------------

def test_what_changes_nothing_is_accepted_and_what_would_is_named(live, serve_dirs):
    url, _ = live
    name = serve_dirs[0].name
    c = client(url)
    alone = c.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    same = c.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0, frequency_penalty=0,
                                presence_penalty=0.0, top_p=1, n=1, logit_bias={}, user="u1").choices[0].text
    assert same == alone
    streamed = list(c.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(e.choices[0].text for e in streamed if e.choices) == alone
    for field, value in (("frequency_penalty", 0.5), ("presence_penalty", -1.0), ("logit_bias", {"7": 2.0})):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=name, prompt=PROMPT, max_tokens=2, **{field: value})
        assert e.value.body["param"] == field and "would change the result" in e.value.body["message"]
    for body, param in (({"prompt": [True, False]}, "prompt"), ({"prompt": [1.0, 2.0]}, "prompt"),
                        ({"prompt": "a", "logprobs": False}, "logprobs"), ({"prompt": "a", "echo": 1}, "echo"),
                        ({"prompt": "a", "n": 1.0}, "n"), ({"prompt": "a", "temperature": True}, "temperature"),
                        ({"prompt": "a", "max_tokens": "8"}, "max_tokens")):
        r = httpx.post(f"{url}/v1/completions", json={"model": name, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_chat_accepts_text_parts_the_developer_role_and_an_assistant_first(live, serve_dirs):
    url, _ = live
    alpha = serve_dirs[1]
    tok = tokenizer_of(alpha)
    c = client(url)

    def answer(messages):
        return c.chat.completions.create(model="alpha", messages=messages, max_tokens=8,
                                         temperature=0).choices[0].message.content

    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one\ntwo"}]
    want = text_of(alpha, greedy(alpha, tok.render_prompt(plain), 8))
    assert answer(plain) == want
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert answer(parts) == want
    greeting = [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "hi"}]
    assert answer(greeting) == text_of(alpha, greedy(alpha, tok.render_prompt(greeting), 8))
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.content")


# ---- keys and the schema ---------------------------------------------------------------------------------

def test_keys_guard_everything_but_a_bare_liveness_answer(serve_dirs, tmp_path, monkeypatch):
    from poelm.serve.app import resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert resolve_api_key(None, key_file) == "s3cret"
    monkeypatch.setenv("POELM_API_KEY", "from-env")
    assert resolve_api_key(None, None) == "from-env" and resolve_api_key("given", None) == "given"
    with pytest.raises(PoelmError, match="give the key once"):
        resolve_api_key("a", key_file)
    (tmp_path / "empty").write_text("")
    with pytest.raises(PoelmError, match="empty"):
        resolve_api_key(None, tmp_path / "empty")
    with running(serve_dirs[:1], api_key="s3cret") as (url, _):
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/nowhere"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer s3cret!"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/openapi.json", headers=auth).status_code == 200
        assert httpx.get(f"{url}/docs", headers=auth).status_code == 200
        assert httpx.get(f"{url}/nowhere", headers=auth).status_code == 404
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/health", headers=auth).json() == {"status": "ok", "models": [serve_dirs[0].name]}


def test_serve_reads_its_key_from_a_file_or_refuses_in_one_line(serve_dirs, tmp_path, capsys):
    code = main(["serve", str(serve_dirs[0]), "--api-key-file", str(tmp_path / "missing"), "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--api-key-file" in err[0] and "missing" in err[0]


def test_the_schema_declares_bodies_and_every_status(live):
    url, _ = live
    schema = httpx.get(f"{url}/openapi.json").json()
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatRequest")):
        post = schema["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(post["responses"])
        assert "text/event-stream" in post["responses"]["200"]["content"]
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["frequency_penalty"]["maximum"] == 0 and props["logit_bias"]["maxProperties"] == 0

"""`poelm serve` through the official `openai` client against a live server on 127.0.0.1 (a free port,
started and stopped by each fixture): completions and chat, streamed and not, stop strings, n, seeded
sampling alone and inside a busy batch, echo + logprobs against the model's own log-softmax, two
specialists in one process each equal to the specialist alone, the base's tensors held once, a client
that disconnects, back-pressure (429), and the error shapes (400, 401, 404)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (raw requests, and fastapi.testclient)

from poelm.core.errors import PoelmError  # noqa: E402

from serving import client, greedy, model_of, running, text_of, tokenizer_of  # noqa: E402


@pytest.fixture(scope="module")
def dirs(serve_dirs):
    return serve_dirs


@pytest.fixture(scope="module")
def live(dirs):
    with running(dirs, max_batch=8, max_queue=16) as (url, app):
        yield url, app


def test_models_and_health(live, dirs):
    url, _ = live
    ids = [m.id for m in client(url).models.list().data]
    assert ids == [dirs[0].name, "alpha", "beta"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_completion_equals_the_engine_streamed_or_not(live, dirs):
    url, _ = live
    base = dirs[0]
    tok = tokenizer_of(base)
    want = greedy(base, [tok.bos_id] + tok.encode("def f(x):"), 12)
    c = client(url)
    r = c.completions.create(model=base.name, prompt="def f(x):", max_tokens=12, temperature=0)
    assert r.choices[0].text == text_of(base, want)
    assert r.choices[0].finish_reason == ("stop" if len(want) < 12 else "length")
    assert r.usage.prompt_tokens == 1 + len(tok.encode("def f(x):")) and r.usage.completion_tokens == len(want)
    pieces = list(c.completions.create(model=base.name, prompt="def f(x):", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == r.choices[0].text
    assert pieces[-1].usage.completion_tokens == len(want)


def test_chat_streamed_and_not_and_its_role_delta(live, dirs):
    url, _ = live
    stage = dirs[1]
    tok = tokenizer_of(stage)
    messages = [{"role": "user", "content": "hello there"}]
    want = greedy(stage, tok.render_prompt(messages), 10)
    c = client(url)
    r = c.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text_of(stage, want)
    events = list(c.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0,
                                            stream=True))
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == r.choices[0].message.content
    assert events[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text_before_them(live, dirs):
    url, _ = live
    base = dirs[0]
    c = client(url)
    full = c.completions.create(model=base.name, prompt="x = ", max_tokens=20, temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[3:5]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            events = list(c.completions.create(model=base.name, prompt="x = ", max_tokens=20, temperature=0,
                                               stop=[stop, "never seen"], stream=True))
            text, reason = "".join(e.choices[0].text for e in events), events[-1].choices[0].finish_reason
        else:
            r = c.completions.create(model=base.name, prompt="x = ", max_tokens=20, temperature=0,
                                     stop=[stop, "never seen"])
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")


def test_n_and_seeded_sampling_alone_and_inside_a_busy_batch(live, dirs, monkeypatch):
    """n=3 seeded rows give three different texts; the same request again, sent while other sampled
    requests fill the base's batch (steps slowed to 5 ms so they overlap), gives the same texts."""
    from poelm.infer.batch import Batch

    url, app = live
    base = dirs[0]
    c = client(url)

    def ask():
        r = c.completions.create(model=base.name, prompt="import", max_tokens=16, temperature=1.0, seed=7, n=3)
        return [ch.text for ch in r.choices]

    alone = ask()
    assert len(alone) == 3 and len(set(alone)) > 1  # n rows, each its own seed
    r = c.completions.create(model=base.name, prompt="import", max_tokens=4, n=3, temperature=0)
    assert r.usage.prompt_tokens == 1 + len(tokenizer_of(base).encode("import"))  # the prompt once, as OpenAI
    step = Batch.step
    monkeypatch.setattr(Batch, "step", lambda self: (time.sleep(0.005), step(self))[1])
    noise = [threading.Thread(target=lambda i=i: c.completions.create(
        model=base.name if i % 4 else "alpha", prompt="z" * (i + 1), max_tokens=40, temperature=0.8, seed=i))
        for i in range(6)]
    for t in noise:
        t.start()
    scheduler = app.state.poelm.scheduler
    deadline = time.time() + 10
    while scheduler.active < 4 and time.time() < deadline:
        time.sleep(0.005)
    assert scheduler.active >= 4  # the batch is busy before the request arrives
    busy = ask()
    for t in noise:
        t.join()
    assert busy == alone


def test_echo_logprobs_equal_the_models_log_softmax(live, dirs):
    url, _ = live
    base = dirs[0]
    tok = tokenizer_of(base)
    ids = [tok.bos_id] + tok.encode("def add(a, b):")
    r = client(url).completions.create(model=base.name, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    with torch.no_grad():
        want = torch.log_softmax(model_of(base)(torch.tensor([ids])).logits[0].float(), -1)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(want[t - 1, ids[t]]), abs=1e-4)
        assert len(lp.top_logprobs[t]) <= 2
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(want[t - 1].max()), abs=1e-4)
    assert lp.text_offset[0] == 0 and r.choices[0].text == tok.decode(ids)
    assert r.usage.completion_tokens == 0
    # exit_stage=0: the log-probabilities of stage 0's predictor
    r0 = client(url).completions.create(model=base.name, prompt=ids, max_tokens=0, echo=True, logprobs=0,
                                        extra_body={"exit_stage": 0})
    with torch.no_grad():
        stage0 = torch.log_softmax(model_of(base)(torch.tensor([ids]), exit_stage=0).logits[0].float(), -1)
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [float(stage0[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4)
    assert r0.choices[0].logprobs.token_logprobs[1:] != pytest.approx(lp.token_logprobs[1:], abs=1e-4)


def test_streamed_logprobs_equal_the_unstreamed_ones(live, dirs):
    """Per-token log-probabilities streamed from the decoding steps, collected over the chunks, equal the
    ones a non-streamed request scores after decoding: completions (tokens, logprobs, top alternatives,
    text offsets; a stop string cuts both alike) and chat (content entries; the end token is never one)."""
    url, _ = live
    c = client(url)
    kw = dict(model=dirs[0].name, prompt="def add(a, b):", max_tokens=12, temperature=0, logprobs=2)
    text = c.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]  # cuts the completion halfway, inside a token or not
    for extra in ({}, {"stop": [stop]}):
        whole = c.completions.create(**kw, **extra).choices[0].logprobs
        assert (len(whole.tokens) < 12) == bool(extra)
        got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for event in c.completions.create(**kw, **extra, stream=True):
            if event.choices and event.choices[0].logprobs is not None:
                for name in got:
                    got[name] += getattr(event.choices[0].logprobs, name)
        assert got["tokens"] == whole.tokens and got["text_offset"] == whole.text_offset, extra
        assert got["token_logprobs"] == pytest.approx(whole.token_logprobs, abs=1e-4)
        for mine, theirs in zip(got["top_logprobs"], whole.top_logprobs):
            assert mine.keys() == theirs.keys() and list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-4)
    messages = [{"role": "user", "content": "write a loop"}]
    chat = dict(model="alpha", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    whole = c.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [entry for event in c.chat.completions.create(**chat, stream=True)
                if event.choices and event.choices[0].logprobs is not None
                for entry in event.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole] and len(whole) > 0
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-4)
    assert all(len(e.top_logprobs) == 3 for e in streamed)


def test_two_specialists_in_one_batch_each_equal_the_specialist_alone(live, dirs, monkeypatch):
    """The base and two specialists asked at once (steps slowed to 5 ms so they overlap): their rows
    share batch steps (one pass through the base's layers, infer/fleet.py) and each answer equals that
    model decoding alone."""
    from poelm.infer.batch import Batch

    url, app = live
    c = client(url)
    tok = tokenizer_of(dirs[1])
    messages = [{"role": "user", "content": "write a loop"}]
    names = {"alpha": dirs[1], "beta": dirs[2], dirs[0].name: dirs[0]}
    want = {name: text_of(d, greedy(d, tok.render_prompt(messages), 24)) for name, d in names.items()}
    assert len(set(want.values())) == 3
    step = Batch.step
    monkeypatch.setattr(Batch, "step", lambda self: (time.sleep(0.005), step(self))[1])
    scheduler = app.state.poelm.scheduler
    before = scheduler.shared_steps
    got: dict[str, str] = {}

    def ask(name):
        got[name] = c.chat.completions.create(model=name, messages=messages, max_tokens=24,
                                              temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert scheduler.shared_steps > before


def test_the_base_is_held_once(live, dirs):
    """In the running server (load_served's models), the specialists hold the base's tensors, not copies."""
    served = live[1].state.poelm.served
    base, alpha = served[dirs[0].name].model, served["alpha"].model
    shared = dict(base.named_parameters())
    for name, p in alpha.named_parameters():
        if name.startswith("transformer.h.0.") or name == "lm_head.weight":
            assert p.data_ptr() == shared[name].data_ptr(), name
    assert alpha.transformer.h[-1].attn.c_q.weight.data_ptr() not in {p.data_ptr() for p in base.parameters()}
    # the embedding table too: alpha keeps apart only the chat-token rows its stage initialised
    assert alpha.transformer.wte.weight.data_ptr() == base.transformer.wte.weight.data_ptr()
    chat_rows = json.loads((dirs[1] / "config.json").read_text())["chat_rows"]
    assert sorted(alpha.own_row_ids.tolist()) == sorted(chat_rows) and len(chat_rows) == 8


def test_a_client_that_disconnects_frees_its_row(live, dirs, monkeypatch):
    """Decoding slowed to 20 ms a step (so the row cannot finish its 100 tokens first): after the client
    reads one event and goes away, the row is cancelled and leaves the batch within a second."""
    from poelm.infer.batch import Batch

    url, app = live
    scheduler = app.state.poelm.scheduler
    step = Batch.step

    def slow_step(self):
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(Batch, "step", slow_step)
    before = scheduler.cancelled_rows
    with httpx.stream("POST", f"{url}/v1/completions", json={
            "model": dirs[0].name, "prompt": "a", "max_tokens": 100, "temperature": 0.9, "stream": True},
            timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # one event, then go away
    t0 = time.time()
    while scheduler.active and time.time() - t0 < 1.0:
        time.sleep(0.01)
    assert scheduler.active == 0 and scheduler.cancelled_rows == before + 1


@pytest.fixture(scope="module")
def small(dirs):
    """A second server: the base alone, one row per batch, a queue of one, and a key."""
    with running(dirs[:1], max_batch=1, max_queue=1, api_key="sekret") as (url, app):
        yield url, app


def test_a_full_queue_answers_429_and_nothing_is_left_behind(small, dirs):
    url, app = small
    with pytest.raises(openai.RateLimitError) as e:
        client(url, key="sekret").completions.create(model=dirs[0].name, prompt="a", max_tokens=50, n=3)
    assert e.value.body["code"] == "queue_full"
    r = client(url, key="sekret").completions.create(model=dirs[0].name, prompt="a", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    deadline = time.time() + 10
    while app.state.poelm.scheduler.active and time.time() < deadline:
        time.sleep(0.02)
    assert app.state.poelm.scheduler.active == 0


def test_error_shapes(live, dirs):
    url, _ = live
    bad = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    unknown = httpx.post(f"{url}/v1/completions", json={"model": dirs[0].name, "prompt": "a", "best_of": 2})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "best_of"
    biased = httpx.post(f"{url}/v1/completions", json={"model": dirs[0].name, "prompt": "a", "logit_bias": {"5": 1}})
    assert biased.status_code == 400 and biased.json()["error"]["param"] == "logit_bias"
    wrong = httpx.post(f"{url}/v1/completions", json={"model": dirs[0].name, "prompt": "a", "temperature": "hot"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "temperature"
    nothing = httpx.post(f"{url}/v1/completions", json={"model": dirs[0].name, "prompt": "a", "max_tokens": 0})
    assert nothing.status_code == 400 and nothing.json()["error"]["param"] == "max_tokens"
    empty = httpx.post(f"{url}/v1/completions", json={"model": dirs[0].name, "prompt": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
    drafted = httpx.post(f"{url}/v1/completions", json={"model": dirs[0].name, "prompt": "a", "stream": True,
                                                        "logprobs": 1, "speculative": 2, "draft_stage": 0})
    assert drafted.status_code == 400 and "speculative" in drafted.json()["error"]["message"]
    assistant_last = httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": [
        {"role": "assistant", "content": "hi"}]})
    assert assistant_last.status_code == 400 and assistant_last.json()["error"]["param"] == "messages"
    too_long = httpx.post(f"{url}/v1/completions", json={"model": dirs[0].name, "prompt": [1] * 10_000})
    assert too_long.status_code == 400 and "sequence_len" in too_long.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model=dirs[0].name, prompt="a", extra_body={"exit_stage": 99})


def test_a_wrong_key_is_401(small, dirs):
    url, _ = small
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    assert [m.id for m in client(url, key="sekret").models.list().data] == [dirs[0].name]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # a bare liveness answer needs no key


def test_directories_of_different_bases_are_refused(dirs, seed_model_dir):
    """The base and another base of the same shape and tokenizer but other weights (the base is this one
    moved off its init): refused by the root fingerprint; and one directory twice, by its model id."""
    from poelm.serve.models import load_served

    with pytest.raises(PoelmError, match="root base"):
        load_served([str(dirs[0]), str(seed_model_dir)])
    with pytest.raises(PoelmError, match="already taken"):
        load_served([str(dirs[0]), str(dirs[0])])


def test_health_is_503_while_loading(dirs):
    """The app answers before the models are loaded: /health and the API say 503 until ready."""
    from fastapi.testclient import TestClient

    from poelm.serve.app import create_app

    app = create_app([str(dirs[0])])
    state = app.state.poelm
    client_ = TestClient(app)
    assert client_.get("/health").status_code == 503  # the lifespan (which loads) has not started
    assert client_.post("/v1/completions", json={}).json()["error"]["code"] == "loading"
    with TestClient(app) as running_client:
        assert state.ready.wait(60)
        assert running_client.get("/health").status_code == 200
    assert json.loads(json.dumps(state.served is not None))


def test_a_directory_that_fails_to_load_stops_the_server_with_one_line(tmp_path, capsys):
    from poelm.app.cli import main
    from poelm.serve.app import background

    with pytest.raises(PoelmError, match="not a directory|config.json"):
        with background([str(tmp_path / "missing")]):
            pass
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) != 0
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


def test_an_unexpected_failure_is_a_500_in_openais_shape(live, dirs, monkeypatch):
    from poelm.serve.scheduler import Scheduler

    url, _ = live

    def broken(self, job):
        raise RuntimeError("boom")

    monkeypatch.setattr(Scheduler, "check", broken)
    r = httpx.post(f"{url}/v1/completions", json={"model": dirs[0].name, "prompt": "a"})
    assert r.status_code == 500 and r.json()["error"] == {"message": "RuntimeError: boom", "type": "server_error",
                                                          "param": None, "code": None}

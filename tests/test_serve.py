"""`flashlm serve` end to end: the real server in a subprocess on the default model, driven by the official `openai`
client (and httpx for what the client will not send): answers equal flashlm's own greedy runs, streaming equals
non-streaming, concurrent and disconnecting clients, bad requests get OpenAI's error object, and the server lives."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
CTX = 2048  # as conftest's `model`, so the server's greedy tokens are the in-process ones
KEY = "test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "Water boils at",
           "My favourite colour is"]


class ServerProcess:
    """`flashlm serve --port 0` in a subprocess; its stderr lines are kept (the request log)."""

    def __init__(self, *args: str, timeout: float = 180):
        cmd = [sys.executable, "-m", "flashlm.cli", "serve", "--port", "0", "-t", "2", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.lines: list[str] = []
        deadline, self.url = time.monotonic() + timeout, None
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"the server exited ({self.proc.wait()}): {''.join(self.lines)[-2000:]}")
            self.lines.append(line)
            found = re.search(r" on (http://\S+/v1) ", line)
            if found:
                self.url = found.group(1)
            assert time.monotonic() < deadline, "the server did not start"
        self.base = self.url.removesuffix("/v1")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(smollm_path):
    s = ServerProcess("-m", smollm_path, "-c", str(CTX), "--parallel", "2", "--queue", "8", "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _greedy_chat(model, messages, n) -> tuple[str, int]:
    """flashlm's own greedy answer and its token count."""
    steps = list(model.session().chat(messages, stream=True, max_tokens=n, temperature=0.0))
    return "".join(r.text for r in steps), steps[-1].timings.eval_tokens


def _connect(server) -> http.client.HTTPConnection:
    u = urlsplit(server.base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=60)


def _http(server, method: str, path: str, body: bytes | dict | None = None, auth: bool = True):
    """(status, content type, text) of a plain HTTP request: what the openai client would not send."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {KEY}"} if auth else {})}
    conn = _connect(server)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if isinstance(body, dict) else body,
                     headers=headers)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read().decode()
    finally:
        conn.close()


def _health(server) -> dict:
    return json.loads(_http(server, "GET", "/health", auth=False)[2])


def test_health_and_models(server, client, smollm_path):
    assert _health(server) == {"status": "ok", "slots_idle": 2, "slots_processing": 0, "requests_waiting": 0}
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert client.models.retrieve("SmolLM2-135M-Instruct.Q4_1").context_length == CTX
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_equals_flashlm_greedy(client, model):
    r = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=16, temperature=0)
    expected, n_tokens = _greedy_chat(model, QUESTION, 16)
    assert "Paris" in expected
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.model == "SmolLM2-135M-Instruct.Q4_1" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(model.chat_prompt_ids(QUESTION))
    assert r.usage.completion_tokens == n_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 16 else "stop")


def test_chat_stream_equals_non_stream(client):
    kw = {"model": "any", "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the second request reused the first's cached prompt (same slot picked by prefix)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens


def test_sse_wire_format(server):
    body = {"messages": QUESTION, "max_tokens": 4, "temperature": 0, "stream": True}
    status, kind, text = _http(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and kind.startswith("text/event-stream")
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert '"finish_reason":"length"' in events[-3] and '"delta":{}' in events[-3]


def test_completions_both_ways(client, model):
    prompt = PROMPTS[0]
    expected = model.session().generate(prompt, max_tokens=12, temperature=0.0)
    r = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(model.tokenize(prompt)) and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "length"
    ids = client.completions.create(model="any", prompt=model.tokenize(prompt), max_tokens=12, temperature=0)
    assert ids.choices[0].text == expected  # token ids as the prompt
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="any", prompt=[1, 10 ** 9], max_tokens=1)
    assert _error(e)["param"] == "prompt"


def test_stop_strings(client, model):
    prompt = PROMPTS[0]
    full = model.session().generate(prompt, max_tokens=16, temperature=0.0)
    word = full.split()[2]  # a word from the middle of the greedy answer
    cut = full[:full.index(word)]
    for stop in (word, ["no such text", word]):
        r = client.completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0, stop=stop)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0, stop=word,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_four_concurrent_streams(client, model):
    expected = [model.session().generate(p, max_tokens=16, temperature=0.0) for p in PROMPTS]
    out, errors = [None] * 4, []

    def work(i):
        try:
            stream = client.completions.create(model="any", prompt=PROMPTS[i], max_tokens=16, temperature=0,
                                               stream=True)
            out[i] = "".join(c.choices[0].text for c in stream)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert out == expected  # each as when run alone, 2 at a time in the slots, 2 queued


def test_client_disconnect_frees_the_slot(server, client):
    """Two streams (both slots) cut after a few chunks: the slots are freed at once and a request then succeeds."""
    body = {"prompt": PROMPTS[1], "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    for _ in range(2):
        conn = _connect(server)
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        got = [r.readline() for _ in range(6)]  # three events and their blank lines
        conn.close()
        assert r.status == 200 and sum(line.startswith(b"data: {") for line in got) == 3
    deadline = time.monotonic() + 10
    while _health(server)["slots_idle"] != 2:
        assert time.monotonic() < deadline, _health(server)
        time.sleep(0.1)
    t0 = time.monotonic()
    r = client.completions.create(model="any", prompt=PROMPTS[2], max_tokens=4, temperature=0)
    assert r.choices[0].text and time.monotonic() - t0 < 20
    assert server.log().count("(client disconnected)") >= 2


def test_queue_then_429_end_to_end(server, client):
    """Both slots busy (two long streams) and the queue's 8 places taken: the next request gets 429 at once
    (openai's RateLimitError, OpenAI's error object); when the streams go, the queued requests all complete."""
    body = {"prompt": PROMPTS[1], "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    streams = []
    for _ in range(2):
        conn = _connect(server)
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        r.readline()  # generating
        streams.append(conn)
    done, threads = [], [threading.Thread(target=lambda: done.append(client.completions.create(
        model="any", prompt=PROMPTS[0], max_tokens=1, temperature=0))) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while _health(server)["requests_waiting"] != 8:
        assert time.monotonic() < deadline, _health(server)
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="any", prompt=PROMPTS[0], max_tokens=1)
    assert _error(e)["code"] == "rate_limit_exceeded" and "--queue" in _error(e)["message"]
    for conn in streams:
        conn.close()
    for t in threads:
        t.join(timeout=60)
    assert len(done) == 8 and all(r.choices[0].finish_reason == "length" for r in done)
    assert _health(server)["slots_idle"] == 2


def _error(exc_info) -> dict:
    return exc_info.value.response.json()["error"]


def test_bad_requests_get_openai_errors(server, client):
    status, kind, text = _http(server, "POST", "/v1/chat/completions", b'{"messages": [')
    err = json.loads(text)["error"]
    assert (status, kind, err["type"]) == (400, "application/json", "invalid_request_error")
    assert "not valid JSON" in err["message"]
    status, _, text = _http(server, "POST", "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(text)["error"]["message"]
    cases = [  # (keyword arguments, the field named)
        ({"extra_body": {"bogus": 1}}, "bogus"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 7}, "temperature"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"stop": ["ok", 5]}, "stop"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "any", "messages": QUESTION, "max_tokens": 2, **kw})
        assert e.value.status_code == 400
        err = _error(e)
        assert (err["param"], err["type"]) == (param, "invalid_request_error"), err
        assert set(err) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    status, _, text = _http(server, "GET", "/v1/nothing")
    assert status == 404 and json.loads(text)["error"]["code"] == "not_found"
    assert _health(server)["status"] == "ok"


def test_oversized_prompt_is_a_400(server, client):
    long_text = "one two three four five six seven eight nine ten " * 300  # ~3000 tokens > CTX
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="any", prompt=long_text, max_tokens=4)
    assert _error(e)["code"] == "context_length_exceeded" and _error(e)["param"] == "prompt"
    assert f"context of {CTX} tokens" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": long_text}], max_tokens=4,
                                       stream=True)
    assert _error(e)["code"] == "context_length_exceeded" and _error(e)["param"] == "messages"
    r = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=2)
    assert r.choices[0].message.content
    assert _health(server)["slots_idle"] == 2


def test_request_log(server, client):
    client.chat.completions.create(model="any", messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="any", messages=QUESTION, max_tokens=2, n=3)
    time.sleep(0.2)  # the log line is written as the response ends
    log = server.log()
    assert re.search(r"POST /v1/chat/completions 200 \d+\.\d+ s prompt \d+ tok \(\d+ cached", log), log[-2000:]
    assert re.search(r"POST /v1/chat/completions 400 ", log)


def test_readme_client_snippet(server, capsys):
    """The README's serving snippet runs as written against the server (its URL and key swapped in)."""
    text = (ROOT / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "from openai import" in b)
    assert 'base_url="http://127.0.0.1:8080/v1"' in snippet
    snippet = snippet.replace("http://127.0.0.1:8080/v1", server.url).replace('api_key="none"', f'api_key="{KEY}"')
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102
    assert "Paris" in capsys.readouterr().out


def test_slot_pool_queue_and_429():
    """Two requests on one slot with a queue of one: the second waits, the third is refused (429); a freed slot
    goes to the waiting request; a prompt gets the free slot whose cache shares the longest prefix."""
    from flashlm.tools.serve.app import APIError, SlotPool

    async def scenario():
        a, b = (SimpleNamespace(engine=SimpleNamespace(tokens=t)) for t in ([1, 2, 3], [7, 8]))
        pool = SlotPool([a], queue=1)
        first = await pool.acquire([1])
        waiter = asyncio.create_task(pool.acquire([1]))
        await asyncio.sleep(0.01)
        assert not waiter.done() and pool.stats()["requests_waiting"] == 1
        with pytest.raises(APIError) as e:
            await pool.acquire([1])
        assert e.value.status == 429 and e.value.body()["error"]["code"] == "rate_limit_exceeded"
        pool.release(first)
        assert await asyncio.wait_for(waiter, 1) is a
        pool.release(a)
        assert pool.stats() == {"slots_idle": 1, "slots_processing": 0, "requests_waiting": 0}
        # a waiting request that goes away leaves the queue; the slot then returns to the free ones
        busy = await pool.acquire([1])
        gone = asyncio.create_task(pool.acquire([1]))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        pool.release(busy)
        assert pool.stats() == {"slots_idle": 1, "slots_processing": 0, "requests_waiting": 0}
        pool = SlotPool([a, b], queue=0)
        assert await pool.acquire([7, 8, 9]) is b

    asyncio.run(scenario())


def test_generation_frees_its_slot_before_it_ends():
    """When a request sees its generation end, the slot is already free (a /health right after the answer found it
    busy: the release came in a second loop callback). The generation thread is slowed after each hand-over here,
    as a preempted thread would be."""
    from flashlm.tools.serve.app import Generation

    class SlowThread(Generation):
        def _call(self, fn, *args) -> None:
            super()._call(fn, *args)
            time.sleep(0.05)

    async def scenario():
        released = []
        steps = (SimpleNamespace(text=t) for t in "ab")  # a generator: the thread closes it at the end
        gen = SlowThread(steps, lambda: released.append(1))
        texts = []
        while (r := await asyncio.wait_for(gen.next(), 5)) is not None:
            texts.append(r.text)
        assert texts == ["a", "b"] and released == [1]

    asyncio.run(scenario())


def test_chat_without_a_template_is_a_400():
    """A model without a chat template answers chat completions with 400 (the mapping, on a stand-in model)."""
    from flashlm.errors import ChatTemplateError
    from flashlm.options import GenerationOptions
    from flashlm.tools.serve.app import APIError, Server
    from flashlm.tools.serve.protocol import parse_request

    def no_template(messages):
        raise ChatTemplateError("the model has no chat template (tokenizer.chat_template is missing)")

    model = SimpleNamespace(chat_prompt_ids=no_template, session=lambda: None, n_ctx=512)
    server = Server(model, "m", GenerationOptions(), parallel=1, queue=0)
    req = parse_request({"messages": QUESTION}, True, GenerationOptions())
    with pytest.raises(APIError) as e:
        server._prompt_ids(req, None)
    assert (e.value.status, e.value.param) == (400, "messages") and "no chat template" in e.value.message


def test_memory_budget_is_accepted(flash_path):
    # the budget's baseline measured in a fresh process that has imported what the server imports (Starlette and
    # uvicorn load OpenSSL, which the runtime alone no longer does: 3.75 MB)
    code = ("import uvicorn, flashlm.tools.serve.app; from tests.flash_budget_run import half_model_budget; "
            f"print(half_model_budget({flash_path!r}, 512))")
    budget = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                                check=True, timeout=120).stdout.split()[-1])
    s = ServerProcess("-m", flash_path, "-c", "512", "--memory-budget", f"{budget}B", "--parallel", "2")
    try:
        assert "MB is kept for the KV caches of 1 more slot(s)" in s.log()  # the plan leaves room for slot 2
        c = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=120)
        out = [None, None]

        def ask(i):
            out[i] = c.completions.create(model="any", prompt=PROMPTS[i], max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [r.usage.completion_tokens for r in out] == [24, 24]
        with open(f"/proc/{s.proc.pid}/status") as f:
            peak = int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024
        assert peak <= budget, (peak, budget)
    finally:
        s.stop()


def _serve(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from flashlm.cli import main; main()", "serve", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False)


def test_startup_errors_are_one_line_exit_2(tmp_path, flash_path):
    r = _serve("-m", str(tmp_path / "missing.gguf"), "--port", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "flashlm: error:" in r.stderr, r.stderr
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        r = _serve("--port", str(taken.getsockname()[1]))
    finally:
        taken.close()
    assert r.returncode == 2 and "cannot listen on 127.0.0.1:" in r.stderr, r.stderr
    r = _serve("--memory-budget", "lots", "--port", "0")
    assert r.returncode == 2 and "cannot read 'lots' as a size" in r.stderr, r.stderr
    r = _serve("-m", flash_path, "-c", "512", "--memory-budget", "60MB", "--parallel", "8", "--port", "0")
    assert r.returncode == 2 and "cannot hold the KV caches of 8 slots" in r.stderr, r.stderr


def test_without_the_serve_extra(tmp_path):
    """Without Starlette/uvicorn installed (hidden here), one line naming the extra, exit 2."""
    code = "import sys; sys.modules['starlette'] = None; from flashlm.cli import main; main(['serve'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == "flashlm: error: flashlm serve needs Starlette and uvicorn: pip install " \
                               "'flashlm[serve]'"

"""nla.endpoint against a real OpenAI-style HTTP server on localhost (no network, no sleeps)."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nla import endpoint
from nla.endpoint import Endpoint, complete_all, parse_summarizer
from nla.errors import NLAError


def answer(text: str) -> str:
    return "summary of: " + text[:30]


class Server:
    """What the fake server saw, and the failures it serves before answering normally."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.script = []  # (status, headers, payload), served first, one per request
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0


def handler(state: Server):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                scripted = state.script.pop(0) if state.script else None
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                time.sleep(state.delay)
                if self.path != "/v1/chat/completions":
                    status, headers, payload = 404, {}, {"error": "no such route"}
                elif scripted:
                    status, headers, payload = scripted
                else:
                    user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                    status, headers, payload = 200, {}, {
                        "id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer(user)},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
            finally:
                # before the reply: once the client has it, its thread may send the next request
                # before this one would get to count itself out (max_in_flight read 5 of 4 once)
                with state.lock:
                    state.in_flight -= 1
            data = json.dumps(payload).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
    return Handler


@pytest.fixture()
def server():
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def sleeps(monkeypatch):
    """Record the retry sleeps instead of sleeping; keep any proxy off localhost."""
    slept = []
    monkeypatch.setattr(endpoint, "_sleep", slept.append)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.delenv("TEST_NLA_KEY", raising=False)
    return slept


def chats(n, start=0):
    return [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"text number {i} " * 5}]
            for i in range(start, start + n)]


def expected(prompts):
    return [answer(p[-1]["content"]) for p in prompts]


def test_answers_in_order_with_concurrency(server, monkeypatch):
    monkeypatch.setenv("TEST_NLA_KEY", "sk-test")
    server.delay = 0.02
    ep = Endpoint(server.url, "big-model", api_key_env="TEST_NLA_KEY", concurrency=4, timeout=5)
    prompts = chats(20)
    assert complete_all(ep, prompts, max_tokens=48, temperature=0.0) == expected(prompts)
    assert len(server.requests) == 20
    for r in server.requests:
        assert r["path"] == "/v1/chat/completions"
        assert r["auth"] == "Bearer sk-test"
        assert (r["body"]["model"], r["body"]["max_tokens"], r["body"]["temperature"]) == ("big-model", 48, 0.0)
    assert 1 < server.max_in_flight <= 4


def test_no_key_no_header_and_full_chat_url(server):
    ep = Endpoint(server.url + "/chat/completions/", "m", api_key_env="TEST_NLA_KEY")
    assert complete_all(ep, chats(2), max_tokens=8) == expected(chats(2))
    assert [r["auth"] for r in server.requests] == [None, None]


def test_cache_skips_done_prompts(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    ep = Endpoint(server.url, "m", concurrency=3)
    first = chats(5)
    assert complete_all(ep, first, 16, cache_path=cache) == expected(first)
    assert len(server.requests) == 5
    assert complete_all(ep, first, 16, cache_path=cache) == expected(first)
    assert len(server.requests) == 5  # the rerun sent nothing

    mixed = chats(2, start=3) + chats(3, start=10) + chats(1)  # 3 cached, 3 new
    assert complete_all(ep, mixed, 16, cache_path=cache) == expected(mixed)
    assert len(server.requests) == 8
    assert len(complete_all(ep, first, 32, cache_path=cache)) == 5  # another max_tokens is another request
    assert len(server.requests) == 13

    # The key does not depend on the URL: the same model elsewhere (here: nowhere) costs nothing.
    dead = Endpoint(f"http://127.0.0.1:{free_port()}/v1", "m")
    assert complete_all(dead, mixed, 16, cache_path=cache) == expected(mixed)

    # A run killed mid-append leaves a torn line: it is dropped and only that answer is asked again.
    with open(cache, "a") as f:
        f.write('{"key": "abc", "cont')
    assert complete_all(ep, chats(1, start=50), 16, cache_path=cache) == expected(chats(1, start=50))
    assert len(server.requests) == 14
    assert all(json.loads(line) for line in cache.read_text().splitlines())


def test_identical_prompts_are_sent_once(server):
    prompts = chats(1) * 4
    assert complete_all(Endpoint(server.url, "m"), prompts, 8) == expected(prompts)
    assert len(server.requests) == 1


def test_transient_failures_are_retried(server, sleeps):
    server.script = [(503, {}, {"error": "loading"})] * 2
    ep = Endpoint(server.url, "m", retries=4)
    assert complete_all(ep, chats(1), 8) == expected(chats(1))
    assert len(server.requests) == 3
    assert len(sleeps) == 2 and 0 < sleeps[0] <= endpoint.BACKOFF_BASE and sleeps[1] <= 2 * endpoint.BACKOFF_BASE

    sleeps.clear()
    server.script = [(429, {"Retry-After": "0"}, {"error": {"message": "slow down"}})]
    assert complete_all(ep, chats(3), 8) == expected(chats(3))
    assert sleeps == [0.0]  # Retry-After honoured instead of the backoff


def test_persistent_5xx_gives_up_in_one_line(server):
    server.script = [(500, {}, {"error": "boom"})] * 3
    with pytest.raises(NLAError) as e:
        complete_all(Endpoint(server.url, "m", retries=2), chats(1), 8)
    assert "HTTP 500: boom" in str(e.value) and "\n" not in str(e.value)
    assert len(server.requests) == 3


def test_400_is_one_line_and_stops_before_the_batch(server):
    long = "max_tokens is too large:\n" + "x" * 500
    server.script = [(400, {}, {"error": {"message": long, "type": "invalid_request_error"}})]
    with pytest.raises(NLAError) as e:
        complete_all(Endpoint(server.url, "m"), chats(10), 8)
    msg = str(e.value)
    assert "HTTP 400: max_tokens is too large: xxx" in msg and "\n" not in msg and len(msg) < 300
    assert len(server.requests) == 1  # the check request failed; the other 9 were never sent


@pytest.mark.parametrize("status", [401, 403])
def test_auth_error_names_the_env_var(server, monkeypatch, status):
    server.script = [(status, {}, {"error": "invalid api key"})] * 2
    with pytest.raises(NLAError, match="set the TEST_NLA_KEY environment variable"):
        complete_all(Endpoint(server.url, "m", api_key_env="TEST_NLA_KEY"), chats(1), 8)
    monkeypatch.setenv("TEST_NLA_KEY", "wrong")
    with pytest.raises(NLAError, match=f"rejected the API key in TEST_NLA_KEY .HTTP {status}"):
        complete_all(Endpoint(server.url, "m", api_key_env="TEST_NLA_KEY"), chats(1), 8)


def test_missing_content_is_one_line(server):
    server.script = [(200, {}, {"choices": []})]
    with pytest.raises(NLAError, match="no choices.0..message.content") as e:
        complete_all(Endpoint(server.url, "m"), chats(1), 8)
    assert "\n" not in str(e.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_fails_fast_in_one_line(sleeps):
    url = f"http://127.0.0.1:{free_port()}/v1"
    t = time.monotonic()
    with pytest.raises(NLAError) as e:
        complete_all(Endpoint(url, "m", retries=3, timeout=2), chats(20), 8)
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert msg.startswith(f"summarizer endpoint {url} is unreachable (")
    assert msg.endswith("start the server or check --summarizer") and "\n" not in msg
    assert len(sleeps) == 3  # one prompt retried, the batch never started


def test_parse_summarizer():
    ep = parse_summarizer("http://localhost:11434/v1?model=llama3.1:8b")
    assert (ep.url, ep.model, ep.chat_url) == ("http://localhost:11434/v1", "llama3.1:8b",
                                               "http://localhost:11434/v1/chat/completions")
    ep = parse_summarizer("https://api.example.com/v1/chat/completions?model=org/Model-7B-Instruct")
    assert (ep.url, ep.model) == ("https://api.example.com/v1/chat/completions", "org/Model-7B-Instruct")
    assert ep.chat_url == ep.url
    ep = parse_summarizer("http://gpu-box:8000/v1/")
    assert (ep.model, ep.chat_url) == ("default", "http://gpu-box:8000/v1/chat/completions")
    ep = parse_summarizer("https://x.openai.azure.com/openai/deployments/d?api-version=2024-06-01&model=gpt-4o")
    assert ep.model == "gpt-4o"
    assert ep.chat_url == "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-06-01"
    for spec in ["smollm2", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "/models/llama", "./ckpt", "ftp://host/v1", "http://"]:
        assert parse_summarizer(spec) is None

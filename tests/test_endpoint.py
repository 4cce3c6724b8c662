"""The OpenAI-compatible chat client against real HTTP servers on 127.0.0.1: a scripted server (answers,
error statuses, Retry-After, slow answers) to pin the request body, the key header, retries, the
concurrency bound; a closed port and a server that never answers for unreachable and timing-out
endpoints; and posttrain's own app in-process (`ChatEndpoint.local`)."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from posttrain.synth.endpoint import ChatEndpoint, EndpointError, normalize_base_url


class Script:
    """What the scripted server answers: a queue of (status, body, headers) per request, then 200s."""

    def __init__(self):
        self.plan: list[tuple[int, dict, dict]] = []
        self.requests: list[tuple[dict, dict]] = []  # (headers, body) as received
        self.delay = 0.0
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()


def reply(text: str, finish: str = "stop") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


@pytest.fixture
def scripted():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.requests.append((dict(self.headers), body))
                script.in_flight += 1
                script.most_in_flight = max(script.most_in_flight, script.in_flight)
                status, payload, headers = script.plan.pop(0) if script.plan else (
                    200, reply(f"echo: {body['messages'][-1]['content']}"), {})
            time.sleep(script.delay)
            data = json.dumps(payload).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            with script.lock:
                script.in_flight -= 1

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield script
    server.shutdown()
    server.server_close()


def test_base_url_forms():
    assert normalize_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("https://host/openai/v1") == "https://host/openai/v1"
    with pytest.raises(ValueError, match="not an http"):
        normalize_base_url("127.0.0.1:8000")


def test_chat_sends_the_request_and_parses_the_answer(scripted, monkeypatch):
    monkeypatch.setenv("TEST_ENDPOINT_KEY", "sk-abc")
    endpoint = ChatEndpoint(scripted.url, "judge-1", api_key_env="TEST_ENDPOINT_KEY")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    result = endpoint.chat(messages, temperature=0.3, seed=7, max_tokens=12)
    assert result.text == "echo: Hi" and result.finish_reason == "stop" and result.attempts == 1
    assert result.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    headers, body = scripted.requests[0]
    assert headers["Authorization"] == "Bearer sk-abc"
    assert body == {"model": "judge-1", "messages": messages, "temperature": 0.3, "seed": 7, "max_tokens": 12}


def test_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR.*unset"):
        ChatEndpoint("http://127.0.0.1:1/v1", "m", api_key_env="NO_SUCH_KEY_VAR")


def test_5xx_and_429_are_retried_then_succeed(scripted):
    scripted.plan = [(503, {"error": {"message": "overloaded"}}, {}),
                     (429, {"error": {"message": "slow down"}}, {"Retry-After": "0.05"})]
    endpoint = ChatEndpoint(scripted.url, "m", max_retries=2, backoff=0.01)
    result = endpoint.chat([{"role": "user", "content": "x"}])
    assert result.text == "echo: x" and result.attempts == 3 and len(scripted.requests) == 3


def test_retries_are_bounded(scripted):
    scripted.plan = [(500, {"error": {"message": "boom"}}, {})] * 5
    endpoint = ChatEndpoint(scripted.url, "m", max_retries=2, backoff=0.01)
    with pytest.raises(EndpointError, match=r"failed after 3 attempts: HTTP 500: boom") as e:
        endpoint.chat([{"role": "user", "content": "x"}])
    assert e.value.status == 500 and e.value.attempts == 3 and len(scripted.requests) == 3


def test_client_errors_are_not_retried(scripted):
    scripted.plan = [(404, {"error": {"message": "The model 'gpt-9' does not exist"}}, {})]
    endpoint = ChatEndpoint(scripted.url, "gpt-9", max_retries=3, backoff=0.01)
    with pytest.raises(EndpointError, match="does not exist.*check the model name") as e:
        endpoint.chat([{"role": "user", "content": "x"}])
    assert e.value.status == 404 and len(scripted.requests) == 1


def test_a_malformed_answer_is_an_error(scripted):
    scripted.plan = [(200, {"hello": "world"}, {})]
    with pytest.raises(EndpointError, match="not an OpenAI chat completion"):
        ChatEndpoint(scripted.url, "m").chat([{"role": "user", "content": "x"}])


def test_many_requests_keep_their_order_and_the_concurrency_bound(scripted):
    scripted.delay = 0.15
    endpoint = ChatEndpoint(scripted.url, "m", concurrency=3)
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(9)]
    started = time.perf_counter()
    results = endpoint.chat_many(conversations)
    elapsed = time.perf_counter() - started
    assert [r.text for r in results] == [f"echo: q{i}" for i in range(9)]
    assert scripted.most_in_flight == 3  # bounded, and actually concurrent
    assert elapsed < 9 * 0.15  # not one after another


def test_failures_can_come_back_in_place(scripted):
    scripted.plan = [(400, {"error": {"message": "bad"}}, {})]
    results = ChatEndpoint(scripted.url, "m", concurrency=1).chat_many(
        [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], return_exceptions=True)
    assert isinstance(results[0], EndpointError) and results[1].text == "echo: b"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def test_unreachable_endpoint_is_retried_then_a_clear_error():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    endpoint = ChatEndpoint(url, "m", max_retries=2, backoff=0.01, timeout=2)
    started = time.perf_counter()
    with pytest.raises(EndpointError) as e:
        endpoint.chat([{"role": "user", "content": "x"}])
    message = str(e.value)
    assert url in message and "3 attempts" in message and "could not connect" in message
    assert "server is running" in message and e.value.status is None
    assert time.perf_counter() - started < 5
    with pytest.raises(EndpointError, match="3 attempts"):  # the async path too
        endpoint.chat_many([[{"role": "user", "content": "x"}]])


def test_a_server_that_never_answers_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (the kernel's backlog) and never answers them
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        endpoint = ChatEndpoint(url, "m", max_retries=1, backoff=0.01, timeout=0.3)
        started = time.perf_counter()
        with pytest.raises(EndpointError, match="failed after 2 attempts: timed out"):
            endpoint.chat([{"role": "user", "content": "x"}])
        assert time.perf_counter() - started < 3
    finally:
        listener.close()


def test_local_model_answers_like_in_process_generation(tiny_model_dir):
    """ChatEndpoint.local runs posttrain's server app in-process: the answer is greedy generation with
    the model's chat template and its stops."""
    from posttrain.generate import GenerationConfig, generate_text, render_prompt, reply_stops
    from posttrain.weights import load

    endpoint = ChatEndpoint.local(str(tiny_model_dir), concurrency=4)
    messages = [[{"role": "user", "content": f"Question {i}?"}] for i in range(3)]
    results = endpoint.chat_many(messages, temperature=0.0, max_tokens=8)
    model, tokenizer = load(str(tiny_model_dir))
    stop_strings, stop_ids = reply_stops(tokenizer)
    for m, r in zip(messages, results):
        expected = generate_text(model, tokenizer, [render_prompt(tokenizer, m)],
                                 GenerationConfig(max_new_tokens=8, stop_strings=stop_strings, stop_ids=stop_ids))[0]
        assert r.text == expected
        assert r.usage["completion_tokens"] >= 1
    assert endpoint.chat(messages[0], max_tokens=8).text == results[0].text  # sync use works too

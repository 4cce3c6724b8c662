"""LLM-as-judge against real HTTP servers on 127.0.0.1: a small server that speaks the OpenAI chat
protocol and answers fixed scores (known values), and posttrain's own `serve` of a tiny model.

Scores parsed, bad answers retried then counted (never guessed), an interrupted run resumed without
duplicates, and clear errors (endpoint down, wrong model, malformed replies, bad responses files)
that lose nothing already judged."""

import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port, running_server

from posttrain.eval.judge import (EndpointError, JudgePrompt, chat_url, judge_command, load_prompt, parse_score,
                                  read_judged)

MODEL = "judge-model"


class FakeJudge:
    """An OpenAI-compatible chat server whose answers are scripted per item.

    A judged response "R<k>" gets answers[k][attempt] (attempt 0, then one per retry). Modes:
    "ok", "malformed" (200 with a body that is not JSON), "no_seed" (400 whenever `seed` is sent).
    Items in `too_long` are refused as vLLM refuses a prompt over the model's context (400).
    """

    def __init__(self, answers: dict[int, list[str]], delay: float = 0.0, list_models: bool = True):
        self.answers, self.delay, self.list_models = answers, delay, list_models
        self.mode = "ok"
        self.too_long: set[int] = set()
        self.key: str | None = None  # when set, requests without "Authorization: Bearer <key>" get 401
        self.malformed_after: int | None = None  # switch to malformed after this many good answers
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, body: bytes | dict):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def refused(self) -> bool:
                if fake.key is not None and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    self.send(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
                    return True
                return False

            def do_GET(self):
                if self.refused():
                    return
                if self.path == "/v1/models" and fake.list_models:
                    self.send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                else:
                    self.send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.refused():
                    return
                with fake.lock:
                    fake.requests.append(body)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    time.sleep(fake.delay)
                    self.answer(body)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def answer(self, body):
                if self.path != "/v1/chat/completions":
                    return self.send(404, {"error": {"message": "not found"}})
                if body["model"] != MODEL:
                    return self.send(404, {"error": {"message": f"The model '{body['model']}' does not exist",
                                                     "code": "model_not_found"}})
                if fake.mode == "no_seed" and "seed" in body:
                    return self.send(400, {"error": {"message": "Unrecognized request argument: seed"}})
                with fake.lock:
                    good = sum(1 for r in fake.requests if r.get("_answered"))
                    if fake.mode == "malformed" or (fake.malformed_after is not None and good >= fake.malformed_after):
                        return self.send(200, b"<html>upstream error</html>")
                    body["_answered"] = True
                k = int(re.search(r"R(\d+)", body["messages"][0]["content"]).group(1))
                if k in fake.too_long:
                    return self.send(400, {"error": {
                        "message": f"This model's maximum context length is 64 tokens. However, you requested "
                                   f"{100 + k} tokens. Please reduce the length of the messages or completion.",
                        "type": "BadRequestError", "code": 400}})
                attempt = (len(body["messages"]) - 1) // 2
                text = fake.answers[k][min(attempt, len(fake.answers[k]) - 1)]
                self.send(200, {"id": "x", "object": "chat.completion", "model": MODEL, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def write_responses(path: Path, n: int) -> Path:
    rows = [{"index": k, "instruction": f"Question {k}?", "input": "", "reference": f"ref {k}", "response": f"R{k}"}
            for k in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scores_by_index(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["index"]: r for r in rows}


def test_parse_score_accepts_plain_scores_and_never_guesses():
    for text, want in [("85", 85), (" 85.\n", 85), ("**85**", 85), ("Score: 85", 85), ("85/100", 85),
                       ("Rating: 4 out of 5", None), ("0", 0), ("100", 100), ("101", None), ("-3", None),
                       ("85.5", None), ("I would say 85", None), ("85 or 90", None), ("", None), ("eighty", None),
                       ("85/10", None)]:
        assert parse_score(text, 0, 100) == want, text
    assert parse_score("4 out of 5", 1, 5) == 4
    assert parse_score("6", 1, 5) is None


def test_prompts_render_fields_and_keep_other_braces(tmp_path):
    row = {"instruction": "Add.", "input": "2+2", "reference": "4", "response": "5"}
    seed = load_prompt("seed")
    text = seed.render(row)
    assert text.startswith("Given the input `Below is an instruction that describes a task.")
    assert "### Instruction:\nAdd.\n\n### Input:\n2+2`" in text
    assert "correct output `4`, score the model response `5` on a scale from 0 to 100" in text
    assert text.endswith("Respond with the integer number only.")
    assert (seed.low, seed.high) == (0, 100)
    rubric = load_prompt("rubric")
    assert (rubric.low, rubric.high) == (1, 5) and "Request:\nAdd.\n\n2+2" in rubric.render(row)
    custom = tmp_path / "p.txt"
    custom.write_text('Q: {prompt}\nA: {response}\nReply as {"score": n} with n in 1..10')
    prompt = load_prompt(str(custom), (1, 10))
    assert prompt.render(row) == 'Q: Add.\n\n2+2\nA: 5\nReply as {"score": n} with n in 1..10'
    assert prompt.fingerprint != load_prompt(str(custom), (0, 10)).fingerprint
    custom.write_text("no placeholder")
    with pytest.raises(ValueError, match=r"no \{response\} placeholder"):
        load_prompt(str(custom))
    with pytest.raises(ValueError, match="not one of seed, rubric"):
        load_prompt("nonexistent-prompt")


def test_chat_url_forms():
    assert chat_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1"
    with pytest.raises(ValueError, match="not an http"):
        chat_url("127.0.0.1:8000")


def test_scores_parsed_bad_answers_retried_then_counted(tmp_path):
    answers = {0: ["85"], 1: ["Score: 70/100"], 2: ["I think it is good", "40"], 3: ["great", "bad", "meh"],
               4: ["101", "100"], 5: ["**55**"]}
    responses = write_responses(tmp_path / "responses-test.jsonl", 6)
    with FakeJudge(answers, delay=0.05) as server:
        summary = judge_command(str(responses), server.url, MODEL, concurrency=3, retries=2, progress=False)
    got = scores_by_index(tmp_path / "judge-test.jsonl")
    assert {k: r["score"] for k, r in got.items()} == {0: 85, 1: 70, 2: 40, 3: None, 4: 100, 5: 55}
    assert {k: r["attempts"] for k, r in got.items()} == {0: 1, 1: 1, 2: 2, 3: 3, 4: 2, 5: 1}
    assert got[3]["status"] == "unparseable" and got[3]["answers"] == ["great", "bad", "meh"]
    scores = [85, 70, 40, 100, 55]
    assert summary["scored"] == 5 and summary["unparseable"] == 1 and summary["n"] == 6
    assert summary["mean"] == pytest.approx(statistics.fmean(scores))
    assert summary["median"] == 70
    assert summary["stderr"] == pytest.approx(statistics.stdev(scores) / 5 ** 0.5)
    assert json.loads((tmp_path / "judge-test.json").read_text())["mean"] == pytest.approx(70.0)
    assert (tmp_path / "judge-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every request: temperature 0, a fixed seed, the model; a retry sends the bad answer and a reminder
    assert all(r["temperature"] == 0 and r["seed"] == 0 and r["model"] == MODEL for r in server.requests)
    retry = next(r for r in server.requests if len(r["messages"]) == 3 and "R2" in r["messages"][0]["content"])
    assert retry["messages"][1] == {"role": "assistant", "content": "I think it is good"}
    assert "integer from 0 to 100" in retry["messages"][2]["content"]
    assert 1 < server.max_in_flight <= 3  # concurrent, within the bound
    assert len(server.requests) == 1 + 1 + 2 + 3 + 2 + 1


def test_seed_is_dropped_when_the_server_refuses_it(tmp_path):
    responses = write_responses(tmp_path / "responses-test.jsonl", 3)
    with FakeJudge({k: ["50"] for k in range(3)}) as server:
        server.mode = "no_seed"
        summary = judge_command(str(responses), server.url, MODEL, concurrency=1, progress=False)
    assert summary["scored"] == 3
    assert "seed" in server.requests[0] and all("seed" not in r for r in server.requests[2:])


def test_api_key_comes_from_the_named_environment_variable(tmp_path, monkeypatch):
    responses = write_responses(tmp_path / "responses-test.jsonl", 2)
    with FakeJudge({0: ["7"], 1: ["8"]}) as server:
        server.key = "sk-judge-secret"
        with pytest.raises(EndpointError, match=r"the API key was refused \(401: Incorrect API key"):
            judge_command(str(responses), server.url, MODEL, progress=False)  # no key sent
        monkeypatch.setenv("JUDGE_TEST_KEY", "sk-judge-secret")
        summary = judge_command(str(responses), server.url, MODEL, api_key_env="JUDGE_TEST_KEY", progress=False)
        assert summary["scored"] == 2 and summary["mean"] == pytest.approx(7.5)
        monkeypatch.setenv("JUDGE_TEST_KEY", "")
        with pytest.raises(ValueError, match="JUDGE_TEST_KEY: that environment variable is unset or empty"):
            judge_command(str(responses), server.url, MODEL, api_key_env="JUDGE_TEST_KEY",
                          out=str(tmp_path / "other.jsonl"), progress=False)


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    n = 8
    responses = write_responses(tmp_path / "responses-test.jsonl", n)
    out = tmp_path / "judge-test.jsonl"
    with FakeJudge({k: [str(10 * k)] for k in range(n)}, delay=0.15) as server:
        cmd = [sys.executable, "-m", "posttrain.cli", "eval", "judge", str(responses), "--endpoint", server.url,
               "--model", MODEL, "--concurrency", "1", "--progress", "false"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not (out.exists() and len(out.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the judge wrote nothing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = len(out.read_text().splitlines())
        assert 3 <= done_before < n
        with open(out, "a") as f:  # a write torn by the kill
            f.write('{"index": 7, "sco')
        served_before = len(server.requests)
        summary = judge_command(str(responses), server.url, MODEL, concurrency=2, progress=False)
        assert len(server.requests) - served_before <= n - done_before + 1  # only what was missing (+ one in flight)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == list(range(n))  # each once, the torn line gone
    assert {r["index"]: r["score"] for r in lines} == {k: 10 * k for k in range(n)}
    assert summary["scored"] == n and summary["mean"] == pytest.approx(35.0)
    # finished: a third run sends nothing
    with FakeJudge({}) as server:
        judge_command(str(responses), server.url, MODEL, progress=False)
        assert server.requests == []


def test_an_item_over_the_judges_context_fails_alone_and_is_asked_again(tmp_path):
    n = 6
    responses = write_responses(tmp_path / "responses-test.jsonl", n)
    out = tmp_path / "judge-test.jsonl"
    with FakeJudge({k: [str(10 * k)] for k in range(n)}) as server:
        server.too_long = {2, 4}
        summary = judge_command(str(responses), server.url, MODEL, concurrency=2, progress=False)
        rows = scores_by_index(out)
        assert sorted(rows) == list(range(n))  # the run went on past the refused items
        assert {k: r["score"] for k, r in rows.items()} == {0: 0, 1: 10, 2: None, 3: 30, 4: None, 5: 50}
        for k in (2, 4):
            assert rows[k]["status"] == "failed" and rows[k]["http_status"] == 400 and rows[k]["answers"] == []
            assert "HTTP 400: This model's maximum context length is 64 tokens" in rows[k]["error"]
        assert (summary["scored"], summary["unparseable"], summary["failed"], summary["n"]) == (4, 0, 2, 6)
        assert summary["mean"] == pytest.approx(22.5)  # over the scored items only
        assert [f["index"] for f in summary["failed_items"]] == [2, 4]
        saved = json.loads((tmp_path / "judge-test.json").read_text())
        assert saved["failed"] == 2 and "maximum context length" in saved["failed_items"][0]["error"]
        # a 400 is not retried as 5xx are: one request per refused item
        assert sum(f"R{k}" in r["messages"][0]["content"] for r in server.requests for k in (2, 4)) == 2

        # the next run asks for the failed items only (now within the judge's context), once each
        server.too_long = {4}
        served = len(server.requests)
        summary = judge_command(str(responses), server.url, MODEL, progress=False)
        assert len(server.requests) - served == 2
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["index"] for r in lines) == list(range(n))  # no duplicates
        assert {r["index"]: r["score"] for r in lines}[2] == 20 and summary["failed"] == 1
        assert summary["scored"] == 5 and summary["mean"] == pytest.approx(22.0)

        # every item refused: not one item's problem; the run stops after the first 8 refusals (not one
        # request per item) with a clear error, and the reasons stay in the file
        (tmp_path / "all").mkdir()
        fresh = write_responses(tmp_path / "all" / "responses-test.jsonl", 20)
        server.too_long = set(range(20))
        served = len(server.requests)
        with pytest.raises(EndpointError, match=r"refused the first 8 requests and answered none.*maximum "
                                                r"context length"):
            judge_command(str(fresh), server.url, MODEL, progress=False, concurrency=1)
        asked = len(server.requests) - served
        assert 8 <= asked <= 9  # 8, and the one request the single worker had already started
        saved = scores_by_index(tmp_path / "all" / "judge-test.jsonl")
        assert len(saved) == asked and {r["status"] for r in saved.values()} == {"failed"}


def test_endpoint_down_is_a_clear_error_and_nothing_is_written(tmp_path):
    responses = write_responses(tmp_path / "responses-test.jsonl", 2)
    before = responses.read_bytes()
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1 .*is the server running"):
        judge_command(str(responses), url, MODEL, progress=False)
    assert responses.read_bytes() == before and not (tmp_path / "judge-test.jsonl").exists()


def test_wrong_model_name(tmp_path):
    responses = write_responses(tmp_path / "responses-test.jsonl", 2)
    with FakeJudge({0: ["1"], 1: ["2"]}) as server:
        with pytest.raises(EndpointError, match=r"model 'gpt-9' is not served by .*it serves: judge-model"):
            judge_command(str(responses), server.url, "gpt-9", progress=False)
    with FakeJudge({0: ["1"], 1: ["2"]}, list_models=False) as server:  # no /v1/models: the chat 404 tells
        with pytest.raises(EndpointError, match=r"model 'gpt-9'.*HTTP 404: The model 'gpt-9' does not exist"):
            judge_command(str(responses), server.url, "gpt-9", progress=False)
        assert len(server.requests) >= 1


def test_malformed_replies_stop_the_run_and_keep_what_was_judged(tmp_path):
    n = 5
    responses = write_responses(tmp_path / "responses-test.jsonl", n)
    out = tmp_path / "judge-test.jsonl"
    with FakeJudge({k: ["60"] for k in range(n)}) as server:
        server.malformed_after = 2
        with pytest.raises(EndpointError, match=r"not an OpenAI chat completion.*upstream error(.|\n)*2 newly judged "
                                                r"items are saved"):
            judge_command(str(responses), server.url, MODEL, concurrency=1, request_retries=1, progress=False)
        assert len(out.read_text().splitlines()) == 2
        server.malformed_after = None
        summary = judge_command(str(responses), server.url, MODEL, concurrency=1, progress=False)
    assert summary["scored"] == n and sorted(scores_by_index(out)) == list(range(n))


def test_bad_responses_file_and_mismatched_output(tmp_path):
    responses = tmp_path / "responses-test.jsonl"
    responses.write_text(json.dumps({"index": 0, "prompt": "q", "reference": "r"}) + "\n")
    with FakeJudge({}) as server:
        with pytest.raises(ValueError, match=r"responses-test.jsonl:1: missing string field\(s\) response"):
            judge_command(str(responses), server.url, MODEL, progress=False)
        responses.write_text(json.dumps({"index": 3, "reference": "r", "response": "R3"}) + "\n")  # no request
        with pytest.raises(ValueError, match=r"responses-test.jsonl: the row with index 3: the judge prompt uses "
                                             r"\{formatted_input\} but the row has no 'prompt', 'instruction'"):
            judge_command(str(responses), server.url, MODEL, progress=False)
        assert server.requests == [] and not (tmp_path / "judge-test.jsonl").exists()
    write_responses(responses, 2)
    out = tmp_path / "judge-test.jsonl"
    out.write_text(json.dumps({"index": 0, "score": 5, "judge": "other", "prompt_id": "x"}) + "\n")
    with pytest.raises(ValueError, match="holds scores from judge 'other'"):
        read_judged(out, MODEL, JudgePrompt("seed", "t {response}", 0, 100))


# -- posttrain's own server as the judge -----------------------------------------------------------

@pytest.fixture(scope="module")
def posttrain_server(tiny_model_dir, tmp_path_factory):
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("judge-log"), "--name", "tiny-judge",
                        "--max_batch", "4") as url:
        yield url


def test_posttrain_serve_as_judge(posttrain_server, tmp_path):
    responses = write_responses(tmp_path / "responses-test.jsonl", 3)
    prompt = tmp_path / "short.txt"  # the tiny model's context is 128 tokens (bytes)
    prompt.write_text("{response}/{reference}: 0-100?")
    summary = judge_command(str(responses), posttrain_server, "tiny-judge", prompt=str(prompt), retries=1,
                            max_tokens=4, concurrency=3, progress=False)
    rows = scores_by_index(tmp_path / "judge-test.jsonl")
    assert sorted(rows) == [0, 1, 2] and summary["n"] == 3
    assert summary["scored"] + summary["unparseable"] == 3
    for r in rows.values():  # a random tiny model: whatever it says is kept, scored only when it is a score
        assert all(isinstance(a, str) for a in r["answers"])
        if r["score"] is None:
            assert r["attempts"] == 2 and r["status"] == "unparseable"
        else:
            assert r["score"] == parse_score(r["answers"][-1], 0, 100)
    # a response too long for the judge's 128-token context: that item fails, the others are judged
    long_rows = [{"index": 0, "prompt": "q", "reference": "a", "response": "R0"},
                 {"index": 1, "prompt": "q", "reference": "a", "response": "R1 " + "x" * 200},
                 {"index": 2, "prompt": "q", "reference": "a", "response": "R2"}]
    long_file = tmp_path / "long" / "responses-test.jsonl"
    long_file.parent.mkdir()
    long_file.write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    summary = judge_command(str(long_file), posttrain_server, "tiny-judge", prompt=str(prompt), retries=0,
                            max_tokens=4, progress=False)
    rows = scores_by_index(tmp_path / "long" / "judge-test.jsonl")
    assert sorted(rows) == [0, 1, 2] and summary["failed"] == 1
    assert rows[1]["status"] == "failed" and "maximum context length is 128 tokens" in rows[1]["error"]
    assert all(rows[k]["status"] in ("ok", "unparseable") and len(rows[k]["answers"]) == 1 for k in (0, 2))
    with pytest.raises(EndpointError, match="model 'nope' is not served by .* it serves: tiny-judge"):
        judge_command(str(responses), posttrain_server, "nope", out=str(tmp_path / "other.jsonl"), progress=False)
    # no --model: the one model the server lists
    again = judge_command(str(responses), posttrain_server, prompt=str(prompt), out=str(tmp_path / "again.jsonl"),
                          retries=1, max_tokens=4, progress=False)
    assert again["judge"] == "tiny-judge" and again["n"] == 3

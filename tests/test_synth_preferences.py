"""`posttrain synth preferences` against real servers on 127.0.0.1: posttrain's own `serve` of a tiny
GPT-2 in a subprocess, behind an API key the client reads from an environment variable (valid
records, resume after a kill equals an uninterrupted run, unreachable endpoints, a wrong key), and
scripted servers for refusals, empty answers, the concurrency bound and an endpoint that stops
answering (timeouts)."""

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port, running_server
import torch

from posttrain import cli
from posttrain.data.formats import to_preference
from posttrain.data.preferences import records_to_pairs
from posttrain.data.sources import DataError, load_records
from posttrain.models.gpt2 import GPT2Config
from posttrain.models.registry import build_model
from posttrain.synth.endpoint import ChatEndpoint, EndpointError
from posttrain.synth.preferences import DEFAULT_TEMPLATE, failed_path, prompt_text, rewrite_request, synth_preferences
from posttrain.weights import save_pretrained

NAME = "tiny-rewriter"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
N_RECORDS, MAX_TOKENS = 40, 12
KEY_ENV, KEY = "POSTTRAIN_SYNTH_TEST_KEY", "sk-synth-test"  # the server's key; clients read it from KEY_ENV
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def instruction_records(n: int) -> list[dict]:
    return [{"instruction": f"Name a colour number {i}.", "input": "" if i % 2 else f"hint {i}",
             "output": f"Colour {i} is blue."} for i in range(n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, gpt2_tokenizer):
    """Base URL of `posttrain serve` running a tiny GPT-2 (random weights: varied, repeatable text)."""
    tokenizer = copy.copy(gpt2_tokenizer)
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    model = build_model(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    directory = save_pretrained(model, tokenizer, tmp_path_factory.mktemp("rewriter") / "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)  # for the server and for every client of this module (the CLI subprocess too)
        with running_server(directory, tmp_path_factory.mktemp("log"), "--name", NAME, "--max_batch", "8",
                            "--api_key_env", KEY_ENV, env=dict(os.environ)) as url:
            yield url + "/v1"


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "instructions.json"
    path.write_text(json.dumps(instruction_records(N_RECORDS)))
    return path


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_all(data_path, out, url, **kwargs) -> dict:
    args = dict(endpoint=url, model=NAME, api_key_env=KEY_ENV, max_tokens=MAX_TOKENS, concurrency=4, progress=False,
                max_retries=1, timeout=30)
    return synth_preferences(str(data_path), str(out), **{**args, **kwargs})


@pytest.fixture(scope="module")
def uninterrupted(server, data_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "prefs.jsonl"
    report = run_all(data_path, out, server)
    return out, report


def test_writes_valid_preference_records_in_input_order(server, data_path, uninterrupted):
    out, report = uninterrupted
    rows, failed = lines(out), lines(failed_path(out))
    assert report["records"] == N_RECORDS and report["done_before"] == 0
    assert report["written"] == len(rows) and sum(report["failed"].values()) == len(failed)
    assert sorted([r["source_index"] for r in rows] + [f["source_index"] for f in failed]) == list(range(N_RECORDS))
    assert [r["source_index"] for r in rows] == sorted(r["source_index"] for r in rows)
    assert len(rows) >= N_RECORDS // 2 and report["requests"] == 2 * N_RECORDS
    originals = instruction_records(N_RECORDS)
    for row in rows:
        assert {k: row[k] for k in ("instruction", "input", "output")} == originals[row["source_index"]]
        assert row["chosen"].strip() and row["rejected"].strip()
    # the records are what the endpoint answers to the rewriting requests (greedy: repeatable)
    first = rows[0]
    prompt = prompt_text(to_preference(load_records(str(out))[0]).prompt)
    endpoint = ChatEndpoint(server, NAME, api_key_env=KEY_ENV)
    for key, style in (("chosen", "polite"), ("rejected", "impolite")):
        answer = endpoint.chat(rewrite_request(DEFAULT_TEMPLATE, prompt, first["output"], style), temperature=0.0,
                               max_tokens=MAX_TOKENS)
        assert answer.text.strip() == first[key]
    # and posttrain dpo reads them as they are
    pairs, _, stats = records_to_pairs(load_records(str(out)))
    assert stats.records == len(rows) and len(pairs) + stats.identical_pairs == len(rows)


def test_killed_halfway_and_restarted_finishes_without_duplicates(server, data_path, uninterrupted, tmp_path):
    out = tmp_path / "prefs.jsonl"
    cmd = [sys.executable, "-m", "posttrain.cli", "synth", "preferences", str(data_path), str(out), "--endpoint", server,
           "--model", NAME, "--api_key_env", KEY_ENV, "--max_tokens", str(MAX_TOKENS), "--concurrency", "1",
           "--progress", "false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 60
    while len(lines(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    written = lines(out)
    assert 3 <= len(written) < N_RECORDS
    with open(out, "a") as f:  # a record torn by the kill, as a kill during a write leaves it
        f.write('{"instruction": "Name a col')

    report = run_all(data_path, out, server)
    assert report["done_before"] == len(written) + len(lines(failed_path(out))) - sum(report["failed"].values())
    assert report["written"] + report["done_before"] + sum(report["failed"].values()) == N_RECORDS
    # nothing lost, nothing twice, nothing torn: the same file as a run that was never interrupted
    assert out.read_text() == uninterrupted[0].read_text()
    # a third run has nothing left to do
    again = run_all(data_path, out, server)
    assert again["written"] == 0 and again["requests"] == 0 and out.read_text() == uninterrupted[0].read_text()


def test_unreachable_endpoint_stops_with_a_clear_error_and_keeps_the_records(server, data_path, tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    run_all(data_path, out, server, limit=5)
    kept = out.read_text()
    assert len(lines(out)) + len(lines(failed_path(out))) == 5
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError, match="could not connect"):
        run_all(data_path, out, dead, max_retries=1)
    assert out.read_text() == kept
    # the command line says it in one line and exits 1
    with pytest.raises(SystemExit) as e:
        cli.main(["synth", "preferences", str(data_path), str(out), "--endpoint", dead, "--model", NAME,
                  "--max_retries", "1", "--progress", "false"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "posttrain: error: POST " + dead in err and "2 attempts" in err and "Traceback" not in err
    assert out.read_text() == kept
    # the live server without its key: refused at once (401 is not retried), the records stay
    with pytest.raises(EndpointError, match=r"after 1 attempt: HTTP 401.*API key"):
        run_all(data_path, out, server, api_key_env=None, limit=8)
    assert out.read_text() == kept
    # a different input into the same file is refused rather than mixed in
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**r, "output": r["output"] + "!"} for r in instruction_records(8)]))
    with pytest.raises(DataError, match="not written from this input"):
        run_all(other, out, server)


class Calls(list):
    """The rewriting requests a scripted server received (their last message), and how."""

    def __init__(self):
        super().__init__()
        self.keys: list[str | None] = []
        self.delay, self.in_flight, self.most_in_flight = 0.0, 0, 0
        self.lock = threading.Lock()


def reply_chat(handler: BaseHTTPRequestHandler, text: str) -> None:
    """Answer an OpenAI chat completion request with `text`."""
    data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def scripted_rewriter():
    """A real HTTP server that rewrites politely, refuses impolite rewrites of record 2, answers record 3
    with nothing and rejects record 4 as too long (HTTP 400). `calls.delay` slows each answer down;
    `calls.most_in_flight` and `calls.keys` (Authorization headers) record what reached it."""
    calls = Calls()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][-1]["content"]
            with calls.lock:
                calls.append(content)
                calls.keys.append(self.headers.get("Authorization"))
                calls.in_flight += 1
                calls.most_in_flight = max(calls.most_in_flight, calls.in_flight)
            time.sleep(calls.delay)
            with calls.lock:
                calls.in_flight -= 1
            rude = "more impolite" in content
            if "number 4." in content:  # as a server answers a prompt beyond its context
                data = json.dumps({"error": {"message": "This model's maximum context length is 8 tokens",
                                             "type": "invalid_request_error", "code": "context_length_exceeded"}})
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())
                return
            if "number 2." in content and rude:
                text = "I'm sorry, but I can't help with making text rude."
            elif "number 3." in content:
                text = "  "
            else:
                text = ("Ugh. " if rude else "Certainly! ") + content.split("correct output `")[1].split("`")[0]
            reply_chat(self, text)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", calls
    server.shutdown()
    server.server_close()


def test_refused_empty_and_rejected_answers_are_counted_and_kept_apart(scripted_rewriter, tmp_path, capsys,
                                                                     monkeypatch):
    url, calls = scripted_rewriter
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_records(6)))
    out = tmp_path / "prefs.jsonl"
    monkeypatch.setenv("SYNTH_SCRIPTED_KEY", "sk-scripted")
    calls.delay = 0.1  # answers overlap: the bound is what limits the requests in flight
    report = synth_preferences(str(data), str(out), endpoint=url, model="m", progress=False, concurrency=3,
                               api_key_env="SYNTH_SCRIPTED_KEY")
    calls.delay = 0.0
    assert calls.most_in_flight == 3  # 12 requests, at most 3 at once, and really concurrent
    assert calls.keys == ["Bearer sk-scripted"] * 12  # the key from the environment, on every request
    assert report["failed"] == {"refused": 1, "empty": 1, "bad_request": 1} and report["written"] == 3
    assert "failed (in the .failed.jsonl file): " in capsys.readouterr().out
    rows = lines(out)
    assert [r["source_index"] for r in rows] == [0, 1, 5]
    assert rows[0]["chosen"] == "Certainly! Colour 0 is blue." and rows[0]["rejected"] == "Ugh. Colour 0 is blue."
    failed = lines(failed_path(out))
    assert [(f["source_index"], f["reason"]) for f in failed] == [
        (2, {"rejected": "refused"}), (3, {"chosen": "empty", "rejected": "empty"}),
        (4, {"chosen": "bad_request", "rejected": "bad_request"})]
    assert "maximum context length" in failed[2]["error"]
    # a second run counts them as done; --retry_failed asks for them again (and only them)
    assert synth_preferences(str(data), str(out), endpoint=url, model="m", progress=False)["requests"] == 0
    n = len(calls)
    again = synth_preferences(str(data), str(out), endpoint=url, model="m", progress=False, retry_failed=True)
    assert again["requests"] == 6 and len(calls) == n + 6 and again["written"] == 0
    assert len(lines(failed_path(out))) == 3 and lines(out) == rows


def test_a_run_whose_requests_are_all_rejected_stops(scripted_rewriter, tmp_path):
    url, calls = scripted_rewriter
    data = tmp_path / "in.json"
    data.write_text(json.dumps([{"instruction": f"number 4. item {i}", "output": "x"} for i in range(9)]))
    out = tmp_path / "prefs.jsonl"
    with pytest.raises(EndpointError, match="first 5 records were all refused as bad requests.*context length"):
        synth_preferences(str(data), str(out), endpoint=url, model="m", progress=False, concurrency=1)
    assert [f["source_index"] for f in lines(failed_path(out))] == [0, 1, 2, 3, 4] and not lines(out)


def test_an_endpoint_that_stops_answering_times_out_and_keeps_the_records(tmp_path, capsys):
    """A server that answers the first 4 requests (records 0 and 1) and then never again: bounded
    retries of the timed-out requests, a clear error, and the records written before it stay."""
    release, seen = threading.Event(), []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if len(seen) > 4:
                release.wait(10)  # hangs (until the test ends)
                return
            text = "Fine: " + body["messages"][-1]["content"][-20:]
            reply_chat(self, text)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data = tmp_path / "in.json"
    data.write_text(json.dumps(instruction_records(6)))
    out = tmp_path / "prefs.jsonl"
    try:
        started = time.perf_counter()
        with pytest.raises(EndpointError, match=r"failed after 2 attempts: timed out.*raise timeout / max_retries"):
            # concurrency 1: two records (4 requests) in flight at most, so the first 4 are records 0 and 1
            synth_preferences(str(data), str(out), endpoint=f"http://127.0.0.1:{server.server_address[1]}",
                              model="m", progress=False, concurrency=1, timeout=0.3, max_retries=1)
        assert time.perf_counter() - started < 8
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    rows = lines(out)
    assert [r["source_index"] for r in rows] == [0, 1] and all(r["chosen"].startswith("Fine: ") for r in rows)
    assert "2 records written" in capsys.readouterr().out  # the report is printed on the way out


def test_a_local_posttrain_model_rewrites_in_process(tiny_tokenizer, tmp_path):
    from posttrain.models.llama import LlamaConfig

    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    eos_token_id=tiny_tokenizer.eos_id))
    with torch.no_grad():  # larger weights: varied bytes rather than one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model_dir = save_pretrained(model, tiny_tokenizer, tmp_path / "model")
    data = tmp_path / "in.json"
    data.write_text(json.dumps(instruction_records(4)))
    out = tmp_path / "prefs.jsonl"
    template = "{style}: {output} ({prompt})"
    report = synth_preferences(str(data), str(out), local_model=str(model_dir), template=template, max_tokens=8,
                               progress=False)
    assert report["requests"] == 8 and report["written"] >= 1
    assert report["written"] + sum(report["failed"].values()) == 4
    # the records are the local model's answers to the rewriting requests, as its endpoint gives them
    row = lines(out)[0]
    i = row["source_index"]
    prompt = prompt_text(to_preference(load_records(str(out))[0]).prompt)
    endpoint = ChatEndpoint.local(str(model_dir))
    for key, style in (("chosen", "polite"), ("rejected", "impolite")):
        answer = endpoint.chat(rewrite_request(template, prompt, f"Colour {i} is blue.", style), max_tokens=8)
        assert answer.text.strip() == row[key]


def test_other_styles_chat_records_and_bad_input(scripted_rewriter, tmp_path):
    url, calls = scripted_rewriter
    data = tmp_path / "chat.jsonl"
    chats = [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "number 7. Hi"},
                           {"role": "assistant", "content": "Hello."}], "id": "a"},
             {"prompt": "number 8. Bye", "completion": "Goodbye."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in chats))
    out = tmp_path / "prefs.jsonl"
    template = "Rewrite `{output}` (asked: `{prompt}`) to be more {style}. correct output `{output}`"
    synth_preferences(str(data), str(out), endpoint=url, model="m", progress=False, template=template,
                      chosen_style="concise", rejected_style="impolite")
    # requests run concurrently: they may reach the server in any order
    assert any("more concise" in c for c in calls)
    assert any("asked: `system: Be kind.\nuser: number 7. Hi`" in c for c in calls)
    rows = lines(out)
    assert rows[0]["messages"] == chats[0]["messages"][:2] and rows[0]["id"] == "a"
    assert rows[1]["prompt"] == "number 8. Bye" and rows[1]["rejected"] == "Ugh. Goodbye."
    pairs, _, _ = records_to_pairs(load_records(str(out)))
    assert pairs[0].prompt == chats[0]["messages"][:2] and pairs[0].chosen[0]["content"] == "Certainly! Hello."

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "no output"}]))
    with pytest.raises(DataError, match=r"record 1: missing field 'output'"):
        synth_preferences(str(bad), str(tmp_path / "o.jsonl"), endpoint=url, model="m", progress=False)
    report = synth_preferences(str(bad), str(tmp_path / "o.jsonl"), endpoint=url, model="m", progress=False,
                               skip_invalid=True)
    assert report["skipped_invalid"] == {"missing field 'output'": 1} and report["written"] == 1
    with pytest.raises(ValueError, match="either --endpoint"):
        synth_preferences(str(bad), str(tmp_path / "o.jsonl"), progress=False)
    with pytest.raises(ValueError, match="lacks"):
        synth_preferences(str(bad), str(tmp_path / "o.jsonl"), endpoint=url, model="m", template="{output} only")

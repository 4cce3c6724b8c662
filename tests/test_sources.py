"""Sources: local files, URLs (a real http.server on 127.0.0.1), hub dataset repos (a real hub
cache), splits."""

import csv
import functools
import json
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from posttrain.data.sources import DataError, download, load_records, read_file, split_records

ROWS = [{"instruction": "Add 1 and 2.", "input": "", "output": "3"},
        {"instruction": "Reverse.", "input": "abc", "output": "cba"},
        {"instruction": "Uppercase.", "input": "x", "output": "X"}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_json_jsonl_csv_parquet_give_the_same_records(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=2))
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    for name in ("a.json", "a.jsonl", "a.csv", "a.parquet"):
        records = load_records(tmp_path / name)
        assert [r.data for r in records] == ROWS, name
        assert [r.index for r in records] == [0, 1, 2]
    assert [r.line for r in load_records(tmp_path / "a.jsonl")] == [1, 2, 3]
    assert [r.line for r in load_records(tmp_path / "a.csv")] == [2, 3, 4]  # line 1 is the header
    assert "a.jsonl: record 1, line 2" in load_records(tmp_path / "a.jsonl")[1].where()


def test_folder_and_text_files(tmp_path):
    write_jsonl(tmp_path / "part1.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "part2.jsonl", ROWS[2:])
    assert [r.data for r in load_records(tmp_path)] == ROWS
    (tmp_path / "book.txt").write_text("Once upon a time.")
    assert read_file(tmp_path / "book.txt")[0].data == {"text": "Once upon a time."}


def test_malformed_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"instruction\": \"x\",\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3:\d+: malformed JSON line"):
        load_records(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=r"broken\.json:3:\d+: malformed JSON"):
        load_records(broken)
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"scalar\.jsonl:2: expected a JSON object"):
        load_records(scalar)
    (tmp_path / "num.json").write_text("42")
    with pytest.raises(DataError, match="expected a JSON array"):
        load_records(tmp_path / "num.json")
    with pytest.raises(DataError, match="not a file, folder, URL or hub dataset id"):
        load_records(str(tmp_path / "missing.json"))


def test_json_object_holding_one_list_and_json_that_is_jsonl(tmp_path):
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": ROWS}))
    assert [r.data for r in load_records(tmp_path / "wrapped.json")] == ROWS
    write_jsonl(tmp_path / "lines.json", ROWS)
    assert [r.data for r in load_records(tmp_path / "lines.json")] == ROWS


# -- URLs --------------------------------------------------------------------------------------

class CountingHandler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        CountingHandler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    CountingHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_downloaded_once_into_the_cache(http_server, tmp_path):
    root, base = http_server
    write_jsonl(root / "data.jsonl", ROWS)
    cache = tmp_path / "cache"
    records = load_records(f"{base}/data.jsonl", cache=cache)
    assert [r.data for r in records] == ROWS
    assert records[0].source == f"{base}/data.jsonl"
    assert load_records(f"{base}/data.jsonl", cache=cache)[2].data == ROWS[2]
    assert CountingHandler.requests == ["/data.jsonl"]  # the second load came from the cache
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.endswith("-data.jsonl")  # no temp files left behind


def test_url_errors_are_clear(http_server, tmp_path):
    _, base = http_server
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="HTTP 404"):
        download(f"{base}/nope.json", cache)
    with socket.socket() as s:  # a port nobody listens on: what "offline" looks like
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="download failed .*offline"):
        download(f"http://127.0.0.1:{port}/data.json", cache, timeout=5)
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


# -- hub dataset repositories ------------------------------------------------------------------

def test_hub_dataset_from_the_cache_with_splits(tmp_path, hf_cache):
    # hf_cache: a private hub cache with HF_HUB_OFFLINE=1; snapshot_download finds these offline
    tiny, flat = tmp_path / "tiny", tmp_path / "flat"
    (tiny / "data").mkdir(parents=True)
    flat.mkdir()
    write_jsonl(tiny / "data" / "train.jsonl", ROWS[:2])
    write_jsonl(tiny / "data" / "test.jsonl", ROWS[2:])
    write_jsonl(flat / "alpaca_data_cleaned.jsonl", ROWS)
    hf_cache.add("someone/tiny", tiny, repo_type="dataset")
    hf_cache.add("someone/flat", flat, repo_type="dataset")
    assert [r.data for r in load_records("someone/tiny")] == ROWS[:2]
    assert [r.data for r in load_records("someone/tiny:test")] == ROWS[2:]
    assert [r.data for r in load_records("someone/tiny", split="test")] == ROWS[2:]
    assert [r.data for r in load_records("someone/flat")] == ROWS  # no split names: all train
    with pytest.raises(DataError, match="no files for split 'validation'"):
        load_records("someone/tiny:validation")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set .* pass a local path"):
        load_records("someone/absent")


def test_hub_dataset_unreachable_is_a_clear_error(hf_cache, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # a hub nobody answers for
    with pytest.raises(DataError, match="hub dataset someone/absent: cannot get it .*unreachable.*local path"):
        load_records("someone/absent")


# -- splits ------------------------------------------------------------------------------------

def test_split_fractions_follow_the_reference():
    parts = split_records(list(range(1100)))
    assert [len(parts[k]) for k in ("train", "test", "val")] == [935, 110, 55]
    assert parts["train"] == list(range(935)) and parts["val"] == list(range(1045, 1100))  # in order
    a = split_records(list(range(100)), (0.8, 0.1, 0.1), shuffle=True, seed=3)
    b = split_records(list(range(100)), (0.8, 0.1, 0.1), shuffle=True, seed=3)
    c = split_records(list(range(100)), (0.8, 0.1, 0.1), shuffle=True, seed=4)
    assert a == b and a != c and a["train"] != list(range(80))
    assert sorted(a["train"] + a["test"] + a["val"]) == list(range(100))
    with pytest.raises(ValueError, match="sum"):
        split_records([1, 2], (0.5, 0.2, 0.2))


def test_real_instruction_data_split(shared_data_dir):
    path = shared_data_dir / "instruction-data.json"
    records = load_records(path)
    parts = split_records(records)
    assert [len(parts[k]) for k in ("train", "test", "val")] == [935, 110, 55]
    assert parts["test"][0].index == 935 and parts["val"][0].index == 1045


def test_demo_source():
    train = load_records("demo")
    heldout = load_records("demo:heldout")
    assert len(train) > len(heldout) > 0 and train[0].source == "demo:train"
    assert {"instruction", "input", "output"} <= set(train[0].data)

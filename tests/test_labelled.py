"""Labelled text: the SMS Spam Collection's raw format (quotes are text), its download from a real HTTP
server on 127.0.0.1 (primary URL failing -> mirror) and cache, balancing and seeded splits, label maps,
and the errors for bad input (each naming the file and row)."""

import csv
import http.server
import io
import json
import socket
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from posttrain.data.labelled import (SMS_SPAM_FILE, LabelledExample, class_weights, fetch_sms_spam, label_names,
                                     load_labelled, parse_sms_spam, read_table, split_examples, undersample)
from posttrain.data.sources import DataError

# Raw SMSSpamCollection lines: label, TAB, message. Quotes are literal and may be unbalanced; a message
# may hold a further tab.
RAW_LINES = [
    "ham\tGo until jurong point, crazy.. Available only in bugis n great world la e buffet...",
    "ham\tOk lar... Joking wif u oni...",
    "spam\tFree entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121",
    'ham\t"Hey, are you coming?',
    "ham\tSorry, I'll call later",
    'spam\tURGENT! "You have won" a 1 week FREE membership"',
    'ham\tHe said "ok',
    "ham\tA message with\ta tab inside",
    "spam\tWINNER!! As a valued network customer you have been selected to receivea £900 prize reward!",
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def write_raw(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


def synthetic_raw_lines(n_ham: int, n_spam: int) -> list[str]:
    lines = [f'ham\tsee you at {i} "ok' for i in range(n_ham)] + [f'spam\tWIN "cash" now {i}' for i in range(n_spam)]
    return lines[::2] + lines[1::2]  # mixed order


def uci_zip(lines: list[str]) -> bytes:
    """A zip laid out as UCI's sms+spam+collection.zip: SMSSpamCollection and readme at the top."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(SMS_SPAM_FILE, ("\n".join(lines) + "\n").encode("utf-8"))
        z.writestr("readme", "SMS Spam Collection v.1\n")
    return buf.getvalue()


# -- the raw SMS format ------------------------------------------------------------------------

def test_parse_sms_spam_reads_quotes_and_tabs_as_text(tmp_path):
    path = write_raw(tmp_path / SMS_SPAM_FILE, RAW_LINES)
    records = parse_sms_spam(path)
    assert len(records) == 9
    assert Counter(r.data["label"] for r in records) == {"ham": 6, "spam": 3}
    assert records[3].data["text"] == '"Hey, are you coming?'  # unbalanced quote kept, next line not swallowed
    assert records[4].data["text"] == "Sorry, I'll call later"
    assert records[5].data["text"] == 'URGENT! "You have won" a 1 week FREE membership"'
    assert records[7].data["text"] == "A message with\ta tab inside"  # only the first tab separates
    assert "£900" in records[8].data["text"]
    assert records[6].line == 7 and str(path) in records[6].where()
    # A CSV reader (pandas' read_csv(sep="\t") does the same) joins lines at the unbalanced quotes.
    with open(path, newline="", encoding="utf-8") as f:
        assert len(list(csv.reader(f, delimiter="\t"))) < 9


def test_parse_sms_spam_rejects_lines_of_another_format(tmp_path):
    path = write_raw(tmp_path / SMS_SPAM_FILE, RAW_LINES[:2] + ["label,text", *RAW_LINES[2:]])
    with pytest.raises(DataError, match=r"SMSSpamCollection:3: expected 'ham' or 'spam'"):
        parse_sms_spam(path)


def test_a_local_raw_file_loads_balanced_by_default(tmp_path):
    path = write_raw(tmp_path / SMS_SPAM_FILE, synthetic_raw_lines(30, 10))
    data = load_labelled(str(path))
    assert data.labels == ["ham", "spam"]
    assert data.report["balance"] == "undersample" and data.report["examples"] == 40 and data.report["kept"] == 20
    assert len(data.train) == 14 and len(data.val) == 2 and len(data.test) == 4


# -- download: a real HTTP server on 127.0.0.1 --------------------------------------------------

class Server:
    """http.server serving a folder on 127.0.0.1; records the paths it was asked for."""

    def __init__(self, root: Path):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    (root / "static" / "public" / "228").mkdir(parents=True)
    (root / "mirror").mkdir()
    s = Server(root)
    s.root = root
    yield s
    s.close()


def test_download_falls_back_to_the_mirror_and_caches(server, tmp_path):
    lines = synthetic_raw_lines(12, 5)
    (server.root / "mirror" / "sms+spam+collection.zip").write_bytes(uci_zip(lines))
    primary = f"{server.url}/static/public/228/sms+spam+collection.zip"  # absent: HTTP 404
    mirror = f"{server.url}/mirror/sms%2Bspam%2Bcollection.zip"
    path = fetch_sms_spam([primary, mirror], cache=tmp_path / "sms")
    assert path == tmp_path / "sms" / SMS_SPAM_FILE
    assert path.read_text(encoding="utf-8").splitlines() == lines
    assert server.requests == ["/static/public/228/sms+spam+collection.zip", "/mirror/sms%2Bspam%2Bcollection.zip"]
    server.close()  # offline from now on: the cached file serves
    assert fetch_sms_spam([primary, mirror], cache=tmp_path / "sms") == path
    assert len(server.requests) == 2


def test_an_unreachable_primary_falls_back_to_the_mirror(server, tmp_path):
    with socket.socket() as s:  # a port nothing listens on once closed: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    (server.root / "mirror" / "sms+spam+collection.zip").write_bytes(uci_zip(synthetic_raw_lines(3, 2)))
    path = fetch_sms_spam([f"http://127.0.0.1:{closed}/static/public/228/sms+spam+collection.zip",
                           f"{server.url}/mirror/sms%2Bspam%2Bcollection.zip"], cache=tmp_path / "sms", timeout=5)
    assert Counter(r.data["label"] for r in parse_sms_spam(path)) == {"ham": 3, "spam": 2}
    assert server.requests == ["/mirror/sms%2Bspam%2Bcollection.zip"]


def test_a_url_serving_something_else_is_skipped(server, tmp_path):
    (server.root / "static" / "public" / "228" / "sms+spam+collection.zip").write_text("<html>maintenance</html>")
    (server.root / "mirror" / "sms+spam+collection.zip").write_bytes(uci_zip(synthetic_raw_lines(4, 2)))
    path = fetch_sms_spam([f"{server.url}/static/public/228/sms+spam+collection.zip",
                           f"{server.url}/mirror/sms%2Bspam%2Bcollection.zip"], cache=tmp_path / "sms")
    assert len(parse_sms_spam(path)) == 6
    assert not list((tmp_path / "sms" / "downloads").glob("*static*"))  # the bad download is not cached


def test_every_url_failing_says_what_to_do(server, tmp_path):
    with pytest.raises(DataError) as e:
        fetch_sms_spam([f"{server.url}/a.zip", f"{server.url}/b.zip"], cache=tmp_path / "sms")
    message = str(e.value)
    assert "a.zip: download failed with HTTP 404" in message and "b.zip" in message
    assert "SMSSpamCollection" in message and str(tmp_path / "sms") in message


def test_named_dataset_downloads_balances_and_splits(server):
    (server.root / "mirror" / "sms+spam+collection.zip").write_bytes(uci_zip(synthetic_raw_lines(60, 20)))
    urls = [f"{server.url}/static/public/228/sms+spam+collection.zip",
            f"{server.url}/mirror/sms%2Bspam%2Bcollection.zip"]
    data = load_labelled("sms-spam", urls=urls)
    assert data.labels == ["ham", "spam"] and data.report["labels_in_file"] == {"ham": 60, "spam": 20}
    # undersampled to 20 + 20, split 70/10/20 after a seeded shuffle
    assert (len(data.train), len(data.val), len(data.test)) == (28, 4, 8)
    assert sum(data.counts(s)["spam"] for s in ("train", "val", "test")) == 20
    again = load_labelled("sms-spam", urls=urls)
    assert [e.text for e in again.test] == [e.text for e in data.test]  # seeded: the same split every time
    weighted = load_labelled("sms-spam", urls=urls, balance="class-weights")
    assert len(weighted.train) + len(weighted.val) + len(weighted.test) == 80
    counts = Counter(e.label for e in weighted.train)
    assert weighted.class_weights == pytest.approx([56 / (2 * counts[0]), 56 / (2 * counts[1])])


# -- balancing and splitting --------------------------------------------------------------------

def examples(labels: list[int]) -> list[LabelledExample]:
    return [LabelledExample(f"t{i}", y, f"row {i}") for i, y in enumerate(labels)]


def test_undersample_cuts_every_class_to_the_smallest_deterministically():
    data = examples([0] * 30 + [1] * 8 + [2] * 12)
    kept = undersample(data, seed=123)
    assert Counter(e.label for e in kept) == {0: 8, 1: 8, 2: 8}
    assert [e.where for e in kept] == [e.where for e in undersample(data, seed=123)]
    assert [e.where for e in kept] != [e.where for e in undersample(data, seed=1)]
    assert [e for e in kept if e.label == 1] == [e for e in data if e.label == 1]  # the minority is kept whole


def test_class_weights_are_balanced_weights():
    assert class_weights(examples([0] * 6 + [1] * 2), 2) == pytest.approx([8 / 12, 8 / 4])
    with pytest.raises(DataError, match=r"no examples of label ids \[2\]"):
        class_weights(examples([0, 1]), 3)


def test_split_sizes_and_groups():
    train, val, test = split_examples(list(range(100)), (0.7, 0.1, 0.2), seed=123)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == list(range(100)) and train != list(range(70))
    items = list(range(40))
    groups = [i // 2 for i in items]  # pairs
    train, val, test = split_examples(items, (0.7, 0.1, 0.2), seed=0, groups=groups)
    assert (len(train), len(val), len(test)) == (28, 4, 8)
    for part in (train, val, test):
        others = {i // 2 for other in (train, val, test) if other is not part for i in other}
        assert {i // 2 for i in part} & others == set()
    with pytest.raises(ValueError, match="summing to 1"):
        split_examples(items, (0.7, 0.2, 0.2))


# -- files, columns and label maps --------------------------------------------------------------

def test_csv_tsv_jsonl_with_custom_columns(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('review,stars\n"good, really",pos\nbad,neg\n"fine ""indeed""",pos\nawful,neg\n')
    data = load_labelled(str(csv_path), text_column="review", label_column="stars", split=(1.0, 0.0, 0.0))
    assert data.labels == ["neg", "pos"]
    assert sorted(e.text for e in data.train) == ["awful", "bad", "fine \"indeed\"", "good, really"]

    tsv_path = tmp_path / "reviews.tsv"
    tsv_path.write_text('text\tlabel\n"quoted start\tpos\nplain\tneg\n')  # TSV: quotes are literal
    tsv = read_table(tsv_path)
    assert [r.data for r in tsv] == [{"text": '"quoted start', "label": "pos"}, {"text": "plain", "label": "neg"}]
    assert tsv[1].line == 3

    headerless = tmp_path / "plain.csv"
    headerless.write_text("neg,so bad\npos,so good\n")
    data = load_labelled(str(headerless), columns=["label", "text"], split=(1.0, 0.0, 0.0))
    assert sorted((e.text, data.labels[e.label]) for e in data.train) == [("so bad", "neg"), ("so good", "pos")]

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"t": f"x{i}", "y": y}) + "\n" for i, y in enumerate([1, 0, 10, 2, 1])))
    data = load_labelled(str(jsonl), text_column="t", label_column="y", split=(1.0, 0.0, 0.0))
    assert data.labels == ["0", "1", "2", "10"]  # integers sort numerically: label 1 keeps id 1
    assert {e.text: e.label for e in data.train} == {"x0": 1, "x1": 0, "x2": 3, "x3": 2, "x4": 1}


def test_given_labels_fix_the_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": y}) + "\n" for i, y in enumerate("abcab")))
    data = load_labelled(str(path), labels=["c", "b", "a"], split=(1.0, 0.0, 0.0))
    assert data.labels == ["c", "b", "a"] and {e.text: e.label for e in data.train}["t0"] == 2
    assert label_names(["x", "y"], None) == ["x", "y"]


def test_separate_val_and_test_files(tmp_path):
    for name, rows in (("train", "ab" * 5), ("val", "ba"), ("test", "aab")):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"{name}{i}", "label": y}) + "\n" for i, y in enumerate(rows)))
    data = load_labelled(str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl"),
                         test_path=str(tmp_path / "test.jsonl"))
    assert (len(data.train), len(data.val), len(data.test)) == (10, 2, 3)
    assert [e.text for e in data.test] == ["test0", "test1", "test2"] and data.counts("test") == {"a": 2, "b": 1}


# -- bad input: clear errors naming the row -----------------------------------------------------

def test_label_outside_the_known_set_names_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,ham\nbuy now,spam\nscrambled,eggs\n")
    with pytest.raises(DataError, match=r"d\.csv: record 2, line 4: label 'eggs' is not one of the known labels "
                                        r"\['ham', 'spam'\]"):
        load_labelled(str(path), labels=["ham", "spam"])
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,x\nb,y\nc,x\n")
    val = tmp_path / "val.csv"
    val.write_text("text,label\nd,x\ne,z\n")
    with pytest.raises(DataError, match=r"val\.csv: record 1, line 3: label 'z' is not one of the known labels"):
        load_labelled(str(train), val_path=str(val))


def test_missing_text_names_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,ham\n,spam\n")
    with pytest.raises(DataError, match=r"d\.csv: record 1, line 3: the text \('text'\) is empty"):
        load_labelled(str(path))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{"text": null, "label": "y"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: record 1, line 2: the text \('text'\) is missing"):
        load_labelled(str(jsonl))
    with pytest.raises(DataError, match=r"record 0, line 1: no text column 'review'; the record has "
                                        r"\['label', 'text'\]"):
        load_labelled(str(jsonl), text_column="review")
    no_label = tmp_path / "n.jsonl"
    no_label.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": ""}\n')
    with pytest.raises(DataError, match=r"n\.jsonl: record 1, line 2: the label \('label'\) is missing"):
        load_labelled(str(no_label))


def test_a_single_class_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,ham\nb,ham\nc,ham\n")
    with pytest.raises(DataError, match=r"d\.csv has only the label 'ham': a classifier needs examples of at "
                                        r"least two"):
        load_labelled(str(path))
    with pytest.raises(DataError, match=r"d\.csv has only the label 'ham'"):  # listing two labels is not enough
        load_labelled(str(path), labels=["ham", "spam"])
    two = tmp_path / "two.csv"
    two.write_text("text,label\na,spam\nb,ham\n")
    with pytest.raises(DataError, match=r"data\.labels \['ham'\] lists fewer than two labels"):
        load_labelled(str(two), labels=["ham"])


def test_an_empty_file_is_an_error(tmp_path):
    for name in ("empty.csv", "empty.jsonl", "empty.json", "empty.tsv"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match=rf"{name}: the file is empty"):
            load_labelled(str(tmp_path / name))
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"header\.csv: no records"):
        load_labelled(str(tmp_path / "header.csv"))


def test_a_tsv_row_with_the_wrong_field_count_names_its_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\na\tx\nb\ty\textra\n")
    with pytest.raises(DataError, match=r"d\.tsv:3: row has 3 fields but there are 2 columns"):
        load_labelled(str(path))


def test_unknown_balance_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.balance 'oversample' is unknown"):
        load_labelled(str(tmp_path / "x.csv"), balance="oversample")

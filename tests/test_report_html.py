"""`posttrain report`: the comparison page renders; parsed with html.parser, it holds the plots
(base64 PNGs), the config diff, the metrics table (judge scores included), DPO margins, a confusion
matrix and the sample answers next to the reference; the Markdown summary is written beside it."""

import base64
import json
from html.parser import HTMLParser

import pytest
import yaml

from posttrain.cli import run as cli_run
from posttrain.report_html import flatten, load_run, report_argv, report_command, unique_names


class Page(HTMLParser):
    """Images (alt, decoded bytes) and tables (id -> rows of cell texts)."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.headings = [], {}, []
        self._table = self._row = self._cell = None
        self._heading = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix)
            self.images.append((attrs.get("alt"), base64.b64decode(attrs["src"][len(prefix):])))
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag in ("h2", "h3"):
            self._heading = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._table is not None:
            self._table.append(self._row)
        elif tag == "table":
            self._table = None
        elif tag in ("h2", "h3"):
            self.headings.append(self._heading)
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._heading is not None:
            self._heading += data


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(root, name, lr, losses, responses, scores, dpo=False, confusion=False, config=True):
    run = root / name
    (run / "eval").mkdir(parents=True)
    if config:
        (run / "config.yaml").write_text(yaml.safe_dump({"task": "dpo" if dpo else "sft", "model": "smollm2-135m",
                                                         "train": {"lr": lr, "epochs": 1},
                                                         "data_report": {"train": {"records": 9}}}))
        rows = []
        for step, loss in enumerate(losses, 1):
            row = {"step": step, "tokens_seen": 100 * step, "loss": loss}
            if step % 2 == 0:
                row["val_loss"] = loss + 0.1
            if dpo:
                row.update({"rewards/margins": 0.1 * step, "rewards/accuracies": 0.5 + 0.05 * step})
                if step % 2 == 0:
                    row["val_rewards/margins"] = 0.08 * step
            rows.append(row)
        write_jsonl(run / "metrics.jsonl", rows)
    if confusion:
        (run / "summary.json").write_text(json.dumps({"confusion_matrix": {"labels": ["ham", "spam"],
                                                                           "matrix": [[40, 2], [5, 53]]}}))
    write_jsonl(run / "eval" / "responses-test.jsonl",
                [{"index": i, "instruction": f"Q{i}?", "prompt": f"Q{i}?", "reference": f"ref{i}", "response": r}
                 for i, r in enumerate(responses)])
    (run / "eval" / "metrics-test.json").write_text(json.dumps({
        "split": "test", "examples": len(responses), "responses_per_s": 2.5,
        "metrics": {"n": len(responses), "exact_match": 0.25, "rouge_l": 0.5, "perplexity": 3.2}}))
    write_jsonl(run / "eval" / "judge-test.jsonl", [{"index": i, "score": s, "judge": "j", "prompt_id": "p"}
                                                    for i, s in enumerate(scores)])
    valid = [s for s in scores if s is not None]
    (run / "eval" / "judge-test.json").write_text(json.dumps({
        "judge": "j", "prompt": "seed", "prompt_id": "p", "scale": [0, 100], "n": len(scores),
        "scored": len(valid), "unparseable": len(scores) - len(valid), "mean": sum(valid) / len(valid),
        "median": sorted(valid)[len(valid) // 2], "stderr": 1.5}))
    (run / "eval" / "choice-hellaswag.json").write_text(json.dumps({"task": "hellaswag", "acc": 0.3, "acc_norm": 0.31}))
    return run


def test_report_renders_plots_and_tables(tmp_path):
    base = make_run(tmp_path, "base", 0, [], ["b0", "b1", "b2"], [20, 40, None], config=False)
    sft = make_run(tmp_path, "sft", 1e-4, [2.0, 1.5, 1.2, 1.0], ["s0", "s1", "s2"], [60, 80, 70])
    dpo = make_run(tmp_path, "dpo", 5e-6, [0.69, 0.6, 0.5, 0.45], ["d0", "d1 <b>bold</b>", "d2"], [70, 90, 85],
                   dpo=True, confusion=True)
    out = report_command([str(base), str(sft), str(dpo)], out=str(tmp_path / "report.html"), samples=2)
    page = Page()
    page.feed(out.read_text())

    alts = [alt for alt, _ in page.images]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000 for _, png in page.images)
    assert "loss vs step" in alts and "loss vs tokens seen" in alts
    assert {"rewards/margins", "rewards/accuracies", "val_rewards/margins"} <= set(alts)
    assert any(a.startswith("judge seed by j") for a in alts)
    assert "confusion matrix dpo" in alts

    runs = page.tables["runs"]
    assert [r[0] for r in runs[1:]] == ["base", "sft", "dpo"]
    assert runs[1][2] == "eval only" and runs[3][2] == "dpo"
    diff = {r[0]: r[1:] for r in page.tables["config-diff"][1:]}
    assert diff["train.lr"] == ["—", "1.000e-04", "5.000e-06"] and diff["task"] == ["—", "sft", "dpo"]
    assert "train.epochs" not in diff and "model" not in diff  # equal where present; base has no config
    assert dict(page.tables["config-sft"][1:])["train.epochs"] == "1"  # the full configs, folded
    assert not any(k.startswith("data_report") for k in diff)
    pair = Page()
    pair.feed(report_command([str(sft), str(dpo)], out=str(tmp_path / "pair.html")).read_text())
    assert {r[0] for r in pair.tables["config-diff"][1:]} == {"task", "train.lr"}

    metrics = {r[0]: r[1:] for r in page.tables["metrics"][1:]}
    assert metrics["train: final loss"] == ["—", "1", "0.45"]
    assert metrics["train: best val loss"] == ["—", "1.1", "0.55"]
    assert metrics["train: rewards/margins (last)"] == ["—", "—", "0.4"]
    assert metrics["test: exact_match"] == ["0.25"] * 3
    judge = metrics["judge seed by j (judge-test): mean ± stderr"]
    assert judge == ["30.00 ± 1.50", "70.00 ± 1.50", "81.67 ± 1.50"]
    assert metrics["judge seed by j (judge-test): scored / unparseable"][0] == "2 / 1"
    assert metrics["choice hellaswag: acc_norm"] == ["0.31"] * 3

    confusion = next(v for k, v in page.tables.items() if k.startswith("confusion"))
    assert confusion[0] == ["", "pred ham", "pred spam"] and confusion[2] == ["true spam", "5", "53"]

    samples = page.tables["samples"]
    assert samples[0] == ["prompt", "reference", "base", "sft", "dpo"]
    assert samples[1:] == [["Q0?", "ref0", "b0", "s0", "d0"], ["Q1?", "ref1", "b1", "s1", "d1 <b>bold</b>"]]  # escaped

    md = out.with_suffix(".md").read_text()
    assert md.startswith("# posttrain report: base vs sft vs dpo")
    assert "| train.lr | — | 1.000e-04 | 5.000e-06 |" in md
    assert "| judge seed by j (judge-test): mean ± stderr | 30.00 ± 1.50 | 70.00 ± 1.50 | 81.67 ± 1.50 |" in md
    assert "- dpo: d1 <b>bold</b>" in md and "| true spam | 5 | 53 |" in md


def test_single_run_defaults_and_cli(tmp_path):
    run = make_run(tmp_path, "only", 1e-4, [2.0, 1.0], ["a"], [50])
    (run / "eval" / "responses-test.jsonl").unlink()
    write_jsonl(run / "samples.jsonl", [{"step": 1, "prompt": "p", "response": "old"},
                                        {"step": 2, "prompt": "p", "response": "new"}])
    path = cli_run(report_argv(["report", str(run)]))
    assert path == run / "report.html" and (run / "report.md").is_file()
    page = Page()
    page.feed(path.read_text())
    assert {r[0] for r in page.tables["config-diff"][1:]} >= {"train.lr", "train.epochs", "task"}  # all of one run
    assert page.tables["samples"][1] == ["p", "—", "new"]  # samples.jsonl's last evaluation


def test_report_argv_and_names(tmp_path):
    assert report_argv(["report", "a", "b", "--out", "x.html", "--samples=2"]) == \
        ["report", '["a", "b"]', "--out", "x.html", "--samples=2"]
    assert report_argv(["report", "--out", "x.html", "a"]) == ["report", '["a"]', "--out", "x.html"]
    assert report_argv(["report", "[a, b]"]) == ["report", "[a, b]"]
    assert report_argv(["sft", "--x", "1"]) == ["sft", "--x", "1"]
    assert unique_names([tmp_path / "a" / "model", tmp_path / "b" / "model"]) == ["a/model", "b/model"]
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        report_command([str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_run(empty).metrics == []
    report_command([str(empty)])  # a directory with nothing in it still renders


def test_classification_run_and_failed_judge_items(tmp_path):
    """A `posttrain classify` run (classification.json, labels.json): its accuracies before/after and
    the test confusion matrices are shown; judge items the server refused are counted in the table."""
    run = tmp_path / "spam"
    run.mkdir()
    (run / "labels.json").write_text(json.dumps({"labels": ["ham", "spam"]}))

    def split(acc, matrix):
        return {"n": sum(map(sum, matrix)), "loss": 0.5, "accuracy": acc, "macro_f1": acc - 0.1, "confusion": matrix}

    (run / "classification.json").write_text(json.dumps({
        "before": {"val": split(0.5, [[10, 10], [10, 10]]), "test": split(0.52, [[20, 21], [19, 20]])},
        "after": {"val": split(0.9, [[19, 1], [3, 17]]), "test": split(0.95, [[39, 2], [2, 37]])}}))
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.3, "val_loss": 0.35}])
    judged = make_run(tmp_path, "judged", 1e-4, [1.0], ["a", "b"], [50, None])
    summary = json.loads((judged / "eval" / "judge-test.json").read_text())
    summary.update({"unparseable": 0, "failed": 1})
    (judged / "eval" / "judge-test.json").write_text(json.dumps(summary))
    out = report_command([str(run), str(judged)], out=str(tmp_path / "r.html"))
    page = Page()
    page.feed(out.read_text())
    metrics = {r[0]: r[1:] for r in page.tables["metrics"][1:]}
    assert metrics["classify test: accuracy (before)"] == ["0.52", "—"]
    assert metrics["classify test: accuracy (after)"] == ["0.95", "—"]
    assert metrics["classify val: macro_f1 (after)"] == ["0.8", "—"]
    assert metrics["judge seed by j (judge-test): failed"] == ["—", "1"]
    assert {"spam (test split, before training)", "spam (test split, after training)"} <= set(page.headings)
    tables = [v for k, v in page.tables.items() if k.startswith("confusion")]
    assert [t[2] for t in tables] == [["true spam", "19", "20"], ["true spam", "2", "37"]]  # before, after
    assert tables[1][0] == ["", "pred ham", "pred spam"]
    assert sum(alt.startswith("confusion matrix spam") for alt, _ in page.images) == 2
    assert "| classify test: accuracy (after) | 0.95 | — |" in out.with_suffix(".md").read_text()

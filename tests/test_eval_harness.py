"""The lm-evaluation-harness bridge: a clear error without lm-eval; with it, a task of our own over
local files (offline) run through lm-eval's hf backend on the exported model, agreeing with
posttrain's own multiple-choice scoring."""

import importlib.util
import json
import shutil

import pytest

from posttrain.eval.harness import MissingDependency, export_for_harness, harness_command, parse_tasks

ITEMS = [{"context": "The sky is", "endings": ["blue", "green grass", "a cat"], "label": 0},
         {"context": "Cats say", "endings": ["meow", "woof woof"], "label": 1},
         {"context": "One two", "endings": ["three", "four five six"], "label": 0},
         {"context": "Water is", "endings": ["wet", "dry", "a liquid at room temperature"], "label": 2},
         {"context": "Hello", "endings": ["world", "there friend"], "label": 1}]

TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: endings
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def test_missing_lm_eval_is_a_clear_error(monkeypatch, tiny_model_dir, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(MissingDependency, match=r"lm-evaluation-harness, which is not installed: pip install "
                                                r"'posttrain\[eval\]'"):
        harness_command(str(tiny_model_dir), tasks="hellaswag", out=str(tmp_path / "h"))
    assert not (tmp_path / "h").exists()  # nothing exported before the check


def test_parse_tasks_and_export(tiny_model_dir, tmp_path):
    assert parse_tasks("hellaswag, arc_easy,") == ["hellaswag", "arc_easy"]
    with pytest.raises(ValueError, match="--tasks is empty"):
        parse_tasks(" , ")
    assert export_for_harness(str(tiny_model_dir), tmp_path) == tiny_model_dir  # already a HF directory
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    assert export_for_harness(str(run), tmp_path) == run / "model"


def test_harness_on_a_local_task_agrees_with_choice_scoring(tiny_model_dir, tmp_path, monkeypatch):
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (pip install 'posttrain[eval]')")
    from posttrain.eval.choice import choice_command

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(TASK.format(data=data))
    summary = harness_command(str(tiny_model_dir), tasks="tiny_choice", out=str(tmp_path / "harness"),
                              include_path=str(tasks), builtin_tasks=False, batch_size=4, device="cpu")
    results = json.loads((tmp_path / "harness" / "results.json").read_text())
    assert results["tasks"] == ["tiny_choice"] and results["hf_model"] == str(tiny_model_dir)
    harness = summary["results"]["tiny_choice"]
    ours = choice_command(str(tiny_model_dir), str(data), out=str(tmp_path / "choice.json"), device="cpu")
    assert harness["acc,none"] == pytest.approx(ours["acc"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    with pytest.raises(ValueError, match="lm-eval knows no task 'no_such_task'"):
        harness_command(str(tiny_model_dir), tasks="no_such_task", out=str(tmp_path / "h2"), include_path=str(tasks),
                        builtin_tasks=False)

"""Multiple-choice scoring by log-likelihood against a hand-computed log-likelihood on a tiny model;
acc and length-normalised acc; HellaSwag / ARC / generic item formats; a hub dataset from the cache."""

import json

import pytest
import torch

from posttrain.cli import run as cli_run
from posttrain.eval.choice import (ChoiceItem, continuation_ids, load_items, loglikelihoods, score_items, to_item)
from posttrain.weights import load


def hand_loglikelihood(model, context_ids, cont_ids) -> float:
    """sum_j log p(cont_j | context, cont_<j), one sequence, no batching, no padding."""
    ids = torch.tensor([context_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).double()[0], dim=-1)
    start = len(context_ids) - 1
    return sum(float(logp[start + j, t]) for j, t in enumerate(cont_ids))


def test_continuation_split_moves_trailing_spaces(tiny_tokenizer):
    ctx, cont = continuation_ids(tiny_tokenizer, "The sky is ", "blue")
    assert ctx == list(b"The sky is") and cont == list(b" blue")  # byte tokenizer: byte b is id b
    ctx, cont = continuation_ids(tiny_tokenizer, "", "x")
    assert ctx == [tiny_tokenizer.eos_id] and cont == list(b"x")


def test_loglikelihoods_equal_hand_computation(tiny_tokenizer, tiny_llama):
    requests = [continuation_ids(tiny_tokenizer, c, " " + e) for c, e in
                [("The sky is", "blue"), ("The sky is", "green and wide"), ("2+2=", "4"), ("Once upon", "a time")]]
    expected = [hand_loglikelihood(tiny_llama, c, t) for c, t in requests]
    for batch_size in (1, 3, 8):
        got = loglikelihoods(tiny_llama, requests, batch_size=batch_size)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # the context is cut from the left when a sequence is longer than the model's context (128)
    long = (list(range(32, 120)) * 2, list(b" end"))
    kept = (long[0] + long[1])[-129:]
    assert loglikelihoods(tiny_llama, [long])[0] == pytest.approx(
        hand_loglikelihood(tiny_llama, kept[:-4], kept[-4:]), rel=1e-5)


def test_acc_and_acc_norm(tiny_tokenizer, tiny_llama):
    items = [ChoiceItem("The sky is", ["blue", "green", "a very long ending here"], 0),
             ChoiceItem("Cats say", ["meow", "woof"], 1),
             ChoiceItem("1 2 3", ["4", "5 6 7 8"], 1)]
    metrics, rows = score_items(tiny_llama, tiny_tokenizer, items, batch_size=4)
    hits, hits_norm = [], []
    for item, row in zip(items, rows):
        lls = [hand_loglikelihood(tiny_llama, *continuation_ids(tiny_tokenizer, item.context, " " + c))
               for c in item.choices]
        assert row["loglikelihoods"] == pytest.approx(lls, rel=1e-5, abs=1e-4)
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(lls)), key=lambda j: lls[j] / len(item.choices[j]))
        assert (row["pred"], row["pred_norm"]) == (pred, pred_norm)
        hits.append(pred == item.label)
        hits_norm.append(pred_norm == item.label)
    assert metrics["n"] == 3
    assert metrics["acc"] == pytest.approx(sum(hits) / 3)
    assert metrics["acc_norm"] == pytest.approx(sum(hits_norm) / 3)
    p = sum(hits) / 3
    assert metrics["acc_stderr"] == pytest.approx((p * (1 - p) / 2) ** 0.5)


def test_item_formats():
    hs = to_item({"ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "activity_label": "Roof shingle removal",
                  "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing [title] on a roof."],
                  "label": "1"}, "hs:0")
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.choices == ["is using wrap to wrap a pair of skis.", "starts pulling up roofing. on a roof."]
    assert hs.label == 1
    arc = to_item({"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
                   "answerKey": "B"}, "arc:0")
    assert (arc.context, arc.choices, arc.label) == ("Which is a gas?", ["ice", "steam", "rock"], 1)
    assert to_item({"context": "c", "endings": ["a", "b"], "label": 1}, "x").label == 1
    assert to_item({"question": "q", "options": ["a", "b", "c"], "answer": "C"}, "x").label == 2
    with pytest.raises(ValueError, match="f.jsonl: record 3.*needs a context"):
        to_item({"text": "no"}, "f.jsonl: record 3")
    with pytest.raises(ValueError, match="answer index 5 is outside the 2 choices"):
        to_item({"context": "c", "endings": ["a", "b"], "label": 5}, "x")


def test_choice_command_on_a_hub_dataset_from_the_cache(tiny_model_dir, hf_cache, tmp_path):
    src = tmp_path / "src" / "data"
    src.mkdir(parents=True)
    items = [{"ctx_a": f"Step {i} of a task.", "ctx_b": "then", "activity_label": "Cooking",
              "endings": ["they stir.", "they bake the cake slowly.", "x", "they serve it."], "label": str(i % 4)}
             for i in range(5)]
    (src / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (src / "train.jsonl").write_text(json.dumps(items[0]) + "\n")
    hf_cache.add("org/tiny-hellaswag", src.parent, repo_type="dataset")
    out = tmp_path / "choice.json"
    result = cli_run(["eval", "choice", str(tiny_model_dir), "--data", "org/tiny-hellaswag", "--split", "validation",
                      "--out", str(out), "--batch_size", "5"])
    assert result["task"] == "tiny-hellaswag" and result["n"] == 5 and result["choices"] == 20
    saved = json.loads(out.read_text())
    assert saved["acc"] == result["acc"] and 0 <= saved["acc_norm"] <= 1
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    model, tokenizer = load(str(tiny_model_dir))
    loaded = load_items("org/tiny-hellaswag", "validation")
    assert [r["label"] for r in rows] == [i % 4 for i in range(5)]
    for item, row in zip(loaded, rows):
        lls = [hand_loglikelihood(model, *continuation_ids(tokenizer, item.context, " " + c)) for c in item.choices]
        assert row["loglikelihoods"] == pytest.approx(lls, rel=1e-5, abs=1e-4)
    assert saved["acc"] == pytest.approx(sum(r["correct"] for r in rows) / 5)

"""Prediction with a saved classifier: the saved run gives the probabilities evaluation gave, the CLI
labels one text (printed) or a whole file, the saved folder loads in transformers'
AutoModelForSequenceClassification with the same logits, and mistakes get clear errors."""

import csv
import json

import pytest
import torch

from posttrain import cli
from posttrain.data.sources import DataError
from posttrain.models.heads import add_classification_head, classifier_logits
from posttrain.predict import (CLASSIFIER_FILE, Classifier, load_classifier_model, positional_text_argv,
                               predict_command, save_classifier)
from posttrain.runlog import read_jsonl
from posttrain.train.classify import collate, tokenize_texts
from test_classify import separable_records, train_tiny_run, write_jsonl


@pytest.fixture(scope="module")
def run(tiny_tokenizer, tmp_path_factory):
    """A tiny GPT-2 classifier run (neg / pos), trained once for this module."""
    path, _ = train_tiny_run(tiny_tokenizer, tmp_path_factory.mktemp("predict"), n=100, epochs=1)  # local data only
    return path


def test_saved_run_gives_the_probabilities_of_evaluation(run):
    rows = read_jsonl(run / "test_predictions.jsonl")
    clf = Classifier.load(run, device="cpu")
    assert clf.labels == ["neg", "pos"] and clf.pooling == "last-nonpad" and clf.max_length == 64
    probs = clf.probabilities([r["text"] for r in rows], batch_size=7)  # other batches, other padding
    expected = torch.tensor([[r["probabilities"][k] for k in clf.labels] for r in rows])
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    predicted = clf.predict([r["text"] for r in rows[:3]])
    assert [p["label"] for p in predicted] == [r["prediction"] for r in rows[:3]]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-6 for p in predicted)


def test_pooling_last_predicts_what_evaluation_gave_whatever_the_batch(tiny_tokenizer, tmp_path):
    """Pooling `last` under right padding reads a pad slot: rows are padded to one length (the longest
    training text), so a text's probabilities do not depend on the texts batched with it."""
    run, _ = train_tiny_run(tiny_tokenizer, tmp_path, n=60, epochs=1, pooling="last")
    meta = json.loads((run / "model" / CLASSIFIER_FILE).read_text())
    longest = max(len(ids) for ids in tokenize_texts([r["text"] for r in separable_records(60)], tiny_tokenizer,
                                                     64)[0])
    assert meta["pooling"] == "last" and longest >= meta["pad_to"] == meta["max_length"] > 10
    rows = read_jsonl(run / "test_predictions.jsonl")
    clf = Classifier.load(run, device="cpu")
    expected = torch.tensor([[r["probabilities"][k] for k in clf.labels] for r in rows])
    torch.testing.assert_close(clf.probabilities([r["text"] for r in rows], batch_size=5), expected,
                               atol=1e-6, rtol=1e-5)
    alone = torch.cat([clf.probabilities([r["text"]]) for r in rows[:4]])  # one text per batch
    torch.testing.assert_close(alone, expected[:4], atol=1e-6, rtol=1e-5)


def test_predict_one_text_prints_label_and_probabilities(run, capsys):
    [result] = predict_command(str(run), "jade milk face", device="cpu")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == result["label"]
    assert [line.split()[0] for line in out[1:]] == ["neg", "pos"]
    assert float(out[2].split()[1]) == pytest.approx(result["probabilities"]["pos"], abs=1e-4)
    cli.main(["predict", str(run), "--text", "jade milk face", "--device", "cpu"])
    assert capsys.readouterr().out.splitlines() == out
    cli.run(positional_text_argv(["predict", str(run), "jade milk face", "--device", "cpu"]))
    assert capsys.readouterr().out.splitlines() == out


def test_predict_a_file(run, tmp_path, capsys):
    records = separable_records(12, seed=5)
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(records)
    out_jsonl = tmp_path / "out.jsonl"
    predictions = predict_command(str(run), input=str(src), output=str(out_jsonl), device="cpu")
    rows = read_jsonl(out_jsonl)
    assert len(rows) == 12 and [r["text"] for r in rows] == [r["text"] for r in records]
    assert [r["prediction"] for r in rows] == [p["label"] for p in predictions]
    assert all(set(r["probabilities"]) == {"neg", "pos"} for r in rows) and rows[0]["label"] == records[0]["label"]
    clf = Classifier.load(run, device="cpu")
    expected = clf.probabilities([r["text"] for r in records])
    assert [r["probabilities"]["pos"] for r in rows] == pytest.approx(expected[:, 1].tolist(), abs=1e-6)
    err = capsys.readouterr().err
    correct = sum(r["prediction"] == r["label"] for r in rows)
    assert f"accuracy {correct / 12:.4f}" in err  # the input had the run's label column

    out_csv = tmp_path / "out.csv"
    cli.main(["predict", str(run), "--input", str(src), "--output", str(out_csv), "--device", "cpu"])
    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["text", "label", "prediction", "p_neg", "p_pos"]
    assert [t["prediction"] for t in table] == [r["prediction"] for r in rows]

    txt = tmp_path / "in.txt"
    txt.write_text("jade milk\n\nrust tux\n")
    predict_command(str(run), input=str(txt), output=str(tmp_path / "t.jsonl"), device="cpu")
    assert [r["text"] for r in read_jsonl(tmp_path / "t.jsonl")] == ["jade milk", "rust tux"]


def test_predict_errors(run, tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="either a text"):
        predict_command(str(run))
    with pytest.raises(ValueError, match="either a text"):
        predict_command(str(run), "x", input="f.csv")
    with pytest.raises(ValueError, match="--output needs --input"):
        predict_command(str(run), "x", output="o.jsonl")
    with pytest.raises(ValueError, match="holds a language model, not a classifier"):
        predict_command(str(tiny_model_dir), "x")
    with pytest.raises(FileNotFoundError, match="not a classifier run"):
        predict_command(str(tmp_path / "nothing"), "x")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "jade"}, {"text": "  "}])
    with pytest.raises(DataError, match=r"bad\.jsonl: record 1, line 2: the text \('text'\) is empty"):
        predict_command(str(run), input=str(bad), device="cpu")
    with pytest.raises(DataError, match=r"record 0, line 1: no text column 'body'"):
        predict_command(str(run), input=str(bad), text_column="body", device="cpu")
    with pytest.raises(ValueError, match="output type .xml unknown"):
        predict_command(str(run), input=str(write_jsonl(tmp_path / "ok.jsonl", [{"text": "jade"}])),
                        output=str(tmp_path / "o.xml"), device="cpu")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(run)])
    assert exit_info.value.code == 1


def test_positional_text_argv():
    assert positional_text_argv(["predict", "runs/a", "buy now!"]) == ["predict", "runs/a", "--text", "buy now!"]
    assert positional_text_argv(["predict", "--device", "cpu", "runs/a", "hi"]) == \
        ["predict", "--device", "cpu", "runs/a", "--text", "hi"]
    assert positional_text_argv(["predict", "runs/a", "--input", "f.csv"]) == ["predict", "runs/a", "--input", "f.csv"]
    assert positional_text_argv(["predict", "runs/a", "--text=hi"]) == ["predict", "runs/a", "--text=hi"]
    assert positional_text_argv(["sft", "--config", "x.yaml"]) == ["sft", "--config", "x.yaml"]


# -- the saved format ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_loads_the_saved_classifier_with_the_same_logits(make_tiny_model, tiny_tokenizer, tmp_path, kind):
    from transformers import AutoModelForSequenceClassification

    model = make_tiny_model(kind)
    add_classification_head(model, 3)
    out = save_classifier(model, tiny_tokenizer, ["a", "b", "c"], tmp_path / "model", {"max_length": 64})
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"} and hf.config.pad_token_id == tiny_tokenizer.pad_id
    ids, _ = tokenize_texts(["hello there", "hi", "a longer text to classify"], tiny_tokenizer, 64)
    batch = collate(ids, tiny_tokenizer.pad_id, "right")
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
        ours = classifier_logits(model, batch, "last-nonpad")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_save_and_load_keep_head_bias_and_settings(make_tiny_model, tiny_tokenizer, tmp_path):
    model = make_tiny_model("gpt2")
    add_classification_head(model, 2, bias=True)
    with torch.no_grad():
        model.lm_head.bias.copy_(torch.tensor([0.3, -0.2]))
    settings = {"pooling": "mean", "max_length": 16, "padding_side": "left", "text_column": "sms"}
    save_classifier(model, tiny_tokenizer, ["ham", "spam"], tmp_path / "run" / "model", settings)
    meta = json.loads((tmp_path / "run" / "model" / CLASSIFIER_FILE).read_text())
    assert meta["labels"] == ["ham", "spam"] and meta["head_bias"] and meta["pooling"] == "mean"
    loaded, _ = load_classifier_model(tmp_path / "run")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    clf = Classifier.load(tmp_path / "run", device="cpu")
    assert (clf.pooling, clf.max_length, clf.padding_side, clf.text_column) == ("mean", 16, "left", "sms")
    texts = ["some text", "x"]
    ids, _ = tokenize_texts(texts, tiny_tokenizer, 16)
    with torch.no_grad():
        expected = classifier_logits(model, collate(ids, tiny_tokenizer.pad_id, "left"), "mean").softmax(-1)
    torch.testing.assert_close(clf.probabilities(texts), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="the head has 2 outputs but there are 3 labels"):
        save_classifier(model, tiny_tokenizer, ["a", "b", "c"], tmp_path / "other")

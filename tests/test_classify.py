"""Classification fine-tuning on tiny CPU models: metrics against hand computation, batches padded to
their longest example, the loss contract, a synthetic separable dataset reaching >= 95% test accuracy
through `classify` with a complete run directory, the CLI (config file, bad input), and the recipes."""

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from posttrain import cli
from posttrain.eval.classification_metrics import (accuracy, classification_report, confusion_matrix,
                                                   format_confusion, macro_f1, per_class)
from posttrain.models.gpt2 import GPT2Config
from posttrain.models.heads import add_classification_head
from posttrain.models.llama import LlamaConfig
from posttrain.models.registry import PRESETS, build_model
from posttrain.runlog import read_jsonl
from posttrain.train.classify import (ClassificationBatches, ClassifyDataConfig, EvalConfig, HeadConfig,
                                      check_options, classification_loss, classify, classify_train_config, collate,
                                      cut_to_length, fixed_length)
from posttrain.train.loop import TrainConfig
from posttrain.weights import save_pretrained

# -- shared helpers (test_predict.py imports these) ---------------------------------------------

# Disjoint byte sets (a-m, n-z, digits): with the byte-level tiny tokenizer every token tells the class.
VOCABULARY = [["face", "jade", "milk", "beach", "glide", "hem", "blam"],
              ["nosy", "rust", "sour", "tux", "wry", "zoo", "yurt"],
              ["123", "42", "7", "9081", "555", "60", "3.14"]]


def separable_records(n: int, n_classes: int = 2, seed: int = 0, names=("pos", "neg", "num")) -> list[dict]:
    """Texts of 1-6 words all drawn from their class's vocabulary: separable by any single token."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(VOCABULARY[i % n_classes]) for _ in range(rng.randint(1, 6))),
             "label": names[i % n_classes]} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny(kind: str, tokenizer, out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-dim model for the byte-level tiny tokenizer, as a Hugging Face directory."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=320, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=256,
                            eos_token_id=256)
    else:
        config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             bos_token_id=None, eos_token_id=tokenizer.eos_id)
    return save_pretrained(build_model(config), tokenizer, out_dir)


def quick_train(**overrides) -> TrainConfig:
    """The classify defaults with a learning rate for tiny random models; no progress bar, no TensorBoard."""
    return replace(classify_train_config(), **{"lr": 3e-3, "epochs": 2, "eval_every": 0, "progress": False,
                                               "tensorboard": False, "device": "cpu", **overrides})


def train_tiny_run(tokenizer, tmp: Path, kind: str = "gpt2", n: int = 200, epochs: int = 2,
                   pooling: str = "last-nonpad", **data) -> tuple[Path, dict]:
    """A tiny classifier run on separable data, evaluated every 6 steps (the best checkpoint is chosen)."""
    model_dir = save_tiny(kind, tokenizer, tmp / f"tiny-{kind}")
    path = write_jsonl(tmp / "data.jsonl", separable_records(n))
    run = tmp / "run"
    summary = classify(str(model_dir), ClassifyDataConfig(path=str(path), max_length=64, **data),
                       HeadConfig(trainable="all", pooling=pooling), quick_train(epochs=epochs, eval_every=6),
                       EvalConfig(), run_dir=str(run))
    return run, summary


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


# -- metrics ------------------------------------------------------------------------------------

def test_metrics_against_hand_computation():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 0, 1, 2, 2, 2, 0, 2]
    confusion = confusion_matrix(y_true, y_pred, 3)
    assert confusion == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert accuracy(confusion) == pytest.approx(6 / 9)
    scores = per_class(confusion)
    # class 0: tp 2, predicted 3, support 3; class 1: tp 1 of 2 and 2; class 2: tp 3 of 4 and 4
    assert [s["precision"] for s in scores] == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert [s["recall"] for s in scores] == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert [s["f1"] for s in scores] == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert macro_f1(confusion) == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    # a class absent from labels and predictions does not count; one only predicted counts with F1 0
    assert macro_f1(confusion_matrix(y_true, y_pred, 4)) == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert macro_f1(confusion_matrix([0, 0, 1, 1], [0, 0, 1, 2], 3)) == pytest.approx((1 + 2 / 3 + 0) / 3)
    # binary: precision 1/2 (tp 1, fp 1), recall 1/3 (fn 2) -> F1 0.4 for class 1; class 0 F1 4/7
    report = classification_report([1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0, 0], ["ham", "spam"], loss=0.5)
    assert report["confusion"] == [[3, 1], [2, 1]] and report["n"] == 7 and report["loss"] == 0.5
    assert report["per_class"]["spam"]["f1"] == pytest.approx(0.4)
    assert report["macro_f1"] == pytest.approx((0.4 + 2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4)) / 2)
    assert format_confusion(report["confusion"], ["ham", "spam"]).splitlines()[1].split() == ["ham", "3", "1"]
    with pytest.raises(ValueError, match="outside 0..1"):
        confusion_matrix([0, 2], [0, 1], 2)


# -- batches and loss ---------------------------------------------------------------------------

def test_batches_are_padded_to_their_longest_example():
    ids = [np.arange(1, n + 1) for n in (3, 7, 2, 5, 1)]
    batches = ClassificationBatches(ids, [0, 1, 0, 1, 0], batch_size=2, pad_id=99)
    shapes = [tuple(b["input_ids"].shape) for b in batches.epoch(0)]
    assert shapes == [(2, 7), (2, 5), (1, 1)]  # not the context length
    first = next(batches.epoch(0))
    assert first["input_ids"][0].tolist() == [1, 2, 3, 99, 99, 99, 99]
    assert first["attention_mask"][0].tolist() == [True] * 3 + [False] * 4
    assert first["labels"].tolist() == [0, 1] and first["position_ids"] is None and first["document_ids"] is None
    left = collate(ids[:2], 99, "left")
    assert left["input_ids"][0].tolist() == [99] * 4 + [1, 2, 3]
    assert left["position_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 2]
    by_length = ClassificationBatches(ids, None, 2, 99, by_length=True)
    assert [b.tolist() for b in by_length.batch_order()] == [[4, 2], [0, 3], [1]]
    shuffled = ClassificationBatches(ids, [0] * 5, 2, 99, shuffle=True, seed=3)
    assert [b.tolist() for b in shuffled.batch_order(1)] == [b.tolist() for b in shuffled.batch_order(1)]
    assert [b.tolist() for b in shuffled.batch_order(0)] != [b.tolist() for b in shuffled.batch_order(1)]
    with pytest.raises(ValueError, match="padding_side 'middle'"):
        collate(ids, 99, "middle")


def test_pooling_last_with_right_padding_pads_every_row_to_the_longest_training_text():
    ids = [np.arange(1, n + 1) for n in (3, 7, 2)]
    assert fixed_length(ids, "last", "right") == 7
    assert fixed_length(ids, "last", "left") is None and fixed_length(ids, "last-nonpad", "right") is None
    cut, truncated = cut_to_length({"train": ids, "test": [np.arange(9), np.arange(4)]}, {"train": 0, "test": 1}, 7)
    assert [len(x) for x in cut["test"]] == [7, 4] and truncated == {"train": 0, "test": 2}  # counted, not silent
    batches = ClassificationBatches(ids[::2], [0, 1], batch_size=2, pad_id=99, pad_to=7)
    batch = next(batches.epoch(0))
    assert batch["input_ids"].tolist() == [[1, 2, 3, 99, 99, 99, 99], [1, 2, 99, 99, 99, 99, 99]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 2]


def test_examples_seen_per_step():
    batches = ClassificationBatches([np.ones(2)] * 10, [0] * 10, batch_size=4, pad_id=0)  # batches 4, 4, 2
    assert batches.examples_seen(grad_accum=1, steps=5) == [0, 4, 8, 10, 14, 18]
    assert batches.examples_seen(grad_accum=2, steps=3) == [0, 8, 10, 18]  # a step never spans two epochs


def test_loss_sums_cross_entropy_over_examples(make_tiny_model):
    model = make_tiny_model("gpt2")
    add_classification_head(model, 3)
    batch = collate([np.arange(1, 6), np.arange(2, 4), np.arange(7, 9)], 256, labels=[2, 0, 1])
    loss_fn = classification_loss("last-nonpad")
    assert loss_fn.count(batch) == 3
    with torch.no_grad():
        loss_sum, n, metrics = loss_fn(model, batch)
        logits = torch.stack([model(torch.tensor([x]))[0, -1] for x in ([1, 2, 3, 4, 5], [2, 3], [7, 8])])
    assert n == 3
    assert loss_sum.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([2, 0, 1]), reduction="sum").item(),
                                            rel=1e-5)
    assert metrics["accuracy"].item() == (logits.argmax(-1) == torch.tensor([2, 0, 1])).sum().item()
    weighted = classification_loss("last-nonpad", [1.0, 2.0, 0.5])
    with torch.no_grad():
        w_sum = weighted(model, batch)[0]
    each = F.cross_entropy(logits, torch.tensor([2, 0, 1]), reduction="none")
    assert w_sum.item() == pytest.approx((0.5 * each[0] + 1.0 * each[1] + 2.0 * each[2]).item(), rel=1e-5)


# -- end to end ---------------------------------------------------------------------------------

def test_separable_data_reaches_95_percent_and_writes_a_complete_run(tiny_tokenizer, tmp_path):
    run, summary = train_tiny_run(tiny_tokenizer, tmp_path)
    assert summary["test_accuracy"] >= 0.95, summary
    assert summary["test_accuracy_before"] < 0.9  # the untrained head is not already right
    assert summary["labels"] == ["neg", "pos"] and summary["final_weights"].startswith("best (step")
    results = json.loads((run / "classification.json").read_text())
    for stage in ("before", "after"):
        assert set(results[stage]) == {"train", "val", "test"}
        for split, m in results[stage].items():
            assert set(m) >= {"n", "loss", "accuracy", "macro_f1", "confusion", "per_class"}
            assert sum(map(sum, m["confusion"])) == m["n"]
    assert results["after"]["test"]["n"] == 40 and results["after"]["train"]["n"] == 140  # 70/10/20 of 200
    assert json.loads((run / "labels.json").read_text()) == {"labels": ["neg", "pos"]}
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["task"] == "classify" and config["labels"] == ["neg", "pos"] and config["head"]["trainable"] == "all"
    predictions = read_jsonl(run / "test_predictions.jsonl")
    assert len(predictions) == 40
    assert sum(p["label"] == p["prediction"] for p in predictions) / 40 == results["after"]["test"]["accuracy"]
    # the split's loss by hand: the mean of -log p(true label)
    hand_loss = sum(-np.log(p["probabilities"][p["label"]]) for p in predictions) / 40
    assert results["after"]["test"]["loss"] == pytest.approx(hand_loss, rel=1e-4)
    rows = read_jsonl(run / "metrics.jsonl")
    # best checkpoint by val accuracy: the first evaluation with the highest val accuracy, and its weights are final
    evaluated = [r for r in rows if r["step"] > 0 and "val_accuracy" in r]
    assert len(evaluated) == 6  # every 6 of the 36 steps
    best = max(r["val_accuracy"] for r in evaluated)
    best_step = next(r["step"] for r in evaluated if r["val_accuracy"] == best)
    assert summary["best_step"] == best_step and summary["final_weights"].startswith(f"best (step {best_step},")
    assert results["after"]["val"]["accuracy"] == best
    assert results["after"]["val"]["loss"] == pytest.approx(next(r["val_loss"] for r in evaluated
                                                                  if r["step"] == best_step), rel=1e-5)
    assert rows[0]["step"] == 0 and rows[0]["val_accuracy"] == results["before"]["val"]["accuracy"]
    assert rows[-1]["step"] == 36 and rows[-1]["examples_seen"] == 280  # 2 epochs of 140 in 18 batches each
    assert all("examples_seen" in r for r in rows) and "val_accuracy" in rows[-1] and "accuracy" in rows[-1]
    for plot in ("loss_vs_step", "loss_vs_tokens", "accuracy_vs_step", "loss_vs_examples", "accuracy_vs_examples"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 1000
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    assert {p.name for p in (run / "model").iterdir()} >= {"config.json", "model.safetensors", "classifier.json",
                                                          "tokenizer.json"}
    assert read_jsonl(run / "samples.jsonl")[0].keys() >= {"step", "text", "label", "prediction"}


def test_three_classes_llama_left_padding_mean_pooling_and_class_weights(tiny_tokenizer, tmp_path):
    model_dir = save_tiny("llama", tiny_tokenizer, tmp_path / "tiny-llama")
    rows = separable_records(150, n_classes=3)
    rows = [r for i, r in enumerate(rows) if r["label"] != "num" or i % 2]  # fewer of one class: weights
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    summary = classify(str(model_dir),
                       ClassifyDataConfig(path=str(path), balance="class-weights", padding_side="left", batch_size=8),
                       HeadConfig(trainable="all", pooling="mean"), quick_train(epochs=2),
                       EvalConfig(before=False, splits=("test",), final="last"), run_dir=str(tmp_path / "run"))
    assert summary["labels"] == ["neg", "num", "pos"] and summary["final_weights"] == "last"
    assert summary["test_accuracy"] >= 0.9, summary
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    counts = config["data_report"]["splits"]["train"]
    n = sum(counts.values())
    assert config["class_weights"] == pytest.approx([n / (3 * counts[k]) for k in ("neg", "num", "pos")])
    assert not (tmp_path / "run" / "classification_before.json").exists()


def test_options_are_checked_before_anything_loads(tmp_path):
    data, head, ev, tc = ClassifyDataConfig(), HeadConfig(), EvalConfig(), classify_train_config()
    with pytest.raises(ValueError, match="head.pooling 'first' is unknown; choose one of: last, last-nonpad, mean"):
        check_options(data, replace(head, pooling="first"), ev, tc)
    with pytest.raises(ValueError, match="head.trainable 'bias' is unknown"):
        check_options(data, replace(head, trainable="bias"), ev, tc)
    with pytest.raises(ValueError, match="data.padding_side 'both'"):
        check_options(replace(data, padding_side="both"), head, ev, tc)
    with pytest.raises(ValueError, match=r"evaluation.splits \['dev'\]"):
        check_options(data, head, replace(ev, splits=("dev",)), tc)
    with pytest.raises(ValueError, match="head.pooling"):  # a model that does not exist is never reached
        classify("no/such-model", data, replace(head, pooling="first"), tc, ev, run_dir=str(tmp_path / "r"))


# -- command line -------------------------------------------------------------------------------

def test_cli_runs_a_config_file(tiny_tokenizer, tmp_path, capsys):
    model_dir = save_tiny("gpt2", tiny_tokenizer, tmp_path / "tiny")
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": r["text"], "y": r["label"]} for r in separable_records(60)])
    config = {"model": str(model_dir), "data": {"path": str(path), "text_column": "body", "label_column": "y",
                                                "max_length": 32},
              "head": {"trainable": "last-k", "last_k": 2, "pooling": "last-nonpad"},
              "train": {"lr": 3e-3, "epochs": 1, "progress": False, "tensorboard": False},
              "evaluation": {"splits": ["test"]}, "run_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cli.main(["classify", "--config", str(tmp_path / "c.yaml"), "--train.max_steps", "3"])
    out = capsys.readouterr().out
    assert "before training: test accuracy" in out and "after training: test accuracy" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["labels"] == ["neg", "pos"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["text_column"] == "body" and saved["head"]["last_k"] == 2 and saved["train"]["lr"] == 3e-3
    # the classify defaults, not TrainConfig's
    assert saved["train"]["weight_decay"] == 0.1 and saved["train"]["best_metric"] == "val_accuracy"


def test_cli_reports_a_bad_label_naming_the_row(tiny_tokenizer, tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,ham\nbuy now,spam\nscrambled,eggs\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["classify", "--model", "unused", "--data.path", str(path), "--data.labels", "[ham, spam]",
                  "--run_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "d.csv: record 2, line 4: label 'eggs' is not one of the known labels ['ham', 'spam']" in err


# -- recipes ------------------------------------------------------------------------------------

# The three SMS spam recipes of this task (tests/test_recipes.py parses every recipe generically).
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/classify-sms-spam.yaml"))
SECTIONS = {"data": ClassifyDataConfig, "head": HeadConfig, "train": TrainConfig, "evaluation": EvalConfig}


def test_the_three_classification_recipes_exist():
    assert {p.parent.name for p in RECIPES} == {"gpt2", "gpt2-medium", "smollm2-135m-instruct"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_into_the_classify_configs(path):
    parser = cli.parser()
    cfg = parser.instantiate(parser.parse_args(["classify", "--config", str(path)])).classify
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():
        if key in SECTIONS:
            assert isinstance(getattr(cfg, key), SECTIONS[key])
            for name, v in value.items():
                got = getattr(getattr(cfg, key), name)
                assert (list(got) if isinstance(got, tuple) else got) == v, f"{key}.{name}"
        else:
            assert getattr(cfg, key) == value, key
    assert cfg.model in PRESETS and path.parent.name == cfg.model
    check_options(cfg.data, cfg.head, cfg.evaluation, cfg.train)
    assert cfg.data.path == "sms-spam" and cfg.train.best_metric == "val_accuracy" and cfg.train.best_mode == "max"
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.data.batch_size) in ((5e-5, 0.1, 8), (1e-4, 0.1, 8))

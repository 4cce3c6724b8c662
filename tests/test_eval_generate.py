"""`posttrain eval generate`: batched responses for a split, deterministic under greedy decoding,
equal to one-by-one generation, with the run's data split and metrics written beside them."""

import json
import shutil

import pytest
import yaml

from posttrain.cli import run as cli_run
from posttrain.eval.metrics import text_metrics
from posttrain.eval.responses import EvalExample, eval_generate, generate_responses, load_examples
from posttrain.generate import GenerationConfig, generate_batch, generate_text, render_prompt
from posttrain.prompts import get_style
from posttrain.weights import load

RECORDS = [{"instruction": f"Say {w}.", "input": "" if i % 2 else f"x{i}", "output": w}
           for i, w in enumerate(["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_responses_are_deterministic_and_batch_independent(tiny_model_dir, data_file, tmp_path):
    kw = dict(data=str(data_file), split="all", max_new_tokens=12, progress=False, loss=False)
    a = eval_generate(str(tiny_model_dir), out=str(tmp_path / "a" / "responses-all.jsonl"), batch_size=4, **kw)
    b = eval_generate(str(tiny_model_dir), out=str(tmp_path / "b" / "responses-all.jsonl"), batch_size=4, **kw)
    c = eval_generate(str(tiny_model_dir), out=str(tmp_path / "c" / "responses-all.jsonl"), batch_size=1, **kw)
    first = (tmp_path / "a" / "responses-all.jsonl").read_bytes()
    assert first == (tmp_path / "b" / "responses-all.jsonl").read_bytes()
    assert read(tmp_path / "a" / "responses-all.jsonl") == read(tmp_path / "c" / "responses-all.jsonl")
    assert a["metrics"] == b["metrics"] == c["metrics"]

    rows = read(tmp_path / "a" / "responses-all.jsonl")
    assert [r["index"] for r in rows] == list(range(10))
    assert [r["reference"] for r in rows] == [r["output"] for r in RECORDS]
    assert rows[0]["instruction"] == "Say one." and rows[0]["input"] == "x0"
    assert rows[0]["prompt"] == "Say one.\n\nx0" and rows[1]["prompt"] == "Say two."
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["completion_tokens"] <= 12 for r in rows)
    assert all(r["prompt_tokens"] > 5 for r in rows)
    metrics = json.loads((tmp_path / "a" / "metrics-all.json").read_text())
    assert metrics["examples"] == 10 and metrics["style"] == "template"
    assert metrics["generation"]["temperature"] == 0.0 and metrics["metrics"]["n"] == 10
    assert metrics["responses_per_s"] > 0 and metrics["tokens_per_s"] > 0

    # the same text as generating each prompt alone with the model's chat template
    model, tokenizer = load(str(tiny_model_dir))
    style = get_style("template", tokenizer)
    for row, example in zip(rows, load_examples(str(data_file), "all")):
        ids = render_prompt(tokenizer, example.messages, style)
        config = GenerationConfig(max_new_tokens=12, stop_ids=list(style.stop_ids))
        assert generate_text(model, tokenizer, [ids], config)[0] == row["response"]


def test_run_directory_supplies_data_split_and_output(tiny_model_dir, data_file, tmp_path):
    run = tmp_path / "my-run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "model" / "posttrain.json").write_text(json.dumps({"prompt_style": "chatml"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "sft", "data": {
        "path": str(data_file), "split": [0.6, 0.2, 0.2], "shuffle": False, "seed": 0, "style": "alpaca"}}))
    summary = cli_run(["eval", "generate", str(run), "--max_new_tokens", "8", "--batch_size", "3",
                       "--progress", "false"])
    rows = read(run / "eval" / "responses-test.jsonl")
    # 10 records split 0.6/0.2/0.2 in order: test = records 6 and 7
    assert [r["reference"] for r in rows] == ["seven", "eight"]
    assert summary["style"] == "chatml"  # the style the run trained with, from model/posttrain.json
    metrics = json.loads((run / "eval" / "metrics-test.json").read_text())["metrics"]
    assert metrics["loss"] > 0 and metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert metrics["loss_examples"] == 2
    assert 0 <= metrics["no_stop_rate"] <= 1 and "rouge_l" in metrics


def test_clear_errors(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(ValueError, match="split 'dev' is unknown"):
        load_examples(str(data_file), "dev")
    with pytest.raises(ValueError, match="no --data given"):
        eval_generate(str(tiny_model_dir), out=str(tmp_path / "r.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1, line 2"):
        load_examples(str(bad), "all")


def test_rows_stop_at_eos_and_count_the_ones_that_never_stop(tiny_llama, tiny_tokenizer):
    """A row ends at the model's EOS (finish_reason "stop", EOS not in the text); a row that runs to
    max_new_tokens is "length", which the no-stop rate counts. (Sampled with fixed seeds: greedy, this
    random model only repeats a newline.)"""
    style = get_style("chatml", tiny_tokenizer)
    examples = [EvalExample(i, [{"role": "user", "content": q}], "ref") for i, q in enumerate(["Hi", "2+2?", "Why?"])]
    prompts = [style.render(e.messages, add_generation_prompt=True)[0] for e in examples]
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7)
    alone = [GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7 + i, stop_ids=list(style.stop_ids))
             for i in range(3)]  # example i draws from seed + i
    free = [g.ids for g in generate_batch(tiny_llama, tiny_tokenizer, prompts, alone)]
    assert all(len(ids) == 12 for ids in free)  # no row stops by itself
    # make a token that example 0 emits (and the others never do) the model's EOS
    k, eos = next((k, t) for k, t in enumerate(free[0]) if k >= 2 and t not in free[0][:k]
                  and t not in free[1] and t not in free[2])
    tiny_llama.config.eos_token_id = [tiny_llama.config.eos_token_id, eos]
    rows = generate_responses(tiny_llama, tiny_tokenizer, style, examples, config, batch_size=3, progress=False)
    assert rows[0]["finish_reason"] == "stop" and rows[0]["completion_tokens"] == k + 1  # EOS counted, not shown
    assert rows[0]["response"] == tiny_tokenizer.decode(free[0][:k])
    assert [(r["finish_reason"], r["completion_tokens"]) for r in rows[1:]] == [("length", 12), ("length", 12)]
    assert [r["response"] for r in rows[1:]] == [tiny_tokenizer.decode(ids) for ids in free[1:]]
    assert text_metrics(rows)["no_stop_rate"] == pytest.approx(2 / 3)

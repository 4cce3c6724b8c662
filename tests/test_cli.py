"""`posttrain` through its command line: resume equals an uninterrupted run, SIGTERM/Ctrl-C save a
checkpoint and exit with 128 + signum (a real subprocess), bad input is one clear line on stderr with
exit code 1 (2 for options that do not parse), and `posttrain data inspect` writes its report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from posttrain import cli
from posttrain.runlog import read_jsonl
from test_sft import alpaca_records, save_tiny_llama, write_alpaca


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_llama(tiny_tokenizer, tmp_path_factory.mktemp("cli") / "tiny-llama")


def sft_args(model: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """A small, quiet `posttrain sft` command line."""
    return ["sft", "--model", str(model), "--data.path", str(data), "--data.batch_size", "4",
            "--data.max_length", "256", "--train.lr", "3e-3", "--train.schedule", "constant",
            "--train.log_every", "1", "--train.progress", "false", "--train.tensorboard", "false",
            "--samples.prompts", "0", "--run_dir", str(run_dir), *extra]


def fails(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI expecting failure: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_clear_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("posttrain: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- resume --------------------------------------------------------------------------------------

def test_resume_through_the_cli_equals_an_uninterrupted_run(tmp_path, llama_dir):
    data = write_alpaca(tmp_path / "alpaca.json", n=24)  # 20 train examples: 5 batches, 8 steps cross an epoch
    split, whole = tmp_path / "split", tmp_path / "whole"
    cli.main(sft_args(llama_dir, data, split, "--train.max_steps", "4"))
    assert [r["step"] for r in read_jsonl(split / "metrics.jsonl")] == [1, 2, 3, 4]
    with pytest.warns(UserWarning, match="changed settings"):  # max_steps 4 -> 8 (harmless: constant lr)
        cli.main(sft_args(llama_dir, data, split, "--train.max_steps", "8", "--train.resume", "true"))
    cli.main(sft_args(llama_dir, data, whole, "--train.max_steps", "8"))

    resumed, uninterrupted = read_jsonl(split / "metrics.jsonl"), read_jsonl(whole / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in uninterrupted], rel=1e-6)
    assert [r["tokens_seen"] for r in resumed] == [r["tokens_seen"] for r in uninterrupted]
    assert resumed[-1]["val_loss"] == pytest.approx(uninterrupted[-1]["val_loss"], rel=1e-6)
    assert json.loads((split / "summary.json").read_text())["resumed_from"] == 4
    a = safetensors.torch.load_file(str(split / "model" / "model.safetensors"))
    b = safetensors.torch.load_file(str(whole / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path, llama_dir, capsys):
    data = write_alpaca(tmp_path / "alpaca.json", n=24)
    run_dir = tmp_path / "run"
    cli.main(sft_args(llama_dir, data, run_dir, "--train.max_steps", "1"))
    config_before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    code, out, err = fails(sft_args(llama_dir, data, run_dir, "--train.max_steps", "2", "--train.lr", "1e-3"), capsys)
    assert code == 1
    assert_one_clear_line(err, str(run_dir), "already holds a run", "--train.resume true")
    assert (run_dir / "config.yaml").read_text() == config_before  # the refused run wrote nothing
    assert "train:" not in out  # refused before loading and tokenizing


# -- signals: a real process, stopped mid-training ------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_128_plus_signum(tmp_path, llama_dir, signum, capsys):
    data = write_alpaca(tmp_path / "alpaca.json", n=24)
    run_dir = tmp_path / "run"
    argv = sft_args(llama_dir, data, run_dir, "--train.max_steps", "100000")
    env = {**os.environ, "POSTTRAIN_CACHE": str(tmp_path / "cache")}
    with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", *argv], stdout=out, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 120
            while len(read_jsonl(run_dir / "metrics.jsonl")) < 2:  # training has started
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "training did not start"
                time.sleep(0.05)
            proc.send_signal(signum)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert code == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert f"stopped by {signal.Signals(signum).name} after step" in stderr and "--train.resume true" in stderr

    step = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["step"]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert step >= 2 and rows[-1]["step"] == step  # saved after the step in progress, all of it logged
    assert not (run_dir / "model").exists()  # the final model is only written when training finishes
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no torn temp dirs

    # the saved checkpoint resumes
    with pytest.warns(UserWarning, match="changed settings"):  # max_steps 100000 -> step + 2
        cli.main(sft_args(llama_dir, data, run_dir, "--train.max_steps", str(step + 2), "--train.resume", "true"))
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == step
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, step + 3))
    assert (run_dir / "model" / "posttrain.json").is_file()


# -- bad input: one line on stderr, exit 1 ---------------------------------------------------------

def test_malformed_json_names_file_and_line(tmp_path, llama_dir, capsys):
    data = tmp_path / "broken.json"
    data.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    code, _, err = fails(sft_args(llama_dir, data, tmp_path / "run"), capsys)
    assert code == 1
    assert_one_clear_line(err, f"{data}:3:", "malformed JSON")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_malformed_jsonl_line_names_file_and_line(tmp_path, llama_dir, capsys):
    data = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) for r in alpaca_records(6)]
    lines[4] = lines[4][:-3]  # cut the closing quote and brace
    data.write_text("\n".join(lines) + "\n")
    code, _, err = fails(sft_args(llama_dir, data, tmp_path / "run"), capsys)
    assert code == 1
    assert_one_clear_line(err, f"{data}:5:", "malformed JSON line")


def test_missing_field_names_the_record(tmp_path, llama_dir, capsys):
    records = alpaca_records(24)
    del records[3]["output"]
    data = tmp_path / "missing.json"
    data.write_text(json.dumps(records))
    code, _, err = fails(sft_args(llama_dir, data, tmp_path / "run"), capsys)
    assert code == 1
    assert_one_clear_line(err, "record 3", "missing field 'output'", str(data))


def test_skip_invalid_counts_what_it_skips(tmp_path, llama_dir, capsys):
    import yaml

    records = alpaca_records(24)
    del records[3]["output"]
    del records[5]["output"]
    records[7]["instruction"] = 42
    data = tmp_path / "some-bad.json"
    data.write_text(json.dumps(records))
    run_dir = tmp_path / "run"
    cli.main(sft_args(llama_dir, data, run_dir, "--train.max_steps", "1", "--data.skip_invalid", "true"))
    report = yaml.safe_load((run_dir / "config.yaml").read_text())["data_report"]["train"]
    assert report["skipped_invalid"] == {"missing field 'output'": 2, "field 'instruction' is not a string": 1}
    assert report["records"] == 20 and report["examples"] == 17  # 24 * 0.85 = 20 train records, 3 bad
    assert "skipped_invalid" in capsys.readouterr().out


def test_nothing_left_after_filtering_is_a_clear_error(tmp_path, llama_dir, capsys):
    data = tmp_path / "all-bad.json"
    data.write_text(json.dumps([{"instruction": f"task {i}", "input": ""} for i in range(20)]))
    code, _, err = fails(sft_args(llama_dir, data, tmp_path / "run", "--data.skip_invalid", "true"), capsys)
    assert code == 1
    assert_one_clear_line(err, "no instruction examples left", "missing field 'output' (17)")


def test_unwritable_output_dir_fails_before_training(tmp_path, llama_dir, capsys):
    data = write_alpaca(tmp_path / "alpaca.json", n=24)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, out, err = fails(sft_args(llama_dir, data, blocker / "run"), capsys)
    assert code == 1
    assert_one_clear_line(err, f"output directory {blocker / 'run'} is not writable", "choose another")
    assert "train:" not in out  # nothing loaded or tokenized
    assert blocker.read_text() == "not a directory"
    assert not list(tmp_path.rglob("checkpoints"))


@pytest.mark.parametrize("option, value, choices", [
    ("--data.style", "alpacca", "alpaca, phi3, chatml, llama2, template, plain, auto"),
    ("--data.batching", "pad", "padding, packed, concat"),
    ("--data.loss_on", "answers", "all, response"),
])
def test_unknown_choice_lists_the_choices(tmp_path, llama_dir, capsys, option, value, choices):
    data = write_alpaca(tmp_path / "alpaca.json", n=24)
    code, _, err = fails(sft_args(llama_dir, data, tmp_path / "run", option, value), capsys)
    assert code == 1
    assert_one_clear_line(err, f"{option[2:]} {value!r} is unknown", choices)
    assert not (tmp_path / "run").exists()  # found before anything was created


def test_missing_model_and_data_are_one_line(tmp_path, llama_dir, capsys):
    data = write_alpaca(tmp_path / "alpaca.json", n=24)
    code, _, err = fails(sft_args(tmp_path / "no-model", data, tmp_path / "run"), capsys)
    assert code == 1
    assert_one_clear_line(err, str(tmp_path / "no-model"))
    code, _, err = fails(sft_args(llama_dir, tmp_path / "no-data.json", tmp_path / "run2"), capsys)
    assert code == 1
    assert_one_clear_line(err, str(tmp_path / "no-data.json"))


def test_options_that_do_not_parse_exit_2(tmp_path, capsys):
    code, _, err = fails(["sft", "--data.batchingg", "packed"], capsys)
    assert code == 2 and "batchingg" in err
    code, _, err = fails(["sft", "--train.max_steps", "many"], capsys)
    assert code == 2 and "max_steps" in err


def test_posttrain_traceback_shows_the_traceback(tmp_path, llama_dir, monkeypatch):
    data = write_alpaca(tmp_path / "alpaca.json", n=24)
    monkeypatch.setenv("POSTTRAIN_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown"):
        cli.main(sft_args(llama_dir, data, tmp_path / "run", "--data.batching", "pad"))


def test_only_posttrains_own_value_errors_are_shortened():
    from posttrain.prompts import get_style

    with pytest.raises(ValueError) as ours:
        get_style("nope", None)
    assert cli._raised_in_posttrain(ours.value.__traceback__)
    with pytest.raises(ValueError) as theirs:
        int("not a number")  # raised by the interpreter inside this (non-posttrain) frame
    assert not cli._raised_in_posttrain(theirs.value.__traceback__)


# -- posttrain data inspect ----------------------------------------------------------------------

def test_data_inspect_writes_report_and_histogram(tmp_path, gpt2_tokenizer, capsys):
    records = alpaca_records(12)
    records.append(dict(records[0]))  # a duplicate instruction
    records.append({"instruction": "no output here", "input": ""})  # invalid
    records.append({"instruction": "long " * 60, "input": "", "output": "x"})  # over max_length 64
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out_dir = tmp_path / "inspect"
    cli.main(["data", "inspect", str(data), "--out_dir", str(out_dir), "--max_length", "64"])
    printed = capsys.readouterr().out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["records"] == 15 and report["valid_examples"] == 14
    assert report["invalid"] == {"missing field 'output'": 1}
    assert report["over_max_length"] == 1 and report["tokens"]["max"] > 64
    assert report["duplicate_instructions"]["extra_copies"] >= 1
    assert (out_dir / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "15 records" in printed and str(out_dir / "report.json") in printed

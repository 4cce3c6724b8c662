"""Instruction fine-tuning end to end on tiny CPU models: every batching mode lowers the val loss,
the demo writes a complete run directory whose model loads back and answers in the run's prompt
style, samples answer the val prompts, and ChatML on GPT-2 grows the vocabulary and survives a
save/load round trip."""

import io
import json
import math
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from posttrain import cli
from posttrain.data.formats import records_to_messages
from posttrain.data.sources import load_records, split_records
from posttrain.generate import generate_command, resolve_style, saved_style
from posttrain.models.gpt2 import GPT2Config
from posttrain.models.llama import LlamaConfig
from posttrain.models.registry import build_model
from posttrain.prompts import get_style
from posttrain.runlog import read_jsonl
from posttrain.train.loop import TrainConfig
from posttrain.train.sft import DataConfig, SampleConfig, answer, sft
from posttrain.weights import load, save_pretrained

# -- shared helpers (test_cli.py imports these too) ---------------------------------------------

WORDS = ["apple", "river", "stone", "cloud", "garden", "pencil", "window", "candle", "forest", "rocket",
         "planet", "bridge", "castle", "dragon", "guitar", "island", "jacket", "lemon"]
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "open": "closed", "full": "empty"}


def alpaca_records(n: int = 48, seed: int = 0) -> list[dict]:
    """Alpaca-style records with short, exact answers (reverse, uppercase, opposite)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            w = rng.choice(WORDS)
            records.append({"instruction": "Reverse the word.", "input": w, "output": w[::-1]})
        elif kind == 1:
            w = rng.choice(WORDS)
            records.append({"instruction": "Uppercase the word.", "input": w, "output": w.upper()})
        else:
            a = rng.choice(sorted(OPPOSITES))
            records.append({"instruction": f"What is the opposite of {a}?", "input": "", "output": OPPOSITES[a]})
    return records


def write_alpaca(path: Path, n: int = 48, seed: int = 0) -> Path:
    path.write_text(json.dumps(alpaca_records(n, seed), indent=1))
    return path


def save_tiny_llama(tokenizer, out_dir: Path, context: int = 512, seed: int = 0) -> Path:
    """A 2-layer, 64-dim Llama for `tokenizer` (byte-level: alpaca examples are ~200 tokens, so more
    positions than conftest's 128) as a Hugging Face directory."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         rope_theta=10000.0, bos_token_id=None, eos_token_id=tokenizer.eos_id)
    return save_pretrained(build_model(config), tokenizer, out_dir)


def quiet_train(**overrides) -> TrainConfig:
    """A TrainConfig for tests: no progress bar, no TensorBoard."""
    return TrainConfig(**{"progress": False, "tensorboard": False, **overrides})


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Tokenized-data cache in tmp_path, never in ~/.cache."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_llama(tiny_tokenizer, tmp_path_factory.mktemp("sft") / "tiny-llama")


@pytest.fixture(scope="module")
def alpaca_path(tmp_path_factory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("data") / "alpaca.json")


# -- each batching mode learns --------------------------------------------------------------------

MODE_STEPS, MODE_EVAL_EVERY = 30, 10


@pytest.fixture(scope="module")
def mode_runs(tmp_path_factory, llama_dir, alpaca_path) -> dict:
    """One short run per batching mode on the same data (shared by the tests below)."""
    runs = {}
    for mode in ("padding", "packed", "concat"):
        run_dir = tmp_path_factory.mktemp("runs") / mode
        data = DataConfig(path=str(alpaca_path), style="alpaca", batching=mode, batch_size=4, max_length=256,
                          split=(0.75, 0.0, 0.25), cache=False)
        train = quiet_train(lr=3e-3, warmup_steps=0, schedule="constant", max_steps=MODE_STEPS,
                            eval_every=MODE_EVAL_EVERY, log_every=1)
        summary = sft(model=str(llama_dir), data=data, train=train,
                      samples=SampleConfig(prompts=3, max_new_tokens=12), run_dir=str(run_dir))
        runs[mode] = (run_dir, summary)
    return runs


@pytest.mark.parametrize("mode", ["padding", "packed", "concat"])
def test_each_batching_mode_lowers_val_loss(mode_runs, mode):
    run_dir, summary = mode_runs[mode]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in val] == list(range(MODE_EVAL_EVERY, MODE_STEPS + 1, MODE_EVAL_EVERY))
    first, last = val[0][1], val[-1][1]
    assert last < first - 0.1, f"{mode}: val loss went {first:.3f} -> {last:.3f}"
    assert last < 0.5 * math.log(320)  # far below the untrained model's ~ln(vocab)
    assert summary["steps"] == MODE_STEPS and summary["val"]["val_loss"] == pytest.approx(last)
    assert [r["step"] for r in rows] == list(range(1, MODE_STEPS + 1))  # log_every=1: every step logged
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["batching"] == mode and config["task"] == "sft"


def test_val_loss_of_padding_and_concat_agree_for_the_same_model(mode_runs, llama_dir, alpaca_path):
    """Concat packs whole examples with exact document masks: on the same model its val loss must
    equal padding's (packed cuts examples at row ends, so it may differ)."""
    from posttrain.data.batching import BatchLoader
    from posttrain.data.tokenize import prepare_sft_data
    from posttrain.train.loop import evaluate
    from posttrain.train.losses import sft_loss

    net, tokenizer = load(str(mode_runs["padding"][0]))
    data = prepare_sft_data(str(alpaca_path), tokenizer, "alpaca", max_length=256, split=(0.75, 0.0, 0.25),
                            cache=False)
    losses = {mode: evaluate(net, BatchLoader(data.val, mode, 4, 256, tokenizer.pad_id, shuffle=False), sft_loss,
                             torch.device("cpu"))["val_loss"] for mode in ("padding", "concat")}
    assert losses["padding"] == pytest.approx(losses["concat"], rel=1e-5)
    # ... and it is the val loss the padding run logged at its last step
    assert losses["padding"] == pytest.approx(mode_runs["padding"][1]["val"]["val_loss"], rel=1e-5)


def test_samples_answer_the_val_prompts_with_the_final_model(mode_runs, alpaca_path):
    run_dir, _ = mode_runs["padding"]
    samples = read_jsonl(run_dir / "samples.jsonl")
    # the val split: the last quarter of the records, in order
    val_records = split_records(load_records(str(alpaca_path)), (0.75, 0.0, 0.25))["val"]
    val_prompts = [m[0]["content"] for m in records_to_messages(val_records)[0]][:3]
    for step in range(MODE_EVAL_EVERY, MODE_STEPS + 1, MODE_EVAL_EVERY):
        rows = [s for s in samples if s["step"] == step]
        assert [r["prompt"] for r in rows] == val_prompts
        assert all(isinstance(r["response"], str) for r in rows)
    # the last step's samples are what the saved model answers to the same prompts in alpaca style
    net, tokenizer = load(str(run_dir))
    conversations = [m[:-1] for m in records_to_messages(val_records)[0]][:3]
    again = answer(net, tokenizer, get_style("alpaca", tokenizer), conversations, 12)
    final = [s for s in samples if s["step"] == MODE_STEPS]
    assert [a["response"] for a in again] == [s["response"] for s in final]
    assert any(s["response"].strip() for s in final)  # a trained model says something


def test_generate_uses_the_runs_prompt_style(mode_runs, alpaca_path, capsys, tiny_tokenizer):
    """tiny_tokenizer has a ChatML chat template; a run trained on alpaca must still answer through
    alpaca when no --style is given (model/posttrain.json names it)."""
    run_dir, _ = mode_runs["padding"]
    assert json.loads((run_dir / "model" / "posttrain.json").read_text()) == {"prompt_style": "alpaca"}
    assert saved_style(str(run_dir)) == saved_style(str(run_dir / "model")) == "alpaca"
    assert resolve_style(None, tiny_tokenizer, str(run_dir)).name == "alpaca"
    assert resolve_style("chatml", tiny_tokenizer, str(run_dir)).name == "chatml"  # an explicit style wins
    assert resolve_style(None, tiny_tokenizer, "smollm2-135m-instruct") is None  # not a run: the template

    final = [s for s in read_jsonl(run_dir / "samples.jsonl") if s["step"] == MODE_STEPS]
    net, tokenizer = load(str(run_dir))
    capsys.readouterr()
    generate_command(str(run_dir), final[0]["prompt"], max_new_tokens=12, chat=True)
    by_run_style = capsys.readouterr().out
    assert by_run_style == final[0]["response"] + "\n"
    # the same prompt through the tokenizer's template is another prompt (a different answer would be
    # chance, the prompt ids are not)
    messages = [{"role": "user", "content": final[0]["prompt"]}]
    assert get_style("alpaca", tokenizer).render(messages, True)[0] != tokenizer.render_chat(messages, True)[0]


def test_final_model_exports_chats_and_serves_in_the_runs_style(mode_runs, tmp_path, capsys, monkeypatch):
    """model/ of an SFT run is what `export`, `chat` and `serve` take: the same weights, and replies in the
    run's prompt style (alpaca here, although the tokenizer has a ChatML template)."""
    import httpx
    from conftest import running_server

    run_dir, _ = mode_runs["padding"]
    net, tokenizer = load(str(run_dir))
    prompt = "What is the opposite of hot?"
    reply = answer(net, tokenizer, get_style("alpaca", tokenizer), [[{"role": "user", "content": prompt}]], 12)
    reply = reply[0]["response"]
    assert reply.strip()

    cli.main(["export", str(run_dir), str(tmp_path / "exported")])
    exported, _ = load(str(tmp_path / "exported"))
    assert exported.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in net.state_dict().items())

    capsys.readouterr()
    for model in (run_dir, tmp_path / "exported"):  # the export carries the run's style (posttrain.json)
        monkeypatch.setattr("sys.stdin", io.StringIO(prompt + "\n/exit\n"))
        cli.main(["chat", str(model), "--temperature", "0", "--max_new_tokens", "12", "--device", "cpu"])
        assert f"> {reply}\n" in capsys.readouterr().out

    with running_server(run_dir, tmp_path, "--name", "run") as url:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "run", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == reply


# -- the demo through the CLI ---------------------------------------------------------------------

def test_demo_through_the_cli_writes_a_complete_run(tmp_path, llama_dir, capsys):
    run_dir = tmp_path / "demo-run"
    cli.main(["sft", "--model", str(llama_dir), "--train.max_steps", "3", "--train.progress", "false",
              "--samples.max_new_tokens", "8", "--run_dir", str(run_dir)])
    out = capsys.readouterr().out
    assert "exact match before training: " in out and "exact match after training: " in out

    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["exact_match_before"] <= 1.0 and 0.0 <= summary["exact_match_after"] <= 1.0
    assert summary["steps"] == 3
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["path"] == "demo" and config["samples"]["exact_match"] is True
    assert config["model"] == str(llama_dir) and config["train"]["max_steps"] == 3
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 3 and "val_loss" in rows[-1]
    for plot in ("loss_vs_step.png", "loss_vs_tokens.png"):
        assert (run_dir / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert len(samples) == 3 and all(set(s) == {"step", "prompt", "response"} for s in samples)
    heldout = [r.data["instruction"] for r in load_records("demo:heldout")]
    assert all(s["prompt"].split("\n\n")[0] in heldout for s in samples)
    assert json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["step"] == 3
    assert list((run_dir / "tb").iterdir())  # TensorBoard events (on by default)

    # model/ loads back (from the run directory) with the last checkpoint's weights and the run's style
    assert json.loads((run_dir / "model" / "posttrain.json").read_text())["prompt_style"] == "alpaca"
    net, tokenizer = load(str(run_dir))
    last = safetensors.torch.load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    state = net.state_dict()
    assert set(last) <= set(state)
    for key, value in last.items():
        assert torch.equal(state[key], value), key
    capsys.readouterr()
    cli.main(["generate", str(run_dir), samples[0]["prompt"], "--chat", "true", "--max_new_tokens", "8"])
    assert capsys.readouterr().out == samples[0]["response"] + "\n"


def test_max_length_beyond_the_model_context_is_capped(tmp_path, tiny_tokenizer, alpaca_path, capsys):
    """A 128-position model with the default max_length 1024 trains on rows of at most 128 tokens
    instead of indexing past its position table (GPT-2's learned positions would crash)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=320, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tiny_tokenizer.eos_id, eos_token_id=tiny_tokenizer.eos_id)
    model_dir = save_pretrained(build_model(config), tiny_tokenizer, tmp_path / "gpt2-128")
    run_dir = tmp_path / "run"
    sft(model=str(model_dir), data=DataConfig(path=str(alpaca_path), batching="packed", cache=False),
        train=quiet_train(max_steps=2), samples=SampleConfig(prompts=0), run_dir=str(run_dir))
    assert "longer than the model's context; using 128" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["max_length"] == 128
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 2


# -- ChatML on GPT-2: new special tokens, resized embeddings, saved and loaded back -------------------

def test_chatml_on_gpt2_resizes_and_round_trips(tmp_path, gpt2_tokenizer, alpaca_path, capsys):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(gpt2_tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4)
    model_dir = save_pretrained(build_model(config), gpt2_tokenizer, tmp_path / "tiny-gpt2")
    run_dir = tmp_path / "chatml"
    sft(model=str(model_dir),
        data=DataConfig(path=str(alpaca_path), style="chatml", loss_on="response", batching="concat",
                        batch_size=4, max_length=128, split=(0.75, 0.0, 0.25), cache=False),
        train=quiet_train(lr=3e-3, max_steps=4), samples=SampleConfig(prompts=1, max_new_tokens=4),
        run_dir=str(run_dir))
    assert "added special tokens for chatml; embeddings resized to 50304" in capsys.readouterr().out

    net, tokenizer = load(str(run_dir))
    assert net.config.vocab_size == 50304  # 50257 + 2, rounded up to a multiple of 64
    im_start, im_end = tokenizer.token_id("<|im_start|>"), tokenizer.token_id("<|im_end|>")
    assert {im_start, im_end} == {50257, 50258}
    style = resolve_style(None, tokenizer, str(run_dir))
    assert style.name == "chatml" and im_end in style.stop_ids
    prompt = style.render([{"role": "user", "content": "Reverse the word."}], add_generation_prompt=True)[0]
    assert prompt[0] == im_start and len(prompt) < 20  # markers are single tokens, not text
    # the saved model is the last checkpoint, resized embeddings included
    last = safetensors.torch.load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    state = net.state_dict()
    assert state["transformer.wte.weight"].shape == (50304, 64)
    for key, value in last.items():  # tied weights are stored once, under one of their names
        assert torch.equal(state[key], value), key

"""Preference tuning end to end on tiny CPU models: pair data in every record form and its bad forms,
response masks, one-pass log-probs (padding and packed) against the model run on each sequence alone,
the loss function and its metrics against hand computation, cached reference log-probs against
recomputed ones, a tiny model learning its own pairs, the CLI writing metrics, plots and samples, and
the DPO recipes parsing into the command's typed configs."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from posttrain import cli
from posttrain.data.formats import Preference
from posttrain.data.preferences import (PairLoader, collate_pairs, prepare_preference_data, records_to_pairs,
                                        tokenize_pairs)
from posttrain.data.sources import DataError, Record, load_records
from posttrain.models.llama import LlamaConfig
from posttrain.models.registry import PRESETS, build_model
from posttrain.prompts import STYLES, get_style
from posttrain.runlog import read_jsonl
from posttrain.train.dpo import (PreferenceDataConfig, PreferenceLossConfig, PreferenceSampleConfig, ReferenceConfig,
                                 cached_reference_logps, dpo, model_fingerprint, preference_loss_fn, reference_logps,
                                 sequence_logps)
from posttrain.train.loop import TrainConfig, evaluate
from posttrain.weights import load, save_pretrained

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
WORDS = ["apple", "river", "stone", "cloud", "garden", "pencil", "window", "candle", "forest", "rocket", "planet",
         "bridge"]


def preference_records(n: int = 24, seed: int = 0) -> list[dict]:
    """Prompt/chosen/rejected records where the preferred answer is consistently polite."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.choice(WORDS)
        out.append({"prompt": f"Tell me about {w}.", "chosen": f"Gladly! The {w} is lovely.",
                    "rejected": f"No. {w}s are dull."})
    return out


def tiny_llama(tokenizer, seed: int = 0, context: int = 256):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         rope_theta=10000.0, bos_token_id=None, eos_token_id=tokenizer.eos_id)
    return build_model(config)


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"progress": False, "tensorboard": False, "lr": 1e-3, "schedule": "constant",
                          "eval_on_start": True, **overrides})


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_pretrained(tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path_factory.mktemp("dpo") / "tiny")


@pytest.fixture(scope="module")
def prefs_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prefs.json"
    path.write_text(json.dumps(preference_records()))
    return path


@pytest.fixture
def pairs(tiny_tokenizer):
    """Tokenized pairs of varied lengths (ChatML through the tokenizer's template)."""
    style = get_style("template", tiny_tokenizer, "response")
    prefs = [Preference([{"role": "user", "content": f"Q{i}: " + "x" * (3 * i)}],
                        [{"role": "assistant", "content": "yes " * (i + 1)}],
                        [{"role": "assistant", "content": "no" + "!" * (5 - i)}]) for i in range(5)]
    from posttrain.data.preferences import PreferencePairs
    return PreferencePairs(tokenize_pairs(prefs, style, max_length=128), [p.prompt for p in prefs])


# -- data -------------------------------------------------------------------------------------------

def test_record_forms_become_the_same_kind_of_pairs(tiny_tokenizer):
    records = [
        {"instruction": "Add.", "input": "1 1", "output": "2", "chosen": "It is 2, thanks!", "rejected": "2, obviously."},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "What."},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "What."},
        {"prompt": "Same", "chosen": "x", "rejected": "x"},  # no preference signal
    ]
    prefs, where, stats = records_to_pairs([Record(r, "mem.json", i) for i, r in enumerate(records)])
    assert len(prefs) == 3 and stats.identical_pairs == 1 and where == [f"mem.json: record {i}" for i in range(3)]
    assert prefs[0].prompt[0]["instruction"] == "Add." and prefs[0].prompt[0]["input"] == "1 1"
    assert prefs[2].prompt[0] == {"role": "system", "content": "Be kind."} and prefs[2].rejected[0]["content"] == "What."
    # alpaca: the prompt is rendered with the run's style; the response mask is the reply and EOS only
    style = get_style("alpaca", tiny_tokenizer, "response")
    data = tokenize_pairs(prefs[:1], style)
    prompt_ids = style.render(prefs[0].prompt, add_generation_prompt=True)[0]
    for k, reply in ((0, "It is 2, thanks!"), (1, "2, obviously.")):
        ids, mask = data[k]
        assert ids[:len(prompt_ids)].tolist() == prompt_ids and not mask[:len(prompt_ids)].any()
        assert tiny_tokenizer.decode(ids[mask].tolist(), skip_special=False) == reply + "<|im_end|>"
        assert mask[len(prompt_ids):].all()


@pytest.mark.parametrize("name", sorted(STYLES))
def test_every_style_masks_exactly_the_reply(name, tiny_tokenizer):
    pref = Preference([{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                       {"role": "assistant", "content": "earlier answer"}, {"role": "user", "content": "Q2"}],
                      [{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}])
    import copy
    tokenizer = copy.deepcopy(tiny_tokenizer)  # chatml may add tokens (it has them: nothing changes)
    style = get_style(name, tokenizer, "response")
    data = tokenize_pairs([pref], style)
    for k, reply in ((0, "good"), (1, "bad")):
        ids, mask = data[k]
        text = tokenizer.decode(ids[mask].tolist(), skip_special=False)
        assert text.startswith(" " + reply if name == "llama2" else reply), (name, text)
        assert "earlier answer" not in text  # earlier assistant turns belong to the prompt


def test_bad_records_are_errors_naming_the_record_or_counted_skips(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "ok", "chosen": "a", "rejected": "b"}, {"prompt": "no rejected", "chosen": "a"},
            {"prompt": "empty", "chosen": "", "rejected": "b"}, {"prompt": "p " * 80, "chosen": "a", "rejected": "b"},
            {"prompt": "fine", "chosen": "c", "rejected": "d"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl: record 1, line 2: missing field 'rejected'.*skip_invalid"):
        prepare_preference_data(str(path), tiny_tokenizer, "chatml", max_length=64, split=(1.0, 0.0, 0.0), cache=False)
    path.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i != 1))
    with pytest.raises(DataError, match=r"record 1, line 2: empty 'chosen'"):
        prepare_preference_data(str(path), tiny_tokenizer, "chatml", max_length=64, split=(1.0, 0.0, 0.0), cache=False)
    path.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i not in (1, 2)))
    with pytest.raises(DataError, match=r"record 1, line 2: the prompt has \d+ tokens.*max_length 64.*skip_invalid"):
        prepare_preference_data(str(path), tiny_tokenizer, "chatml", max_length=64, split=(1.0, 0.0, 0.0), cache=False)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare_preference_data(str(path), tiny_tokenizer, "chatml", max_length=64, split=(1.0, 0.0, 0.0),
                                   skip_invalid=True, cache=False)
    assert len(data.train) == 2
    assert data.report["train"]["skipped_invalid"] == {"missing field 'rejected'": 1, "empty 'chosen'": 1}
    assert data.report["train"]["skipped_prompt_too_long"] == 1 and data.report["train"]["records"] == 5


def test_overlong_responses_are_truncated_or_dropped_and_counted(tiny_tokenizer):
    style = get_style("chatml", tiny_tokenizer, "response")
    prefs = [Preference([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "y" * 80}],
                        [{"role": "assistant", "content": "n"}]),
             Preference([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "ok"}],
                        [{"role": "assistant", "content": "no"}])]
    cut = tokenize_pairs(prefs, style, max_length=40)
    assert cut.stats == {"pairs": 2, "truncated": 1} and cut.lengths.max() == 40 and cut[0][1][-1]
    dropped = tokenize_pairs(prefs, style, max_length=40, overlong="drop")
    assert dropped.stats == {"pairs": 1, "dropped_overlong": 1} and len(dropped) == 2


def test_real_preference_data_splits_like_the_reference(shared_data_dir, gpt2_tokenizer):
    data = prepare_preference_data(str(shared_data_dir / "instruction-data-with-preference.json"), gpt2_tokenizer,
                                   "alpaca", max_length=1024, cache=False)
    reports = data.report
    assert [reports[s]["records"] for s in ("train", "test", "val")] == [935, 110, 55]
    identical = sum(reports[s].get("dropped_identical", 0) for s in ("train", "test", "val"))
    assert identical == 6  # the data README: 6 pairs have chosen == rejected
    assert len(data.train) + len(data.test) + len(data.val) == 1100 - 6
    assert "truncated" not in reports["train"]  # nothing near 1024 tokens


# -- log-probs in one pass --------------------------------------------------------------------------

def alone_logps(model, ids: np.ndarray, mask: np.ndarray) -> float:
    """log p(response | prompt) of one sequence run by itself: the definition."""
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    logps = torch.log_softmax(model(x)[0, :-1].double(), dim=-1)  # position t predicts token t + 1
    target = torch.as_tensor(ids[1:], dtype=torch.long)
    picked = logps.gather(1, target[:, None])[:, 0]
    return float(picked[torch.as_tensor(mask[1:])].sum().detach())


@pytest.mark.parametrize("mode", ["padding", "packed"])
def test_one_forward_pass_equals_each_sequence_alone(mode, pairs, tiny_tokenizer):
    model = tiny_llama(tiny_tokenizer).eval()
    idx = [4, 0, 2, 3, 1]
    batch = collate_pairs(pairs, idx, tiny_tokenizer.pad_id, mode, row_capacity=128)
    if mode == "packed":
        assert batch["input_ids"].shape[0] < 2 * len(idx)  # pairs share rows
        assert batch["document_ids"] is not None
    with torch.no_grad():
        sums, n = sequence_logps(model, batch)
    for j, i in enumerate(idx):
        for k, (ids, mask) in ((j, pairs.chosen(i)), (len(idx) + j, pairs.rejected(i))):
            assert sums[k].item() == pytest.approx(alone_logps(model, ids, mask), abs=1e-4)
            assert n[k].item() == int(mask[1:].sum())
    assert batch["pair_ids"].tolist() == idx
    # rows rounded up to a multiple (for compiled kernels) hold more pads and the same log-probs
    rounded = collate_pairs(pairs, idx, tiny_tokenizer.pad_id, mode, row_capacity=128, pad_to_multiple_of=16)
    assert rounded["input_ids"].shape[1] % 16 == 0 and rounded["input_ids"].shape[1] >= batch["input_ids"].shape[1]
    with torch.no_grad():
        assert torch.allclose(sequence_logps(model, rounded)[0], sums, atol=1e-4)


def test_loss_function_matches_hand_computation(pairs, tiny_tokenizer):
    policy, reference = tiny_llama(tiny_tokenizer, seed=0).eval(), tiny_llama(tiny_tokenizer, seed=1).eval()
    idx = [0, 1, 2, 3]
    batch = collate_pairs(pairs, idx, tiny_tokenizer.pad_id)
    pc = [alone_logps(policy, *pairs.chosen(i)) for i in idx]
    pr = [alone_logps(policy, *pairs.rejected(i)) for i in idx]
    rc = [alone_logps(reference, *pairs.chosen(i)) for i in idx]
    rr = [alone_logps(reference, *pairs.rejected(i)) for i in idx]
    beta = 0.1
    for average in (False, True):
        nc = [int(pairs.chosen(i)[1][1:].sum()) if average else 1 for i in idx]
        nr = [int(pairs.rejected(i)[1][1:].sum()) if average else 1 for i in idx]
        h = [(a / x - b / y) - (c / x - d / y) for a, b, c, d, x, y in zip(pc, pr, rc, rr, nc, nr)]
        expected = sum(math.log1p(math.exp(-beta * v)) for v in h)
        chosen_r = [beta * (a - c) / x for a, c, x in zip(pc, rc, nc)]
        rejected_r = [beta * (b - d) / y for b, d, y in zip(pr, rr, nr)]
        loss_fn = preference_loss_fn(PreferenceLossConfig(beta=beta, average_logps=average), reference)
        with torch.no_grad():
            loss, units, metrics = loss_fn(policy, batch)
        assert units == 4 and loss.item() == pytest.approx(expected, rel=1e-4)
        assert metrics["rewards/chosen"].item() == pytest.approx(sum(chosen_r), abs=1e-4)
        assert metrics["rewards/rejected"].item() == pytest.approx(sum(rejected_r), abs=1e-4)
        assert metrics["rewards/margins"].item() == pytest.approx(sum(chosen_r) - sum(rejected_r), abs=1e-4)
        assert metrics["rewards/accuracies"].item() == sum(c > r for c, r in zip(chosen_r, rejected_r))
        assert metrics["logps/chosen"].item() == pytest.approx(sum(a / x for a, x in zip(pc, nc)), rel=1e-4)
        assert metrics["logps/rejected"].item() == pytest.approx(sum(b / y for b, y in zip(pr, nr)), rel=1e-4)
    assert loss_fn.count(batch) == 4  # the loop normalises by pairs
    # average_logps=None: the loss's own choice (IPO averages, DPO sums)
    with torch.no_grad():
        def loss_of(**kw):
            return preference_loss_fn(PreferenceLossConfig(**kw), reference)(policy, batch)[0].item()
        assert loss_of(type="ipo") == loss_of(type="ipo", average_logps=True) != loss_of(type="ipo", average_logps=False)
        assert loss_of(type="sigmoid") == loss_of(type="sigmoid", average_logps=False)


def test_cached_reference_logps_equal_recomputed_ones(pairs, tiny_tokenizer, tmp_path):
    model = tiny_llama(tiny_tokenizer)
    loader = PairLoader(pairs, "padding", batch_size=2, max_length=128, pad_id=tiny_tokenizer.pad_id, shuffle=True)
    device = torch.device("cpu")
    first, path, hit = cached_reference_logps(model, loader, "template", 128, device, cache=tmp_path)
    assert path.is_file() and not hit and first.shape == (len(pairs), 2)
    # recomputed another way: packed rows, one batch, and each sequence alone
    packed = PairLoader(pairs, "packed", batch_size=5, max_length=128, pad_id=tiny_tokenizer.pad_id, shuffle=False)
    again = reference_logps(model, packed.epoch(0), len(pairs))
    assert torch.allclose(first, again, atol=1e-4)
    model.eval()
    for i in range(len(pairs)):
        assert first[i, 0].item() == pytest.approx(alone_logps(model, *pairs.chosen(i)), abs=1e-4)
        assert first[i, 1].item() == pytest.approx(alone_logps(model, *pairs.rejected(i)), abs=1e-4)
    # the second time they come from disk, bit for bit
    cached, path2, hit2 = cached_reference_logps(model, loader, "template", 128, device, cache=tmp_path)
    assert hit2 and path2 == path and torch.equal(cached, first)
    # other weights, another style name or max length: other entries
    fingerprint = model_fingerprint(model)
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    assert model_fingerprint(model) != fingerprint
    _, path3, hit3 = cached_reference_logps(model, loader, "template", 128, device, cache=tmp_path)
    _, path4, _ = cached_reference_logps(model, loader, "chatml", 128, device, cache=tmp_path)
    _, path5, _ = cached_reference_logps(model, loader, "template", 64, device, cache=tmp_path)
    from posttrain.data.preferences import PreferencePairs
    fewer = PreferencePairs(tokenize_pairs([Preference([{"role": "user", "content": "Q"}],
                                                       [{"role": "assistant", "content": "yes"}],
                                                       [{"role": "assistant", "content": "no"}])],
                                           get_style("template", tiny_tokenizer, "response"), max_length=128))
    other_data = PairLoader(fewer, "padding", batch_size=2, max_length=128, pad_id=tiny_tokenizer.pad_id)
    other, path6, hit6 = cached_reference_logps(model, other_data, "template", 128, device, cache=tmp_path)
    assert not hit3 and not hit6 and other.shape == (1, 2) and len({path, path3, path4, path5, path6}) == 5
    # batches carry the cached values; the loss then needs no reference model
    loader.reference_logps = first
    batch = next(loader.epoch(0))
    assert torch.equal(batch["reference_logps"], first[batch["pair_ids"]])


def test_memory_reference_equals_cached_and_starts_at_log_2(pairs, tiny_tokenizer):
    model = tiny_llama(tiny_tokenizer)
    loader = PairLoader(pairs, "padding", batch_size=3, max_length=128, pad_id=tiny_tokenizer.pad_id, shuffle=False)
    config = PreferenceLossConfig()
    in_memory = evaluate(model, loader, preference_loss_fn(config, tiny_llama(tiny_tokenizer)), torch.device("cpu"))
    loader.reference_logps = reference_logps(model, loader.epoch(0), len(pairs))
    cached = evaluate(model, loader, preference_loss_fn(config), torch.device("cpu"))
    assert in_memory["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert cached == pytest.approx(in_memory, abs=1e-5)
    # and any callable works as the reference (the hook LoRA uses with adapters disabled)
    ref_model = tiny_llama(tiny_tokenizer)
    by_callable = evaluate(model, PairLoader(pairs, "padding", 3, 128, tiny_tokenizer.pad_id, shuffle=False),
                           preference_loss_fn(config, lambda batch: sequence_logps(ref_model, batch)[0]),
                           torch.device("cpu"))
    assert by_callable == pytest.approx(in_memory, abs=1e-5)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss_fn(config)(model, next(PairLoader(pairs, "padding", 3, 128, 0).epoch(0)))


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "simpo", "orpo"])
def test_every_loss_trains(loss_type, pairs, tiny_tokenizer):
    """A few AdamW steps through the loop's forward_backward: the loss falls and the margin grows."""
    from posttrain.train.loop import forward_backward

    model = tiny_llama(tiny_tokenizer)
    loader = PairLoader(pairs, "packed", batch_size=5, max_length=128, pad_id=tiny_tokenizer.pad_id, shuffle=False)
    config = PreferenceLossConfig(type=loss_type, beta=2.0 if loss_type == "simpo" else 0.1)
    if loss_type in ("ipo", "hinge"):
        loader.reference_logps = reference_logps(model, loader.epoch(0), len(pairs))
    loss_fn = preference_loss_fn(config)
    batch = next(loader.epoch(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(6):
        loss, units, metrics = forward_backward(model, [batch], loss_fn, 5, torch.device("cpu"))
        optimizer.step()
        optimizer.zero_grad()
        history.append((loss.item(), metrics["rewards/margins"].item() / units))
    assert history[-1][0] < history[0][0] and history[-1][1] > history[0][1], history
    if loss_type == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(metrics)


# -- end to end ---------------------------------------------------------------------------------------

def test_a_tiny_model_learns_its_own_pairs(model_dir, prefs_path, tmp_path):
    run_dir = tmp_path / "learn"
    summary = dpo(str(model_dir), PreferenceDataConfig(path=str(prefs_path), val_path=str(prefs_path), batch_size=4,
                                                      max_length=128, cache=False),
                  PreferenceLossConfig(type="sigmoid", beta=0.1), ReferenceConfig(mode="cached"),
                  quiet(max_steps=12), PreferenceSampleConfig(prompts=0), run_dir=str(run_dir))
    val = summary["val"]
    assert summary["val_before"]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["val_before"]["val_rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert val["val_rewards/accuracies"] > 0.9 and val["val_rewards/margins"] > 0.5 and val["val_loss"] < 0.4


def test_a_separate_reference_model(model_dir, prefs_path, tmp_path, tiny_tokenizer):
    other = save_pretrained(tiny_llama(tiny_tokenizer, seed=3), tiny_tokenizer, tmp_path / "other")
    summary = dpo(str(model_dir), PreferenceDataConfig(path=str(prefs_path), split=(0.75, 0.0, 0.25), batch_size=4,
                                                      max_length=128),
                  reference=ReferenceConfig(mode="cached", model=str(other)), train=quiet(max_steps=1),
                  samples=PreferenceSampleConfig(prompts=0), run_dir=str(tmp_path / "run"))
    assert summary["reference"]["model"] == str(other) and summary["reference"]["val_cache_hit"] is False
    assert Path(summary["reference"]["train_cache"]).is_file()  # in POSTTRAIN_CACHE (this test's tmp_path)
    # the policy starts away from this reference: the step-0 loss is not log 2
    assert abs(summary["val_before"]["val_loss"] - math.log(2)) > 1e-3


def test_cli_smoke_run_writes_metrics_plots_and_samples(model_dir, prefs_path, tmp_path, capsys):
    run_dir = tmp_path / "cli-run"
    cli.main(["dpo", "--model", str(model_dir), "--data.path", str(prefs_path), "--data.split", "[0.75, 0.0, 0.25]",
              "--data.batching", "packed", "--data.batch_size", "4", "--data.max_length", "128",
              "--reference.mode", "memory", "--train.lr", "1e-3", "--train.max_steps", "4", "--train.eval_every", "2",
              "--train.progress", "false", "--samples.prompts", "2", "--samples.max_new_tokens", "6",
              "--run_dir", str(run_dir)])
    out = capsys.readouterr().out
    assert "val_rewards/margins" in out and "before" in out
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    trl = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
    assert {"loss", *trl} <= set(rows[-1]) and {"val_loss", *(f"val_{k}" for k in trl)} <= set(rows[-1])
    assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    for plot in ("loss_vs_step.png", "margins_vs_step.png", "accuracies_vs_step.png"):
        assert (run_dir / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4]
    assert samples[0]["prompt"] == load_records(str(prefs_path))[18].data["prompt"]  # the first val pair
    assert samples[0]["chosen"] == load_records(str(prefs_path))[18].data["chosen"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["task"] == "dpo" and config["reference"]["mode"] == "memory" and config["data"]["style"] == "template"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_before"]["val_loss"] == rows[0]["val_loss"]
    net, _ = load(str(run_dir))  # the final model loads back, with the run's prompt style beside it
    assert json.loads((run_dir / "model" / "posttrain.json").read_text()) == {"prompt_style": "template"}
    with pytest.raises(SystemExit) as e:  # a missing data path is a one-line error before any loading
        cli.main(["dpo", "--model", str(model_dir), "--run_dir", str(tmp_path / "x")])
    assert e.value.code == 1 and "data.path is required" in capsys.readouterr().err


DPO_RECIPES = sorted(RECIPES_DIR.glob("**/dpo-*.yaml"))


@pytest.mark.parametrize("path", DPO_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dpo_recipes_parse_into_the_commands_configs(path):
    parser = cli.parser()
    raw = yaml.safe_load(path.read_text())
    cfg = parser.instantiate(parser.parse_args(["dpo", "--config", str(path)])).dpo
    sections = {"data": PreferenceDataConfig, "loss": PreferenceLossConfig, "reference": ReferenceConfig,
                "train": TrainConfig, "samples": PreferenceSampleConfig}
    for key, value in raw.items():
        if key in sections:
            assert isinstance(getattr(cfg, key), sections[key])
            for field, v in value.items():
                got = getattr(getattr(cfg, key), field)
                assert (list(got) if isinstance(got, tuple) else got) == v, f"{key}.{field}"
        else:
            assert getattr(cfg, key) == value, key
    assert path.parent.name in PRESETS
    # the reference run: sigmoid DPO, beta 0.1, lr 5e-6, weight decay 0.01, 1 epoch, batch 8, mean log-probs
    assert (cfg.loss.type, cfg.loss.beta, cfg.loss.average_logps) == ("sigmoid", 0.1, True)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.epochs, cfg.data.batch_size) == (5e-6, 0.01, 1, 8)
    assert tuple(cfg.data.split) == (0.85, 0.10, 0.05) and cfg.data.shuffle is False


def test_there_are_dpo_recipes():
    assert {p.parent.name for p in DPO_RECIPES} >= {"gpt2-medium", "smollm2-135m-instruct"}

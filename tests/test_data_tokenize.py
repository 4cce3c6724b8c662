"""Tokenizing (over-long handling, text blocks, on-disk cache), mixing, the SFT data pipeline,
and `posttrain data inspect`."""

import json

import numpy as np
import pytest

from posttrain.data.batching import BatchLoader
from posttrain.data.inspect import inspect_command, load_tokenizer_offline
from posttrain.data.sources import DataError
from posttrain.data.tokenize import (TokenizedDataset, mix_datasets, prepare_sft_data, text_blocks,
                                     tokenize_messages, tokenize_messages_cached)
from posttrain.prompts import get_style

EOS = 50256


@pytest.fixture
def tok(gpt2_tokenizer):
    return gpt2_tokenizer  # session-wide: only styles that add no tokens are used with it


def chat(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def alpaca_rows(n):
    return [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else f"{i} {i}", "output": str(2 * i)}
            for i in range(n)]


def test_overlong_truncate_drop_keep_are_counted(tok):
    style = get_style("plain", tok, "response")
    examples = [chat("a b c d e f g h", "yes"), chat("hi", "ok"), chat("x " * 30, "no")]
    lengths = [len(style.render(m)[0]) for m in examples]
    limit = lengths[0] - 1  # example 0 is cut inside its reply; example 2 loses its reply entirely
    truncated = tokenize_messages(examples, style, limit, "truncate")
    assert truncated.lengths.tolist() == [limit, lengths[1]]
    assert truncated.stats == {"examples": 2, "truncated": 2, "dropped_no_targets": 1}
    dropped = tokenize_messages(examples, style, limit, "drop")
    assert dropped.lengths.tolist() == [lengths[1]] and dropped.stats["dropped_overlong"] == 2
    kept = tokenize_messages(examples, style, limit, "keep")
    assert kept.lengths.tolist() == lengths and kept.stats["overlong_kept"] == 2
    with pytest.raises(DataError, match="no examples left"):
        tokenize_messages(examples[:1], style, 3, "drop")


def test_text_blocks_end_with_eos(tok):
    text = "The quick brown fox jumps over the lazy dog. " * 10
    blocks = text_blocks([text, "short"], tok, block_size=16)
    ids = tok.encode(text)
    n_text_blocks = -(-len(ids) // 15)
    assert len(blocks) == n_text_blocks + 1
    assert all(blocks[i][0][-1] == EOS and len(blocks[i][0]) <= 16 for i in range(len(blocks)))
    assert all(len(blocks[i][0]) == 16 for i in range(n_text_blocks - 1))
    rejoined = [t for i in range(n_text_blocks) for t in blocks[i][0][:-1].tolist()]
    assert rejoined == ids
    assert blocks[len(blocks) - 1][0].tolist() == tok.encode("short") + [EOS]
    assert blocks.trainable.all()


def test_cache_hits_and_misses(tok, tmp_path):
    examples = [chat("What is 2+2?", "4"), chat("Capital of France?", "Paris")]
    style = get_style("alpaca", tok, "response")
    first = tokenize_messages_cached(examples, style, 64, cache=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    mtime = files[0].stat().st_mtime_ns
    second = tokenize_messages_cached(examples, style, 64, cache=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime and list(tmp_path.iterdir()) == files  # read, not rewritten
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.trainable, second.trainable)
    assert second.stats == first.stats
    # any change of data, style, loss mode or max length is a new entry
    tokenize_messages_cached(examples[:1], style, 64, cache=tmp_path)
    tokenize_messages_cached(examples, get_style("alpaca", tok, "all"), 64, cache=tmp_path)
    tokenize_messages_cached(examples, style, 200, cache=tmp_path)
    tokenize_messages_cached(examples, get_style("phi3", tok, "response"), 64, cache=tmp_path)
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 5 and all(p.suffix == ".safetensors" for p in entries)  # no temp files left
    # a different tokenizer (one more token) is a new entry too
    other = load_tokenizer_offline("gpt2")  # a fresh copy: the fixture's is shared
    other.add_special_tokens(["<|extra|>"])
    tokenize_messages_cached(examples, get_style("alpaca", other, "response"), 64, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 6


def test_unwritable_cache_warns_and_tokenizes_anyway(tok, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # the cache folder cannot be created under a file
    examples = [chat("What is 2+2?", "4")]
    style = get_style("alpaca", tok, "response")
    with pytest.warns(UserWarning, match="could not cache tokenized data .*continuing without the cache"):
        ds = tokenize_messages_cached(examples, style, 64, cache=blocker / "cache")
    assert ds.ids.tolist() == style.render(examples[0])[0] and blocker.read_text() == "x"


def test_dataset_save_load_roundtrip(tmp_path):
    ds = TokenizedDataset.from_examples([([1, 2, 3], [False, True, True]), ([4], [True])], {"examples": 2})
    ds.save(tmp_path / "d.safetensors")
    back = TokenizedDataset.load(tmp_path / "d.safetensors")
    assert back.ids.tolist() == [1, 2, 3, 4] and back.trainable.tolist() == [False, True, True, True]
    assert back.offsets.tolist() == [0, 3, 4] and back.stats == {"examples": 2}
    assert back[0][0].tolist() == [1, 2, 3] and back.num_targets() == 2


def test_mix_ratio():
    a = TokenizedDataset.from_examples([([1, i], [True, True]) for i in range(90)])
    b = TokenizedDataset.from_examples([([2, i], [True, True]) for i in range(4)])
    mixed = mix_datasets(a, b, ratio=0.1, seed=0)
    firsts = [int(mixed[i][0][0]) for i in range(len(mixed))]
    assert firsts.count(1) == 90 and firsts.count(2) == 10  # 10 of 100 are replay
    replay = sorted(int(mixed[i][0][1]) for i in range(len(mixed)) if firsts[i] == 2)
    # drawn without replacement while they last, then cycled: every replay example 2 or 3 times
    assert sorted(replay.count(v) for v in range(4)) == [2, 2, 3, 3]
    assert mixed.stats["mixed_in"] == 10
    with pytest.raises(ValueError, match="mix ratio"):
        mix_datasets(a, b, ratio=1.0)


# -- the pipeline ------------------------------------------------------------------------------

def test_prepare_sft_data_splits_and_batches(tok, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(alpaca_rows(40)))
    data = prepare_sft_data(str(tmp_path / "d.json"), tok, style="alpaca", loss_on="response", max_length=128,
                            cache=tmp_path / "cache")
    assert (len(data.train), len(data.test), len(data.val)) == (34, 4, 2)
    ids, flags = data.train[0]
    assert tok.decode(ids, skip_special=False).endswith("### Response:\n0<|endoftext|>")
    assert tok.decode(ids[flags], skip_special=False) == "0<|endoftext|>"
    assert "train: 34 examples" in data.summary()
    assert data.val_messages[0][-1] == {"role": "assistant", "content": "76"}  # record 38 of 40
    assert len(data.test_messages) == 4
    loader = BatchLoader(data.train, mode="packed", batch_size=2, max_length=128, pad_id=tok.pad_id)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 128) and batch["document_ids"] is not None


def test_prepare_sft_data_separate_files_skip_invalid_and_mix(tok, tmp_path):
    rows = alpaca_rows(10) + [{"instruction": "broken"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text(json.dumps(alpaca_rows(3)[0]) + "\n")
    (tmp_path / "book.txt").write_text("Some pre-training text. " * 40)
    with pytest.raises(DataError, match=r"train split: .*train\.jsonl: record 10, line 11: missing field 'output'"):
        prepare_sft_data(str(tmp_path / "train.jsonl"), tok, val_data=str(tmp_path / "val.jsonl"), cache=None)
    data = prepare_sft_data(str(tmp_path / "train.jsonl"), tok, val_data=str(tmp_path / "val.jsonl"),
                            skip_invalid=True, max_length=64, mix_data=str(tmp_path / "book.txt"), mix_ratio=0.5,
                            cache=None)
    assert data.report["train"]["skipped_invalid"] == {"missing field 'output'": 1}
    assert len(data.val) == 1 and data.test is None
    assert len(data.train) == 20 and data.report["train"]["mixed_in"] == 10
    assert data.report["mix"]["examples"] >= 3  # the text became several EOS-ended blocks


def test_prepare_sft_data_plain_text_is_split_after_blocking(tok, tmp_path):
    (tmp_path / "book.txt").write_text("A long story about tokens and blocks. " * 200)
    data = prepare_sft_data(str(tmp_path / "book.txt"), tok, max_length=32, cache=None)
    n = len(data.train) + len(data.test) + len(data.val)
    assert n == data.report["all"]["examples"] and len(data.train) == int(n * 0.85)
    assert all(data.train[i][0][-1] == EOS for i in range(len(data.train)))


def test_prepare_demo_and_nothing_left(tok, tmp_path):
    data = prepare_sft_data("demo", tok, max_length=128, cache=None)
    assert len(data.train) == 600 and len(data.val) == 80 and data.test is None  # the demo's own held-out set
    (tmp_path / "empty.jsonl").write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match="no instruction examples left"):
        prepare_sft_data(str(tmp_path / "empty.jsonl"), tok, split=(1.0, 0.0, 0.0), skip_invalid=True, cache=None)


def test_real_data_reference_split(tok, tmp_path, shared_data_dir):
    data = prepare_sft_data(str(shared_data_dir / "instruction-data.json"), tok, max_length=1024, cache=tmp_path)
    assert (len(data.train), len(data.test), len(data.val)) == (935, 110, 55)
    first = json.loads((shared_data_dir / "instruction-data.json").read_text())[0]
    assert tok.decode(data.train[0][0], skip_special=False).endswith(first["output"] + "<|endoftext|>")


# -- inspect -----------------------------------------------------------------------------------

def test_inspect_command(tok, tmp_path, capsys):
    rows = alpaca_rows(6) + [alpaca_rows(1)[0], {"instruction": "no output"}, {"instruction": "x", "output": ""}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    report = inspect_command(str(tmp_path / "d.json"), tokenizer="gpt2", style="alpaca", max_length=50,
                             out_dir=str(tmp_path / "out"))
    assert report["records"] == 9 and report["valid_examples"] == 7
    assert report["invalid"] == {"missing field 'output'": 1, "empty 'output'": 1}
    assert report["duplicate_instructions"]["distinct"] == 1 and report["duplicate_instructions"]["extra_copies"] == 1
    assert report["empty_fields"] == {"input": 3, "output": 1}
    lengths = [len(get_style("alpaca", tok).render(m)[0]) for m in
               [[{"role": "user", "content": r["instruction"], "instruction": r["instruction"], "input": r["input"]},
                 {"role": "assistant", "content": r["output"]}] for r in rows[:7]]]
    assert report["tokens"]["max"] == max(lengths) and report["over_max_length"] == sum(n > 50 for n in lengths)
    assert (tmp_path / "out" / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["records"] == 9
    printed = capsys.readouterr().out
    assert "9 records" in printed and "duplicate instructions: 1 repeated" in printed

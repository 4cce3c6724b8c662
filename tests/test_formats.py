"""Formats: records -> messages / preference triples / texts; errors name the record."""

import json

import pytest

from posttrain.data.formats import (detect_format, records_to_messages, records_to_preferences,
                                    records_to_texts)
from posttrain.data.sources import DataError, Record, load_records


def recs(*rows, source="data.jsonl"):
    return [Record(r, source, i, i + 1) for i, r in enumerate(rows)]


def test_alpaca_keeps_its_fields():
    (a, b), stats = records_to_messages(recs({"instruction": "Reverse.", "input": "abc", "output": "cba"},
                                             {"instruction": "Say hi.", "output": "hi"}))
    assert a == [{"role": "user", "content": "Reverse.\n\nabc", "instruction": "Reverse.", "input": "abc"},
                 {"role": "assistant", "content": "cba"}]
    assert b[0]["content"] == "Say hi." and b[0]["input"] == ""  # missing input = empty input
    assert stats.records == 2 and stats.examples == 2 and not stats.skipped


def test_chat_sharegpt_and_prompt_completion():
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "Bye"}]}
    share = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    pc = {"prompt": "2+2=", "completion": "4"}
    (m1, m2, m3), _ = records_to_messages(recs(chat, share, pc))
    assert m1 == chat["messages"]
    assert m2 == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert m3 == [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    assert [detect_format(r) for r in (chat, share, pc, {"text": "x"})] == \
        ["chat", "chat", "prompt_completion", "text"]


@pytest.mark.parametrize("row, message", [
    ({"instruction": "x"}, r"data\.jsonl: record 1, line 2: missing field 'output'"),
    ({"instruction": "x", "output": 3}, r"record 1, line 2: field 'output' is not a string: got int"),
    ({"instruction": "x", "output": "  "}, r"record 1, line 2: empty 'output'"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, r"record 1.*field 'input' is not a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"record 1.*no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"record 1.*unknown role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     r"record 1.*system message after the first"),
    ({"messages": "hello"}, r"record 1.*not a non-empty list of messages"),
    ({"foo": "bar"}, r"record 1.*unknown record format"),
])
def test_invalid_records_name_the_record(row, message):
    good = {"instruction": "a", "output": "b"}
    with pytest.raises(DataError, match=message):
        records_to_messages(recs(good, row))


def test_skip_invalid_counts_and_nothing_left_is_an_error():
    rows = recs({"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": "c", "output": ""},
                {"instruction": "d"})
    examples, stats = records_to_messages(rows, skip_invalid=True)
    assert len(examples) == 1 and stats.records == 4
    assert stats.skipped == {"missing field 'output'": 2, "empty 'output'": 1}
    assert "skipped 3 invalid" in stats.summary()
    with pytest.raises(DataError, match="no instruction examples left .*skipped 2 invalid"):
        records_to_messages(rows[1:2] + rows[3:], skip_invalid=True)


def test_preference_triples_from_three_shapes():
    rows = recs({"instruction": "Greet.", "input": "", "output": "Hi", "chosen": "Hello!", "rejected": "What."},
                {"prompt": "Greet.", "chosen": "Hello!", "rejected": "Go away."},
                {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Greet."}],
                 "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "No."},
                {"prompt": "Same.", "chosen": "x", "rejected": "x"})
    pairs, stats = records_to_preferences(rows)
    assert stats.identical_pairs == 1 and stats.examples == 3 and "chosen == rejected" in stats.summary()
    assert pairs[0].prompt[0]["instruction"] == "Greet." and pairs[0].chosen == [
        {"role": "assistant", "content": "Hello!"}]
    assert pairs[1].prompt == [{"role": "user", "content": "Greet."}]
    assert pairs[1].rejected == [{"role": "assistant", "content": "Go away."}]
    assert pairs[2].prompt[0]["role"] == "system" and pairs[2].rejected[0]["content"] == "No."


def test_invalid_preference_records():
    with pytest.raises(DataError, match="record 0.*prompt does not end with a user message"):
        records_to_preferences(recs({"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}],
                                     "chosen": "c", "rejected": "r"}))
    with pytest.raises(DataError, match="record 0.*field 'rejected' is not a string"):
        records_to_preferences(recs({"prompt": "p", "chosen": "c", "rejected": 1}))
    with pytest.raises(DataError, match="no preference pairs left"):
        records_to_preferences(recs({"prompt": "p", "chosen": "c", "rejected": "c"}))


def test_sft_on_preference_data_uses_output_or_chosen():
    (alpaca, pc), _ = records_to_messages(recs(
        {"instruction": "Greet.", "output": "Hi", "chosen": "Hello!", "rejected": "What."},
        {"prompt": "Greet.", "chosen": "Hello!", "rejected": "What."}))
    assert alpaca[-1]["content"] == "Hi" and pc[-1]["content"] == "Hello!"


def test_texts(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    texts, stats = records_to_texts(load_records(tmp_path / "t.jsonl"))
    assert texts == ["one", "two"] and stats.examples == 2
    with pytest.raises(DataError, match="continued pre-training"):
        records_to_messages(load_records(tmp_path / "t.jsonl"))


def test_real_preference_data_drops_the_six_identical_pairs(shared_data_dir):
    path = shared_data_dir / "instruction-data-with-preference.json"
    pairs, stats = records_to_preferences(load_records(path))
    assert stats.records == 1100 and stats.identical_pairs == 6 and len(pairs) == 1094

"""The generated demo dataset: deterministic, correct answers, disjoint splits; exact_match."""

import re

import pytest

from posttrain.data.demo import ANTONYMS, PLURALS, POSITIVE, TASKS, UNITS, demo_dataset, exact_match
from posttrain.data.formats import records_to_messages
from posttrain.data.sources import load_records


def test_sizes_determinism_and_disjoint_splits():
    a, b, c = demo_dataset(seed=0), demo_dataset(seed=0), demo_dataset(seed=1)
    assert a == b and a != c
    assert len(a["train"]) == 600 and len(a["heldout"]) == 80
    keys = lambda split: {(r["instruction"], r["input"]) for r in split}  # noqa: E731
    assert len(keys(a["train"])) == 600 and len(keys(a["heldout"])) == 80  # no duplicates
    assert not keys(a["train"]) & keys(a["heldout"])
    assert {r["task"] for r in a["heldout"]} == set(TASKS) == {r["task"] for r in a["train"]}
    assert sum(bool(r["input"]) for r in a["train"]) > 100  # both alpaca layouts occur
    assert len(demo_dataset(n_train=1000, n_heldout=100)["train"]) == 1000


def check(record) -> bool:
    """Recompute the answer of a record from its question."""
    task, q, x, out = record["task"], record["instruction"], record["input"], record["output"]
    nums = [int(n) for n in re.findall(r"\d+", q + " " + x)]
    if task == "arithmetic":
        a, b = nums
        return int(out) == (a * b if "times" in q else a - b if "minus" in q else a + b)
    if task == "units":
        src, dst, factor = next(u for u in UNITS if f" {u[0]} to {u[1]}" in q)
        return out == f"{nums[0] * factor} {dst}"
    if task == "parity":
        return out == ("even" if nums[0] % 2 == 0 else "odd")
    if task == "sentiment":
        return out == ("positive" if x in POSITIVE else "negative")
    if task == "compare":
        return int(out) == (max(nums) if "larger" in q else min(nums))
    if task == "reverse":
        return out == x[::-1]
    if task == "uppercase":
        return out == re.search(r"'(\w+)'", q).group(1).upper()
    if task == "plural":
        return out == PLURALS[re.search(r"'(\w+)'", q).group(1)]
    if task == "antonym":
        return out == ANTONYMS[x]
    raise AssertionError(task)


def test_every_answer_is_right_and_short():
    data = demo_dataset(seed=3)
    for record in data["train"] + data["heldout"]:
        assert check(record), record
        assert len(record["output"]) <= 20 and len(record["output"].split()) <= 3
    examples, stats = records_to_messages(load_records("demo"))
    assert stats.examples == 600 and examples[0][-1]["role"] == "assistant"


@pytest.mark.parametrize("prediction, reference, expected", [
    ("  Elppa. ", "elppa", True),
    ("POSITIVE", "positive", True),
    ("3000  meters!", "3000 meters", True),
    ("'cats'", "cats", True),
    ("42\n", "42", True),
    ("-5", "5", False),
    ("3.5", "35", False),
    ("43", "42", False),
    ("the answer is 42", "42", False),
    ("", "42", False),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected

"""Automatic metrics against hand-computed values: exact match, containment, ROUGE-L, lengths,
the never-stopped rate, and the loss/perplexity of reference answers on a tiny model."""

import json
import math

import pytest
import torch

from posttrain.eval.metrics import (contains, lcs_length, loss_metrics, read_responses, rouge_l, rouge_words,
                                    text_metrics)
from posttrain.prompts import get_style


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (CLRS)
    assert lcs_length([], [1, 2]) == 0
    # prediction "the cat sat on the mat", reference "the cat is on the mat": LCS = the cat on the mat = 5
    # P = 5/6, R = 5/6 -> F = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # "a b c" vs "a x y z c": LCS 2, P = 2/3, R = 2/5, F = 2PR/(P+R) = (8/15)/(16/15) = 0.5
    assert rouge_l("a b c", "a x y z c") == pytest.approx(0.5)
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("no overlap", "different words") == 0.0
    assert rouge_words("Don't STOP-now, 3.5!") == ["don", "t", "stop", "now", "3", "5"]


def test_rouge_l_matches_google_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the fox"),
             ("Paris is the capital of France.", "The capital of France is Paris."),
             ("42", "The answer is 42"), ("x y z", "z y x")]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)


def test_contains_is_word_bounded_and_normalised():
    assert contains("The capital of France is Paris.", "paris")
    assert contains("Answer: 3.5 kg", "3.5 kg")
    assert not contains("Parisian food", "Paris")  # a word, not a substring
    assert not contains("", "x")


def test_text_metrics_hand_computed():
    rows = [
        {"response": "Paris.", "reference": "paris", "completion_tokens": 3, "finish_reason": "stop"},
        {"response": "It is Paris", "reference": "Paris", "completion_tokens": 5, "finish_reason": "stop"},
        {"response": "the cat sat on the mat", "reference": "the cat is on the mat", "completion_tokens": 10,
         "finish_reason": "length"},
        {"response": "", "reference": "yes", "completion_tokens": 1, "finish_reason": "stop"},
    ]
    m = text_metrics(rows)
    assert m["n"] == 4
    assert m["exact_match"] == pytest.approx(1 / 4)
    assert m["contains"] == pytest.approx(2 / 4)
    # ROUGE-L F: 1, 2*(1/3)*1/(1/3+1) = 0.5, 5/6, 0
    assert m["rouge_l"] == pytest.approx((1 + 0.5 + 5 / 6 + 0) / 4)
    assert m["response_tokens"] == pytest.approx((3 + 5 + 10 + 1) / 4)
    assert m["response_words"] == pytest.approx((1 + 3 + 6 + 0) / 4)
    assert m["no_stop_rate"] == pytest.approx(1 / 4)


def test_loss_metrics_equal_a_hand_computed_cross_entropy(tiny_tokenizer, tiny_llama):
    style = get_style("chatml", tiny_tokenizer, loss_on="response")
    conversations = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                     [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]]
    got = loss_metrics(tiny_llama, style, conversations, batch_size=2)
    total, count = 0.0, 0
    for c in conversations:  # one at a time, no padding: -log p of each response token
        ids, trainable = style.render(c)
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama(torch.tensor([ids])).double()[0], dim=-1)
        for t in range(1, len(ids)):
            if trainable[t]:
                total -= float(logp[t - 1, ids[t]])
                count += 1
    # response tokens: "yo" + <|im_end|> (3) and "four" + <|im_end|> (5), plus the "\n" after each if trained
    assert got["loss_tokens"] == count >= 8
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_read_responses_names_the_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"response": "a", "reference": "b"}) + "\n" + json.dumps({"response": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl:2: missing string field\(s\) reference"):
        read_responses(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"r.jsonl:1: not valid JSON"):
        read_responses(path)
    with pytest.raises(FileNotFoundError, match="posttrain eval generate"):
        read_responses(tmp_path / "missing.jsonl")
    path.write_text(json.dumps({"response": "a", "reference": "b"}) + "\n\n")
    assert read_responses(path) == [{"response": "a", "reference": "b", "index": 0}]

"""Known-answer tests of the scores."""

from __future__ import annotations

import time

import pytest

from dskd_batch.eval.scoring import exact_match, final_number, math_correct, pass_at_1, rouge_l, truncate_code


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred, ref = "The cats are running in the garden", "the cat runs in a garden"
    assert rouge_l(pred, [ref]) == pytest.approx(100 * sc.score(ref, pred)["rougeL"].fmeasure)
    # stemming: "running" ~ "runs" ~ "run"; identical strings give 100; disjoint give 0
    assert rouge_l("a b c", ["a b c"]) == 100.0
    assert rouge_l("x y z", ["a b c"]) == 0.0
    # the maximum over references
    assert rouge_l(pred, ["nothing alike here", ref]) == pytest.approx(rouge_l(pred, [ref]))
    # hand computed: LCS("the cat sat", "the cat ran") = 2 -> P = R = 2/3 -> F = 66.67
    assert rouge_l("the cat sat", ["the cat ran"]) == pytest.approx(200 / 3)


def test_exact_match():
    assert exact_match("The answer is: Paris.", ["the answer is paris"]) == 100.0
    assert exact_match("  an Apple ", ["apple"]) == 100.0
    assert exact_match("Paris", ["London", "paris!"]) == 100.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0


def test_math():
    assert final_number("She has 3 apples, then 5. So 8 in total.") == 8
    assert final_number("Natalia sold 48/2 = 24 clips in May.\n#### 72") == 72
    assert final_number("It costs $1,250.50.") == 1250.5
    assert final_number("no numbers") is None
    assert math_correct("... so the answer is 72.", ["blah\n#### 72"]) == 100.0
    assert math_correct("the answer is -3", ["#### 3"]) == 0.0
    assert math_correct("I don't know", ["#### 3"]) == 0.0


PROBLEM = {
    "task_id": "t/0",
    "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}


def test_pass_at_1_correct_wrong_broken_looping():
    assert pass_at_1(PROBLEM, "    return a + b\n") == 100.0
    assert pass_at_1(PROBLEM, "    return a - b\n") == 0.0
    assert pass_at_1(PROBLEM, "    return a +\n") == 0.0  # syntax error
    t0 = time.time()
    assert pass_at_1(PROBLEM, "    while True:\n        pass\n", timeout=2.0) == 0.0
    assert time.time() - t0 < 10
    net = "    import socket\n    socket.create_connection(('example.com', 80))\n    return a + b\n"
    assert pass_at_1(PROBLEM, net) == 0.0  # no network while scoring


def test_truncate_code():
    assert truncate_code("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_code("    return 1\n") == "    return 1\n"

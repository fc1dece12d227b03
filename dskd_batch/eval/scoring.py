"""Scores of one generated response against its references, the way the papers report them.

- :func:`rouge_l`: Rouge-L F1 with Porter stemming (``rouge-score``), max over references, x100.
- :func:`exact_match`: 100 if the normalised response equals a normalised reference (lower case,
  punctuation, articles and extra whitespace removed, as SQuAD does), else 0.
- :func:`math_correct`: 100 if the final number of the response equals the reference's final
  number (GSM8K answers end in ``#### N``; commas and a trailing period are ignored).
- :func:`pass_at_1`: 100 if a HumanEval-style completion passes the problem's tests when run in
  the sandbox of :mod:`dskd_batch.eval.sandbox` (a fresh interpreter with CPU, memory, file-size and
  process limits, no network, no new processes, nothing outside its folder removed or written),
  else 0. A looping, crashing or hostile completion scores 0 and never hangs the caller.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Any

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, refs: list[str]) -> float:
    return 100.0 * max(_scorer().score(ref, pred)["rougeL"].fmeasure for ref in refs)


def normalise_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, refs: list[str]) -> float:
    p = normalise_answer(pred)
    return 100.0 if any(p == normalise_answer(r) for r in refs) else 0.0


def final_number(text: str) -> float | None:
    """The answer number of a response: after ``####`` if present, else the last number."""
    if "####" in text:
        text = text.split("####")[-1]
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def math_correct(pred: str, refs: list[str]) -> float:
    p = final_number(pred)
    if p is None:
        return 0.0
    return 100.0 if any((r := final_number(ref)) is not None and abs(r - p) < 1e-6 for ref in refs) else 0.0


def truncate_code(completion: str) -> str:
    """Cut a completion at the first top-level stop sequence (the usual HumanEval stops)."""
    cut = len(completion)
    for stop in CODE_STOPS:
        i = completion.find(stop)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def pass_at_1(problem: dict[str, Any], completion: str, timeout: float = 10.0, memory_mb: int = 1024) -> float:
    """Run ``prompt + completion + test + check(entry_point)`` in the sandbox of
    :mod:`dskd_batch.eval.sandbox` (a fresh interpreter with resource limits, no network, no new
    processes, nothing outside its folder removed or written); 100 if it exits cleanly."""
    from .sandbox import Limits, run_untrusted

    program = "\n".join([problem["prompt"] + completion, "", problem["test"], "", f"check({problem['entry_point']})", ""])
    return 100.0 if run_untrusted(program, Limits(timeout=timeout, memory_mb=memory_mb)).passed else 0.0


METRICS = {"rougeL": rouge_l, "exact_match": exact_match, "math": math_correct}

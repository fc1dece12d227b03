"""How many of a student tokenizer's response tokens have a teacher token with the same character
span, by kind of demo task (knowledge / procedural, as benchmarks/demo_by_task.py splits them).
Exact token alignment (ETA) can only pair such tokens, so this bounds what DSKD-ETA distils on each
kind of row; the unpaired ones get only the CE term.

    python benchmarks/span_overlap_by_task.py TEACHER_TOKENIZER STUDENT_TOKENIZER [...] [--data data/demo/train.jsonl]
"""

from __future__ import annotations

import argparse
import json

from demo_by_task import kind
from transformers import AutoTokenizer


def spans(tok, text: str) -> list[tuple[int, int]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(o) for o in enc["offset_mapping"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("teacher")
    ap.add_argument("students", nargs="+")
    ap.add_argument("--data", default="data/demo/train.jsonl")
    a = ap.parse_args()
    teacher = AutoTokenizer.from_pretrained(a.teacher)
    rows = [json.loads(line) for line in open(a.data)]
    print("| student tokenizer | knowledge rows | procedural rows |\n|---|---|---|")
    for path in a.students:
        student = AutoTokenizer.from_pretrained(path)
        acc: dict[str, list[int]] = {"knowledge": [0, 0], "procedural": [0, 0]}
        for r in rows:
            t_spans = set(spans(teacher, r["output"]))
            s_spans = spans(student, r["output"])
            k = acc[kind(r["instruction"])]
            k[0] += sum(1 for sp in s_spans if sp in t_spans)
            k[1] += len(s_spans)
        print(f"| {path} | " + " | ".join(f"{v[0] / v[1]:.3f} of {v[1]} tokens" for v in acc.values()) + " |")


if __name__ == "__main__":
    main()

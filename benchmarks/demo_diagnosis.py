"""Why do the demo's dev and test splits rank SFT, KD and DSKD differently? Per-task held-out NLL
and greedy exact match on a fresh diagnostic set that is in none of the demo's splits.

    python benchmarks/demo_diagnosis.py demo-out/sft demo-out/kd demo-out/dskd [--teacher demo-out/teacher]

The demo's tasks are of two kinds: *procedural* ones (addition, sorting, numbers in words), whose
items are drawn at random, and *knowledge* ones (capitals, opposites, plurals, animal classes),
whose finite item lists are split between train, dev and test, so a held-out knowledge item was
never trained on. Dev holds 4 knowledge items of 40, test 18 of 60. This script writes new items of
every task (knowledge items that are in no split; procedural items from another seed), scores each
model per task and per kind, and prints the table. It never reads data/demo/test.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dskd_batch.data import Example, encode, render_prompt  # noqa: E402
from dskd_batch.generation import SamplingSettings, sample_responses  # noqa: E402
from dskd_batch.models import load_causal_lm, load_tokenizer  # noqa: E402

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
# knowledge items that data/make_demo.py does not use (so they are in no split)
CAPITALS = {"Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Brazil": "Brasilia",
            "Australia": "Canberra", "Colombia": "Bogota", "Vietnam": "Hanoi", "Iran": "Tehran",
            "Ukraine": "Kyiv", "Nigeria": "Abuja", "Morocco": "Rabat", "Czechia": "Prague", "Romania": "Bucharest",
            "Indonesia": "Jakarta", "Philippines": "Manila", "Venezuela": "Caracas"}
OPPOSITES = {"good": "bad", "near": "far", "heavy": "light", "soft": "hard", "new": "old", "tall": "short",
             "warm": "cool", "left": "right", "cheap": "expensive", "friend": "enemy", "push": "pull",
             "start": "finish", "day": "night", "sweet": "sour", "wide": "narrow", "above": "below"}
PLURALS = {"dog": "dogs", "glass": "glasses", "man": "men", "lady": "ladies", "wife": "wives", "fox": "foxes",
           "car": "cars", "half": "halves", "party": "parties", "watch": "watches", "louse": "lice",
           "ox": "oxen", "berry": "berries", "brush": "brushes", "calf": "calves", "key": "keys"}
ANIMALS = {"cat": "mammal", "hawk": "bird", "goldfish": "fish", "elephant": "mammal", "crow": "bird",
           "herring": "fish", "mouse": "mammal", "pigeon": "bird", "mackerel": "fish", "tiger": "mammal",
           "duck": "bird", "sardine": "fish", "cow": "mammal", "swan": "bird", "pike": "fish", "fox": "mammal"}


def diagnostic_set(seed: int = 12345) -> list[tuple[str, str, Example]]:
    """(task, kind, example) rows: 16 new items of each knowledge task, 16 of each procedural one."""
    rng = random.Random(seed)
    rows: list[tuple[str, str, dict[str, str]]] = []
    rows += [("capital", "knowledge", {"instruction": f"What is the capital of {c}?", "input": "",
                                       "output": f"The capital of {c} is {v}."}) for c, v in CAPITALS.items()]
    rows += [("opposite", "knowledge", {"instruction": "Give the opposite of the word.", "input": w, "output": o})
             for w, o in OPPOSITES.items()]
    rows += [("plural", "knowledge", {"instruction": "Write the plural form of the noun.", "input": w, "output": p})
             for w, p in PLURALS.items()]
    rows += [("animal", "knowledge", {"instruction": "Is this animal a mammal, a bird or a fish?", "input": a,
                                      "output": f"A {a} is a {c}."}) for a, c in ANIMALS.items()]
    for _ in range(16):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append(("plus", "procedural", {"instruction": f"What is {a} plus {b}?", "input": "",
                                            "output": f"{a} plus {b} is {a + b}."}))
        nums = rng.sample(range(1, 60), rng.randint(3, 6))
        rows.append(("sort", "procedural", {"instruction": "Sort the numbers from smallest to largest.",
                                            "input": ", ".join(map(str, nums)),
                                            "output": ", ".join(map(str, sorted(nums)))}))
        n = rng.randint(0, 18)
        rows.append(("number", "procedural", {"instruction": "Write the number in words.", "input": str(n),
                                              "output": NUMBER_WORDS[n]}))
    return [(t, k, Example(f"diag{i}", r["instruction"], r["input"], r["output"], "diag"))
            for i, (t, k, r) in enumerate(rows)]


def model_dir(path: Path) -> Path:
    return path / "student" if (path / "student").is_dir() else path


@torch.no_grad()
def score(path: Path, rows: list[tuple[str, str, Example]]) -> dict[str, dict[str, float]]:
    tok = load_tokenizer(str(model_dir(path)))
    model = load_causal_lm(str(model_dir(path))).eval()
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0, 0])  # nll, tokens, exact, examples
    greedy = SamplingSettings(max_new_tokens=24, temperature=0.0)
    for task, kind, ex in rows:
        enc = encode(tok, render_prompt(ex, "chat", tok), ex.response, max_prompt_len=256, max_len=512,
                     template="chat")
        ids = torch.tensor([enc.input_ids])
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        pos = torch.arange(enc.prompt_len - 1, len(enc.input_ids) - 1)
        nll = float(-lp[pos, ids[0, pos + 1]].sum())
        out = sample_responses(model, [enc.input_ids[:enc.prompt_len]], pad_id=tok.pad_token_id,
                               eos_id=tok.eos_token_id, settings=greedy, vocab=len(tok))[0]
        exact = float(tok.decode(out, skip_special_tokens=True).strip() == ex.response.strip())
        for key in (task, kind, "all"):
            s = sums[key]
            s[0] += nll
            s[1] += len(pos)
            s[2] += exact
            s[3] += 1
    return {k: {"nll": v[0] / v[1], "exact": 100 * v[2] / v[3], "n": v[3]} for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = diagnostic_set()
    results = {str(r): score(r, rows) for r in a.runs}
    keys = ["knowledge", "procedural", "all", "capital", "opposite", "plural", "animal", "plus", "sort", "number"]
    print("| run | " + " | ".join(f"{k} NLL / exact" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r, res in results.items():
        print(f"| {Path(r).name} | " + " | ".join(f"{res[k]['nll']:.3f} / {res[k]['exact']:.0f}" for k in keys) + " |")
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

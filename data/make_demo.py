"""Build the demo instruction corpus (data/demo/{train,test}.jsonl).

Written for dskd-batch and licensed with its code (Apache-2.0). Short instruction tasks with one
correct answer each (arithmetic, capitals, opposites, sorting, plurals, classification, counting,
casing), so that a 135M teacher does reasonably and a student's gains are measurable in minutes
on a CPU. Deterministic: ``python data/make_demo.py`` rewrites the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens", "Austria": "Vienna", "Ireland": "Dublin",
    "Poland": "Warsaw", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Chile": "Santiago",
    "Cuba": "Havana", "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Argentina": "Buenos Aires", "Thailand": "Bangkok", "Turkey": "Ankara", "Mexico": "Mexico City",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
    "open": "closed", "full": "empty", "strong": "weak", "young": "old", "high": "low", "rich": "poor",
    "easy": "hard", "wet": "dry", "loud": "quiet", "long": "short", "clean": "dirty", "thick": "thin",
    "up": "down", "inside": "outside", "first": "last", "true": "false", "win": "lose", "buy": "sell",
}
PLURALS = {
    "cat": "cats", "box": "boxes", "child": "children", "mouse": "mice", "city": "cities", "leaf": "leaves",
    "tooth": "teeth", "bus": "buses", "book": "books", "person": "people", "knife": "knives",
    "woman": "women", "baby": "babies", "foot": "feet", "dish": "dishes", "goose": "geese", "tree": "trees",
    "church": "churches", "story": "stories", "wolf": "wolves",
}
ANIMALS = {
    "dog": "mammal", "eagle": "bird", "salmon": "fish", "whale": "mammal", "sparrow": "bird", "shark": "fish",
    "horse": "mammal", "owl": "bird", "tuna": "fish", "bat": "mammal", "penguin": "bird", "trout": "fish",
    "lion": "mammal", "parrot": "bird", "cod": "fish", "rabbit": "mammal", "robin": "bird", "carp": "fish",
}
SENTENCES = [
    "The quick brown fox jumps over the lazy dog", "I like green tea in the morning",
    "Rain fell all night on the small village", "She reads a book every week",
    "We walked to the old bridge after lunch", "The train leaves at seven",
    "My brother plays the piano very well", "Birds sing before the sun rises",
    "Please close the door when you leave", "The market is busy on Saturdays",
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def make(rng: random.Random) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for country, city in CAPITALS.items():
        rows.append({"instruction": f"What is the capital of {country}?", "input": "",
                     "output": f"The capital of {country} is {city}."})
    for word, opp in OPPOSITES.items():
        rows.append({"instruction": "Give the opposite of the word.", "input": word, "output": opp})
    for word, plural in PLURALS.items():
        rows.append({"instruction": "Write the plural form of the noun.", "input": word, "output": plural})
    for animal, cls in ANIMALS.items():
        rows.append({"instruction": "Is this animal a mammal, a bird or a fish?", "input": animal,
                     "output": f"A {animal} is a {cls}."})
    for s in SENTENCES:
        rows.append({"instruction": "How many words are in this sentence?", "input": s,
                     "output": f"The sentence has {len(s.split())} words."})
        rows.append({"instruction": "Rewrite the sentence in capital letters.", "input": s, "output": s.upper()})
    for _ in range(90):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"instruction": f"What is {a} plus {b}?", "input": "",
                     "output": f"{a} plus {b} is {a + b}."})
    for _ in range(60):
        nums = rng.sample(range(1, 60), rng.randint(3, 6))
        rows.append({"instruction": "Sort the numbers from smallest to largest.", "input": ", ".join(map(str, nums)),
                     "output": ", ".join(map(str, sorted(nums)))})
    for _ in range(40):
        n = rng.randint(0, 18)
        rows.append({"instruction": "Write the number in words.", "input": str(n), "output": NUMBER_WORDS[n]})
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = make(random.Random(0))
    out = Path(__file__).resolve().parent / "demo"
    out.mkdir(exist_ok=True)
    n_test, n_dev = 60, 40
    splits = (("test", rows[:n_test]), ("dev", rows[n_test:n_test + n_dev]), ("train", rows[n_test + n_dev:]))
    for name, part in splits:
        with open(out / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
        print(f"{name}: {len(part)} rows")


if __name__ == "__main__":
    main()

"""Train / dev / test splits of the real data in ../shared/data for the quality benchmark.

    python benchmarks/make_splits.py [--shared ../shared/data] [--out bench-out/data]

- ``t0/``: 400 training rows sampled (seed 0) from ``t0_mix/train.jsonl``; ``t0_mix/dev.jsonl``
  split **by task** (prompt template) into dev and test halves, so no template is in both, each
  then sampled down to 120 rows (seed 0) so that evaluating every method fits the hour.
- ``self_instruct/``: the 175 Self-Instruct seed tasks split by task (seed 0) into 125 train,
  25 dev and 25 test tasks; a task's instances stay together (the loader expands them).
Dev is for choosing settings and checkpoints; test is read once, by `evaluate`. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} rows")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


def t0_heldout(dev: list[dict], rows: int) -> dict[str, list[dict]]:
    """T0's dev rows split by task (prompt template) into "dev" and "test" halves, no task in both,
    each sampled down to ``rows`` (seed 0)."""
    tasks = sorted({r["task"] for r in dev})
    random.Random(0).shuffle(tasks)
    dev_tasks = set(tasks[: len(tasks) // 2])
    halves = {}
    for name, part in (("dev", [r for r in dev if r["task"] in dev_tasks]),
                       ("test", [r for r in dev if r["task"] not in dev_tasks])):
        keep = sorted(random.Random(0).sample(range(len(part)), min(rows, len(part))))
        halves[name] = [part[i] for i in keep]
    return halves


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default="bench-out/data")
    ap.add_argument("--t0-train", type=int, default=400)
    ap.add_argument("--t0-heldout", type=int, default=120, help="rows kept of each of dev and test")
    a = ap.parse_args()
    shared, out = Path(a.shared), Path(a.out)

    train = read(shared / "t0_mix" / "train.jsonl")
    write(out / "t0" / "train.jsonl", random.Random(0).sample(train, a.t0_train))
    for name, rows in t0_heldout(read(shared / "t0_mix" / "dev.jsonl"), a.t0_heldout).items():
        write(out / "t0" / f"{name}.jsonl", rows)

    seeds = read(shared / "self_instruct_seed" / "seed_tasks.jsonl")
    order = list(range(len(seeds)))
    random.Random(0).shuffle(order)
    parts = {"train": order[:125], "dev": order[125:150], "test": order[150:]}
    for name, idx in parts.items():
        write(out / "self_instruct" / f"{name}.jsonl", [seeds[i] for i in sorted(idx)])


if __name__ == "__main__":
    main()

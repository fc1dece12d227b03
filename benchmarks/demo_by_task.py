"""Rouge-L of demo students by kind of task: knowledge rows (capitals, opposites, plurals, animal
classes; finite item lists split between the demo's files) and procedural rows (the rest), mean ± std
over the runs given for each method (for example, training seeds).

    python benchmarks/demo_by_task.py sft=demo-out/sft,SEED1/sft kd=demo-out/kd,SEED1/kd ...

Each path is a run folder whose ``eval/report.json`` ``evaluate`` wrote; reads the per-row scores
already there (nothing is generated or scored again).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

KNOWLEDGE = ("capital of", "opposite", "plural", "mammal")


def kind(prompt: str) -> str:
    return "knowledge" if any(k in prompt.lower() for k in KNOWLEDGE) else "procedural"


def by_kind(run: Path, split: str = "test") -> tuple[dict[str, float], dict[str, int]]:
    rows = json.loads((run / "eval" / "report.json").read_text())["sets"][split]["generations"]
    acc: dict[str, list[float]] = {"knowledge": [], "procedural": []}
    for r in rows:
        per_seed = r["scores"]["rougeL"]
        acc[kind(r["prompt"])].append(sum(per_seed.values()) / len(per_seed))
    return {k: sum(v) / len(v) for k, v in acc.items() if v}, {k: len(v) for k, v in acc.items()}


def main() -> None:
    print("| run | knowledge rows | procedural rows |\n|---|---|---|")
    for arg in sys.argv[1:]:
        name, paths = arg.split("=", 1)
        means: dict[str, list[float]] = {"knowledge": [], "procedural": []}
        counts: dict[str, int] = {}
        for p in paths.split(","):
            m, counts = by_kind(Path(p))
            for k, v in m.items():
                means[k].append(v)

        def cell(k: str) -> str:
            v = means[k]
            spread = f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
            return f"{statistics.mean(v):.2f}{spread} (n = {counts.get(k, 0)})"

        print(f"| {name} | {cell('knowledge')} | {cell('procedural')} |")


if __name__ == "__main__":
    main()

"""Rouge-L of demo students by kind of task: knowledge rows (capitals, opposites, plurals, animal
classes; finite item lists split between the demo's files) and procedural rows (the rest), mean ± std
over the runs given for each method (for example, training seeds).

    python benchmarks/demo_by_task.py sft=demo-out/sft,SEED1/sft kd=demo-out/kd,SEED1/kd ...

Each path is a run folder whose ``eval/report.json`` ``evaluate`` wrote; reads the per-row scores
already there (nothing is generated or scored again).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

KNOWLEDGE = ("capital of", "opposite", "plural", "mammal")


def kind(prompt: str) -> str:
    return "knowledge" if any(k in prompt.lower() for k in KNOWLEDGE) else "procedural"


def by_kind(run: Path, split: str = "test") -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Per kind of row: Rouge-L (the mean over rows of each row's mean over sampling seeds) and bits per
    byte of the references (the rows' teacher-forced nats over their UTF-8 bytes, as evaluate counts
    them), and the number of rows."""
    rows = json.loads((run / "eval" / "report.json").read_text())["sets"][split]["generations"]
    acc: dict[str, dict[str, list[float]]] = {k: {"rouge": [], "nats": [], "bytes": []} for k in ("knowledge", "procedural")}
    for r in rows:
        per_seed = r["scores"]["rougeL"]
        a = acc[kind(r["prompt"])]
        a["rouge"].append(sum(per_seed.values()) / len(per_seed))
        if r.get("nll"):
            a["nats"].append(r["nll"]["nats"])
            a["bytes"].append(len(r["references"][0].encode("utf-8")))
    out: dict[str, dict[str, float]] = {}
    for k, a in acc.items():
        if a["rouge"]:
            out[k] = {"rouge": sum(a["rouge"]) / len(a["rouge"])}
            if a["bytes"]:
                out[k]["bpb"] = sum(a["nats"]) / math.log(2) / sum(a["bytes"])
    return out, {k: len(a["rouge"]) for k, a in acc.items()}


def main() -> None:
    print("| run | knowledge rows | procedural rows |\n|---|---|---|")
    for arg in sys.argv[1:]:
        name, paths = arg.split("=", 1)
        means: dict[str, list[float]] = {"knowledge": [], "procedural": []}
        counts: dict[str, int] = {}
        for p in paths.split(","):
            m, counts = by_kind(Path(p))
            for k, v in m.items():
                means[k].append(v["rouge"])

        def cell(k: str) -> str:
            v = means[k]
            spread = f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
            return f"{statistics.mean(v):.2f}{spread} (n = {counts.get(k, 0)})"

        print(f"| {name} | {cell('knowledge')} | {cell('procedural')} |")


if __name__ == "__main__":
    main()

"""Mean ± std over training seeds of a pipeline's runs: test Rouge-L (each run's own mean over its
sampling seeds; beside it the mean of the runs' std over sampling seeds), test NLL per token, test bits per byte and the dev CE at the exported step.

    python benchmarks/seed_table.py OUT sft,mined,uld,dskd-cma,dskd-eta [--suffixes ,-seed1,-seed2]

Run ``NAME`` + each suffix is read from ``OUT/NAME+SUFFIX`` (its ``eval/report.json`` and
``run.json``); nothing is trained or scored again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def run_values(run: Path) -> dict[str, float]:
    rep = json.loads((run / "eval" / "report.json").read_text())
    (test,) = rep["sets"].values()
    info = json.loads((run / "run.json").read_text())
    exported = info.get("exported", {})
    return {"rouge": test["metrics"]["rougeL"]["mean"], "sampling_std": test["metrics"]["rougeL"]["std"], "nll": test["nll"]["nats_per_token"],
            "bpb": test["nll"]["bits_per_byte"], "dev_ce": exported.get("value", float("nan"))}


def cell(values: list[float], digits: int) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("runs")
    ap.add_argument("--suffixes", default=",-seed1,-seed2")
    a = ap.parse_args()
    suffixes = a.suffixes.split(",")
    print(f"| run | seeds | test Rouge-L | sampling std | test NLL/token | test bits/byte | dev CE | Rouge-L per seed ({', '.join(s or 'base' for s in suffixes)}) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.runs.split(","):
        vals = [run_values(Path(a.out) / f"{name}{s}") for s in suffixes if (Path(a.out) / f"{name}{s}" / "eval").exists()]
        if not vals:
            continue
        col = {k: [v[k] for v in vals] for k in vals[0]}
        print(f"| {name} | {len(vals)} | {cell(col['rouge'], 2)} | {statistics.mean(col['sampling_std']):.2f} | {cell(col['nll'], 4)} | {cell(col['bpb'], 3)} | "
              f"{cell(col['dev_ce'], 4)} | {' / '.join(f'{x:.2f}' for x in col['rouge'])} |")


if __name__ == "__main__":
    main()

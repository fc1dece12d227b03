"""Mean ± std over training seeds of a pipeline's runs: test Rouge-L (each run's own mean over its
sampling seeds; beside it the mean of the runs' std over sampling seeds), test NLL per token, test bits per byte and the dev CE at the exported step.

    python benchmarks/seed_table.py OUT sft,mined,uld,dskd-cma,dskd-eta [--suffixes ,-seed1,-seed2]
        [--results FILE --label NAME [--baseline sft] [--by-kind]]

Run ``NAME`` + each suffix is read from ``OUT/NAME+SUFFIX`` (its ``eval/report.json`` and
``run.json``); nothing is trained or scored again. ``--results`` keeps the figures (and, with
``--baseline``, each run's paired gain over it across its training seeds: score and NLL, bootstrap
over test examples and seeds) as ``FILE[label]`` with the command, hardware, date and commit, for
``benchmarks/render_docs.py``; ``--by-kind`` adds each run's test Rouge-L and bits per byte on the demo's
knowledge and procedural rows (``demo_by_task.py``'s split).
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
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--label", default=None)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--by-kind", action="store_true")
    a = ap.parse_args()
    rows: dict[str, dict] = {}
    suffixes = a.suffixes.split(",")
    print(f"| run | seeds | test Rouge-L | sampling std | test NLL/token | test bits/byte | dev CE | Rouge-L per seed ({', '.join(s or 'base' for s in suffixes)}) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.runs.split(","):
        vals = [run_values(Path(a.out) / f"{name}{s}") for s in suffixes if (Path(a.out) / f"{name}{s}" / "eval").exists()]
        if not vals:
            continue
        col = {k: [v[k] for v in vals] for k in vals[0]}
        rows[name] = {"runs": [f"{name}{s}" for s in suffixes if (Path(a.out) / f"{name}{s}" / "eval").exists()], **col}
        if a.by_kind:
            from demo_by_task import by_kind

            per_run = [by_kind(Path(a.out) / r) for r in rows[name]["runs"]]
            rows[name]["by_kind"] = {k: {"rows": per_run[0][1][k], **{m: [pr[0][k][m] for pr in per_run] for m in ("rouge", "bpb")}}
                                     for k in ("knowledge", "procedural")}
        print(f"| {name} | {len(vals)} | {cell(col['rouge'], 2)} | {statistics.mean(col['sampling_std']):.2f} | {cell(col['nll'], 4)} | {cell(col['bpb'], 3)} | "
              f"{cell(col['dev_ce'], 4)} | {' / '.join(f'{x:.2f}' for x in col['rouge'])} |")


    if a.results is not None:
        save(a, rows)


def provenance() -> dict[str, str]:
    """The command line of this script's run, the hardware, the date and the commit, for a results file."""
    import os
    import platform
    import subprocess
    import sys
    from datetime import date

    return {"command": "python benchmarks/" + Path(sys.argv[0]).name + " " + " ".join(sys.argv[1:]),
            "hardware": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "date": date.today().isoformat(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).resolve().parents[1]).stdout.strip()}


def save(a: argparse.Namespace, rows: dict[str, dict]) -> None:
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from dskd_batch.eval.compare import paired_gain

    if a.baseline is not None:
        reps = {name: [json.loads((Path(a.out) / r / "eval" / "report.json").read_text()) for r in row["runs"]]
                for name, row in rows.items()}
        test = next(iter(reps[a.baseline][0]["sets"]))
        for name, row in rows.items():
            if name != a.baseline:
                row["paired"] = paired_gain(reps[a.baseline], reps[name], test, labels=(a.baseline, name))
    teacher = Path(a.out) / "teacher-eval" / "report.json"
    entry = {**provenance(), "baseline": a.baseline, "rows": rows}
    if teacher.exists():
        (t,) = json.loads(teacher.read_text())["sets"].values()
        entry["teacher"] = {"rouge": t["metrics"]["rougeL"]["mean"], "sampling_std": t["metrics"]["rougeL"]["std"],
                            "nll": t["nll"]["nats_per_token"], "bpb": t["nll"]["bits_per_byte"]}
    doc = json.loads(a.results.read_text()) if a.results.exists() else {}
    doc[a.label or Path(a.out).name] = entry
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results: {a.results}")


if __name__ == "__main__":
    main()

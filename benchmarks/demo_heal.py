"""The demo's task table with and without healing: SFT, KD and DSKD students that start from the healed
student against the same methods from the pruned one (benchmarks/demo_heal.toml), paired by test example.

    python benchmarks/demo_heal.py [--jobs 2] [--seeds 42] [--results benchmarks/results/demo_heal_cpu.json]

The pipeline shares the demo's folder (demo-out), so the stages of a finished ``just demo`` (the tuned
teacher, its caches, the pruned student, the three unhealed runs and their evaluations) are reused; it adds
the heal stage (the base teacher cached over benchmarks/bench_heal.py's general corpus, the pruned student
trained on it with KD) and the three runs from the healed student. Every run keeps its best checkpoint on
the demo's dev split; the test split is read once by each evaluate stage.

Reported for each method: the test Rouge-L and teacher-forced NLL of both students, the healed one's
paired gain over the unhealed one (a bootstrap over the test examples, and over the training seeds where
``--seeds`` gives several), and, on the general held-out sets of bench_heal.py (the T0 test half and the
Self-Instruct seed tasks, never used to choose anything), how far each task student still is a language
model (nats per response token in the teacher's chat template). ``benchmarks/render_docs.py`` renders the
results into docs/heal.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dskd_batch.eval.compare import paired_gain  # noqa: E402
from dskd_batch.data import load_examples  # noqa: E402
from dskd_batch.eval.evaluate import load_report  # noqa: E402
from dskd_batch.pipeline import load_pipeline, run_pipeline, seeded_runs  # noqa: E402
from bench_heal import make_data, mean_std, save, score, stage_seconds  # noqa: E402  (this script's folder)

PIPELINE = ROOT / "benchmarks" / "demo_heal.toml"
METHODS = ("sft", "kd", "dskd")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--heal-data", type=Path, default=Path("bench-out/heal/data"),
                    help="where the general corpus is written (the folder demo_heal.toml reads)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--results", type=Path, default=None)
    a = ap.parse_args()
    t_start = time.time()
    files = make_data(a.shared, a.heal_data, 120)
    seeds = [int(s) for s in a.seeds.split(",")]
    for line in run_pipeline(PIPELINE, train_seeds=seeds, jobs=a.jobs):
        print(line, flush=True)
    p = load_pipeline(PIPELINE)
    runs = seeded_runs(list(p.run_names), list(p.runs), seeds)
    reports = {label: load_report(Path(cfg.out))[1] for label, _, cfg in runs}
    by_name = {name: [reports[lab] for lab, n, _ in runs if n == name] for name in p.run_names}
    test_set = next(iter(by_name["sft"][0]["sets"]))

    task: dict[str, dict] = {}
    for name in p.run_names:
        infos = [r["sets"][test_set] for r in by_name[name]]
        task[name] = {"score": mean_std([i["metrics"][i["primary"]]["mean"] for i in infos]),
                      "metric": infos[0]["primary"],
                      "nll": mean_std([i["nll"]["nats_per_token"] for i in infos]),
                      "bits_per_byte": mean_std([i["nll"]["bits_per_byte"] for i in infos])}
    teacher_rep = load_report(p.out / "teacher-eval")[1]["sets"][test_set]
    task["teacher"] = {"score": mean_std([teacher_rep["metrics"][teacher_rep["primary"]]["mean"]]),
                       "metric": teacher_rep["primary"], "nll": mean_std([teacher_rep["nll"]["nats_per_token"]]),
                       "bits_per_byte": mean_std([teacher_rep["nll"]["bits_per_byte"]])}
    gains = {m: paired_gain(by_name[m], by_name[f"healed-{m}"], test_set, labels=(m, f"healed-{m}"))
             for m in METHODS}

    tests = {name: load_examples(files[name]).examples for name in ("t0-test", "self-instruct")}
    models = {"teacher (base)": p.base_teacher, "teacher (tuned)": str(p.out / "teacher" / "student"),
              "pruned": p.pruned, "healed": p.student}
    models.update({label: str(Path(cfg.out) / "student") for label, _, cfg in runs})
    general = {}
    for label, path in models.items():
        general[label] = score(path, tests)
        print(f"{label}: " + ", ".join(f"{k} {v['nats_per_token']:.3f} nats/token" for k, v in general[label].items()),
              flush=True)

    secs = stage_seconds(p.out)
    for m in METHODS:
        g = gains[m]
        print(f"healed-{m} vs {m}: {g['metric']} {g['score']['delta']:+.2f} [{g['score']['ci'][0]:+.2f}, "
              f"{g['score']['ci'][1]:+.2f}] (P(no gain) {g['score']['p']:.3f}); NLL {g['nll']['delta']:+.4f} "
              f"[{g['nll']['ci'][0]:+.4f}, {g['nll']['ci'][1]:+.4f}] (P(no gain) {g['nll']['p']:.3f})")
    if a.results is not None:
        save(a.results, "demo", "heal", {
            "seeds": seeds, "test_set": test_set, "task": task, "paired": gains, "general": general,
            "tests": {k: len(v) for k, v in tests.items()},
            "heal_seconds": {k: secs.get(k) for k in ("heal cache", "heal")},
            "wall_seconds": round(time.time() - t_start)})


if __name__ == "__main__":
    main()

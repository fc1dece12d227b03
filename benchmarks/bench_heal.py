"""Does healing keep a pruned student a language model? Held-out NLL on general instructions of the
teacher, the pruned student, and the pruned student healed on a general corpus with SFT, KD and DSKD
(benchmarks/heal.toml: one cache of the base teacher, three training seeds).

    python benchmarks/bench_heal.py [--rows 120] [--jobs 2] [--select influence|even] [--seeds 42,1,2]
        [--corpus text|generated] [--set SECTION.KEY=VALUE ...] [--only RUNS] [--no-score] [--label NAME]
        [--out bench-out/heal] [--results benchmarks/results/heal_cpu.json]

``--no-score`` trains and prints each run's dev CE (and the pruned student's) without reading the
test sets: settings (learning rate, layer selection, corpus) are chosen that way, then the chosen
setting is run with three seeds and scored once.

Data (from ../shared/data, written under OUT/data, deterministic):
- ``general.jsonl``: ``--rows`` rows of T0's training file (sampled with seed 1) as plain text, the
  prompt and its answer as one document; every token is a target.
- ``prompts.jsonl``: the same rows as prompt / response rows (``--corpus generated`` heals on the
  teacher's own responses to these prompts instead: ``cache-teacher --generate``).
- ``dev.jsonl``: the dev half of T0's dev tasks (benchmarks/make_splits.py's split, 120 rows);
  the runs keep their best checkpoint on it (response CE in the teacher's chat template).
- test: the other half of T0's dev tasks (120 rows, no task shared with dev) and the 175
  Self-Instruct seed tasks (every instance), read once, after training.

Every model is scored teacher-forced on the test responses in the teacher's chat template
(nats per response token, and bits per byte of the response text). The gap a student closes is
``(pruned - healed) / (pruned - teacher)`` in nats per token. The figures, with the tokens trained
and the time of each stage, go to ``--results``; ``benchmarks/render_docs.py`` renders them.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dskd_batch.data import load_examples  # noqa: E402
from dskd_batch.eval.evaluate import response_nll  # noqa: E402
from dskd_batch.models import load_causal_lm, load_tokenizer  # noqa: E402
from dskd_batch.pipeline import load_pipeline, run_pipeline, seeded_runs  # noqa: E402
from make_splits import read, t0_heldout, write  # noqa: E402  (benchmarks/, this script's folder)

PROMPT = {"template": "chat", "max_prompt_len": 256, "max_len": 512}
DEV_PROMPT = {"template": "chat", "max_prompt_len": 128, "max_len": 256}  # the runs' eval_ce: the cache's limits


def make_data(shared: Path, out: Path, rows: int) -> dict[str, Path]:
    """The general corpus, the dev split and the two test sets (see the module docstring)."""
    train = read(shared / "t0_mix" / "train.jsonl")
    sample = random.Random(1).sample(train, rows)
    general = [{"text": r["prompt"].rstrip() + "\n" + r["response"]} for r in sample]
    write(out / "prompts.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in sample])
    halves = t0_heldout(read(shared / "t0_mix" / "dev.jsonl"), 120)  # the split of the quality benchmark
    return {"general": write(out / "general.jsonl", general), "dev": write(out / "dev.jsonl", halves["dev"]),
            "t0-test": write(out / "t0-test.jsonl", halves["test"]),
            "self-instruct": shared / "self_instruct_seed" / "seed_tasks.jsonl"}


def score(model_path: str, tests: dict[str, list], prompt: dict | None = None) -> dict[str, dict[str, float]]:
    model = load_causal_lm(model_path, dtype=torch.float32, device="cpu").eval()
    tok = load_tokenizer(model_path)
    out = {}
    for name, examples in tests.items():
        r = response_nll(model, tok, examples, prompt or PROMPT, batch_size=8)
        out[name] = {"nats_per_token": r["nats_per_token"], "bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"]}
    return out


def stage_seconds(out: Path) -> dict[str, float]:
    secs = {}
    for rec in (out / ".stages").glob("*.json"):
        info = json.loads(rec.read_text())
        if "ran" in info:
            secs[info["stage"]] = info["ran"]["finished"] - info["ran"]["started"]
    return secs


def trained_tokens(run: Path, cache: Path) -> int:
    """Target positions trained on: the cache's, times the share of examples the run's steps read
    (an epoch drops its last incomplete batch), times the epochs."""
    info = json.loads((run / "run.json").read_text())
    totals = json.loads((cache / "manifest.json").read_text())["totals"]
    return round(totals["positions"] * info["total_steps"] * info["global_batch"] / totals["examples"])


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def save(results: Path, section: str, label: str, entry: dict) -> None:
    """Keep ``entry`` as ``results[section][label]``, with the command, hardware, date and commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    doc = json.loads(results.read_text()) if results.exists() else {}
    doc.setdefault(section, {})[label] = {
        "command": f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:]),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": date.today().isoformat(), "commit": commit, **entry}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results: {results}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("bench-out/heal"))
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--select", default="influence", choices=("influence", "even"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--label", default="", help="name of this setting in the results file (default: the select)")
    ap.add_argument("--corpus", default="text", choices=("text", "generated"),
                    help="heal on the sampled rows as plain text, or on the teacher's own responses to their prompts "
                         "(cache-teacher --generate; the responses are the targets)")
    ap.add_argument("--only", default=None, help="comma-separated runs to train (default: all)")
    ap.add_argument("--no-score", action="store_true", help="train only (choosing settings on dev): print each "
                    "run's best dev CE and stop before the test sets are read")
    a = ap.parse_args()
    t_start = time.time()
    files = make_data(a.shared, a.out / "data", a.rows)
    pipeline = ROOT / "benchmarks" / "heal.toml"
    plain = a.select == "influence" and not a.overrides and a.corpus == "text"
    run_out = a.out / ("out" if plain else f"out-{a.label or a.select}")
    overrides = [f"out={json.dumps(str(run_out))}", f"student.select={json.dumps(a.select)}", *a.overrides]
    if a.corpus == "generated":  # the same prompts, answered by the teacher (sampled at T = 1, up to 128 tokens)
        overrides = [f"cache.data={json.dumps(str(a.out / 'data' / 'prompts.jsonl'))}", "cache.generate=true",
                     "cache.gen_max_new_tokens=128", f"cache.out={json.dumps(str(a.out / 'cache-generated'))}",
                     f"student.calibration={json.dumps(str(files['general']))}", *overrides]
    seeds = [int(s) for s in a.seeds.split(",")]
    only = a.only.split(",") if a.only else None
    for line in run_pipeline(pipeline, train_seeds=seeds, jobs=a.jobs, overrides=overrides, only=only):
        print(line, flush=True)
    p = load_pipeline(pipeline, overrides)
    if only:
        p.runs, p.run_names = zip(*[(c, n) for c, n in zip(p.runs, p.run_names) if n in only])
    runs = seeded_runs(list(p.run_names), list(p.runs), seeds)
    if a.no_score:
        dev = {"dev": load_examples(files["dev"]).examples}
        pruned_ce = score(p.pruned, dev, DEV_PROMPT)["dev"]["nats_per_token"]
        print(f"pruned ({a.select}): dev CE {pruned_ce:.4f} before healing")
        found = {"pruned": pruned_ce}
        for label, _, cfg in runs:
            exp = json.loads((Path(cfg.out) / "run.json").read_text()).get("exported", {})
            found[label] = exp.get("value")
            print(f"{label}: dev {exp.get('metric')} {exp.get('value', float('nan')):.4f} at step {exp.get('step')}")
        if a.results is not None:  # the settings' dev CE, beside the test figures
            save(a.results, "dev", a.label or a.select, {"select": a.select, "overrides": a.overrides, "dev_ce": found})
        return

    tests = {name: load_examples(files[name]).examples for name in ("t0-test", "self-instruct")}
    models = {"teacher": p.base_teacher, "pruned": p.pruned}
    models.update({label: str(Path(cfg.out) / "student") for label, _, cfg in runs})
    scores = {}
    for label, path in models.items():
        t0 = time.perf_counter()
        scores[label] = score(path, tests)
        print(f"{label}: " + ", ".join(f"{k} {v['nats_per_token']:.3f} nats/token {v['bits_per_byte']:.3f} bits/byte"
                                        for k, v in scores[label].items()) + f" ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    secs = stage_seconds(run_out)
    summary: dict[str, dict] = {}
    for kind in ("teacher", "pruned"):
        summary[kind] = {s: {m: mean_std([scores[kind][s][m]]) for m in ("nats_per_token", "bits_per_byte")}
                         for s in tests}
    for name in p.run_names:
        labels = [lab for lab, n, _ in runs if n == name]
        summary[name] = {s: {m: mean_std([scores[lab][s][m] for lab in labels]) for m in ("nats_per_token", "bits_per_byte")}
                         for s in tests}
        for s in tests:
            gap = scores["pruned"][s]["nats_per_token"] - scores["teacher"][s]["nats_per_token"]
            summary[name][s]["gap_closed"] = mean_std(
                [(scores["pruned"][s]["nats_per_token"] - scores[lab][s]["nats_per_token"]) / gap for lab in labels])
        summary[name]["tokens_trained"] = [trained_tokens(run_out / lab, Path(p.cache.out)) for lab in labels]
        summary[name]["seconds"] = [round(secs.get(f"distill {lab}", float("nan")), 1) for lab in labels]
        summary[name]["exported"] = [json.loads((run_out / lab / "run.json").read_text()).get("exported") for lab in labels]
    for name in p.run_names:
        print(f"{name}: " + ", ".join(f"{s} {summary[name][s]['nats_per_token']['mean']:.3f} ± "
                                      f"{summary[name][s]['nats_per_token']['std']:.3f} nats/token "
                                      f"(gap closed {summary[name][s]['gap_closed']['mean']:.2f})" for s in tests))
    if a.results is not None:
        save(a.results, "settings", a.label or a.select, {
            "select": a.select, "overrides": a.overrides, "seeds": seeds, "rows": a.rows,
            "tests": {k: len(v) for k, v in tests.items()}, "cache_seconds": secs.get("cache"),
            "student_seconds": secs.get("student"), "wall_seconds": round(time.time() - t_start), "scores": scores,
            "summary": summary})


if __name__ == "__main__":
    main()

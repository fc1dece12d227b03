"""Is one run better than another on a test set, beyond chance? A paired bootstrap over the test
examples and the training seeds.

A test set's mean Rouge-L moves with the sampling seed, the training seed and the draw of test
examples. The spread over sampling seeds alone (what ``evaluate`` prints) ignores the last two;
the spread of per-seed means over three training seeds is too coarse to show a gain of a point.
Every evaluation report keeps each example's score per sampling seed (and, from this version on,
each example's teacher-forced NLL), so two methods can be compared *paired*, example by example:

* each run's score on an example is its mean over the sampling seeds;
* one bootstrap replicate draws the test examples with replacement (the same draw for both
  methods: the pairing) and, for each method independently, its training seeds with replacement;
  the replicate's gain is the difference of the two means over the drawn seeds and examples;
* the gain is reported with the 2.5 and 97.5 percentiles of the replicates and the share of
  replicates in which the other method is not better (a one-sided bootstrap p-value).

NLL is compared the same way, as nats per token over the drawn examples (each seed's summed nats
over its summed tokens), lower being better. The draw of training seeds makes the interval
account for training noise as far as the seeds measured allow; with one seed per method it
accounts for the test examples and the sampling seeds only, and says so (``train_seeds``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DskdError

RESAMPLES = 10_000


def _per_example(rep: dict[str, Any], set_name: str) -> tuple[str, list[str], np.ndarray, np.ndarray | None]:
    """(data fingerprint, example ids, mean primary score per example over sampling seeds, and
    [nats, tokens] per example where the report holds them)."""
    info = rep["sets"][set_name]
    metric = info["primary"]
    gens = info["generations"]
    scores = np.array([np.mean(list(g["scores"][metric].values())) for g in gens], dtype=np.float64)
    nll = None
    if all("nll" in g for g in gens):
        nll = np.array([[g["nll"]["nats"], g["nll"]["tokens"]] for g in gens], dtype=np.float64)
    return info["data_fingerprint"], [g["id"] for g in gens], scores, nll


def _stack(reps: list[dict[str, Any]], set_name: str, label: str) -> tuple[str, list[str], np.ndarray, np.ndarray | None]:
    """One run's training seeds: scores [seeds, examples] and NLL [seeds, examples, 2] (or None)."""
    rows = [_per_example(r, set_name) for r in reps]
    fp, ids = rows[0][0], rows[0][1]
    for other in rows[1:]:
        if other[0] != fp or other[1] != ids:
            raise DskdError(f"{label}: its training seeds were scored on different test sets ({set_name})")
    nll = np.stack([r[3] for r in rows]) if all(r[3] is not None for r in rows) else None
    return fp, ids, np.stack([r[2] for r in rows]), nll


def _replicates(values: np.ndarray, draws: np.ndarray, rng: np.random.Generator, stat: Any) -> np.ndarray:
    """``stat`` of one run under each replicate's example draw, over training seeds drawn with
    replacement (values: [seeds, examples, ...])."""
    seeds = rng.integers(0, values.shape[0], size=(draws.shape[0], values.shape[0]))
    out = np.empty(draws.shape[0])
    for r in range(draws.shape[0]):
        out[r] = np.mean([stat(values[s][draws[r]]) for s in seeds[r]])
    return out


def _summary(point: float, reps: np.ndarray, better_if_positive: bool) -> dict[str, Any]:
    worse = reps <= 0 if better_if_positive else reps >= 0
    return {"delta": point, "ci": [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))],
            "p": float(worse.mean())}


def paired_gain(base: list[dict[str, Any]], other: list[dict[str, Any]], set_name: str, *, labels: tuple[str, str] =
                ("baseline", "run"), resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """``other`` against ``base`` (each a list of evaluation reports, one per training seed) on the
    test set ``set_name``: the primary metric's gain (positive: ``other`` is better) and, when every
    report holds per-example NLL, the NLL's change (negative: ``other`` is better), each with a 95%
    bootstrap interval and a one-sided p-value."""
    fb, ids_b, sb, nb = _stack(base, set_name, labels[0])
    fo, ids_o, so, no = _stack(other, set_name, labels[1])
    if fb != fo or ids_b != ids_o:
        raise DskdError(f"{labels[1]} and {labels[0]} were scored on different test sets ({set_name}): no paired "
                        "comparison", hint="evaluate both on the same file")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids_b), size=(resamples, len(ids_b)))
    out: dict[str, Any] = {
        "set": set_name, "metric": base[0]["sets"][set_name]["primary"], "examples": len(ids_b),
        "train_seeds": [len(base), len(other)], "resamples": resamples,
        "score": _summary(float(so.mean() - sb.mean()),
                          _replicates(so, draws, rng, np.mean) - _replicates(sb, draws, rng, np.mean), True),
    }
    if nb is not None and no is not None:
        def rate(v: np.ndarray) -> float:
            return float(v[:, 0].sum() / max(v[:, 1].sum(), 1.0))

        point = float(np.mean([rate(v) for v in no]) - np.mean([rate(v) for v in nb]))
        out["nll"] = _summary(point, _replicates(no, draws, rng, rate) - _replicates(nb, draws, rng, rate), False)
    return out


def gain_table(baseline: str, rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: each run's gain over ``baseline`` with its interval and p-value."""
    lines = [f"| run | test set | {baseline} → run: score gain [95% CI] | P(no gain) | NLL change [95% CI] | "
             "P(no gain) | training seeds |", "|---|---|---|---|---|---|---|"]
    for label, g in rows:
        s = g["score"]
        cells = [label, g["set"], f"{s['delta']:+.2f} [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}]", f"{s['p']:.3f}"]
        if "nll" in g:
            n = g["nll"]
            cells += [f"{n['delta']:+.4f} [{n['ci'][0]:+.4f}, {n['ci'][1]:+.4f}]", f"{n['p']:.3f}"]
        else:
            cells += ["–", "–"]
        cells.append(f"{g['train_seeds'][1]} vs {g['train_seeds'][0]}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""The paired comparison of two runs on a test set (compare.py, `report --baseline`): known values,
an independent normal-approximation check of the interval, the NLL as nats per token over the
drawn examples, and refusals of unpaired reports."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from click.testing import CliRunner

from dskd_batch.cli import main
from dskd_batch.eval.compare import paired_gain
from dskd_batch.errors import DskdError


def fake_report(scores: list[list[float]], nll: list[tuple[float, int]] | None = None, fp: str = "abc") -> dict:
    """An evaluation report of one test set: scores[example][sampling seed] (Rouge-L)."""
    gens = []
    for i, per_seed in enumerate(scores):
        g = {"id": f"ex{i}", "scores": {"rougeL": {str(10 * (k + 1)): v for k, v in enumerate(per_seed)}}}
        if nll is not None:
            g["nll"] = {"nats": nll[i][0], "tokens": nll[i][1]}
        gens.append(g)
    per_seed = np.mean(np.array(scores, dtype=float), axis=0).tolist()
    return {"sets": {"test": {"primary": "rougeL", "data_fingerprint": fp, "examples": len(scores),
                              "metrics": {"rougeL": {"per_seed": per_seed, "mean": statistics.fmean(per_seed),
                                                     "std": statistics.pstdev(per_seed)}},
                              "generations": gens}}}


def test_a_constant_gain_is_exact_and_certain() -> None:
    rng = np.random.default_rng(1)
    base = [fake_report(rng.uniform(0, 100, (30, 3)).tolist()) for _ in range(3)]
    better = [fake_report([[v + 2.5 for v in g] for g in
                           [list(x["scores"]["rougeL"].values()) for x in b["sets"]["test"]["generations"]]])
              for b in base]
    g = paired_gain(base, better, "test", resamples=2000)
    assert g["score"]["delta"] == pytest.approx(2.5)
    # the training seeds are drawn independently for the two runs, so the interval is wider than a
    # point, around the gain
    assert g["score"]["ci"][0] < 2.5 < g["score"]["ci"][1]
    one = paired_gain(base[:1], better[:1], "test", resamples=2000)  # one seed each: pairing is exact
    assert one["score"]["ci"] == pytest.approx([2.5, 2.5]) and one["score"]["p"] == 0.0
    assert paired_gain(better[:1], base[:1], "test", resamples=2000)["score"]["p"] == 1.0
    assert g["train_seeds"] == [3, 3] and g["examples"] == 30 and "nll" not in g


def test_the_interval_matches_the_normal_approximation() -> None:
    """One seed each: the bootstrap interval of a mean paired difference over n = 400 examples is
    close to mean ± 1.96 sd / sqrt(n), and the p-value to the normal tail."""
    rng = np.random.default_rng(7)
    n = 400
    a = rng.uniform(0, 100, n)
    diff = rng.normal(1.0, 12.0, n)
    g = paired_gain([fake_report([[x] for x in a])], [fake_report([[x] for x in a + diff])], "test", resamples=20000)
    m, se = float(diff.mean()), float(diff.std(ddof=1)) / math.sqrt(n)
    assert g["score"]["delta"] == pytest.approx(m)
    assert g["score"]["ci"][0] == pytest.approx(m - 1.96 * se, abs=0.1 * se)
    assert g["score"]["ci"][1] == pytest.approx(m + 1.96 * se, abs=0.1 * se)
    assert g["score"]["p"] == pytest.approx(statistics.NormalDist().cdf(-m / se), abs=0.02)


def test_nll_is_nats_per_token_over_the_drawn_examples() -> None:
    scores = [[50.0]] * 4
    base = fake_report(scores, [(2.0, 2), (6.0, 3), (1.0, 1), (3.0, 4)])  # 12 nats / 10 tokens
    other = fake_report(scores, [(1.0, 2), (6.0, 3), (0.5, 1), (3.0, 4)])  # 10.5 / 10
    g = paired_gain([base], [other], "test", resamples=3000)
    assert g["nll"]["delta"] == pytest.approx(-0.15)
    # the other run is better on examples 0 and 2 and equal on 1 and 3: a resample shows no gain
    # exactly when it draws only examples 1 and 3, which happens with probability (2/4)^4
    assert g["nll"]["ci"][1] <= 0 and g["nll"]["p"] == pytest.approx(0.5 ** 4, abs=0.015)
    assert g["score"]["delta"] == 0.0 and g["score"]["p"] == 1.0  # equal scores: no gain


def test_unpaired_reports_are_refused() -> None:
    a = fake_report([[1.0], [2.0]])
    with pytest.raises(DskdError, match="different test sets"):
        paired_gain([a], [fake_report([[1.0], [2.0]], fp="other")], "test")
    with pytest.raises(DskdError, match="its training seeds were scored on different test sets"):
        paired_gain([a, fake_report([[1.0], [2.0], [3.0]])], [a], "test")


def test_report_baseline_from_the_command_line(tmp_path) -> None:
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 60, (50, 2))
    for name, shift in (("sft", 0.0), ("kd", 8.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "report.json").write_text(json.dumps(fake_report((base + shift).tolist())))
    r = CliRunner().invoke(main, ["report", str(tmp_path / "sft"), str(tmp_path / "kd"), "--baseline", "sft"])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("| kd | test |"))
    assert "+8.00 [+8.00, +8.00] | 0.000" in row
    r = CliRunner().invoke(main, ["report", str(tmp_path / "sft"), str(tmp_path / "kd"), "--baseline", "sfft"])
    assert r.exit_code != 0 and "no such run" in r.output

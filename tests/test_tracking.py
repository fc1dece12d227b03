"""Experiment tracking: --log-to mirrors metrics.jsonl into TensorBoard / W&B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dskd_batch.config import DistillConfig
from dskd_batch.train.distill import run
from dskd_batch.errors import DskdError


def _cfg(student: Path, cache: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(student), cache=str(cache), out=str(out), method="kd", batch_size=2, lr=1e-3,
                max_steps=4, device="cpu", lr_schedule="constant", eval_data=str(cache), eval_steps=2)
    base.update(kw)
    return DistillConfig(**base)


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_equal_metrics_jsonl(fp32_cache, gpt2_student, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run(_cfg(gpt2_student, fp32_cache, tmp_path / "run", log_to="tensorboard"))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    recs = _jsonl(out)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_ce" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    for name, group, rows in (("loss", "train/loss", train), ("kd", "train/kd", train), ("ce", "train/ce", train),
                              ("lr", "train/lr", train), ("eval_ce", "eval/ce", evals), ("eval_kl", "eval/kl", evals),
                              ("eval_top1", "eval/top1", evals)):
        assert group in tags, (group, tags)
        got = [(e.step, e.value) for e in acc.Scalars(group)]
        assert [s for s, _ in got] == [r["step"] for r in rows]
        assert [v for _, v in got] == pytest.approx([r[name] for r in rows], rel=1e-6)  # events hold float32


def test_resume_with_tracker_appends_without_repeating_steps(fp32_cache, gpt2_student, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(_cfg(gpt2_student, fp32_cache, out, max_steps=4, save_steps=2, log_to="tensorboard", eval_data=None))
    # a rerun of the last two steps from the step-2 checkpoint, as after a kill: the tracker is resumable
    import shutil

    ck = sorted((out / "checkpoints").iterdir())
    shutil.rmtree(ck[-1])
    run(_cfg(gpt2_student, fp32_cache, out, max_steps=4, save_steps=2, log_to="tensorboard", eval_data=None,
             resume=True))
    assert [r["step"] for r in _jsonl(out)] == [1, 2, 3, 4]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4]  # TensorBoard shows the last value written per step


def test_wandb_offline_run(fp32_cache, gpt2_student, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run(_cfg(gpt2_student, fp32_cache, tmp_path / "run", log_to="wandb", eval_data=None, max_steps=2))
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    run_id = (out / ".wandb-id").read_text().strip()
    assert run_id in files[0].name
    # the run's records are protobuf (HistoryItem: key, then value_json as text); read the logged losses back
    import re

    raw = files[0].read_bytes()
    logged = [float(v) for v in re.findall(rb"train/loss\x82\x01.([-0-9.e+]+)", raw, flags=re.S)]
    logged = list(dict.fromkeys(logged))  # each step's value comes as a history row and a summary update
    assert logged == pytest.approx([r["loss"] for r in _jsonl(out)])


def test_unknown_or_missing_tracker_refused(fp32_cache, gpt2_student, tmp_path, monkeypatch):
    with pytest.raises(DskdError, match="log_to must be one of none, tensorboard, wandb"):
        _cfg(gpt2_student, fp32_cache, tmp_path / "a", log_to="mlflow")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    with pytest.raises(DskdError, match="needs the `tensorboard` package"):
        run(_cfg(gpt2_student, fp32_cache, tmp_path / "b", log_to="tensorboard"))
    assert not (tmp_path / "b" / "metrics.jsonl").exists()

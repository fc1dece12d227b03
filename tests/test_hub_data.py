"""`--data hf:ORG/NAME[:CONFIG][@SPLIT]` with `--columns`: a dataset saved in the Hugging Face
datasets cache inside the test (no network) is cached, distilled from and mapped onto row fields;
a dataset that is not there is one clear error that says how to get it."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import pytest

from dskd_batch.errors import DskdError


def _hub_cached(tmp: Path, name: str, rows: list[dict]) -> Path:
    """``name`` (ORG/NAME) as `datasets` caches a hub dataset once loaded: arrow files under
    ORG___NAME/default/0.0.0/HASH in the datasets cache (here built from a local JSON file)."""
    import datasets

    src = tmp / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    datasets.load_dataset("json", data_files={"train": str(src)}, cache_dir=str(tmp / "build"))
    built = next(p for p in glob.glob(str(tmp / "build" / "json" / "*" / "*" / "*")) if os.path.isdir(p))
    org, short = name.split("/")
    dst = tmp / "cache" / f"{org}___{short}" / "default" / "0.0.0" / Path(built).name
    shutil.copytree(built, dst)
    for f in dst.iterdir():
        if f.name.startswith("json-"):
            f.rename(dst / (short + "-" + f.name[len("json-"):]))
    return tmp / "cache"


ROWS = [{"question": q, "answer": a, "id": i} for i, (q, a) in enumerate([
    ("Name a primary colour.", "Red."), ("What is two plus three?", "Five."), ("Capital of Italy?", "Rome."),
    ("Say hello in Spanish.", "Hola."), ("Sort 5, 2, 9.", "2, 5, 9"), ("Describe the sea.", "Vast and salty.")])]


def test_hub_dataset_with_a_column_mapping(llama_teacher, gpt2_student, tmp_path, monkeypatch) -> None:
    import datasets

    from dskd_batch import open_cache
    from dskd_batch.teacher.caching import run as cache_run
    from dskd_batch.config import CacheConfig, DistillConfig
    from dskd_batch.data import load_examples
    from dskd_batch.train.distill import run as distill_run

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(_hub_cached(tmp_path, "acme/qa", ROWS)))
    assert datasets.config.HF_HUB_OFFLINE
    got = load_examples("hf:acme/qa@train", columns="prompt=question,response=answer").examples
    assert [(e.instruction, e.response) for e in got] == [(r["question"], r["answer"]) for r in ROWS]
    assert got[0].source == "hf:acme/qa@train#0"

    with pytest.raises(DskdError, match="no column 'reply'.*the row has answer, id, question"):
        load_examples("hf:acme/qa", columns="prompt=question,response=reply")
    with pytest.raises(DskdError, match="is not FIELD=COLUMN"):
        CacheConfig(teacher="t", data="hf:acme/qa", out="o", columns="prompt")
    with pytest.raises(DskdError) as e:
        load_examples("hf:acme/not-downloaded")
    assert "cannot load the dataset 'acme/not-downloaded'" in str(e.value)
    assert "datasets.load_dataset('acme/not-downloaded')" in str(e.value)  # how to get it

    out = tmp_path / "hub-cache"
    cache_run(CacheConfig(teacher=str(llama_teacher), data="hf:acme/qa", columns="prompt=question,response=answer",
                          out=str(out), hidden="fp32", top_k=4, max_len=64), progress=False)
    c = open_cache(out)
    assert len(c) == len(ROWS) and c[2]["response"] == "Rome."
    run = distill_run(DistillConfig(student=str(gpt2_student), out=str(tmp_path / "run"), cache=str(out), batch_size=2,
                                    max_steps=2, lr=1e-3, device="cpu"))
    assert (run / "student" / "config.json").exists()


def test_a_new_user_from_init_pipeline_to_a_report(llama_teacher, corpus, tmp_path, monkeypatch) -> None:
    """As a new user would: write a pipeline with init-pipeline for a tiny teacher over a hub
    dataset with a column mapping, check it with --dry-run, run it (a few steps, --set), read the report."""
    import datasets
    from click.testing import CliRunner

    from dskd_batch.cli import main

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(_hub_cached(tmp_path, "acme/qa", ROWS)))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["init-pipeline", "--teacher", str(llama_teacher), "--data", "hf:acme/qa",
                                  "--columns", "prompt=question,response=answer", "--layers", "1", "--test",
                                  str(corpus), "--out", "mine.toml"])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "mine.toml").read_text()
    assert 'columns = "prompt=question,response=answer"' in text and "[[runs]]" in text
    sets = ["--set", "distill.max_steps=2", "--set", "distill.batch_size=2", "--set", "distill.lr=1e-3",
            "--set", "evaluate.limit=2", "--set", "evaluate.max_new_tokens=4", "--set", 'evaluate.seeds="1"',
            "--set", "cache.max_len=64", "--out", "mine-out"]
    r = CliRunner().invoke(main, ["run", "mine.toml", "--dry-run", *sets])
    assert r.exit_code == 0 and "distill kd: would run" in r.output, r.output
    r = CliRunner().invoke(main, ["run", "mine.toml", *sets])
    assert r.exit_code == 0, r.output
    report = (tmp_path / "mine-out" / "report.md").read_text()
    assert all(name in report for name in ("sft", "kd", "dskd"))
    bad = CliRunner().invoke(main, ["run", "mine.toml", "--set", "distill.lrr=1"])
    assert bad.exit_code == 2 and "lrr" in bad.output

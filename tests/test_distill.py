"""Stage two end to end on tiny models: from-cache vs live, normalisation, resume, outputs, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dskd_batch.config import DistillConfig
from dskd_batch.distill import run
from dskd_batch.errors import DskdError


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cfg(student: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(student), out=str(out), batch_size=2, grad_accum=2, lr=1e-3, projector_lr=1e-3,
                max_steps=3, verify="full", device="cpu", lr_schedule="constant")
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.parametrize("method", ["sft", "kd", "dskd"])
def test_methods_run_and_write_outputs(method, fp32_cache, gpt2_student, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run(cfg(gpt2_student, tmp_path / "run", cache=str(fp32_cache), method=method))
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["ce"] > 0 for r in m)
    if method != "sft":
        assert all(r["kd"] > 0 for r in m)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["fingerprints"]["cache"]
    model = AutoModelForCausalLM.from_pretrained(str(out / "student"))
    assert model.config.n_embd == 24
    assert (out / "projectors.safetensors").exists() == (method == "dskd")

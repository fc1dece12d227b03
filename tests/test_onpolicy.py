"""On-policy distillation: ratio 0 is cache-only training exactly; ratio 1 runs the live teacher on
the student's own samples every batch (checked by watching both); after N epochs; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dskd_batch.config import DistillConfig
from dskd_batch.train.distill import run
from dskd_batch.errors import DskdError
from test_distill import cfg as distill_cfg
from test_distill import metrics


def cfg(student: Path, out: Path, **kw) -> DistillConfig:
    return distill_cfg(student, out, **{"verify": "lazy", **kw})


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "student" / "model.safetensors"))


@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_ratio_zero_is_cache_only_training(method, fp32_cache, llama_teacher, gpt2_student, tmp_path):
    a = run(cfg(gpt2_student, tmp_path / "cache", cache=str(fp32_cache), method=method))
    b = run(cfg(gpt2_student, tmp_path / "op0", cache=str(fp32_cache), teacher=str(llama_teacher), method=method,
                on_policy=True, student_gen_ratio=0.0))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]
    assert all(r["on_policy_share"] == 0.0 for r in metrics(b))


def test_ratio_one_scores_the_students_samples_every_batch(fp32_cache, llama_teacher, gpt2_student, tmp_path,
                                                           monkeypatch):
    import dskd_batch.train.onpolicy as op
    from dskd_batch.teacher.source import Teacher

    sampled: list[list[list[int]]] = []
    scored: list[list[list[int]]] = []
    real_sample, real_call = op.sample_responses, Teacher.__call__

    def spy_sample(model, prompts, **kw):
        new = real_sample(model, prompts, **kw)
        sampled.append([p + n for p, n in zip(prompts, new)])
        return new

    def spy_call(self, sequences, **kw):
        scored.append([list(s) for s in sequences])
        return real_call(self, sequences, **kw)

    monkeypatch.setattr(op, "sample_responses", spy_sample)
    monkeypatch.setattr(Teacher, "__call__", spy_call)
    out = run(cfg(gpt2_student, tmp_path / "op1", cache=str(fp32_cache), teacher=str(llama_teacher), method="dskd",
                  on_policy=True, student_gen_ratio=1.0))
    # one probe call when the teacher loads, then one call per micro-batch: 3 steps x 2 micro-batches
    assert len(sampled) == 6 and len(scored) == 7
    eos = 0
    for s, t in zip(sampled, scored[1:]):
        assert t == [x + [eos] for x in s]  # the teacher read exactly the student's samples (+ EOS)
    from dskd_batch.cache.reader import open_cache

    cache = open_cache(fp32_cache)
    truth = {tuple(cache[i]["input_ids"].tolist()) for i in range(len(cache))}
    assert any(tuple(x) not in truth for batch in scored[1:] for x in batch)  # samples, not the cached texts
    m = metrics(out)
    assert all(r["on_policy_share"] == 1.0 and r["sample_len"] > 0 and r["teacher_s_per_batch"] > 0 for r in m)
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in m)
    info = json.loads((out / "run.json").read_text())
    assert info["peak_memory"]["teacher_devices"] == "cpu"


def test_on_policy_after_epochs(fp32_cache, llama_teacher, gpt2_student, tmp_path):
    # 13 examples, global batch 4: 3 steps per epoch; 2 epochs, on-policy from the second
    out = run(cfg(gpt2_student, tmp_path / "after", cache=str(fp32_cache), teacher=str(llama_teacher), method="kd",
                  on_policy=True, student_gen_ratio=1.0, on_policy_after_epochs=1, max_steps=None, epochs=2))
    share = [r["on_policy_share"] for r in metrics(out)]
    assert share == [0.0] * 3 + [1.0] * 3


def test_half_ratio_mixes_and_resumes_the_same_choices(fp32_cache, llama_teacher, gpt2_student, tmp_path):
    from dskd_batch.train.onpolicy import OnPolicy, OnPolicySettings

    op = OnPolicy(None, None, None, OnPolicySettings(0.5, 0, 96, 64, "alpaca", seed=3))
    picks = [op.active(e, k) for e in range(4) for k in range(50)]
    assert 60 < sum(picks) < 140  # about half
    assert picks == [op.active(e, k) for e in range(4) for k in range(50)]  # a pure function of (seed, epoch, step)


def test_on_policy_refusals(fp32_cache, gpt2_teacher, llama_teacher, gpt2_student, tmp_path):
    with pytest.raises(DskdError, match="not the teacher cache"):
        run(cfg(gpt2_student, tmp_path / "r1", cache=str(fp32_cache), teacher=str(gpt2_teacher), method="kd",
                on_policy=True))
    with pytest.raises(DskdError, match="--on-policy needs --cache"):
        cfg(gpt2_student, tmp_path / "r2", cache=str(fp32_cache), method="kd", on_policy=True)
    with pytest.raises(DskdError, match="no KD term"):
        cfg(gpt2_student, tmp_path / "r3", cache=str(fp32_cache), teacher=str(llama_teacher), method="sft",
            on_policy=True)
    with pytest.raises(DskdError, match="together are for --on-policy"):
        cfg(gpt2_student, tmp_path / "r4", cache=str(fp32_cache), teacher=str(llama_teacher), method="kd")


@pytest.mark.slow
def test_torchrun_fsdp_on_policy_equals_ddp(fp32_cache, llama_teacher, gpt2_student, tmp_path):
    """--parallel fsdp --on-policy: each process samples from an unsharded copy that the sharded
    student's weights are gathered into once per step, so two FSDP processes draw the same samples,
    losses and final weights as two DDP processes (whose students are whole)."""
    import os
    import subprocess
    import sys

    from test_distill import assert_close_weights

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")

    def torchrun(out: Path, parallel: str, port: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "dskd_batch", "distill", "--cache", str(fp32_cache), "--teacher", str(llama_teacher),
               "--student", str(gpt2_student), "--out", str(out), "--method", "kd", "--on-policy",
               "--student-gen-ratio", "1", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2",
               "--max-steps", "3", "--device", "cpu", "--lr-schedule", "constant", "--parallel", parallel,
               "--verify", "lazy"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]

    torchrun(tmp_path / "ddp", "ddp", 29571)
    torchrun(tmp_path / "fsdp", "fsdp", 29572)
    ma, mb = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb):
        assert ra["on_policy_share"] == rb["on_policy_share"] == 1.0
        assert ra["sample_len"] == rb["sample_len"]  # the same samples
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    # the weights moved, so later steps sampled from trained weights, the same ones in both runs
    assert_close_weights(weights(tmp_path / "ddp"), weights(tmp_path / "fsdp"), atol=1e-5)

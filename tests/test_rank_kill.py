"""Killing one process of a distributed run (torchrun, 2 processes, gloo on CPU) with SIGKILL at a
random moment: the job ends within a bounded time with a clear message, nothing partial is taken as
complete, and the same command resumes to what an uninterrupted run writes (cache arrays equal;
student bit-identical)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_same_cache, subprocess_env

TRIALS = 5
ENDS_WITHIN_S = 120
STOPPED = "stopped: another process of this job failed"


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _torchrun(args: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "--max-restarts", "0", "-m", "dskd_batch", *args]


def _kill_one_rank(cmd: list[str], ready, rng: random.Random, tmp: Path) -> tuple[int | None, str]:
    """Start ``cmd``, wait until ``ready()`` and a random moment more, SIGKILL one of its two
    workers; (torchrun's exit code, its output), or (None, ...) when the run finished first."""
    log = tmp / f"log-{rng.random():.6f}.txt"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline and not ready() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        workers = _children(proc.pid)
        if proc.poll() is not None or len(workers) < 2:
            proc.wait(ENDS_WITHIN_S)
            return None, log.read_text()
        os.kill(rng.choice(sorted(workers)), signal.SIGKILL)
        t = time.time()
        try:
            code = proc.wait(ENDS_WITHIN_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the job did not end within {ENDS_WITHIN_S} s of losing a process")
        assert time.time() - t < ENDS_WITHIN_S
    if code == 0:  # the worker had already exited 0 when the signal came (a SIGKILLed worker fails the job)
        return None, log.read_text()
    return code, log.read_text()


@pytest.mark.slow
def test_cache_teacher_survives_losing_a_rank(llama_teacher, corpus, tmp_path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text(corpus.read_text() * 20)  # 260 examples, 87 shards
    args = ["cache-teacher", "--teacher", str(llama_teacher), "--data", str(big), "--hidden", "fp32", "--top-k", "8",
            "--batch-tokens", "300", "--shard-size", "3", "--max-len", "64", "--device", "cpu"]
    ref = tmp_path / "ref"
    assert subprocess.run(_torchrun([*args, "--out", str(ref)], 29611), env=subprocess_env(),
                          capture_output=True).returncode == 0
    rng = random.Random(0)
    mid_run = said = 0
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        cmd = _torchrun([*args, "--out", str(out)], 29612 + trial)
        code, text = _kill_one_rank(cmd, lambda: len(list((out / "shards").glob("shard.?????"))) >= 2, rng, tmp_path)
        if code is not None:
            assert code != 0 and ("SIGKILL" in text or "Signal 9" in text), text[-2000:]
            if (out / "manifest.json").exists():  # killed after the last shard: the manifest lists them all
                import json

                assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 87
            else:
                mid_run += 1
                said += STOPPED in text
        r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert not list(out.rglob("*.tmp-*"))
        assert_same_cache(out, ref)
    assert mid_run >= 1 and said >= 1, (mid_run, said)  # the kills did land mid-run, and the survivor said why


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_distill_survives_losing_a_rank(parallel, fp32_cache, gpt2_student, tmp_path) -> None:
    from safetensors.torch import load_file

    args = ["distill", "--cache", str(fp32_cache), "--student", str(gpt2_student), "--method", "kd", "--batch-size",
            "1", "--grad-accum", "1", "--lr", "1e-3", "--max-steps", "12", "--save-steps", "1", "--device", "cpu",
            "--lr-schedule", "constant", "--parallel", parallel, "--epochs", "3"]
    port = 29631 if parallel == "ddp" else 29651
    ref = tmp_path / "ref"
    p = subprocess.run(_torchrun([*args, "--out", str(ref)], port), env=subprocess_env(), capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    want = load_file(str(ref / "student" / "model.safetensors"))
    rng = random.Random(1 if parallel == "ddp" else 2)
    mid_run = 0
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        cmd = _torchrun([*args, "--out", str(out)], port + 1 + trial)
        code, text = _kill_one_rank(cmd, lambda: (out / "checkpoints").exists() and any(
            p.name.startswith("step-") and "tmp" not in p.name for p in (out / "checkpoints").iterdir()), rng, tmp_path)
        if code is not None:
            assert code != 0 and ("SIGKILL" in text or "Signal 9" in text), text[-2000:]
            finished = (out / "run.json").exists() and '"status": "done"' in (out / "run.json").read_text()
            mid_run += not finished
            assert finished or not (out / "student" / "model.safetensors").exists()
        r = subprocess.run([*cmd, "--resume"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        got = load_file(str(out / "student" / "model.safetensors"))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"trial {trial}: the resumed student differs"
    assert mid_run >= 1

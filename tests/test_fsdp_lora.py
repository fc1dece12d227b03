"""--parallel fsdp with --lora-rank: FSDP2 shards a LoRA-wrapped student (frozen base, trainable
adapters); two processes equal one, the outputs are laid out as a one-process LoRA run's (RUN/adapter,
RUN/student merged), and a sharded LoRA run resumes from its checkpoint to the same end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_distill import assert_close_weights, cfg, metrics, run


@pytest.mark.slow
def test_torchrun_fsdp_lora_equals_single_process(fp32_cache, gpt2_student, tmp_path):
    from safetensors.torch import load_file

    single = run(cfg(gpt2_student, tmp_path / "single", cache=str(fp32_cache), method="kd", grad_accum=4,
                     lora_rank=4, lr=1e-2))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561", "-m",
           "dskd_batch", "distill", "--cache", str(fp32_cache), "--student", str(gpt2_student), "--out", str(out),
           "--method", "kd", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--max-steps", "3",
           "--device", "cpu", "--lr-schedule", "constant", "--parallel", "fsdp", "--lora-rank", "4",
           "--verify", "full", "--save-steps", "1"]

    def torchrun(*more: str) -> None:
        p = subprocess.run(cmd + list(more), env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]

    def same_outputs() -> None:
        for sub in ("student", "adapter"):
            assert {f.name for f in (single / sub).iterdir()} == {f.name for f in (out / sub).iterdir()}, sub
        assert_close_weights(load_file(str(single / "student" / "model.safetensors")),
                             load_file(str(out / "student" / "model.safetensors")), atol=1e-5)
        assert_close_weights(load_file(str(single / "adapter" / "adapter_model.safetensors")),
                             load_file(str(out / "adapter" / "adapter_model.safetensors")), atol=1e-5)

    torchrun()
    for ra, rb in zip(metrics(single), metrics(out)):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    same_outputs()
    # the merged student differs from the base: the adapters trained
    base = load_file(str(gpt2_student / "model.safetensors"))
    merged = load_file(str(out / "student" / "model.safetensors"))
    assert any(float((merged[k] - base[k]).abs().max()) > 1e-4 for k in merged if k in base)
    # resume a sharded LoRA run from its step-2 checkpoint: the same end
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    shutil.rmtree(out / "student")
    shutil.rmtree(out / "adapter")
    torchrun("--resume")
    same_outputs()

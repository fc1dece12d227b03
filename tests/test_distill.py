"""Stage two end to end on tiny models: from-cache vs live, normalisation, resume, outputs, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dskd_batch.config import DistillConfig
from dskd_batch.train.distill import run
from dskd_batch.errors import DskdError


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cfg(student: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(student), out=str(out), batch_size=2, grad_accum=2, lr=1e-3, projector_lr=1e-3,
                max_steps=3, verify="full", device="cpu", lr_schedule="constant")
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.parametrize("method", ["sft", "kd", "dskd", "kd:teacher-correct"])
def test_methods_run_and_write_outputs(method, fp32_cache, gpt2_student, tmp_path):
    from transformers import AutoModelForCausalLM

    method, _, positions = method.partition(":")
    out = run(cfg(gpt2_student, tmp_path / "run", cache=str(fp32_cache), method=method, kd_positions=positions or "all"))
    m = metrics(out)
    if positions:  # the share of positions whose teacher top-1 is the target, logged
        assert all(0.0 <= r["kd_kept"] <= 1.0 for r in m)
    else:
        assert all("kd_kept" not in r for r in m)
    assert [r["step"] for r in m] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["ce"] > 0 for r in m)
    for r in m:  # the logged loss is the method's combination of its logged terms
        expected = r["ce"] if method == "sft" else 0.5 * r["ce"] + 0.5 * r["kd"]
        assert r["loss"] == pytest.approx(expected, rel=1e-6)
    if method != "sft":
        assert all(r["kd"] > 0 for r in m)
    if method == "dskd":  # KD = CE_t2s + KD_student + KD_teacher
        assert all(r["kd"] == pytest.approx(r["t2s_ce"] + r["t2s_kd"] + r["s2t_kd"], rel=1e-6) for r in m)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["fingerprints"]["cache"]
    model = AutoModelForCausalLM.from_pretrained(str(out / "student"))
    assert model.config.n_embd == 24
    assert (out / "projectors.safetensors").exists() == (method == "dskd")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    w = load_file(str(run_dir / "student" / "model.safetensors"))
    if (run_dir / "projectors.safetensors").exists():
        w.update({f"proj.{k}": v for k, v in load_file(str(run_dir / "projectors.safetensors")).items()})
    return w


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


def test_teacher_never_loaded(llama_teacher, corpus, gpt2_student, tmp_path):
    """Cache with a copy of the teacher, delete the copy, distil DSKD from the cache."""
    from dskd_batch.teacher.caching import run as cache_run
    from dskd_batch.config import CacheConfig

    teacher = tmp_path / "teacher"
    shutil.copytree(llama_teacher, teacher)
    cache = tmp_path / "cache"
    cache_run(CacheConfig(teacher=str(teacher), data=str(corpus), out=str(cache), hidden="fp16", max_len=96,
                          max_prompt_len=64), progress=False)
    shutil.rmtree(teacher)
    out = run(cfg(gpt2_student, tmp_path / "run", cache=str(cache), method="dskd", max_steps=2))
    assert len(metrics(out)) == 2


@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_from_cache_equals_live(method, fp32_cache, llama_teacher, corpus, gpt2_student, tmp_path):
    """Same seed and order: an fp32 cache and the live teacher give the same loss trajectory."""
    common = dict(method=method, max_steps=4, shuffle="global", max_len=96, max_prompt_len=64)
    a = run(cfg(gpt2_student, tmp_path / "cache-run", cache=str(fp32_cache), **common))
    b = run(cfg(gpt2_student, tmp_path / "live-run", teacher=str(llama_teacher), data=str(corpus), **common))
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) == 4
    assert "teacher_s" in mb[0] and "teacher_s" not in ma[0]  # the live teacher really ran
    for ra, rb in zip(ma, mb):
        for key in ("loss", "ce", "kd"):
            # fp32 to rounding; the absolute floor covers a KD term of ~3e-3 (torch 2.5's kernels differ by 3e-8)
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (key, ra, rb)
    assert_close_weights(final_weights(a), final_weights(b), atol=1e-5)


def test_normalised_by_step_tokens(fp32_cache, gpt2_student, tmp_path):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4 (same global batches, same result)."""
    a = run(cfg(gpt2_student, tmp_path / "b8", cache=str(fp32_cache), method="dskd", batch_size=8, grad_accum=1))
    b = run(cfg(gpt2_student, tmp_path / "b2", cache=str(fp32_cache), method="dskd", batch_size=2, grad_accum=4))
    for ra, rb in zip(metrics(a), metrics(b)):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["response_tokens"] == rb["response_tokens"]
    assert_close_weights(final_weights(a), final_weights(b), atol=2e-6)


def dropout_student(gpt2_student: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(gpt2_student))
    m.config.resid_pdrop = m.config.embd_pdrop = m.config.attn_pdrop = 0.1
    m.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gpt2_student)).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("length_group", [1, 2])
def test_exact_resume(fp32_cache, gpt2_student, tmp_path, length_group):
    """Killed mid-epoch after step 5 (checkpoint at 4), resumed: same weights as an uninterrupted run.
    The student has dropout, so the RNG state must be restored too; a length-grouped order is
    resumed as exactly."""
    student = dropout_student(gpt2_student, tmp_path / "student")
    common = dict(cache=str(fp32_cache), method="dskd", max_steps=7, save_steps=2, lr_schedule="cosine",
                  warmup_ratio=0.2, batch_size=2, grad_accum=1, length_group=length_group)
    full = run(cfg(student, tmp_path / "full", **common))

    class Killed(Exception):
        pass

    def kill(step: int) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        run(cfg(student, tmp_path / "resumed", **common), on_step=kill)
    assert not (tmp_path / "resumed" / "student").exists()
    resumed = run(cfg(student, tmp_path / "resumed", resume=True, **common))
    wa, wb = final_weights(full), final_weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [r["step"] for r in metrics(resumed)]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # step 5 was logged, lost with the kill, redone, and logged once
    assert [r["loss"] for r in metrics(full)] == pytest.approx([r["loss"] for r in metrics(resumed)], rel=1e-6)


def test_lora_adapter_and_merged_student(fp32_cache, gpt2_student, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run(cfg(gpt2_student, tmp_path / "lora", cache=str(fp32_cache), method="kd", lora_rank=4, lora_alpha=8,
                  lr=5e-2, max_steps=2))
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "student")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(gpt2_student)).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(gpt2_student)), str(out / "adapter")).eval()
    x = torch.tensor([[5, 17, 33, 60, 2]])
    with torch.no_grad():
        lm, la, lb = merged(x).logits, with_adapter(x).logits, base(x).logits
    assert torch.allclose(lm, la, atol=1e-4)
    assert not torch.allclose(lm, lb, atol=1e-4)  # training changed something


def other_tokenizer_student(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a different corpus gives a different vocabulary"] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_embd=16, n_layer=1, n_head=2))
    m.save_pretrained(str(tmp_path))
    fast.save_pretrained(str(tmp_path))
    return tmp_path


def test_refusals(fp32_cache, llama_teacher, corpus, gpt2_student, tmp_path):
    from dskd_batch.teacher.caching import run as cache_run
    from dskd_batch.config import CacheConfig

    with pytest.raises(DskdError, match="align") as e:
        run(cfg(other_tokenizer_student(tmp_path / "other"), tmp_path / "r1", cache=str(fp32_cache), method="kd"))
    assert "tokenizer" in str(e.value)

    nohidden = tmp_path / "nohidden"
    cache_run(CacheConfig(teacher=str(llama_teacher), data=str(corpus), out=str(nohidden), hidden="none", max_len=96,
                          max_prompt_len=64), progress=False)
    with pytest.raises(DskdError, match="hidden none") as e:
        run(cfg(gpt2_student, tmp_path / "r2", cache=str(nohidden), method="dskd"))
    assert "--hidden fp16" in str(e.value)
    run(cfg(gpt2_student, tmp_path / "r2b", cache=str(nohidden), method="kd", max_steps=1))  # top-k suffices for KD

    with pytest.raises(DskdError, match="seqkd"):
        run(cfg(gpt2_student, tmp_path / "r3", cache=str(fp32_cache), method="seqkd"))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(fp32_cache, corrupt)
    victim = next(p for p in sorted((corrupt / "shards" / "shard.00001" / "positions" / "hidden").rglob("*")) if p.is_file() and p.name != "zarr.json")
    victim.write_bytes(victim.read_bytes()[:-3] + b"xyz")
    with pytest.raises(DskdError, match="shard.00001"):
        run(cfg(gpt2_student, tmp_path / "r4", cache=str(corrupt), method="dskd"))
    assert not (tmp_path / "r4").exists()  # refused before anything was written

    with pytest.raises(DskdError, match="global batch"):
        run(cfg(gpt2_student, tmp_path / "r5", cache=str(fp32_cache), batch_size=8, grad_accum=4))

    done = run(cfg(gpt2_student, tmp_path / "r6", cache=str(fp32_cache), method="sft", max_steps=1))
    with pytest.raises(DskdError, match="--resume"):
        run(cfg(gpt2_student, tmp_path / "r6", cache=str(fp32_cache), method="sft", max_steps=1))
    ck = sorted((done / "checkpoints").iterdir())[-1]
    (ck / "optim.pt").write_bytes(b"garbage")
    with pytest.raises(DskdError, match="optim.pt"):
        run(cfg(gpt2_student, tmp_path / "r6", cache=str(fp32_cache), method="sft", max_steps=2, resume=True))


@pytest.mark.slow
def test_torchrun_ddp_equals_single_process(fp32_cache, gpt2_student, tmp_path):
    """2 processes x batch 2 x accumulation 2 == 1 process x batch 2 x accumulation 4 (same global batch)."""
    import os
    import subprocess
    import sys

    single = run(cfg(gpt2_student, tmp_path / "single", cache=str(fp32_cache), method="dskd", grad_accum=4))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "dskd_batch", "distill", "--cache", str(fp32_cache), "--student", str(gpt2_student),
           "--out", str(tmp_path / "ddp"), "--method", "dskd", "--batch-size", "2", "--grad-accum", "2",
           "--lr", "1e-3", "--projector-lr", "1e-3", "--max-steps", "3", "--device", "cpu", "--lr-schedule", "constant"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    ddp = tmp_path / "ddp"
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    for ra, rb in zip(metrics(single), metrics(ddp)):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    assert_close_weights(final_weights(single), final_weights(ddp), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("keep_best", [False, True])
def test_torchrun_fsdp_equals_single_process(fp32_cache, gpt2_student, tmp_path, keep_best):
    """--parallel fsdp (FSDP2 fully_shard, gloo on CPU): 2 processes equal 1 with the same global batch, the
    checkpoints and the exported student hold full tensors, held-out evaluation and --keep-best work,
    and a resumed sharded run ends where an uninterrupted one does."""
    import os
    import subprocess
    import sys

    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"prompt": "Capital of Spain?", "response": "Madrid."}\n'
                   '{"prompt": "Name a fruit.", "response": "A pear."}\n{"prompt": "Say hi.", "response": "Hi!"}\n')
    extra = dict(eval_data=str(dev), keep_best="eval_ce", eval_steps=1) if keep_best else {}
    single = run(cfg(gpt2_student, tmp_path / "single", cache=str(fp32_cache), method="dskd", grad_accum=4,
                     loss_chunk=5, **extra))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")

    def torchrun(out: Path, *more: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29551 + keep_best), "-m", "dskd_batch", "distill", "--cache", str(fp32_cache), "--student",
               str(gpt2_student), "--out", str(out), "--method", "dskd", "--batch-size", "2", "--grad-accum", "2",
               "--lr", "1e-3", "--projector-lr", "1e-3", "--max-steps", "3", "--device", "cpu", "--lr-schedule",
               "constant", "--parallel", "fsdp", "--loss-chunk", "5", "--verify", "full",
               *(["--eval-data", str(dev), "--keep-best", "eval_ce", "--eval-steps", "1"] if keep_best else []), *more]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        said = "\n".join(x for x in p.stderr.splitlines() if "error:" in x[:40] or "fix:" in x[:40])
        assert p.returncode == 0, said + "\n" + p.stdout[-3000:] + p.stderr[-5000:]  # a rank's own error first

    fsdp = tmp_path / "fsdp"
    torchrun(fsdp, "--save-steps", "1")
    assert json.loads((fsdp / "run.json").read_text())["world_size"] == 2
    for ra, rb in zip(metrics(single), metrics(fsdp)):
        for k in ("loss", "eval_ce"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5), k
    assert_close_weights(final_weights(single), final_weights(fsdp), atol=1e-5)
    if keep_best:
        a, b = (json.loads((d / "run.json").read_text())["exported"] for d in (single, fsdp))
        assert a["step"] == b["step"]
    # resume a sharded run from its step-2 checkpoint: the same end as the uninterrupted run
    import shutil

    shutil.rmtree(fsdp / "checkpoints" / "step-0000003")
    shutil.rmtree(fsdp / "student")
    torchrun(fsdp, "--save-steps", "1", "--resume")
    assert_close_weights(final_weights(single), final_weights(fsdp), atol=1e-5)


def test_seqkd_generate_then_train(llama_teacher, corpus, gpt2_student, tmp_path):
    """cache-teacher --generate stores the teacher's sampled responses (deterministic per seed, so a
    rerun or resume gives the same cache), the cached teacher outputs are on those responses, and
    --method seqkd trains on them."""
    from conftest import assert_same_cache
    from dskd_batch import open_cache
    from dskd_batch.teacher.caching import run as cache_run
    from dskd_batch.config import CacheConfig
    from dskd_batch.data import load_examples
    from dskd_batch.models import load_tokenizer

    base = dict(teacher=str(llama_teacher), data=str(corpus), hidden="fp32", max_len=64, max_prompt_len=48,
                shard_size=5, generate=True, gen_max_new_tokens=8, gen_seed=7)
    a, b = tmp_path / "gen-a", tmp_path / "gen-b"
    cache_run(CacheConfig(out=str(a), **base), progress=False)
    cache_run(CacheConfig(out=str(b), **base), progress=False)
    assert_same_cache(a, b)
    c = open_cache(a)
    assert c.settings["generation"]["seed"] == 7
    originals = {ex.response for ex in load_examples(corpus).examples}
    tok = load_tokenizer(llama_teacher)
    for i in range(len(c)):
        r = c[i]
        assert r["response"] not in originals
        # the cached tokens are prompt + the generated response text re-tokenised (+ EOS), within max_len
        decoded = tok.decode(r["input_ids"][r["prompt_len"]:-1].tolist()).strip()
        assert decoded == r["response"] or (r["response"].startswith(decoded) and len(r["input_ids"]) == 64)
        assert len(r["input_ids"]) <= 64 and int(r["input_ids"][-1]) == tok.eos_token_id
    out = run(cfg(gpt2_student, tmp_path / "seqkd", cache=str(a), method="seqkd", max_steps=2))
    assert len(metrics(out)) == 2
    with pytest.raises(DskdError, match="different settings"):
        cache_run(CacheConfig(out=str(a), **{**base, "gen_seed": 8}), progress=False)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(fp32_cache, gpt2_student, tmp_path):
    """A real SIGKILL of `dskd-batch distill` after a mid-epoch checkpoint; --resume ends with the
    same weights as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    student = dropout_student(gpt2_student, tmp_path / "student")
    args = ["--cache", str(fp32_cache), "--student", str(student), "--method", "dskd", "--batch-size", "2",
            "--max-steps", "40", "--save-steps", "2", "--lr", "1e-3", "--device", "cpu", "--keep-checkpoints", "50"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    p = subprocess.run([sys.executable, "-m", "dskd_batch", "distill", "--out", str(full), *args], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dskd_batch", "distill", "--out", str(killed), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "step-0000008").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "student").exists()  # it really died before the end
    p = subprocess.run([sys.executable, "-m", "dskd_batch", "distill", "--out", str(killed), "--resume", *args],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stderr
    wa, wb = final_weights(full), final_weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_default_epoch_order_is_a_shard_local_permutation() -> None:
    from dskd_batch.train.batches import epoch_order

    groups = [range(0, 5), range(5, 9), range(9, 12)]
    orders = {(seed, epoch): epoch_order(12, groups, seed, epoch) for seed in (1, 2) for epoch in (0, 1)}
    for order in orders.values():
        assert sorted(order) == list(range(12))  # every example once
        # each shard's examples come together (its chunks are read once per epoch)
        spans = [sorted(order.index(i) for i in g) for g in groups]
        assert all(s[-1] - s[0] == len(s) - 1 for s in spans)
    assert epoch_order(12, groups, 1, 0) == orders[(1, 0)]  # a function of (seed, epoch)
    assert len({tuple(o) for o in orders.values()}) == 4  # and a different one for each


def test_length_grouped_order_pads_less_and_keeps_every_example() -> None:
    from dskd_batch.train.batches import global_batches, length_grouped

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 200, (103,), generator=g).tolist()
    order = torch.randperm(103, generator=g).tolist()
    size, group = 4, 5

    def padded(o: list[int]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in global_batches(o, size))

    assert length_grouped(order, lengths, size, 1, 0, 0) == order  # 1: off
    grouped = length_grouped(order, lengths, size, group, 0, 0)
    assert sorted(grouped) == sorted(order) and grouped[100:] == order[100:]  # the 3 dropped examples stay last
    for k, b in enumerate(global_batches(grouped, size)):  # each batch comes from one run of `group` batches
        runs = {order.index(i) // (size * group) for i in b}
        assert len(runs) == 1
    assert padded(grouped) < 0.8 * padded(order)
    assert grouped == length_grouped(order, lengths, size, group, 0, 0)  # a function of its arguments
    assert grouped != length_grouped(order, lengths, size, group, 0, 1)  # batches shuffled anew each epoch


def test_limit_on_a_cache_trains_on_the_first_examples(fp32_cache, gpt2_student, tmp_path):
    out = run(cfg(gpt2_student, tmp_path / "r", cache=str(fp32_cache), method="kd", limit=4, batch_size=2,
                  grad_accum=1, max_steps=None, epochs=1))
    info = json.loads((out / "run.json").read_text())
    assert info["examples"] == 4 and info["steps_per_epoch"] == 2 and info["total_steps"] == 2


def test_projector_lr_zero_keeps_the_pinv_projectors(fp32_cache, gpt2_student, tmp_path):
    """--projector-lr 0: the projectors stay exactly as pinv solved them while the student trains."""
    from safetensors.torch import load_file

    frozen = run(cfg(gpt2_student, tmp_path / "frozen", cache=str(fp32_cache), method="dskd", projector_init="pinv",
                     projector_lr=0.0, max_steps=2))
    moving = run(cfg(gpt2_student, tmp_path / "moving", cache=str(fp32_cache), method="dskd", projector_init="pinv",
                     projector_lr=1e-3, max_steps=2))
    start = run(cfg(gpt2_student, tmp_path / "start", cache=str(fp32_cache), method="dskd", projector_init="pinv",
                    max_steps=1, lr=1e-12, projector_lr=1e-12))
    p0, pf, pm = (load_file(str(r / "projectors.safetensors")) for r in (start, frozen, moving))
    assert p0.keys() == pf.keys() == {"t2s.weight", "s2t.weight"} | ({k for k in p0 if k.endswith("bias")})
    for k in p0:
        assert torch.allclose(pf[k], p0[k], atol=1e-9), k
    assert any(not torch.allclose(pm[k], p0[k]) for k in p0)
    assert not torch.equal(final_weights(frozen)["transformer.wte.weight"], load_file(
        str(gpt2_student / "model.safetensors"))["transformer.wte.weight"])  # the student did train
    with pytest.raises(DskdError, match="only --projector-init pinv"):
        cfg(gpt2_student, tmp_path / "x", cache=str(fp32_cache), method="dskd", projector_init="random", projector_lr=0.0)


def test_defaults_follow_the_findings(tmp_path):
    """With no method flags: KD (FKL, T = 2, kd_rate 0.5); DSKD with the pinv projectors frozen (its
    best variant measured), dskd-cma (no pinv) with random ones trained; cheap cache check."""
    c = DistillConfig(student="s", out=str(tmp_path), cache="c")
    assert (c.method, c.distance, c.temperature, c.kd_rate, c.verify, c.precision, c.template) == \
        ("kd", "fkl", 2.0, 0.5, "sizes", "auto", "auto")
    d = DistillConfig(student="s", out=str(tmp_path), cache="c", method="dskd")
    assert (d.projector_init, d.projector_lr) == ("pinv", 0.0)
    cma = DistillConfig(student="s", out=str(tmp_path), cache="c", method="dskd-cma")
    assert (cma.projector_init, cma.projector_lr) == ("random", 1e-3)
    assert DistillConfig(student="s", out=str(tmp_path), cache="c", method="dskd", projector_init="random").projector_lr == 1e-3


@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_bf16_autocast_keeps_the_loss_in_fp32(method, fp32_cache, gpt2_student, tmp_path, monkeypatch):
    """--precision bf16 runs the student's matmuls in bf16 (here on CPU: the same autocast as on a
    GPU), while every log-softmax the distances take is fp32; the losses stay within bf16 rounding
    of an fp32 run from the same start."""
    import dskd_batch.losses as losses

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real = losses._logp

    def spy(x, t):
        out = real(x, t)
        seen.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(losses, "_logp", spy)
    fp32 = metrics(run(cfg(gpt2_student, tmp_path / "fp32", cache=str(fp32_cache), method=method, max_steps=2)))
    bf16 = metrics(run(cfg(gpt2_student, tmp_path / "bf16", cache=str(fp32_cache), method=method, max_steps=2,
                           precision="bf16")))
    assert {o for _, o in seen} == {torch.float32}  # every log-softmax in fp32
    first32, first16 = fp32[0], bf16[0]
    for k in ("loss", "ce", "kd"):
        assert first16[k] == pytest.approx(first32[k], rel=3e-2)
    assert first16["loss"] != first32["loss"]  # the matmuls did run in bf16

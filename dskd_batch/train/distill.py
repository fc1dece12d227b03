"""Stage two: `dskd-batch distill`, as a recipe: the builders of :mod:`dskd_batch.train.setup` make the
data and teacher head, the held-out set, the student and projectors (refusing what does not match,
before any model loads where possible); the one training loop (:mod:`dskd_batch.train.trainer`) trains;
:mod:`dskd_batch.train.checkpoint` resumes and exports.

Run folder::

    RUN/run.json               resolved config, method, cache/teacher fingerprints, template, final metrics
    RUN/metrics.jsonl          one line per logged optimizer step
    RUN/checkpoints/step-N/    student (HF format or LoRA adapter), projectors, optimizer, RNG, state.json
    RUN/student/               the final student in Hugging Face format (LoRA merged into it)
    RUN/adapter/               the LoRA adapter alone (LoRA runs)
    RUN/projectors.safetensors the DSKD projectors
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import setup
from .batches import OnPolicySource
from ..files import atomic_write_json, fingerprint, remove_stale_tmp
from ..config import DistillConfig, resolve_precision, to_dict
from ..distributed import DistContext
from ..errors import DskdError
from ..methods import method_info
from ..models import load_tokenizer
from .checkpoint import CHECKPOINTS, export_student, list_checkpoints, prune_finished
from .trainer import DistillModule, TrainPlan, Trainer, seed_everything

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS = "metrics.jsonl"
# settings that may change between a run and its resumption
RESUMABLE = ("resume", "save_steps", "keep_checkpoints", "log_steps", "verify", "device", "teacher_device",
             "skip_nonfinite", "loss_chunk", "log_to", "prune_when_done", "activation_checkpointing")
# Settings added after runs were already made: left out of a run's identity while they keep these
# defaults, so those runs still resume and pipelines still reuse them.
LATER_DEFAULTS = {"kd_positions": "all", "length_group": 1, "columns": None, "compile_loss": False, "alm_tau": 100.0}


def run_settings(cfg: DistillConfig) -> dict[str, Any]:
    """A run's settings as its identity: less those that may change when it resumes, and less the
    later additions at their defaults."""
    settings = to_dict(cfg)
    settings["precision"] = resolve_precision(cfg.precision, cfg.device)
    return {k: v for k, v in settings.items()
            if k not in RESUMABLE and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


def _check_run_dir(cfg: DistillConfig, out: Path) -> None:
    from ..locks import is_lock_file

    if out.exists() and not out.is_dir():
        raise DskdError(f"--out {out} exists and is a file")
    if cfg.resume:
        return
    if (out / RUN_FILE).exists() or list_checkpoints(out):
        raise DskdError(f"--out {out} already holds a run", hint="pass --resume to continue it, or choose another --out")
    if out.is_dir() and any(not is_lock_file(p) for p in out.iterdir()):
        raise DskdError(f"--out {out} exists and is not empty", hint="choose another --out")


def plan_fingerprint(cfg: DistillConfig, fps: dict[str, Any], student_fp: str, world: int) -> str:
    ident = run_settings(cfg)
    ident.update(fingerprints={k: v for k, v in fps.items() if k != "cache_path"}, student=student_fp, world=world)
    return fingerprint(ident)


def run(cfg: DistillConfig, *, on_step: Callable[[int], None] | None = None) -> Path:
    from ..locks import folder_lock
    from ..tracking import check_tracker

    ctx = DistContext.from_env()
    out = Path(cfg.out)
    try:
        _check_run_dir(cfg, out)
        check_tracker(cfg.log_to)
        # one run per folder: a second distill on the same --out stops here (a killed run's lock is released)
        with folder_lock(out, f"distill-rank{ctx.rank}of{ctx.world_size}", "run folder"):
            return _run(cfg, ctx, on_step)
    finally:
        ctx.close()


def _run(cfg: DistillConfig, ctx: DistContext, on_step: Callable[[int], None] | None) -> Path:
    out = Path(cfg.out)
    _check_run_dir(cfg, out)
    method = setup.method(cfg)
    student_tok = load_tokenizer(cfg.student)
    device = setup.device(cfg=cfg, ctx=ctx)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, str(device)))
    data = setup.training_data(cfg=cfg, student_tok=student_tok, method=method, device=device)
    validation = setup.validation(cfg=cfg, student_tok=student_tok, data=data, method=method, device=device)

    seed_everything(cfg.seed)
    vocab = len(student_tok)
    student, student_fp = setup.student(cfg=cfg, vocab=vocab, data=data, method=method)
    projectors = setup.projectors(cfg=cfg, student=student, vocab=vocab, data=data, method=method)
    student = setup.trainable(cfg=cfg, student=student)
    sharded = ctx.enabled and cfg.parallel == "fsdp"
    sampler = setup.sampler(cfg=cfg, student=student, sharded=sharded, device=device)
    module = DistillModule(student, projectors, method, vocab, cfg.loss_chunk, device=device,
                           compile_loss=cfg.compile_loss).to(device)

    plan = TrainPlan(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainPlan)
                        if f.name not in ("fingerprint", "extra_state")},
                     fingerprint=plan_fingerprint(cfg, data.fingerprints, student_fp, ctx.world_size))
    on_policy = (setup.on_policy(cfg=cfg, data=data, student=sampler, student_tok=student_tok, method=method,
                                 device=device) if cfg.on_policy else None)
    source = OnPolicySource(data.examples, on_policy) if on_policy is not None else data.examples
    trainer = Trainer(module, plan, source, run_dir=out, ctx=ctx, device=device, pad_id=student_tok.pad_token_id,
                      head=data.head, tokenizer=student_tok, wrap=_wrapper(cfg, ctx, device),
                      on_step=on_step, validation=validation)
    if on_policy is not None and sharded:
        from .sharding import gather_student

        on_policy.refresh = lambda: gather_student(module, sampler)
    cks = list_checkpoints(out)
    if cfg.resume and not cks and _finished_run(out, plan.fingerprint):
        source.close()
        log.info("--resume: %s is a finished run of these settings (its checkpoints were pruned); nothing to do", out)
        return out
    if cfg.resume and cks:
        trainer.load_checkpoint(cks[-1])
    elif cfg.resume:
        log.info("--resume: no checkpoint in %s yet, starting from the beginning", out)
    run_info = {
        "config": to_dict(cfg), "method": method_info(method), "prompt": data.template, "fingerprints": data.fingerprints,
        "student_fingerprint": student_fp, "plan_fingerprint": plan.fingerprint, "world_size": ctx.world_size,
        "total_steps": trainer.total_steps, "steps_per_epoch": trainer.steps_per_epoch,
        "global_batch": trainer.global_batch, "examples": len(data.examples), "vocab": vocab,
        "projectors": {k: list(v.weight.shape) for k, v in projectors.items()}, "status": "training",
        "loss_chunk": module.loss_chunk, "attention": getattr(student.config, "_attn_implementation", None),
    }
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in (out, out / CHECKPOINTS):  # half-written folders of a killed run (student.tmp-*, ...)
            remove_stale_tmp(leftover)
        atomic_write_json(out / RUN_FILE, run_info)
    log.info("distill: %s%s, %d examples, %d steps of %d examples, device %s, %d process(es)", method.name,
             f"/{cfg.distance}" if method.needs_teacher else "", len(data.examples), trainer.total_steps,
             trainer.global_batch, device, ctx.world_size)
    final = trainer.train(out / METRICS, cfg.log_to, to_dict(cfg)) if trainer.step < trainer.total_steps else {}
    source.close()
    exported = export_student(  # every process (a sharded student is gathered), the main one writes
        out, student=module.student, projectors=module.projectors, tok=student_tok, step=trainer.step,
        best=trainer.best, lora=bool(cfg.lora_rank), base_student=cfg.student, sharded=trainer.sharded,
        write=trainer.weight_writer() if trainer.sharded else None, is_main=ctx.is_main)
    if ctx.is_main:
        run_info["exported"] = exported
        run_info.update(status="done", final_metrics=final, peak_memory=_peak_memory(device, on_policy),
                        pruned=cfg.prune_when_done)
        atomic_write_json(out / RUN_FILE, run_info)
        if cfg.prune_when_done:
            prune_finished(out)
    ctx.barrier()
    return out


def _finished_run(out: Path, plan_fp: str) -> bool:
    """Whether ``out`` holds a finished run of this plan; refuses one of other settings, which without
    checkpoints could only be trained again from the start over what is there."""
    from ..files import read_json

    info = read_json(out / RUN_FILE) if (out / RUN_FILE).exists() else {}
    if info.get("status") != "done":
        return False
    if info.get("plan_fingerprint") != plan_fp:
        raise DskdError(f"--out {out} holds a finished run of other settings and no checkpoint to resume from",
                        hint="choose another --out (or delete that run)")
    return True


def _wrapper(cfg: DistillConfig, ctx: DistContext, device: torch.device) -> Callable[[nn.Module], nn.Module] | None:
    if not ctx.enabled:
        return None
    if cfg.parallel == "fsdp":
        from .sharding import fully_shard_module

        return lambda m: fully_shard_module(m, device, ctx.world_size)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)


def _peak_memory(device: torch.device, on_policy: Any = None) -> dict[str, float]:
    import resource

    mem = {"cpu_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        mem["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if on_policy is not None:
        mem.update(on_policy.live.tf.memory())
    return mem

"""Stage two: `dskd-batch distill`. Resolve the sources, refuse what does not match (before any
model loads where possible), build the student, projectors and teacher head, hand them to the
one training loop, and write the outputs.

Run folder::

    RUN/run.json               resolved config, method, cache/teacher fingerprints, template, final metrics
    RUN/metrics.jsonl          one line per logged optimizer step
    RUN/checkpoints/step-N/    student (HF format or LoRA adapter), projectors, optimizer, RNG, state.json
    RUN/student/               the final student in Hugging Face format (LoRA merged into it)
    RUN/adapter/               the LoRA adapter alone (LoRA runs)
    RUN/projectors.safetensors the DSKD projectors
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .batches import CacheExamples, CorpusExamples, LiveSource, LiveTeacher, OnPolicySource, Source
from ..files import atomic_write_json, fingerprint, remove_stale_tmp
from ..config import DistillConfig, resolve_precision, to_dict
from ..distributed import DistContext
from ..errors import DskdError
from ..methods import LossSettings, TeacherHead, make_method, method_info
from ..models import (load_causal_lm, load_tokenizer, model_fingerprint, plain_model, resolve_device, tokenizer_fingerprint)
from ..teacher.source import Teacher, open_teacher
from .projectors import build_projectors
from .checkpoint import CHECKPOINTS, export_student, list_checkpoints, prune_finished
from .trainer import DistillModule, TrainPlan, Trainer, seed_everything

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS = "metrics.jsonl"
CROSS_VOCAB_HINT = ("kd and dskd need the teacher's tokenizer; for a student with another tokenizer use a "
                    "cross-vocabulary method (dskd-eta, dskd-cma, mined, uld), or sft/seqkd, after "
                    "`dskd-batch align CACHE --student-tokenizer STUDENT`")
# settings that may change between a run and its resumption
RESUMABLE = ("resume", "save_steps", "keep_checkpoints", "log_steps", "verify", "device", "teacher_device",
             "skip_nonfinite", "loss_chunk", "log_to", "prune_when_done", "activation_checkpointing")
# Settings added after runs were already made: left out of a run's identity while they keep these
# defaults, so those runs still resume and pipelines still reuse them.
LATER_DEFAULTS = {"kd_positions": "all", "length_group": 1, "columns": None, "compile_loss": False}


def run_settings(cfg: DistillConfig) -> dict[str, Any]:
    """A run's settings as its identity: less those that may change when it resumes, and less the
    later additions at their defaults."""
    settings = to_dict(cfg)
    settings["precision"] = resolve_precision(cfg.precision, cfg.device)
    return {k: v for k, v in settings.items()
            if k not in RESUMABLE and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


@dataclasses.dataclass
class Sources:
    examples: Source  # what the trainer reads (a cache, an aligned cache, a corpus, a corpus + live teacher)
    head: TeacherHead | None
    d_teacher: int | None
    template: dict[str, Any]
    fingerprints: dict[str, Any]
    cache: Any = None
    shared_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # pinv rows across vocabularies


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


def _from_cache(cfg: DistillConfig, student_tok: Any, method: Any) -> Sources:
    from ..cache.reader import open_cache

    cache = open_cache(cfg.cache, verify=cfg.verify, chunk_cache=256, max_open_shards=2)
    st = cache.settings
    problems = []
    same_vocab = tokenizer_fingerprint(student_tok) == st["tokenizer"]["fingerprint"]
    # a student of another tokenizer reads the cache through its alignment: the cross-vocabulary
    # methods, and the methods that need no teacher distribution (sft, seqkd) on its own token ids
    aligned = method.cross_vocab or (not same_vocab and not method.needs_teacher)
    if not same_vocab and not aligned:
        raise DskdError(f"the student's tokenizer ({cfg.student}) differs from the cache's teacher tokenizer "
                        f"(fingerprint {tokenizer_fingerprint(student_tok)} vs {st['tokenizer']['fingerprint']})",
                        hint=CROSS_VOCAB_HINT)
    if same_vocab and method.cross_vocab:
        raise DskdError(f"--method {method.name} is for a student with another tokenizer; {cfg.student} shares the "
                        "teacher's", hint="use --method dskd (or kd)")
    if method.needs_norm_stats and not cache.manifest.get("norm_stats"):
        problems.append(f"--method {method.name} needs normalisation statistics that cache {cfg.cache} does not record "
                        "(made by an older dskd-batch)")
    if method.needs_hidden and st["storage"]["hidden"] == "none":
        problems.append(f"--method {method.name} needs the teacher's hidden states, and cache {cfg.cache} was "
                        "built with --hidden none")
    if method.needs_teacher and st["storage"]["hidden"] == "none" and not st["storage"]["top_k"]:
        problems.append(f"cache {cfg.cache} holds neither hidden states nor top-k logits: no teacher distribution")
    if method.needs_generation and not st.get("generation"):
        problems.append(f"--method {method.name} trains on the teacher's own responses; cache {cfg.cache} holds the "
                        "corpus's responses")
    if problems:
        hint = ("rebuild the cache with `dskd-batch cache-teacher ... --hidden fp16`" if method.needs_hidden else
                "rebuild the cache with `dskd-batch cache-teacher ... --generate`" if method.needs_generation else None)
        raise DskdError(problems, hint=hint)
    if method.needs_hidden and st["storage"]["hidden"] not in ("fp32", "fp16", "bf16"):
        log.warning("cache %s stores hidden states lossily (%s): --method %s projects approximate teacher states",
                    cfg.cache, st["storage"]["hidden"], method.name)
    fps = {"cache": cache.fingerprint, "cache_path": str(Path(cfg.cache).resolve()),
           "teacher": st["teacher"]["fingerprint"], "tokenizer": st["tokenizer"]["fingerprint"],
           "data": st["data"]["fingerprint"]}
    al = None
    if aligned:
        from ..cache.align import open_alignment
        from .aligned import AlignedExamples

        al = open_alignment(cache, student_tok, cfg.student)
        examples: CacheExamples = AlignedExamples(cache, al)
        head = _cross_vocab_head(cache, method, al) if method.cross_vocab else None
        fps["student_tokenizer"] = al.info["student_tokenizer"]["fingerprint"]
    else:
        examples = CacheExamples(cache)
        head = TeacherHead(cache.lm_head, cache.lm_head_bias, cache.logits_source) if method.needs_teacher else None
        method.prepare(cache, None)
    if cfg.shuffle == "global":
        examples.groups = None
    if cfg.limit is not None:
        examples = _limited(examples, cfg.limit)
    return Sources(examples, head, int(st["teacher"]["hidden_size"]), {"template": st["template"]["name"], **st["limits"]},
                   fps, cache=cache, shared_rows=al.shared_rows() if al is not None and method.cross_vocab else None)


def _validation(cfg: DistillConfig, student_tok: Any, src: Sources, method: Any, device: torch.device) -> Any:
    """The held-out set of --eval-data: a teacher cache (eval_ce, eval_kl, eval_top1) or a corpus
    encoded like the training data (eval_ce). Checked before any model loads."""
    from types import SimpleNamespace

    from ..cache.format import SETTINGS
    from .validation import Validation

    if cfg.eval_data is None:
        return None
    path = Path(cfg.eval_data)
    if not path.exists():
        raise DskdError(f"--eval-data {path} not found")
    if (path / SETTINGS).exists():
        from ..cache.reader import open_cache

        dev = open_cache(path, verify=cfg.verify)
        st = dev.settings
        problems = []
        if method.cross_vocab:
            problems.append(f"--eval-data {path} is a teacher cache in the teacher's tokenization; a student with "
                            "another tokenizer is evaluated on a corpus: give the held-out corpus file")
        elif tokenizer_fingerprint(student_tok) != st["tokenizer"]["fingerprint"]:
            problems.append(f"--eval-data {path} was cached with another tokenizer than the student's")
        if src.fingerprints.get("teacher") not in (None, st["teacher"]["fingerprint"]):
            problems.append(f"--eval-data {path} was cached with another teacher (fingerprint "
                            f"{st['teacher']['fingerprint']}) than the training data ({src.fingerprints['teacher']})")
        mine = {"template": src.template["template"], "max_prompt_len": src.template["max_prompt_len"],
                "max_len": src.template["max_len"]}
        theirs = {"template": st["template"]["name"], "max_prompt_len": st["limits"]["max_prompt_len"],
                  "max_len": st["limits"]["max_len"]}
        for k in mine:
            if str(mine[k]) != str(theirs[k]):
                problems.append(f"--eval-data {path}: {k} is {theirs[k]!r}, the training data's is {mine[k]!r}")
        if problems:
            raise DskdError(problems, hint="cache the held-out split with the training cache's settings, or give the "
                                           "held-out corpus file (eval_ce only)")
        examples: Any = CacheExamples(dev)
        head = TeacherHead(dev.lm_head, dev.lm_head_bias, dev.logits_source).to(device)
        val = Validation(examples=examples, with_teacher=True, batch_size=cfg.batch_size, every=cfg.eval_steps,
                         keep_best=cfg.keep_best, source=str(path), head=head)
    else:
        from ..data import prepare_corpus

        t = src.template
        spec = SimpleNamespace(data=str(path), template=t["template"], max_prompt_len=int(t["max_prompt_len"]),
                               max_len=int(t["max_len"]), limit=None, split=None)
        examples = CorpusExamples(prepare_corpus(spec, student_tok).encoded)
        val = Validation(examples=examples, with_teacher=False, batch_size=cfg.batch_size, every=cfg.eval_steps,
                         keep_best=cfg.keep_best, source=str(path))
    if cfg.keep_best is not None and cfg.keep_best not in val.metrics:
        raise DskdError(f"--keep-best {cfg.keep_best} needs the teacher's record: --eval-data {path} is a corpus "
                        "(it gives eval_ce)", hint="use --keep-best eval_ce, or give a teacher cache of the held-out data")
    return val


def _cross_vocab_head(cache: Any, method: Any, al: Any) -> TeacherHead:
    """The teacher head (and E_T for CMA) over the teacher's vocabulary; the method gets the token
    map and CMA's normalisation statistics."""
    st = cache.settings
    v_t = int(st["tokenizer"]["size"])
    head = TeacherHead(cache.lm_head[:v_t], cache.lm_head_bias[:v_t] if cache.lm_head_bias is not None else None,
                       cache.logits_source, embed=cache.input_embeddings[:v_t] if method.needs_embeddings else None)
    method.prepare(cache, al)
    stats = al.info["stats"]
    log.info("alignment %s: ETA pairs cover %.1f%% of the student's response tokens (%.1f%% with a mapped teacher "
             "top-1), MinED %.1f%%", al.path.name, 100 * stats["eta_coverage"], 100 * stats["eta_label_coverage"],
             100 * stats["mined_coverage"])
    return head


def _limited(examples: CacheExamples, n: int) -> CacheExamples:
    examples.n_tokens, examples.prompt_len = examples.n_tokens[:n], examples.prompt_len[:n]
    examples.n_targets = examples.n_targets[:n]
    if examples.groups:
        examples.groups = [range(r.start, min(r.stop, n)) for r in examples.groups if r.start < n]
    return examples


def _from_corpus(cfg: DistillConfig, student_tok: Any, method: Any, device: torch.device) -> Sources:
    from ..data import prepare_corpus
    from ..data import data_fingerprint, template_fingerprint

    tok, teacher = student_tok, None
    if cfg.teacher is not None:
        teacher = _open_live_teacher(cfg, device)
        tok = teacher.tokenizer
        if tokenizer_fingerprint(tok) != tokenizer_fingerprint(student_tok):
            raise DskdError(f"the student's tokenizer ({cfg.student}) differs from the teacher's ({cfg.teacher})",
                            hint="cache the teacher first (`dskd-batch cache-teacher ... --student-tokenizer "
                                 f"{cfg.student}`), then distil with a cross-vocabulary method from the cache")
    prep = prepare_corpus(cfg, tok)
    fps = {"data": data_fingerprint(prep.examples), "tokenizer": tokenizer_fingerprint(tok),
           "template": template_fingerprint(cfg.template, tok)}
    from ..data import resolve_template

    template = {"template": resolve_template(cfg.template, tok), "max_prompt_len": cfg.max_prompt_len,
                "max_len": cfg.max_len, "limit": cfg.limit}
    examples = CorpusExamples(prep.encoded)
    if teacher is None or not method.needs_teacher:
        if teacher is not None:
            teacher.close()
        return Sources(examples, None, None, template, fps)
    live, weights, fps["teacher"] = _live_teacher(teacher, cfg, prep.encoded[0].input_ids)
    return Sources(LiveSource(examples, live), TeacherHead(weights["lm_head.weight"], weights.get("lm_head.bias"), "hidden"),
                   int(weights["lm_head.weight"].shape[1]), template, fps)


def _open_live_teacher(cfg: DistillConfig, device: torch.device) -> Teacher:
    """``--teacher`` on ``--teacher-device`` (``auto``: the student's device; ``map``: spread with
    device_map=auto); a local model loads when first used."""
    tdev: str | torch.device = cfg.teacher_device if cfg.teacher_device in ("map",) else (
        resolve_device(cfg.teacher_device) if cfg.teacher_device != "auto" else device)
    return open_teacher(str(cfg.teacher), top_k=cfg.teacher_top_k, dtype="auto", device=tdev)


def _live_teacher(teacher: Teacher, cfg: DistillConfig, probe_ids: list[int],
                  expect: str | None = None) -> tuple[LiveTeacher, dict[str, torch.Tensor], str]:
    """The live teacher, checked once: whether its logits are h @ W.T (if not, its real logits are
    passed on) and, given ``expect``, that it is the cache's teacher."""
    from ..cache.head import head_reproduces_logits, reconstruction_check
    from ..models import DTYPE_BY_NAME

    fp = teacher.fingerprint
    if expect is not None and fp != expect:
        raise DskdError(f"--teacher {cfg.teacher} is not the teacher cache {cfg.cache} was made with "
                        f"(fingerprint {fp} vs {expect})", hint="give the cache's teacher (see `dskd-batch cache-info`)")
    weights = teacher.head_and_embeddings()
    tf = teacher
    probe = tf([probe_ids], keep_logits=True)[0]
    dtype = teacher.describe()["dtype"]
    chk = reconstruction_check(probe["logits"], probe["hidden"], None, weights["lm_head.weight"], weights.get("lm_head.bias"),
                               dtype=DTYPE_BY_NAME[dtype])
    exact = head_reproduces_logits(chk["exact_t1"], dtype)
    if not exact:
        log.info("the live teacher's logits are not h @ W.T; its real logits are used")
    return LiveTeacher(tf, keep_logits=not exact), weights, fp


def _on_policy(cfg: DistillConfig, src: Sources, student: nn.Module, student_tok: Any, method: Any,
               device: torch.device) -> Any:
    """The live stage of --on-policy: the cache's teacher, loaded, and the sampling settings."""
    from .onpolicy import CrossTokenizer, OnPolicy, OnPolicySettings

    cache = src.cache
    st = cache.settings
    if not all(cache.index_column("instruction")):
        raise DskdError(f"--on-policy samples responses to the cache's prompts; {cfg.cache} holds plain-text rows "
                        "(no prompt)", hint="use --on-policy with a cache of prompt/response rows")
    t_tok = cache.tokenizer()
    teacher = _open_live_teacher(cfg, device)
    if tokenizer_fingerprint(teacher.tokenizer) != st["tokenizer"]["fingerprint"]:
        teacher.close()
        raise DskdError(f"--teacher {cfg.teacher} has another tokenizer than the cache {cfg.cache}",
                        hint="give the cache's teacher (see `dskd-batch cache-info`)")
    live, _, _ = _live_teacher(teacher, cfg, cache.token_arrays(0)["input_ids"].tolist(),
                               expect=st["teacher"]["fingerprint"])
    cross = None
    if method.cross_vocab:
        from ..cache.align import token_table, vocab_map

        t_table, s_table = token_table(t_tok), token_table(student_tok)
        cross = CrossTokenizer(t_tok, t_table, s_table, vocab_map(t_table, s_table))
    lim = st["limits"]
    settings = OnPolicySettings(cfg.student_gen_ratio, cfg.on_policy_after_epochs, int(lim["max_len"]),
                                int(lim["max_prompt_len"]), st["template"]["name"], cfg.seed)
    return OnPolicy(student, student_tok, live, settings, cross)


def _attach_lora(student: nn.Module, cfg: DistillConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets: Any = "all-linear" if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    lc = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(student, lc)


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
    ls = LossSettings(cfg.distance, cfg.temperature, cfg.kd_rate, cfg.agreement_mask, cfg.kd_positions,
                      student_space=not cfg.only_teacher_space, teacher_space=not cfg.only_student_space,
                      distance_args=tuple(sorted(cfg.distance_args.items())))
    method = make_method(cfg.method, ls)
    student_tok = load_tokenizer(cfg.student)
    device = resolve_device(cfg.device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, str(device)))
    src = _from_cache(cfg, student_tok, method) if cfg.cache else _from_corpus(cfg, student_tok, method, device)
    vocab = len(student_tok)
    validation = _validation(cfg, student_tok, src, method, device)

    seed_everything(cfg.seed)
    student = plain_model(load_causal_lm(cfg.student, dtype=torch.float32, device="cpu"))  # a .gguf student saves
    student_fp = model_fingerprint(student)
    w_s = student.get_output_embeddings().weight
    if w_s.shape[0] < vocab:
        raise DskdError(f"the student's head has {w_s.shape[0]} rows, fewer than its tokenizer's {vocab} tokens")
    if src.head is not None and not method.cross_vocab and src.head.weight.shape[0] < vocab:
        raise DskdError(f"the teacher's head has {src.head.weight.shape[0]} rows, fewer than the tokenizer's {vocab}")
    spec = method.projector_spec()
    pinv = cfg.projector_init == "pinv" and src.head is not None
    projectors = build_projectors(int(w_s.shape[1]), src.d_teacher or 0, t2s=spec["t2s"], s2t=spec["s2t"],
                                  query=spec.get("query", False), init=cfg.projector_init, seed=cfg.seed,
                                  student_head=w_s[:vocab] if pinv else None,
                                  teacher_head=(src.head.weight if method.cross_vocab else src.head.weight[:vocab])
                                  if pinv else None, rows=src.shared_rows if pinv else None)
    if cfg.projector_lr == 0:  # --projector-lr 0: the pinv projectors stay as solved (the extended paper's s2t)
        projectors.requires_grad_(False)
    if cfg.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank:
        student = _attach_lora(student, cfg)
    student.train()
    sharded = ctx.enabled and cfg.parallel == "fsdp"
    # under FSDP the student samples from an unsharded copy that each step's weights are gathered into
    sampler = copy.deepcopy(student).to(device) if cfg.on_policy and sharded else student
    module = DistillModule(student, projectors, method, vocab, cfg.loss_chunk, device=device,
                           compile_loss=cfg.compile_loss).to(device)

    plan = TrainPlan(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainPlan)
                        if f.name not in ("fingerprint", "extra_state")},
                     fingerprint=plan_fingerprint(cfg, src.fingerprints, student_fp, ctx.world_size))
    on_policy = _on_policy(cfg, src, sampler, student_tok, method, device) if cfg.on_policy else None
    source = OnPolicySource(src.examples, on_policy) if on_policy is not None else src.examples
    trainer = Trainer(module, plan, source, run_dir=out, ctx=ctx, device=device, pad_id=student_tok.pad_token_id,
                      head=src.head, tokenizer=student_tok, wrap=_wrapper(cfg, ctx, device),
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
        "config": to_dict(cfg), "method": method_info(method), "prompt": src.template, "fingerprints": src.fingerprints,
        "student_fingerprint": student_fp, "plan_fingerprint": plan.fingerprint, "world_size": ctx.world_size,
        "total_steps": trainer.total_steps, "steps_per_epoch": trainer.steps_per_epoch,
        "global_batch": trainer.global_batch, "examples": len(src.examples), "vocab": vocab,
        "projectors": {k: list(v.weight.shape) for k, v in projectors.items()}, "status": "training",
        "loss_chunk": module.loss_chunk, "attention": getattr(student.config, "_attn_implementation", None),
    }
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in (out, out / CHECKPOINTS):  # half-written folders of a killed run (student.tmp-*, ...)
            remove_stale_tmp(leftover)
        atomic_write_json(out / RUN_FILE, run_info)
    log.info("distill: %s%s, %d examples, %d steps of %d examples, device %s, %d process(es)", method.name,
             f"/{cfg.distance}" if method.needs_teacher else "", len(src.examples), trainer.total_steps,
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

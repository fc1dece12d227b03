"""Stage two's builders: what a distill run needs, made from its config by keyword-only setup
functions (the data and teacher head, the held-out set, the student, the projectors, the live teacher
and on-policy sampling), in the order :func:`dskd_batch.train.distill.run` calls them. Each checks
what it can before anything expensive loads and refuses a mismatch with one clear error.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DistillConfig
from ..distributed import DistContext
from ..errors import DskdError
from ..methods import LossSettings, TeacherHead, make_method
from ..models import load_causal_lm, model_fingerprint, plain_model, resolve_device, tokenizer_fingerprint
from ..teacher.source import Teacher, open_teacher
from .batches import CacheExamples, CorpusExamples, LiveSource, LiveTeacher, Source
from .projectors import build_projectors

log = logging.getLogger(__name__)

CROSS_VOCAB_HINT = ("kd and dskd need the teacher's tokenizer; for a student with another tokenizer use a "
                    "cross-vocabulary method (dskd-eta, dskd-cma, mined, uld, gold, alm), or sft/seqkd, after "
                    "`dskd-batch align CACHE --student-tokenizer STUDENT`")


def method(cfg: DistillConfig) -> Any:
    """The method object of ``--method`` with the run's loss settings."""
    ls = LossSettings(cfg.distance, cfg.temperature, cfg.kd_rate, cfg.agreement_mask, cfg.kd_positions,
                      student_space=not cfg.only_teacher_space, teacher_space=not cfg.only_student_space,
                      distance_args=tuple(sorted(cfg.distance_args.items())), alm_tau=cfg.alm_tau)
    return make_method(cfg.method, ls)


def device(*, cfg: DistillConfig, ctx: DistContext) -> torch.device:
    """``--device``; under torchrun each process's own GPU."""
    dev = resolve_device(cfg.device)
    if ctx.enabled and dev.type == "cuda":
        dev = torch.device("cuda", ctx.local_rank)
    return dev


@dataclasses.dataclass
class TrainingData:
    """What a run trains on, built before any model loads: the examples (a source of the trainer), the
    teacher head and width, the prompt settings and the fingerprints that identify the data."""

    examples: Source  # what the trainer reads (a cache, an aligned cache, a corpus, a corpus + live teacher)
    head: TeacherHead | None
    d_teacher: int | None
    template: dict[str, Any]
    fingerprints: dict[str, Any]
    cache: Any = None
    shared_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # pinv rows across vocabularies


def _from_cache(cfg: DistillConfig, student_tok: Any, method: Any) -> TrainingData:
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
    return TrainingData(examples, head, int(st["teacher"]["hidden_size"]), {"template": st["template"]["name"], **st["limits"]},
                   fps, cache=cache, shared_rows=al.shared_rows() if al is not None and method.cross_vocab else None)


def validation(*, cfg: DistillConfig, student_tok: Any, data: TrainingData, method: Any, device: torch.device) -> Any:
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
        if data.fingerprints.get("teacher") not in (None, st["teacher"]["fingerprint"]):
            problems.append(f"--eval-data {path} was cached with another teacher (fingerprint "
                            f"{st['teacher']['fingerprint']}) than the training data ({data.fingerprints['teacher']})")
        mine = {"template": data.template["template"], "max_prompt_len": data.template["max_prompt_len"],
                "max_len": data.template["max_len"]}
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

        t = data.template
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


def _from_corpus(cfg: DistillConfig, student_tok: Any, method: Any, device: torch.device) -> TrainingData:
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
        return TrainingData(examples, None, None, template, fps)
    live, weights, fps["teacher"] = _live_teacher(teacher, cfg, prep.encoded[0].input_ids)
    return TrainingData(LiveSource(examples, live), TeacherHead(weights["lm_head.weight"], weights.get("lm_head.bias"), "hidden"),
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


def on_policy(*, cfg: DistillConfig, data: TrainingData, student: nn.Module, student_tok: Any, method: Any,
              device: torch.device) -> Any:
    """The live stage of --on-policy: the cache's teacher, loaded, and the sampling settings."""
    from .onpolicy import CrossTokenizer, OnPolicy, OnPolicySettings

    cache = data.cache
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
        from ..cache.align import space_swap, token_table, vocab_map

        t_table, s_table = token_table(t_tok), token_table(student_tok)
        cross = CrossTokenizer(t_tok, t_table, s_table, vocab_map(t_table, s_table), space_swap(t_table))
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


def training_data(*, cfg: DistillConfig, student_tok: Any, method: Any, device: torch.device) -> TrainingData:
    """The examples (from ``--cache``, or a corpus with or without a live teacher) and what goes with them."""
    return _from_cache(cfg, student_tok, method) if cfg.cache else _from_corpus(cfg, student_tok, method, device)


def student(*, cfg: DistillConfig, vocab: int, data: TrainingData, method: Any) -> tuple[nn.Module, str]:
    """The student, checked against the vocabulary, with activation checkpointing and LoRA as asked, in
    training mode; and its fingerprint (of the weights as loaded)."""
    model = plain_model(load_causal_lm(cfg.student, dtype=torch.float32, device="cpu"))  # a .gguf student saves
    student_fp = model_fingerprint(model)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab:
        raise DskdError(f"the student's head has {rows} rows, fewer than its tokenizer's {vocab} tokens")
    if data.head is not None and not method.cross_vocab and data.head.weight.shape[0] < vocab:
        raise DskdError(f"the teacher's head has {data.head.weight.shape[0]} rows, fewer than the tokenizer's {vocab}")
    return model, student_fp


def projectors(*, cfg: DistillConfig, student: nn.Module, vocab: int, data: TrainingData, method: Any) -> nn.ModuleDict:
    """The method's projectors between the two hidden spaces (pinv: solved from the two heads)."""
    w_s = student.get_output_embeddings().weight
    spec = method.projector_spec()
    pinv = cfg.projector_init == "pinv" and data.head is not None
    built = build_projectors(int(w_s.shape[1]), data.d_teacher or 0, t2s=spec["t2s"], s2t=spec["s2t"],
                             query=spec.get("query", False), init=cfg.projector_init, seed=cfg.seed,
                             student_head=w_s[:vocab] if pinv else None,
                             teacher_head=(data.head.weight if method.cross_vocab else data.head.weight[:vocab])
                             if pinv else None, rows=data.shared_rows if pinv else None)
    if cfg.projector_lr == 0:  # --projector-lr 0: the pinv projectors stay as solved (the extended paper's s2t)
        built.requires_grad_(False)
    return built


def trainable(*, cfg: DistillConfig, student: nn.Module) -> nn.Module:
    """The student as it trains: activation checkpointing and LoRA as asked, in training mode."""
    if cfg.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank:
        student = _attach_lora(student, cfg)
    student.train()
    return student


def sampler(*, cfg: DistillConfig, student: nn.Module, sharded: bool, device: torch.device) -> nn.Module:
    """What on-policy sampling generates with: the student itself, or under FSDP an unsharded copy that
    each step's weights are gathered into."""
    return copy.deepcopy(student).to(device) if cfg.on_policy and sharded else student

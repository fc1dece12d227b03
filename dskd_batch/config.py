"""Typed configurations for every command.

Each command's click options map one-to-one onto a dataclass here; ``__post_init__`` checks every
field and raises one :class:`DskdError` listing all problems. Pipeline files use exactly these
field names. The field docstrings (the comment string under each field) become ``--help`` text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .data import is_chat_template
from .errors import DskdError
from .losses import distances, parse_distance_args
from .methods import Method, method_classes
from .tracking import LOG_TO

HIDDEN_MODES = ("fp32", "fp16", "bf16", "compact", "none")
TEMPLATES = ("auto", "alpaca", "chat", "none")
TEMPLATE_HELP = ("`auto` (the tokenizer's chat template when it has one, else alpaca), `alpaca`, `chat` (the tokenizer's chat template, its default system prompt included if it has one), "
                 "`chat:SYSTEM` (the chat template with SYSTEM as the system turn; `chat:` an empty one) or `none`")
DTYPES = ("auto", "fp32", "fp16", "bf16")


def template_problem(template: str | None) -> list[str]:
    ok = template is None or template in TEMPLATES or is_chat_template(template)
    return [] if ok else [f"template must be {TEMPLATE_HELP}; got {template!r}"]


def dtype_problem(dtype: str) -> list[str]:
    return [] if dtype in DTYPES else [f"dtype must be one of {DTYPES}, got {dtype!r}"]


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring, read from the string literal that follows each field."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@dataclass
class CacheConfig:
    """Settings of stage one (`dskd-batch cache-teacher`)."""

    teacher: str
    "Teacher model: a local Hugging Face folder, a .gguf file, pkg:NAME, a hub id where the network allows, or a served teacher, http://HOST:PORT (`dskd-batch serve-teacher`)."
    data: str
    "Corpus: a .jsonl/.json file, a .parquet file, a saved `datasets` folder, or `hf:ORG/NAME[:CONFIG][@SPLIT]` (`datasets.load_dataset`; offline, from the local Hugging Face cache)."
    out: str
    "Cache folder to create (or resume)."
    template: str = "auto"
    "Prompt template: `auto` (`chat` when the teacher's tokenizer has a chat template, else `alpaca`; the cache records which), `alpaca` (instruction/input layout of the papers), `chat` (the teacher's chat template, with its default system prompt if it has one), `chat:SYSTEM` (the chat template with SYSTEM as the system turn; `chat:` an empty one, which saves SmolLM2's 21-token default in every row) or `none`."
    max_prompt_len: int | None = None
    "Prompt tokens kept (the prompt is cut to this first). Default: 256, or half of --max-len when that is below 512 (plain-text rows have no prompt: --max-len alone sets their windows)."
    max_len: int = 512
    "Total tokens kept, EOS included (prompt + response cut to max_len - 1, then EOS)."
    hidden: str = "fp16"
    "Storage of the teacher's last hidden state: fp32, fp16, bf16, compact (transform-coded, ~6 bits/value) or none."
    top_k: int = 64
    "Top-k teacher logits stored per position (0 stores none); log-sum-exp and argmax are always stored."
    positions: str = "targets"
    "Positions the teacher's outputs are stored at: `targets` (those training reads: each one before a response token or the final EOS; every token of plain text) or `all` (every position, as cache format 1 did: for analysis and size comparisons)."
    batch_tokens: int = 4096
    "Token budget of one teacher batch (length-sorted, padded only to the longest row in the batch)."
    shard_size: int = 256
    "Examples per shard; a shard is the unit of resume and of parallel writing."
    device: str = "auto"
    "Device of the teacher: auto, cpu, cuda, cuda:1, ..."
    dtype: str = "auto"
    "Teacher compute dtype: auto (fp32 on CPU, bf16 on GPU), fp32, fp16, bf16."
    limit: int | None = None
    "Use only the first N examples of the corpus."
    shard_index: int = 0
    "This machine's index when the shards are split over several machines."
    num_shards: int = 1
    "Number of machines the shards are split over (merge with `dskd-batch merge`, or automatically by the last one)."
    skip_bad_rows: bool = False
    "Skip malformed corpus rows (and report how many) instead of stopping at the first."
    dry_run: bool = False
    "Tokenize the corpus and print what the cache will hold and its size on disk (every --hidden mode side by side), from the teacher's config alone; nothing is written and no weights are loaded."
    compression_level: int = 1
    "Blosc/zstd level of the shard arrays (0: uncompressed). Level 1 keeps 99% of level 3's saving at 3.7x its speed (benchmarks/bench_writer.py)."
    fidelity_sample: int = 4
    "Examples per shard whose reconstructed logits are checked against the real ones at write time (the manifest aggregates all shards)."
    split: str | None = None
    "Split to read from a saved DatasetDict folder or a hub dataset (default: `train`)."
    columns: str | None = None
    "Map the data's columns onto row fields: FIELD=COLUMN,... with fields prompt, response, instruction, input, output, messages, text (e.g. prompt=question,response=answer)."
    generate: bool = False
    "SeqKD: replace each response by one the teacher samples for the prompt, and cache the teacher on that."
    gen_max_new_tokens: int = 256
    "--generate: most new tokens per response (also capped by max_len)."
    gen_temperature: float = 1.0
    "--generate: sampling temperature (0: greedy)."
    gen_top_p: float = 1.0
    "--generate: nucleus sampling threshold."
    gen_seed: int = 0
    "--generate: seed (each shard is seeded from it, so a resumed run regenerates identically)."
    gen_batch_size: int = 16
    "--generate: prompts sampled together."
    student_tokenizer: tuple[str, ...] = ()
    "Also align the cache for this student tokenizer (repeatable) once it is complete, as `dskd-batch align` would."

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.max_prompt_len is None:
            self.max_prompt_len = default_prompt_len(self.max_len)
        problems += template_problem(self.template)
        problems += columns_problem(self.columns)
        if self.positions not in ("targets", "all"):
            problems.append(f"positions must be targets or all, got {self.positions!r}")
        if self.hidden not in HIDDEN_MODES:
            problems.append(f"hidden must be one of {HIDDEN_MODES}, got {self.hidden!r}")
        problems += dtype_problem(self.dtype)
        if self.max_prompt_len < 1:
            problems.append(f"max_prompt_len must be >= 1, got {self.max_prompt_len}")
        if self.max_len < self.max_prompt_len + 2:
            problems.append(
                f"max_len ({self.max_len}) must leave room for at least one response token and EOS "
                f"after max_prompt_len ({self.max_prompt_len}): use max_len >= {self.max_prompt_len + 2}"
            )
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if self.batch_tokens < self.max_len:
            problems.append(f"batch_tokens ({self.batch_tokens}) must be >= max_len ({self.max_len})")
        if self.shard_size < 1:
            problems.append(f"shard_size must be >= 1, got {self.shard_size}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be >= 1, got {self.limit}")
        if self.num_shards < 1 or not (0 <= self.shard_index < self.num_shards):
            problems.append(
                f"shard_index must be in [0, num_shards): got {self.shard_index} of {self.num_shards}"
            )
        if not (0 <= self.compression_level <= 9):
            problems.append(f"compression_level must be in 0..9, got {self.compression_level}")
        if self.fidelity_sample < 0:
            problems.append(f"fidelity_sample must be >= 0, got {self.fidelity_sample}")
        if self.gen_max_new_tokens < 1 or self.gen_batch_size < 1:
            problems.append("gen_max_new_tokens and gen_batch_size must be >= 1")
        if self.gen_temperature < 0 or not 0 < self.gen_top_p <= 1:
            problems.append(f"gen_temperature must be >= 0 and gen_top_p in (0, 1]; got {self.gen_temperature}, {self.gen_top_p}")
        if problems:
            raise DskdError(problems)


def columns_problem(columns: str | None) -> list[str]:
    from .data import parse_columns

    try:
        parse_columns(columns)
    except DskdError as e:
        return list(e.problems)
    return []


def default_prompt_len(max_len: int) -> int:
    """--max-prompt-len when not given: 256 (the papers'), or half of a --max-len below 512."""
    return min(256, max(1, max_len // 2))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX-512 BF16 on x86, the BF16 extension on
    Arm); without, bf16 matmuls are emulated and about 80x slower than fp32 (measured: 0.84
    against 68 GFLOPS on one core of an AMD EPYC without them). ``DSKD_CPU_BF16=0`` says no."""
    import os

    if os.environ.get("DSKD_CPU_BF16", "") == "0":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "").split()
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16", "bf16"} & set(flags))


def resolve_precision(precision: str, device: str) -> str:
    """`--precision auto`: bf16 autocast where the student's device computes bf16 natively (a GPU
    with bf16, or a CPU with AMX / AVX-512 BF16, where it measured 1.4x faster at the same dev CE),
    fp32 elsewhere (emulated bf16 is far slower)."""
    if precision != "auto":
        return precision
    import torch

    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


SCHEDULES = ("cosine", "linear", "constant")
PROJECTOR_INITS = ("random", "pinv")
PRECISIONS = ("auto", "fp32", "bf16")
VERIFY = ("sizes", "lazy", "full", "none")
KD_POSITIONS = ("all", "teacher-correct", "span-starts")
PARALLEL = ("ddp", "fsdp")


@dataclass
class AlignConfig:
    """Settings of `dskd-batch align`."""

    cache: str
    "A complete teacher cache."
    student_tokenizer: tuple[str, ...] = ()
    "Student tokenizer (or model folder, .gguf, pkg:NAME) to align the cache for; repeatable."
    force: bool = False
    "Recompute an alignment that is already stored."

    def __post_init__(self) -> None:
        if not self.student_tokenizer:
            raise DskdError("give at least one --student-tokenizer")


@dataclass
class DistillConfig:
    """Settings of stage two (`dskd-batch distill`)."""

    student: str
    "Student model: a local Hugging Face folder, a .gguf file, pkg:NAME, or a hub id where the network allows."
    out: str
    "Run folder: checkpoints, the final student, projectors, metrics.jsonl and run.json go here."
    cache: str | None = None
    "Teacher cache written by `cache-teacher` (the teacher itself is never loaded)."
    teacher: str | None = None
    "Live teacher (instead of --cache): run the teacher during training with the same code stage one uses (a model, or a served teacher at http://HOST:PORT)."
    data: str | None = None
    "Corpus for training without a cache (--teacher, or --method sft): a file, a `datasets` folder or `hf:ORG/NAME[:CONFIG][@SPLIT]`."
    columns: str | None = None
    "With --data: map its columns onto row fields, FIELD=COLUMN,... (as cache-teacher --columns)."
    method: str = "kd"
    "sft, seqkd (SFT on teacher-generated responses: a cache made with --generate), kd (vanilla KD), dskd; for a student with another tokenizer (from an aligned cache): dskd-eta (exact token alignment), dskd-cma (cross-model attention), mined, uld, gold (ULD with a direct KL over the tokens both vocabularies share) or alm (approximate likelihood matching of aligned chunks)."
    distance: str = "fkl"
    "Distance of the KD term: fkl, rkl, js, skl, srkl, akl, or an installed plug-in's (`dskd-batch distances` lists them)."
    epochs: int = 1
    "Passes over the training examples."
    max_steps: int | None = None
    "Stop after this many optimizer steps (overrides --epochs for the schedule's length)."
    lr: float = 2e-5
    "Learning rate of the student."
    projector_lr: float | None = None
    "Learning rate of the DSKD projectors. Default: 0 with --projector-init pinv (the projectors stay as solved, frozen: the heads stay unified, as the extended paper computes its student-to-teacher projector; the best DSKD measured here), 1e-3 with random."
    batch_size: int = 4
    "Examples per micro-batch per process."
    grad_accum: int = 1
    "Micro-batches per optimizer step (the global batch is batch_size x grad_accum x processes)."
    temperature: float = 2.0
    "KD temperature (applied to teacher and student logits; no T^2 factor, as in the papers)."
    kd_rate: float = 0.5
    "Weight of the KD term: loss = (1 - kd_rate) CE + kd_rate KD."
    distance_arg: tuple[str, ...] = ()
    "A hyper-parameter of --distance as KEY=VALUE (repeatable): skew_lambda of skl/srkl (default 0.1), akl_alpha of akl (head/tail split, 0.5), or a plug-in distance's own; `dskd-batch distances` lists them."
    lr_schedule: str = "cosine"
    "Learning-rate schedule: cosine, linear or constant (after warm-up)."
    warmup_ratio: float = 0.0
    "Share of the optimizer steps used for linear warm-up."
    weight_decay: float = 0.0
    "AdamW weight decay (student and projectors)."
    grad_clip: float = 1.0
    "Clip the global gradient norm to this value (0 disables)."
    seed: int = 42
    "Seed of initialisation, data order and dropout."
    lora_rank: int = 0
    "LoRA rank (0: train the full student)."
    lora_alpha: float = 16.0
    "LoRA alpha."
    lora_dropout: float = 0.0
    "LoRA dropout."
    lora_targets: str = "all-linear"
    "Modules LoRA adapts: `all-linear` or a comma-separated list of module names (q_proj,v_proj,...)."
    projector_init: str | None = None
    "DSKD projector initialisation: `pinv` (extended paper: least-squares match of the two heads; the default where the method's projectors read h_T) or `random` (first paper, and the default for dskd-cma; trained from random, DSKD lost to SFT in held-out likelihood here)."
    agreement_mask: bool = False
    "DSKD: apply the student-space KD only where the projected teacher's argmax equals the teacher's own argmax."
    kd_positions: str = "all"
    ("kd, dskd, dskd-eta, gold: `all`, or `teacher-correct`: KD only where the teacher's top-1 token is the target; "
     "elsewhere the position is trained on the label alone (CE at full weight). Across vocabularies: KD only at the "
     "aligned pairs whose teacher top-1 is the student's target; every other student position (no pair, or the "
     "teacher wrong) trains on the label at full weight. dskd-eta: `span-starts` adds the teacher-space KD at student "
     "tokens that start where a teacher token starts but span other bytes (merged numbers): both sides have read the "
     "same text there.")
    alm_tau: float = 100.0
    ("alm: the binarisation temperature τ of the chunk likelihoods, KL(Bernoulli(p_T^(1/τ)) ‖ Bernoulli(p_S^(1/τ))); "
     "100 as in the reference (tokenkit). A lower τ weighs the chunks' likelihood gap more.")
    only_student_space: bool = False
    "DSKD ablation: keep only the student-space terms (t2s CE + KD)."
    only_teacher_space: bool = False
    "DSKD ablation: keep only the teacher-space term (s2t KD)."
    resume: bool = False
    "Continue from the latest checkpoint in --out (exact: data order, RNG, optimizer, scheduler, projectors)."
    save_steps: int = 0
    "Write a checkpoint every N optimizer steps (0: only at the end of each epoch)."
    keep_checkpoints: int = 2
    "Checkpoints kept (oldest removed first)."
    prune_when_done: bool = False
    ("When the run finishes, delete its resume checkpoints and the best checkpoint's folder (RUN/student, "
     "RUN/student-last, the projectors and the metrics stay): a finished run has nothing left to resume. "
     "Pipelines set it unless told otherwise.")
    log_steps: int = 1
    "Write a metrics.jsonl line every N optimizer steps."
    device: str = "auto"
    "Device of the student: auto, cpu, cuda, cuda:1, ..."
    precision: str = "auto"
    "auto (bf16 where the device computes it natively: a GPU with bf16, a CPU with AMX or AVX-512 BF16; fp32 elsewhere), fp32, or bf16 autocast: matmuls in bf16, fp32 master weights, log-softmaxes, distances and sums in fp32 (GPU or CPU; on a CPU without bf16 units it is slower)."
    parallel: str = "ddp"
    "Under torchrun: ddp (replicated student) or fsdp (PyTorch FSDP2 fully_shard: the student and projectors sharded over the processes, for students that do not fit one device; with LoRA too; CPU with gloo too)."
    template: str = "auto"
    "Prompt template when reading --data (a cache records its own): auto (the tokenizer's chat template when it has one, else alpaca), alpaca, chat, chat:SYSTEM or none."
    max_prompt_len: int | None = None
    "Prompt tokens kept when reading --data (a cache records its own). Default: 256, or half of --max-len when that is below 512."
    max_len: int = 512
    "Total tokens kept when reading --data (a cache records its own)."
    limit: int | None = None
    "Use only the first N training examples."
    verify: str = "sizes"
    "Cache check before training: sizes (every file present with its recorded size: cheap), full (re-hash every shard first; `dskd-batch verify` does the same), lazy (hash each shard on its first read) or none."
    shuffle: str = "shard"
    "Data order per epoch: `shard` (shuffle the cache's shards, then the examples inside each: each chunk is read once) or `global` (one permutation of all examples; the only order for --data)."
    length_group: int = 1
    ("Global batches per length group: each run of N batches of the epoch's order is sorted by example length, cut "
     "into batches again and those shuffled among themselves, so a batch pads less (faster steps). 1: off.")
    teacher_device: str = "auto"
    "Device of a live teacher: auto (the student's), cpu, cuda:1, ..., or `map` (spread over the GPUs with device_map=auto)."
    teacher_top_k: int = 64
    "Top-k kept by a live teacher (as stage one would store)."
    on_policy: bool = False
    "On-policy KD (with --cache and --teacher): on a share of the batches the student samples the responses and the live teacher scores them; CE stays on the ground truth."
    student_gen_ratio: float = 0.5
    "--on-policy: probability that a batch is on-policy (0: never, exactly cache-only training; 1: every batch)."
    on_policy_after_epochs: int = 0
    "--on-policy: start on-policy batches after this many epochs."
    eval_data: str | None = None
    "Held-out data evaluated during training: a corpus (read with the run's template and limits; logs eval_ce) or a teacher cache of held-out data from the same teacher (also eval_kl and eval_top1)."
    eval_steps: int = 0
    "Evaluate --eval-data every N optimizer steps (0: at the end of each epoch); always at the end of training."
    loss_chunk: int = -1
    "Compute the loss this many response positions at a time (student and teacher logits, projections, distances), each chunk differentiated as it is computed, so memory does not grow with batch x vocabulary and nothing is recomputed. -1 (auto): on a CPU as many as keep each [positions, vocabulary] fp32 logit set of the method near 256 MiB (at V = 152k: 441 for SFT, 220 for KD, 110 for DSKD; at V = 49k: 1,365 / 682 / 341); on a GPU a power of two that lets the chunk's logit sets take 4% of the free device memory (1-8 GiB; on an H200 at V = 128k: 1,024 for KD, 512 for DSKD); 0: one piece. Every method but dskd-cma (its attention spans an example)."
    compile_loss: bool = False
    "torch.compile each loss chunk (student head, teacher logits, projections, distance) for the same vocabulary; the first steps pay the compilation."
    activation_checkpointing: bool = False
    "Recompute each student layer's activations in the backward pass instead of keeping them: less memory for long rows and big students (a 1B student under a 7B teacher) at about one more forward of the body per step. Same losses and gradients."
    skip_nonfinite: bool = False
    "Skip (and count in metrics.jsonl) an optimizer step whose loss or gradient is NaN/Inf instead of stopping the run."
    log_to: str = "none"
    "Also send every metrics.jsonl record to an experiment tracker: none, tensorboard (event files in RUN/tensorboard) or wandb (WANDB_MODE=offline works without network). metrics.jsonl stays the source of truth."
    keep_best: str | None = None
    "Keep the student with the best value of this --eval-data metric (eval_ce, eval_kl or eval_top1) in RUN/best/ and export it as RUN/student/ (the last weights go to RUN/student-last/)."

    @property
    def distance_args(self) -> dict[str, Any]:
        """--distance-arg parsed and checked: the keyword arguments of the distance function."""
        return parse_distance_args(self.distance, self.distance_arg)[1]

    def __post_init__(self) -> None:
        problems: list[str] = []

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                problems.append(f"{name} must be one of {', '.join(options)}; got {getattr(self, name)!r}")

        if self.max_prompt_len is None:
            self.max_prompt_len = default_prompt_len(self.max_len)
        problems += columns_problem(self.columns)
        choice("method", tuple(method_classes()))
        kind = method_classes().get(self.method, Method)  # what the method declares it needs
        if self.projector_init is None:
            self.projector_init = "pinv" if kind.pinv_projectors else "random"
        if self.projector_lr is None:
            self.projector_lr = 0.0 if self.projector_init == "pinv" else 1e-3
        choice("distance", tuple(distances()))
        if isinstance(self.distance_arg, dict):  # a pipeline's `distance_arg = {skew_lambda = 0.2}`
            self.distance_arg = tuple(f"{k}={v}" for k, v in self.distance_arg.items())
        if self.distance in distances():
            problems += parse_distance_args(self.distance, self.distance_arg)[0]
        choice("lr_schedule", SCHEDULES)
        choice("projector_init", PROJECTOR_INITS)
        choice("precision", PRECISIONS)
        choice("parallel", PARALLEL)
        problems += template_problem(self.template)
        choice("verify", VERIFY)
        choice("shuffle", ("shard", "global"))
        choice("log_to", LOG_TO)
        if self.cache is None and self.teacher is None and self.data is None:
            problems.append("give --cache (a teacher cache), --teacher with --data (a live teacher), or --data (sft)")
        if self.cache is not None and self.data is not None:
            problems.append("--cache already holds the training data; drop --data")
        if self.teacher is not None and self.cache is None and self.data is None:
            problems.append("a live --teacher needs --data")
        if kind.cross_vocab and self.cache is None:
            problems.append(f"--method {self.method} reads the teacher and the token alignment from a cache: give --cache "
                            "(made with `cache-teacher --student-tokenizer STUDENT`, or aligned with `dskd-batch align`)")
        elif self.cache is None and self.teacher is None and kind.needs_teacher:
            problems.append(f"--method {self.method} needs a teacher: --cache CACHE or --teacher MODEL --data DATA")
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints", "log_steps", "length_group"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.projector_lr < 0:
            problems.append(f"projector_lr must be >= 0, got {self.projector_lr}")
        elif self.projector_lr == 0 and self.projector_init != "pinv" and kind.dual_space:
            problems.append("--projector-lr 0 freezes the projectors: only --projector-init pinv gives frozen projectors "
                            "that carry the heads' match (random ones would stay random)")
        if not 0.0 <= self.kd_rate <= 1.0:
            problems.append(f"kd_rate must be in [0, 1], got {self.kd_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.save_steps < 0 or self.lora_rank < 0:
            problems.append("weight_decay, grad_clip, save_steps and lora_rank must be >= 0")
        if self.only_student_space and self.only_teacher_space:
            problems.append("--only-student-space and --only-teacher-space exclude each other")
        if self.max_len < self.max_prompt_len + 2:
            problems.append(f"max_len ({self.max_len}) must be >= max_prompt_len + 2 ({self.max_prompt_len + 2})")
        if (self.only_student_space or self.only_teacher_space) and not kind.dual_space:
            dual = ", ".join(n for n, c in method_classes().items() if c.dual_space)
            problems.append(f"--only-student-space / --only-teacher-space are DSKD ablations (use --method {dual})")
        if self.projector_init == "pinv" and not kind.pinv_projectors:
            problems.append(f"--projector-init pinv matches heads through h_T; the projectors of --method {self.method} "
                            "read other inputs (CMA's value projector: normalised embeddings + hidden states): use "
                            f"--projector-init random with {self.method}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be >= 1, got {self.limit}")
        if self.on_policy:
            if self.cache is None or self.teacher is None:
                problems.append("--on-policy needs --cache (off-policy batches) and --teacher (the live teacher that "
                                "scores the student's samples)")
            if not kind.needs_teacher:
                problems.append(f"--on-policy distils from the teacher; --method {self.method} has no KD term")
            if not 0.0 <= self.student_gen_ratio <= 1.0:
                problems.append(f"student_gen_ratio must be in [0, 1], got {self.student_gen_ratio}")
            if self.on_policy_after_epochs < 0:
                problems.append(f"on_policy_after_epochs must be >= 0, got {self.on_policy_after_epochs}")
        elif self.cache is not None and self.teacher is not None:
            problems.append("--cache and --teacher together are for --on-policy; give one of them otherwise")
        if self.loss_chunk < -1:
            problems.append(f"loss_chunk must be -1 (auto), 0 (one piece) or a number of positions, got {self.loss_chunk}")
        if self.eval_steps < 0:
            problems.append(f"eval_steps must be >= 0, got {self.eval_steps}")
        if self.keep_best is not None:
            if self.keep_best not in ("eval_ce", "eval_kl", "eval_top1"):
                problems.append(f"keep_best must be one of eval_ce, eval_kl, eval_top1; got {self.keep_best!r}")
            if self.eval_data is None:
                problems.append("--keep-best picks a checkpoint by an --eval-data metric: give --eval-data DEV")
        choice("kd_positions", KD_POSITIONS)
        if self.alm_tau <= 0:
            problems.append(f"alm_tau must be > 0, got {self.alm_tau}")
        elif self.alm_tau != 100.0 and self.method != "alm":
            problems.append(f"--alm-tau is ALM's binarisation temperature; --method {self.method} has none (use --method alm)")
        if self.kd_positions == "span-starts" and (self.method != "dskd-eta" or self.only_student_space):
            problems.append(f"--kd-positions span-starts adds dskd-eta's teacher-space term at merged tokens; --method "
                            f"{self.method}{' --only-student-space' if self.only_student_space else ''} has none (use "
                            "--method dskd-eta)")
        if self.kd_positions == "teacher-correct":
            if not kind.teacher_correct:
                ok = ", ".join(n for n, c in method_classes().items() if c.teacher_correct)
                problems.append(f"--kd-positions teacher-correct compares the teacher's top-1 with the target; "
                                f"--method {self.method} does not support it (use {ok})")
            if self.on_policy:
                problems.append("--kd-positions teacher-correct needs ground-truth targets; --on-policy positions have "
                                "the student's own samples")
        if problems:
            raise DskdError(problems)


@dataclass
class EvalConfig:
    """Settings of `dskd-batch evaluate`."""

    model: str
    "A run folder written by `distill` (its student and prompt settings are used) or a model (folder, .gguf, pkg:NAME)."
    data: str
    "Test set(s): comma-separated .jsonl/.parquet/datasets paths (instruction rows, or HumanEval rows for pass@1)."
    out: str | None = None
    "Report folder (report.json + report.md); default: RUN/eval for a run folder."
    seeds: str = "10,20,30,40,50"
    "Sampling seeds; scores are averaged over them (mean and std)."
    temperature: float = 1.0
    "Sampling temperature (0: greedy, one pass whatever --seeds says)."
    top_p: float = 1.0
    "Nucleus sampling threshold."
    no_repeat_ngram_size: int = 6
    "Block repeated n-grams of this size (0: off), as the papers do."
    max_new_tokens: int = 256
    "Most new tokens per response."
    batch_size: int = 16
    "Prompts generated together (left-padded)."
    template: str | None = None
    "Prompt template for a plain model (a run folder records its own): alpaca, chat, chat:SYSTEM or none."
    max_prompt_len: int | None = None
    "Prompt tokens kept (default: the run's, else 256)."
    limit: int | None = None
    "Use only the first N examples of each test set."
    device: str = "auto"
    "auto (the GPU when there is one), cpu, cuda, ..."
    dtype: str = "auto"
    "Model dtype for generation and scoring: auto (fp32 on CPU, bf16 on GPU), fp32, fp16, bf16 (fast on CPUs with AMX or AVX-512 BF16)."
    code_timeout: float = 10.0
    "Seconds a code completion may run against its tests."

    def __post_init__(self) -> None:
        problems: list[str] = []
        try:
            if not self.seed_list:
                problems.append("--seeds names no seed")
        except ValueError:
            problems.append(f"--seeds must be comma-separated integers, got {self.seeds!r}")
        problems += template_problem(self.template)
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            problems.append("temperature must be >= 0 and top_p in (0, 1]")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            problems.append("max_new_tokens and batch_size must be >= 1")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be >= 1, got {self.limit}")
        problems += dtype_problem(self.dtype)
        if problems:
            raise DskdError(problems)

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.split(",") if s.strip()]


def field_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """The enumerated fields of a command's config and their values, plug-ins included: the CLI
    makes each a `click.Choice` (the help lists the values, a typo is refused with the list)."""
    if cls is CacheConfig:
        return {"hidden": HIDDEN_MODES, "positions": ("targets", "all"), "dtype": DTYPES}
    if cls is DistillConfig:
        return {"method": tuple(method_classes()), "distance": tuple(distances()), "lr_schedule": SCHEDULES,
                "projector_init": PROJECTOR_INITS, "kd_positions": KD_POSITIONS,
                "precision": PRECISIONS, "parallel": PARALLEL, "verify": VERIFY, "shuffle": ("shard", "global"),
                "log_to": tuple(LOG_TO), "keep_best": ("eval_ce", "eval_kl", "eval_top1")}
    if cls is EvalConfig:
        return {"dtype": DTYPES}
    return {}

"""The one training loop of stage two. Methods and teacher sources plug into it.

Per optimizer step: every process takes its micro-batches of the global batch, runs the student
(only response positions reach the head), asks the method for loss **sums**, and back-propagates
``sum / response tokens of the whole optimizer step`` (times the world size, since DDP averages
gradients). So a step's gradient does not depend on how the global batch was split into
micro-batches or processes. Then clip, AdamW step (student and projector groups), schedule.

Checkpoints (``RUN/checkpoints/step-NNNNNNN/``) hold the student in Hugging Face format (the LoRA
adapter when training LoRA), the projectors, the optimizer and scheduler, every process's RNG
state and a ``state.json`` with the position in the data and the sha256 of every file; the data
order is a function of (seed, epoch), so resuming continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .batches import MicroBatch, Source, epoch_order, global_batches, length_grouped, step_loader
from ..files import atomic_write_bytes
from .checkpoint import (CHECKPOINTS, load_state_file, load_student_weights, read_weights, rng_state, save_checkpoint,
                         save_projectors, save_student, set_rng_state, verify_checkpoint)
from ..distributed import DistContext
from ..errors import DskdError
from ..losses import fkl, token_ce
from ..methods.same_vocab import KD_GRAD, LossInputs, Method, TeacherHead
from ..models import fp32_logits, head_inputs, post_head_settings
from .projectors import PROJECTOR_FILE
from .sharding import (full_optim_state, full_state, is_sharded, load_full_optim_state, load_full_state, local_value,
                       split_state)
from ..tracking import MetricsLog
from .validation import BestKeeper, Validation

log = logging.getLogger(__name__)



AUTO_CHUNK_ELEMENTS = 2**26  # CPU, --loss-chunk -1: positions x vocabulary of one fp32 chunk tensor (256 MiB) per
# logit set of the method (Method.logit_sets: 1 for SFT, 2 for KD, 4 for DSKD)
ACCEL_CHUNK_SHARE = 0.04  # accelerator, --loss-chunk -1: share of the device's free memory a chunk's logit sets may use
ACCEL_CHUNK_BYTES = (1 << 30, 8 << 30)  # ... within these bounds
CHUNK_BYTES_PER_ELEMENT = 12  # a [C, V] logit set in fp32 and the softmax and gradient built from it
MAX_AUTO_CHUNK = 4096


def auto_chunk(vocab: int, method: Method, device: torch.device | str | None = None,
               free_bytes: int | None = None) -> int:
    """--loss-chunk -1: positions per loss chunk.

    On a CPU: each of the method's [C, V] fp32 logit sets near 256 MiB, so a chunk's working set is
    about the same for every method (the size that measured fastest there). On an accelerator,
    where each chunk also costs a fixed launch overhead and bigger matrix products run faster, the
    chunk's logit sets (with their softmaxes and gradients) may take ACCEL_CHUNK_SHARE of the
    memory the device has free (``free_bytes``; read from the device when not given), between 1
    and 8 GiB; the result is a power of two between 64 and MAX_AUTO_CHUNK."""
    sets = max(vocab, 1) * max(method.logit_sets, 1)
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cpu":
        return max(64, AUTO_CHUNK_ELEMENTS // sets)
    if free_bytes is None:
        free_bytes = _free_device_memory(torch.device(device))
    lo, hi = ACCEL_CHUNK_BYTES
    budget = min(max(free_bytes * ACCEL_CHUNK_SHARE, lo), hi)
    n = int(budget // (sets * CHUNK_BYTES_PER_ELEMENT))
    return min(MAX_AUTO_CHUNK, max(64, 1 << max(0, n.bit_length() - 1)))


def _free_device_memory(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    return 0  # unknown: the lower bound


class EagerChunks(torch.autograd.Function):
    """A loss summed over chunks of positions whose gradient is taken chunk by chunk in the forward
    pass: each chunk's graph (its [C, V] logits, teacher logits, projections, softmaxes) is built,
    differentiated and freed before the next, and the gradients with respect to the head inputs h
    and to the parameters the chunks use are kept (the size of h and of those parameters). Backward
    only scales them. The memory of one chunk at the compute of one piece: no forward is run twice,
    unlike activation checkpointing (the fused linear + loss kernels of Liger-Kernel work this way
    on GPUs; this is the same idea in plain torch, for every method and distance)."""

    @staticmethod
    def forward(ctx: Any, chunk: Callable[[torch.Tensor, slice], dict[str, torch.Tensor]], parts: list[slice],
                names: list[str], h: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        grad_h = torch.zeros_like(h)
        grad_p = [torch.zeros_like(p) for p in params]
        sums: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            for part in parts:
                h_part = h[part].detach().requires_grad_(h.requires_grad)
                terms = chunk(h_part, part)
                objective = terms["objective"]
                wrt = ([h_part] if h.requires_grad else []) + list(params)
                if objective.requires_grad and wrt:
                    grads = torch.autograd.grad(objective, wrt, allow_unused=True)
                    if h.requires_grad:
                        grad_h[part] = grads[0]
                        grads = grads[1:]
                    for acc, g in zip(grad_p, grads):
                        if g is not None:
                            acc.add_(g)
                for k, v in terms.items():
                    v = v.detach()
                    sums[k] = sums[k] + v if k in sums else v
        names[:] = ["objective"] + sorted(k for k in sums if k != "objective")
        ctx.save_for_backward(grad_h, *grad_p)
        return torch.stack([sums[k].float().reshape(()) for k in names])

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor) -> tuple:
        scale = grad_values[0]  # only the objective carries a gradient; the rest are logged values
        grad_h, *grad_p = ctx.saved_tensors
        return (None, None, None, grad_h * scale, *(g * scale for g in grad_p))


class DistillModule(nn.Module):
    """Student + projectors behind one forward, so DDP/FSDP see every trainable parameter.

    A forward pre-hook on the student's output head keeps only the selected (response) positions,
    so the head runs on N rows instead of B x L, and records the head's input h_S.

    With ``loss_chunk`` C > 0 and a method whose loss is a sum of per-position terms, a micro-batch
    of more than C response positions does not run the head inside the model at all: the loss is
    computed C positions at a time from h_S (student logits, teacher logits from the cache, every
    projection and distance) by :class:`EagerChunks`, which differentiates each chunk as soon as
    it is computed, so its [C, V] intermediates are freed before the next chunk and nothing is
    recomputed in backward (under FSDP, and for the KD term of on-policy steps, each chunk runs
    under activation checkpointing instead). The sums, and so the gradients, equal the unchunked
    ones up to floating-point summation order.
    """

    def __init__(self, student: nn.Module, projectors: nn.ModuleDict, method: Method, vocab: int,
                 loss_chunk: int = -1, *, device: torch.device | str | None = None, compile_loss: bool = False) -> None:
        super().__init__()
        self.student = student
        self.projectors = projectors
        self.method = method
        self.vocab = vocab
        post = post_head_settings(student)
        self.post_head = bool(post)
        if loss_chunk and post:
            log.warning("--loss-chunk is off: the student's logits are post-processed after its head (%s)", post)
        if loss_chunk < 0:
            loss_chunk = auto_chunk(vocab, method, device)
        self.loss_chunk = 0 if post or not method.per_position else loss_chunk
        self.eager_chunks = True  # chunk gradients taken in the forward pass (off under FSDP: checkpointing)
        # --compile-loss: one chunk's loss (heads, teacher logits, projections, distance) through torch.compile
        self._same_vocab_chunk = torch.compile(self._chunk_losses, dynamic=True) if compile_loss else self._chunk_losses
        self._select: torch.Tensor | None = None
        self._h: torch.Tensor | None = None
        self.student.get_output_embeddings().register_forward_pre_hook(self._keep_selected)

    def _keep_selected(self, mod: nn.Module, args: tuple) -> tuple | None:
        if self._select is None:
            return None
        h = args[0]
        if h.dim() == 3:
            h = h[self._select]
        self._h = h
        return (h, *args[1:])

    def _chunked(self, mb: MicroBatch) -> bool:
        return bool(self.loss_chunk) and mb.targets.numel() > self.loss_chunk

    def _student_hidden(self, mb: MicroBatch) -> torch.Tensor:
        """h_S at the response positions, without running the head (chunked losses and held-out
        sums run it later)."""
        return head_inputs(self.student, mb.input_ids, mb.attention_mask, mb.select)

    def _chunk_losses(self, h: torch.Tensor, targets: torch.Tensor, tb: Any, head: TeacherHead | None,
                      cross: Any = None) -> dict[str, torch.Tensor]:
        s = self.student.get_output_embeddings()(h)
        w_s = self.student.get_output_embeddings().weight
        return self.method.losses(LossInputs(s.float(), h, targets, tb, head, self.projectors, w_s, self.vocab,
                                             cross=cross))

    def _parts(self, n: int) -> list[slice]:
        """The chunks of ``n`` response positions."""
        return [slice(lo, min(lo + self.loss_chunk, n)) for lo in range(0, n, self.loss_chunk)]

    def _chunked_losses(self, mb: MicroBatch, head: TeacherHead | None, eager: bool = True
                        ) -> dict[str, torch.Tensor]:
        h = self._student_hidden(mb)
        parts = self._parts(h.shape[0])

        def chunk(h_part: torch.Tensor, part: slice) -> dict[str, torch.Tensor]:
            if mb.cross is not None:  # across vocabularies: the teacher side whole, the pairs of these positions
                return self._chunk_losses(h_part, mb.targets[part], mb.teacher, head, mb.cross.student_rows(part))
            tb = mb.teacher.rows(part) if mb.teacher is not None else None
            return self._same_vocab_chunk(h_part, mb.targets[part], tb, head)

        if eager and self.eager_chunks:
            params = [p for m in (self.student.get_output_embeddings(), self.projectors) for p in m.parameters()
                      if p.requires_grad]
            names: list[str] = []
            values = EagerChunks.apply(chunk, parts, names, h, *params)
            return {k: (values[i] if k == "objective" else values[i].detach()) for i, k in enumerate(names)}
        from torch.utils.checkpoint import checkpoint

        total: dict[str, torch.Tensor] = {}
        for part in parts:
            terms = checkpoint(chunk, h[part], part, use_reentrant=False)
            for k, v in terms.items():
                total[k] = total[k] + v if k in total else v
        return total

    def _student(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Student logits and head inputs at the micro-batch's response positions."""
        self._select = mb.select
        try:
            out = self.student(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        finally:
            self._select = None
        h, self._h = self._h, None
        return out.logits, h

    def forward(self, mb: MicroBatch, head: TeacherHead | None, evaluate: bool = False) -> dict[str, torch.Tensor]:
        if evaluate:
            return self._eval_sums(mb, head)
        if mb.on_policy is None:
            return self._losses(mb, head)
        # on-policy: CE on the ground truth, the method's KD on the student's own samples
        s, _ = self._student(mb)
        ce = token_ce(s.float()[:, :self.vocab], mb.targets).sum()
        op = self._losses(mb.on_policy, head, eager=False)  # its KD term is differentiated again below
        terms = {k: v * mb.kd_scale for k, v in op.items() if k not in ("objective", "ce", "kd")}
        terms["kd"] = terms.pop(KD_GRAD)
        return self.method.combine(ce, terms)

    def _eval_sums(self, mb: MicroBatch, head: TeacherHead | None) -> dict[str, torch.Tensor]:
        """Held-out sums at the response positions: CE of the targets, and with a teacher record
        KL(p_T || q_S) at T = 1 and the count of positions where both argmaxes agree (chunked
        like the loss). The body may run under bf16 autocast; both heads, the log-softmaxes and the
        sums are fp32, so the values are those of the weights, not of bf16 logits."""
        if self.post_head:  # the logits are post-processed inside the model, so its head runs there
            s_all, _ = self._student(mb)
            n = s_all.shape[0]
        else:
            h = self._student_hidden(mb)
            n = h.shape[0]
        out = {"ce": torch.zeros(()), "tokens": torch.tensor(float(mb.targets.numel()))}
        with_teacher = mb.teacher is not None and head is not None
        if with_teacher:
            out.update(kl=torch.zeros(()), top1=torch.zeros(()))
        with torch.autocast(mb.input_ids.device.type, enabled=False):
            for part in self._parts(n) if self._chunked(mb) else [slice(0, n)]:
                s = s_all[part] if self.post_head else fp32_logits(self.student.get_output_embeddings(), h[part])
                s = s.float()[:, :self.vocab]
                out["ce"] = out["ce"] + token_ce(s, mb.targets[part]).sum().cpu()
                if with_teacher:
                    t = head.logits(mb.teacher.rows(part))[:, :self.vocab]
                    out["kl"] = out["kl"] + fkl(s, t, temperature=1.0).sum().cpu()
                    out["top1"] = out["top1"] + (s.argmax(-1) == t.argmax(-1)).sum().float().cpu()
        return out

    def _losses(self, mb: MicroBatch, head: TeacherHead | None, eager: bool = True) -> dict[str, torch.Tensor]:
        if self._chunked(mb):
            return self._chunked_losses(mb, head, eager)
        s, h = self._student(mb)
        w_s = self.student.get_output_embeddings().weight
        e_s = self.student.get_input_embeddings().weight if mb.cross is not None else None
        return self.method.losses(LossInputs(s.float(), h, mb.targets, mb.teacher, head, self.projectors, w_s,
                                             self.vocab, cross=mb.cross, student_embed=e_s))


@dataclass(kw_only=True)
class TrainPlan:
    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int | None
    seed: int
    lr: float
    projector_lr: float
    weight_decay: float
    warmup_ratio: float
    lr_schedule: str
    grad_clip: float
    save_steps: int
    keep_checkpoints: int
    log_steps: int
    precision: str
    fingerprint: str  # of everything that must match to resume
    skip_nonfinite: bool = False
    length_group: int = 1  # global batches sorted by length together (batches.length_grouped)
    extra_state: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(module: DistillModule, plan: TrainPlan) -> torch.optim.Optimizer:
    student = [p for p in module.student.parameters() if p.requires_grad]
    proj = [p for p in module.projectors.parameters() if p.requires_grad]
    groups = [{"params": student, "lr": plan.lr, "name": "student"}]
    if proj:
        groups.append({"params": proj, "lr": plan.projector_lr, "name": "projectors"})
    # the fused kernel (CPU and CUDA): on two CPU cores it steps a 50M-parameter student ~8x faster
    # than the per-parameter loop, which otherwise dominates a small student's step
    params = student + proj
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") and type(p) is nn.Parameter
                for p in params)
    try:
        return torch.optim.AdamW(groups, weight_decay=plan.weight_decay, fused=fused or None)
    except (RuntimeError, TypeError, ValueError):  # a torch without the fused kernel for these tensors
        return torch.optim.AdamW(groups, weight_decay=plan.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, plan: TrainPlan, total: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[plan.lr_schedule]
    return get_scheduler(name, opt, num_warmup_steps=int(plan.warmup_ratio * total), num_training_steps=total)


class Trainer:
    def __init__(self, module: DistillModule, plan: TrainPlan, source: Source, *, run_dir: Path, ctx: DistContext,
                 device: torch.device, pad_id: int, head: TeacherHead | None,
                 tokenizer: Any = None, wrap: Callable[[DistillModule], nn.Module] | None = None,
                 on_step: Callable[[int], None] | None = None,
                 validation: Validation | None = None) -> None:
        self.module = module
        self.validation = validation
        self.best = (BestKeeper(run_dir, validation.keep_best) if validation is not None and validation.keep_best
                     else None)
        self.plan = plan
        self.source = source
        self.run_dir = run_dir
        self.ctx = ctx
        self.device = device
        self.pad_id = pad_id
        self.head = head
        self.tokenizer = tokenizer
        self.on_step = on_step
        self.global_batch = plan.batch_size * plan.grad_accum * ctx.world_size
        self.steps_per_epoch = len(source) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DskdError(f"the training set has {len(source)} examples, fewer than one global batch "
                            f"({plan.batch_size} x {plan.grad_accum} x {ctx.world_size} processes = {self.global_batch})",
                            hint="lower --batch-size or --grad-accum")
        self.total_steps = plan.max_steps or plan.epochs * self.steps_per_epoch
        self.wrapped = wrap(module) if wrap is not None else module
        self.sharded = is_sharded(module)
        module.eager_chunks = not self.sharded  # FSDP gathers parameters per module forward: checkpointed chunks
        self.opt = make_optimizer(module, plan)
        self.sched = make_scheduler(self.opt, plan, self.total_steps)
        self.step = 0
        self.skipped_steps = 0
        self.with_teacher = module.method.needs_teacher

    # -- state ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """A resume checkpoint of this step (:func:`~dskd_batch.train.checkpoint.save_checkpoint`); every
        process calls it (RNG states are gathered, a sharded student too), the main process writes."""
        final = self.run_dir / CHECKPOINTS / f"step-{self.step:07d}"
        rank_rng = [None] * self.ctx.world_size
        if self.ctx.enabled:
            dist.all_gather_object(rank_rng, rng_state())
        else:
            rank_rng = [rng_state()]
        write = self.weight_writer()
        optim = self.opt.state_dict() if not self.sharded else full_optim_state(self.module, self.opt)
        if self.ctx.is_main:
            save_checkpoint(self.run_dir, self.step, write_weights=write, rng=rank_rng,
                            optim={"optimizer": optim, "scheduler": self.sched.state_dict()},
                            state={"step": self.step, "epoch": self.step // self.steps_per_epoch,
                                   "fingerprint": self.plan.fingerprint, "world_size": self.ctx.world_size,
                                   **self.plan.extra_state}, keep=self.plan.keep_checkpoints)
        self.ctx.barrier()
        return final

    def load_checkpoint(self, ck: Path) -> None:
        from safetensors.torch import load_file

        state = verify_checkpoint(ck)
        if state["fingerprint"] != self.plan.fingerprint:
            raise DskdError(f"checkpoint {ck} was written by a run with different settings "
                            f"(fingerprint {state['fingerprint']}, this run {self.plan.fingerprint})",
                            hint="resume with the same command, or start a new --out")
        if state["world_size"] != self.ctx.world_size:
            raise DskdError(f"checkpoint {ck} was written with {state['world_size']} processes, this run has "
                            f"{self.ctx.world_size}", hint="resume with the same number of processes")
        proj = load_file(str(ck / PROJECTOR_FILE))
        optim = load_state_file(ck / "optim.pt", map_location="cpu" if self.sharded else self.device)
        if self.sharded:  # every process reads the full tensors and keeps its shard
            full = {f"student.{k}": v for k, v in self._student_checkpoint(ck / "student").items()}
            full.update({f"projectors.{k}": v for k, v in proj.items()})
            load_full_state(self.module, full)
            load_full_optim_state(self.module, self.opt, optim["optimizer"])
        else:
            load_student_weights(self.module.student, ck / "student")
            if proj:
                self.module.projectors.load_state_dict(proj)
            self.opt.load_state_dict(optim["optimizer"])
        self.sched.load_state_dict(optim["scheduler"])
        set_rng_state(load_state_file(ck / "rng.pt")[self.ctx.rank])
        self.step = int(state["step"])
        if self.best is not None:
            self.best.load(self.step)
        log.info("resumed from %s (step %d of %d)", ck, self.step, self.total_steps)

    def _student_checkpoint(self, folder: Path) -> dict[str, torch.Tensor]:
        """A checkpoint's student weights under the module's parameter names: a LoRA adapter's keys
        (saved without the adapter's name, PEFT's file format) mapped back to the wrapped model's."""
        from safetensors.torch import load_file

        adapter = folder / "adapter_model.safetensors"
        if not adapter.exists():
            return read_weights(folder)
        names = {n.replace(".default.", "."): n for n, _ in self.module.student.named_parameters() if ".default." in n}
        state = load_file(str(adapter))
        unknown = [k for k in state if k not in names]
        if unknown:
            raise DskdError(f"{adapter}: adapter weights do not fit the student ({unknown[:3]})")
        return {names[k]: v for k, v in state.items()}

    def weight_writer(self) -> Callable[[Path, Path | None], None]:
        """A function that writes the student (HF folder or LoRA adapter) and, given a folder, the
        projectors. Under FSDP the full tensors are gathered first: every process must call this;
        only the main process calls what it returns."""
        if not self.sharded:
            def write(student_dir: Path, proj_dir: Path | None) -> None:
                save_student(self.module.student, student_dir)
                if proj_dir is not None:
                    save_projectors(self.module.projectors, proj_dir)
            return write
        student_sd, proj_sd = split_state(full_state(self.module))
        # a tied head appears under both names in the gathered state: keep the name the model owns
        owned = {n for n, _ in self.module.student.named_parameters()} | {n for n, _ in self.module.student.named_buffers()}
        student_sd = {k: v for k, v in student_sd.items() if k in owned}

        def write_full(student_dir: Path, proj_dir: Path | None) -> None:
            from safetensors.torch import save_file

            self.module.student.save_pretrained(str(student_dir), state_dict=student_sd, safe_serialization=True)
            if proj_dir is not None:
                save_file({k: v.contiguous() for k, v in proj_sd.items()}, str(proj_dir / PROJECTOR_FILE))
        return write_full

    # -- loop -------------------------------------------------------------------------------------
    def _plan_steps(self) -> list[tuple[int, int, list[int]]]:
        steps: list[tuple[int, int, list[int]]] = []
        epoch = 0
        while len(steps) < self.total_steps:
            order = length_grouped(epoch_order(len(self.source), self.source.groups, self.plan.seed, epoch),
                                   self.source.n_tokens, self.global_batch, self.plan.length_group, self.plan.seed, epoch)
            for k, b in enumerate(global_batches(order, self.global_batch)):
                steps.append((epoch, k, b))
            epoch += 1
        return steps[self.step:self.total_steps]

    def _autocast(self) -> Any:
        if self.plan.precision == "bf16":  # matmuls in bf16; log-softmaxes, distances and sums stay fp32
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train(self, metrics_path: Path, log_to: str = "none", config: dict[str, Any] | None = None
              ) -> dict[str, float]:
        """Run the remaining optimizer steps; metrics go to ``metrics_path`` and, with ``log_to``,
        to that tracker (:mod:`dskd_batch.tracking`) too. Returns the last logged training record."""
        self.module.train()
        head = self.head.to(self.device) if self.head is not None else None
        ex = self.source
        steps = self._plan_steps()
        loader = step_loader(ex, steps, batch_size=self.plan.batch_size, world=self.ctx.world_size, rank=self.ctx.rank,
                             pad_id=self.pad_id, with_teacher=self.with_teacher)
        params = [p for p in self.module.parameters() if p.requires_grad]
        last: dict[str, float] = {}
        t_last, tok_last, steps_since = time.perf_counter(), 0, 0
        if self.ctx.is_main:
            trim_metrics(metrics_path, self.step)
            if self.best is not None and self.step == 0:
                self.best.load(0)
        mf = MetricsLog(metrics_path, log_to, config=config) if self.ctx.is_main else None
        try:
            for epoch, k, batch, micro in loader:
                n_resp = sum(ex.n_targets[i] for i in batch)
                ex.prepare_step(micro, n_resp, self.ctx)
                sums: dict[str, float] = {}
                tokens = 0
                finite = True
                for m, mb in enumerate(micro):
                    mb = mb.to(self.device)
                    sync = m == len(micro) - 1
                    ctx = self.wrapped.no_sync() if (not sync and hasattr(self.wrapped, "no_sync")) else nullcontext()
                    with ctx, self._autocast():
                        terms = self.wrapped(mb, head)
                        loss = terms["objective"] * (self.ctx.world_size / n_resp)
                    finite = finite and bool(torch.isfinite(loss.detach()))
                    loss.backward()
                    for name, v in terms.items():
                        if not name.startswith("_"):
                            sums[name] = sums.get(name, 0.0) + float(v.detach())
                    tokens += mb.tokens
                gnorm = local_value(torch.nn.utils.clip_grad_norm_(params, self.plan.grad_clip
                                                                   if self.plan.grad_clip > 0 else float("inf")))
                if self._nonfinite(finite, gnorm, epoch, batch):
                    self.skipped_steps += 1  # --skip-nonfinite: no update, the schedule and data order go on
                else:
                    self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                steps_since += 1
                tok_last += tokens
                if self.step % self.plan.log_steps == 0 or self.step == self.total_steps:
                    last = self._log(mf, sums, n_resp, tokens, epoch, gnorm, t_last, tok_last, steps_since)
                    t_last, tok_last, steps_since = time.perf_counter(), 0, 0
                if self.validation is not None and self.validation.due(
                        self.step, k == self.steps_per_epoch - 1, self.step == self.total_steps):
                    self._validate(mf, epoch)
                    t_last = time.perf_counter()  # evaluation time is not training throughput
                if (self.plan.save_steps and self.step % self.plan.save_steps == 0) or \
                        (k == self.steps_per_epoch - 1) or self.step == self.total_steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self.step)
        finally:
            if mf is not None:
                mf.close()
        return last

    def _nonfinite(self, finite: bool, gnorm: torch.Tensor, epoch: int, batch: list[int]) -> bool:
        """Whether this step's loss or gradient is NaN/Inf on any process. Without
        ``skip_nonfinite`` that stops the run, naming the step and its examples, before the
        optimizer, a checkpoint or the final student can take the values in."""
        bad = torch.tensor([0.0 if finite and bool(torch.isfinite(gnorm)) else 1.0])
        if self.ctx.enabled:
            dist.all_reduce(bad)
        if not float(bad):
            return False
        try:
            recs = self.source.records(batch[:8])
            names = [str(r.get("id", f"#{i}")) for r, i in zip(recs, batch)]
        except Exception:  # noqa: BLE001 - naming is best effort
            names = [f"#{i}" for i in batch[:8]]
        what = "loss" if not finite else "gradient norm"
        msg = (f"step {self.step + 1} (epoch {epoch + 1}): the {what} is not finite; its global batch holds examples "
               f"{', '.join(names)}" + (f" and {len(batch) - 8} more" if len(batch) > 8 else ""))
        if self.plan.skip_nonfinite:
            log.warning("%s: step skipped (--skip-nonfinite)", msg)
            return True
        raise DskdError(msg, hint="no checkpoint or student was written from this step. Look for NaN/Inf in the cache "
                                  "(`dskd-batch verify`) or lower --lr; --skip-nonfinite skips such steps and counts them")

    def _validate(self, mf: MetricsLog | None, epoch: int) -> dict[str, float]:
        assert self.validation is not None
        t0 = time.perf_counter()
        with self._autocast():  # the body as training runs it; the logits and sums stay fp32 (_eval_sums)
            ev = self.validation.run(self.wrapped, pad_id=self.pad_id, device=self.device, rank=self.ctx.rank,
                                     world=self.ctx.world_size)
        rec = {"step": self.step, "epoch": epoch, **ev, "eval_s": time.perf_counter() - t0}
        if self.best is not None:  # every process decides alike (the metrics are all-reduced)
            rec["best"] = self.best.offer(self.step, ev, self.weight_writer, self.ctx.is_main)
        if mf is not None:
            mf.write(rec)
            log.info("step %d/%d %s", self.step, self.total_steps,
                     " ".join(f"{k} {ev[k]:.4f}" for k in self.validation.metrics))
        self.ctx.barrier()
        return ev

    def _log(self, mf: MetricsLog | None, sums: dict[str, float], n_resp: int, tokens: int, epoch: int, gnorm: torch.Tensor,
             t_last: float, tok_last: int, steps_since: int) -> dict[str, float]:
        names = sorted(sums)
        vals = torch.tensor([sums[n] for n in names] + [float(tokens), float(tok_last)], dtype=torch.float64)
        if self.ctx.enabled:
            dist.all_reduce(vals)
        now = time.perf_counter()
        rec: dict[str, Any] = {"step": self.step, "epoch": epoch}
        for n, v in zip(names, vals[:len(names)].tolist()):
            key = "loss" if n == "objective" else n
            rec[key] = v / n_resp  # per response token of the step
        if self.skipped_steps:
            rec["skipped_steps"] = self.skipped_steps
        rec.update(lr=self.opt.param_groups[0]["lr"], grad_norm=float(gnorm), response_tokens=n_resp,
                   tokens=int(vals[-2]), tokens_per_s=float(vals[-1]) / max(now - t_last, 1e-9),
                   steps_per_s=steps_since / max(now - t_last, 1e-9))
        if len(self.opt.param_groups) > 1:
            rec["projector_lr"] = self.opt.param_groups[1]["lr"]
        rec.update(self.source.metrics(steps_since))
        if mf is not None:
            mf.write(rec)
            log.info("step %d/%d loss %.4f %s", self.step, self.total_steps, rec["loss"],
                     " ".join(f"{n} {rec[n]:.4f}" for n in ("ce", "kd") if n in rec))
        return rec


def trim_metrics(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (a resumed run logs them again), so every step
    appears once in metrics.jsonl."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())

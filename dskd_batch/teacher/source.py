"""What a teacher provides, whatever runs it: the protocol stage one, the live stage and on-policy
sampling go through, and the registry of its kinds.

A :class:`Teacher` has a tokenizer, a description (its fingerprint, architecture, hidden size,
vocabulary, dtype, tied embeddings, head bias; stored in the cache's settings), its output head and
input embeddings (stored once per cache), its configuration as JSON, and the one thing every stage
asks of it: its outputs at the target positions of a batch of token-id sequences (the records of
:mod:`dskd_batch.teacher.forward`: the head input, top-k logits, log-sum-exp, argmax, and on request
the real logits). Sampling responses (``cache-teacher --generate``) is optional.

Kinds, chosen by the ``--teacher`` spec (:func:`open_teacher`):

- :class:`LocalTeacher`: a Hugging Face model in this process (a folder, a ``.gguf`` file, ``pkg:``,
  a hub id), loaded when first needed.
- ``http://`` and ``https://``: a teacher served by another process or machine
  (:mod:`dskd_batch.teacher.http`).
- a plug-in: entry-point group ``dskd_batch.teachers``, URL scheme -> a class taking the spec and
  the keyword arguments of :func:`open_teacher`.

A new kind of teacher (a serving engine that returns hidden states, another runtime) is one new
file: a subclass of :class:`Teacher` and its scheme in :data:`TEACHER_KINDS` (or an entry point).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch

from ..errors import DskdError
from ..losses import with_plugins
from .forward import PendingRecords, Record, TeacherForward


class Teacher:
    """The teacher protocol (see the module docstring). ``top_k`` is the number of top logits kept
    per position."""

    spec: str
    top_k: int

    @property
    def tokenizer(self) -> Any:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the teacher's outputs are made (decides whether storing overlaps the forward)."""
        return torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        """fingerprint, architecture, hidden_size, vocab_size (the token rows of its head), dtype,
        tied_embeddings, has_head_bias."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        return str(self.describe()["fingerprint"])

    def head_and_embeddings(self) -> dict[str, torch.Tensor]:
        """``lm_head.weight`` [V, d] (``lm_head.bias``) and ``embed_tokens.weight``, fp32 on the CPU."""
        raise NotImplementedError

    def config(self) -> Any:
        """The model's configuration (hidden size, vocabulary, tying), without loading its weights."""
        from transformers import PretrainedConfig

        return PretrainedConfig.from_dict(json.loads(self.config_json()))

    def config_json(self) -> str:
        raise NotImplementedError

    def launch(self, sequences: list[list[int]], *, positions: list[list[int]] | None = None,
               keep_logits: bool | list[bool] = False) -> PendingRecords:
        """Start the forward on ``sequences``; the records come from ``.wait()``."""
        raise NotImplementedError

    def __call__(self, sequences: list[list[int]], *, positions: list[list[int]] | None = None,
                 keep_logits: bool | list[bool] = False) -> list[Record]:
        return self.launch(sequences, positions=positions, keep_logits=keep_logits).wait()

    def generate(self, prompts: list[list[int]], *, settings: Any, max_new: list[int]) -> list[list[int]]:
        """Sampled continuations of token-id prompts (``cache-teacher --generate``; the caller seeds
        torch's generator)."""
        raise DskdError(f"the teacher {self.spec} cannot sample responses",
                        hint="cache its responses with a local teacher, or give prompt/response rows")

    def memory(self) -> dict[str, float]:
        """Peak accelerator memory of the teacher's devices, for the run's record (may be empty)."""
        return {}

    def close(self) -> None:
        pass


class LocalTeacher(Teacher):
    """A Hugging Face causal LM in this process, loaded on first use: the tokenizer alone is enough
    to check a cache's settings before the model loads."""

    def __init__(self, spec: str, *, top_k: int = 0, dtype: str = "auto", device: str | torch.device = "auto") -> None:
        from ..models import load_tokenizer

        self.spec, self.top_k, self._dtype_name, self._device_name = str(spec), top_k, dtype, device
        self._tok = load_tokenizer(self.spec)
        self._model: Any = None
        self._forward: TeacherForward | None = None
        self._described: dict[str, Any] | None = None

    @property
    def tokenizer(self) -> Any:
        return self._tok

    @property
    def model(self) -> Any:
        if self._model is None:
            from ..models import load_causal_lm, resolve_device, resolve_dtype

            if self._device_name == "map":  # spread over the visible GPUs
                dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                self._model = load_causal_lm(self.spec, dtype=resolve_dtype(self._dtype_name, dev), device="map")
            else:
                dev = (self._device_name if isinstance(self._device_name, torch.device)
                       else resolve_device(self._device_name))
                self._model = load_causal_lm(self.spec, dtype=resolve_dtype(self._dtype_name, dev), device=dev)
        return self._model

    @property
    def vocab(self) -> int:
        from ..models import token_rows

        return token_rows(self.model, self._tok)

    @property
    def forward(self) -> TeacherForward:
        if self._forward is None or self._forward.top_k != self.top_k:  # one forward (one head hook) at a time
            self.close()
            self._forward = TeacherForward(self.model, self.top_k, self._tok.pad_token_id, self.vocab)
        return self._forward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        if self._described is None:
            self._described = self._describe()
        return dict(self._described)

    def _describe(self) -> dict[str, Any]:
        from ..models import dtype_name, model_fingerprint

        model = self.model
        head = model.get_output_embeddings()
        return {"fingerprint": model_fingerprint(model), "architecture": type(model).__name__,
                "hidden_size": int(head.weight.shape[1]), "vocab_size": int(self.vocab),
                "dtype": dtype_name(next(model.parameters()).dtype),
                "tied_embeddings": model.get_input_embeddings().weight.data_ptr() == head.weight.data_ptr(),
                "has_head_bias": getattr(head, "bias", None) is not None}

    def head_and_embeddings(self) -> dict[str, torch.Tensor]:
        from ..models import head_and_embeddings

        return head_and_embeddings(self.model, self.vocab)

    def config_json(self) -> str:
        return self.model.config.to_json_string()

    def config(self) -> Any:
        from ..models import teacher_config

        return self._model.config if self._model is not None else teacher_config(self.spec)

    def launch(self, sequences: list[list[int]], *, positions: list[list[int]] | None = None,
               keep_logits: bool | list[bool] = False) -> PendingRecords:
        return self.forward.launch(sequences, positions=positions, keep_logits=keep_logits)

    def generate(self, prompts: list[list[int]], *, settings: Any, max_new: list[int]) -> list[list[int]]:
        from ..generation import sample_responses

        return sample_responses(self.model, prompts, pad_id=self._tok.pad_token_id, eos_id=self._tok.eos_token_id,
                                settings=settings, max_new=max_new, vocab=len(self._tok))

    def memory(self) -> dict[str, float]:
        if self._model is None:
            return {}
        devs = {p.device for p in self._model.parameters()}
        mem: dict[str, Any] = {f"teacher_{d}_max_allocated_mib": torch.cuda.max_memory_allocated(d) / 2**20
                               for d in sorted((d for d in devs if d.type == "cuda"), key=str)}
        mem["teacher_devices"] = ", ".join(sorted(str(d) for d in devs))
        return mem

    def close(self) -> None:
        if self._forward is not None:
            self._forward.close()
            self._forward = None


# URL scheme -> the teacher class, or "module:Class" (imported when a spec asks for it, as entry points are)
TEACHER_KINDS: dict[str, Callable[..., Teacher] | str] = {"http": "dskd_batch.teacher.http:HTTPTeacher",
                                                          "https": "dskd_batch.teacher.http:HTTPTeacher"}


def open_teacher(spec: str, *, top_k: int = 0, dtype: str = "auto", device: str | torch.device = "auto") -> Teacher:
    """The teacher that ``spec`` names: a URL whose scheme is a registered kind, else a local model."""
    spec = str(spec)
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else None
    if scheme is not None:
        kinds = with_plugins("dskd_batch.teachers", TEACHER_KINDS)
        if scheme not in kinds:
            raise DskdError(f"--teacher {spec}: no teacher kind for {scheme}://",
                            hint=f"known: {', '.join(k + '://' for k in kinds)}, or a local model")
        kind = kinds[scheme]
        if isinstance(kind, str):
            from importlib import import_module

            module, _, name = kind.partition(":")
            kind = getattr(import_module(module), name)
        return kind(spec, top_k=top_k, dtype=dtype, device=device)
    return LocalTeacher(spec, top_k=top_k, dtype=dtype, device=device)

"""The teacher record: one column spec for everything that stores, reads, batches or produces it.

An example record (what ``open_cache(path)[i]``, the live teacher and the on-policy stage yield)
holds the example's texts, ``input_ids`` (LongTensor[n], every token), ``prompt_len`` and
``positions`` (LongTensor[m]: the positions whose teacher outputs the record holds, increasing),
and the teacher's outputs at those positions only: row j of every per-position field belongs to
position ``positions[j]``, i.e. what the teacher emitted after reading ``input_ids[: positions[j] + 1]``.

:data:`COLUMNS` is the spec of those fields (name, axis, dtype on disk, per-row shape, dtype in
memory). The cache writer derives its Zarr arrays from it, the reader decodes with it, the
live teacher's output, collate and :class:`TeacherBatch` use its names. A new
cached field is one entry here (plus the line that computes it in :mod:`dskd_batch.teacher.forward`).
The hidden state is the one field stored through a codec (:mod:`dskd_batch.cache.codecs`), so its disk
arrays come from the cache's codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import target_positions

TOKENS, POSITIONS = "tokens", "positions"  # the two axes of a shard's arrays


@dataclass(frozen=True)
class Column:
    name: str
    axis: str  # TOKENS: one row per token; POSITIONS: one row per stored position
    disk: str  # numpy dtype on disk; "index" is the cache's token-index dtype (uint16 or int32)
    width: str | None  # None: a scalar per row; "k": top_k values per row
    memory: torch.dtype
    teacher: bool  # an output of the teacher (part of a TeacherBatch)
    doc: str


COLUMNS: tuple[Column, ...] = (
    Column("input_ids", TOKENS, "int32", None, torch.long, False, "every token of the example"),
    Column("positions", POSITIONS, "int32", None, torch.long, False, "the stored positions"),
    Column("logsumexp", POSITIONS, "float32", None, torch.float32, True, "log-sum-exp of the full real logits"),
    Column("argmax", POSITIONS, "int32", None, torch.long, True, "the teacher's top-1 token"),
    Column("topk_values", POSITIONS, "float32", "k", torch.float32, True, "top-k real logits (if top_k > 0)"),
    Column("topk_indices", POSITIONS, "index", "k", torch.long, True, "their token ids (if top_k > 0)"),
)
CODEC_FIELD = "hidden"  # the head input [m, d], stored through the cache's codec
LIVE_ONLY = ("logits",)  # real logits [m, V]: given by a live teacher when h @ W.T does not reproduce them
TEACHER_FIELDS: tuple[str, ...] = (CODEC_FIELD, *(c.name for c in COLUMNS if c.teacher), *LIVE_ONLY)

_NUMPY = {torch.long: np.int64, torch.float32: np.float32}
ArraySpecs = dict[str, tuple[str, str, tuple[int, ...]]]  # name -> (axis, numpy dtype, per-row shape)


def _to(self: Any, device: torch.device) -> Any:
    return type(self)(**{k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in self.__dict__.items()})


def _rows(self: Any, idx: Tensor) -> Any:
    """The record at the positions ``idx``."""
    return type(self)(**{k: (v[idx] if v is not None else None) for k, v in self.__dict__.items()})


# The teacher's record at N positions of a micro-batch: one attribute per name of TEACHER_FIELDS, made
# from the spec (a new teacher column is its COLUMNS entry): hidden [N, d_T], logsumexp [N], argmax [N],
# topk_values / topk_indices [N, k], logits [N, V_T] when the source gave real logits; any may be None.
TeacherBatch = make_dataclass(
    "TeacherBatch", [(name, "Tensor | None", field(default=None)) for name in TEACHER_FIELDS],
    namespace={"to": _to, "rows": _rows, "__doc__": "The teacher's record at N positions of a micro-batch, one "
               "attribute per name of :data:`TEACHER_FIELDS` (any may be None if not available)."})
TeacherBatch.__module__ = __name__  # picklable by name, documented where it is made


def array_specs(top_k: int, index_dtype: str, codec: Any | None) -> ArraySpecs:
    """The Zarr arrays of a shard: every column (top-k ones only with ``top_k``) and the codec's."""
    specs: ArraySpecs = {}
    for c in COLUMNS:
        if c.width == "k" and not top_k:
            continue
        specs[c.name] = (c.axis, index_dtype if c.disk == "index" else c.disk, (top_k,) if c.width == "k" else ())
    if codec is not None:
        specs.update({name: (POSITIONS, dt, shape) for name, (dt, shape) in codec.array_specs().items()})
    return specs


def to_arrays(rec: dict[str, Any], specs: ArraySpecs, codec: Any | None) -> dict[str, np.ndarray]:
    """A record (tensors) as the numpy arrays of ``specs`` (the writer's side)."""
    out = {c.name: rec[c.name].numpy().astype(specs[c.name][1]) for c in COLUMNS if c.name in specs}
    if codec is not None:
        out.update(codec.encode(rec[CODEC_FIELD]))
    return out


def from_arrays(arrays: dict[str, np.ndarray], codec: Any | None) -> dict[str, Any]:
    """Numpy arrays read from a shard as a record's tensors (the reader's side); absent top-k and
    hidden fields are None."""
    rec: dict[str, Any] = {c.name: torch.from_numpy(arrays[c.name].astype(_NUMPY[c.memory])) if c.name in arrays
                           else None for c in COLUMNS}
    rec[CODEC_FIELD] = codec.decode({k: arrays[k] for k in codec.array_specs()}) if codec is not None else None
    return rec


def training_positions(rec: dict[str, Any]) -> torch.Tensor:
    """The positions a record is trained on (LongTensor): its explicit ``targets`` if it has them,
    else the prompt/response rule of :func:`dskd_batch.data.target_positions`."""
    t = rec.get("targets")
    if t is not None:
        return torch.as_tensor(t, dtype=torch.long)
    r = target_positions(len(rec["input_ids"]), int(rec["prompt_len"]))
    return torch.arange(r.start, r.stop, dtype=torch.long)


def rows_at(rec: dict[str, Any], wanted: torch.Tensor) -> torch.Tensor | slice:
    """Which of a record's stored rows hold the positions ``wanted`` (a slice when they are all of
    them, the usual case); a wanted position the record does not hold is an error."""
    stored = torch.as_tensor(rec["positions"]).long()
    if stored.shape == wanted.shape and torch.equal(stored, wanted):
        return slice(None)
    idx = torch.searchsorted(stored, wanted)
    if len(wanted) and (int(idx.max()) >= len(stored) or not torch.equal(stored[idx], wanted)):
        missing = wanted if not len(stored) else \
            wanted[(idx >= len(stored)) | (stored[idx.clamp(max=len(stored) - 1)] != wanted)]
        raise ValueError(f"example {rec.get('id', '?')}: the teacher's outputs at positions {missing[:5].tolist()} "
                         "are not stored")
    return idx


def target_rows(rec: dict[str, Any]) -> torch.Tensor | slice:
    """Which of a record's stored rows hold its training positions."""
    return rows_at(rec, training_positions(rec))


"""Reading a teacher cache: ``open_cache(path)`` returns a sequence of example records.

A record is a dict with ``id``, ``prompt``, ``response``, ``instruction``, ``input``,
``input_ids`` (LongTensor[n]), ``prompt_len``, ``positions`` (LongTensor[m]) and the teacher's
outputs at those positions: ``hidden`` (FloatTensor[m, d] or None), ``topk_values``/``topk_indices``
([m, k] or None), ``logsumexp`` and ``argmax`` ([m]); see :mod:`dskd_batch.cache.records`. The teacher
stage of ``distill`` yields the same records, so methods cannot tell a cache from a live teacher.

Each shard is checked against its recorded sha256s the first time it is read (``verify="lazy"``,
the default; cheap next to training), on open (``"full"``), or never (``"none"``).
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from .codecs import HiddenCodec, make_codec
from ..errors import CacheCorruptError, DskdError
from .head import TeacherHead
from .records import POSITIONS, TEACHER_FIELDS, TOKENS, TeacherBatch, from_arrays
from .format import (CODEC_FILE, FORMAT_VERSION, HEAD_FILE, INDEX, MANIFEST, SETTINGS, SHARD_META, SHARDS,
                     TEACHER, read_json, sha256_file)
from .writer import LENGTH, OFFSET

LOSSLESS_HIDDEN = ("fp32", "fp16", "bf16")


def verify_shard(shard_dir: Path, expected_meta_sha: str | None, *, hash_files: bool = True) -> list[str]:
    """Problems with one shard folder (empty list: it matches its checksums). With
    ``hash_files=False`` only presence and sizes are checked (cheap: no file is read)."""
    name = shard_dir.name
    meta_path = shard_dir / SHARD_META
    if not shard_dir.is_dir():
        return [f"shard {name} is missing ({shard_dir})"]
    if not meta_path.exists():
        return [f"shard {name}: {SHARD_META} is missing"]
    if hash_files and expected_meta_sha is not None and sha256_file(meta_path) != expected_meta_sha:
        return [f"shard {name}: {SHARD_META} does not match the manifest's checksum"]
    try:
        meta = read_json(meta_path)
    except (OSError, json.JSONDecodeError) as e:
        return [f"shard {name}: {SHARD_META} is unreadable ({e})"]
    problems = []
    for rel, (size, digest) in meta["files"].items():
        p = shard_dir / rel
        if not p.exists():
            problems.append(f"shard {name}: file {rel} is missing")
        elif p.stat().st_size != size:
            problems.append(f"shard {name}: file {rel} has {p.stat().st_size} bytes, expected {size}")
        elif hash_files and sha256_file(p) != digest:
            problems.append(f"shard {name}: file {rel} does not match its sha256 (corrupt)")
    return problems


def load_codec(cache_dir: Path, settings: dict[str, Any]) -> HiddenCodec | None:
    """The hidden-state codec a cache was written with (its state from the teacher folder)."""
    mode = settings["storage"]["hidden"]
    state = None
    if mode == "compact":
        from safetensors.torch import load_file

        state = load_file(str(Path(cache_dir) / TEACHER / CODEC_FILE))
    return make_codec(mode, int(settings["teacher"]["hidden_size"]), state)


class _Shard:
    def __init__(self, path: Path, codec: HiddenCodec | None, max_chunks: int = 8, targets_stored: bool = True) -> None:
        import zarr

        self.path = path
        self.targets_stored = targets_stored
        self.meta = read_json(path / SHARD_META)
        self.chunks = self.meta["chunk_rows"]
        table = pq.read_table(path / INDEX)
        self.index = {name: table.column(name).to_pylist() for name in table.column_names}
        self.arrays = {p.name: (axis, zarr.open_array(str(p), mode="r"))
                       for axis in (TOKENS, POSITIONS) for p in sorted((path / axis).iterdir())}
        self.codec = codec
        self._lru: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._max = max_chunks * max(1, len(self.arrays))
        self._lock = threading.Lock()

    def _chunk(self, name: str, c: int) -> np.ndarray:
        key = (name, c)
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return self._lru[key]
        axis, arr = self.arrays[name]
        size = self.chunks[axis]
        try:
            data = arr[c * size:(c + 1) * size]
        except Exception as e:  # noqa: BLE001 - zarr/blosc raise many kinds
            raise CacheCorruptError(f"shard {self.path.name}: array {name} chunk {c} cannot be read ({e})",
                                    hint=f"run `dskd-batch verify {self.path.parent.parent}`") from e
        with self._lock:
            self._lru[key] = data
            while len(self._lru) > self._max:
                self._lru.popitem(last=False)
        return data

    def read(self, name: str, j: int) -> np.ndarray:
        """Example j's rows of array ``name`` (on the array's own axis)."""
        axis = self.arrays[name][0]
        start, n = int(self.index[OFFSET[axis]][j]), int(self.index[LENGTH[axis]][j])
        if n == 0:
            return self.arrays[name][1][0:0]
        size = self.chunks[axis]
        first, last = start // size, (start + n - 1) // size
        parts = [self._chunk(name, c) for c in range(first, last + 1)]
        data = np.concatenate(parts) if len(parts) > 1 else parts[0]
        lo = start - first * size
        return data[lo:lo + n]

    def texts(self, j: int) -> dict[str, Any]:
        rec: dict[str, Any] = {k: self.index[k][j] for k in ("id", "instruction", "input", "prompt", "response", "source",
                                                             "messages")}
        rec["prompt_len"] = int(self.index["prompt_len"][j])
        return rec

    def token_arrays(self, j: int, names: tuple[str, ...]) -> dict[str, Any]:
        """Example j's texts and the named arrays (raw numpy, nothing decoded)."""
        return {**self.texts(j), **{k: self.read(k, j) for k in names}}

    def example(self, j: int) -> dict[str, Any]:
        rec = {**self.texts(j), **from_arrays({k: self.read(k, j) for k in self.arrays}, self.codec)}
        if self.targets_stored:  # the stored positions are the training targets (a conversation's assistant turns)
            rec["targets"] = rec["positions"]
        return rec


VERIFY_MODES = ("sizes", "lazy", "full", "none")  # what opening a cache checks: see TeacherCache


class TeacherCache(Sequence):
    """A complete teacher cache, as a sequence of example records (see the module docstring)."""

    def __init__(self, path: str | Path, verify: str = "lazy", *, chunk_cache: int = 8,
                 max_open_shards: int | None = None) -> None:
        self.path = Path(path)
        self.chunk_cache = chunk_cache
        self.max_open_shards = max_open_shards
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}")
        self.verify_mode = verify
        if not self.path.is_dir():
            raise DskdError(f"cache not found: {self.path}")
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            if (self.path / SETTINGS).exists():
                done = len(list((self.path / SHARDS).glob("shard.?????"))) if (self.path / SHARDS).exists() else 0
                total = read_json(self.path / SETTINGS).get("num_shards", "?")
                raise DskdError(
                    f"cache {self.path} is incomplete: {done} of {total} shards written and no manifest",
                    hint="run the same `dskd-batch cache-teacher` command again to resume, or "
                         f"`dskd-batch merge {self.path}` once every machine's shards are written",
                )
            raise DskdError(f"{self.path} is not a dskd-batch cache (no {MANIFEST})")
        try:
            self.manifest = read_json(manifest_path)
        except json.JSONDecodeError as e:
            raise CacheCorruptError(f"{manifest_path}: malformed manifest ({e})") from e
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            old = isinstance(version, int) and version < FORMAT_VERSION
            raise DskdError(f"{self.path}: cache format {version} is not supported (this dskd-batch reads format "
                            f"{FORMAT_VERSION}" + ("; format 1 stored the teacher at every position, format 2 only "
                                                   "where training reads it)" if old else ")"),
                            hint="rebuild it: run `dskd-batch cache-teacher` with the same settings into a new --out "
                                 "folder" if old else "use the dskd-batch version that wrote it")
        self.settings: dict[str, Any] = self.manifest["settings"]
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        missing = [s["name"] for s in self.shards if not (self.path / SHARDS / s["name"] / SHARD_META).exists()]
        if missing:
            raise CacheCorruptError(f"cache {self.path}: shard(s) missing: {', '.join(missing)}",
                                    hint="re-run the cache-teacher command to rewrite them")
        self._cum = np.cumsum([0] + [s["examples"] for s in self.shards]).tolist()
        self._open: dict[int, _Shard] = {}
        self._verified: set[int] = set()
        self._lock = threading.Lock()
        if verify == "full":
            self.verify()
        elif verify == "sizes":
            problems = self.problems(hash_files=False)
            if problems:
                raise CacheCorruptError(problems, hint=f"run `dskd-batch verify {self.path}`; re-run cache-teacher to "
                                                       "rewrite bad shards (delete them first)")

    # -- sequence -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._cum[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        s, j = self._locate(i)
        return self._shard(s).example(j)

    def _locate(self, i: int) -> tuple[int, int]:
        if not isinstance(i, (int, np.integer)):
            raise TypeError("cache indices are integers")
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = bisect.bisect_right(self._cum, i) - 1
        return s, int(i - self._cum[s])

    def token_arrays(self, i: int, names: tuple[str, ...] = ("input_ids", "argmax")) -> dict[str, Any]:
        """Example i's texts, prompt_len and the named arrays (raw numpy: ``input_ids`` has a row per
        token, the teacher's arrays and ``positions`` one per stored position), nothing decoded."""
        s, j = self._locate(i)
        return self._shard(s).token_arrays(j, names)

    def _shard(self, s: int) -> _Shard:
        with self._lock:
            if s in self._open:
                self._open[s] = self._open.pop(s)  # most recently used last
                return self._open[s]
        info = self.shards[s]
        sdir = self.path / SHARDS / info["name"]
        if self.verify_mode == "lazy" and s not in self._verified:
            problems = verify_shard(sdir, info["meta_sha256"])
            if problems:
                raise CacheCorruptError(problems, hint=f"run `dskd-batch verify {self.path}`; re-run cache-teacher to rewrite bad shards")
            self._verified.add(s)
        shard = _Shard(sdir, self.codec, max_chunks=self.chunk_cache, targets_stored=self.stored_positions == "targets")
        with self._lock:
            self._open[s] = shard
            while self.max_open_shards is not None and len(self._open) > self.max_open_shards:
                self._open.pop(next(iter(self._open)))
        return shard

    def index_column(self, name: str) -> list[Any]:
        """One column of every example's index row (id, instruction, prompt_len, n_tokens, ...), in
        order, from the shard indexes alone."""
        out: list[Any] = []
        for info in self.shards:
            out += pq.read_table(self.path / SHARDS / info["name"] / INDEX, columns=[name]).column(name).to_pylist()
        return out

    @property
    def stored_positions(self) -> str:
        """Which positions the cache stores the teacher at: ``targets`` or ``all``."""
        return self.settings["storage"].get("positions", "targets")

    def example_lengths(self) -> tuple[list[int], list[int]]:
        """(n_tokens, prompt_len) of every example, in order, from the shard indexes alone."""
        return self.index_column("n_tokens"), self.index_column("prompt_len")

    def shard_ranges(self) -> list[range]:
        """The example indices of each shard (for shard-local shuffling)."""
        return [range(self._cum[s], self._cum[s + 1]) for s in range(len(self.shards))]

    # -- once-per-cache tensors -----------------------------------------------------------------
    @cached_property
    def _head(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / TEACHER / HEAD_FILE))

    @property
    def lm_head(self) -> torch.Tensor:
        """Teacher output head W_T [V, d] (fp32)."""
        return self._head["lm_head.weight"]

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return self._head.get("lm_head.bias")

    @property
    def input_embeddings(self) -> torch.Tensor:
        """Teacher input embeddings E_T [V, d] (the head itself when the model ties them)."""
        return self._head.get("embed_tokens.weight", self._head["lm_head.weight"])

    @cached_property
    def codec(self) -> HiddenCodec | None:
        return load_codec(self.path, self.settings)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path / TEACHER / "tokenizer"))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def logits_source(self) -> str:
        """How full teacher logits are obtained: ``hidden`` (h @ W.T), ``assembled`` (exact top-k +
        tail rebuilt from a lossy hidden state) or ``topk`` (exact top-k, flat tail)."""
        return self.manifest["logits_source"]

    def teacher_logits(self, rec: dict[str, Any]) -> torch.Tensor:
        """Full-vocabulary teacher logits [m, V] at a record's positions, from the best source the
        cache has (the rule of :meth:`dskd_batch.cache.head.TeacherHead.logits`)."""
        head = TeacherHead(self.lm_head, self.lm_head_bias, self.logits_source)
        try:
            return head.logits(TeacherBatch(**{k: rec.get(k) for k in TEACHER_FIELDS}))
        except ValueError as e:
            raise DskdError(f"cache {self.path}: {e}") from e

    # -- checks ---------------------------------------------------------------------------------
    def problems(self, *, hash_files: bool = True) -> list[str]:
        """Every problem of the shards and teacher files: checksums (``hash_files``) or only
        presence and sizes (cheap)."""
        problems: list[str] = []
        for s, info in enumerate(self.shards):
            p = verify_shard(self.path / SHARDS / info["name"], info["meta_sha256"], hash_files=hash_files)
            problems += p
            if not p and hash_files:
                self._verified.add(s)
        for rel, digest in self.manifest.get("teacher_files", {}).items():
            f = self.path / TEACHER / rel
            if not f.exists():
                problems.append(f"teacher file {rel} is missing")
            elif hash_files and sha256_file(f) != digest:
                problems.append(f"teacher file {rel} does not match its sha256 (corrupt)")
        return problems

    def verify(self) -> None:
        """Re-hash every shard and the teacher files; raise :class:`CacheCorruptError` naming each problem."""
        problems = self.problems()
        if problems:
            raise CacheCorruptError(problems, hint="re-run cache-teacher to rewrite bad shards (delete them first)")


def open_cache(path: str | Path, verify: str = "lazy", **kwargs: Any) -> TeacherCache:
    """Open a complete teacher cache; see :class:`TeacherCache`."""
    return TeacherCache(path, verify=verify, **kwargs)

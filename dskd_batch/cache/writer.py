"""Writing one shard: Zarr v3 arrays on two axes (``tokens/``: one row per token of the shard's
examples; ``positions/``: one row per stored teacher position), a Parquet index, a checksummed meta.

:class:`ShardWriter` is a context manager. Everything goes into a temporary folder beside the
final one; on a clean exit the meta (sizes and sha256 of every file) is written and the folder
is renamed into place in one step, so a shard either exists complete or not at all. On an
exception the temporary folder is removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from ..records import POSITIONS, TOKENS, ArraySpecs
from .format import INDEX, SHARD_META, atomic_write_json, file_table, tmp_path

INDEX_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()), ("prompt", pa.string()),
    ("response", pa.string()), ("source", pa.string()), ("messages", pa.string()), ("prompt_len", pa.int32()),
    ("n_tokens", pa.int32()), ("offset", pa.int64()), ("n_positions", pa.int32()), ("pos_offset", pa.int64()),
])
LENGTH = {TOKENS: "n_tokens", POSITIONS: "n_positions"}  # index column: an example's rows on each axis
OFFSET = {TOKENS: "offset", POSITIONS: "pos_offset"}  # index column: its first row


def chunk_rows_for(specs: ArraySpecs, axis: str, target_bytes: int = 2 << 20) -> int:
    """Rows per chunk on ``axis`` so its widest array's chunk is about ``target_bytes`` (a power of two)."""
    widths = [np.dtype(dt).itemsize * int(np.prod(shape)) for ax, dt, shape in specs.values() if ax == axis]
    n = max(64, target_bytes // max(1, max(widths, default=1)))
    return 1 << (int(n).bit_length() - 1)


class _Axis:
    """Buffered appends to the arrays of one axis, flushed in whole chunks."""

    def __init__(self, arrays: dict[str, Any], chunk: int) -> None:
        self.arrays = arrays
        self.chunk = chunk
        self.buf: dict[str, list[np.ndarray]] = {k: [] for k in arrays}
        self.buffered = 0
        self.written = 0

    def add(self, parts: dict[str, np.ndarray], n: int) -> int:
        offset = self.written + self.buffered
        for name, arr in parts.items():
            self.buf[name].append(arr)
        self.buffered += n
        if self.buffered >= self.chunk:
            self.flush(final=False)
        return offset

    def flush(self, final: bool) -> None:
        n = self.buffered if final else (self.buffered // self.chunk) * self.chunk
        if n == 0:
            return
        for name, parts in self.buf.items():
            data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            arr = self.arrays[name]
            arr.resize((self.written + n, *arr.shape[1:]))
            arr[self.written:self.written + n] = data[:n]
            self.buf[name] = [data[n:]] if n < len(data) else []
        self.written += n
        self.buffered -= n


class ShardWriter:
    """Accumulates examples of one shard and commits them atomically on exit."""

    def __init__(self, final_dir: Path, specs: ArraySpecs, *, compression_level: int = 3) -> None:
        self.final_dir = Path(final_dir)
        self.specs = specs
        self.clevel = compression_level
        self.rows: list[dict[str, Any]] = []
        self.extra_meta: dict[str, Any] = {}

    def __enter__(self) -> "ShardWriter":
        self.tmp = tmp_path(self.final_dir)
        self.tmp.mkdir(parents=True)
        self.axes: dict[str, _Axis] = {}
        for axis in (TOKENS, POSITIONS):
            chunk = chunk_rows_for(self.specs, axis)
            arrays = {}
            for name, (ax, dtype, shape) in self.specs.items():
                if ax != axis:
                    continue
                compressors = [BloscCodec(cname="zstd", clevel=self.clevel, shuffle=BloscShuffle.shuffle)] \
                    if self.clevel else None
                arrays[name] = zarr.create_array(
                    store=str(self.tmp / axis / name), shape=(0, *shape), chunks=(chunk, *shape),
                    dtype=dtype, compressors=compressors, zarr_format=3, fill_value=0,
                )
            self.axes[axis] = _Axis(arrays, chunk)
        return self

    def add(self, row: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Append one example: ``row`` (index fields, no offsets) and its arrays on both axes."""
        if set(arrays) != set(self.specs):
            raise ValueError(f"arrays {sorted(arrays)} do not match the shard layout {sorted(self.specs)}")
        row = dict(row)
        for axis, state in self.axes.items():
            n = int(row[LENGTH[axis]])
            parts = {}
            for name in state.arrays:
                _ax, dtype, shape = self.specs[name]
                arr = arrays[name]
                if arr.shape != (n, *shape):
                    raise ValueError(f"array {name}: shape {arr.shape}, expected {(n, *shape)}")
                parts[name] = np.ascontiguousarray(arr, dtype=dtype)
            row[OFFSET[axis]] = state.add(parts, n)
        self.rows.append(row)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            for state in self.axes.values():
                state.flush(final=True)
            rows = sorted(self.rows, key=lambda r: r["order"])
            table = pa.Table.from_pylist([{k: r[k] for k in INDEX_SCHEMA.names} for r in rows], schema=INDEX_SCHEMA)
            pq.write_table(table, self.tmp / INDEX)
            meta = {
                "examples": len(rows),
                "tokens": self.axes[TOKENS].written,
                "positions": self.axes[POSITIONS].written,
                "chunk_rows": {axis: state.chunk for axis, state in self.axes.items()},
                "files": file_table(self.tmp),
                **self.extra_meta,
            }
            atomic_write_json(self.tmp / SHARD_META, meta)
            if self.final_dir.exists():  # another worker finished the same shard first
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                self.tmp.rename(self.final_dir)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

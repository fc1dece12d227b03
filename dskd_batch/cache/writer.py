"""Writing one shard: Zarr v3 arrays over the shard's tokens, a Parquet index, a checksummed meta.

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

from .format import INDEX, SHARD_META, TOKENS, atomic_write_json, file_table, tmp_path

ArraySpecs = dict[str, tuple[str, tuple[int, ...]]]

INDEX_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()), ("prompt", pa.string()),
    ("response", pa.string()), ("source", pa.string()), ("prompt_len", pa.int32()),
    ("n_tokens", pa.int32()), ("offset", pa.int64()),
])


def chunk_tokens_for(specs: ArraySpecs, target_bytes: int = 2 << 20) -> int:
    """Tokens per chunk so the widest array's chunk is about ``target_bytes`` (a power of two)."""
    widest = max(np.dtype(dt).itemsize * int(np.prod(shape)) for dt, shape in specs.values())
    n = max(64, target_bytes // max(1, widest))
    return 1 << (int(n).bit_length() - 1)


class ShardWriter:
    """Accumulates examples of one shard and commits them atomically on exit."""

    def __init__(self, final_dir: Path, specs: ArraySpecs, *, compression_level: int = 3) -> None:
        self.final_dir = Path(final_dir)
        self.specs = specs
        self.chunk = chunk_tokens_for(specs)
        self.clevel = compression_level
        self.rows: list[dict[str, Any]] = []
        self.extra_meta: dict[str, Any] = {}
        self._buf: dict[str, list[np.ndarray]] = {k: [] for k in specs}
        self._buffered = 0
        self._written = 0

    def __enter__(self) -> "ShardWriter":
        self.tmp = tmp_path(self.final_dir)
        self.tmp.mkdir(parents=True)
        self.arrays = {}
        for name, (dtype, shape) in self.specs.items():
            compressors = [BloscCodec(cname="zstd", clevel=self.clevel, shuffle=BloscShuffle.shuffle)] if self.clevel else None
            self.arrays[name] = zarr.create_array(
                store=str(self.tmp / TOKENS / name), shape=(0, *shape), chunks=(self.chunk, *shape),
                dtype=dtype, compressors=compressors, zarr_format=3, fill_value=0,
            )
        return self

    def add(self, row: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Append one example: ``row`` (index fields, no offset) and its per-token arrays."""
        n = int(row["n_tokens"])
        if set(arrays) != set(self.specs):
            raise ValueError(f"arrays {sorted(arrays)} do not match the shard layout {sorted(self.specs)}")
        for name, arr in arrays.items():
            dtype, shape = self.specs[name]
            if arr.shape != (n, *shape):
                raise ValueError(f"array {name}: shape {arr.shape}, expected {(n, *shape)}")
            self._buf[name].append(np.ascontiguousarray(arr, dtype=dtype))
        self.rows.append({**row, "offset": self._written + self._buffered})
        self._buffered += n
        if self._buffered >= self.chunk:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        n = self._buffered if final else (self._buffered // self.chunk) * self.chunk
        if n == 0:
            return
        for name, parts in self._buf.items():
            data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            arr = self.arrays[name]
            arr.resize((self._written + n, *arr.shape[1:]))
            arr[self._written:self._written + n] = data[:n]
            self._buf[name] = [data[n:]] if n < len(data) else []
        self._written += n
        self._buffered -= n

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._flush(final=True)
            rows = sorted(self.rows, key=lambda r: r["order"])
            table = pa.Table.from_pylist([{k: r[k] for k in INDEX_SCHEMA.names} for r in rows], schema=INDEX_SCHEMA)
            pq.write_table(table, self.tmp / INDEX)
            meta = {
                "examples": len(rows),
                "tokens": self._written,
                "chunk_tokens": self.chunk,
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

"""Writing one shard: Zarr v3 arrays on two axes (``tokens/``: one row per token of the shard's
examples; ``positions/``: one row per stored teacher position), a Parquet index, a checksummed meta.

:class:`ShardWriter` is a context manager. Everything goes into a temporary folder beside the
final one; on a clean exit the meta (sizes and sha256 of every file) is written and the folder
is renamed into place in one step, so a shard either exists complete or not at all. On an
exception the temporary folder is removed.

Given each axis's row count up front (``rows=``), the arrays are created at their final shape, so
appending rewrites no array metadata; whole chunks are flushed a few at a time, every array of an
axis in its own thread (Blosc releases the GIL), so compression uses several cores.
:class:`StoreThread` runs the storing of a shard's batches beside the teacher's forward.
"""

from __future__ import annotations

import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from .records import POSITIONS, TOKENS, ArraySpecs
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


FLUSH_CHUNKS = 4  # whole chunks buffered per array before a flush (written side by side)


class _Axis:
    """Buffered appends to the arrays of one axis, flushed in whole chunks."""

    def __init__(self, arrays: dict[str, Any], chunk: int, sized: bool, pool: ThreadPoolExecutor) -> None:
        self.arrays = arrays
        self.chunk = chunk
        self.sized = sized  # created at the final shape: no resize per flush
        self.pool = pool
        self.buf: dict[str, list[np.ndarray]] = {k: [] for k in arrays}
        self.buffered = 0
        self.written = 0

    def add(self, parts: dict[str, np.ndarray], n: int) -> int:
        offset = self.written + self.buffered
        for name, arr in parts.items():
            self.buf[name].append(arr)
        self.buffered += n
        if self.buffered >= FLUSH_CHUNKS * self.chunk:
            self.flush(final=False)
        return offset

    def flush(self, final: bool) -> None:
        n = self.buffered if final else (self.buffered // self.chunk) * self.chunk
        if n == 0:
            return
        lo = self.written

        def write(name: str) -> None:
            parts = self.buf[name]
            data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            arr = self.arrays[name]
            if not self.sized:
                arr.resize((lo + n, *arr.shape[1:]))
            elif lo + n > arr.shape[0]:
                raise ValueError(f"array {name}: {lo + n} rows written, the shard was sized for {arr.shape[0]}")
            arr[lo:lo + n] = data[:n]
            self.buf[name] = [data[n:]] if n < len(data) else []

        for f in [self.pool.submit(write, name) for name in self.buf]:
            f.result()
        self.written += n
        self.buffered -= n


class ShardWriter:
    """Accumulates examples of one shard and commits them atomically on exit."""

    def __init__(self, final_dir: Path, specs: ArraySpecs, *, compression_level: int = 1,
                 rows: dict[str, int] | None = None) -> None:
        self.final_dir = Path(final_dir)
        self.specs = specs
        self.clevel = compression_level
        self.sizes = rows  # rows of each axis the shard will hold, if known
        self.rows: list[dict[str, Any]] = []
        self.extra_meta: dict[str, Any] = {}

    def __enter__(self) -> "ShardWriter":
        self.tmp = tmp_path(self.final_dir)
        self.tmp.mkdir(parents=True)
        self.axes: dict[str, _Axis] = {}
        self.pool = ThreadPoolExecutor(max_workers=len(self.specs), thread_name_prefix="shard-writer")
        for axis in (TOKENS, POSITIONS):
            chunk = chunk_rows_for(self.specs, axis)
            arrays = {}
            for name, (ax, dtype, shape) in self.specs.items():
                if ax != axis:
                    continue
                compressors = [BloscCodec(cname="zstd", clevel=self.clevel, shuffle=BloscShuffle.shuffle)] \
                    if self.clevel else None
                rows = self.sizes[axis] if self.sizes is not None else 0
                arrays[name] = zarr.create_array(
                    store=str(self.tmp / axis / name), shape=(rows, *shape), chunks=(chunk, *shape),
                    dtype=dtype, compressors=compressors, zarr_format=3, fill_value=0,
                )
            self.axes[axis] = _Axis(arrays, chunk, self.sizes is not None, self.pool)
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
            self.pool.shutdown(wait=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            for axis, state in self.axes.items():
                state.flush(final=True)
                if state.sized and state.written != self.sizes[axis]:
                    raise ValueError(f"shard {self.final_dir.name}: {state.written} rows on the {axis} axis, "
                                     f"sized for {self.sizes[axis]}")
            self.pool.shutdown(wait=True)
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
            self.pool.shutdown(wait=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


class StoreThread:
    """Runs jobs (storing a batch of teacher records) one after another on a thread of its own, so
    the caller can run the teacher's next forward meanwhile. ``depth`` bounds the jobs waiting (each
    holds one batch of records in host memory: at most ``depth`` + 1 batches, the one being stored
    included). The first error stops the thread; :meth:`submit` and :meth:`join` raise it. Leaving
    the ``with`` block on an exception drops what is still queued and waits for the running job.
    With ``depth`` 0 every job runs at once on the caller's thread."""

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if depth > 0:
            self.jobs: queue.Queue = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(target=self._loop, name="store-records", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, job: Callable[[], None]) -> None:
        if self.thread is None:
            job()
            return
        self._raise()
        while True:
            try:
                self.jobs.put(job, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def join(self) -> None:
        """Wait for every job; raise the first error."""
        if self.thread is not None and self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        self._raise()

    def __enter__(self) -> "StoreThread":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.join()
            return
        if self.thread is not None and self.thread.is_alive():
            self.error = self.error or exc  # the thread skips what is still queued
            self.jobs.put(None)
            self.thread.join()

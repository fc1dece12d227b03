"""Files written whole or not at all, and content hashes: the one place for atomic writes,
checksums and fingerprints, used by the cache, checkpoints, alignments, reports and pipelines."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def fingerprint(obj: Any) -> str:
    """The short content hash of a JSON-able object (settings, plans, stage records): sha256 of
    its canonical JSON, 16 hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tmp_path(final: Path) -> Path:
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: Path, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """relative path -> [size, sha256] for every file below ``root``."""
    out: dict[str, list] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in skip:
                out[rel] = [p.stat().st_size, sha256_file(p)]
    return out


def remove_stale_tmp(folder: Path, prefix: str = "") -> None:
    """Delete temporary leftovers of killed runs (never a completed file or shard); with ``prefix``,
    only those of the entry of that name."""
    if not folder.exists():
        return
    for p in folder.iterdir():
        if TMP_MARK in p.name and p.name.startswith(prefix):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing what was there."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

"""Typed configurations for every command.

Each command's click options map one-to-one onto a dataclass here; ``__post_init__`` checks every
field and raises one :class:`DskdError` listing all problems. Pipeline files use exactly these
field names. The field docstrings (the comment string under each field) become ``--help`` text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import DskdError

HIDDEN_MODES = ("fp32", "fp16", "bf16", "compact", "none")
TEMPLATES = ("alpaca", "chat", "none")
DTYPES = ("auto", "fp32", "fp16", "bf16")


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
    "Teacher model: a local Hugging Face folder, a .gguf file, or a hub id where the network allows."
    data: str
    "Corpus: a .jsonl/.json file, a .parquet file, or a saved `datasets` folder."
    out: str
    "Cache folder to create (or resume)."
    template: str = "alpaca"
    "Prompt template: `alpaca` (instruction/input layout of the papers), `chat` (the teacher's chat template) or `none`."
    max_prompt_len: int = 256
    "Prompt tokens kept (the prompt is cut to this first)."
    max_len: int = 512
    "Total tokens kept, EOS included (prompt + response cut to max_len - 1, then EOS)."
    hidden: str = "fp16"
    "Storage of the teacher's last hidden state: fp32, fp16, bf16, compact (transform-coded, ~6 bits/value) or none."
    top_k: int = 64
    "Top-k teacher logits stored per position (0 stores none); log-sum-exp and argmax are always stored."
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
    compression_level: int = 3
    "Blosc/zstd level of the per-token arrays."
    fidelity_sample: int = 4
    "Examples per shard whose reconstructed logits are checked against the real ones at write time (the manifest aggregates all shards)."
    split: str | None = None
    "Split to read from a saved DatasetDict folder (default: `train`)."

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.template not in TEMPLATES:
            problems.append(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.hidden not in HIDDEN_MODES:
            problems.append(f"hidden must be one of {HIDDEN_MODES}, got {self.hidden!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
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
        if problems:
            raise DskdError(problems)

"""On-disk layout of a teacher cache, and the small I/O rules every writer follows.

::

    CACHE/
      settings.json            what the cache is (fingerprints, limits, storage); written first
      teacher/                 once per cache: head.safetensors (W_T, bias, E_T), hidden_codec.safetensors,
                               tokenizer files, config.json
      shards/shard.00000/      one folder per shard, renamed into place when complete
        index.parquet          per example: id, texts, prompt_len, n_tokens, offset, n_positions, pos_offset
        tokens/input_ids/      Zarr v3 array over the shard's concatenated tokens
        positions/<array>/     Zarr v3 arrays over the stored positions (the training targets by default):
                               positions, logsumexp, argmax, topk_values, topk_indices, the hidden codec's
        shard.json             counts, fidelity sample, size + sha256 of every file above
      manifest.json            written last: its presence means the cache is complete

Every file is written to a temporary name and renamed; a shard folder is renamed as a whole (the
helpers live in :mod:`dskd_batch.files`, shared with checkpoints, alignments and reports).
"""

from __future__ import annotations

from ..files import (TMP_MARK, atomic_write_bytes, atomic_write_json, dir_bytes, file_table,  # noqa: F401
                     read_json, remove_stale_tmp, replace_dir, sha256_file, tmp_path)

FORMAT_VERSION = 2  # 1: teacher outputs at every position (refused: rebuild with cache-teacher)
SETTINGS = "settings.json"
MANIFEST = "manifest.json"
SHARDS = "shards"
TEACHER = "teacher"
HEAD_FILE = "head.safetensors"
CODEC_FILE = "hidden_codec.safetensors"
SHARD_META = "shard.json"
INDEX = "index.parquet"


def shard_name(i: int) -> str:
    return f"shard.{i:05d}"

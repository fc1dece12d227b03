"""Cross-tokenizer alignment: which student token sits where a teacher token sits, computed from the
cached texts and the teacher's argmax alone (no teacher model), and stored beside the cache.

Every token is turned into the **bytes** it stands for (byte-level BPE: the GPT-2 byte alphabet
undone; SentencePiece: ``▁`` is a space and ``<0x0A>`` the byte 0x0A; added tokens: their
content). A response tokenized by either tokenizer then covers byte spans of the response text, so
"the same text at the same offset" is a comparison of spans: newlines (``Ċ`` vs ``<0x0A>``),
leading-space conventions (``Ġ`` vs ``▁``), byte-fallback pieces and non-ASCII text all reduce to
bytes. SentencePiece's dummy leading space is not part of the text (the decoder strips it), and a
normaliser that changed the text (NFC) is handled by matching the concatenated bytes to the text.

What is stored per example (indices count response positions: position k predicts response
token k, the last one being EOS):

- ``eta_s``, ``eta_t``: ETA pairs, student and teacher positions whose target tokens are the same
  bytes at the same offset (the two EOS tokens pair when both responses end at the same offset).
  A token's own bytes are the same too, but for one case: a SentencePiece response encoded on its
  own starts with the dummy-prefix space (``▁The`` covers the text ``The``), where the teacher,
  reading the prompt's newline, predicts ``The``. The two cover one span and are different tokens;
  they pair with ``eta_shift`` 1, and a method reads the teacher's distribution there through the
  space swap (``The`` <-> `` The``, ``t_swap``/``s_swap`` below), so that the teacher's ``The``
  stands for the student's ``▁The`` (and the other way round for a SentencePiece teacher);
- ``eta_shift``: per pair, 1 where the two tokens differ by that dummy-prefix space, else 0;
- ``eta_label``: the student id of the teacher's top-1 token at ``eta_t`` (the token of the same
  bytes, of the space-swapped top-1 at a shifted pair; EOS maps to EOS), or -1 where no single
  student token has that text;
- ``mined_t``: per student position, the teacher position MinED pairs it with (edit-distance DTW
  over the token texts, one-to-one and identical text, as FuseLLM's "hard" mode; the tokens' own
  bytes equal, so not a dummy-prefix pair), or -1;
- ``chunk_s``, ``chunk_t``: per student and per teacher position, the aligned chunk its target
  belongs to, or -1 (ALM's chunks: the shortest spans of the response that both tokenizations cut
  at the same bytes, i.e. between two consecutive offsets where a token ends on both sides; a chunk
  holding a token without bytes in the text, and the tail after the last common offset, get -1; the
  two final EOS tokens are a chunk of their own when both responses end at the same offset).

Once per student tokenizer: ``t2s``/``s2t`` vocabulary maps (token of the same bytes in the other
vocabulary, or -1), which give ETA's label, MinED's teacher-to-student logit map and the
``pinv`` projector rows; ``t_swap``/``s_swap``, each vocabulary's space swap (the token ``X`` and the
token `` X`` exchanged where both exist; every other token to itself), read at shifted pairs.

Layout: ``CACHE/alignments/<student tokenizer fingerprint>/`` holding ``examples.parquet`` (one
row per cache example, in cache order), ``vocab_map.safetensors`` and ``alignment.json`` (written
last, by renaming the finished folder into place: it is there or it is not).
"""

from __future__ import annotations

import bisect
import difflib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..files import atomic_write_json, read_json, remove_stale_tmp, replace_dir, tmp_path
from ..data import Example, encode_example, render_prompt, target_positions
from .records import target_rows
from ..errors import DskdError
from ..models import tokenizer_fingerprint

log = logging.getLogger(__name__)

ALIGN_DIR = "alignments"
ALIGN_FILE = "alignment.json"
ALIGN_EXAMPLES = "examples.parquet"
VOCAB_MAP = "vocab_map.safetensors"
ALIGN_VERSION = 4  # 2: student_targets (conversations); 3: chunk_s, chunk_t (ALM); 4: eta_shift, space swaps
_LIST_COLUMNS = ("student_ids", "eta_s", "eta_t", "eta_label", "mined_t", "student_targets", "chunk_s", "chunk_t",
                 "eta_shift")


# -- the bytes of every token ------------------------------------------------------------------------

def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _decoder_kinds(tok: Any) -> set[str]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return set()
    dec = json.loads(backend.to_str()).get("decoder") or {}
    kinds: set[str] = set()

    def walk(d: dict) -> None:
        kinds.add(d.get("type", ""))
        if d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "▁":
            kinds.add("ReplaceMetaspace")
        for sub in d.get("decoders") or []:
            walk(sub)

    walk(dec)
    return kinds


@dataclass
class TokenTable:
    """The bytes each token id stands for (None: a special token, which stands for no text)."""

    texts: list[bytes | None]
    byte_fallback: np.ndarray  # bool [V]: SentencePiece <0xNN> pieces (a regular piece is preferred)
    eos: int
    scheme: str

    def __len__(self) -> int:
        return len(self.texts)


def token_table(tok: Any) -> TokenTable:
    kinds = _decoder_kinds(tok)
    if "ByteLevel" in kinds:
        scheme = "byte-level"
    elif kinds & {"ByteFallback", "Metaspace", "ReplaceMetaspace"}:
        scheme = "sentencepiece"
    else:
        scheme = "plain"
    n = len(tok)
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    added = {i: t for i, t in getattr(tok, "added_tokens_decoder", {}).items()}
    special = set(getattr(tok, "all_special_ids", []))
    texts: list[bytes | None] = []
    fallback = np.zeros(n, dtype=bool)
    bd = _gpt2_byte_decoder() if scheme == "byte-level" else {}
    for i, p in enumerate(pieces):
        if i in special or p is None or (i in added and getattr(added[i], "special", False)):
            texts.append(None)
        elif i in added:
            texts.append(str(added[i].content).encode("utf-8"))
        elif scheme == "byte-level":
            texts.append(bytes(bd[c] for c in p) if all(c in bd for c in p) else p.encode("utf-8"))
        elif scheme == "sentencepiece":
            if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                try:
                    texts.append(bytes([int(p[3:5], 16)]))
                    fallback[i] = True
                    continue
                except ValueError:
                    pass
            texts.append(p.replace("▁", " ").encode("utf-8"))
        else:
            texts.append(tok.convert_tokens_to_string([p]).encode("utf-8"))
    if tok.eos_token_id is None:
        raise DskdError("the tokenizer has no EOS token", hint="use a tokenizer with eos_token set")
    return TokenTable(texts, fallback, int(tok.eos_token_id), scheme)


def text_index(table: TokenTable) -> dict[bytes, int]:
    """bytes -> token id; where several tokens spell the same bytes (a regular piece and a
    byte-fallback piece), the regular one."""
    index: dict[bytes, int] = {}
    for j, b in enumerate(table.texts):
        if not b:
            continue
        if b not in index or (table.byte_fallback[index[b]] and not table.byte_fallback[j]):
            index[b] = j
    return index


def vocab_map(src: TokenTable, dst: TokenTable) -> np.ndarray:
    """For each token of ``src``, the ``dst`` token with the same bytes (-1 if none); EOS -> EOS.
    Where ``dst`` has several (a regular piece and a byte-fallback piece), the regular one."""
    index = text_index(dst)
    out = np.full(len(src), -1, dtype=np.int64)
    for i, b in enumerate(src.texts):
        if b:
            out[i] = index.get(b, -1)
    out[src.eos] = dst.eos
    return out


# -- spans, ETA and MinED for one example ---------------------------------------------------------

Span = tuple[int, int]


def space_swap(table: TokenTable) -> np.ndarray:
    """The vocabulary's space swap: token ``X`` <-> token `` X`` where both exist (each the regular
    token of its bytes), every other token to itself; an involution, so a permutation of the logits."""
    index = text_index(table)
    out = np.arange(len(table), dtype=np.int64)
    for b, i in index.items():
        if not b.startswith(b" ") and (j := index.get(b" " + b)) is not None:
            out[i], out[j] = j, i
    return out


def content_spans(ids: list[int], table: TokenTable, text: bytes) -> list[Span | None]:
    """The byte span of ``text`` each token covers (None: special tokens, and tokens whose bytes
    are not found in the text, e.g. after a normaliser changed it)."""
    pieces = [table.texts[i] or b"" for i in ids]
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    joined = b"".join(pieces)
    shift = 1 if joined.startswith(b" ") and not text.startswith(b" ") else 0  # SentencePiece's dummy prefix
    body = joined[shift:]
    raw = [(max(s - shift, 0), s + len(p) - shift) for s, p in zip(starts, pieces)]
    if text.startswith(body):  # the usual case (a truncated response covers a prefix of its text)
        mapped: list[Span | None] = list(raw)
    else:
        blocks = [b for b in difflib.SequenceMatcher(None, body, text, autojunk=False).get_matching_blocks() if b.size]
        heads = [b.a for b in blocks]
        mapped = []
        for a, e in raw:
            k = bisect.bisect_right(heads, a) - 1
            if k >= 0 and e <= blocks[k].a + blocks[k].size:
                mapped.append((a - blocks[k].a + blocks[k].b, e - blocks[k].a + blocks[k].b))
            else:
                mapped.append(None)
    return [sp if (sp is not None and sp[1] > sp[0] and table.texts[i]) else None for sp, i in zip(mapped, ids)]


def response_targets(ids: list[int], prompt_len: int) -> list[int]:
    """Target tokens of the response positions (the last one is EOS)."""
    return list(ids[target_positions(len(ids), prompt_len).start + 1:])


def eta_pairs(t_spans: list[Span | None], s_spans: list[Span | None], t_ends_eos: bool, s_ends_eos: bool,
              t_own: list[bytes | None], s_own: list[bytes | None]) -> tuple[list[int], list[int], list[int]]:
    """(student positions, teacher positions, shifted) whose targets are the same bytes at the same
    offset: the same tokens (``t_own``/``s_own``, each token's own bytes), or tokens that differ by
    the dummy-prefix space one side adds to the response's first word (shifted 1: a span that drops
    its token's first byte is only ever that space); the final EOS targets pair when both responses
    end at the same offset."""
    where = {sp: i for i, sp in enumerate(t_spans) if sp is not None}
    ps, pt, shift = [], [], []
    for j, sp in enumerate(s_spans):
        if sp is None or sp not in where:
            continue
        a, b = t_own[where[sp]], s_own[j]
        if a == b or (a and b and (a == b" " + b or b == b" " + a)):
            ps.append(j)
            pt.append(where[sp])
            shift.append(int(a != b))
    if t_ends_eos and s_ends_eos:
        t_end = max((sp[1] for sp in t_spans if sp is not None), default=0)
        s_end = max((sp[1] for sp in s_spans if sp is not None), default=0)
        if t_end == s_end:
            ps.append(len(s_spans) - 1)
            pt.append(len(t_spans) - 1)
            shift.append(0)
    return ps, pt, shift


def chunk_ids(t_spans: list[Span | None], s_spans: list[Span | None], t_ends_eos: bool,
              s_ends_eos: bool) -> tuple[list[int], list[int]]:
    """(teacher chunk per target, student chunk per target): see the module docstring."""
    def ends(spans: list[Span | None]) -> set[int]:
        return {sp[1] for sp in spans if sp is not None}

    def first(spans: list[Span | None]) -> int | None:
        return next((sp[0] for sp in spans if sp is not None), None)

    common = sorted(ends(t_spans) & ends(s_spans))
    start = first(t_spans)
    if start is None or start != first(s_spans):
        common = []
    bounds = [start] + common if common else []

    def assign(spans: list[Span | None]) -> list[int]:
        out, cover = [], [0] * len(common)
        for sp in spans:
            c = bisect.bisect_left(common, sp[1]) if sp is not None else len(common)
            out.append(c if c < len(common) else -1)
            if c < len(common):
                cover[c] += sp[1] - sp[0]
        whole = {c for c in range(len(common)) if cover[c] == bounds[c + 1] - bounds[c]}
        return [c if c in whole else -1 for c in out]

    ct, cs = assign(t_spans), assign(s_spans)
    both = set(ct) & set(cs)
    ct, cs = [c if c in both else -1 for c in ct], [c if c in both else -1 for c in cs]
    if t_ends_eos and s_ends_eos and t_spans and s_spans and t_spans[-1] is None and s_spans[-1] is None:
        t_end = max((sp[1] for sp in t_spans if sp is not None), default=0)
        s_end = max((sp[1] for sp in s_spans if sp is not None), default=0)
        if t_end == s_end:
            ct[-1] = cs[-1] = len(common)
    return ct, cs


def levenshtein(a: bytes, b: bytes) -> int:
    """Edit distance between two byte strings (rapidfuzz; latin-1 maps each byte to one character)."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a.decode("latin-1"), b.decode("latin-1")))


def edit_distances(a: list[bytes], b: list[bytes]) -> np.ndarray:
    """[len(a), len(b)] matrix of edit distances."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    return process.cdist([x.decode("latin-1") for x in a], [y.decode("latin-1") for y in b],
                         scorer=Levenshtein.distance, dtype=np.int32).astype(np.float64)


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost monotone path from (0, 0) to (n-1, m-1) with steps (1,0), (0,1), (1,1)."""
    n, m = cost.shape
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0.0
    inf = float("inf")
    for i in range(1, n + 1):
        prev = d[i - 1]
        best = np.minimum(prev[:-1], prev[1:]).tolist()  # diagonal or from above, for columns 1..m
        c = cost[i - 1].tolist()
        row, acc = [inf] * (m + 1), inf
        for j in range(m):
            acc = c[j] + (best[j] if best[j] < acc else acc)
            row[j + 1] = acc
        d[i] = row
    path, i, j = [], n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        moves = ((d[i - 1, j - 1], i - 1, j - 1), (d[i - 1, j], i - 1, j), (d[i, j - 1], i, j - 1))
        _, i, j = min(moves, key=lambda t: t[0])  # ties: the diagonal first
    return path[::-1]


def _texts_in_context(ids: list[int], spans: list[Span | None], table: TokenTable, text: bytes) -> list[bytes]:
    out = []
    for i, sp in zip(ids, spans):
        if i == table.eos:
            out.append(b"\x00eos")
        elif sp is not None:
            out.append(text[sp[0]:sp[1]])
        else:
            out.append(table.texts[i] or b"")
    return out


def mined_alignment(t_texts: list[bytes], s_texts: list[bytes]) -> list[int]:
    """MinED: per student position, the teacher position it is matched with one-to-one by the
    edit-distance DTW over the token texts (leading spaces ignored) with identical text, else -1."""
    if not t_texts or not s_texts:
        return [-1] * len(s_texts)
    t_norm = [t.lstrip(b" ") for t in t_texts]
    s_norm = [s.lstrip(b" ") for s in s_texts]
    cost = edit_distances(t_norm, s_norm)
    matched: dict[int, list[int]] = {}
    for i, j in dtw_path(cost):
        matched.setdefault(j, []).append(i)
    out = []
    for j in range(len(s_texts)):
        ts = matched.get(j, [])
        out.append(ts[0] if len(ts) == 1 and t_texts[ts[0]] == s_texts[j] else -1)
    return out


@dataclass
class ExampleAlignment:
    student_ids: list[int]
    student_prompt_len: int
    eta_s: list[int]
    eta_t: list[int]
    eta_label: list[int]
    mined_t: list[int]
    student_targets: list[int] = field(default_factory=list)  # a conversation's; empty: the prompt/response rule
    chunk_s: list[int] = field(default_factory=list)  # per student target: its ALM chunk (-1: none)
    chunk_t: list[int] = field(default_factory=list)  # per teacher target
    eta_shift: list[int] = field(default_factory=list)  # per ETA pair: 1 where the tokens differ by a dummy prefix


def _align_segment(text: bytes, t_tg: list[int], s_tg: list[int], t_table: TokenTable, s_table: TokenTable,
                   ends: tuple[bool, bool] | None) -> tuple[list[int], ...]:
    """ETA pairs (student, teacher, shifted), MinED matches and ALM chunks (teacher, student) of one span
    of targets that covers ``text`` on both sides.
    ``ends``: whether each side ends with its end token (None: a conversation turn, whose last
    target is its end-of-turn marker when it lies outside the text)."""
    t_sp = content_spans(t_tg, t_table, text)
    s_sp = content_spans(s_tg, s_table, text)
    if ends is None:
        ends = (bool(t_sp) and t_sp[-1] is None, bool(s_sp) and s_sp[-1] is None)
    t_own, s_own = [t_table.texts[i] for i in t_tg], [s_table.texts[i] for i in s_tg]
    ps, pt, shift = eta_pairs(t_sp, s_sp, *ends, t_own, s_own)
    mined = mined_alignment(_texts_in_context(t_tg, t_sp, t_table, text), _texts_in_context(s_tg, s_sp, s_table, text))
    mined = [i if i < 0 or s_own[j] == t_own[i] else -1 for j, i in enumerate(mined)]
    ct, cs = chunk_ids(t_sp, s_sp, *ends)
    return ps, pt, shift, mined, ct, cs


def eta_labels(t_argmax: np.ndarray, pt: list[int], shift: list[int], t2s: np.ndarray, t_swap: np.ndarray) -> list[int]:
    """The student id of the teacher's top-1 at each pair, space-swapped at a shifted pair (-1: none)."""
    return [int(t2s[int(t_swap[int(t_argmax[k])] if sh else t_argmax[k])]) for k, sh in zip(pt, shift)]


def align_example(response: str, t_ids: list[int], t_prompt_len: int, t_argmax: np.ndarray, s_enc: Any,
                  t_table: TokenTable, s_table: TokenTable, t2s: np.ndarray, t_swap: np.ndarray) -> ExampleAlignment:
    """Align one prompt/response (or text) example. ``t_argmax`` is the teacher's argmax at its
    target positions (row k: the k-th target position of ``t_ids``)."""
    t_tg = response_targets(t_ids, t_prompt_len)
    s_tg = response_targets(s_enc.input_ids, s_enc.prompt_len)
    ps, pt, shift, mined, ct, cs = _align_segment(
        response.encode("utf-8"), t_tg, s_tg, t_table, s_table,
        (bool(t_tg) and t_tg[-1] == t_table.eos, bool(s_tg) and s_tg[-1] == s_table.eos))
    return ExampleAlignment(list(s_enc.input_ids), s_enc.prompt_len, ps, pt, eta_labels(t_argmax, pt, shift, t2s, t_swap),
                            mined, chunk_s=cs, chunk_t=ct, eta_shift=shift)


def runs(positions: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive positions (a conversation's targets: one run per assistant turn)."""
    out: list[list[int]] = []
    for p in positions:
        if out and p == out[-1][-1] + 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def align_conversation(turns: list[str], t_ids: list[int], t_targets: list[int], t_argmax: np.ndarray, s_enc: Any,
                       t_table: TokenTable, s_table: TokenTable, t2s: np.ndarray, t_swap: np.ndarray) -> ExampleAlignment:
    """Align a conversation turn by turn: the k-th assistant turn's targets on each side cover the
    text ``turns[k]``, and pairs never cross turns. Indices are into each side's flat target list
    (``t_targets`` and ``s_enc.targets()``), as for one response."""
    s_targets = s_enc.targets()
    t_runs, s_runs = runs(t_targets), runs(s_targets)
    ps_all, pt_all, shift_all, mined_all = [], [], [], [-1] * len(s_targets)
    cs_all, ct_all = [-1] * len(s_targets), [-1] * len(t_targets)
    t_off = s_off = c_off = 0
    for k in range(min(len(t_runs), len(s_runs), len(turns))):
        t_tg = [t_ids[p + 1] for p in t_runs[k]]
        s_tg = [s_enc.input_ids[p + 1] for p in s_runs[k]]
        ps, pt, shift, mined, ct, cs = _align_segment(turns[k].encode("utf-8"), t_tg, s_tg, t_table, s_table, None)
        ps_all += [j + s_off for j in ps]
        pt_all += [j + t_off for j in pt]
        shift_all += shift
        mined_all[s_off:s_off + len(mined)] = [m + t_off if m >= 0 else -1 for m in mined]
        cs_all[s_off:s_off + len(cs)] = [c + c_off if c >= 0 else -1 for c in cs]
        ct_all[t_off:t_off + len(ct)] = [c + c_off if c >= 0 else -1 for c in ct]
        c_off += max(ct + cs + [-1]) + 1
        t_off += len(t_runs[k])
        s_off += len(s_runs[k])
    return ExampleAlignment(list(s_enc.input_ids), s_enc.prompt_len, ps_all, pt_all,
                            eta_labels(t_argmax, pt_all, shift_all, t2s, t_swap), mined_all, list(s_targets),
                            chunk_s=cs_all, chunk_t=ct_all, eta_shift=shift_all)


# -- building and reading the sidecar --------------------------------------------------------------

def alignment_dir(cache_path: str | Path, student_fp: str) -> Path:
    return Path(cache_path) / ALIGN_DIR / student_fp


def align_command(cache_path: str | Path, student_tokenizer: str) -> str:
    return f"dskd-batch align {cache_path} --student-tokenizer {student_tokenizer}"


def build_alignment(cache: Any, student_tok: Any, student_source: str, *, force: bool = False,
                    progress: bool = False) -> Path:
    """Compute and store the alignment of every cache example for one student tokenizer."""
    from safetensors.torch import save_file

    fp = tokenizer_fingerprint(student_tok)
    final = alignment_dir(cache.path, fp)
    if (final / ALIGN_FILE).exists() and not force:
        info = read_json(final / ALIGN_FILE)
        if info.get("cache_fingerprint") == cache.fingerprint and info.get("version") == ALIGN_VERSION:
            log.info("alignment for %s already in %s", student_source, final)
            return final
    (cache.path / ALIGN_DIR).mkdir(exist_ok=True)
    remove_stale_tmp(cache.path / ALIGN_DIR, prefix=fp)
    st = cache.settings
    template, limits = st["template"]["name"], st["limits"]
    t_tok = cache.tokenizer()
    if tokenizer_fingerprint(t_tok) == fp:
        raise DskdError(f"{student_source} is the teacher's own tokenizer: same-vocabulary methods need no alignment")
    t0 = time.perf_counter()
    t_table, s_table = token_table(t_tok), token_table(student_tok)
    t2s, s2t = vocab_map(t_table, s_table), vocab_map(s_table, t_table)
    t_swap, s_swap = space_swap(t_table), space_swap(s_table)
    cols: dict[str, list] = {k: [] for k in (*_LIST_COLUMNS, "student_prompt_len")}
    totals = {"examples": 0, "student_positions": 0, "teacher_positions": 0, "eta_pairs": 0, "eta_shifted": 0,
              "eta_labelled": 0,
              "mined_pairs": 0, "chunked_positions": 0, "chunks": 0}
    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=len(cache), unit="ex", desc="align", dynamic_ncols=True)
    for i in range(len(cache)):
        rec = cache.token_arrays(i, ("input_ids", "positions", "argmax"))
        if cache.stored_positions != "targets":  # every position stored: keep the targets' rows
            rows = target_rows(rec)
            rec["argmax"] = rec["argmax"][rows if isinstance(rows, slice) else rows.numpy()]
        messages = tuple(tuple(m) for m in json.loads(rec["messages"])) if rec.get("messages") else ()
        ex = Example(rec["id"], rec["instruction"], rec["input"], rec["response"], rec["source"], messages)
        s_prompt = render_prompt(ex, template, student_tok)
        s_enc = encode_example(student_tok, ex, s_prompt, max_prompt_len=limits["max_prompt_len"],
                               max_len=limits["max_len"], template=template)
        if ex.is_chat:
            a = align_conversation([c for role, c in messages if role == "assistant"], rec["input_ids"].tolist(),
                                   rec["positions"].tolist(), rec["argmax"], s_enc, t_table, s_table, t2s, t_swap)
        else:
            a = align_example(rec["response"], rec["input_ids"].tolist(), rec["prompt_len"], rec["argmax"], s_enc,
                              t_table, s_table, t2s, t_swap)
        for k in _LIST_COLUMNS:
            cols[k].append(getattr(a, k))
        cols["student_prompt_len"].append(a.student_prompt_len)
        totals["examples"] += 1
        totals["student_positions"] += len(a.mined_t)
        totals["teacher_positions"] += len(rec["argmax"])
        totals["eta_pairs"] += len(a.eta_s)
        totals["eta_shifted"] += sum(a.eta_shift)
        totals["eta_labelled"] += sum(1 for x in a.eta_label if x >= 0)
        totals["mined_pairs"] += sum(1 for x in a.mined_t if x >= 0)
        totals["chunked_positions"] += sum(1 for x in a.chunk_s if x >= 0)
        totals["chunks"] += len({x for x in a.chunk_s if x >= 0})
        if pbar is not None:
            pbar.update(1)
    if pbar is not None:
        pbar.close()
    n_pos = max(totals["student_positions"], 1)
    stats = {**totals, "eta_coverage": totals["eta_pairs"] / n_pos,
             "eta_label_coverage": totals["eta_labelled"] / n_pos,
             "mined_coverage": totals["mined_pairs"] / n_pos, "chunk_coverage": totals["chunked_positions"] / n_pos,
             "shared_vocab": int((s2t >= 0).sum()), "student_vocab": len(s_table), "teacher_vocab": len(t_table),
             "seconds": round(time.perf_counter() - t0, 2)}
    tmp = tmp_path(final)
    tmp.mkdir(parents=True)
    try:
        table = pa.table({**{k: pa.array(cols[k], type=pa.list_(pa.int32())) for k in _LIST_COLUMNS},
                          "student_prompt_len": pa.array(cols["student_prompt_len"], type=pa.int32())})
        pq.write_table(table, tmp / ALIGN_EXAMPLES)
        save_file({"t2s": torch.from_numpy(t2s), "s2t": torch.from_numpy(s2t), "t_swap": torch.from_numpy(t_swap),
                   "s_swap": torch.from_numpy(s_swap)}, str(tmp / VOCAB_MAP))
        student_tok.save_pretrained(str(tmp / "tokenizer"))
        atomic_write_json(tmp / ALIGN_FILE, {
            "version": ALIGN_VERSION, "cache_fingerprint": cache.fingerprint,
            "student_tokenizer": {"fingerprint": fp, "source": str(student_source), "size": len(student_tok),
                                  "eos_token_id": student_tok.eos_token_id, "scheme": s_table.scheme},
            "teacher_tokenizer": {"fingerprint": st["tokenizer"]["fingerprint"], "scheme": t_table.scheme},
            "template": template, "limits": limits, "stats": stats,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        replace_dir(tmp, final)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("aligned %d examples for %s: ETA covers %.1f%% of student response tokens (%.1f%% with a mapped "
             "teacher top-1), MinED %.1f%%, ALM chunks %.1f%%, %d shared tokens, %.1fs", totals["examples"],
             student_source, 100 * stats["eta_coverage"], 100 * stats["eta_label_coverage"],
             100 * stats["mined_coverage"], 100 * stats["chunk_coverage"], stats["shared_vocab"], stats["seconds"])
    return final


class Alignment:
    """A stored alignment, read lazily: ``row(i)`` gives example i's lists as numpy arrays."""

    def __init__(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.path = path
        self.info = read_json(path / ALIGN_FILE)
        table = pq.read_table(path / ALIGN_EXAMPLES)
        self._lists = {}
        for k in _LIST_COLUMNS:
            col = table.column(k).combine_chunks()
            self._lists[k] = (col.offsets.to_numpy(), col.values.to_numpy())
        self.student_prompt_len = table.column("student_prompt_len").to_numpy()
        maps = load_file(str(path / VOCAB_MAP))
        self.t2s, self.s2t = maps["t2s"], maps["s2t"]
        self.t_swap, self.s_swap = maps["t_swap"], maps["s_swap"]  # each vocabulary's space swap

    def __len__(self) -> int:
        return len(self.student_prompt_len)

    def row(self, i: int) -> dict[str, np.ndarray]:
        out = {}
        for k, (off, vals) in self._lists.items():
            out[k] = vals[off[i]:off[i + 1]]
        return out

    def student_lengths(self) -> list[int]:
        off = self._lists["student_ids"][0]
        return np.diff(off).tolist()

    def target_counts(self) -> list[int]:
        """Per example, how many explicit student targets it has (a conversation's; 0 otherwise)."""
        return np.diff(self._lists["student_targets"][0]).tolist()

    def shared_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(student ids, teacher ids) of the tokens both vocabularies share by text."""
        s = torch.nonzero(self.s2t >= 0).flatten()
        return s, self.s2t[s]


def open_alignment(cache: Any, student_tok: Any, student_source: str) -> Alignment:
    """The cache's alignment for this student tokenizer, or one clear refusal naming the command."""
    fp = tokenizer_fingerprint(student_tok)
    path = alignment_dir(cache.path, fp)
    if not (path / ALIGN_FILE).exists():
        have = sorted(p.name for p in (cache.path / ALIGN_DIR).iterdir() if (p / ALIGN_FILE).exists()) \
            if (cache.path / ALIGN_DIR).is_dir() else []
        raise DskdError(f"cache {cache.path} has no alignment for the student tokenizer {student_source} "
                        f"(fingerprint {fp}; the cache has alignments for: {', '.join(have) or 'none'})",
                        hint=f"run `{align_command(cache.path, student_source)}`")
    info = read_json(path / ALIGN_FILE)
    if info.get("version") != ALIGN_VERSION:
        raise DskdError(f"the alignment in {path} is of version {info.get('version')}; this dskd-batch reads version "
                        f"{ALIGN_VERSION} (ALM's chunks, and pairs only of tokens with the same bytes)",
                        hint=f"rebuild it: `{align_command(cache.path, student_source)} --force`")
    if info.get("cache_fingerprint") != cache.fingerprint:
        raise DskdError(f"the alignment in {path} was made for another cache",
                        hint=f"run `{align_command(cache.path, student_source)} --force`")
    try:
        al = Alignment(path)
    except Exception as e:  # noqa: BLE001 - parquet / safetensors raise many kinds
        raise DskdError(f"the alignment in {path} cannot be read ({e})",
                        hint=f"run `{align_command(cache.path, student_source)} --force`") from e
    if len(al) != len(cache):
        raise DskdError(f"the alignment in {path} has {len(al)} rows, the cache {len(cache)} examples",
                        hint=f"run `{align_command(cache.path, student_source)} --force`")
    return al


def run(cfg: Any) -> list[tuple[Path, dict[str, Any]]]:
    """`dskd-batch align`: align a complete cache for each student tokenizer of ``cfg``."""
    from .reader import open_cache
    from ..models import load_tokenizer

    cache = open_cache(cfg.cache, verify="lazy")
    toks = [(src, load_tokenizer(src)) for src in cfg.student_tokenizer]  # every tokenizer loads before any work
    from ..locks import folder_lock

    out = []
    with folder_lock(Path(cfg.cache), "align", "the alignments of cache"):
        for src, tok in toks:
            path = build_alignment(cache, tok, src, force=cfg.force, progress=True)
            out.append((path, read_json(path / ALIGN_FILE)["stats"]))
    return out

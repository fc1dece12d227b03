"""Corpus loading, prompt templates and the papers' truncation rule.

A corpus is JSONL, Parquet or a saved ``datasets`` folder. Four row shapes are accepted as they
are: ``prompt``/``response``, ``instruction``/``input``/``output`` (the Self-Instruct seed shape,
where ``instances`` holds a list of ``{input, output}``, gives one example per instance),
``messages`` (a conversation of ``{role, content}`` turns, rendered with the tokenizer's chat
template: every assistant turn is a target, see :func:`encode_conversation`) and ``text`` (plain
text: every token is a target, no prompt, no EOS appended; a document longer than ``max_len``
tokens is cut into consecutive windows by :func:`split_long_texts`). Every problem
names the file and line (or row) it was found on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import DskdError

log = logging.getLogger(__name__)

ALPACA_HEAD = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)


@dataclass(frozen=True)
class Example:
    """One training example, before any tokenizer sees it."""

    id: str
    instruction: str
    input: str
    response: str
    source: str
    "Where it came from: `file:line` (JSONL) or `file#row` (Parquet / datasets)."
    messages: tuple[tuple[str, str], ...] = ()
    "A conversation's turns as (role, content), up to its last assistant turn; empty for other shapes."

    @property
    def is_text(self) -> bool:
        """A plain-text row: no prompt (every other shape needs a non-empty one)."""
        return not self.instruction and not self.messages

    @property
    def is_chat(self) -> bool:
        """A conversation row (``messages``): every assistant turn is a target."""
        return bool(self.messages)


@dataclass
class LoadReport:
    examples: list[Example]
    skipped: list[str]


def _raw_rows(path: Path, split: str | None) -> Iterable[tuple[str, Any]]:
    """Yield (location, row) pairs; a row that is not valid JSON is yielded as an exception."""
    if path.is_dir():
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - datasets is a dependency
            raise DskdError(f"{path}: reading a datasets folder needs the `datasets` package") from e
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - report whatever datasets says
            raise DskdError(f"{path}: not a saved `datasets` folder ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            name = split or "train"
            if name not in ds:
                raise DskdError(
                    f"{path}: split {name!r} not found (splits: {', '.join(ds)})",
                    hint="choose one with --split",
                )
            ds = ds[name]
        for i, row in enumerate(ds):
            yield f"{path}#{i}", row
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001
            raise DskdError(f"{path}: not a readable Parquet file ({e})") from e
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}#{i}", row
        return
    if suffix in (".jsonl", ".json", ".ndjson"):
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield f"{path}:{lineno}", DskdError(
                        f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", DskdError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")
        return
    raise DskdError(
        f"{path}: unknown corpus format {suffix!r}",
        hint="use a .jsonl, .json (one object per line) or .parquet file, or a saved datasets folder",
    )


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DskdError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


ROLES = ("system", "user", "assistant", "tool")


def _conversation(messages: Any, where: str) -> tuple[str, str, str, str, tuple[tuple[str, str], ...]]:
    """A ``messages`` list -> (last user turn, "", last assistant turn, source, turns up to the last
    assistant turn); later turns are dropped (nothing would be trained on them)."""
    if not isinstance(messages, list) or not messages:
        raise DskdError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    turns = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DskdError(f"{where}: message {j} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DskdError(f"{where}: message {j} has unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DskdError(f"{where}: message {j}: 'content' must be a string, got {type(m['content']).__name__}")
        turns.append((m["role"], m["content"]))
    last = max((j for j, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise DskdError(f"{where}: the conversation has no assistant turn (nothing to train on)")
    if not turns[last][1].strip():
        raise DskdError(f"{where}: message {last}: empty assistant turn")
    turns = turns[:last + 1]
    user = next((c for role, c in reversed(turns) if role == "user"), "")
    return (user, "", turns[last][1], where, tuple(turns))


def _mapped(row: Any, mapping: dict[str, str], where: str) -> Any:
    """The row with the mapped columns under the row fields' names (and nothing else)."""
    if not isinstance(row, dict):
        return row
    missing = [c for c in mapping.values() if c not in row]
    if missing:
        raise DskdError(f"{where}: no column {missing[0]!r} (--columns); the row has {', '.join(sorted(row))}")
    return {field: row[column] for field, column in mapping.items()}


def _normalise(row: Any, where: str) -> list[tuple]:
    """Row -> list of (instruction, input, response, source[, messages])."""
    if not isinstance(row, dict):
        raise DskdError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return [_conversation(row["messages"], where)]
    if "text" in row and not any(k in row for k in ("prompt", "response", "instruction")):
        text = row["text"]
        if not isinstance(text, str):
            raise DskdError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DskdError(f"{where}: empty text")
        return [("", "", text, where)]
    if "prompt" in row or "response" in row:
        missing = [k for k in ("prompt", "response") if k not in row]
        if missing:
            raise DskdError(f"{where}: row has {'/'.join(k for k in ('prompt', 'response') if k in row)} but no {missing[0]!r}")
        items = [(_text(row, "prompt", where), "", _text(row, "response", where), where)]
    elif "instruction" in row:
        if "instances" in row:
            instances = row["instances"]
            if not isinstance(instances, list) or not instances:
                raise DskdError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
            items = []
            for j, inst in enumerate(instances):
                w = f"{where} instance {j}"
                if not isinstance(inst, dict) or "output" not in inst:
                    raise DskdError(f"{w}: an instance needs an 'output' field")
                items.append((_text(row, "instruction", where), _text(inst, "input", w), _text(inst, "output", w), w))
        elif "output" in row:
            items = [(_text(row, "instruction", where), _text(row, "input", where), _text(row, "output", where), where)]
        else:
            raise DskdError(f"{where}: row has 'instruction' but neither 'output' nor 'instances'")
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise DskdError(
            f"{where}: row has none of prompt/response, instruction/output or text (keys: {keys})"
        )
    for instruction, _inp, response, w in items:  # (text rows returned above)
        if not instruction.strip():
            raise DskdError(f"{w}: empty prompt/instruction")
        if not response.strip():
            raise DskdError(f"{w}: empty response")
    return items


def example_id(instruction: str, inp: str, response: str, messages: tuple = ()) -> str:
    """Stable content hash of an example (duplicates get a ``-N`` suffix on load)."""
    parts: list[Any] = [instruction, inp, response] + ([[list(m) for m in messages]] if messages else [])
    h = hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()
    return h[:16]


HF_PREFIX = "hf:"


def parse_columns(columns: str | None) -> dict[str, str]:
    """``--columns prompt=question,response=answer`` -> {row field: the dataset's column}."""
    if not columns:
        return {}
    out: dict[str, str] = {}
    for part in columns.split(","):
        field, sep, column = (x.strip() for x in part.partition("="))
        if not sep or not field or not column:
            raise DskdError(f"--columns: {part!r} is not FIELD=COLUMN", hint="e.g. --columns prompt=question,response=answer")
        if field not in ROW_FIELDS:
            raise DskdError(f"--columns: {field!r} is not a row field ({', '.join(ROW_FIELDS)})")
        out[field] = column
    return out


ROW_FIELDS = ("prompt", "response", "instruction", "input", "output", "instances", "messages", "text")


def _hub_rows(spec: str, split: str | None) -> Iterable[tuple[str, Any]]:
    """Rows of ``hf:ORG/NAME[:CONFIG][@SPLIT]`` through `datasets.load_dataset` (offline, from the
    local Hugging Face cache)."""
    import datasets

    name = spec[len(HF_PREFIX):]
    name, _, at = name.partition("@")
    name, _, config = name.partition(":")
    split = at or split or "train"
    if not name:
        raise DskdError(f"{spec!r}: give a dataset name, hf:ORG/NAME[:CONFIG][@SPLIT]")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - whatever datasets says, as one error
        offline = datasets.config.HF_HUB_OFFLINE
        raise DskdError(f"{spec}: cannot load the dataset {name!r}" + (f" ({config})" if config else "")
                        + f", split {split!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        hint=("offline (HF_HUB_OFFLINE=1), only datasets already in the local Hugging Face cache load: "
                              f"run `python -c \"import datasets; datasets.load_dataset('{name}'"
                              + (f", '{config}'" if config else "") + ")\"` once with network, or save it with "
                              "`save_to_disk` and pass that folder") if offline else
                        "check the name, config and split on the hub") from None
    for i, row in enumerate(ds):
        yield f"{spec}#{i}", row


def load_examples(data: str | Path, *, limit: int | None = None, skip_bad_rows: bool = False,
                  split: str | None = None, columns: str | dict[str, str] | None = None) -> LoadReport:
    """Read a corpus into :class:`Example` rows, in file order: a .jsonl/.json/.parquet file, a
    `datasets` folder, or ``hf:ORG/NAME[:CONFIG][@SPLIT]`` (`datasets.load_dataset`). ``columns``
    maps row fields onto the data's own columns (``prompt=question,response=answer``).

    Raises one :class:`DskdError` naming the file and line of the first bad row (or, with
    ``skip_bad_rows``, skips them and reports the count). An empty corpus is an error.
    """
    mapping = columns if isinstance(columns, dict) else parse_columns(columns)
    path = Path(data)
    if str(data).startswith(HF_PREFIX):
        rows = _hub_rows(str(data), split)
    elif not path.exists():
        raise DskdError(f"corpus not found: {path}")
    else:
        rows = _raw_rows(path, split)
    examples: list[Example] = []
    skipped: list[str] = []
    seen: dict[str, int] = {}
    for where, row in rows:
        try:
            if isinstance(row, DskdError):
                raise row
            if mapping:
                row = _mapped(row, mapping, where)
            items = _normalise(row, where)
        except DskdError as e:
            if not skip_bad_rows:
                raise DskdError(e.problems, hint="fix the row, or pass --skip-bad-rows to skip such rows") from None
            skipped.append(e.problems[0])
            continue
        for instruction, inp, response, src, *chat in items:
            messages = chat[0] if chat else ()
            base = example_id(instruction, inp, response, messages)
            n = seen.get(base, 0)
            seen[base] = n + 1
            examples.append(Example(base if n == 0 else f"{base}-{n}", instruction, inp, response, src, messages))
            if limit is not None and len(examples) >= limit:
                break
        if limit is not None and len(examples) >= limit:
            break
    if skipped:
        log.warning("skipped %d malformed row(s) of %s; first: %s", len(skipped), path, skipped[0])
    if not examples:
        raise DskdError(f"{data}: the corpus holds no usable example" + (f" ({len(skipped)} rows skipped)" if skipped else ""))
    return LoadReport(examples, skipped)


def resolve_template(template: str, tokenizer: Any = None) -> str:
    """`auto`: the tokenizer's chat template (`chat`) when it has one, else `alpaca`; any other
    name as it is. Caches and runs record the resolved name."""
    if template != "auto":
        return template
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def render_prompt(ex: Example, template: str, tokenizer: Any = None) -> str:
    """The prompt text the model reads before the response (none for a plain-text row)."""
    template = resolve_template(template, tokenizer)
    if ex.is_text:
        return ""
    if ex.is_chat:  # the turns before the last assistant turn, and the assistant's header
        _check_chat(ex, template, tokenizer)
        return tokenizer.apply_chat_template(_turns(with_system(ex.messages[:-1], template)), tokenize=False,
                                             add_generation_prompt=True)
    if template == "alpaca":
        if ex.input.strip():
            return f"{ALPACA_HEAD_INPUT}### Instruction:\n{ex.instruction}\n\n### Input:\n{ex.input}\n\n### Response:\n"
        return f"{ALPACA_HEAD}### Instruction:\n{ex.instruction}\n\n### Response:\n"
    if is_chat_template(template):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DskdError(f"template {template!r} needs a tokenizer with a chat template", hint="use --template alpaca")
        content = ex.instruction if not ex.input.strip() else f"{ex.instruction}\n\n{ex.input}"
        return tokenizer.apply_chat_template(
            _turns(with_system((("user", content),), template)), tokenize=False, add_generation_prompt=True
        )
    if template == "none":
        return ex.instruction if not ex.input.strip() else f"{ex.instruction}\n{ex.input}"
    raise DskdError(f"unknown template {template!r}")


def template_fingerprint(template: str, tokenizer: Any = None) -> str:
    template = resolve_template(template, tokenizer)
    parts = [template]
    if template == "alpaca":
        parts += [ALPACA_HEAD, ALPACA_HEAD_INPUT]
    elif is_chat_template(template):
        parts.append(str(getattr(tokenizer, "chat_template", "")))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def data_fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        parts: list[Any] = [ex.id, ex.instruction, ex.input, ex.response]
        if ex.messages:
            parts.append([list(m) for m in ex.messages])
        h.update(json.dumps(parts, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    prompt_len: int
    explicit_targets: tuple[int, ...] | None = None
    "A conversation's target positions (its assistant turns); None: the prompt/response rule."

    def targets(self) -> list[int]:
        """The positions trained on (see :func:`target_positions`)."""
        if self.explicit_targets is not None:
            return list(self.explicit_targets)
        return list(target_positions(len(self.input_ids), self.prompt_len))


def is_chat_template(template: str) -> bool:
    """`chat` or `chat:SYSTEM`: rendered with the tokenizer's chat template."""
    return template == "chat" or template.startswith("chat:")


def with_system(messages: tuple[tuple[str, str], ...], template: str) -> tuple[tuple[str, str], ...]:
    """The turns as the template renders them: `chat:SYSTEM` puts SYSTEM first as the system turn
    unless the conversation has its own (which is kept); `chat` leaves the turns as they are, so the
    chat template adds its default system prompt if it has one."""
    if not template.startswith("chat:") or (messages and messages[0][0] == "system"):
        return messages
    return (("system", template[len("chat:"):]), *messages)


def _turns(messages: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in messages]


def _check_chat(ex: Example, template: str, tokenizer: Any) -> None:
    if not is_chat_template(template):
        raise DskdError(f"{ex.source}: a conversation (messages) is rendered with the tokenizer's chat template",
                        hint="use --template chat")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DskdError(f"{ex.source}: a conversation needs a tokenizer with a chat template; this one has none",
                        hint="use a chat model's tokenizer, or prompt/response rows with --template alpaca")


def encode_conversation(tokenizer: Any, ex: Example, *, max_len: int, template: str = "chat") -> Encoded:
    """A conversation rendered with the tokenizer's chat template. Its targets are the tokens of
    every assistant turn, the turn's end-of-turn marker included (whitespace after it is not);
    system, user and tool turns and the template's headers never are. The rendered text is cut
    into pieces at the assistant turns and each piece is tokenized on its own, so the target mask
    is exact. Cut to ``max_len`` tokens (no EOS appended: the end-of-turn marker ends a turn);
    ``prompt_len`` is where the last assistant turn starts (what evaluation and on-policy sampling
    generate from)."""
    _check_chat(ex, template, tokenizer)
    messages = with_system(ex.messages, template)
    turns = _turns(messages)
    full = tokenizer.apply_chat_template(turns, tokenize=False)
    cuts: list[tuple[int, int]] = []  # (start, end) character spans of the assistant turns in `full`
    for k, (role, _content) in enumerate(messages):
        if role != "assistant":
            continue
        before = tokenizer.apply_chat_template(turns[:k], tokenize=False, add_generation_prompt=True) if k else ""
        upto = tokenizer.apply_chat_template(turns[:k + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DskdError(f"{ex.source}: the chat template does not render assistant turn {k} as an extension of the "
                            "turns before it, so its tokens cannot be told apart",
                            hint="use prompt/response rows for this model")
        end = len(upto.rstrip())
        cuts.append((len(before), end))
    ids: list[int] = []
    targets: list[int] = []
    prompt_len = 0
    pos = 0
    for start, end in cuts:
        ids += tokenizer(full[pos:start], add_special_tokens=False)["input_ids"] if start > pos else []
        turn = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
        prompt_len = len(ids)
        targets += target_positions(len(ids) + len(turn), len(ids))  # this turn's tokens as the "response"
        ids += turn
        pos = end
    ids = ids[:max_len]
    targets = [p for p in targets if p + 1 < len(ids)]
    if not targets:
        raise DskdError(f"{ex.source}: no assistant token is left within max_len = {max_len} tokens",
                        hint="raise --max-len, or shorten the conversation")
    return Encoded(ids, min(prompt_len, len(ids)), tuple(targets))


def encode_example(tokenizer: Any, ex: Example, prompt: str, *, max_prompt_len: int, max_len: int,
                   template: str) -> Encoded:
    """Any row shape's token ids and targets: a conversation through its chat template, any other
    through :func:`encode` with its rendered ``prompt``."""
    if ex.is_chat:
        return encode_conversation(tokenizer, ex, max_len=max_len, template=template)
    return encode(tokenizer, prompt, ex.response, max_prompt_len=max_prompt_len, max_len=max_len, template=template)


def encode_prompt(tokenizer: Any, prompt: str, *, max_prompt_len: int, template: str) -> list[int]:
    """The prompt's token ids as training and evaluation read them: the tokenizer's special tokens
    unless a chat template already wrote them (a plain-text row's empty prompt: its prefix, BOS if
    any), cut to ``max_prompt_len``."""
    add_special = not is_chat_template(template) or not prompt
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"][:max_prompt_len]


def encode(tokenizer: Any, prompt: str, response: str, *, max_prompt_len: int, max_len: int,
           template: str) -> Encoded:
    """The papers' truncation rule: prompt cut to ``max_prompt_len``, then prompt + response cut
    to ``max_len - 1``, then EOS appended. Prompt and response are tokenized separately so the
    response mask is exact.

    A plain-text row (empty prompt) is the tokenizer's special prefix (BOS, if it adds one) and
    the text, cut to ``max_len``, with no EOS: a window of a longer document does not end it."""
    text = not prompt
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_len=max_prompt_len, template=template)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if text:
        return Encoded((prompt_ids + response_ids)[:max_len], len(prompt_ids))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DskdError("the tokenizer has no EOS token", hint="use a tokenizer with eos_token set")
    ids = (prompt_ids + response_ids)[: max_len - 1] + [eos]
    return Encoded(ids, len(prompt_ids))


def target_positions(n_tokens: int, prompt_len: int) -> range:
    """The positions trained on (the one place this rule lives): those whose next token is a target,
    a response token or the final EOS (for plain text, every token after the first). Position ``i``
    predicts token ``i + 1``; the first position always reads at least one token."""
    return range(max(prompt_len, 1) - 1, max(n_tokens - 1, max(prompt_len, 1) - 1))


def split_long_texts(examples: list[Example], tokenizer: Any, max_len: int) -> list[Example]:
    """Cut every plain-text example longer than ``max_len`` tokens into consecutive windows, so no
    text is dropped: window ``k`` of example ``ID`` is ``ID#k``, the windows' texts concatenate to
    the document exactly, and each window encodes to at most ``max_len`` tokens without
    truncation. Other examples pass through unchanged. Deterministic for a tokenizer and max_len."""
    prefix = len(encode_prompt(tokenizer, "", max_prompt_len=max_len, template="none"))  # a text row's BOS, if any
    budget = max_len - prefix
    if budget < 2:
        raise DskdError(f"max_len {max_len} leaves no room for text after the tokenizer's {prefix} special token(s)")
    out: list[Example] = []
    for ex in examples:
        if not ex.is_text:
            out.append(ex)
            continue
        enc = tokenizer(ex.response, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= budget:
            out.append(ex)
            continue
        starts = [a for a, _ in enc["offset_mapping"]]
        pieces: list[str] = []
        tok_at, char_at = 0, 0
        while char_at < len(ex.response):
            take = budget
            while True:  # a window re-encodes to a few tokens more only where a cut splits a merge
                end = len(ex.response) if tok_at + take >= len(starts) else starts[tok_at + take]
                piece = ex.response[char_at:end]
                if take <= 1 or len(tokenizer(piece, add_special_tokens=False)["input_ids"]) <= budget:
                    break
                take -= 1
            if not piece:
                raise DskdError(f"{ex.source}: cannot cut this text into windows of {budget} tokens (the tokenizer's "
                                "offsets do not advance)", hint="raise --max-len")
            pieces.append(piece)
            tok_at, char_at = tok_at + take, end
        n = len(pieces)
        out += [Example(f"{ex.id}#{k}", "", "", p, f"{ex.source} window {k + 1}/{n}") for k, p in enumerate(pieces)]
    return out


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group indices into batches of similar length whose padded size fits ``batch_tokens``.

    Indices are sorted by length (longest first, ties by index, so the grouping is
    deterministic); a batch grows while ``len(batch) * longest <= batch_tokens``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if cur and (len(cur) + 1) * max(longest, n) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class Prepared:
    examples: list[Example]
    prompts: list[str]
    encoded: list[Encoded]
    skipped: int


def prepare_corpus(cfg: Any, tok: Any) -> Prepared:
    """Read, render and encode ``cfg.data`` (a CacheConfig, a DistillConfig or anything with their
    data fields) with ``tok``: the one corpus preparation of stage one, stage two and alignment."""
    report = load_examples(cfg.data, limit=cfg.limit, skip_bad_rows=getattr(cfg, "skip_bad_rows", False),
                           split=getattr(cfg, "split", None), columns=getattr(cfg, "columns", None))
    examples = split_long_texts(report.examples, tok, cfg.max_len)  # plain text: windows, nothing dropped
    if getattr(cfg, "generate", False) and any(ex.is_text for ex in examples):
        first = next(ex for ex in examples if ex.is_text)
        raise DskdError(f"{first.source}: --generate samples a response for each prompt; a plain-text row has no prompt",
                        hint="cache plain text without --generate")
    chat = next((ex for ex in examples if ex.is_chat), None)
    if chat is not None and getattr(cfg, "generate", False):
        raise DskdError(f"{chat.source}: --generate samples one response per prompt; a conversation has several "
                        "assistant turns", hint="cache conversations without --generate")
    if chat is not None and getattr(cfg, "positions", "targets") == "all":
        raise DskdError(f"{chat.source}: --positions all is for prompt/response and text rows; a conversation's "
                        "targets are its assistant turns", hint="cache conversations with --positions targets")
    template = resolve_template(cfg.template, tok)
    prompts = [render_prompt(ex, template, tok) for ex in examples]
    encoded = [encode_example(tok, ex, p, max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len,
                              template=template) for p, ex in zip(prompts, examples)]
    return Prepared(examples, prompts, encoded, len(report.skipped))

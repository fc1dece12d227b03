"""`dskd-batch init-student`: a same-family student made of K of the teacher's layers.

Which K layers (``--select``): ``even`` spaces them evenly over the teacher's depth, first and last
always kept; ``influence`` keeps the K layers that change their input most on calibration rows
(:func:`block_influence`: ShortGPT's Block Influence, 1 - cosine of a layer's input and output
hidden states, averaged over tokens), so that the layers which nearly pass their input through are
the ones dropped. Their weights are copied together with the embeddings, final norm and head; the
config's layer count is updated and each attention layer's index renumbered, so the result is a
plain Hugging Face model (``from_pretrained`` loads it) with the teacher's tokenizer.
``student.json`` records the kept layers, how they were chosen and, for ``influence``, each
layer's score.

With ``--tokenizer OTHER`` the student gets another tokenizer's vocabulary (a student for the
cross-vocabulary methods that starts close to the teacher): its input embeddings, and its head if
untied, are transplanted row by row (:func:`transplant_vocabulary`): a token whose bytes equal a
teacher token's gets that token's row (*copied*); any other token gets the mean of the rows of
the teacher tokens that spell its bytes, longest match first (*composed*); a token that stands for
no text (special tokens other than EOS/BOS/PAD, which map to the teacher's) gets a random row with
the teacher's per-dimension mean and std (*random*). ``transplant.json`` records the counts.

A mean of rows makes a poor output row: at full depth on the demo's training rows the GPT-2
transplant's 13,275 composed tokens take 48% of the probability mass at the average position,
where they are 20% of the tokens. With ``--calibration`` rows, :func:`calibrate_composed` lowers each
composed token's output logit by ``beta * (pieces - 1) * (h . u)`` (``u``: the direction of the
mean head input; a longer spelling costs more), with the one scalar ``beta`` solved on the
calibration rows so that the composed tokens' mass there equals their share of the text. Tied
embeddings move with the head; an untied head is calibrated alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DskdError
from ..models import load_causal_lm, load_tokenizer, plain_model

log = logging.getLogger(__name__)

LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def kept_layers(total: int, k: int) -> list[int]:
    """K indices evenly spaced over ``range(total)``, including 0 and total - 1."""
    if not 1 <= k <= total:
        raise DskdError(f"--layers must be between 1 and the teacher's {total} layers, got {k}")
    if k == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (k - 1)) for i in range(k)})


SELECTIONS = ("even", "influence")
STUDENT_INFO = "student.json"


@torch.no_grad()
def block_influence(model: Any, tok: Any, data: str | Path, template: str, *, limit: int = 64, max_len: int = 512,
                    batch_size: int = 8, columns: str | None = None) -> list[float]:
    """Each decoder layer's Block Influence on the first ``limit`` rows of ``data`` (any row shape,
    rendered with ``template``): 1 - cosine similarity of the layer's input and output hidden
    states, averaged over every real token. A layer that passes its input through scores 0."""
    _, _, layers = _layer_list(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    mask: list[torch.Tensor] = []

    def hook(i: int) -> Any:
        def fn(_mod: Any, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            m = mask[0]
            cos = nn.functional.cosine_similarity(h_in[m].double(), h_out[m].double(), dim=-1)
            sums[i] += float((1 - cos).sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for mb in _calibration_batches(model, tok, data, template, limit=limit, max_len=max_len,
                                       batch_size=batch_size, columns=columns):
            mask[:] = [mb.attention_mask.bool()]
            model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
            tokens += int(mb.attention_mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (sums / max(tokens, 1)).tolist()


def influence_layers(scores: list[float], k: int) -> list[int]:
    """The ``k`` layers of highest Block Influence, in model order (ties: the earlier layer)."""
    if not 1 <= k <= len(scores):
        raise DskdError(f"--layers must be between 1 and the teacher's {len(scores)} layers, got {k}")
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def _layer_list(model: Any) -> tuple[Any, str, nn.ModuleList]:
    for path in LAYER_PATHS:
        parent = model
        parts = path.split(".")
        try:
            for p in parts[:-1]:
                parent = getattr(parent, p)
            layers = getattr(parent, parts[-1])
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return parent, parts[-1], layers
    raise DskdError(f"cannot find the decoder layers of {type(model).__name__} (looked at {', '.join(LAYER_PATHS)})")


def spell(text: bytes, index: dict[bytes, int], longest: int) -> list[int] | None:
    """Token ids whose bytes concatenate to ``text``, greedy longest match (None if impossible)."""
    ids, i = [], 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            j = index.get(text[i:i + n])
            if j is not None:
                ids.append(j)
                i += n
                break
        else:
            return None
    return ids


def _special_map(teacher_tok: Any, student_tok: Any) -> dict[int, int]:
    out = {}
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        s, t = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if s is not None and t is not None and s not in out:
            out[int(s)] = int(t)
    return out


def _calibration_batches(model: Any, tok: Any, data: str | Path, template: str, *, limit: int, max_len: int,
                         batch_size: int, columns: str | None) -> Any:
    """Collated batches of the first ``limit`` rows of ``data`` rendered with ``template`` (whole text)."""
    from .batches import CorpusExamples, collate
    from ..data import encode_example, load_examples, render_prompt, resolve_template

    examples = load_examples(data, limit=limit, columns=columns).examples
    template = resolve_template(template, tok)
    src = CorpusExamples([encode_example(tok, ex, render_prompt(ex, template, tok), max_prompt_len=max_len // 2,
                                         max_len=max_len, template=template) for ex in examples])
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for b in range(0, len(src), batch_size):
        yield collate(src.records(list(range(b, min(b + batch_size, len(src))))), pad, with_teacher=False).to(device)


def transplant_vocabulary(model: Any, teacher_tok: Any, student_tok: Any, seed: int = 0,
                          how: str = "transplant") -> dict[str, Any]:
    """Give ``model`` (the teacher's architecture and weights) ``student_tok``'s vocabulary, in
    place; returns the counts of copied, composed and random rows. ``how="random"`` makes every row
    random (the baseline the transplant is measured against)."""
    from ..cache.align import text_index, token_table

    tt, st = token_table(teacher_tok), token_table(student_tok)
    index = text_index(tt)
    longest = max(len(b) for b in index)
    specials = _special_map(teacher_tok, student_tok)
    plan: list[list[int] | None] = []
    counts = {"copied": 0, "composed": 0, "random": 0}
    for j, b in enumerate(st.texts):
        rows = None
        if how == "transplant":
            if j in specials:
                rows = [specials[j]]
            elif b:
                rows = [index[b]] if b in index else spell(b, index, longest)
        kind = "random" if rows is None else "copied" if len(rows) == 1 else "composed"
        counts[kind] += 1
        plan.append(rows)
    gen = torch.Generator().manual_seed(seed)
    v_t = len(teacher_tok)

    def rebuild(old: torch.Tensor) -> torch.Tensor:
        old = old.detach().float()[:v_t]
        mean, std = old.mean(0), old.std(0)
        new = mean + std * torch.randn(len(plan), old.shape[1], generator=gen)
        for j, rows in enumerate(plan):
            if rows is not None:
                new[j] = old[rows].mean(0)
        return new

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    new_emb = rebuild(emb.weight)
    new_head = None if tied or head is None else rebuild(head.weight)
    model.resize_token_embeddings(len(plan), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_emb)
        if new_head is not None:
            model.get_output_embeddings().weight.copy_(new_head)
            if getattr(model.get_output_embeddings(), "bias", None) is not None:
                model.get_output_embeddings().bias.zero_()
    if tied:
        model.tie_weights()
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(student_tok, name, None)
        setattr(model.config, name, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, value)
    pieces = [0 if rows is None else len(rows) for rows in plan]
    return {**counts, "student_vocab": len(plan), "teacher_vocab": v_t, "tied_head": tied, "how": how,
            "pieces": pieces}


@torch.no_grad()
def calibrate_composed(model: Any, tok: Any, pieces: list[int], data: str | Path, template: str = "auto", *,
                       limit: int = 64, max_len: int = 512, batch_size: int = 8, positions: int = 4096,
                       columns: str | None = None) -> dict[str, float]:
    """Lower the output logits of the composed tokens (``pieces[j]`` > 1 teacher tokens spell token
    ``j``) so that, on the calibration rows, the probability mass they take equals their share of
    the rows' tokens: row ``j`` of the head moves by ``-beta * (pieces[j] - 1) * u``, ``u`` the unit
    direction of the mean head input, ``beta`` found by bisection. In place; returns the figures."""
    from ..models import head_inputs

    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise DskdError(f"cannot calibrate the composed rows of a {type(head).__name__} head")
    w = head.weight
    extra = torch.tensor([max(p - 1, 0) for p in pieces], dtype=torch.float32)
    extra = torch.nn.functional.pad(extra, (0, w.shape[0] - len(extra)))
    composed = extra > 0
    hs, n_composed, n_tokens, n_rows = [], 0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for mb in _calibration_batches(model, tok, data, template, limit=limit, max_len=max_len,
                                       batch_size=batch_size, columns=columns):
            real = mb.attention_mask.bool()
            hs.append(head_inputs(model, mb.input_ids, mb.attention_mask, real).float().cpu())
            ids = mb.input_ids[real].cpu()
            n_composed += int(composed[ids].sum())
            n_tokens += len(ids)
            n_rows += mb.input_ids.shape[0]
    finally:
        model.train(was_training)
    if not n_tokens:
        raise DskdError(f"no calibration tokens in {data}")
    h = torch.cat(hs)
    h = h[torch.randperm(len(h), generator=torch.Generator().manual_seed(0))[:positions]]
    u = h.mean(0)
    u = u / u.norm()
    w0 = w.detach().float().cpu()
    logits0, hu = h @ w0.T, h @ u  # a row moved by -beta*e*u changes its logit by -beta*e*(h.u)
    share = n_composed / n_tokens

    def mass(beta: float) -> float:
        shifted = logits0 - beta * hu[:, None] * extra[None, :]
        return float(shifted.softmax(-1)[:, composed].sum(-1).mean())

    before = mass(0.0)
    figures = {"rows": n_rows, "tokens": n_tokens, "positions": len(h), "composed_share": share,
               "composed_mass_before": before, "positive_h_u": float((hu > 0).float().mean())}
    if before <= share:
        return {**figures, "composed_mass_after": before, "beta": 0.0, "skipped": "the composed mass is not above their share"}
    if figures["positive_h_u"] < 0.99:  # the shift would not lower the logits everywhere: it is no bias
        log.warning("composed rows not calibrated: the head inputs share no direction (h . u > 0 at %.0f%% of the "
                    "positions)", 100 * figures["positive_h_u"])
        return {**figures, "composed_mass_after": before, "beta": 0.0, "skipped": "the head inputs share no direction"}
    lo, hi = 0.0, 1.0
    while mass(hi) > share:
        if hi > 1e6:
            log.warning("composed rows not calibrated: their mass stays above their share however far they move")
            return {**figures, "composed_mass_after": before, "beta": 0.0, "skipped": "the share cannot be reached"}
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) > share else (lo, mid)
    w.data -= (hi * extra[:, None] * u[None, :]).to(w.dtype).to(w.device)
    return {**figures, "composed_mass_after": mass(hi), "beta": hi}


def init_student(source: str, layers: int, out: str | Path, tokenizer: str | None = None,
                 embeddings: str = "transplant", select: str = "even", calibration: str | None = None,
                 template: str = "auto", columns: str | None = None, warmup_steps: int = 0,
                 warmup_lr: float = 1e-3) -> Path:
    """A student of ``layers`` of ``source``'s layers in ``out``; ``select`` = "influence" chooses them
    by Block Influence on ``calibration`` rows (rendered with ``template``). With ``tokenizer`` the
    vocabulary is transplanted, and with ``calibration`` too its composed rows are calibrated
    (:func:`calibrate_composed`) on those rows in the student's tokenization, then, with
    ``warmup_steps``, trained against the whole teacher on them (:mod:`.warmup`)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DskdError(f"--out {out} exists and is not empty", hint="choose another folder")
    if select not in SELECTIONS:
        raise DskdError(f"--select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    if select == "influence" and calibration is None:
        raise DskdError("--select influence scores the layers on calibration rows: give --calibration DATA")
    if calibration is not None and not str(calibration).startswith("hf:") and not Path(calibration).exists():
        raise DskdError(f"calibration data not found: {calibration}")
    if warmup_steps and (tokenizer is None or calibration is None or embeddings != "transplant"):
        raise DskdError("--warmup-steps trains a transplanted vocabulary's composed rows on calibration rows: "
                        "give --tokenizer OTHER and --calibration DATA (and --embeddings transplant)")
    if warmup_steps < 0 or warmup_lr <= 0:
        raise DskdError(f"--warmup-steps must be >= 0 and --warmup-lr > 0, got {warmup_steps} and {warmup_lr}")
    tok = load_tokenizer(source)
    student_tok = load_tokenizer(tokenizer) if tokenizer is not None else None  # before the model: fail fast
    model = load_causal_lm(source, dtype=torch.float32, device="cpu")
    teacher = None
    if warmup_steps:
        import copy

        teacher = copy.deepcopy(model).eval()  # the whole teacher, before its layers are dropped
    parent, attr, old = _layer_list(model)
    scores = None
    if select == "influence":
        scores = block_influence(model, tok, calibration, template, columns=columns)
        keep = influence_layers(scores, layers)
    else:
        keep = kept_layers(len(old), layers)
    setattr(parent, attr, nn.ModuleList([old[i] for i in keep]))
    for new_idx, layer in enumerate(getattr(parent, attr)):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    key = next((k for k in LAYER_KEYS if hasattr(model.config, k)), None)
    if key is None:
        raise DskdError(f"{type(model).__name__}'s config names no layer count")
    setattr(model.config, key, len(keep))
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model = plain_model(model)
    info = None
    if student_tok is not None:
        info = transplant_vocabulary(model, tok, student_tok, how=embeddings)
        pieces = info.pop("pieces")
        teacher_tok, tok = tok, student_tok
        if calibration is not None and embeddings == "transplant":
            info["calibration"] = {"data": str(calibration), **calibrate_composed(model, tok, pieces, calibration,
                                                                                 template, columns=columns)}
            log.info("composed rows calibrated on %s: their mass %.3f -> %.3f (share of the text %.3f)", calibration,
                     info["calibration"]["composed_mass_before"], info["calibration"]["composed_mass_after"],
                     info["calibration"]["composed_share"])
        if warmup_steps:
            from .warmup import warm_up_composed

            info["warmup"] = warm_up_composed(model, tok, teacher, teacher_tok, pieces, calibration,
                                              template, steps=warmup_steps, lr=warmup_lr, columns=columns)
            del teacher
            log.info("composed rows warmed up against the teacher in %d steps: chunk NLL gap %.3f -> %.3f nats",
                     warmup_steps, info["warmup"]["chunk_nll_gap_before"], info["warmup"]["chunk_nll_gap_after"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    from ..files import atomic_write_json

    atomic_write_json(out / STUDENT_INFO, {"source": str(source), "layers": keep, "select": select,
                                           **({"calibration": str(calibration), "template": template,
                                               "block_influence": scores} if scores is not None else {})})
    if info is not None:
        import json

        info.update(source=str(source), tokenizer=str(tokenizer), layers=keep)
        (out / "transplant.json").write_text(json.dumps(info, indent=2) + "\n")
        log.info("vocabulary of %s transplanted: %d rows copied, %d composed, %d random", tokenizer,
                 info["copied"], info["composed"], info["random"])
    log.info("student with teacher layers %s written to %s", keep, out)
    return out

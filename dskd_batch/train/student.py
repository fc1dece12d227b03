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

With ``--tokenizer OTHER`` the student gets another tokenizer's vocabulary (:mod:`.transplant`).
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
    from .batches import calibration_batches

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
        for mb in calibration_batches(model, tok, data, template, limit=limit, max_len=max_len,
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


def init_student(source: str, layers: int, out: str | Path, tokenizer: str | None = None,
                 embeddings: str = "transplant", select: str = "even", calibration: str | None = None,
                 template: str = "auto", columns: str | None = None, warmup_steps: int = 0,
                 warmup_lr: float = 1e-3) -> Path:
    """A student of ``layers`` of ``source``'s layers in ``out``; ``select`` = "influence" chooses them
    by Block Influence on ``calibration`` rows (rendered with ``template``). With ``tokenizer`` the
    vocabulary is transplanted, and with ``calibration`` too its composed rows are calibrated
    (:func:`calibrate_composed`) on those rows in the student's tokenization, then, with
    ``warmup_steps``, trained against the whole teacher on them (:func:`.transplant.warm_up_composed`)."""
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
        from .transplant import calibrate_composed, transplant_vocabulary, warm_up_composed

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
            info["warmup"] = warm_up_composed(model, tok, teacher, teacher_tok, pieces, calibration,
                                              template, steps=warmup_steps, lr=warmup_lr, columns=columns)
            del teacher
            if "skipped" not in info["warmup"]:
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

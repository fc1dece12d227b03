"""`dskd-batch init-student`: a same-family student made of K of the teacher's layers.

The K layers are evenly spaced over the teacher's depth, first and last always kept, and their
weights copied together with the embeddings, final norm and head; the config's layer count is
updated and each attention layer's index renumbered, so the result is a plain Hugging Face model
(``from_pretrained`` loads it) with the teacher's tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DskdError
from .models import load_causal_lm, load_tokenizer, plain_model

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


def init_student(source: str, layers: int, out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DskdError(f"--out {out} exists and is not empty", hint="choose another folder")
    tok = load_tokenizer(source)
    model = load_causal_lm(source, dtype=torch.float32, device="cpu")
    parent, attr, old = _layer_list(model)
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
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    log.info("student with teacher layers %s written to %s", keep, out)
    return out

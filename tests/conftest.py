"""Shared fixtures: a tiny byte-level BPE tokenizer trained in-process, tiny random teachers of two
architectures (LLaMA-style with an untied head, GPT-2-style with a tied head) and a small corpus.
Nothing is downloaded."""

from __future__ import annotations

import json
import os
from typing import Any
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DSKD_CPU_BF16", "0")  # --precision auto is fp32 in the tests on any CPU: exact comparisons
torch.set_num_threads(2)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

ROWS = [
    {"prompt": "Name a primary colour.", "response": "Red is a primary colour."},
    {"prompt": "What is two plus three?", "response": "Two plus three is five."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Give a synonym.", "input": "happy", "output": "Glad, joyful or cheerful."},
    {"instruction": "List three fruits.", "output": "Apple, banana and cherry.\nAll are sweet."},
    {"instruction": "Classify the sentiment.", "instances": [
        {"input": "I loved this film.", "output": "positive"},
        {"input": "The food was cold and bland.", "output": "negative"}]},
    {"prompt": "Write a haiku about rain.", "response": "Soft rain on the roof\nwhispers to the sleeping town\nmorning smells of earth"},
    {"prompt": "Explain gravity in one sentence.", "response": "Gravity is the pull that masses exert on each other."},
    {"prompt": "Capital of Italy?", "response": "Rome."},
    {"instruction": "Sort the numbers.", "input": "5, 2, 9, 1", "output": "1, 2, 5, 9"},
    {"prompt": "Say hello in Spanish.", "response": "Hola."},
    {"prompt": "Describe the sea.", "response": "The sea is vast, salty and restless; waves roll in from far away."},
]


def subprocess_env() -> dict[str, str]:
    """The environment of a `python -m dskd_batch ...` child process in a test: offline, one thread,
    this checkout importable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _corpus_text() -> str:
    parts = []
    for r in ROWS:
        parts += [str(v) for v in r.values() if isinstance(v, str)]
    parts.append("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request. ### Instruction: ### Input: ### Response: paired with an input that provides further context.")
    return "\n".join(parts)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_corpus_text()] * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(d))
    return d


def _save_model(model: torch.nn.Module, tok_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def llama_teacher(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    V = len(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=1)
    return _save_model(LlamaForCausalLM(cfg), tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2_teacher(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    V = len(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=512, eos_token_id=0, bos_token_id=0)
    return _save_model(GPT2LMHeadModel(cfg), tiny_tokenizer_dir, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return p


def read_cache_arrays(path: Path) -> dict:
    """Every example record of a cache, keyed by id (for equality checks between caches)."""
    from dskd_batch import open_cache

    c = open_cache(path, verify="full")
    return {c[i]["id"]: c[i] for i in range(len(c))}


def assert_same_cache(a: Path, b: Path) -> None:
    ra, rb = read_cache_arrays(a), read_cache_arrays(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        for f, va in ra[k].items():
            vb = rb[k][f]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), (k, f)
            else:
                assert va == vb, (k, f)


@pytest.fixture(scope="session")
def gpt2_student(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller student (d=24, no dropout, tied head) sharing the teachers' tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    V = len(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=V, n_embd=24, n_layer=2, n_head=2, n_positions=512, eos_token_id=0, bos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _save_model(GPT2LMHeadModel(cfg), tiny_tokenizer_dir, tmp_path_factory.mktemp("student"))


def cache_config(teacher: Path | str, data: Path | str, out: Path | str, **kw: Any) -> Any:
    """The tests' one cache-config factory: a tiny exact cache (fp32 hidden states, top-8, 5 examples
    per shard, rows of at most 96 tokens); ``kw`` overrides any setting."""
    from dskd_batch.config import CacheConfig

    base = dict(teacher=str(teacher), data=str(data), out=str(out), hidden="fp32", top_k=8, shard_size=5,
                batch_tokens=512, max_len=96, max_prompt_len=64)
    return CacheConfig(**{**base, **kw})


def make_cache(teacher: Path | str, data: Path | str, out: Path | str, **kw: Any) -> Path:
    """Run stage one with :func:`cache_config`'s settings; returns the cache folder."""
    from dskd_batch.teacher.caching import run

    return run(cache_config(teacher, data, out, **kw), progress=False)


@pytest.fixture(scope="session")
def fp32_cache(llama_teacher: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 cache of the LLaMA teacher over the test corpus (exact hidden states)."""
    return make_cache(llama_teacher, corpus, tmp_path_factory.mktemp("cache") / "fp32")


def smollm2_teacher(tmp_path, tied: bool = False, layers: int = 2, shift: float = 0.0):
    """A tiny random LLaMA with the real SmolLM2 tokenizer, saved to tmp_path/teacher; ``shift``: a
    common direction of that size added to its rows, so that the head inputs share a direction and mean
    rows outscore the rest, as in a real LM."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tt = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "smollm2"))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tt), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                           tie_word_embeddings=tied, eos_token_id=tt.eos_token_id))
    common = shift * torch.randn(16)
    with torch.no_grad():
        teacher.get_input_embeddings().weight.add_(common)
        if not tied:
            teacher.lm_head.weight.add_(common)
    teacher.save_pretrained(tmp_path / "teacher")
    tt.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher", teacher, tt

"""Fixtures for the trainer tests: a small text corpus on disk and a tiny byte-level task over it.

Every run in these tests uses the same tiny shapes, so the persistent compilation cache (one directory per test
session) turns every compile after the first into a cache hit.
"""

import pathlib

import jax
import pytest

from models.llm import LLMConfig
from train.data.byte_lm import ByteLMData
from train.data.sources import TextFiles
from train.language_model import ByteLanguageModel

TINY_MODEL = LLMConfig(width=32, depth=1, num_heads=2, num_kv_heads=1, mlp_width=64)
SEQ_LEN = 16
BATCH_SIZE = 8  # divisible by the 8 fake devices of tests/conftest.py


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _write_corpus(directory: pathlib.Path, files: int = 12, poison_file: int | None = None) -> pathlib.Path:
    """Writes `files` small Python-like text files; file `poison_file` (if given) also holds one 0xFF byte."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        body = "".join(f"def function_{index}_{line}(x):\n    return x * {line} + {index}\n" for line in range(20))
        data = body.encode()
        if index == poison_file:
            data = data[:100] + b"\xff" + data[100:]
        (directory / f"module_{index:02d}.py").write_bytes(data)
    return directory


def _tiny_task(corpus_dir: pathlib.Path, task_class=ByteLanguageModel, **data_overrides) -> ByteLanguageModel:
    data = ByteLMData(source=TextFiles(glob=str(corpus_dir / "*.py")), seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                      validation_percent=20.0, validation_bytes=512, **data_overrides)
    return task_class(model=TINY_MODEL, data=data, eval_batch_size=8, sample_prompt="def ", sample_bytes=8)


# Helpers are handed out as fixtures, so test modules need no import path to this file.
@pytest.fixture(scope="session")
def write_corpus():
    return _write_corpus


@pytest.fixture(scope="session")
def tiny_task():
    return _tiny_task


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> pathlib.Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))

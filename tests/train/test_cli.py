"""`python -m train`: gin errors, the resolved config, the quickstart under a tiny binding, and SIGTERM."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import gin
import pytest

from train import __main__ as cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICKSTART = "configs/quickstart.gin"


def tiny_bindings(corpus=None, steps=3):
    bindings = ["WIDTH = 32", "DEPTH = 1", "NUM_HEADS = 2", "NUM_KV_HEADS = 1", "SEQ_LEN = 16",
                "llm.LLMConfig.mlp_width = 64",
                "BATCH_SIZE = 8", f"STEPS = {steps}", "byte_lm.ByteLMData.validation_bytes = 512",
                "language_model.ByteLanguageModel.sample_bytes = 8", "trainer.train.progress_bar = False"]
    if corpus is not None:
        bindings += [f"TEXT_GLOB = '{corpus}/*.py'"]  # the one binding a user needs for their own text
    return [arg for binding in bindings for arg in ("--gin_bindings", binding)]


@pytest.fixture(autouse=True)
def clear_gin():
    yield
    gin.clear_config()


@pytest.mark.parametrize("binding, message", [
    ("trainer.train.stepz = 3", "doesn't have a parameter named 'stepz'"),
    ("llm.LLMConfg.width = 3", "No configurable matching 'llm.LLMConfg'"),
    ("WDITH = 64", "sets macro WDITH but no configuration uses %WDITH"),
])
def test_misspelled_bindings_are_clear_errors(binding, message, tmp_path, capsys):
    assert cli.main(["--gin_file", QUICKSTART, "--gin_bindings", binding, "--workdir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("error:")


def test_bad_value_is_reported_with_its_name(tmp_path, capsys):
    assert cli.main(["--gin_file", QUICKSTART, "--gin_bindings", "llm.LLMConfig.attention = 'nope'",
                     "--workdir", str(tmp_path)]) == 2
    assert "unknown name 'nope'" in capsys.readouterr().err


def test_missing_gin_file_is_reported(tmp_path, capsys):
    assert cli.main(["--gin_file", "configs/missing.gin", "--workdir", str(tmp_path)]) == 2
    assert "gin file 'configs/missing.gin' not found" in capsys.readouterr().err


def test_quickstart_trains_a_few_steps_on_the_stdlib_and_writes_its_outputs(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["--gin_file", QUICKSTART, *tiny_bindings(), "--workdir", str(workdir)]) == 0
    output = capsys.readouterr().out
    resolved = (workdir / "config.gin").read_text()
    assert "%WIDTH" in resolved and "WIDTH = 32" in resolved and "TEXT_GLOB = None" in resolved
    assert "Training finished at step 3" in output and "Sample (temperature" in output
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert (workdir / "loss.png").exists() and (workdir / "checkpoints" / "3").is_dir()


# default-suite time budget: the quickstart CLI test trains by default and every gin file is built by tests/configs
@pytest.mark.slow
def test_llm_stdlib_experiment_with_a_size_file_and_an_overlay_trains_a_few_steps(tmp_path, capsys):
    """configs/experiments/llm_stdlib.gin + a model-size file + an attention overlay, shrunk by the tiny bindings
    that follow them (the size file's macros lose to later command-line bindings)."""
    workdir = tmp_path / "run"
    files = ["configs/experiments/llm_stdlib.gin", "configs/models/llm/125m.gin", "configs/attention/lightning.gin"]
    argv = [arg for f in files for arg in ("--gin_file", f)]
    assert cli.main([*argv, *tiny_bindings(steps=2), "--gin_bindings",
                     "BLOCK_SIZE = 8", "--workdir", str(workdir)]) == 0
    output = capsys.readouterr().out
    resolved = (workdir / "config.gin").read_text()
    assert "attention = 'lightning'" in resolved and "WIDTH = 32" in resolved
    assert "Training finished at step 2" in output


def start_training(command, cache_dir):
    # One device (not the suite's 8 fake ones), as a user's run; the compilation cache is shared by both runs.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def wait_for_line(process, text, timeout=120):
    """Reads the process's output until a line contains `text`; returns everything read."""
    deadline, seen = time.monotonic() + timeout, []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n" + "".join(seen)
    raise AssertionError(f"process ended before printing {text!r}:\n" + "".join(seen))


def saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_the_rerun_resumes(corpus, tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "train", "--gin_file", QUICKSTART, *tiny_bindings(corpus, steps=100_000),
               "--gin_bindings", "trainer.train.checkpoint_every = 100000", "--workdir", str(workdir)]
    process = start_training(command, tmp_path / "cache")
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "training did not start within 120 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "SIGTERM received" in output and "Training stopped (resumable)" in output
    last_step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert saved_steps(workdir) == [last_step]

    # The same command again resumes from that checkpoint (and stops the same way on a second SIGTERM).
    rerun = start_training(command, tmp_path / "cache")
    wait_for_line(rerun, f"Resumed from the checkpoint at step {last_step}")
    rerun.send_signal(signal.SIGTERM)
    output, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, output
    assert saved_steps(workdir)[-1] == last_step + 1

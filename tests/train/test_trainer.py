"""End-to-end trainer behaviour on a tiny model: resume, corrupt checkpoints, non-finite losses, metrics files."""

import dataclasses
import json
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import trainer
from train.checkpoint import IncompatibleCheckpointError
from train.language_model import ByteLanguageModel

RUN = dict(progress_bar=False, eval_every=0, checkpoint_every=2, keep_checkpoints=3)


def leaves(params):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def assert_bitwise_equal(params_a, params_b):
    for a, b in zip(leaves(params_a), leaves(params_b), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory, tiny_task):
    """Six steps in one go; the reference for the resume tests."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, trainer.train(tiny_task(corpus), workdir=str(workdir), steps=6, **RUN)


def test_interrupted_and_resumed_run_matches_uninterrupted_bitwise(corpus, tmp_path, uninterrupted, tiny_task):
    _, reference = uninterrupted
    stop = threading.Event()
    first = trainer.train(tiny_task(corpus), workdir=str(tmp_path), steps=6, stop_event=stop,
                          on_step=lambda step, _: step == 3 and stop.set(), **RUN)
    assert first.interrupted and first.final_step == 3
    second = trainer.train(tiny_task(corpus), workdir=str(tmp_path), steps=6, **RUN)
    assert second.start_step == 3 and second.final_step == 6 and not second.interrupted
    assert {**first.losses, **second.losses} == reference.losses  # exact float equality, every step
    assert_bitwise_equal(second.params, reference.params)


def test_corrupt_latest_checkpoint_is_reported_and_previous_used(corpus, tmp_path, uninterrupted, capsys, tiny_task):
    reference_dir, _ = uninterrupted
    shutil.copytree(reference_dir / "checkpoints", tmp_path / "checkpoints")
    latest = tmp_path / "checkpoints" / "6"
    data_files = [p for p in (latest / "state").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert data_files
    for path in data_files:  # truncate every file of the latest state: what a crash mid-copy leaves behind
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    result = trainer.train(tiny_task(corpus), workdir=str(tmp_path), steps=6, **RUN)
    output = capsys.readouterr().out
    assert "checkpoint at step 6 is unreadable" in output
    assert result.start_step == 4 and result.final_step == 6
    moved = [path.name for path in (tmp_path / "checkpoints.corrupt").iterdir()]
    assert len(moved) == 1 and moved[0].startswith("6-")  # step 6 itself was saved again by the resumed run


class PoisonedByteModel(ByteLanguageModel):
    """Loss is NaN on any batch that contains the byte 0xFF (planted once in the corpus)."""

    def loss_fn(self, model, batch, rng):
        loss, metrics = super().loss_fn(model, batch, rng)
        return jnp.where(jnp.any(batch["tokens"] == 0xFF), jnp.nan, loss), metrics


def first_poisoned_step(task) -> int:
    iterator = task.train_iterator(0, 1)
    for step in range(1, 200):
        if np.any(next(iterator)["tokens"] == 0xFF):
            return step
    raise AssertionError("the planted 0xFF byte never reached a training batch")


@pytest.fixture(scope="module")
def poisoned_corpus(tmp_path_factory, write_corpus, tiny_task):
    directory = tmp_path_factory.mktemp("poisoned")
    for poison_file in range(12):  # pick a file that lands in train, so some batch carries the byte
        write_corpus(directory, poison_file=poison_file)
        task = tiny_task(directory, task_class=PoisonedByteModel)
        if any(0xFF in path.read_bytes() for path in task.data._split[0]):
            return directory
    raise AssertionError("no poisoned file in the training split")


def test_nonfinite_loss_stops_with_the_step_named(poisoned_corpus, tmp_path, tiny_task):
    task = tiny_task(poisoned_corpus, task_class=PoisonedByteModel)
    bad_step = first_poisoned_step(task)
    with pytest.raises(trainer.NonFiniteLossError, match=rf"non-finite loss at step {bad_step}:"):
        trainer.train(task, workdir=str(tmp_path), steps=bad_step + 5, **RUN)


@pytest.mark.slow  # default-suite time budget: the detection path runs by default in the stop variant
def test_nonfinite_loss_is_skipped_when_configured(poisoned_corpus, tmp_path, tiny_task):
    task = tiny_task(poisoned_corpus, task_class=PoisonedByteModel)
    bad_step = first_poisoned_step(task)
    result = trainer.train(task, workdir=str(tmp_path), steps=bad_step + 2, on_nonfinite="skip", **RUN)
    assert result.final_step == bad_step + 2
    assert np.isnan(result.losses[bad_step]) and np.isfinite(result.losses[bad_step + 1])
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves(result.params))  # the NaN update was not applied
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [bad_step]


def test_metrics_are_written_as_jsonl_tensorboard_and_plot(corpus, tmp_path, capsys, tiny_task):
    result = trainer.train(tiny_task(corpus), workdir=str(tmp_path), steps=4, eval_every=2, progress_bar=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"validation_bits_per_byte", "gzip_bits_per_byte", "xz_bits_per_byte"} <= set(evals[0])
    assert result.evaluations[4]["validation_bits_per_byte"] == evals[1]["validation_bits_per_byte"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "loss.png").stat().st_size > 1000
    output = capsys.readouterr().out
    assert "gzip -9" in output and "xz -9" in output
    assert "Sample (temperature" in output


@pytest.mark.parametrize("bad, message", [(dict(steps=0), "steps"), (dict(on_nonfinite="ignore"), "on_nonfinite"),
                                          (dict(checkpoint_every=-1), "checkpoint_every")])
def test_bad_arguments_are_reported(corpus, tmp_path, bad, message, tiny_task):
    kwargs = dict(steps=2, **RUN) | bad
    with pytest.raises(ValueError, match=message):
        trainer.train(tiny_task(corpus), workdir=str(tmp_path), **kwargs)


def test_checkpoints_of_a_different_model_are_refused_not_discarded(corpus, tmp_path, uninterrupted, tiny_task):
    reference_dir, _ = uninterrupted
    shutil.copytree(reference_dir / "checkpoints", tmp_path / "checkpoints")
    task = tiny_task(corpus)
    wider = dataclasses.replace(task, model=dataclasses.replace(task.model, width=48))
    with pytest.raises(IncompatibleCheckpointError, match="different train state"):
        trainer.train(wider, workdir=str(tmp_path), steps=8, **RUN)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "6"]

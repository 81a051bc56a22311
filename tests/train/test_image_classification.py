"""The image-classification task: quoted baselines re-measured with scikit-learn, the loss, evaluation over the
padded test split (with and without shift averaging), the final report, validation, and a few training steps of
the digits experiment (with the hierarchical size file) through the CLI and the trainer."""

import dataclasses
import math

import gin

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.vit import ViT, vit_config
from train import __main__ as cli
from train import metrics
from train.data.digits import DigitsData
from train.image_classification import BASELINES, ImageClassification

# Tiny and fast to compile; batch 8 divides the 8 fake devices of tests/conftest.py. 450 test images in batches of
# 128 leave a last batch of 66 real images and 62 padding images.
TINY = vit_config("tiny", width=16, depth=1, num_heads=2, mlp_width=24)


@pytest.fixture(scope="module")
def task():
    return ImageClassification(model=TINY, data=DigitsData(batch_size=8, max_shift=1), eval_batch_size=128)


@pytest.fixture(scope="module")
def model():
    model = ViT(TINY, rngs=nnx.Rngs(0))
    # The head starts at zero (every class equally likely); give it weights so that predictions differ.
    model.head_dc[...] = jax.random.normal(jax.random.key(1), model.head_dc.shape)
    return model


def test_quoted_baselines_are_what_scikit_learn_measures_on_this_split():
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    data = DigitsData()
    (train_x, train_y), (test_x, test_y) = data.arrays("train"), data.arrays("test")
    train_x, test_x = train_x.reshape(len(train_x), -1), test_x.reshape(len(test_x), -1)
    measured = {"logistic_regression": LogisticRegression(max_iter=2000), "rbf_svm": SVC(kernel="rbf", gamma=0.256)}
    for name, classifier in measured.items():
        accuracy = np.mean(classifier.fit(train_x, train_y).predict(test_x) == test_y)
        assert round(float(accuracy), 3) == BASELINES[name], (name, accuracy)


def test_loss_is_label_smoothed_cross_entropy_and_accuracy_is_reported(task, model):
    batch = {"image": jnp.asarray(task.data.arrays("train")[0][:8]), "label": jnp.asarray(task.data.arrays(
        "train")[1][:8])}
    loss, metrics = task.loss_fn(model, batch)
    logits = model(batch["image"])
    log_probabilities = jax.nn.log_softmax(logits)
    true = -jnp.take_along_axis(log_probabilities, batch["label"][:, None], axis=1)[:, 0]
    uniform = -log_probabilities.mean(-1)
    np.testing.assert_allclose(loss, jnp.mean(0.9 * true + 0.1 * uniform), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == batch["label"]))


def test_evaluation_covers_the_whole_test_split_once_despite_padding(task, model):
    images, labels = task.data.arrays("test")
    assert len(labels) == 450 and len(task._test_batches[0]) == 4
    probabilities = jax.nn.softmax(model(jnp.asarray(images)))
    results = task.evaluate(model)
    assert set(results) == {"test_accuracy", "test_loss"}
    assert results["test_accuracy"] == pytest.approx(float(np.mean(np.argmax(probabilities, -1) == labels)))
    expected_loss = -np.mean(np.log(np.asarray(probabilities)[np.arange(450), labels]))
    assert results["test_loss"] == pytest.approx(float(expected_loss), rel=1e-4)


def test_zero_head_predicts_uniformly():
    task = ImageClassification(model=TINY, data=DigitsData(batch_size=8))
    results = task.evaluate(ViT(TINY, rngs=nnx.Rngs(0)))
    assert results["test_loss"] == pytest.approx(math.log(10), rel=1e-5)
    assert results["test_accuracy"] == pytest.approx(45 / 450)  # argmax of equal logits is class 0


def test_shift_averaging_is_the_mean_over_all_rolls_and_reported_beside_the_single_view(task, model):
    shifted = dataclasses.replace(task, test_time_shifts=1)
    images, labels = task.data.arrays("test")
    views = [np.roll(images, (dy, dx), axis=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    expected = np.mean([jax.nn.softmax(model(jnp.asarray(view))) for view in views], axis=0)
    np.testing.assert_allclose(shifted.test_probabilities(model, 1), expected, rtol=1e-4, atol=1e-6)
    results = shifted.evaluate(model)
    assert results["test_accuracy"] == task.evaluate(model)["test_accuracy"]
    assert results["test_accuracy_shift_averaged"] == pytest.approx(float(np.mean(expected.argmax(-1) == labels)))
    line = shifted.describe_evaluation(7, results)
    assert "step 7: test accuracy" in line and "averaged over +-1 px shifts" in line
    assert "logistic regression 96.9%" in line and "RBF SVM 99.1%" in line and "450 test images" in line


def test_report_has_the_accuracy_and_a_confusion_matrix_of_every_test_image(task, model):
    report = task.report(model)
    accuracy = task.evaluate(model)["test_accuracy"]
    assert f"Final test accuracy {100 * accuracy:.2f}%" in report
    rows = [line.split() for line in report.splitlines()[3:]]
    assert len(rows) == 10 and sum(int(n) for row in rows for n in row[1:]) == 450


@pytest.mark.parametrize("overrides, message", [
    (dict(model=vit_config("tiny", image_size=16)), r"takes images \(16, 16, 1\) but the digits are \(8, 8, 1\)"),
    (dict(model=vit_config("tiny", num_classes=5)), r"num_classes=5, the digits have 10 classes"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\), got 1.0"),
    (dict(eval_batch_size=0), r"eval_batch_size must be a positive int, got 0"),
    (dict(test_time_shifts=5), r"test_time_shifts must be an int in \[0, 3\], got 5"),
])
def test_bad_task_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ImageClassification(**overrides)


# Slow (~32 s): the CLI path is covered by the quickstart and LLM CLI tests, the hierarchical ViT by tests/models.
@pytest.mark.slow
def test_digits_experiment_with_the_hierarchical_size_file_trains_through_the_cli(tmp_path, capsys):
    bindings = ["STEPS = 2", "BATCH_SIZE = 8", "WIDTH = 8", "DEPTH = 1", "NUM_HEADS = 2", "MLP_WIDTH = 16",
                "PATCH_SIZE = 2", "stage_1/vit.ViTStage.depth = 1", "stage_1/vit.ViTStage.width = 16",
                "stage_1/vit.ViTStage.num_heads = 2", "stage_1/vit.ViTStage.mlp_width = 16",
                "trainer.train.progress_bar = False"]
    argv = ["--gin_file", "configs/experiments/vit_digits.gin",
            "--gin_file", "configs/models/vit/tiny_hierarchical.gin",
            *[arg for binding in bindings for arg in ("--gin_bindings", binding)], "--workdir", str(tmp_path)]
    try:
        assert cli.main(argv) == 0
    finally:
        gin.clear_config()
    output = capsys.readouterr().out
    assert "step 2: test accuracy" in output and "averaged over +-1 px shifts" in output
    assert "Final test accuracy" in output and (tmp_path / "config.gin").exists()
    assert "stage_1/vit.ViTStage" in (tmp_path / "config.gin").read_text()
    records = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all(0 <= r["accuracy"] <= 1 for r in records if r["kind"] == "train")
    (evaluation,) = [r for r in records if r["kind"] == "eval"]
    assert evaluation["step"] == 2 and 0 <= evaluation["test_accuracy_shift_averaged"] <= 1

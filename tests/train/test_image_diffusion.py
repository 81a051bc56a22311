"""The class-conditional diffusion task and its digits classifier: a tiny DiT trains a few steps through
`trainer.train` and finish() writes the sample grid and the numbers; the held-out ε-MSE is the fixed-triple mean;
the loss draws from the step's rng; the Fréchet distance against a direct formula."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from models.dit import DiTConfig
from train import digits_classifier, image_diffusion, trainer
from train.data.digits import DigitsData
from train.optim import OptimizerConfig

# A 1-block DiT with 4 tokens (p=4), batch 8 (divisible by the 8 fake devices of tests/conftest.py), and sampling
# sizes small enough for the suite: 2 DDIM steps, 2 samples of each digit, a classifier trained for 20 steps.
TINY = dict(
    model=DiTConfig(patch_size=4, width=16, depth=1, num_heads=2),
    data=DigitsData(batch_size=8),
    num_timesteps=40,
    eval_repeats=1,
    eval_batch_size=150,
    sampling_steps=2,
    samples_per_class=2,
    grid_columns=2,
    sample_batch_size=20,
    baseline_cfg_scales=(0.0,),
    classifier_steps=20,
)


def build(task):
    return jax.jit(lambda: task.build_model(nnx.Rngs(0)))()  # one compile, not one per initializer


@pytest.fixture(scope="module")
def task():
    return image_diffusion.ClassConditionalDiffusion(**TINY)


# default-suite time budget: the whole digits-DiT experiment (train, sample, score); the loss, samplers and metrics
# have their own tests
@pytest.mark.slow
def test_trains_through_the_trainer_and_finish_writes_grid_and_numbers(task, tmp_path):
    result = trainer.train(task, workdir=str(tmp_path / "run"), steps=3, optimizer=OptimizerConfig(warmup_steps=1),
                           progress_bar=False, async_checkpoints=False)
    assert result.final_step == 3 and all(np.isfinite(list(result.losses.values())))
    assert set(result.evaluations[3]) == {"eval_eps_mse", "eval_vb"}
    # The trainer hands its workdir to finish(), which writes there when output_dir is not set.
    record = json.loads((tmp_path / "run" / image_diffusion.SAMPLES_JSON).read_text())
    assert (tmp_path / "run" / image_diffusion.SAMPLES_PNG).stat().st_size > 1000
    assert record["num_samples"] == 20 and len(record["per_class_accuracy"]) == 10
    assert 0 <= record["accuracy"] <= 1 and record["frechet_distance"] > 0
    assert set(record["baselines"]) == {"cfg_scale_0"}
    assert record["real_train_vs_test_frechet_distance"] > 0


def test_held_out_eps_mse_is_the_mean_over_the_fixed_triples(task):
    model = build(task)  # outputs 0 at initialisation: the ε-MSE is the mean of ε²
    eps = np.concatenate([batch[3][batch[4] > 0] for batch in task._eval_batches])
    results = task.evaluate(model)
    assert len(eps) == len(task.data.arrays("test")[1])
    assert results["eval_eps_mse"] == pytest.approx(float(np.mean(eps.astype(np.float64) ** 2)), rel=1e-5)
    assert task.evaluate(model) == results  # deterministic


def test_loss_draws_timesteps_noise_and_dropout_from_the_step_rng(task):
    model = build(task)
    images, labels = task.data.arrays("train")
    batch = {"image": jnp.asarray(images[:8]), "label": jnp.asarray(labels[:8])}
    loss = jax.jit(lambda rng: task.loss_fn(model, batch, rng))
    first, metrics = loss(jax.random.key(0))
    assert float(first) == float(loss(jax.random.key(0))[0])
    assert float(first) != float(loss(jax.random.key(1))[0])
    assert float(first) == pytest.approx(float(metrics["mse"] + metrics["vb"]), rel=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(sampler="euler"), "sampler='euler'; allowed"),
    (dict(schedule="cosine"), "schedule='cosine'; allowed"),
    (dict(sampling_steps=41), r"sampling_steps must be an int in \[1, num_timesteps=40\]"),
    (dict(model=DiTConfig(input_size=4, patch_size=2)), r"images are \(8, 8, 1\) but DiTConfig expects \(4, 4, 1\)"),
    (dict(model=DiTConfig(num_classes=5)), "labels up to 9 but DiTConfig.num_classes=5"),
])
def test_bad_task_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        image_diffusion.ClassConditionalDiffusion(**{**TINY, **overrides})


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 5))
    b = rng.standard_normal((150, 5)) @ rng.standard_normal((5, 5)) + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b)
                - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
    assert digits_classifier.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert digits_classifier.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


def test_classifier_is_cached_and_deterministic():
    first = digits_classifier.train_classifier(steps=20)
    assert digits_classifier.train_classifier(steps=20) is first
    digits_classifier.train_classifier.cache_clear()
    again = digits_classifier.train_classifier(steps=20)
    for name, value in first.params.items():
        np.testing.assert_array_equal(value, again.params[name])
    images, labels = DigitsData().arrays("test")
    assert first.features(images[:3]).shape == (3, digits_classifier.HIDDEN[-1])
    assert first.accuracy(images, labels) == first.test_accuracy

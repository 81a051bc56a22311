"""Optimizer: warmup + cosine schedule values, global-norm clipping, weight decay on matrices only, bad values."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    config = OptimizerConfig(peak_learning_rate=1.0, warmup_steps=10, final_learning_rate_fraction=0.1)
    schedule = learning_rate_schedule(config, total_steps=110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine midpoint
    assert float(schedule(110)) == pytest.approx(0.1)


def test_warmup_is_shortened_for_runs_shorter_than_it():
    schedule = learning_rate_schedule(OptimizerConfig(peak_learning_rate=1.0, warmup_steps=100), total_steps=3)
    assert float(schedule(2)) == pytest.approx(1.0)


def first_update(config, grads, params):
    tx = make_optimizer(config, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def second_update(config, first_grads, second_grads, params):
    tx = make_optimizer(config, total_steps=10)
    _, state = tx.update(first_grads, tx.init(params), params)
    updates, _ = tx.update(second_grads, state, params)
    return updates["w"]


def test_global_norm_clipping_happens_before_adamw():
    # Adam's first step is scale-invariant, so clipping shows only from the second step on, through the moments.
    params = {"w": jnp.ones((4, 4))}
    huge = {"w": jnp.full((4, 4), 100.0)}
    small = {"w": jnp.linspace(-0.1, 0.1, 16).reshape(4, 4)}
    clipped_huge, _ = optax.clip_by_global_norm(1.0).update(huge, None)
    assert float(optax.tree.norm(clipped_huge)) == pytest.approx(1.0, rel=1e-6)
    clipping = OptimizerConfig(peak_learning_rate=1.0, warmup_steps=0, weight_decay=0.0, clip_global_norm=1.0)
    no_clipping = OptimizerConfig(peak_learning_rate=1.0, warmup_steps=0, weight_decay=0.0, clip_global_norm=None)
    np.testing.assert_allclose(second_update(clipping, huge, small, params),
                               second_update(no_clipping, clipped_huge, small, params), rtol=1e-5)
    assert not np.allclose(second_update(clipping, huge, small, params),
                           second_update(no_clipping, huge, small, params), rtol=1e-3)


def test_weight_decay_applies_to_matrices_not_vectors():
    params = {"w": jnp.ones((3, 3)), "scale": jnp.ones((3,))}
    zero = {"w": jnp.zeros((3, 3)), "scale": jnp.zeros((3,))}
    config = OptimizerConfig(peak_learning_rate=1.0, warmup_steps=0, weight_decay=0.5, clip_global_norm=None)
    updates = first_update(config, zero, params)
    assert float(jnp.abs(updates["w"]).max()) > 0  # decayed although the gradient is zero
    assert float(jnp.abs(updates["scale"]).max()) == 0.0


@pytest.mark.parametrize("overrides, message", [
    (dict(peak_learning_rate=0.0), "peak_learning_rate"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(final_learning_rate_fraction=2.0), "final_learning_rate_fraction"),
    (dict(clip_global_norm=0.0), "clip_global_norm"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**overrides)

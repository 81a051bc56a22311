"""Conditional Cross-Attention Network around a tiny ViT (models/conditional.py), spec vision_mechanisms.md §9(e):
all conditions at once equal one condition at a time, the embeddings do not change when the patch tokens are
permuted, the class token is not among the keys; the digits attributes; the task's loss and evaluation hooks (loss
through the task traced only by default; a few training steps and the test-split evaluation are slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnx.ops.conditional.triplet import conditional_triplet_loss
from models.conditional import ConditionalViT, digit_attributes
from models.vit import vit_config
from nnx_helpers import filled_from_numpy
from train.data.digits import DigitsData
from train.image_classification import ImageClassification

CONFIG = vit_config("tiny", width=8, depth=1, num_heads=2, mlp_width=8, patch_size=2)  # 16 patches + CLS
NAMES = ("class", "parity", "at_least_5")


def test_conditions_batched_equal_the_loop_and_are_invariant_to_patch_order():
    model = filled_from_numpy(lambda: ConditionalViT(CONFIG, rngs=nnx.Rngs(0)), seed=1, scale=0.5)
    images = jnp.asarray(np.random.default_rng(2).random((2, 8, 8, 1)), jnp.float32)
    perm = np.random.default_rng(3).permutation(16)

    @nnx.jit
    def run(model, images):
        _, inter = model.vit(images, return_intermediates=True)
        tokens = model.patch_tokens(images)
        each = [model.embed_tokens(tokens, jnp.full((2,), c)) for c in range(3)]
        return model(images), tokens, inter["encoded"], each, model.embed_tokens(tokens[:, perm], jnp.asarray(
            [[2, 0, 1]] * 2))

    everything, tokens, encoded, each, permuted = run(model, images)
    assert everything.shape == (2, 3, 8) and tokens.shape == (2, 16, 8)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(encoded[:, 1:]))  # the class token is left out
    for c in range(3):
        np.testing.assert_allclose(everything[:, c], each[c], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(permuted, everything[:, [2, 0, 1]], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(everything[:, 0] - everything[:, 1])).max() > 1e-3  # conditions give different spaces


def test_digit_attributes_and_the_loss_hook_through_the_task():
    np.testing.assert_array_equal(np.asarray(digit_attributes(jnp.asarray([0, 3, 5, 8]))),
                                  [[0, 0, 0], [3, 1, 0], [5, 1, 1], [8, 0, 1]])
    task = ImageClassification(model=CONFIG, data=DigitsData(batch_size=8), wrapper=ConditionalViT)
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))  # abstract weights: no init work
    assert isinstance(model, ConditionalViT) and model.kind == "conditional_cross"
    batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32), "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
    loss, metrics = jax.eval_shape(lambda m, b: task.loss_fn(m, b, jax.random.key(0)), model, batch)
    assert loss.shape == () and set(metrics) == {f"triplet_{k}_{n}" for k in ("loss", "accuracy") for n in NAMES}


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="ConditionalViT.attributes"):
        ConditionalViT(CONFIG, attributes="colours", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ConditionalViT.similarity"):
        ConditionalViT(CONFIG, similarity="dot", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ImageClassification.wrapper"):
        ImageClassification(model=CONFIG, wrapper="conditional")


@pytest.mark.slow
def test_triplet_training_lowers_the_loss_and_the_evaluation_hook_scores_the_test_split():
    task = ImageClassification(model=vit_config("tiny", width=16, depth=1, num_heads=2, mlp_width=16, patch_size=2,
                                                pooling="mean"),
                               data=DigitsData(batch_size=8), wrapper=ConditionalViT, eval_batch_size=150)
    model = filled_from_numpy(lambda: task.build_model(nnx.Rngs(0)), seed=0)
    x, y = task.data.arrays("train")
    batch = {"image": jnp.asarray(x[:32]), "label": jnp.asarray(y[:32])}
    graphdef, state = nnx.split(model)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(state, opt_state):
        (loss, metrics), grads = jax.value_and_grad(
            lambda s: task.loss_fn(nnx.merge(graphdef, s), batch, jax.random.key(1)), has_aux=True)(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    opt_state, losses = tx.init(state), []
    for _ in range(8):
        state, opt_state, loss = step(state, opt_state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    model = nnx.merge(graphdef, state)
    results = task.evaluate(model)
    images, labels = task.data.arrays("test")
    embeddings = model(jnp.asarray(images))
    loss, _, accuracy = conditional_triplet_loss(embeddings, digit_attributes(labels), jax.random.key(0))
    assert results["test_triplet_loss"] == pytest.approx(float(loss), rel=1e-4)
    for c, name in enumerate(NAMES):
        assert results[f"test_triplet_accuracy_{name}"] == pytest.approx(float(accuracy[c]), abs=1e-6)
    assert "test_triplet_accuracy_parity" in task.describe_evaluation(4, results)
    assert "Final test metrics" in task.report(model)

"""DCAL around a tiny ViT (models/dcal.py): the SA branch is the plain ViT, GLCA's selection is the class token plus
the top-R patches by rollout and its output equals the dense block's rows there (slow), PWCA with the image as its
own distractor is the SA branch (slow), inference averages the two branches' probabilities and the weighted loss trains
the loss weights, GLCA's own and the shared weights; the task's loss hook pairs each image with another image of the
batch (traced by default; its value and a few training steps are slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models.dcal import DCAL
from models.vit import vit_config
from train.data.digits import DigitsData
from train.image_classification import ImageClassification

CONFIG = vit_config("tiny", width=8, depth=1, num_heads=2, mlp_width=8, patch_size=2)  # 16 patches + CLS


def model_with_random_heads():
    model = DCAL(CONFIG, ratio=0.25, rngs=nnx.Rngs(0))  # R = 4 patches
    # Both heads start at zero (every class equally likely); random heads make the logit comparisons meaningful.
    ks = jax.random.split(jax.random.key(3), 2)
    model.vit.head_dc[...] = jax.random.normal(ks[0], model.vit.head_dc.shape)
    model.glca_head_dc[...] = jax.random.normal(ks[1], model.glca_head_dc.shape)
    return model


def test_branch_shapes_without_compiling():
    """Traced only (jax.eval_shape): the default suite checks the wrapper's wiring; the numbers are the slow tests'."""
    model = nnx.eval_shape(lambda: DCAL(CONFIG, ratio=0.25, rngs=nnx.Rngs(0)))  # abstract weights: no init work
    images = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    out = jax.eval_shape(lambda m, x: m.branches(x), model, images)
    assert out["sa"].shape == out["glca"].shape == (2, 10) and out["selected"].shape == (2, 5)
    assert out["rollout"].shape == (2, 17, 17)
    assert jax.eval_shape(lambda m, x: m.pwca_logits(x, x), model, images).shape == (2, 10)
    loss, parts = jax.eval_shape(lambda m, x: m.loss(x, jnp.zeros((2,), jnp.int32), x), model, images)
    assert loss.shape == () and set(parts) == {"sa_loss", "glca_loss", "pwca_loss"}
    # The image-classification task hands its loss to the model's training_loss hook.
    task = ImageClassification(model=CONFIG, data=DigitsData(batch_size=8), wrapper=DCAL)
    batch = {"image": images, "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
    loss, metrics = jax.eval_shape(lambda m, b: task.loss_fn(m, b, jax.random.key(0)), model, batch)
    assert loss.shape == () and set(metrics) == {"sa_loss", "glca_loss", "pwca_loss", "accuracy", "weight_sa",
                                                 "weight_glca", "weight_pwca"}


@pytest.mark.slow
def test_glca_branch_and_pwca_pair_forward():
    model = model_with_random_heads()
    ks = jax.random.split(jax.random.key(1), 2)
    images, distractors = jax.random.normal(ks[0], (2, 8, 8, 1)), jax.random.normal(ks[1], (2, 8, 8, 1))

    @jax.jit
    def run(model, images, distractors):
        out = model.branches(images)
        x = model.vit.embed(images)  # the input of the last (only) SA block, which GLCA shares
        dense = x + model.glca_attention(model.glca_norm(x))  # every row of the GLCA block's attention
        picked = jnp.take_along_axis(dense, out["selected"][..., None], axis=1)
        picked = picked + model.glca_mlp(model.glca_mlp_norm(picked))
        want_glca = model.glca_final_norm(picked)[:, 0] @ model.glca_head_dc[...] + model.glca_head_bias_c[...]
        return out, model.vit(images), want_glca, model.pwca_logits(images, images), \
            model.pwca_logits(images, distractors)

    out, plain, want_glca, self_pair, pair = run(model, images, distractors)
    np.testing.assert_allclose(out["sa"], plain, atol=1e-5)
    selected = np.asarray(out["selected"])
    assert selected.shape == (2, 5) and np.all(selected[:, 0] == 0)
    for b in range(2):
        top = np.argsort(-np.asarray(out["rollout"][b, 0, 1:]))[:4] + 1
        np.testing.assert_array_equal(np.sort(selected[b, 1:]), np.sort(top))
    np.testing.assert_allclose(out["glca"], want_glca, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(self_pair, plain, atol=1e-4, rtol=1e-4)  # K2 = K1, V2 = V1: self attention
    assert np.abs(np.asarray(pair) - np.asarray(plain)).max() > 1e-3


@pytest.mark.slow
def test_inference_averages_the_branches_and_the_weighted_loss_trains():
    model = model_with_random_heads()
    ks = jax.random.split(jax.random.key(2), 2)
    images, distractors = jax.random.normal(ks[0], (2, 8, 8, 1)), jax.random.normal(ks[1], (2, 8, 8, 1))
    labels = jnp.asarray([3, 7])

    @jax.jit
    def run(model, images, distractors):
        wrt = nnx.DiffState(0, nnx.Any(nnx.PathContains("loss_weights_3"), nnx.PathContains("query_dnh")))
        (loss, parts), grads = nnx.value_and_grad(
            lambda m: m.loss(images, labels, distractors), argnums=wrt, has_aux=True)(model)
        return model.branches(images), model(images), loss, parts, grads

    out, combined, loss, parts, grads = run(model, images, distractors)
    want = np.log((jax.nn.softmax(out["sa"]) + jax.nn.softmax(out["glca"])) / 2)
    np.testing.assert_allclose(combined, want, atol=1e-5)
    losses = np.asarray([parts["sa_loss"], parts["glca_loss"], parts["pwca_loss"]])
    np.testing.assert_allclose(loss, 0.5 * losses.sum(), rtol=1e-5)  # w = 0 at the start
    np.testing.assert_allclose(grads.loss_weights_3[...], 0.5 * (1 - losses), rtol=1e-4, atol=1e-6)
    for g in (grads.glca_attention.query_dnh[...], grads.vit.stages[0].blocks[0].attention.query_dnh[...]):
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0  # GLCA's own and the shared SA/PWCA weights


def test_unsupported_backbones_are_refused():
    with pytest.raises(ValueError, match="pooling='cls'"):
        DCAL(vit_config("tiny", pooling="mean"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="glca.ratio"):
        DCAL(CONFIG, ratio=0.0, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_training_with_in_batch_distractors_lowers_the_loss():
    task = ImageClassification(model=CONFIG, data=DigitsData(batch_size=8), wrapper=DCAL)
    model = model_with_random_heads()
    x, y = task.data.arrays("train")
    batch = {"image": jnp.asarray(x[:8]), "label": jnp.asarray(y[:8])}
    graphdef, state = nnx.split(model)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(state, opt_state, rng):
        (loss, metrics), grads = jax.value_and_grad(
            lambda s: task.loss_fn(nnx.merge(graphdef, s), batch, rng), has_aux=True)(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss, metrics

    # The hook's distractors are the batch rolled by a shift in 1..B-1 drawn from the step's rng.
    rng = jax.random.key(5)
    shift = int(jax.random.randint(rng, (), 1, 8))
    hook, _ = jax.jit(lambda s: task.loss_fn(nnx.merge(graphdef, s), batch, rng))(state)
    want, _ = jax.jit(lambda s: nnx.merge(graphdef, s).loss(batch["image"], batch["label"], jnp.roll(
        batch["image"], -shift, axis=0), label_smoothing=task.label_smoothing))(state)
    np.testing.assert_allclose(hook, want, rtol=1e-5)
    opt_state, losses = tx.init(state), []
    for i in range(5):
        state, opt_state, loss, metrics = step(state, opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert 0 <= float(metrics["accuracy"]) <= 1

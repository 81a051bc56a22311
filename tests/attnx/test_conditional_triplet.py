"""The per-attribute triplet loss of the Conditional Cross-Attention Network (attnx/ops/conditional/triplet.py): zero
when the margin holds, the hinge against numpy when it does not, gradients that pull the positive in and push the
negative away, in-batch triplets that respect the attributes, and the per-condition loss and accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.ops.conditional.triplet import conditional_triplet_loss, sample_triplets, similarity, triplet_loss


def cosine(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_zero_when_the_margin_holds_and_the_hinge_otherwise():
    e = np.eye(4, dtype=np.float32)
    rng = np.random.default_rng(0)
    a, p, n = (rng.standard_normal((5, 6)).astype(np.float32) for _ in range(3))
    run = jax.jit(lambda e, a, p, n: (
        # anchor = positive, negative orthogonal: cosine 1 vs 0 (margin 0.2 holds), squared distance 0 vs 2 (1 holds)
        triplet_loss(e[0], e[0], e[1]), triplet_loss(e[0], e[0], e[1], kind="euclidean", margin=1.0),
        triplet_loss(a, p, n, margin=0.3), triplet_loss(a, p, n, margin=0.3, kind="euclidean")))
    held_cosine, held_euclidean, hinge, hinge_euclidean = run(e, a, p, n)
    assert float(held_cosine) == 0.0 and float(held_euclidean) == 0.0
    want = np.maximum(0, 0.3 - cosine(a, p) + cosine(a, n))
    assert np.any(want > 0)  # active hinges, so the formula is exercised
    np.testing.assert_allclose(hinge, want, rtol=1e-5, atol=1e-6)
    want_euclid = np.maximum(0, 0.3 + np.sum((a - p) ** 2, -1) - np.sum((a - n) ** 2, -1))
    np.testing.assert_allclose(hinge_euclidean, want_euclid, rtol=1e-5)


def test_gradient_pulls_the_positive_in_and_pushes_the_negative_away():
    a = jnp.asarray([1.0, 0.0, 0.0])
    p = jnp.asarray([0.0, 1.0, 0.0])  # cosine 0 to the anchor
    n = jnp.asarray([0.6, 0.8, 0.0])  # cosine 0.6: closer than the positive, the hinge is active
    far = jnp.asarray([0.0, 0.0, 1.0])

    @jax.jit
    def run(a, p, n, far):
        out = {}
        for kind in ("cosine", "euclidean"):
            grad_p, grad_n = jax.grad(lambda p, n: triplet_loss(a, p, n, kind=kind), (0, 1))(p, n)
            # similarities before and after a gradient-descent step of 0.01
            out[kind] = [similarity(a, x, kind) for x in (p, p - 0.01 * grad_p, n, n - 0.01 * grad_n)]
        return out, jax.grad(lambda n: triplet_loss(a, a, n))(far)

    moved, inactive = run(a, p, n, far)
    for kind, (p_before, p_after, n_before, n_after) in moved.items():
        assert p_after > p_before and n_after < n_before, kind  # positive pulled in, negative pushed away
    np.testing.assert_array_equal(np.asarray(inactive), 0.0)  # inactive hinge: no gradient at all


def test_in_batch_triplets_respect_the_attributes_and_the_loss_is_per_condition():
    attributes = np.asarray([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [0, 1]])  # value 2 of condition 0 is alone
    embeddings = np.random.default_rng(1).standard_normal((6, 2, 5)).astype(np.float32)
    run = jax.jit(lambda e, a, rng: (sample_triplets(a, rng), conditional_triplet_loss(e, a, rng, margin=0.5)))
    (positive, negative, valid), (loss, per_condition, accuracy) = run(embeddings, attributes, jax.random.key(3))
    positive, negative, valid = map(np.asarray, (positive, negative, valid))
    B, C = attributes.shape
    for b in range(B):
        for c in range(C):
            if valid[b, c]:
                assert positive[b, c] != b and attributes[positive[b, c], c] == attributes[b, c]
                assert attributes[negative[b, c], c] != attributes[b, c]
    assert not valid[4, 0] and valid[4, 1]  # no other image shares value 2 of condition 0
    hinge = np.zeros((B, C))
    correct = np.zeros((B, C), bool)
    for b in range(B):
        for c in range(C):
            e = embeddings[:, c]
            s_p, s_n = cosine(e[b], e[positive[b, c]]), cosine(e[b], e[negative[b, c]])
            hinge[b, c], correct[b, c] = max(0.0, 0.5 - s_p + s_n), s_p > s_n
    want = [hinge[valid[:, c], c].mean() for c in range(C)]
    np.testing.assert_allclose(per_condition, want, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
    np.testing.assert_allclose(accuracy, [correct[valid[:, c], c].mean() for c in range(C)], rtol=1e-6)


def test_bad_arguments_are_named():
    x = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="triplet_loss.margin"):
        triplet_loss(x, x, x, margin=-1.0)
    with pytest.raises(ValueError, match="triplet.similarity"):
        triplet_loss(x, x, x, kind="dot")
    with pytest.raises(ValueError, match="sample_triplets.attributes"):
        sample_triplets(jnp.zeros((3,), jnp.int32), jax.random.key(0))
    with pytest.raises(ValueError, match="conditional_triplet_loss.embeddings"):
        conditional_triplet_loss(jnp.zeros((3, 2, 4)), jnp.zeros((3, 1), jnp.int32), jax.random.key(0))

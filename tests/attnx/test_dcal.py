"""DCAL (spec vision_mechanisms.md §8(e)): rollout of identity maps is I and equals the loop of products; GLCA equals
the rows of dense cross attention gathered at the top-R selection (fast path vs reference, forward and gradients);
PWCA with K2 = K1, V2 = V1 or with the distractor masked out is self attention; PWCA vs its two-block reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.dcal.dcal import (attention_rollout, glca, glca_attention, glca_reference, num_selected, pwca,
                                 pwca_attention, pwca_reference, rollout_reference, rollout_scores)
from attnx.testing.tolerances import assert_close

B, T, S, S2, N, K, H, V = 2, 6, 7, 5, 4, 2, 8, 6


def qkv(seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
            jax.random.normal(ks[2], (B, S, K, V)), jax.random.normal(ks[3], (B, S2, K, H)),
            jax.random.normal(ks[4], (B, S2, K, V)), jax.random.normal(ks[5], (B, T)))


def test_rollout_of_identities_is_identity_and_equals_the_product_loop():
    eye = jnp.broadcast_to(jnp.eye(T), (3, B, N, T, T))
    maps = jax.nn.softmax(jax.random.normal(jax.random.key(1), (3, B, N, T, T)), axis=-1)
    run = jax.jit(lambda eye, maps: (attention_rollout(eye), attention_rollout(maps),
                                     rollout_reference(list(maps)), attention_rollout(list(maps[:2]))))
    identity, rollout, loop, two = map(np.asarray, run(eye, maps))
    np.testing.assert_allclose(identity, np.broadcast_to(np.eye(T), (B, T, T)), atol=1e-6)
    np.testing.assert_allclose(rollout, loop, atol=1e-6)
    # Later blocks multiply on the left: two blocks are S̄_2 S̄_1, not S̄_1 S̄_2.
    bar = [0.5 * np.asarray(m).mean(1) + 0.5 * np.eye(T) for m in maps[:2]]
    np.testing.assert_allclose(two, bar[1] @ bar[0], atol=1e-6)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-5)  # products of row-stochastic maps stay so
    scores = np.asarray(rollout_scores(jnp.asarray(rollout)))
    assert np.all(np.isneginf(scores[:, 0])) and np.allclose(scores[:, 1:], rollout[:, 0, 1:])


def test_glca_is_the_dense_rows_at_the_top_r_selection_with_gradients():
    q, k, v, _, _, scores = qkv()
    ratio = 0.5  # R = 3 of 6 rows

    @jax.jit
    def run(q, k, v, scores):
        rows, chosen = glca(q, k, v, scores, ratio=ratio)
        loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, scores=scores, ratio=ratio)))
        return (rows, chosen, glca_attention(q, k, v, scores=scores, ratio=ratio),
                glca_reference(q, k, v, scores=scores, ratio=ratio),
                jax.grad(loss(glca_attention), (0, 1, 2))(q, k, v), jax.grad(loss(glca_reference), (0, 1, 2))(q, k, v))

    rows, chosen, scattered, reference, grads, want = run(q, k, v, scores)
    assert rows.shape == (B, 3, N, V)
    for b in range(B):
        top = np.argsort(-np.asarray(scores[b]))[:3]
        np.testing.assert_array_equal(np.asarray(chosen[b]), top)
        assert_close(rows[b], reference[b, top], jnp.float32)  # the reference's rows are dense attention's
        others = np.setdiff1d(np.arange(T), top)
        np.testing.assert_array_equal(np.asarray(scattered[b, others]), 0.0)
    assert_close(scattered, reference, jnp.float32)
    for g, w in zip(grads, want):
        assert_close(g, w, jnp.float32, kind="gradient")


def test_pwca_with_a_copy_or_a_masked_distractor_is_self_attention():
    q, k, v, dk, dv, _ = qkv(2)
    own_keys = jnp.broadcast_to(jnp.arange(S + S2) < S, (T, S + S2))

    @jax.jit
    def run(q, k, v, dk, dv):
        return (pwca(q, k, v, k, v), pwca(q, k, v, dk, dv, mask=attnx.Mask(dense=own_keys)),
                attnx.get_attention("softmax").fn(q, k, v))

    copy, masked, sa = run(q, k, v, dk, dv)
    assert_close(copy, sa, jnp.float32)
    assert_close(masked, sa, jnp.float32)


def test_pwca_matches_its_two_block_reference_with_gradients_and_pairs_within_the_batch():
    q, k, v, dk, dv, _ = qkv(3)

    @jax.jit
    def run(q, k, v, dk, dv):
        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a[:3], distractor_key=a[3], distractor_value=a[4])))
        return (pwca_attention(q, k, v, distractor_key=dk, distractor_value=dv),
                pwca_reference(q, k, v, distractor_key=dk, distractor_value=dv),
                pwca_attention(q, k, v), pwca(q, k, v, jnp.roll(k, -1, 0), jnp.roll(v, -1, 0)),
                jax.grad(loss(pwca_attention), range(5))(q, k, v, dk, dv),
                jax.grad(loss(pwca_reference), range(5))(q, k, v, dk, dv))

    fast, reference, paired, want_paired, grads, want = run(q, k, v, dk, dv)
    assert_close(fast, reference, jnp.float32)
    assert_close(paired, want_paired, jnp.float32)  # sample b's distractor is sample b + 1
    for g, w in zip(grads, want):
        assert_close(g, w, jnp.float32, kind="gradient")


def test_bad_arguments_are_named():
    q, k, v, dk, dv, scores = qkv()
    with pytest.raises(ValueError, match="glca.ratio"):
        num_selected(T, 0.0)
    assert num_selected(10, 0.3) == 3 and num_selected(10, 0.31) == 4 and num_selected(3, 0.1) == 1
    with pytest.raises(ValueError, match="glca.scores: needed"):
        glca_attention(q, k, v, ratio=0.5)
    with pytest.raises(ValueError, match="glca.scores: expected"):
        glca_attention(q, k, v, scores=scores[:, :3], ratio=0.5)
    with pytest.raises(ValueError, match="causal=True is not supported"):
        glca_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="causal=True is not supported"):
        pwca_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="give both"):
        pwca_attention(q, k, v, distractor_key=dk)
    with pytest.raises(ValueError, match="pwca.distractor_key"):
        pwca_attention(q, k, v, distractor_key=dk[..., :4], distractor_value=dv)
    with pytest.raises(ValueError, match="no batch axis"):
        pwca_attention(q[0], k[0], v[0])

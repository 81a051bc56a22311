"""Performer / FAVOR+: prefix-sum form = quadratic form (forward and gradients, also for the large-norm keys that
made MQAR training NaN), causality of the per-row key stabiliser, the last causal row = the official (global max)
feature map, the estimate converges to softmax attention as features grow, the cached decode rule, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.linear.performer import orthogonal_features, performer_attention, performer_decode
from attnx.testing.tolerances import assert_close

B, T, S, N, K, H, V = 2, 37, 23, 6, 2, 8, 5

# One jitted function for every case (compiled once per shape and option set, not op by op).
attend = jax.jit(performer_attention, static_argnames=("causal", "block_size", "implementation", "num_features"))


def inputs(kv_length=T, scale=1.0, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (scale * jax.random.normal(kq, (B, T, N, H)), scale * jax.random.normal(kk, (B, kv_length, K, H)),
            jax.random.normal(kv, (B, kv_length, K, V)))


def large_norm_keys():
    """Causal inputs on which the eps-free, whole-sequence-max stabiliser gave NaN: a few late keys of norm ~100
    push the key max so high that every early key's features underflow to 0, and early rows became 0/0."""
    q, k, v = inputs()
    return q, k.at[:, 30:].multiply(40.0), v


@pytest.mark.parametrize("causal, kv_length", [(True, T), (False, T), (False, S)], ids=["CS", "NS", "NC"])
def test_chunked_equals_quadratic(causal, kv_length):
    q, k, v = inputs(kv_length)
    assert_close(attend(q, k, v, causal=causal, block_size=8),
                 attend(q, k, v, causal=causal, implementation="reference"), jnp.float32)


def test_large_norm_keys_stay_finite_and_forms_agree():
    q, k, v = large_norm_keys()
    fast = attend(q, k, v, causal=True, block_size=8)
    reference = attend(q, k, v, causal=True, implementation="reference")
    assert bool(jnp.all(jnp.isfinite(fast))) and bool(jnp.all(jnp.isfinite(reference)))
    assert_close(fast, reference, jnp.float32)


@pytest.mark.parametrize("implementation", ["chunked", "reference"])
def test_later_keys_cannot_change_earlier_rows(implementation):
    """The key stabiliser of row t is the max over keys j <= t, so (with eps, which does not cancel) a huge later
    key leaves every earlier row exactly as it was; a whole-sequence max would shift them all."""
    q, k, v = inputs()
    _, changed_k, _ = large_norm_keys()
    options = dict(causal=True, implementation=implementation, **({"block_size": 8} if implementation == "chunked"
                                                                   else {}))  # the shapes compiled above
    before = attend(q, k, v, **options)
    after = attend(q, changed_k, v.at[:, 30:].set(7.0), **options)
    assert_close(after[:, :30], before[:, :30], jnp.float32)
    assert float(jnp.max(jnp.abs(after[:, 30:] - before[:, 30:]))) > 0.1  # the later rows do see the change


def test_last_causal_row_uses_the_official_whole_sequence_stabiliser():
    q, k, v = inputs()
    assert_close(attend(q, k, v, causal=True, block_size=8)[:, -1],
                 attend(q, k, v, causal=False, block_size=8)[:, -1], jnp.float32)


# Slow (~24 s): a statistical check over many feature counts; the estimator's paths are checked against the
# reference in the default tests.
@pytest.mark.slow
def test_orthogonal_blocks_and_convergence_to_softmax():
    w = orthogonal_features(jax.random.key(0), 20, H)
    gram = np.asarray(w[:H] @ w[:H].T)
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)  # orthogonal within a block
    q, k, v = inputs(scale=0.5)
    exact = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True))
    errors = [float(jnp.mean(jnp.abs(performer_attention(q, k, v, causal=True, num_features=m, seed=1) - exact)))
              for m in (64, 16384)]
    assert errors[1] < 0.25 * errors[0] and errors[1] < 0.005, errors


@functools.partial(jax.jit, static_argnames="implementation")
def _gradients(q, k, v, cotangent, implementation):
    def loss(*a):
        return jnp.sum(cotangent * performer_attention(*a, causal=True, block_size=8, implementation=implementation))

    return jax.grad(loss, (0, 1, 2))(q, k, v)


@pytest.mark.parametrize("case", ["unit", "large_norm_keys"])
def test_gradients_match_the_reference(case):
    primals = inputs() if case == "unit" else large_norm_keys()
    cotangent = jax.random.normal(jax.random.key(9), (B, T, N, V))
    fast, reference = _gradients(*primals, cotangent, "chunked"), _gradients(*primals, cotangent, "reference")
    for name, g, w in zip(("query", "key", "value"), fast, reference):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert_close(g, w, jnp.float32, "gradient", what=name)


def test_cache_decode_equals_the_last_rows():
    q, k, v = large_norm_keys()  # the late large keys make each row's stabiliser differ: the decode must track it
    full = attend(q, k, v, causal=True, block_size=8)
    cache_k = jnp.zeros((B, T + 2, K, H)).at[:, :T].set(k)
    cache_v = jnp.zeros((B, T + 2, K, V)).at[:, :T].set(v)
    rows = jax.jit(performer_decode)(q[:, 26:32], cache_k, cache_v, query_positions=jnp.arange(26, 32))
    assert_close(rows, full[:, 26:32], jnp.float32)


def test_bad_arguments_are_named():
    q, k, v = inputs(S)
    with pytest.raises(ValueError, match="causal attention needs self attention"):
        performer_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"features: expected \[m, H\] with H = 8"):
        performer_attention(q, k, v, features=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="num_features: expected an int >= 1"):
        performer_attention(q, k, v, num_features=0)

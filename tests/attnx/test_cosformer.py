"""cosFormer: the linear [cos, sin] factorisation equals the quadratic re-weighted form (self and cross, GQA),
gradients match, the weights follow cos(pi (i - j) / 2M), and causal use is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.ops.linear.cosformer import cosformer_attention
from attnx.testing.tolerances import assert_close

B, T, S, N, K, H, V = 2, 9, 14, 6, 2, 8, 5


def inputs(kv_length):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, kv_length, K, H)),
            jax.random.normal(kv, (B, kv_length, K, V)))


@pytest.mark.parametrize("kv_length", [T, S], ids=["NS", "NC"])
def test_linear_form_equals_quadratic_form_with_gradients(kv_length):
    q, k, v = inputs(kv_length)
    assert_close(cosformer_attention(q, k, v), cosformer_attention(q, k, v, implementation="reference"), jnp.float32)
    loss = lambda impl: (lambda *a: jnp.sum(jnp.sin(cosformer_attention(*a, implementation=impl))))
    for g, w in zip(jax.grad(loss("linear"), (0, 1, 2))(q, k, v), jax.grad(loss("reference"), (0, 1, 2))(q, k, v)):
        assert_close(g, w, jnp.float32, "gradient")


def test_weights_are_relu_scores_times_the_cosine_of_the_distance():
    q, k, v = (np.asarray(x, np.float64) for x in inputs(S))
    period = max(T, S)
    scores = np.einsum("btnh,bsnh->bnts", np.maximum(q, 0), np.repeat(np.maximum(k, 0), N // K, axis=2))
    scores *= np.cos(np.pi * (np.arange(T)[:, None] - np.arange(S)[None, :]) / (2 * period))
    expected = np.einsum("bnts,bsnv->btnv", scores, np.repeat(v, N // K, axis=2)) / scores.sum(-1).transpose(0, 2, 1)[
        ..., None]
    np.testing.assert_allclose(cosformer_attention(*inputs(S)), expected, rtol=2e-5, atol=2e-5)


def test_causal_use_is_refused_by_name():
    with pytest.raises(ValueError, match="non-causal attention only"):
        cosformer_attention(*inputs(T), causal=True)

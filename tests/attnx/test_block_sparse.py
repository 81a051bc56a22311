"""block_sparse: the registry entry over Mask(block_mask=...): equals softmax with the expanded dense mask, in the
reference and the block-skipping chunked path, with gradients; dead rows return 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.testing.tolerances import assert_close

B, T, S, N, K, H = 2, 11, 13, 4, 2, 8


# Slow (~19 s on the CI machine): the conformance suite's block_mask case checks the same chunked block skipping
# (forward, lse, gradients, jvp) against the expanded mask; this adds the registry entry and dead rows.
@pytest.mark.slow
def test_equals_softmax_with_the_expanded_mask_and_gradients_match():
    kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, S, K, H)),
               jax.random.normal(kv, (B, S, K, H)))
    block_mask = jax.random.bernoulli(km, 0.6, (B, N, 3, 4)).at[:, :, 0, :].set(False)  # first query block dead
    dense = jnp.repeat(jnp.repeat(block_mask, 4, axis=2), 4, axis=3)[:, :, :T, :S]
    spec = attnx.get_attention("block_sparse")
    expected = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(dense=dense), implementation="reference")
    for implementation in ("reference", attnx.Chunked(4, 4)):
        out = spec.fn(q, k, v, block_mask=block_mask, block_size=(4, 4), implementation=implementation)
        assert_close(out, expected, jnp.float32, what=str(implementation))
    np.testing.assert_array_equal(out[:, :4], 0.0)  # rows whose blocks are all dead

    def loss(implementation):
        return lambda q, k, v: jnp.sum(jnp.sin(spec.fn(q, k, v, block_mask=block_mask, block_size=(4, 4),
                                                      implementation=implementation)))

    got = jax.grad(loss(attnx.Chunked(4, 4)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss("reference"), (0, 1, 2))(q, k, v)
    for name, g, w in zip(("query", "key", "value"), got, want):
        assert_close(g, w, jnp.float32, "gradient", what=name)

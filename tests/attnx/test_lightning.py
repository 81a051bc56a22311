"""Lightning Attention-2 (spec llm_mechanisms.md §3 (e)): chunked = quadratic reference (ragged T, GQA, bf16),
s = 0 is plain causal linear attention, gradients and jvp match, the recurrent and cached decodes equal the parallel
output, ALiBi/TNL slopes, and errors that name the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.linear.decay import alibi_slopes, tnl_slopes
from attnx.ops.linear.lightning import (lightning_attention, lightning_decode, lightning_decode_step,
                                        lightning_init_state)
from attnx.testing.tolerances import assert_close

# B=2, T=37 (ragged against every block size below), N=6 query heads over K=2 kv heads, H=8, V=5.
B, T, N, K, H, V = 2, 37, 6, 2, 8, 5


def inputs(dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H)) * H**-0.5
    k = jax.random.normal(kk, (B, T, K, H))
    v = jax.random.normal(kv, (B, T, K, V))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def reference(q, k, v, **kwargs):
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    return lightning_attention(*upcast, implementation="reference", **kwargs)


@pytest.mark.parametrize("block_size", [1, 8, 16, 64])
def test_chunked_equals_the_quadratic_reference(block_size):
    q, k, v = inputs()
    assert_close(lightning_attention(q, k, v, block_size=block_size), reference(q, k, v), jnp.float32,
                 what=f"block {block_size}")


def test_non_causal_form_has_symmetric_decay():
    q, k, v = inputs()
    out = lightning_attention(q, k, v, causal=False, block_size=8)
    assert_close(out, reference(q, k, v, causal=False), jnp.float32)
    s = jnp.asarray(alibi_slopes(N))
    distance = jnp.abs(jnp.arange(T)[:, None] - jnp.arange(T)[None, :])
    weights = jnp.exp(-s[:, None, None] * distance)  # [N, T, T]
    kr, vr = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
    expected = jnp.einsum("nts,btnh,bsnh,bsnv->btnv", weights, q, kr, vr)
    assert_close(out, expected, jnp.float32)


def test_bfloat16_inputs_within_the_table():
    q, k, v = inputs(jnp.bfloat16)
    out = lightning_attention(q, k, v, block_size=16)
    assert out.dtype == jnp.bfloat16
    assert_close(out, reference(q, k, v), jnp.bfloat16)


def test_zero_slopes_give_plain_causal_linear_attention():
    q, k, v = (np.asarray(x, np.float64) for x in inputs())
    group = N // K
    expected = np.zeros((B, T, N, V))
    for n in range(N):
        state = np.zeros((B, H, V))
        for t in range(T):
            state += k[:, t, n // group, :, None] * v[:, t, n // group, None, :]
            expected[:, t, n] = np.einsum("bh,bhv->bv", q[:, t, n], state)
    out = lightning_attention(*inputs(), slopes=jnp.zeros(N), block_size=8)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)


def test_gradients_including_slopes_match_the_reference():
    q, k, v = inputs()
    slopes = jnp.asarray(alibi_slopes(N))
    cotangent = jax.random.normal(jax.random.key(9), (B, T, N, V))

    def loss(implementation):
        return lambda q, k, v, s: jnp.sum(cotangent * lightning_attention(
            q, k, v, slopes=s, block_size=8, implementation=implementation))

    got = jax.grad(loss("chunked"), argnums=(0, 1, 2, 3))(q, k, v, slopes)
    want = jax.grad(loss("reference"), argnums=(0, 1, 2, 3))(q, k, v, slopes)
    for name, g, w in zip(("query", "key", "value", "slopes"), got, want):
        assert_close(g, w, jnp.float32, "gradient", what=name)


def test_forward_mode_matches_the_reference():
    primals = inputs()
    tangents = inputs(seed=1)
    _, got = jax.jvp(lambda *a: lightning_attention(*a, block_size=8), primals, tangents)
    _, want = jax.jvp(lambda *a: reference(*a), primals, tangents)
    assert_close(got, want, jnp.float32, "gradient", what="jvp")


def test_recurrent_decode_equals_the_parallel_output():
    q, k, v = inputs()
    full = lightning_attention(q, k, v)
    state = lightning_init_state((B,), N, H, V)
    steps = []
    for t in range(T):
        out, state = lightning_decode_step(state, q[:, t], k[:, t], v[:, t])
        steps.append(out)
    assert_close(jnp.stack(steps, axis=1), full, jnp.float32, what="recurrent decode")


def test_cache_decode_equals_the_last_rows():
    q, k, v = inputs()
    full = lightning_attention(q, k, v)
    cache_k = jnp.zeros((B, T + 3, K, H)).at[:, :T].set(k)  # slots past the queries are ignored
    cache_v = jnp.zeros((B, T + 3, K, V)).at[:, :T].set(v)
    positions = jnp.arange(T - 4, T)
    rows = lightning_decode(q[:, T - 4 :], cache_k, cache_v, query_positions=positions)
    assert_close(rows, full[:, T - 4 :], jnp.float32, what="cache decode")


def test_alibi_and_tnl_slopes():
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
    # Not a power of two: the 4-head slopes, then every other 8-head slope (ALiBi's rule).
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rtol=1e-6)
    np.testing.assert_allclose(tnl_slopes(8, 0, 4), alibi_slopes(8) * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(tnl_slopes(8, 3, 4), alibi_slopes(8) * 1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer_index"):
        tnl_slopes(8, 4, 4)


def test_registered_with_its_pattern_and_decode_rule():
    spec = attnx.get_attention("lightning")
    assert spec.patterns == frozenset({"NS", "CS"}) and spec.decode is lightning_decode
    assert "2405.17381" in spec.paper


@pytest.mark.parametrize("kwargs, message", [
    (dict(slopes=jnp.ones(3)), r"slopes: expected a float array of shape \[N\] = \(6,\)"),
    (dict(slopes=-jnp.ones(N)), "decay rates must be >= 0"),
    (dict(implementation="pallas"), "implementation: 'pallas'; allowed"),
    (dict(block_size=0), "block_size: expected an int >= 1"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lightning_attention(*inputs(), **kwargs)


def test_cross_attention_is_refused():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="self attention only"):
        lightning_attention(q, k[:, :5], v[:, :5])

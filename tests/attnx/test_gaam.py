"""GAAM (spec llm_mechanisms.md §10 (e)): weights sum to 1 per chunk, c -> inf gives x / n, parity with the
official code's formula written out in numpy on fixed tensors, the causal (prefix) form against its loop oracle,
and the attention entry (queries, keys and values re-weighted by stacked GaussianBlocks, padding from the mask's
lengths in the statistics, softmax after) against the formula and an explicit per-head composition, with gradients
and the cached decode."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.gaussian.attention import gaam_attention, gaam_decode, reweight_values
from attnx.ops.gaussian.gaam import gaam, gaam_reference
from attnx.testing.tolerances import assert_close

B, T, S, K, N, H = 2, 7, 9, 2, 4, 8


def params(heads, g=3, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return 0.3 * jax.random.normal(k1, (heads, g)), jnp.exp(0.5 * jax.random.normal(k2, (heads, g)))


def numpy_code_formula(x, delta, c, axis, num_heads, eps=1e-8, valid=None):
    """GaussianBlock.py's MultiHeadGaussianAdaptiveAttention forward, transcribed to numpy (float64)."""
    x = np.asarray(x, np.float64)
    xs = np.moveaxis(x, axis, -1)
    vs = None if valid is None else np.moveaxis(np.asarray(valid), axis, -1)
    n, size = xs.shape[-1], xs.shape[-1] // num_heads
    outs = []
    for h in range(num_heads):
        sl = slice(h * size, n if h == num_heads - 1 else (h + 1) * size)
        chunk = xs[..., sl]
        masked = chunk if vs is None else np.where(vs[..., sl], chunk, 0.0)
        mean = masked.mean(-1, keepdims=True)
        var = masked.var(-1, ddof=1, keepdims=True) + eps
        mix = 1.0
        for g in range(delta.shape[1]):
            y = (chunk - (mean + delta[h, g])) / np.sqrt(var)
            mix = mix * np.exp(-(y**2) / (2.0 * c[h, g] ** 2)) / np.sqrt(2 * math.pi * c[h, g] ** 2)
        mix = mix / np.maximum(mix.sum(-1, keepdims=True), eps)
        outs.append(chunk * mix if vs is None else np.where(vs[..., sl], chunk * mix, chunk))
    return np.moveaxis(np.concatenate(outs, -1), -1, axis)


def test_formula_parity_with_the_code_on_fixed_tensors():
    x = jax.random.normal(jax.random.key(0), (2, 11, 5))
    delta, c = params(3)
    valid = np.asarray(jax.random.uniform(jax.random.key(2), x.shape) > 0.25)
    cases = ((1, 3, None), (-1, 2, None), (1, 3, valid))
    outputs = jax.jit(lambda x: [gaam(x, delta[:h], c[:h], axis=a, num_heads=h, mask=m) for a, h, m in cases])(x)
    for (axis, heads, mask), got in zip(cases, outputs):
        want = numpy_code_formula(x, np.asarray(delta[:heads]), np.asarray(c[:heads]), axis, heads, valid=mask)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    # padded entries pass through unchanged
    np.testing.assert_array_equal(np.asarray(outputs[-1])[~valid], np.asarray(x)[~valid])


def test_weights_sum_to_one_per_chunk_and_large_c_gives_x_over_n():
    x = jax.random.normal(jax.random.key(3), (2, 10, 3))
    delta, c = params(2)
    _, w = jax.jit(lambda x: gaam(x, delta, c, axis=1, num_heads=2, return_weights=True))(x)
    np.testing.assert_allclose(np.asarray(w[:, :5].sum(1)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w[:, 5:].sum(1)), 1.0, rtol=1e-5)
    # One Gaussian: with G of them the flat product (2 pi c^2)^(-G/2) drops under the code's eps clamp of the
    # normaliser long before the shape flattens, which is the code's behaviour too.
    y = jax.jit(lambda x: gaam(x, delta[:, :1], jnp.full_like(c[:, :1], 1e3), axis=1, num_heads=2))(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) / 5.0, rtol=1e-4, atol=1e-7)


def test_causal_form_is_the_last_row_of_every_prefix():
    x = jax.random.normal(jax.random.key(4), (2, 9, 3))
    delta, c = params(2)
    valid = np.asarray(jax.random.uniform(jax.random.key(5), x.shape) > 0.2)
    options = dict(axis=1, num_heads=2, causal=True)
    got = jax.jit(lambda x, m: gaam(x, delta, c, mask=m, **options))(x, valid)
    assert_close(got, jax.jit(lambda x, m: gaam_reference(x, delta, c, mask=m, **options))(x, valid), jnp.float32)
    # row t of the causal form on one chunk equals the non-causal GAAM of the prefix 0..t
    one = jax.jit(lambda x: gaam(x, delta[:1], c[:1], axis=1, num_heads=1, causal=True))(x)
    for t in (1, 8):
        assert_close(one[:, t], gaam(x[:, : t + 1], delta[:1], c[:1], axis=1, num_heads=1)[:, t], jnp.float32)


def qkv(s=T):
    keys = jax.random.split(jax.random.key(6), 3)
    return (jax.random.normal(keys[0], (B, T, N, H)), jax.random.normal(keys[1], (B, s, K, H)),
            jax.random.normal(keys[2], (B, s, K, H)))


def test_residual_off_and_the_feature_axis():
    _, _, v = qkv()
    delta, c = params(K)
    plain, residual = jax.jit(lambda v: [reweight_values(v, delta, c, residual=r, axis="feature")
                                         for r in (False, True)])(v)
    want = jax.vmap(lambda vk, d, c: gaam(vk, d[None], c[None], axis=-1, num_heads=1), (2, 0, 0), 2)(v, delta, c)
    assert_close(plain, want, jnp.float32)
    assert_close(residual, v + want, jnp.float32)


def test_cache_decode_equals_the_last_rows():
    q, k, v = qkv()
    delta, c = params(K)
    full = jax.jit(lambda q, k, v: gaam_attention(q, k, v, causal=True, delta=delta, c=c))(q, k, v)
    cache_k = jnp.zeros((B, T + 2, K, H)).at[:, :T].set(k)
    cache_v = jnp.zeros((B, T + 2, K, H)).at[:, :T].set(v)
    rows = jax.jit(lambda q, k, v: gaam_decode(q, k, v, query_positions=jnp.arange(T - 2, T), delta=delta, c=c))(
        q[:, T - 2:], cache_k, cache_v)
    assert_close(rows, full[:, T - 2:], jnp.float32)


def test_bad_arguments_are_named():
    x = jnp.zeros((2, 3, 4))
    delta, c = params(2)
    with pytest.raises(ValueError, match="gaam.num_heads"):
        gaam(x, delta, c, axis=1, num_heads=0)
    with pytest.raises(ValueError, match="fewer than num_heads"):
        gaam(x, params(4)[0], params(4)[1], axis=1, num_heads=4)
    with pytest.raises(ValueError, match=r"gaam.delta/c: expected shape \[num_heads=2"):
        gaam(x, delta[:1], c[:1], axis=1, num_heads=2)
    with pytest.raises(ValueError, match="gaam.axis"):
        reweight_values(jnp.zeros((1, 3, K, 4)), axis="time")


# ---- GAAM on queries and keys, stacked GaussianBlocks, padding from the attention mask ----

def layer_params(heads, layers=2, g=3, seed=7):
    delta, c = params(layers * heads, g, seed)
    return delta.reshape(layers, heads, g), c.reshape(layers, heads, g)


def numpy_block(x, delta, c, valid=None):
    """The code's GaussianBlock (x = GAAM_l(x) + x) per head of x [B, S, heads, D] along the positions, in float64
    with the numpy transcription above; valid [B, S] marks the real rows."""
    x = np.asarray(x, np.float64)
    delta, c = np.asarray(delta), np.asarray(c)
    for layer in range(delta.shape[0]):
        x = x + np.stack([numpy_code_formula(
            x[:, :, i], delta[layer, i:i + 1], c[layer, i:i + 1], 1, 1,
            valid=None if valid is None else np.broadcast_to(valid[..., None], x[:, :, i].shape))
            for i in range(x.shape[2])], 2)
    return jnp.asarray(x, jnp.float32)


def jax_block(x, delta, c, causal):
    """The same stack written with the single-head `gaam` per head (the causal form has no numpy transcription)."""
    for layer in range(delta.shape[0]):
        x = x + jax.vmap(lambda xh, d, c: gaam(xh, d[None], c[None], axis=1, num_heads=1, causal=causal),
                         (2, 0, 0), 2)(x, delta[layer], c[layer])
    return x


def qkv_params():
    (dq, cq), (dk, ck), (dv, cv) = layer_params(N, seed=8), layer_params(K, seed=9), layer_params(K, seed=10)
    return dict(query_delta=dq, query_c=cq, key_delta=dk, key_c=ck, delta=dv, c=cv)


ALL = ("query", "key", "value")


def test_queries_keys_values_stacked_and_padded_follow_the_code_formula():
    """Cross attention with right padding of queries and keys: each projection goes through a two-layer
    GaussianBlock whose statistics treat the padded rows as the code treats padding_value entries."""
    q, k, v = qkv(S)
    p = qkv_params()
    q_len, kv_len = jnp.array([5, T]), jnp.array([6, S])
    mask = attnx.Mask(q_lengths=q_len, kv_lengths=kv_len)
    got = jax.jit(lambda q, k, v, m: gaam_attention(q, k, v, mask=m, apply_to=ALL, num_layers=2, num_gaussians=3,
                                                    **p))(q, k, v, mask)
    q_valid, kv_valid = np.arange(T) < np.asarray(q_len)[:, None], np.arange(S) < np.asarray(kv_len)[:, None]
    want = attnx.dot_product_attention(numpy_block(q, p["query_delta"], p["query_c"], q_valid),
                                       numpy_block(k, p["key_delta"], p["key_c"], kv_valid),
                                       numpy_block(v, p["delta"], p["c"], kv_valid), mask=mask,
                                       implementation="reference")
    assert_close(got, want, jnp.float32)
    # the lengths matter at these shapes (so the comparison above can tell): without them the real rows differ
    unpadded = numpy_block(v, p["delta"], p["c"])
    assert not np.allclose(np.asarray(unpadded)[0, :6], np.asarray(numpy_block(v, p["delta"], p["c"], kv_valid))[0, :6])


def test_causal_queries_and_keys_with_gradients():
    """Queries (per query head) and keys re-weighted by one causal GAAM layer, against the per-head composition,
    with gradients. One layer on two projections keeps the compile small: values and stacking run the same
    reweight_values code, checked forward above and through the decode below."""
    q, k, v = qkv()
    p = {name: a[0] for name, a in qkv_params().items() if name.startswith(("query", "key"))}  # [heads, G]

    def fn(q, k, v, p):
        return gaam_attention(q, k, v, causal=True, apply_to=("query", "key"), num_gaussians=3, **p)

    def ref(q, k, v, p):
        return attnx.dot_product_attention(jax_block(q, p["query_delta"][None], p["query_c"][None], True),
                                           jax_block(k, p["key_delta"][None], p["key_c"][None], True), v,
                                           mask=attnx.Mask(causal=True), implementation="reference")

    @jax.jit
    def both(q, k, v, p):
        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
        return [f(q, k, v, p) for f in (fn, ref)], [jax.grad(loss(f), argnums=(0, 1, 2, 3))(q, k, v, p)
                                                     for f in (fn, ref)]

    (got, want), (grads, want_grads) = both(q, k, v, p)
    assert_close(got, want, jnp.float32)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert_close(g, w, jnp.float32, kind="gradient")


def test_decode_with_gaam_on_keys_and_per_token_queries_equals_the_last_rows():
    q, k, v = qkv()
    p = qkv_params()
    cache_k = jnp.zeros((B, T + 2, K, H)).at[:, :T].set(k)
    cache_v = jnp.zeros((B, T + 2, K, H)).at[:, :T].set(v)
    kv_only = {name: p[name] for name in ("key_delta", "key_c", "delta", "c")}
    cases = ((dict(apply_to=("key", "value"), **kv_only), "sequence"), (dict(apply_to=ALL, **p), "feature"))

    @jax.jit
    def run(q, k, v, ck, cv):
        options = lambda extra, axis: dict(num_layers=2, num_gaussians=3, axis=axis, **extra)
        return [(gaam_attention(q, k, v, causal=True, **options(*case))[:, T - 2:],
                 gaam_decode(q[:, T - 2:], ck, cv, query_positions=jnp.arange(T - 2, T), **options(*case)))
                for case in cases]

    for full, rows in run(q, k, v, cache_k, cache_v):
        assert_close(rows, full, jnp.float32)
    with pytest.raises(NotImplementedError, match="axis='feature'"):
        gaam_decode(q[:, T - 1:], cache_k, cache_v, query_positions=jnp.arange(T - 1, T), apply_to=ALL)


def test_bad_targets_layers_and_stray_gaussians_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="gaam.apply_to"):
        gaam_attention(q, k, v, apply_to=("keys",))
    with pytest.raises(ValueError, match="gaam.num_layers"):
        gaam_attention(q, k, v, num_layers=0)
    with pytest.raises(ValueError, match="the query but apply_to"):
        gaam_attention(q, k, v, query_delta=jnp.zeros((N, 2)), query_c=jnp.ones((N, 2)))
    with pytest.raises(ValueError, match=r"gaam.key_delta/key_c: expected shape \[2, G\] or \[num_layers=2"):
        gaam_attention(q, k, v, apply_to="key", num_layers=2, key_delta=jnp.zeros((K, 2)), key_c=jnp.ones((K, 2)))

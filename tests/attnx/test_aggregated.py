"""TransNeXt aggregated attention (attnx/ops/aggregated): the unfold fast path against the dense reference, and the
properties of vision spec §6(e): (1) the local branch alone is masked attention over the zero-padded 3x3 window,
(2) weights sum to one, (3) log(n_i + P) counts, (4) bounded cosine logits, (6) CPB matrices equal the code's
unique-table construction. (5), the convolutional GLU, is in tests/models/test_transnext_layers.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.aggregated import aggregated_attention, aggregated_reference, cpb_bias, pooled_tokens
from attnx.ops.aggregated import tables
from attnx.testing.tolerances import assert_close

B, GRID, N, K, H, V = 2, (3, 4), 4, 2, 8, 5
T = GRID[0] * GRID[1]
POOLED = (2, 2)
P = POOLED[0] * POOLED[1]


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape, s=1.0: jnp.asarray(s * rng.standard_normal(shape), jnp.float32)
    inputs = dict(query=f(B, T, N, H), key=f(B, T, K, H), value=f(B, T, K, V))
    weights = dict(pooled_key=f(B, P, K, H), pooled_value=f(B, P, K, V), temperature=f(N),
                   query_embedding=f(N, H, s=0.3), local_bias=f(N, 9, s=0.3), learnable_tokens=f(N, H, 9, s=0.3),
                   learnable_bias=f(N, 9, s=0.3), cpb=(f(2, 16), f(16), f(16, N, s=0.3), f(N, s=0.3)))
    return inputs, weights


@jax.jit
def _both(inputs, weights):
    kw = dict(grid=GRID, window=3, pooled_grid=POOLED, **weights)
    fast = lambda i, w: jnp.sum(jnp.sin(aggregated_attention(**i, **kw | w)))
    ref = lambda i, w: jnp.sum(jnp.sin(aggregated_reference(**i, **kw | w)))
    outs = (aggregated_attention(**inputs, **kw), aggregated_reference(**inputs, **kw))
    return outs, jax.grad(fast, argnums=(0, 1))(inputs, weights), jax.grad(ref, argnums=(0, 1))(inputs, weights)


def test_fast_path_matches_dense_reference_forward_and_gradients():
    inputs, weights = _arrays()
    (fast, ref), grad_fast, grad_ref = _both(inputs, weights)
    assert fast.shape == (B, T, N, V)
    assert_close(fast, ref, jnp.float32, what="aggregated forward")
    for (path, g_fast), g_ref in zip(jax.tree_util.tree_leaves_with_path(grad_fast),
                                     jax.tree_util.tree_leaves(grad_ref)):
        assert float(jnp.max(jnp.abs(g_fast))) > 0, path
        assert_close(g_fast, g_ref, jnp.float32, kind="gradient", what=jax.tree_util.keystr(path))


# One jitted probe: identity values read the attention weights out of the output (row i = weights of query i).
@jax.jit
def _weights_of(query, key, temperature, query_embedding, local_bias):
    identity = jnp.broadcast_to(jnp.eye(T, dtype=jnp.float32)[None, :, None, :], (1, T, K, T))
    return aggregated_attention(query, key, identity, grid=GRID, temperature=temperature,
                                query_embedding=query_embedding, local_bias=local_bias)[0]  # [T, N, T]


def test_local_branch_alone_is_masked_attention_over_the_zero_padded_window():
    inputs, weights = _arrays(1)
    q, k = inputs["query"][:1], inputs["key"][:1]
    w = np.asarray(_weights_of(q, k, weights["temperature"], weights["query_embedding"], weights["local_bias"]))
    qn = np.asarray(q[0]) / np.linalg.norm(np.asarray(q[0]), axis=-1, keepdims=True)
    kn = np.asarray(k[0]) / np.linalg.norm(np.asarray(k[0]), axis=-1, keepdims=True)
    tau = np.log1p(np.exp(np.asarray(weights["temperature"])))
    emb, bias = np.asarray(weights["query_embedding"]), np.asarray(weights["local_bias"])
    h, wd = GRID
    for i in range(T):
        y, x = divmod(i, wd)
        keys = [(j, (dy + 1) * 3 + dx + 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                for j in [(y + dy) * wd + x + dx] if 0 <= y + dy < h and 0 <= x + dx < wd]
        for n in range(N):
            scaled = (qn[i, n] + emb[n]) * tau[n] * math.log(len(keys))  # no pooled tokens: P = 0
            logits = np.array([scaled @ kn[j, n // (N // K)] + bias[n, t] for j, t in keys])
            expected = np.zeros(T)
            expected[[j for j, _ in keys]] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            np.testing.assert_allclose(w[i, n], expected, atol=2e-6, err_msg=f"query {i} head {n}")


def test_logits_are_bounded_by_the_scaled_cosine():
    inputs, weights = _arrays(2)
    q, k = 1e3 * inputs["query"][:1], inputs["key"][:1]  # cosine logits ignore the query's norm
    w = np.asarray(_weights_of(q, k, weights["temperature"], weights["query_embedding"], weights["local_bias"]))
    tau = np.log1p(np.exp(np.asarray(weights["temperature"])))
    norm_e = np.linalg.norm(np.asarray(weights["query_embedding"]), axis=-1)
    max_bias = np.abs(np.asarray(weights["local_bias"])).max(-1)
    counts = tables.local_neighbours(GRID, 3)[1].sum(-1)
    for i in range(T):
        for n in range(N):
            row = w[i, n][w[i, n] > 0]
            assert len(row) == counts[i]
            bound = tau[n] * math.log(counts[i]) * (1 + norm_e[n]) + max_bias[n]
            assert math.log(row.max() / row.min()) <= 2 * bound + 1e-4


@jax.jit
def _ones_out(inputs, weights):
    # unit values everywhere, learnable tokens off: every output is the sum of the softmax weights; one extra
    # leading batch axis checks that batch axes are flattened and restored
    inputs = {name: x[None] for name, x in inputs.items()} | dict(value=jnp.ones((1, *inputs["value"].shape)))
    weights = weights | dict(pooled_key=weights["pooled_key"][None],
                             pooled_value=jnp.ones((1, *weights["pooled_value"].shape)), learnable_tokens=None,
                             learnable_bias=None)
    return aggregated_attention(**inputs, **weights, grid=GRID, pooled_grid=POOLED)


def test_weights_over_both_branches_sum_to_one():
    inputs, weights = _arrays(3)
    assert_close(_ones_out(inputs, weights), jnp.ones((1, B, T, N, V)), jnp.float32)


def test_length_scale_counts_in_grid_neighbours_and_pooled_tokens():
    scale = np.exp(tables.length_scale((4, 5), 3, 4)).round().reshape(4, 5)
    expected = np.full((4, 5), 9 + 4)
    expected[[0, -1], :] = 6 + 4
    expected[:, [0, -1]] = 6 + 4
    expected[[0, 0, -1, -1], [0, -1, 0, -1]] = 4 + 4
    np.testing.assert_array_equal(scale, expected)
    # a 1-D sequence (grid None = one row): 2 keys at the ends, 3 inside; the full stage uses log(T)
    np.testing.assert_allclose(tables.length_scale((1, 5), 3, 0), np.log([2, 3, 3, 3, 2]), rtol=1e-6)
    np.testing.assert_allclose(tables.length_scale((4, 5), None, 0), np.full(20, math.log(20)), rtol=1e-6)


def test_cpb_bias_equals_the_unique_table_construction():
    rng = np.random.default_rng(4)
    cpb = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 16), (16,), (16, 3), (3,)))
    grid, key_grid = (4, 6), (2, 4)  # 6 -> 4 pools over overlapping bins
    # the code's construction: offsets of (query, pooled key) coordinates, unique rows, MLP on the table, gather
    qy, qx = np.meshgrid(np.arange(4.0), np.arange(6.0), indexing="ij")
    ky = np.array([0.5, 2.5])
    kx = np.array([np.mean([0, 1]), np.mean([1, 2]), np.mean([3, 4]), np.mean([4, 5])])  # bins [0,2) [1,3) [3,5) [4,6)
    ky, kx = np.meshgrid(ky, kx, indexing="ij")
    rel = np.stack([(qy.reshape(-1)[:, None] - ky.reshape(-1)[None]) / 3 * 8,
                    (qx.reshape(-1)[:, None] - kx.reshape(-1)[None]) / 5 * 8], axis=-1).reshape(-1, 2)
    table, inverse = np.unique(rel.astype(np.float32), axis=0, return_inverse=True)
    table = np.sign(table) * np.log2(np.abs(table) + 1) / np.log2(8)
    w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in cpb)
    mlp = np.maximum(table @ w1 + b1, 0) @ w2 + b2
    expected = mlp[inverse.reshape(-1)].reshape(24, 8, 3).transpose(2, 0, 1)
    np.testing.assert_allclose(np.asarray(cpb_bias(cpb, grid, key_grid)), expected, atol=2e-5)


def test_full_attention_stage_matches_a_direct_formula():
    inputs, weights = _arrays(5)
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    full = jax.jit(lambda q, k, v, w: aggregated_attention(q, k, v, grid=GRID, window=None, **w))
    out = full(q, k, v, {name: weights[name] for name in ("temperature", "query_embedding", "cpb")})
    qn = np.asarray(q) / np.linalg.norm(np.asarray(q), axis=-1, keepdims=True)
    kn = np.repeat(np.asarray(k) / np.linalg.norm(np.asarray(k), axis=-1, keepdims=True), N // K, axis=2)
    tau = np.log1p(np.exp(np.asarray(weights["temperature"])))
    scaled = (qn + np.asarray(weights["query_embedding"])) * tau[:, None] * math.log(T)
    logits = np.einsum("binh,bjnh->bnij", scaled, kn) + np.asarray(cpb_bias(weights["cpb"], GRID, GRID))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bnij,bjnv->binv", probs, np.repeat(np.asarray(v), N // K, axis=2))
    assert_close(out, expected, jnp.float32)


def test_pooled_tokens_are_layer_normed_adaptive_means_of_gelu_features():
    rng = np.random.default_rng(6)
    D, grid = 6, (3, 5)
    x = jnp.asarray(rng.standard_normal((2, 15, D)), jnp.float32)
    W, b = jnp.asarray(rng.standard_normal((D, D)), jnp.float32), jnp.asarray(rng.standard_normal(D), jnp.float32)
    scale, shift = jnp.asarray(rng.standard_normal(D), jnp.float32), jnp.asarray(rng.standard_normal(D), jnp.float32)
    out = jax.jit(pooled_tokens, static_argnames=("grid", "pooled_grid"))(
        x, grid=grid, pooled_grid=(2, 2), sr_kernel=W, sr_bias=b, norm_scale=scale, norm_bias=shift)
    pre = np.asarray(x, np.float64) @ np.asarray(W, np.float64) + np.asarray(b, np.float64)
    hidden = (0.5 * pre * (1 + np.vectorize(math.erf)(pre / math.sqrt(2)))).reshape(2, 3, 5, D)
    rows, cols = [(0, 2), (1, 3)], [(0, 3), (2, 5)]  # torch's adaptive bins of 3 -> 2 and 5 -> 2
    pooled = np.stack([hidden[:, r0:r1, c0:c1].mean((1, 2)) for r0, r1 in rows for c0, c1 in cols], axis=1)
    normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True) + 1e-5)
    assert_close(out, normed * np.asarray(scale) + np.asarray(shift), jnp.float32)


def test_one_dimensional_sequence_is_a_single_row_grid():
    assert tables.resolve_grid(None, 7) == (1, 7)
    index, valid = tables.local_neighbours((1, 4), 3)
    np.testing.assert_array_equal(valid.sum(-1), [2, 3, 3, 2])  # a window of 3 along the sequence
    np.testing.assert_array_equal(index[1][valid[1]], [0, 1, 2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(causal=True), "causal"),
    (dict(window=2), "odd"),
    (dict(grid=(2, 5)), "class token"),
    (dict(grid=(4, 4)), "cannot fill"),
    (dict(window=None, local_bias=jnp.zeros((N, 9))), "full-attention"),
    (dict(cpb=(jnp.zeros((2, 4)), jnp.zeros(4), jnp.zeros((4, N)), jnp.zeros(N))), "pooled"),
    (dict(local_bias=jnp.zeros((N, 8))), "local_bias"),
    (dict(implementation="pallas"), "implementation"),
    (dict(pretrain_grid=(0, 3)), "pretrain_grid"),
])
def test_invalid_arguments_are_refused_with_the_argument_named(kwargs, match):
    inputs, _ = _arrays()
    with pytest.raises(ValueError, match=match):
        aggregated_attention(**inputs, **{"grid": GRID, **kwargs})


def test_cross_attention_is_refused_and_the_registry_declares_ns_only():
    inputs, _ = _arrays()
    with pytest.raises(ValueError, match="self attention only"):
        aggregated_attention(inputs["query"], inputs["key"][:, :5], inputs["value"][:, :5])
    spec = attnx.get_attention("aggregated")
    assert spec.patterns == {"NS"} and spec.spatial

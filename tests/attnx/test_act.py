"""ACT (spec llm_mechanisms.md §8 (e)): rows still sum to 1, beta = 1 or tau >= 1 is the identity, a synthetic sink
keeps exactly beta of its mass, the official steps (first-hit exclusion, row-0 ratios, A[0, 0] = 1) step by step,
the flash epilogue equals the explicit rewrite, the registry path against its reference (forward and gradients), the
causal prefix statistics, and the greedy head search."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.analysis import act_calibrate, act_flash_epilogue, act_head_search, act_sink_columns, act_sink_set
from attnx.ops.spans import act as act_ops
from attnx.ops.spans.act import act_attention, act_reference
from attnx.testing.tolerances import assert_close

B, T, N, K, H, V = 2, 9, 4, 2, 8, 5
HEADS = (True, False, True, True)


def causal_maps(seed=0, shape=(B, N), length=T, temperature=2.0):
    logits = jax.random.normal(jax.random.key(seed), shape + (length, length)) * temperature
    return jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf), axis=-1)


def official_steps(a, beta, tau):
    """The official per-head rewrite, step by step in numpy float64 (GATECH-EIC/ACT atten_process_eval)."""
    a = np.array(a, np.float64)
    length = a.shape[0]
    means = a.sum(0) / np.arange(length, 0, -1)
    hits = np.nonzero(means > tau)[0][1:]  # drop the first hit
    original = a.copy()
    freed = a[:, hits].sum(1, keepdims=True) * (1 - beta)
    a[:, hits] *= beta
    original[1:, hits] = 0.0  # row 0 keeps its sink columns in the ratios
    a = a + freed * original / original.sum(1, keepdims=True)
    a[0, 0] = 1.0
    return a, hits


# One compile per (shape, options) instead of eager op-by-op dispatch (which compiles every primitive it meets).
calibrate = jax.jit(act_calibrate, static_argnames=("head_mask", "beta", "tau", "statistics"))


def test_rows_sum_to_one_and_match_the_official_steps():
    maps = causal_maps()
    for statistics in ("full", "prefix"):
        out = calibrate(maps, HEADS, statistics=statistics)
        assert_close(out.sum(-1), jnp.ones((B, N, T)), jnp.float32)
        assert_close(out[:, 1], maps[:, 1], jnp.float32)  # an unselected head is untouched
    out = np.asarray(calibrate(maps, HEADS, beta=0.4, tau=0.1))
    touched = 0
    for b in range(B):
        for n in (0, 2, 3):
            want, hits = official_steps(maps[b, n], 0.4, 0.1)
            touched += len(hits)
            np.testing.assert_allclose(out[b, n], want, atol=2e-6)
    assert touched > 0  # the maps do have sinks beyond the first hit, so the rewrite was exercised


def test_row_zero_rule_and_first_hit_on_a_non_causal_map():
    # On a full stochastic map (not causal) row 0 has mass on the sink columns: the code keeps those columns in
    # row 0's ratios and then overwrites A[0, 0] with 1, so row 0 no longer sums to 1. Reproduce that exactly.
    a = jax.nn.softmax(jax.random.normal(jax.random.key(2), (1, 1, 6, 6)) * 2, axis=-1)
    want, hits = official_steps(a[0, 0], 0.4, 0.1)
    assert len(hits) > 0
    np.testing.assert_allclose(np.asarray(calibrate(a, (True,)))[0, 0], want, atol=2e-6)


def test_identity_when_beta_is_one_or_tau_at_least_one():
    maps = causal_maps()
    assert_close(calibrate(maps, None, beta=1.0), maps, jnp.float32)
    assert_close(calibrate(maps, None, tau=1.0), maps, jnp.float32)
    assert_close(calibrate(maps, None, tau=1.0, statistics="prefix"), maps, jnp.float32)


def test_synthetic_sink_keeps_exactly_beta_of_its_mass_and_the_first_hit_is_left_alone():
    length, sink_column = 8, 3
    logits = jnp.zeros((length, length)).at[:, 0].set(2.0).at[:, sink_column].set(3.0)
    maps = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf), -1)[None, None]
    columns = act_sink_columns(maps.sum(-2), tau=0.1)[0, 0]
    assert np.flatnonzero(np.asarray(columns)).tolist() == [sink_column]  # column 0 is the first hit: excluded
    out = calibrate(maps, (True,), beta=0.25)
    assert_close(out[0, 0, :, sink_column], 0.25 * maps[0, 0, :, sink_column], jnp.float32)
    # The first hit is never scaled down: rows that see the sink give it freed mass, earlier rows are unchanged.
    assert bool(jnp.all(out[0, 0, sink_column:, 0] > maps[0, 0, sink_column:, 0]))
    assert_close(out[0, 0, :sink_column], maps[0, 0, :sink_column], jnp.float32)
    assert_close(out.sum(-1), jnp.ones((1, 1, length)), jnp.float32)


def test_flash_epilogue_equals_the_explicit_rewrite():
    maps = causal_maps(seed=5)
    values = jax.random.normal(jax.random.key(6), (B, N, T, V))
    sink = act_sink_set(maps, tau=0.1)
    p_sink, p_rest = jnp.where(sink, maps, 0.0), jnp.where(sink, 0.0, maps)
    want = calibrate(maps, None, beta=0.4) @ values
    got = act_flash_epilogue(p_sink @ values, p_rest @ values, p_sink.sum(-1), p_rest.sum(-1), beta=0.4)
    assert_close(got, want, jnp.float32)
    # An online softmax hands over unnormalised accumulators (exp(s - m), any per-row scale): same result.
    scale = jnp.exp(jax.random.normal(jax.random.key(8), (B, N, T, 1)))
    got = act_flash_epilogue(scale * (p_sink @ values), scale * (p_rest @ values), scale[..., 0] * p_sink.sum(-1),
                             scale[..., 0] * p_rest.sum(-1), beta=0.4)
    assert_close(got, want, jnp.float32)


def inputs(seed=0, length=T):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (2 * jax.random.normal(kq, (B, length, N, H)), jax.random.normal(kk, (B, length, K, H)),
            jax.random.normal(kv, (B, length, K, V)))


@functools.partial(jax.jit, static_argnames=("implementation", "statistics"))
def _run(q, k, v, cotangent, implementation, statistics="prefix"):
    def loss(q, k, v):
        out = act_attention(q, k, v, causal=True, head_mask=HEADS, statistics=statistics,
                            implementation=implementation)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def test_registry_path_matches_the_reference_with_gradients():
    q, k, v = inputs()
    cotangent = jax.random.normal(jax.random.key(3), (B, T, N, V))
    out, grads = _run(q, k, v, cotangent, None)
    want, want_grads = _run(q, k, v, cotangent, "reference")
    assert_close(out, want, jnp.float32)
    for name, g, w in zip("qkv", grads, want_grads):
        assert_close(g, w, jnp.float32, "gradient", what=name)
    plain = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True), implementation="reference")
    assert_close(out[:, :, 1], plain[:, :, 1], jnp.float32)  # head 1 is not calibrated
    assert float(jnp.max(jnp.abs(out - plain))) > 1e-2  # the calibrated heads do change


def test_prefix_statistics_are_causal_and_agree_with_the_official_rule_on_the_last_row():
    maps = causal_maps(seed=9)
    full = calibrate(maps, None, statistics="full")
    prefix = calibrate(maps, None, statistics="prefix")
    assert_close(prefix[..., -1, :], full[..., -1, :], jnp.float32)
    # Row i of the prefix rule is the official rule applied to the leading (i + 1) x (i + 1) map.
    i = 5
    assert_close(prefix[..., i, :i + 1], calibrate(maps[..., :i + 1, :i + 1], None)[..., i, :], jnp.float32)
    # The official rule is not causal: appending tokens changes earlier rows (why the registry defaults to prefix).
    assert float(jnp.max(jnp.abs(full[..., i, :i + 1] - calibrate(maps[..., :i + 1, :i + 1], None)[..., i, :]))
                 ) > 1e-3


def test_greedy_head_search_keeps_exactly_the_heads_that_help():
    helpful = {(0, 1), (2, 0), (2, 3)}
    calls = []

    def evaluate(mask):
        calls.append(mask)
        chosen = set(zip(*np.nonzero(mask)))
        return len(chosen & helpful) - 0.5 * len(chosen - helpful)

    mask, best, history = act_head_search(evaluate, num_layers=3, num_heads=4)
    assert set(zip(*np.nonzero(mask))) == helpful and best == 3.0
    assert len(calls) == 1 + 12 and sum(kept for *_, kept in history) == 3
    mask, _, history = act_head_search(evaluate, num_layers=3, num_heads=4, layers=[2])
    assert set(zip(*np.nonzero(mask))) == {(2, 0), (2, 3)} and len(history) == 4


def test_errors_name_the_argument():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="causal=False"):
        act_attention(q, k, v, causal=False)
    with pytest.raises(ValueError, match="self attention"):
        act_reference(q, k[:, :4], v[:, :4], causal=True)
    with pytest.raises(ValueError, match=r"act.head_mask: expected 4"):
        calibrate(causal_maps(), (True, False))
    with pytest.raises(ValueError, match=r"act.beta"):
        calibrate(causal_maps(), None, beta=1.5)
    with pytest.raises(ValueError, match=r"act.statistics"):
        calibrate(causal_maps(), None, statistics="rows")
    with pytest.raises(NotImplementedError, match="act.implementation"):
        act_attention(q, k, v, causal=True, implementation="chunked")


def test_per_layer_head_lists_become_layer_attention_entries():
    from attnx.ops.spans.act import act_heads_from_pairs, act_layer_attention

    layer_heads = act_heads_from_pairs([(2, 1), (0, 3), (2, 0), (2, 1)], num_layers=3)
    assert layer_heads == ((3,), (), (0, 1))
    entries = act_layer_attention(layer_heads, 4, beta=0.5)
    assert [kind for kind, _ in entries] == ["act"] * 3
    assert [kw["head_mask"] for _, kw in entries] == [(False, False, False, True), (False,) * 4,
                                                     (True, True, False, False)]
    assert all(kw["beta"] == 0.5 and kw["statistics"] == "prefix" for _, kw in entries)
    with pytest.raises(ValueError, match=r"act.layer_heads\[0\]"):
        act_layer_attention(((4,),), 4)
    with pytest.raises(ValueError, match="act.pairs"):
        act_heads_from_pairs([(3, 0)], num_layers=3)
    with pytest.raises(ValueError, match="act.beta"):
        act_layer_attention(((0,),), 4, beta=2.0)


_decode = jax.jit(act_ops.act_cache_decode, static_argnames=("rope_theta", "head_mask", "beta", "tau", "statistics"))
_full = jax.jit(act_attention, static_argnames=("causal", "head_mask", "beta", "tau", "statistics"))


def test_decode_keeps_column_sums_beside_the_cache_and_equals_the_full_forward():
    """Chunks of 4, 1 and 4 rows through act_cache_decode (no rotary positions) equal the rows of act_attention
    (prefix statistics) on the whole sequence; the column sums are those of the uncalibrated maps."""
    q, k, v = inputs(seed=3)
    opts = dict(head_mask=HEADS, beta=0.4, tau=0.1, statistics="prefix")
    full = _full(q, k, v, causal=True, **opts)
    cache = act_ops.act_cache_init(B, T, (K, H), (K, V), jnp.float32, **opts)
    rows, start = [], 0
    for steps in (4, 1, 4):
        chunk = slice(start, start + steps)
        out, cache = _decode(q[:, chunk], k[:, chunk], v[:, chunk], cache, jnp.int32(start), rope_theta=None, **opts)
        rows.append(out)
        start += steps
    assert_close(jnp.concatenate(rows, axis=1), full, jnp.float32)
    _, probs = act_ops._prepare(q, k, v, True, None)
    assert_close(cache["colsum"], probs.sum(-2), jnp.float32)
    with pytest.raises(NotImplementedError, match="head_mask"):
        act_ops.act_cache_init(B, T, (K, H), (K, V), jnp.float32)
    with pytest.raises(NotImplementedError, match="statistics='prefix'"):
        act_ops.act_cache_init(B, T, (K, H), (K, V), jnp.float32, head_mask=HEADS, statistics="full")

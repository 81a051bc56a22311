"""Dispatch, explain, the jax.nn / flax drop-ins, Mask semantics, score_mod gradients and block skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import attnx
from attnx.ops.softmax import chunked
from attnx.testing.tolerances import assert_close
from attnx.validation import canonicalize

RNG = np.random.default_rng(0)


def _qkv(B=2, T=6, S=6, N=4, K=2, H=8, V=8, dtype=jnp.float32):
    f = lambda *s: jnp.asarray(RNG.standard_normal(s), jnp.float32).astype(dtype)  # noqa: E731
    return f(B, T, N, H), f(B, S, K, H), f(B, S, K, V)


# ---- dispatch ----------------------------------------------------------------------------------------------------
def test_single_named_implementation_never_falls_back():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="sinks"):
        attnx.dot_product_attention(q, k, v, sinks=jnp.zeros(4), implementation="xla")


def test_list_falls_through_only_on_not_implemented():
    q, k, v = _qkv()
    sinks = jnp.asarray(RNG.standard_normal(4), jnp.float32)
    got = attnx.dot_product_attention(q, k, v, sinks=sinks, implementation=["xla", "cudnn", "reference"])
    want = attnx.dot_product_attention(q, k, v, sinks=sinks, implementation="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_list_of_only_unsupported_reports_every_reason():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError) as err:
        attnx.dot_product_attention(q, k, v, logits_soft_cap=3.0, implementation=["xla", "cudnn"])
    assert "xla:" in str(err.value) and "cudnn:" in str(err.value)


def test_automatic_choice_on_cpu_uses_chunked_for_long_sequences():
    q, k, v = _qkv(B=1, T=300, S=300, N=2, K=1, H=8, V=8)
    mask = attnx.Mask(causal=True)
    info = attnx.explain(q, k, v, mask=mask)
    assert info.chosen == "chunked", str(info)
    got = attnx.dot_product_attention(q, k, v, mask=mask)
    want = attnx.dot_product_attention(q, k, v, mask=mask, implementation="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_explain_names_the_reason_for_each_rejection():
    q, k, v = _qkv()
    info = attnx.explain(q, k, v, sinks=jnp.zeros(4), implementation=["xla", "chunked"])
    assert info.chosen == "chunked"
    assert "sinks" in info.rejected["xla"]
    assert "GPU" in info.rejected["cudnn"]
    text = str(info)
    assert "runs: chunked" in text and "reference" in text


def test_explain_accepts_abstract_shapes():
    s = jax.ShapeDtypeStruct
    info = attnx.explain(s((1, 4096, 8, 64), jnp.float32), s((1, 4096, 8, 64), jnp.float32),
                         s((1, 4096, 8, 64), jnp.float32), mask=attnx.Mask(causal=True))
    assert info.chosen == "chunked"


# ---- drop-ins ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(is_causal=True),
    dict(local_window_size=(2, 1)),
    dict(key_value_seq_lengths=jnp.array([6, 4], jnp.int32)),
    dict(is_causal=True, key_value_seq_lengths=jnp.array([5, 6], jnp.int32)),
], ids=["causal", "window", "kv_lengths", "causal_lengths"])
def test_jax_nn_drop_in_matches_jax_nn(kwargs):
    q, k, v = _qkv()
    bias = jnp.asarray(RNG.standard_normal((1, 4, 6, 6)), jnp.float32)
    want, want_lse = jax.nn.dot_product_attention(q, k, v, bias, return_residual=True, **kwargs)
    for impl in ("chunked", "reference", None):
        got, lse = attnx.compat.dot_product_attention(q, k, v, bias, return_residual=True, implementation=impl,
                                                      **kwargs)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-5)


def test_jax_nn_drop_in_boolean_mask():
    q, k, v = _qkv()
    mask = jnp.asarray(RNG.random((2, 1, 6, 6)) < 0.7).at[..., 0].set(True)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    got = attnx.compat.dot_product_attention(q, k, v, mask=mask, implementation="chunked")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_flax_attention_fn_drop_in():
    from flax import nnx

    x = jnp.asarray(RNG.standard_normal((2, 7, 16)), jnp.float32)
    make = lambda fn: nnx.MultiHeadAttention(num_heads=4, in_features=16, decode=False, rngs=nnx.Rngs(0),  # noqa
                                             **({} if fn is None else dict(attention_fn=fn)))
    mask = nnx.make_causal_mask(jnp.ones((2, 7)))
    want = make(None)(x, mask=mask)
    got = make(attnx.compat.flax_attention_fn)(x, mask=mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_flax_attention_fn_refuses_dropout():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="dropout"):
        attnx.compat.flax_attention_fn(q, k, v, dropout_rate=0.1, deterministic=False)


# ---- Mask ----------------------------------------------------------------------------------------------------------
def test_mask_materialize_and_combine():
    causal = np.asarray(attnx.Mask(causal=True).materialize(4, 4))[0, 0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4), bool)))
    bottom_right = np.asarray(attnx.Mask(causal=True, q_offset=2).materialize(2, 4))[0, 0]
    np.testing.assert_array_equal(bottom_right, [[1, 1, 1, 0], [1, 1, 1, 1]])
    both = attnx.Mask(causal=True) & attnx.Mask(window=(1, 5)) & attnx.Mask(kv_lengths=jnp.array([3]))
    assert both.effective_window == (1, 0)
    got = np.asarray(both.materialize(4, 4))[0, 0]
    i, j = np.arange(4)[:, None], np.arange(4)[None, :]
    np.testing.assert_array_equal(got, (j <= i) & (j >= i - 1) & (j < 3))


def test_mask_is_a_pytree_usable_under_jit():
    mask = attnx.Mask(causal=True, kv_lengths=jnp.array([2, 3]))
    leaves, tree = jax.tree.flatten(mask)
    assert len(leaves) == 1
    again = jax.tree.unflatten(tree, leaves)
    assert again.causal and again.kv_lengths is leaves[0]
    q, k, v = _qkv()
    f = jax.jit(lambda m: attnx.dot_product_attention(q, k, v, mask=m, implementation="chunked"))
    np.testing.assert_allclose(np.asarray(f(mask)),
                               np.asarray(attnx.dot_product_attention(q, k, v, mask=mask,
                                                                      implementation="reference")), atol=2e-5)


def test_combining_two_segment_id_masks_is_an_error():
    ids = jnp.zeros((1, 4), jnp.int32)
    a = attnx.Mask(q_segment_ids=ids, kv_segment_ids=ids)
    with pytest.raises(ValueError, match="segment ids"):
        a & a


# ---- score_mod with learnable closed-over parameters -------------------------------------------------------------
def test_score_mod_closure_receives_gradients():
    q, k, v = _qkv(T=9, S=9)

    def loss(slopes, implementation):
        alibi = lambda s, b, n, t, j: s - jnp.take(slopes, n) * jnp.abs(t - j)  # noqa: E731
        out = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True), score_mod=alibi,
                                          implementation=implementation)
        return jnp.sum(out ** 2)

    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
    want = jax.grad(loss)(slopes, "reference")
    got = jax.jit(jax.grad(loss), static_argnums=1)(slopes, attnx.Chunked(block_q=4, block_kv=3))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(want).min()) > 0


# ---- block skipping and memory ------------------------------------------------------------------------------------
def _live(T, S, mask, mask_mod=None, bq=4, bk=4, N=2):
    q, k, v = _qkv(B=2, T=T, S=S, N=N, K=1)
    args = canonicalize(q, k, v, mask=mask, mask_mod=mask_mod)
    g = chunked._geometry(args, attnx.Chunked(block_q=bq, block_kv=bk))
    return np.asarray(chunked._live_table(g, args.mask, args.mask_mod)), g


def test_causal_and_window_bound_the_key_loop_statically():
    live, g = _live(16, 16, attnx.Mask(causal=True))
    np.testing.assert_array_equal(live[:, :4], np.tril(np.ones((4, 4), bool)))
    live, g = _live(32, 32, attnx.Mask(window=(3, 0), causal=True))
    assert g.span == 2  # the tangent scan walks 2 key blocks per query block, not 8
    assert live.sum() == 1 + 2 * 7  # 8 query blocks: the diagonal block plus the one before it (none for the first)


def test_dynamic_masks_mark_dead_blocks():
    ids = jnp.asarray(np.repeat([[0, 1], [0, 1]], 8, axis=1), jnp.int32)  # [2, 16]: two 8-token documents
    live, _ = _live(16, 16, attnx.Mask(q_segment_ids=ids, kv_segment_ids=ids))
    np.testing.assert_array_equal(live[:, :4], np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))
    live, _ = _live(16, 16, attnx.Mask(kv_lengths=jnp.array([5, 3])))
    np.testing.assert_array_equal(live[:, :4].any(0), [True, True, False, False])
    bm = jnp.zeros((8, 8), bool).at[0, 7].set(True)  # user blocks of 2: only query block 0, key block 3
    live, _ = _live(16, 16, attnx.Mask(block_mask=bm, block_size=(2, 2)))
    assert live.sum() == 1 and live[0, 3]
    live, _ = _live(16, 16, None, mask_mod=lambda b, n, t, j: (t // 8) == (j // 8))
    np.testing.assert_array_equal(live[:, :4], np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))


def _grad_temp_bytes(T, implementation):
    q = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attnx.dot_product_attention(
        q, k, v, mask=attnx.Mask(causal=True), implementation=implementation)), argnums=(0, 1, 2)))
    return f.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


def test_chunked_backward_memory_grows_linearly_not_quadratically():
    """Compiler-reported temporaries of the gradient: chunked grows ~2x when T doubles, reference ~4x."""
    cfg = attnx.Chunked(block_q=128, block_kv=128)
    c1, c2 = _grad_temp_bytes(1024, cfg), _grad_temp_bytes(2048, cfg)
    r2 = _grad_temp_bytes(2048, "reference")
    assert c2 < 2.6 * c1, (c1, c2)
    assert c2 * 8 < r2, (c2, r2)


# Slow: forward mode through chunked is checked on every conformance case.
@pytest.mark.slow
def test_jacfwd_through_chunked_matches_reference():
    """Forward-mode Jacobians (vmap of jvp), as used by consistency-model / MeanFlow training."""
    q, k, v = _qkv(B=1, T=5, S=7, N=2, K=1)

    def f(t, implementation):
        return attnx.dot_product_attention(q * t[0], k + t[1], v * t[2], mask=attnx.Mask(causal=True),
                                           implementation=implementation)

    t = jnp.asarray([1.1, 0.2, 0.9])
    want = jax.jacfwd(f)(t, "reference")
    got = jax.jit(jax.jacfwd(f), static_argnums=1)(t, attnx.Chunked(block_q=2, block_kv=3))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_second_order_reverse_mode_through_chunked():
    """grad of grad (gradient penalties, MAML): the outer derivative re-enters the custom rule."""
    q, k, v = _qkv(B=1, T=5, S=7, N=2, K=1)

    def inner(q, implementation):
        out = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True), implementation=implementation)
        return jnp.sum(out ** 2)

    def outer(q, implementation):
        return jnp.sum(jax.grad(inner)(q, implementation) ** 2)

    want = jax.grad(outer)(q, "reference")
    got = jax.jit(jax.grad(outer), static_argnums=1)(q, attnx.Chunked(block_q=2, block_kv=3))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("argnum", [1, 2, 3], ids=["key", "value", "bias"])
def test_gradient_with_respect_to_one_input(argnum):
    """The tangent rule's branches for inputs that carry no derivative (symbolic zeros)."""
    q, k, v = _qkv(T=7, S=6)
    bias = jnp.asarray(RNG.standard_normal((1, 4, 1, 6)), jnp.float32)

    def loss(q, k, v, bias, implementation):
        return jnp.sum(jnp.sin(attnx.dot_product_attention(q, k, v, bias, mask=attnx.Mask(causal=True),
                                                           implementation=implementation)))

    want = jax.grad(loss, argnums=argnum)(q, k, v, bias, "reference")
    got = jax.jit(jax.grad(loss, argnums=argnum), static_argnums=4)(q, k, v, bias, attnx.Chunked(3, 4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_vmap_over_mask_arrays():
    """vmap over per-example lengths and segment ids turns block skipping into selects; results must not change."""
    q, k, v = _qkv(B=3, T=9, S=9)
    lengths = jnp.asarray([9, 4, 0])
    ids = jnp.asarray(np.sort(RNG.integers(0, 3, (3, 9)), axis=1), jnp.int32)

    def one(q, k, v, n, seg, implementation):
        mask = attnx.Mask(causal=True, kv_lengths=n, q_segment_ids=seg, kv_segment_ids=seg)
        return attnx.dot_product_attention(q, k, v, mask=mask, implementation=implementation)

    want = one(q, k, v, lengths, ids, "reference")
    got = jax.jit(jax.vmap(lambda *a: one(*(x[None] for x in a), attnx.Chunked(4, 3))[0]))(q, k, v, lengths, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_errors_other_than_not_implemented_do_not_fall_through(monkeypatch):
    from attnx import api

    def broken(args, return_lse, cfg):
        raise RuntimeError("a real bug")

    monkeypatch.setitem(api._BACKENDS, "xla", (broken, api._BACKENDS["xla"][1]))
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="a real bug"):
        attnx.dot_product_attention(q, k, v, implementation=["xla", "reference"])


def test_pallas_kernels_off_their_device_fall_through_and_explain_says_so():
    q, k, v = _qkv()
    kernels = [attnx.PallasTpu(interpret=False), attnx.PallasGpu(interpret=False), "chunked"]
    out = attnx.dot_product_attention(q, k, v, implementation=kernels)
    assert out.shape == (2, 6, 4, 8)
    if jax.default_backend() not in ("gpu", "tpu"):
        # Named alone, a kernel that cannot run here raises instead of falling back; explain agrees.
        with pytest.raises(NotImplementedError, match="needs a GPU"):
            attnx.dot_product_attention(q, k, v, implementation=attnx.PallasGpu(interpret=False))
        info = attnx.explain(q, k, v, implementation=kernels)
        assert info.chosen == "chunked", info
        assert "needs a GPU" in info.rejected["pallas_gpu"] and "needs a TPU" in info.rejected["pallas_tpu"]
        assert attnx.explain(q, k, v, implementation=attnx.PallasGpu(interpret=True)).chosen == "pallas_gpu"


def test_explain_with_lse_reports_what_actually_runs():
    q, k, v = _qkv()
    assert attnx.explain(q, k, v, implementation=["xla", "chunked"]).chosen == "xla"
    info = attnx.explain(q, k, v, implementation=["xla", "chunked"], with_lse=True)
    assert info.chosen == "chunked" and "stop_gradient" in info.rejected["xla"]


def test_user_functions_with_wrong_outputs_are_reported_by_name():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="score_mod"):
        attnx.dot_product_attention(q, k, v, score_mod=lambda s, b, n, t, j: s[..., :2])
    with pytest.raises(TypeError, match="mask_mod"):
        attnx.dot_product_attention(q, k, v, mask_mod=lambda b, n, t, j: (t - j).astype(jnp.float32))
    with pytest.raises(ValueError, match="mask_mod"):
        attnx.dot_product_attention(q, k, v, mask_mod=lambda b, n, t: t > 0)


def test_concrete_array_scale_is_accepted():
    q, k, v = _qkv()
    a = attnx.dot_product_attention(q, k, v, scale=1 / jnp.sqrt(8.0), implementation="reference")
    b = attnx.dot_product_attention(q, k, v, implementation="reference")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_chunked_gradients_inside_lax_cond_and_switch():
    """Regression: the chunked path's custom_jvp kept a JAX array built in the caller's trace in its nondiff
    argument, which leaked as a tracer when the attention sat inside a lax.cond / lax.switch branch under grad
    ("No constant handler for type DynamicJaxprTracer"); ring attention's causal chunk switch hit it."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 9, 4, 8)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, 9, 2, 8)), jnp.float32)
    attend = lambda q: attnx.dot_product_attention(q, kv, kv, mask=attnx.Mask(causal=True),
                                                   implementation=attnx.Chunked(4, 4))
    plain = jax.grad(lambda q: jnp.sum(jnp.sin(attend(q))))(q)
    in_cond = jax.jit(jax.grad(lambda q, flag: jnp.sum(jnp.sin(lax.cond(flag, attend, jnp.zeros_like, q)))))
    in_switch = jax.jit(jax.grad(lambda q, i: jnp.sum(jnp.sin(lax.switch(i, [jnp.zeros_like, attend], q)))))
    assert_close(in_cond(q, True), plain, jnp.float32, "gradient", "inside lax.cond")
    assert_close(in_switch(q, 1), plain, jnp.float32, "gradient", "inside lax.switch")

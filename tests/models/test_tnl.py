"""TransNormerLLM's mixer (models/layers/mixers/tnl.py) and the per-layer decay slopes of lightning layers: the layer
against a direct quadratic computation (forward and gradients), the norm and gate, the TNL schedule per layer,
recurrent decode against the full forward, and config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.linear.decay import alibi_slopes
from attnx.testing.tolerances import assert_close
from models.layers.mixers.tnl import TNLMixer, simple_rms_norm
from models.llm import LLM, LLMConfig

# B=2, T=7, width 24, N=4 query heads of H=6 over K=2 key/value heads; tile 3 so the chunked form crosses tiles.
B, T, D, N, K, H = 2, 7, 24, 4, 2, 6
X = jax.random.normal(jax.random.key(0), (B, T, D))
TNL = ("tnl", {"block_size": 3})
BASE = LLMConfig(vocab_size=53, width=D, depth=3, num_heads=N, num_kv_heads=K, mlp_width=40, layer_attention=(TNL,))


def mixer(layer_index=1, num_layers=3, **options):
    return TNLMixer(D, N, K, H, layer_index=layer_index, num_layers=num_layers, rngs=nnx.Rngs(1),
                    **{"block_size": 3, **options})


def direct(m: TNLMixer, x):
    """The TNL layer written out quadratically: o_t = sum_{j<=t} exp(-s (t-j)) (q_t . k_j) v_j, then SRMSNorm over
    all heads, times sigmoid(x W1 W2), then W_o. Independent of the module's own helpers."""
    silu = jax.nn.silu
    q = silu(jnp.einsum("btd,dnh->btnh", x, m.query_dnh[...]))
    k = jnp.repeat(silu(jnp.einsum("btd,dkh->btkh", x, m.key_dkh[...])), N // K, axis=2)
    v = jnp.repeat(silu(jnp.einsum("btd,dkh->btkh", x, m.value_dkh[...])), N // K, axis=2)
    s = jnp.asarray(m.slopes)
    gap = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    decay = jnp.where(gap >= 0, jnp.exp(-s[:, None, None] * jnp.maximum(gap, 0)), 0.0)  # [N, T, T]
    o = jnp.einsum("ntj,btnh,bjnh,bjnv->btnv", decay, q, k, v, precision="highest").reshape(B, T, N * H)
    o = o / jnp.sqrt(jnp.mean(o**2, axis=-1, keepdims=True) + 1e-6)
    gate = jax.nn.sigmoid(x @ m.gate_down_dr[...] @ m.gate_up_rnh[...].reshape(H, N * H))
    return (o * gate) @ m.out_nhd[...].reshape(N * H, D)


def test_layer_equals_the_direct_quadratic_form_forward_and_gradient():
    m = mixer()
    graphdef, params = nnx.split(m)
    loss = lambda fn: lambda p, x: jnp.sum(jnp.sin(fn(nnx.merge(graphdef, p), x)))

    @jax.jit  # one compilation per side: forward and both gradients together
    def forward_and_gradients(p, x):
        chunked = jax.value_and_grad(loss(lambda mod, x: mod(x)), argnums=(0, 1))(p, x)
        quadratic = jax.value_and_grad(loss(direct), argnums=(0, 1))(p, x)
        return nnx.merge(graphdef, p)(x), direct(nnx.merge(graphdef, p), x), chunked[1], quadratic[1]

    got, want, (g_params, g_x), (r_params, r_x) = forward_and_gradients(params, X)
    assert_close(got, want, jnp.float32, what="tnl forward")
    assert_close(g_x, r_x, jnp.float32, kind="gradient", what="d x")
    for (path, got), (_, want) in zip(jax.tree_util.tree_leaves_with_path(g_params),
                                      jax.tree_util.tree_leaves_with_path(r_params)):
        assert_close(got, want, jnp.float32, kind="gradient", what=jax.tree_util.keystr(path))


def test_shapes_gate_rank_and_causality():
    m = mixer()
    assert m.query_dnh.shape == (D, N, H) and m.key_dkh.shape == m.value_dkh.shape == (D, K, H)
    assert m.gate_down_dr.shape == (D, H) and m.gate_up_rnh.shape == (H, N, H)  # rank = head_dim
    changed = X.at[:, 4:].set(X[:, 4:] * -2.0 + 1.0)
    before, after = m(X), m(changed)
    np.testing.assert_allclose(before[:, :4], after[:, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(before[:, 4:], after[:, 4:])


def test_norm_removes_the_scale_and_a_zero_gate_halves_the_output():
    m = mixer()
    mixed = jax.random.normal(jax.random.key(3), (B, T, N, H))
    normed = simple_rms_norm(mixed.reshape(B, T, N * H))
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(normed**2, axis=-1)), 1.0, rtol=1e-5)
    # SRMSNorm sits before the gate and the output projection: the heads' output scale does not reach the output.
    np.testing.assert_allclose(m.output(X, 7.0 * mixed), m.output(X, mixed), rtol=1e-5, atol=1e-6)
    m.gate_up_rnh[...] = jnp.zeros_like(m.gate_up_rnh[...])  # sigmoid(0) = 1/2 for every feature
    expected = 0.5 * jnp.einsum("btf,fd->btd", normed, m.out_nhd[...].reshape(N * H, D))
    np.testing.assert_allclose(m.output(X, mixed), expected, rtol=1e-5, atol=1e-6)


def test_slopes_follow_the_tnl_schedule_per_layer():
    model = LLM(dataclasses.replace(BASE, layer_attention=(TNL, ("lightning", {"slopes": "tnl"}), TNL)),
                rngs=nnx.Rngs(0))
    alibi = alibi_slopes(N)
    slopes = [np.asarray(model.blocks[0].attention.slopes), np.asarray(dict(model.blocks[1].attention.kind_kwargs)[
        "slopes"]), np.asarray(model.blocks[2].attention.slopes)]
    for layer, got in enumerate(slopes):  # s_h (1 - l / (L - 1) + 1e-5), L = 3: factors 1, 1/2, 0 (+1e-5)
        np.testing.assert_allclose(got, alibi * (1 - layer / 2 + 1e-5), rtol=1e-6)
    assert slopes[2].min() > 0  # the last layer keeps a sliver of decay
    same = LLM(dataclasses.replace(BASE, layer_attention=(("tnl", {"slopes": "alibi"}),), depth=2),
               rngs=nnx.Rngs(0))
    for block in same.blocks:
        np.testing.assert_allclose(block.attention.slopes, alibi, rtol=1e-6)
    # A plain lightning layer keeps its function's default (ALiBi in every layer): nothing changes unless asked.
    plain = dataclasses.replace(BASE, attention="lightning", layer_attention=())
    assert plain.layer_config(2) is plain


def test_decode_with_the_recurrent_state_equals_the_full_forward():
    model = LLM(dataclasses.replace(BASE, depth=2), rngs=nnx.Rngs(2))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    decode = jax.jit(lambda s, t, c, i: nnx.merge(graphdef, s).decode(t, c, i))
    tokens = jax.random.randint(jax.random.key(4), (B, T), 0, 53)
    full = forward(state, tokens)
    cache = model.init_cache(B, T)
    assert cache[0]["state"].shape == (B, N, H, H)
    prefill, cache = decode(state, tokens[:, :5], cache, jnp.int32(0))
    np.testing.assert_allclose(prefill, full[:, :5], rtol=1e-5, atol=1e-5)
    for position in range(5, T):
        step, cache = decode(state, tokens[:, position:position + 1], cache, jnp.int32(position))
        np.testing.assert_allclose(step[:, 0], full[:, position], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(layer_attention=(("tnl", {"slopes": "linear"}),)),
     r"layer_attention\[0\]='tnl'.*tnl.slopes='linear'.*'tnl', 'alibi'"),
    (dict(layer_attention=(("tnl", {"slopes": [0.1, 0.2]}),)), r"tnl.slopes has 2 rates; .* num_heads=4"),
    (dict(layer_attention=(("tnl", {"window": 3}),)), r"tnl: unknown options \['window'\]"),
    (dict(layer_attention=(("tnl", {"block_size": 0}),)), r"tnl.block_size must be an int >= 1"),
    (dict(attention="tnl", layer_attention=()), r"attention='tnl' is one of the LLM's own mixers.*layer_attention"),
    (dict(layer_attention=(("softmax", {"slopes": "tnl"}),)), r"decay schedule of 'lightning' and 'tnl'"),
    (dict(attention="lightning", attention_kwargs={"slopes": "fast"}), r"slopes='fast'"),
])
def test_bad_tnl_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASE, **overrides)

"""Per-layer token mixers in the LLM (LLMConfig.layer_attention), Zoology's BaseConv (short and implicit long
convolutions) and the Based hybrid LM: layers against direct computations, decode against the full forward, config
errors, and a few training steps that lower the loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnx.testing.tolerances import assert_close
from models.layers.attention import Attention
from models.layers.mixers.base_conv import BaseConv, causal_long_conv
from models.llm import LLM, LLMConfig

B, T, D = 2, 7, 12
X = jax.random.normal(jax.random.key(0), (B, T, D))
BASE = LLMConfig(vocab_size=41, width=D, depth=5, num_heads=2, num_kv_heads=1, mlp_width=20)
# The Based mix (based-360m's period 5) plus both convolution kinds; 5 layers of distinct kinds in one model.
HYBRID = dataclasses.replace(BASE, layer_attention=(
    "base_conv", ("based", {"qk_head_dim": 4, "block_size": 3}), ("sliding_window", {"window": 3}),
    ("base_conv", {"kernel_size": -1, "l_max": 16}), ("tnl", {"block_size": 3})))


def short_conv_direct(m: BaseConv, u):
    """Zoology's BaseConv written out: torch Conv1d(groups=D, padding=k-1)[..., :T] is y_t = sum_i w_i u_{t-k+1+i}."""
    k = m.kernel_size
    padded = jnp.pad(u, ((0, 0), (k - 1, 0), (0, 0)))
    conv = jnp.stack([sum(padded[:, t + i] * m.conv_kd[i] for i in range(k)) for t in range(T)], axis=1)
    return (conv + m.conv_bias_d[...]) * (u @ m.proj_dd[...] + m.proj_bias_d[...]) + u



def assert_module_matches(module, direct, what):
    """module(X) equals direct(module, X), and so do the gradients of a sin-sum loss for parameters and input."""
    graphdef, params = nnx.split(module)
    loss = lambda fn: lambda p, x: jnp.sum(jnp.sin(fn(nnx.merge(graphdef, p), x)))

    @jax.jit
    def forward_and_gradients(p, x):
        return (nnx.merge(graphdef, p)(x), direct(nnx.merge(graphdef, p), x),
                jax.grad(loss(lambda mod, x: mod(x)), argnums=(0, 1))(p, x),
                jax.grad(loss(direct), argnums=(0, 1))(p, x))

    got, want, got_grads, want_grads = forward_and_gradients(params, X)
    assert_close(got, want, jnp.float32, what=f"{what} forward")
    for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
        assert_close(g, w, jnp.float32, kind="gradient", what=f"{what} gradient")

def test_short_base_conv_equals_the_direct_form_forward_and_gradient():
    m = BaseConv(D, kernel_size=3, rngs=nnx.Rngs(1))
    assert m.conv_kd.shape == (3, D) and m.proj_dd.shape == (D, D)
    assert_module_matches(m, short_conv_direct, "base_conv")


def test_based_variant_equals_its_direct_form_forward_and_gradient():
    """HazyResearch/based's BaseConv: [u1, u2] = x W_in + b, y = (SiLU(conv(u1)) * u2) W_out + b, no conv bias."""
    m = BaseConv(D, variant="based", expand=4, kernel_size=3, rngs=nnx.Rngs(9))
    assert m.in_proj_de.shape == (D, 4 * D) and m.conv_kd.shape == (3, 2 * D) and m.out_proj_ed.shape == (2 * D, D)

    def direct(mod, x):
        h = x @ mod.in_proj_de[...] + mod.in_bias_e[...]
        u, gate = h[..., :2 * D], h[..., 2 * D:]
        padded = jnp.pad(u, ((0, 0), (2, 0), (0, 0)))
        conv = jnp.stack([sum(padded[:, t + i] * mod.conv_kd[i] for i in range(3)) for t in range(T)], axis=1)
        return (jax.nn.silu(conv) * gate) @ mod.out_proj_ed[...] + mod.out_bias_d[...]

    assert_module_matches(m, direct, "based-variant")


def test_implicit_long_convolution_is_causal_and_equals_the_direct_sum():
    h = jax.random.normal(jax.random.key(2), (T, D))
    direct = jnp.stack([sum(h[j] * X[:, t - j] for j in range(t + 1)) for t in range(T)], axis=1)
    assert_close(causal_long_conv(X, h), direct, jnp.float32, what="fft long convolution")
    m = BaseConv(D, kernel_size=-1, l_max=16, rngs=nnx.Rngs(3))
    filt = m.long_filter(T)
    assert filt.shape == (T, D)
    # The exponential modulation: the fastest channel decays to 1% at 30% of the l_max grid, the slowest at 150%.
    unmodulated = m.long_filter(16) / jnp.exp(-jnp.linspace(0, 1, 16)[:, None] * jnp.abs(
        jnp.linspace(np.log(1e-2) / 1.5, np.log(1e-2) / 0.3, D)))
    assert np.all(np.isfinite(np.asarray(unmodulated)))
    expected = causal_long_conv(X, filt) + X
    np.testing.assert_allclose(m(X), expected * (X @ m.proj_dd[...] + m.proj_bias_d[...]) + X, rtol=1e-5, atol=1e-5)
    changed = X.at[:, 5:].set(0.0)
    np.testing.assert_allclose(m(changed)[:, :5], m(X)[:, :5], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds l_max=16"):
        m.long_filter(17)


def test_hybrid_builds_each_layer_from_its_entry():
    model = nnx.eval_shape(lambda: LLM(HYBRID, rngs=nnx.Rngs(4)))  # shapes only: nothing to compute here
    kinds = [block.attention.kind for block in model.blocks]
    assert kinds == ["base_conv", "based", "sliding_window", "base_conv", "tnl"]
    assert isinstance(model.blocks[1].attention, Attention)
    assert model.blocks[1].attention.query_dnh.shape == (D, 2, 4)  # the Based layer's 4-wide query/key heads
    assert model.blocks[2].attention.query_dnh.shape == (D, 2, 6)  # the sliding-window layer keeps full heads
    assert model.blocks[3].attention.filter_out_od.shape == (16, D)  # the implicit filter MLP's last layer


def test_convolution_layers_decode_like_the_full_forward():
    """Short convolution (a k-1 window), the based variant (a window of its inner half) and the implicit long
    convolution (all inputs); based / sliding_window / tnl decode are tested with their own layers."""
    config = dataclasses.replace(BASE, depth=3, layer_attention=(
        HYBRID.layer_attention[0], ("base_conv", {"variant": "based", "expand": 4}), HYBRID.layer_attention[3]))
    model = LLM(config, rngs=nnx.Rngs(4))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    decode = jax.jit(lambda s, t, c, i: nnx.merge(graphdef, s).decode(t, c, i))
    tokens = jax.random.randint(jax.random.key(5), (B, T), 0, 41)
    full = forward(state, tokens)
    cache = model.init_cache(B, 9)  # longer than the sequence: unwritten slots must not matter
    assert cache[0]["window"].shape == (B, 2, D) and cache[1]["window"].shape == (B, 2, 2 * D)
    assert cache[2]["inputs"].shape == (B, 9, D)
    prefill, cache = decode(state, tokens[:, :4], cache, jnp.int32(0))
    np.testing.assert_allclose(prefill, full[:, :4], rtol=1e-5, atol=1e-5)
    for position in range(4, T):
        step, cache = decode(state, tokens[:, position:position + 1], cache, jnp.int32(position))
        np.testing.assert_allclose(step[:, 0], full[:, position], rtol=1e-5, atol=1e-5)


def test_a_pattern_repeats_over_the_depth_and_none_inherits_the_attention():
    config = dataclasses.replace(BASE, attention="sliding_window", attention_kwargs={"window": 2},
                                 layer_attention=("base_conv", None))
    assert [config.layer_mixer(layer) for layer in range(5)] == [
        ("base_conv", {}), ("sliding_window", {"window": 2})] * 2 + [("base_conv", {})]
    assert config.layer_config(1).attention_kwargs == {"window": 2} and config.layer_config(1).layer_attention == ()
    assert config.layer_config(0) is config  # a mixer layer's block takes its norms and MLP from the model's config


def test_no_layer_attention_builds_exactly_the_previous_model():
    """The default path is untouched: same config object per layer, same parameters from the same seed as an
    explicit all-None pattern."""
    assert BASE.layer_config(3) is BASE
    plain = nnx.state(LLM(BASE, rngs=nnx.Rngs(6)), nnx.Param)
    inherited = nnx.state(LLM(dataclasses.replace(BASE, layer_attention=(None,)), rngs=nnx.Rngs(6)), nnx.Param)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(inherited)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layer_attention, message", [
    ("based", r"layer_attention must be a tuple of entries"),
    (("nope",), r"layer_attention\[0\].attention='nope'.*unknown"),
    ((("based",),), r"layer_attention\[0\]=\('based',\): expected None.*'base_conv', 'tnl'"),
    ((None, ("based", [("block_size", 3)])), r"layer_attention\[1\]=.*expected None"),
    (("base_conv", "cosformer"), r"layer_attention\[1\].attention='cosformer'.*does not support causal"),
    ((("base_conv", {"qk_head_dim": 4}),), r"qk_head_dim is a layer option of attention layers"),
    ((("based", {"qk_head_dim": -1}),), r"qk_head_dim must be an int >= 0"),
    ((("base_conv", {"kernel_size": -1}),), r"layer_attention\[0\]='base_conv'.*needs l_max"),
    ((("base_conv", {"kernel_size": 0}),), r"base_conv.kernel_size=0"),
    ((("base_conv", {"window": 3}),), r"base_conv: unknown options \['window'\]"),
    ((("base_conv", {"variant": "hyena"}),), r"base_conv.variant='hyena'; allowed: \['zoology', 'based'\]"),
    ((("base_conv", {"expand": 4}),), r"base_conv.expand=4: an int >= 1 of variant 'based'"),
    ((("base_conv", {"variant": "based", "kernel_size": -1}),), r"variant='based' has a short convolution only"),
])
def test_bad_layer_attention_is_named(layer_attention, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASE, layer_attention=layer_attention)


def test_top_level_qk_head_dim_kwarg_is_refused():
    with pytest.raises(ValueError, match=r"use LLMConfig.qk_head_dim for every layer"):
        dataclasses.replace(BASE, attention="based", attention_kwargs={"qk_head_dim": 4})


@pytest.mark.slow  # default-suite time budget: a training smoke test; the Based LM's forward and decode run by default
def test_based_lm_trains_a_few_steps_and_the_loss_goes_down():
    config = dataclasses.replace(BASE, depth=3, use_mlp=False, layer_attention=HYBRID.layer_attention[:3])
    model = LLM(config, rngs=nnx.Rngs(7))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(8), (4, 9), 0, 41)

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(8)]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses

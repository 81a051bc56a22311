"""Shared layers: patches, 2-D sin-cos positions, LayerNorm, the GELU MLP, and the attention layer's options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers.attention import Attention
from models.layers.mlp import GeluMlp
from models.layers.norm import LayerNorm
from models.layers.patch import PatchEmbed, patchify, sincos_1d, sincos_2d, unpatchify


def test_unpatchify_inverts_patchify_and_tokens_are_row_major_patches():
    images = jax.random.normal(jax.random.key(0), (2, 6, 10, 3))  # grid 3 x 5 of 2 x 2 patches
    tokens = patchify(images, 2)
    assert tokens.shape == (2, 15, 12)
    np.testing.assert_array_equal(unpatchify(tokens, 2, (3, 5), 3), images)
    # Token 6 is grid cell (1, 1): rows 2..3, columns 2..3, flattened (row, column, channel).
    np.testing.assert_array_equal(tokens[:, 6], images[:, 2:4, 2:4, :].reshape(2, 12))


def test_patch_errors_name_the_sizes():
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        patchify(jnp.zeros((1, 6, 8, 1)), 4)
    with pytest.raises(ValueError, match="do not match grid"):
        unpatchify(jnp.zeros((1, 6, 4)), 2, (2, 2), 1)


def test_patch_embed_equals_a_strided_convolution():
    embed = PatchEmbed(2, 3, 5, rngs=nnx.Rngs(0))
    embed.bias_d[...] = jnp.arange(5.0)
    images = jax.random.normal(jax.random.key(1), (2, 4, 6, 3))
    kernel = embed.kernel_pd[...].reshape(2, 2, 3, 5)  # (row, column, channel) -> HWIO
    expected = jax.lax.conv_general_dilated(images, kernel, (2, 2), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + jnp.arange(5.0)
    np.testing.assert_allclose(embed(images), expected.reshape(2, 6, 5), rtol=1e-5, atol=1e-5)


def test_sincos_2d_splits_channels_between_column_and_row():
    table = sincos_2d(8, (2, 3))
    assert table.shape == (6, 8) and table.dtype == np.float32
    columns, rows = np.tile(np.arange(3), 2), np.repeat(np.arange(2), 3)
    np.testing.assert_allclose(table[:, :4], sincos_1d(4, columns), atol=1e-7)
    np.testing.assert_allclose(table[:, 4:], sincos_1d(4, rows), atol=1e-7)
    np.testing.assert_allclose(sincos_1d(4, np.array([2.0])), [[np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)]],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, (2, 2))


def test_layer_norm_with_and_without_affine():
    x = jax.random.normal(jax.random.key(2), (3, 7)) * 5 + 2
    plain = LayerNorm(7, use_scale=False, use_bias=False)
    assert not nnx.state(plain, nnx.Param)  # DiT's norms own no parameters
    y = plain(x)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    affine = LayerNorm(7)
    affine.scale_d[...] = jnp.full((7,), 2.0)
    affine.bias_d[...] = jnp.ones((7,))
    np.testing.assert_allclose(affine(x), 2 * y + 1, rtol=1e-5, atol=1e-5)


def test_gelu_mlp_exact_and_tanh():
    x = jax.random.normal(jax.random.key(3), (2, 3, 6))
    exact = GeluMlp(6, 10, rngs=nnx.Rngs(0))
    tanh = GeluMlp(6, 10, approximate=True, rngs=nnx.Rngs(0))
    expected = jax.nn.gelu(x @ exact.fc1_df[...], approximate=False) @ exact.fc2_fd[...]
    np.testing.assert_allclose(exact(x), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(exact(x), tanh(x), atol=1e-7)


# Slow: a property of the layer plumbing, covered by the family tests.
@pytest.mark.slow
def test_attention_without_rope_is_permutation_equivariant_and_biases_are_used():
    layer = Attention(12, 3, 3, 4, causal=False, use_rope=False, use_bias=True, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(5), (2, 5, 12))
    order = jnp.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(layer(x)[:, order], layer(x[:, order]), rtol=1e-5, atol=1e-5)
    before = layer(x)
    layer.out_bias_d[...] = jnp.ones((12,))
    np.testing.assert_allclose(layer(x), before + 1, rtol=1e-5, atol=1e-5)
    with_rope = Attention(12, 3, 3, 4, causal=False, rngs=nnx.Rngs(4))
    assert not np.allclose(with_rope(x)[:, order], with_rope(x[:, order]), atol=1e-4)


def test_qk_norm_bounds_the_logits_and_probabilities_are_rows_of_a_softmax():
    layer = Attention(12, 4, 2, 6, causal=True, qk_norm=True, rngs=nnx.Rngs(6))
    x = 100.0 * jax.random.normal(jax.random.key(7), (2, 5, 12))
    query, key, _ = layer.project(x)
    # RMS-normalised heads (rotation preserves the norm): |q| = |k| = sqrt(H).
    np.testing.assert_allclose(jnp.linalg.norm(query, axis=-1), np.sqrt(6), rtol=1e-3)
    np.testing.assert_allclose(jnp.linalg.norm(key, axis=-1), np.sqrt(6), rtol=1e-3)
    probabilities = layer.attention_probabilities(x)
    assert probabilities.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(probabilities.sum(-1), 1, rtol=1e-5)
    np.testing.assert_array_equal(np.triu(np.asarray(probabilities[0, 0]), 1), 0)


def test_probabilities_are_refused_for_other_mechanisms():
    layer = Attention(12, 3, 3, 4, kind="sliding_window", kind_kwargs={"window": 2}, causal=False,
                      rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="only plain 'softmax'"):
        layer.attention_probabilities(jnp.zeros((1, 4, 12)))


def test_spatial_mechanisms_and_their_weight_modules_get_the_token_grid(monkeypatch):
    """The layer hands `grid` to mechanisms registered spatial (and their ROUTERS module), and only to them."""
    from attnx import registry
    from models.layers import attention as attention_module
    from models.layers.attention import token_mixer

    registry.list_attentions()  # registers the built-ins before the probe entry goes in
    seen = []

    def probe(query, key, value, *, causal=False, grid=None):
        seen.append(grid)
        return value

    class ProbeRouter(nnx.Module):
        def __init__(self, width, num_heads, *, grid, rngs, param_dtype, **options):
            self.built_with = grid

        def __call__(self, x, query, key):
            return {}

    monkeypatch.setitem(registry._REGISTRY, "probe_spatial", registry.AttentionSpec(
        name="probe_spatial", fn=probe, reference=probe, patterns={"NS"}, paper="test probe", spatial=True))
    monkeypatch.setitem(attention_module.ROUTERS, "probe_spatial", ProbeRouter)
    layer = token_mixer(16, 2, attention="probe_spatial", attention_kwargs={}, grid=(2, 3), rngs=nnx.Rngs(0))
    layer(jnp.ones((1, 6, 16)))
    assert seen == [(2, 3)] and layer.router.built_with == (2, 3)
    assert token_mixer(16, 2, attention="softmax", attention_kwargs={}, grid=(2, 3), rngs=nnx.Rngs(0)).grid is None
    with pytest.raises(ValueError, match="grid must be a tuple of positive ints"):
        token_mixer(16, 2, attention="probe_spatial", attention_kwargs={}, grid=(2, 0), rngs=nnx.Rngs(0))

    class WholeLayer(nnx.Module):  # a SPATIAL_MIXERS entry replaces the attention layer
        def __init__(self, width, num_heads, *, grid, use_bias, rngs, param_dtype, **options):
            self.grid, self.options = grid, options

    monkeypatch.setitem(attention_module.SPATIAL_MIXERS, "probe_spatial", WholeLayer)
    mixer = token_mixer(16, 2, attention="probe_spatial", attention_kwargs={"window": 2}, grid=(2, 3),
                        rngs=nnx.Rngs(0))
    assert isinstance(mixer, WholeLayer) and mixer.grid == (2, 3) and mixer.options == {"window": 2}


# Slow: a MoH x spatial-core integration; both are tested alone.
@pytest.mark.slow
def test_moh_around_a_spatial_core_passes_the_grid_on():
    """MoH gates around neighbourhood attention in a ViT block: the core sees the layer's grid (a different grid
    gives a different neighbourhood, so a different output), and the layer is gates x core, projected."""
    import attnx
    from attnx.ops.heads.moh import apply_head_gates
    from models.layers.attention import token_mixer

    kwargs = {"core": "neighborhood", "core_kwargs": {"kernel_size": 2}, "n_shared": 1, "top_k": 1}
    x = jax.random.normal(jax.random.key(0), (1, 16, 16))
    square, wide = (token_mixer(16, 2, attention="moh", attention_kwargs=kwargs, grid=grid, rngs=nnx.Rngs(0))
                    for grid in ((4, 4), (2, 8)))
    query, key, value = square.project_heads(x)
    gates = square._call_kwargs(x, query, key)["gates"]
    core = attnx.get_attention("neighborhood").reference(query, key, value, grid=(4, 4), kernel_size=2)
    np.testing.assert_allclose(square(x), square.output(apply_head_gates(core, gates)), atol=1e-5)
    assert not np.allclose(square(x), wide(x), atol=1e-3)

"""TransNeXt layers (models/layers/mixers/transnext.py): the aggregated attention layer equals the pure function on
its own projections (pooled keys/values through the same key/value weights), the stage-4 form, the convolutional
GLU against an explicit depth-wise convolution (vision spec §6(e)5), and a tiny hierarchical ViT built from them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.aggregated import aggregated_reference
from attnx.testing.tolerances import assert_close
from models.layers.mixers import SPATIAL_MIXERS
from models.layers.mixers.transnext import AggregatedAttention, ConvGLU
from models.layers.vision import MLPS
from models.vit import ViT, ViTConfig, ViTStage
from nnx_helpers import apply, filled_from_numpy

WIDTH, HEADS, GRID = 8, 2, (4, 4)


def _layer(**kwargs):
    return AggregatedAttention(WIDTH, HEADS, grid=GRID, cpb_hidden=16, rngs=nnx.Rngs(0), **kwargs)


@pytest.fixture(scope="module")
def random_layer():
    return filled_from_numpy(lambda: _layer(sr_ratio=2), 1)


def test_layer_is_the_pure_function_on_its_projections_with_shared_pooled_key_value_weights(random_layer):
    layer = random_layer
    assert SPATIAL_MIXERS["aggregated"] is AggregatedAttention and layer.kind == "aggregated"
    x = jax.random.normal(jax.random.key(2), (2, 16, WIDTH))
    p = lambda name: np.asarray(getattr(layer, name)[...])
    project = lambda x, w, b: np.einsum("btd,dnh->btnh", x, p(w)) + p(b)
    # pooled branch by hand: 1x1 conv, exact GELU, 2x2 mean pooling of the 4x4 grid, LayerNorm (eps 1e-5)
    hidden = np.asarray(jax.nn.gelu(jnp.asarray(np.asarray(x) @ p("sr_dd") + p("sr_bias_d")), approximate=False))
    pooled = hidden.reshape(2, 2, 2, 2, 2, WIDTH).mean((2, 4)).reshape(2, 4, WIDTH)
    pooled = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True) + 1e-5)
    pooled = pooled * p("norm_scale_d") + p("norm_bias_d")
    mixed = jax.jit(aggregated_reference, static_argnames=("grid", "window", "pooled_grid"))(
        project(x, "query_dnh", "query_bias_nh"), project(x, "key_dnh", "key_bias_nh"),
        project(x, "value_dnh", "value_bias_nh"), grid=GRID, window=3,
        pooled_key=project(pooled, "key_dnh", "key_bias_nh"),
        pooled_value=project(pooled, "value_dnh", "value_bias_nh"), pooled_grid=(2, 2),
        temperature=p("temperature_n"), query_embedding=p("query_embedding_nh"), local_bias=p("local_bias_nt"),
        learnable_tokens=p("learnable_tokens_nht"), learnable_bias=p("learnable_bias_nt"),
        cpb=(p("cpb_fc1_2c"), p("cpb_fc1_bias_c"), p("cpb_fc2_cn"), p("cpb_fc2_bias_n")))
    expected = np.einsum("btnh,nhd->btd", mixed, p("out_nhd")) + p("out_bias_d")
    assert_close(apply(layer, x), expected, jnp.float32)


def test_weight_shapes_and_pooled_grid():
    layer = nnx.eval_shape(lambda: AggregatedAttention(WIDTH, HEADS, grid=GRID, sr_ratio=2, rngs=nnx.Rngs(0)))
    assert layer.pooled_grid == (2, 2) and layer.cpb_fc1_2c.shape == (2, 512)
    assert layer.learnable_tokens_nht.shape == (HEADS, WIDTH // HEADS, 9) and layer.local_bias_nt.shape == (HEADS, 9)
    assert nnx.eval_shape(lambda: _layer(pool_size=3)).pooled_grid == (3, 3)
    assert nnx.eval_shape(lambda: _layer(sr_ratio=1)).learnable_tokens_nht is None


def test_sr_ratio_one_is_the_full_attention_stage_without_local_or_pooled_weights():
    layer = filled_from_numpy(lambda: AggregatedAttention(WIDTH, HEADS, grid=(2, 3), sr_ratio=1, cpb_hidden=8,
                                                rngs=nnx.Rngs(0)), 2)
    assert layer.window is None and layer.sr_dd is None and layer.learnable_tokens_nht is None
    x = jax.random.normal(jax.random.key(3), (1, 6, WIDTH))
    out = apply(layer, x)
    # permuting the batch of tokens' *contents* changes the output (positions matter through the CPB), but with
    # a zero CPB the full stage is permutation-equivariant like plain attention
    nnx.update(layer, {"cpb_fc2_cn": jnp.zeros_like(layer.cpb_fc2_cn[...]),
                       "cpb_fc2_bias_n": jnp.zeros_like(layer.cpb_fc2_bias_n[...])})
    perm = np.array([3, 0, 5, 1, 4, 2])
    assert_close(apply(layer, x[:, perm]), apply(layer, x)[:, perm], jnp.float32)
    assert out.shape == (1, 6, WIDTH)


def test_class_tokens_and_bad_options_are_refused(random_layer):
    layer = random_layer
    with pytest.raises(ValueError, match="pooling='mean'"):
        layer(jnp.zeros((1, 17, WIDTH)))
    with pytest.raises(ValueError, match="sr_ratio"):
        AggregatedAttention(WIDTH, HEADS, grid=GRID, sr_ratio=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window"):
        AggregatedAttention(WIDTH, HEADS, grid=GRID, window=4, rngs=nnx.Rngs(0))


def test_moh_vit_gates_scale_heads_before_the_output_projection():
    # MoH-ViT (vision spec §10): one shared head (gate 2 w0) and one routed head (top-1 of 1: gate 2 w1), w =
    # softmax(x W0). Silencing head 1 in the output projection leaves gated = w0-scaled plain, token by token.
    gated = filled_from_numpy(lambda: _layer(sr_ratio=2, n_shared=1, top_k=1), 3)
    plain = nnx.clone(gated)
    plain.router = None
    for layer in (gated, plain):
        layer.out_nhd[...] = layer.out_nhd[...].at[1].set(0.0)
        layer.out_bias_d[...] = jnp.zeros(WIDTH)
    x = jax.random.normal(jax.random.key(8), (2, 16, WIDTH))
    w0 = 2 * jax.nn.softmax(x @ gated.router.mix_d2[...], axis=-1)[..., :1]
    assert_close(apply(gated, x), w0 * apply(plain, x), jnp.float32)


def test_conv_glu_matches_an_explicit_depthwise_convolution():
    glu = filled_from_numpy(lambda: ConvGLU(WIDTH, 12, grid=(3, 4), rngs=nnx.Rngs(0)), 4)
    assert MLPS["convglu"] is ConvGLU and glu.fc1_df.shape == (WIDTH, 2 * 8)  # hidden int(2 * 12 / 3) = 8
    x = jax.random.normal(jax.random.key(5), (2, 1 + 12, WIDTH))  # one class token in front
    p = lambda name: np.asarray(getattr(glu, name)[...])
    h = np.asarray(x) @ p("fc1_df") + p("fc1_bias_f")
    a, gate = h[..., :8], h[..., 8:]
    kernel = p("dwconv_33f")
    image = np.pad(a[:, 1:].reshape(2, 3, 4, 8), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros((2, 3, 4, 8))
    for y in range(3):
        for x_ in range(4):
            conv[:, y, x_] = np.einsum("bijf,ijf->bf", image[:, y:y + 3, x_:x_ + 3], kernel)
    conv = np.concatenate([a[:, :1] * kernel[1, 1], conv.reshape(2, 12, 8)], axis=1) + p("dwconv_bias_f")
    gelu = 0.5 * conv * (1 + np.vectorize(math.erf)(conv / math.sqrt(2)))
    expected = (gelu * gate) @ p("fc2_fd") + p("fc2_bias_d")
    assert_close(apply(glu, x), expected, jnp.float32)


@pytest.mark.slow  # building and compiling a two-stage ViT takes ~20 s of one CPU core
def test_tiny_transnext_style_vit_trains_a_step():
    # stage 1: aggregated (4x4 grid pooled to 2x2); stage 2: the full-attention stage (sr_ratio 1) on 2x2
    config = ViTConfig(image_size=8, patch_size=2, width=16, depth=1, num_heads=2, mlp_width=24, pooling="mean",
                       attention="aggregated", attention_kwargs={"sr_ratio": 2}, mlp="convglu",
                       stages=(ViTStage(width=16, depth=1, num_heads=2, mlp_width=24,
                                        attention_kwargs={"sr_ratio": 1}),))
    model = ViT(config, rngs=nnx.Rngs(0))
    for _, layer in nnx.iter_graph(model):  # the code's initial values
        if isinstance(layer, AggregatedAttention):
            np.testing.assert_allclose(jax.nn.softplus(layer.temperature_n[...]), 1 / 0.24, rtol=1e-5)
            assert float(jnp.std(layer.query_embedding_nh[...])) < 0.05
            assert layer.window is None or (not np.any(layer.learnable_bias_nt[...])
                                            and float(jnp.std(layer.local_bias_nt[...])) < 1e-3)
    model = filled_from_numpy(lambda: ViT(config, rngs=nnx.Rngs(0)), 7)  # a zero-initialised head would zero every gradient
    kinds = {m.kind for _, m in nnx.iter_graph(model) if hasattr(m, "kind")}
    assert kinds == {"aggregated"}
    images = jax.random.normal(jax.random.key(6), (2, 8, 8, 1))

    @nnx.jit
    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: jnp.mean(m(images) ** 2))(model)

    loss, grads = loss_and_grads(model)
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves(nnx.state(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) > 0 for g in leaves) > 0.9 * len(leaves)

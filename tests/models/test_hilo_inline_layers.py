"""LITv2 and InLine in the models: the HiLo layer (SPATIAL_MIXERS, per-branch projections) equals the per-head
attention function around its own projections, InLine's kernel generator (ROUTERS) feeds the attention function the
per-image residual kernels (class token excluded), LITv2's depth-wise convolution FFN (MLPS 'dwconv') against an
explicit convolution, and tiny ViTs built from them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.hilo.hilo import hilo_attention
from attnx.ops.linear.inline import inline_attention, inline_reference, residual_kernels
from attnx.testing.tolerances import assert_close
from models.layers.attention import Attention, token_mixer
from models.layers.mixers import ROUTERS, SPATIAL_MIXERS
from models.layers.mixers.hilo import DWConvMlp, HiLo
from models.layers.mixers.inline import InLineResidual
from models.layers.vision import MLPS
from models.vit import ViT, ViTConfig, ViTStage
from nnx_helpers import apply, filled_from_numpy

WIDTH, HEADS = 16, 4


@nnx.jit
def _hilo_by_heads(layer, x):
    """HiLo from the registered per-head function: q/k/v of both branches at full resolution, then the two
    output projections on their own channel blocks."""
    B, T, _ = x.shape
    d = WIDTH // HEADS
    lin = lambda name: x @ getattr(layer, name)[...] + getattr(layer, name + "_bias")[...]
    hq, hk, hv = jnp.split(lin("h_qkv").reshape(B, T, 3, -1, d), 3, axis=2)
    lk, lv = jnp.split(lin("l_kv").reshape(B, T, 2, -1, d), 2, axis=2)
    q = jnp.concatenate([hq[:, :, 0], lin("l_q").reshape(B, T, -1, d)], 2)
    k, v = (jnp.concatenate([a[:, :, 0], b[:, :, 0]], 2) for a, b in ((hk, lk), (hv, lv)))
    heads = hilo_attention(q, k, v, grid=layer.grid, alpha=layer.alpha, window=layer.window)
    n_hi = hq.shape[3]
    hi = heads[:, :, :n_hi].reshape(B, T, -1) @ layer.h_proj[...] + layer.h_proj_bias[...]
    lo = heads[:, :, n_hi:].reshape(B, T, -1) @ layer.l_proj[...] + layer.l_proj_bias[...]
    return jnp.concatenate([hi, lo], -1)


def test_hilo_layer_is_the_head_function_around_its_branch_projections():
    assert SPATIAL_MIXERS["hilo"] is HiLo
    layer = filled_from_numpy(lambda: token_mixer(WIDTH, HEADS, attention="hilo", attention_kwargs={"alpha": 0.5, "window": 2},
                                        grid=(4, 6), rngs=nnx.Rngs(0)), 1)
    assert isinstance(layer, HiLo) and layer.kind == "hilo"
    # 2 Hi-Fi + 2 Lo-Fi heads of 4 channels; block-diagonal output: h_proj 8 -> 8, l_proj 8 -> 8
    assert layer.h_qkv.shape == (16, 24) and layer.h_proj.shape == (8, 8)
    assert layer.l_q.shape == (16, 8) and layer.l_kv.shape == (16, 16) and layer.l_proj.shape == (8, 8)
    x = jax.random.normal(jax.random.key(0), (2, 24, WIDTH))
    assert_close(apply(layer, x), _hilo_by_heads(layer, x), jnp.float32)


def test_hilo_layer_options_and_refusals():
    shapes = lambda **kw: {name: getattr(m, name) is not None for m in [nnx.eval_shape(
        lambda: HiLo(WIDTH, HEADS, grid=(4, 4), rngs=nnx.Rngs(0), **kw))] for name in ("h_qkv", "l_q", "l_q_bias")}
    assert shapes(window=1) == {"h_qkv": False, "l_q": True, "l_q_bias": True}  # ws = 1: plain MHSA
    assert shapes(alpha=0.0) == {"h_qkv": True, "l_q": False, "l_q_bias": False}
    assert shapes(use_bias=False) == {"h_qkv": True, "l_q": True, "l_q_bias": False}
    layer = nnx.eval_shape(lambda: HiLo(WIDTH, HEADS, grid=(4, 4), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="pooling='mean'"):
        layer(jnp.zeros((1, 17, WIDTH)))
    with pytest.raises(ValueError, match="not a multiple of window=3"):
        HiLo(WIDTH, HEADS, grid=(4, 4), window=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha"):
        HiLo(WIDTH, HEADS, grid=(4, 4), alpha=2.0, rngs=nnx.Rngs(0))


GRID = (3, 4)
INLINE = filled_from_numpy(lambda: Attention(WIDTH, 2, 2, 8, kind="inline", kind_kwargs={}, causal=False, use_rope=False,
                                   use_bias=True, grid=GRID, rngs=nnx.Rngs(0)), 2)


@nnx.jit
def _inline_layer_and_reference(layer, x):
    query, key, value = layer.project_heads(x)
    r = layer.router
    kernels = residual_kernels(jnp.mean(x, axis=1), r.w1[...], r.b1[...], r.w2[...], r.b2[...])
    mixed = inline_reference(query, key, value, grid=GRID, residual_weights=kernels)
    plain = layer.output(inline_attention(query, key, value, grid=GRID))
    return layer(x), layer.output(mixed), plain, kernels.shape


def test_inline_layer_feeds_the_residual_kernels_to_the_function():
    assert ROUTERS["inline"] is InLineResidual
    assert INLINE.router.w1.shape == (2, 8, 8) and INLINE.router.w2.shape == (2, 8, 72)
    x = jax.random.normal(jax.random.key(1), (2, 1 + 12, WIDTH))  # a class token in front of the 3x4 grid
    got, want, plain, shape = _inline_layer_and_reference(INLINE, x)
    assert shape == (2, 2, 8, 3, 3)
    assert_close(got, want, jnp.float32)
    assert float(jnp.max(jnp.abs(got - plain))) > 1e-2  # the residual is there


def test_inline_without_local_residual_and_refusals():
    router = nnx.eval_shape(lambda: InLineResidual(WIDTH, 2, head_dim=8, local_residual=False, rngs=nnx.Rngs(0)))
    assert router(jnp.zeros((1, 4, WIDTH)), None) == {}
    with pytest.raises(ValueError, match="num_kv_heads=1 must equal num_heads=2"):
        InLineResidual(WIDTH, 2, num_kv_heads=1, head_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal"):
        Attention(WIDTH, 2, 2, 8, kind="inline", causal=True, rngs=nnx.Rngs(0))


def test_dwconv_mlp_matches_an_explicit_depthwise_convolution():
    assert MLPS["dwconv"] is DWConvMlp
    mlp = filled_from_numpy(lambda: DWConvMlp(8, 6, grid=(3, 4), rngs=nnx.Rngs(0)), 3)
    x = jax.random.normal(jax.random.key(5), (2, 12, 8))
    p = lambda name: np.asarray(getattr(mlp, name)[...], np.float64)
    h = np.asarray(x, np.float64) @ p("fc1_df") + p("fc1_bias_f")
    image = np.pad(h.reshape(2, 3, 4, 6), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros((2, 3, 4, 6))
    for y in range(3):
        for x_ in range(4):
            conv[:, y, x_] = np.einsum("bijf,ijf->bf", image[:, y:y + 3, x_:x_ + 3], p("dwconv_33f"))
    conv = conv.reshape(2, 12, 6) + p("dwconv_bias_f")
    gelu = 0.5 * conv * (1 + np.vectorize(math.erf)(conv / math.sqrt(2)))
    assert_close(apply(mlp, x), gelu @ p("fc2_fd") + p("fc2_bias_d"), jnp.float32)


def test_tiny_vits_build_with_hilo_and_inline():
    def kinds(config):
        model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
        return {m.kind for _, m in nnx.iter_graph(model) if hasattr(m, "kind")}

    base = dict(image_size=8, patch_size=2, width=WIDTH, depth=1, num_heads=2, mlp_width=16)
    assert kinds(ViTConfig(**base, pooling="mean", attention="hilo", mlp="dwconv")) == {"hilo"}
    assert kinds(ViTConfig(**base, pooling="cls", attention="inline")) == {"inline"}
    with pytest.raises(ValueError, match="pooling='mean'"):
        jax.eval_shape(lambda: ViT(ViTConfig(**base, pooling="cls", attention="hilo"), rngs=nnx.Rngs(0))(
            jnp.zeros((1, 8, 8, 1))))


@pytest.mark.slow  # building and compiling two ViTs takes ~20 s of one CPU core
def test_litv2_style_and_inline_vits_train_a_step():
    # LITv2's layout: an attention-free stage with the DW-conv FFN (8x8 grid), then HiLo (2x2 windows on 4x4)
    litv2 = ViTConfig(image_size=8, patch_size=1, width=WIDTH, depth=1, num_heads=2, mlp_width=16, pooling="mean",
                      mlp="dwconv", use_attention=False, attention="hilo", attention_kwargs={"alpha": 0.5},
                      stages=(ViTStage(width=WIDTH, depth=1, num_heads=2, mlp_width=16),))
    # depth 2: the class token gets no residual, so its readout sees the residual weights from the second block on
    inline = ViTConfig(image_size=8, patch_size=2, width=WIDTH, depth=2, num_heads=2, mlp_width=16, pooling="cls",
                       attention="inline")
    images = jax.random.normal(jax.random.key(6), (2, 8, 8, 1))
    for config in (litv2, inline):
        model = filled_from_numpy(lambda: ViT(config, rngs=nnx.Rngs(0)), 7)
        loss, grads = nnx.jit(lambda m: nnx.value_and_grad(lambda m: jnp.mean(m(images) ** 2))(m))(model)
        assert np.isfinite(float(loss))
        leaves = jax.tree_util.tree_leaves(nnx.state(grads))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        assert sum(float(jnp.sum(jnp.abs(g))) > 0 for g in leaves) > 0.9 * len(leaves)

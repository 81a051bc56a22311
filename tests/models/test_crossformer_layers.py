"""CrossFormer's layers (models/layers/mixers/crossformer.py): the CEL stem and merge against direct numpy
convolutions, the DPB router inside the shared attention layer, and a hierarchical ViT with CEL + alternating
SDA/LDA blocks."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.grouped.lsda import dynamic_position_bias, lsda_attention
from models import vit
from models.layers.attention import Attention
from models.layers.mixers import ROUTERS
from models.layers.mixers.crossformer import CrossScaleEmbedding, CrossScaleMerging, DynamicPositionBias
from models.layers.vision import EMBEDDINGS, MERGES
from nnx_helpers import apply, conv_numpy, layer_norm_numpy

RNG = np.random.default_rng(0)




def _branches(convs, x, stride, paddings):
    return np.concatenate([conv_numpy(x, w[...], b[...], stride, p) for w, b, p in zip(convs.weights, convs.biases,
                                                                                  paddings)], axis=-1)


# Shapes are shared with the ViT test below: every new parameter shape costs a compile of its random init.
WIDTH, STAGE_WIDTH, HEADS = 8, 16, 2


def test_cel_stem_is_parallel_strided_convolutions_split_d2_d4_d8_d8():
    images = jnp.asarray(RNG.standard_normal((2, 8, 8, 1)), jnp.float32)
    # Stride 1 (8x8 digits at patch 1): kernels 1, 2, 4, 8 with channels D/2, D/4, D/8, D/8; k - s is odd for
    # kernels 2, 4, 8, so the extra row and column of padding go at the bottom/right.
    stem = CrossScaleEmbedding(1, 1, WIDTH, rngs=nnx.Rngs(0))
    assert stem.convs.kernels == (1, 2, 4, 8)
    assert [w.shape[-1] for w in stem.convs.weights] == [4, 2, 1, 1]
    expected = layer_norm_numpy(_branches(stem.convs, images, 1, [(0, 0), (0, 1), (1, 2), (3, 4)]), 1e-5)
    out = apply(stem, images)
    assert out.shape == (2, 64, WIDTH)
    np.testing.assert_allclose(np.asarray(out), expected.reshape(2, 64, WIDTH), atol=1e-4, rtol=1e-4)
    # Stride 2, kernels 2 and 4: padding (k - s) / 2 on each side, as in the code.
    stem = CrossScaleEmbedding(2, 1, 4, rngs=nnx.Rngs(1), kernel_sizes=(2, 4))
    expected = layer_norm_numpy(_branches(stem.convs, images, 2, [(0, 0), (1, 1)]), 1e-5)
    np.testing.assert_allclose(np.asarray(apply(stem, images)), expected.reshape(2, 16, 4), atol=1e-4, rtol=1e-4)


def test_cel_merge_normalises_then_convolves_with_kernels_2_and_4():
    grid = jnp.asarray(RNG.standard_normal((2, 4, 4, WIDTH)), jnp.float32)
    merge = CrossScaleMerging(WIDTH, STAGE_WIDTH, norm_eps=1e-6, rngs=nnx.Rngs(0))
    assert [w.shape for w in merge.convs.weights] == [(2, 2, 8, 8), (4, 4, 8, 8)]
    expected = _branches(merge.convs, layer_norm_numpy(np.asarray(grid, np.float64), 1e-6), 2, [(0, 0), (1, 1)])
    out = apply(merge, grid)
    assert out.shape == (2, 2, 2, 16)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def test_cel_arguments_are_checked():
    with pytest.raises(ValueError, match="does not add up"):
        CrossScaleEmbedding(4, 3, 12, rngs=nnx.Rngs(0))  # 6 + 3 + 1 + 1 != 12
    with pytest.raises(ValueError, match="kernel_sizes"):
        CrossScaleMerging(8, 16, norm_eps=1e-6, rngs=nnx.Rngs(0), kernel_sizes=(1, 2))
    assert EMBEDDINGS["cel"] is CrossScaleEmbedding and MERGES["cel"] is CrossScaleMerging
    assert ROUTERS["lsda"] is DynamicPositionBias


def test_dpb_router_feeds_the_bias_table_to_lsda_in_the_attention_layer():
    kwargs = {"group_size": 2, "mode": "lda", "dpb_dim": 4}
    layer = Attention(WIDTH, HEADS, HEADS, WIDTH // HEADS, kind="lsda", kind_kwargs=kwargs, causal=False,
                      use_rope=False, use_bias=True, grid=(4, 4), rngs=nnx.Rngs(0))
    assert isinstance(layer.router, DynamicPositionBias) and layer.router.fc3_w.shape == (4, 2)
    x = jnp.asarray(RNG.standard_normal((2, 16, WIDTH)), jnp.float32)

    @nnx.jit
    def run(layer, x):
        q, k, v = layer.project_heads(x)
        table = layer.router.table((4, 4))
        manual = layer.output(lsda_attention(q, k, v, grid=(4, 4), position_bias=table, **kwargs))
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
        direct = dynamic_position_bias(layer.router.params(), 2)
        return layer(x), manual, table, direct, grads, layer.router.table((2, 2)), layer.router.table((1, 1))

    out, manual, table, direct, grads, table_2x2, table_1x1 = run(layer, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(manual), atol=1e-5, rtol=1e-5)
    assert table.shape == (9, 2)  # (2G - 1)^2 rows, one column per head
    np.testing.assert_allclose(np.asarray(table), np.asarray(direct), atol=1e-6)
    assert float(jnp.max(jnp.abs(grads.router.fc3_w[...]))) > 0  # the bias reaches the loss
    # A grid no larger than G is one global group, so the table covers the whole grid.
    assert table_2x2.shape == (9, 2) and table_1x1.shape == (1, 2)
    with pytest.raises(ValueError, match="pooling='mean'"):  # a class token in front of the 4x4 grid (at trace)
        nnx.jit(lambda m, x: m(x))(layer, jnp.zeros((1, 17, WIDTH)))


def test_hierarchical_vit_with_cel_and_alternating_sda_lda():
    """CrossFormer's layout on 8x8 digits: CEL stem at patch 1, blocks alternate SDA (even) / LDA (odd) through
    layer_attention, CEL merge into a second stage whose 4x4 grid is one global group."""
    lda = ("lsda", {"group_size": 4, "mode": "lda", "dpb_dim": 4})
    config = vit.vit_config(
        "tiny_hierarchical", width=WIDTH, num_heads=HEADS, mlp_width=STAGE_WIDTH, embed="cel", attention="lsda",
        attention_kwargs={"group_size": 4, "dpb_dim": 4}, layer_attention=(None, lda),
        stages=(vit.ViTStage(width=STAGE_WIDTH, depth=1, num_heads=HEADS, mlp_width=STAGE_WIDTH, merge="cel"),))
    model = vit.ViT(config, rngs=nnx.Rngs(0))
    assert isinstance(model.patch_embed, CrossScaleEmbedding)
    assert model.patch_embed.convs.kernels == (1, 2, 4, 8)
    assert isinstance(model.stages[1].merge, CrossScaleMerging)
    modes = [dict(block.attention.kind_kwargs).get("mode", "sda") for _, block in model.named_blocks()]
    assert modes == ["sda", "lda", "sda"]
    images = jnp.asarray(RNG.random((2, 8, 8, 1)), jnp.float32)
    logits = nnx.jit(lambda m, x: m(x))(model, images)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))

"""InLine's Swin and PVT layouts in the ViT (arXiv 2412.06590; LeapLabTHU/InLine models/inline_swin.py,
inline_deit.py): the shared layer with qkv_bias=False and Swin windows (per-window residual kernels from each
window's mean token) against a written-out computation, the qkv_bias option of ViTConfig/ViTStage, and the
InLine-Swin-T preset's parameter count (abstract)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.linear.inline import inline_reference, residual_kernels
from attnx.testing.tolerances import assert_close
from models.layers.attention import Attention
from models.vit import PRESETS, ViT, ViTConfig, ViTStage, count_parameters
from nnx_helpers import filled_from_numpy

WIDTH, HEADS, GRID, WINDOW, SHIFT = 16, 2, (4, 4), 2, 1


def _layer():
    return Attention(WIDTH, HEADS, HEADS, WIDTH // HEADS, kind="inline",
                     kind_kwargs={"window": WINDOW, "shift": SHIFT}, causal=False, use_rope=False, use_bias=True,
                     qkv_bias=False, grid=GRID, rngs=nnx.Rngs(0))


@nnx.jit
def _layer_and_written_out(layer, x, means):
    """(layer(x), its kernels), and the same from the written-out parts: projections without q/k/v biases, kernels
    from the given window means, the reference function in the Swin layout, the output projection with its bias."""
    r, p = layer.router, (lambda name: getattr(layer, name)[...])
    kernels = residual_kernels(means.reshape(-1, WIDTH), r.w1[...], r.b1[...], r.w2[...], r.b2[...])
    kernels = kernels.reshape(x.shape[0], -1, *kernels.shape[1:])
    q, k, v = (jnp.einsum("btd,dnh->btnh", x, p(name)) for name in ("query_dnh", "key_dkh", "value_dkh"))
    mixed = inline_reference(q, k, v, grid=GRID, window=WINDOW, shift=SHIFT, residual_weights=kernels)
    want = jnp.einsum("btnh,nhd->btd", mixed, p("out_nhd")) + p("out_bias_d")
    return (layer(x), r(x, None)["residual_weights"]), (want, kernels)


def test_windowed_layer_without_qkv_bias_equals_the_written_out_computation():
    layer = filled_from_numpy(_layer, 3)
    assert layer.query_bias_nh is None and layer.key_bias_kh is None and layer.value_bias_kh is None
    assert layer.out_bias_d is not None  # timm's proj keeps its bias
    x = jax.random.normal(jax.random.key(2), (2, 16, WIDTH))
    # the mean token of each shifted 2x2 window, in numpy: roll by -1, cut row-major windows
    image = np.roll(np.asarray(x, np.float64).reshape(2, 4, 4, WIDTH), (-SHIFT, -SHIFT), axis=(1, 2))
    means = np.stack([image[:, y:y + 2, c:c + 2].mean(axis=(1, 2)) for y in (0, 2) for c in (0, 2)], axis=1)
    (got, kernels), (want, want_kernels) = _layer_and_written_out(layer, x, jnp.asarray(means, jnp.float32))
    assert kernels.shape == (2, 4, HEADS, WIDTH // HEADS, 3, 3)
    assert_close(kernels, want_kernels, jnp.float32)
    assert_close(got, want, jnp.float32)


def test_qkv_bias_option_per_model_and_stage():
    def attention_biases(config):
        model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
        return [block.attention.query_bias_nh is not None for _, block in model.named_blocks()], \
            count_parameters(model)

    base = dict(image_size=8, patch_size=2, width=WIDTH, depth=1, num_heads=HEADS, mlp_width=16, pooling="mean",
                attention="inline")
    stage = ViTStage(width=32, depth=1, num_heads=4, mlp_width=32)
    with_bias, count = attention_biases(ViTConfig(**base, stages=(stage,)))
    assert with_bias == [True, True]
    without, fewer = attention_biases(ViTConfig(**base, qkv_bias=False, stages=(stage,)))
    assert without == [False, False] and count - fewer == 3 * WIDTH + 3 * 32
    mixed, _ = attention_biases(ViTConfig(**base, qkv_bias=False,
                                          stages=(ViTStage(width=32, depth=1, num_heads=4, qkv_bias=True),)))
    assert mixed == [False, True]
    with pytest.raises(ValueError, match="SPATIAL_MIXERS"):
        ViTConfig(**{**base, "attention": "hilo"}, qkv_bias=False)
    with pytest.raises(ValueError, match="qkv_bias must be a bool"):
        ViTConfig(**base, qkv_bias="no")


def test_inline_presets_match_the_code_parameter_counts():
    """InLine-Swin-T: the code's model (Swin-T 28,288,354, less the relative bias tables of the 10 InLine blocks,
    15,210, plus their residual kernel generators, 950,400) has 29,223,544 parameters, 192 more than here (Swin's
    patch-embedding LayerNorm); the README rounds it to 30M. Stage 4 is one 7x7 softmax window with a relative
    bias; stages 1-3 are InLine in windows clamped to the grid."""
    model = nnx.eval_shape(lambda: ViT(PRESETS["inline_swin_t"], rngs=nnx.Rngs(0)))
    assert count_parameters(model) == 29_223_544 - 192
    kinds = [(name.split("/")[0], block.attention.kind, dict(block.attention.kind_kwargs))
             for name, block in model.named_blocks()]
    assert kinds[1] == ("stage_0", "inline", {"window": 56, "shift": 28})
    assert kinds[-1] == ("stage_3", "neighborhood", {"kernel_size": 7, "use_rpb": True})
    assert model.stages[3].blocks[0].attention.router.rpb.shape == (24, 13, 13)  # Swin's (2*7 - 1)^2 per head
    # InLine-DeiT-T keeps the q/k/v biases the code's VisionTransformer passes (qkv_bias=True)
    assert PRESETS["inline_deit_t"].qkv_bias is True


# Slow: a full-size parameter count (the Swin/DeiT counts stay in the default suite).
@pytest.mark.slow
def test_inline_pvt_t_count_and_per_stage_positions():
    """InLine-PVT-T: the code's inline_pvt_tiny has 12,032,232 parameters (12.0M published); here 2,112 more (Swin
    merges for its 2x2 stride-2 convolutions +1,216, no stem LayerNorm -128, the ViT's final LayerNorm +1,024)."""
    model = nnx.eval_shape(lambda: ViT(PRESETS["inline_pvt_t"], rngs=nnx.Rngs(0)))
    assert count_parameters(model) == 12_032_232 + 2_112
    assert [None if s.position_td is None else s.position_td.shape for s in model.stages] == \
        [None, (28 * 28, 128), (14 * 14, 320), (7 * 7, 512)]  # stage 0's is the ViT's own (56 * 56, 64)
    with pytest.raises(ValueError, match="position"):
        ViTConfig(pooling="mean", patch_size=1, stages=(ViTStage(width=8, depth=1, num_heads=2, position="sincos"),))


@nnx.jit
def _stage_input(model, images):
    """(stage 1's first attention input, the same from stage 0's output: merge, + position, LayerNorm)."""
    _, inter = model(images, return_intermediates=True)
    stage = model.stages[1]
    merged = stage.merge(inter["stage_0/output"])
    tokens = merged.reshape(merged.shape[0], -1, merged.shape[-1]) + stage.position_td[...]
    return inter["stage_1/block_0/attention_input"], stage.blocks[0].attention_norm(tokens)


def test_stage_position_is_added_after_the_merge():
    config = ViTConfig(image_size=8, patch_size=2, width=8, depth=1, num_heads=2, mlp_width=8, pooling="mean",
                       stages=(ViTStage(width=16, depth=1, num_heads=2, mlp_width=8, position="learned"),))
    model = filled_from_numpy(lambda: ViT(config, rngs=nnx.Rngs(0)), 4)
    got, want = _stage_input(model, jax.random.uniform(jax.random.key(0), (2, 8, 8, 1)))
    assert_close(got, want, jnp.float32)

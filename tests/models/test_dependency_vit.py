"""DependencyViT (models/dependency_vit.py): the parameter count of the port's ViT-T-like preset (abstract build),
the Lite token counts, the model's output, dependency masks and surviving positions against a per-layer numpy
reference on a 2-layer model with a PEG and a pruning layer, cumulative gates equal the product of the per-layer
gates, pruning keeps exactly the top-k cumulative gates, the digits experiment selects the model by one gin line,
and config refusals; slow: every block's gates and the PEG get gradients through pruning."""

import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nnx_helpers import conv_numpy, filled_from_numpy, layer_norm_numpy
from scipy.special import erf

from models.dependency_vit import DependencyViT, DependencyViTConfig, PRESETS, dependency_vit_config
from models.vit import count_parameters

# 2 layers: a PEG after block 0, pruning in block 1 (16 -> floor(0.84 * 16) = 13 tokens); distinct sizes per axis.
CONFIG = DependencyViTConfig(width=12, num_heads=3, mlp_width=20, depth=2, peg_depth=1, prune_layers=(2,),
                             temperature=0.5, block_size=5)
IMAGES = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def run():
    """(numpy weights, logits, intermediates) of one jitted forward of the 2-layer model."""
    model = filled_from_numpy(lambda: DependencyViT(CONFIG, rngs=nnx.Rngs(0)), seed=1)
    logits, inter = nnx.jit(lambda m, x: m(x, return_intermediates=True))(model, jnp.asarray(IMAGES))
    weights = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return weights, np.asarray(logits), {k: np.asarray(v) for k, v in inter.items()}


def _ln(x, w):
    return layer_norm_numpy(x, CONFIG.norm_eps) * w["scale_d"] + w["bias_d"]


def _softmax(z, axis):
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _gelu(h):
    return 0.5 * h * (1 + erf(h / np.sqrt(2)))


def reference(w, images):
    """The port's forward in numpy float64, layer by layer: logits, {block: (mask, cumulative, positions)}."""
    b, p = images.shape[0], CONFIG.patch_size
    patches = images.astype(np.float64).reshape(b, 4, p, 4, p, 1).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, -1)
    x = patches @ w["patch_embed"]["kernel_pd"] + w["patch_embed"]["bias_d"]
    m, positions, seen = np.ones((b, 16)), np.tile(np.arange(16), (b, 1)), {}
    for index in range(CONFIG.depth):
        blk = w["blocks"][index]
        att = blk["attention"]
        h = _ln(x, blk["attention_norm"])
        q = np.einsum("btd,dnh->btnh", h, att["query_dnh"])
        k = np.einsum("btd,dnh->btnh", h, att["key_dkh"])
        v = np.einsum("btd,dnh->btnh", h, att["value_dkh"])
        gate_p = _softmax(h @ att["router"]["selector_dn"] / CONFIG.temperature, -1)  # [b, j, n]
        m = m * (1 / (1 + np.exp(-(_gelu(h @ att["router"]["message_hidden_df"])
                                    @ att["router"]["message_out_f1"])[..., 0])))
        forward = _softmax(np.einsum("bjnh,binh->bnji", q, k) / np.sqrt(q.shape[-1]), -1)  # child j over parents i
        reversed_ = np.einsum("bnji,bjn,bj->bnij", forward, gate_p, m)  # A^R = A^F^T * p * m
        out = np.einsum("bnij,bjnv->binv", reversed_, v)
        x = x + blk["attention_scale_d"] * (np.einsum("binv,nvd->bid", out, att["out_nhd"]) + blk["out_bias_d"])
        seen[index] = (reversed_.sum(1), m.copy(), positions.copy())
        if index + 1 in CONFIG.prune_layers:
            keep = int(np.floor(0.84 * x.shape[1]))
            kept = np.sort(np.argsort(-m, axis=1)[:, :keep], axis=1)
            x, m = np.take_along_axis(x, kept[..., None], 1), np.take_along_axis(m, kept, 1)
            positions = np.take_along_axis(positions, kept, 1)
        mlp = blk["mlp"]
        hidden = _gelu(_ln(x, blk["mlp_norm"]) @ mlp["fc1_df"] + mlp["fc1_bias_f"])
        x = x + blk["mlp_scale_d"] * (hidden @ mlp["fc2_fd"] + mlp["fc2_bias_d"])
        if index < CONFIG.peg_depth:  # depth-wise 3x3 as a dense convolution with a diagonal kernel
            kernel = np.einsum("hwc,cd->hwcd", blk["peg_33d"], np.eye(x.shape[-1]))
            conv = conv_numpy(x.reshape(b, 4, 4, -1), kernel, blk["peg_bias_d"], 1, (1, 1))
            x = x + conv.reshape(b, 16, -1)
    pooled = (_ln(x, w["final_norm"]) * m[..., None]).mean(1)
    return pooled @ w["head_dc"] + w["head_bias_c"], seen


def test_model_equals_the_per_layer_numpy_reference(run):
    weights, logits, inter = run
    want, seen = reference(weights, IMAGES)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    for index, (mask, cumulative, positions) in seen.items():
        np.testing.assert_allclose(inter[f"block_{index}/dependency_mask"], mask, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(inter[f"block_{index}/cumulative_messages"], cumulative, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(inter[f"block_{index}/positions"], positions)
    # Sanity of the reference itself: child j sends m_j over all parents and heads (p is a softmax over heads).
    np.testing.assert_allclose(seen[1][0].sum(1), seen[1][1], rtol=1e-10)


def test_cumulative_gates_are_the_products_of_the_layer_gates(run):
    _, _, inter = run
    m0, m1 = inter["block_0/messages"], inter["block_1/messages"]
    assert np.all((m0 > 0) & (m0 < 1)) and not np.allclose(m0, m1)
    np.testing.assert_allclose(inter["block_0/cumulative_messages"], m0, rtol=1e-6)
    np.testing.assert_allclose(inter["block_1/cumulative_messages"], m0 * m1, rtol=1e-6)


def test_pruning_keeps_exactly_the_top_k_cumulative_gates(run):
    _, _, inter = run
    score, kept = inter["block_1/cumulative_messages"], inter["block_1/kept"]
    assert kept.shape == (2, CONFIG.token_counts()[1]) == (2, 13)
    for b in range(2):
        np.testing.assert_array_equal(kept[b], np.sort(np.argsort(-score[b])[:13]))
        assert score[b][kept[b]].min() > np.delete(score[b], kept[b]).max()
    np.testing.assert_array_equal(inter["final_positions"], np.take_along_axis(inter["block_1/positions"], kept, 1))
    assert inter["encoded"].shape == (2, 13, CONFIG.width)


def test_ti_preset_parameter_count_and_lite_token_counts():
    # The port's dependencyvit_tiny_patch16_224: patch embedding 147,648 + PEG 1,920 + 12 blocks x 465,504 (norms
    # 768, bias-free qkv 110,592, output 37,056, head selector 2,304, message controller 18,528, LayerScales 384,
    # MLP 295,872) + final norm 384 + head 193,000. Lite adds no weights (pruning is parameter-free).
    model = nnx.eval_shape(lambda: DependencyViT(PRESETS["lite_Ti/16"], rngs=nnx.Rngs(0)))
    assert count_parameters(model) == 5_929_000
    assert [block.keep for block in model.blocks] == [None, 164, None, None, 132, None, None, 100, None, None, 69,
                                                      None]
    assert PRESETS["Ti/16"].token_counts() == (196,)
    assert PRESETS["tiny_lite"].token_counts() == (16, 13, 10, 7)


def test_the_digits_experiment_selects_the_model_by_one_gin_line():
    from train import gin_config
    configs = pathlib.Path(__file__).resolve().parents[2] / "configs"
    gin_config.parse([str(configs / "experiments/dependency_vit_digits.gin")], ["PRESET = 'tiny_lite'"])
    try:
        task = gin.query_parameter("trainer.train.task").scoped_configurable_fn()
    finally:
        gin.clear_config()
    assert task.model == PRESETS["tiny_lite"] and task.tokens_per_step == 64 * 16
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))  # the task's own builder, abstractly
    assert isinstance(model, DependencyViT) and [block.keep for block in model.blocks] == [None, 13, 10, 7]


def test_config_refusals_name_the_field():
    with pytest.raises(ValueError, match="peg_depth=2 puts a PEG"):
        dependency_vit_config(peg_depth=2, prune_layers=(2, 3))
    with pytest.raises(ValueError, match="prune_layers must be increasing"):
        dependency_vit_config(prune_layers=(3, 2))
    with pytest.raises(ValueError, match="lite_keep_fraction.ratio"):
        dependency_vit_config(prune_layers=(2, 3, 4), prune_ratio=0.4)
    with pytest.raises(ValueError, match="unknown DependencyViT preset"):
        dependency_vit_config("huge")


@pytest.mark.slow
def test_gates_and_peg_of_every_block_get_gradients_through_pruning():
    model = filled_from_numpy(lambda: DependencyViT(CONFIG, rngs=nnx.Rngs(0)), seed=2)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(3.0 * m(jnp.asarray(IMAGES))))))(model)
    for index in range(CONFIG.depth):
        block = grads.blocks[index]
        for g in (block.attention.router.selector_dn, block.attention.router.message_out_f1, block.mlp_scale_d):
            g = np.asarray(g[...])
            assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, index
    assert np.abs(np.asarray(grads.blocks[0].peg_33d[...])).max() > 0

"""MoH's published per-layer head plans in the DiT and the hierarchical ViT (spec diffusion_multimodal_bench.md §5,
vision_mechanisms.md §10): the plans of SkyworkAI/MoH (MoH-DiT/models.py, MoH-ViT/transnext.py @ 66bb340),
transcribed here and checked against the spec's tables; each builds (nnx.eval_shape, no compile) with the planned
router per block; the balance loss reaches the DiT's training loss; §5(e)/§10(e) limits in a model. The MoH-ViT
presets (TransNeXt-S/B with these plans) carry the plans, and their parameter counts equal, stage by stage, what the
official code's modules hold."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.dit import DiT, dit_config
from models.layers.mixers import call_with_auxiliary_loss
from models.vit import PRESETS, ViT, ViTConfig, ViTStage, count_parameters
from nnx_helpers import filled_from_numpy, layer_norm_numpy

# MoH-DiT/models.py: (DiT preset, shared_head per block, routed_head (top-k) per block); heads per block fixed.
DIT_PLANS = {
    "S/2-90": ("S/2", [3] * 8 + [6] * 4, [2] * 8 + [0] * 4),
    "S/2-75": ("S/2", [2, 2] + [3] * 8 + [6, 6], [1] * 6 + [2] * 4 + [0, 0]),
    "B/2-90": ("B/2", [6] * 5 + [7] * 5 + [12, 12], [4] * 10 + [0, 0]),
    "B/2-75": ("B/2", [4, 4] + [6] * 8 + [12, 12], [2, 2] + [3] * 8 + [0, 0]),
}
# MoH-ViT/transnext.py: heads, shared_head, routed_head per stage (TransNeXt-S / -B shapes).
VIT_PLANS = {
    "S-75": ([3, 6, 12, 24], [3, 6, 3, 4], [0, 0, 6, 12]),
    "S-80": ([3, 6, 12, 24], [3, 6, 3, 8], [0, 0, 6, 12]),
    "B-75": ([4, 8, 16, 32], [4, 8, 4, 5], [0, 0, 8, 16]),
    "B-50": ([4, 8, 16, 32], [2, 2, 2, 4], [2, 4, 6, 8]),
}


def dit_plan(shared, routed, balance_weight=0.01):
    return tuple(("moh", {"n_shared": s, "top_k": k, "balance_weight": balance_weight}) for s, k in zip(shared, routed))


def router_shapes(router, width):
    """The router weights a block of this plan must own: W_r [D, H - h_s] when routed, W_s [D, h_s] when h_s > 1,
    W_0 [D, 2] when both kinds exist (official MoHAttention's wg, wg_1, wg_0)."""
    shape = lambda p: None if p is None else tuple(p.shape)  # noqa: E731
    return shape(router.routed_dr), shape(router.shared_ds), shape(router.mix_d2)


def expected_shapes(width, heads, shared, top_k):
    return ((width, heads - shared) if top_k else None, (width, shared) if shared > 1 else None,
            (width, 2) if shared and top_k else None)


def test_vit_plans_match_the_spec_table():
    # S-75: stage 3 keeps 9 of 12 heads per token, stage 4 16 of 24
    heads, shared, routed = VIT_PLANS["S-75"]
    assert [s + k for s, k in zip(shared, routed)][2:] == [9, 16]
    for heads, shared, routed in VIT_PLANS.values():
        assert all(s + k <= h and (k == 0 or s < h) for h, s, k in zip(heads, shared, routed))
    # B-50's first stage routes top-2 of its 2 non-shared heads: all 4 on, weighted (as published)
    assert VIT_PLANS["B-50"][1][0] + VIT_PLANS["B-50"][2][0] == VIT_PLANS["B-50"][0][0]


def test_dit_plans_match_the_spec_tables():
    # S/2-90: blocks 0-7 are 3 shared + top-2 of 3, blocks 8-11 all 6 shared; B/2-90: 6-7 shared + top-4, then 2
    # all-12 blocks; the -75 variants keep fewer heads on. Active fraction ~ the name.
    for name, (preset, shared, routed) in DIT_PLANS.items():
        heads = dit_config(preset).num_heads
        assert len(shared) == len(routed) == dit_config(preset).depth == 12
        assert all(s + k <= heads and (k == 0 or s < heads) for s, k in zip(shared, routed))
        active = sum(s + k for s, k in zip(shared, routed)) / (heads * 12)
        assert abs(active - int(name[-2:]) / 100) < 0.05, (name, active)
    assert DIT_PLANS["S/2-90"][1][:8] == [3] * 8 and DIT_PLANS["S/2-90"][2][8:] == [0] * 4


def _plan_config(name):
    preset, shared, routed = DIT_PLANS[name]
    heads = dit_config(preset).num_heads  # the preset's heads and depth, a narrow width (shapes only)
    return dit_config(preset, input_size=8, patch_size=4, in_channels=1, num_classes=10, width=4 * heads,
                      attention="moh", layer_attention=dit_plan(shared, routed))


@pytest.mark.parametrize("name", sorted(DIT_PLANS))
def test_dit_config_gives_every_block_its_plan_entry(name):
    _, shared, routed = DIT_PLANS[name]
    config = _plan_config(name)
    for index in range(config.depth):
        attention, kwargs = config.layer_choice(index)
        assert attention == "moh" and (kwargs["n_shared"], kwargs["top_k"]) == (shared[index], routed[index])


@pytest.mark.parametrize("name", ["S/2-90", "B/2-75"])  # (the other two differ only in the numbers above)
def test_dit_builds_the_planned_router_in_every_block(name):
    _, shared, routed = DIT_PLANS[name]
    config = _plan_config(name)
    model = nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0)))
    for index, block in enumerate(model.blocks):
        router = block.attention.router
        assert (router.n_shared, router.top_k) == (shared[index], routed[index])
        assert router_shapes(router, config.width) == expected_shapes(config.width, config.num_heads, shared[index],
                                                                      routed[index]), (name, index)


@pytest.mark.parametrize("name", ["S-75", "B-50"])  # B-50 routes in every stage; S-80 / B-75 differ in numbers
def test_hierarchical_vit_takes_the_stage_plans(name):
    # The published per-stage plan through ViTStage.attention_kwargs on a 4-stage ViT with the plan's heads (head
    # dim 2, one block per stage, 8x8 grid -> 1x1) so that it stays tiny; the TransNeXt-S/B widths are not needed
    # to check the plan reaches every stage.
    heads, shared, routed = VIT_PLANS[name]
    widths = [2 * h for h in heads]
    kwargs = [{"n_shared": s, "top_k": k} for s, k in zip(shared, routed)]
    config = ViTConfig(patch_size=1, width=widths[0], depth=1, num_heads=heads[0], mlp_width=2 * widths[0],
                       pooling="mean", position="none", attention="moh", attention_kwargs=kwargs[0],
                       stages=tuple(ViTStage(width=widths[i], depth=1, num_heads=heads[i], mlp_width=2 * widths[i],
                                             attention="moh", attention_kwargs=kwargs[i]) for i in (1, 2, 3)))
    model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
    for stage, (width, h, s, k) in enumerate(zip(widths, heads, shared, routed)):
        router = model.stages[stage].blocks[0].attention.router
        assert (router.num_heads, router.n_shared, router.top_k) == (h, s, k)
        assert router_shapes(router, width) == expected_shapes(width, h, s, k), (name, stage)


# ---- the balance loss in the DiT's training loss --------------------------------------------------------------

TINY = dict(input_size=8, patch_size=4, in_channels=1, num_classes=10, width=24, num_heads=6)


def _tiny_dit(plan=None, zero_routers=False):
    """A tiny DiT (MoH with `plan`, or softmax without) with small random weights drawn in numpy: DiT's own
    initialisation costs seconds of compile on the shared CI cores (eager or jitted), and zero-initialises the
    adaLN and output layers, which would hide the attention from the output."""
    extra = {} if plan is None else dict(attention="moh", layer_attention=plan)
    config = dit_config("tiny", depth=len(plan or [None]), **TINY, **extra)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), state)
    model = nnx.merge(graphdef, state)
    if zero_routers:  # uniform router probabilities: the balance loss is k exactly (any tie-break), spec §10(e)
        for block in model.blocks:
            router = block.attention.router
            if router.routed_dr is not None:
                router.routed_dr = nnx.Param(jnp.zeros_like(router.routed_dr[...]))
    return model


INPUTS = (jax.random.normal(jax.random.key(1), (2, 8, 8, 1)), jnp.array([3, 700]), jnp.array([1, 4]))


@pytest.fixture(scope="module")
def balance_loss():
    """The auxiliary loss of a DiT with S/2-90's block 0 twice (routed: 3 shared + top-2 of 3) then its block 8
    (all 6 shared), uniform routers: each routed block's balance loss is k = 2 exactly. One forward compile."""
    model = _tiny_dit(dit_plan([3, 3, 6], [2, 2, 0]), zero_routers=True)
    graphdef, state = nnx.split(model)
    return float(jax.jit(lambda state: call_with_auxiliary_loss(nnx.merge(graphdef, state), *INPUTS)[1])(state))


def test_balance_loss_reaches_the_dit_loss_averaged_over_routed_blocks_only(balance_loss):
    # what train/image_diffusion.py adds to the diffusion loss: the weighted balance losses averaged over the
    # routed blocks, as MoH-DiT/train.py does (only they append to LOAD_BALANCING_LOSSES; the all-shared block
    # records none)
    np.testing.assert_allclose(balance_loss, 0.01 * 2, rtol=1e-6)


def test_all_shared_plan_with_zero_shared_router_is_plain_dit():
    # §5(e): all heads shared with W_s = 0 gives gates h_s * softmax(0) = 1 per head: exactly the softmax DiT
    model = _tiny_dit(dit_plan([6], [0]))
    router = model.blocks[0].attention.router
    router.shared_ds = nnx.Param(jnp.zeros_like(router.shared_ds[...]))
    # the plain DiT with the same weights: its graph, the MoH model's state less the router
    plain_graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(dit_config("tiny", depth=1, **TINY), rngs=nnx.Rngs(0))))
    graphdef, state = nnx.split(model)
    plain_state = nnx.filter_state(state, lambda path, _: "router" not in path)
    both = jax.jit(lambda state, plain_state: (nnx.merge(graphdef, state)(*INPUTS),
                                               nnx.merge(plain_graphdef, plain_state)(*INPUTS)))
    out_moh, out_plain = both(state, plain_state)
    np.testing.assert_allclose(np.asarray(out_moh), np.asarray(out_plain), rtol=1e-5, atol=1e-6)


# ---- the MoH-ViT presets (models/vit.py): TransNeXt-S / -B with the plans above --------------------------------

MOH_VIT_PRESETS = {"moh_vit_s_75": ("S-75", "transnext_small"), "moh_vit_s_80": ("S-80", "transnext_small"),
                   "moh_vit_b_75": ("B-75", "transnext_base"), "moh_vit_b_50": ("B-50", "transnext_base")}
# DaiShiResearch/TransNeXt classification/transnext.py transnext_small / transnext_base (moh_transnext_* the same):
# widths, depths, heads; every model: mlp ratios 8-8-4-4, sr ratios 8-4-2-1, window 3, qkv biases, LN eps 1e-6.
TRANSNEXT_SHAPES = {"transnext_small": ([72, 144, 288, 576], [5, 5, 22, 5], [3, 6, 12, 24]),
                    "transnext_base": ([96, 192, 384, 768], [5, 5, 23, 5], [4, 8, 16, 32])}
MLP_RATIOS, SR_RATIOS = [8, 8, 4, 4], [8, 4, 2, 1]
PUBLISHED_MILLIONS = {"transnext_small": 49.7, "transnext_base": 89.7}  # the TransNeXt README's #Params


def _plan(preset):
    """(widths, depths, heads, shared, routed) of a preset, from the tables here (not from the preset)."""
    plan, base = MOH_VIT_PRESETS.get(preset, (None, preset))
    widths, depths, heads = TRANSNEXT_SHAPES[base]
    _, shared, routed = VIT_PLANS[plan] if plan else (None, [0] * 4, [0] * 4)
    return widths, depths, heads, shared, routed


@pytest.mark.parametrize("preset", sorted(MOH_VIT_PRESETS))
def test_moh_vit_presets_are_transnext_with_the_plan_in_every_stage(preset):
    plan, base = MOH_VIT_PRESETS[preset]
    heads, shared, routed = VIT_PLANS[plan]
    config, plain = PRESETS[preset], PRESETS[base]
    assert [config.stage_attention(s) for s in range(4)] == [
        ("aggregated", {"window": 3, "sr_ratio": r, "n_shared": h, "top_k": k})
        for r, h, k in zip(SR_RATIOS, shared, routed)]
    assert [config.num_heads] + [stage.num_heads for stage in config.stages] == heads
    # apart from the gates, the model is the TransNeXt preset
    ungated = dataclasses.replace(config, attention_kwargs=plain.attention_kwargs, stages=tuple(
        dataclasses.replace(stage, attention_kwargs=other.attention_kwargs)
        for stage, other in zip(config.stages, plain.stages)))
    assert ungated == plain


@pytest.mark.parametrize("preset", sorted(TRANSNEXT_SHAPES))
def test_transnext_presets_have_the_code_shapes(preset):
    widths, depths, heads = TRANSNEXT_SHAPES[preset]
    config = PRESETS[preset]
    stages = [config, *config.stages]
    assert [s.width for s in stages] == widths and [s.depth for s in stages] == depths
    assert [s.num_heads for s in stages] == heads
    assert [s.mlp_width for s in stages] == [r * w for r, w in zip(MLP_RATIOS, widths)]
    assert [config.stage_attention(s) for s in range(4)] == [("aggregated", {"window": 3, "sr_ratio": r})
                                                             for r in SR_RATIOS]
    assert (config.image_size, config.patch_size, config.embed, config.mlp, config.norm_eps, config.qkv_bias,
            config.stage_norm, config.pooling, config.position) == (224, 4, "overlap", "convglu", 1e-6, True, True,
                                                                    "mean", "none")
    assert all((s.merge, s.mlp, s.qkv_bias, s.position) == ("overlap", None, None, "none") for s in config.stages)


# The official modules' parameters, transcribed from their constructors (TransNeXt classification/transnext.py and
# attention_native.py; MoH-ViT/transnext.py, attention_native.py, attention.py): nn.Linear(i, o) holds i*o + o,
# nn.Conv2d(i, o, k, groups=g) i/g*o*k*k + o, nn.LayerNorm(d) 2d.
def _linear(i, o, bias=True):
    return i * o + (o if bias else 0)


def _conv(i, o, k, groups=1):
    return i // groups * o * k * k + o


def official_block(stage, width, heads, shared, routed):
    """One Block: norm1, norm2, the attention (AggregatedAttention in stages 1-3, Attention in stage 4) with its MoH
    router (wg, wg_0, wg_1), ConvolutionalGLU."""
    cpb = _linear(2, 512) + _linear(512, heads)  # cpb_fc1, cpb_fc2
    common = width + heads + _linear(width, width) + cpb  # query_embedding, temperature, proj, cpb
    if stage < 3:  # q, kv, sr (1x1 conv), norm, relative_pos_bias_local, learnable_tokens, learnable_bias
        attention = (common + _linear(width, width) + _linear(width, 2 * width) + _conv(width, width, 1) + 2 * width
                     + 9 * heads + 9 * width + 9 * heads)
    else:  # qkv
        attention = common + _linear(width, 3 * width)
    router = ((width * (heads - shared) + (2 * width if shared else 0) if routed else 0)  # wg, wg_0
              + (width * shared if shared > 1 else 0))  # wg_1
    hidden = int(2 * int(width * MLP_RATIOS[stage]) / 3)
    glu = _linear(width, 2 * hidden) + _conv(hidden, hidden, 3, groups=hidden) + _linear(hidden, width)
    return 2 * 2 * width + attention + router + glu


def official_stage_extras(stage, widths):
    """patch_embed{i} (OverlapPatchEmbed: 7x7 stride-4 stem or 3x3 stride-2, with bias, then LayerNorm) and norm{i}."""
    conv = _conv(3, widths[0], 7) if stage == 0 else _conv(widths[stage - 1], widths[stage], 3)
    return conv + 2 * widths[stage] + 2 * widths[stage]


# Every stage kind runs by default: all heads shared with softmax gates and shared + routed, in aggregated and full
# attention (moh_vit_s_75), routed in every stage (moh_vit_b_50); the others (no router, other numbers) with -m slow.
# One abstract build with one block per stage each (~2 s): the full depth follows, as every block of a stage has
# the same shapes.
@pytest.mark.parametrize("preset", ["moh_vit_b_50", "moh_vit_s_75"] + [
    pytest.param(name, marks=pytest.mark.slow)
    for name in ("moh_vit_b_75", "moh_vit_s_80", "transnext_base", "transnext_small")])
def test_preset_parameters_equal_the_official_modules_stage_by_stage(preset):
    widths, depths, heads, shared, routed = _plan(preset)
    config = PRESETS[preset]
    one_block = dataclasses.replace(config, depth=1, stages=tuple(dataclasses.replace(s, depth=1)
                                                                  for s in config.stages))
    model = nnx.eval_shape(lambda: ViT(one_block, rngs=nnx.Rngs(0)))
    total = _linear(widths[3], 1000)  # the head
    for stage in range(4):
        block = official_block(stage, widths[stage], heads[stage], shared[stage], routed[stage])
        ours = model.stages[stage]
        assert count_parameters(ours.blocks[0]) == block, (preset, stage)
        # the stage's merge (or the stem), its one block and its closing norm (the final norm for the last)
        extras = count_parameters(model.patch_embed) if stage == 0 else 0
        extras += count_parameters(model.final_norm) if stage == 3 else 0
        assert count_parameters(ours) + extras == official_stage_extras(stage, widths) + block, (preset, stage)
        total += official_stage_extras(stage, widths) + depths[stage] * block
    ours_total = count_parameters(model) + sum((d - 1) * count_parameters(s.blocks[0])
                                               for d, s in zip(depths, model.stages))
    assert ours_total == total
    if preset in PUBLISHED_MILLIONS:
        assert round(total / 1e6, 1) == PUBLISHED_MILLIONS[preset], total
    else:  # the same model without its routers is TransNeXt at its published size
        plain = MOH_VIT_PRESETS[preset][1]
        routers = sum(d * (official_block(i, w, h, s, k) - official_block(i, w, h, 0, 0))
                      for i, (d, w, h, s, k) in enumerate(zip(depths, widths, heads, shared, routed)))
        assert round((total - routers) / 1e6, 1) == PUBLISHED_MILLIONS[plain], total - routers


def test_stage_norm_closes_every_stage_but_the_last():
    """ViTConfig.stage_norm (TransNeXt's norm1-norm3): the next stage merges layer-normalised tokens; the last stage
    has the final norm only; off, the model is unchanged (same parameters)."""
    # MLP-only blocks keep the one compile small; the norm sits between stages whatever the blocks hold
    base = ViTConfig(image_size=4, patch_size=1, channels=1, num_classes=3, width=8, depth=1, num_heads=2,
                     mlp_width=8, pooling="mean", position="none", use_attention=False,
                     stages=(ViTStage(width=12, depth=1, num_heads=2, mlp_width=8, use_attention=False),))
    normed = dataclasses.replace(base, stage_norm=True)
    plain_model = nnx.eval_shape(lambda: ViT(base, rngs=nnx.Rngs(0)))
    model = filled_from_numpy(lambda: ViT(normed, rngs=nnx.Rngs(0)), seed=0)  # the norm's gain and bias random too
    assert model.stages[1].output_norm is None and plain_model.stages[0].output_norm is None
    assert count_parameters(model) == count_parameters(plain_model) + 2 * 8
    images = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    _, intermediates = nnx.jit(lambda m, x: m(x, return_intermediates=True))(model, images)
    norm = model.stages[0].output_norm
    expected = (layer_norm_numpy(np.asarray(intermediates["stage_0/block_0/output"], np.float64), 1e-6)
                * np.asarray(norm.scale_d[...]) + np.asarray(norm.bias_d[...]))
    np.testing.assert_allclose(intermediates["stage_0/output"].reshape(2, 16, 8), expected, rtol=1e-4, atol=1e-5)

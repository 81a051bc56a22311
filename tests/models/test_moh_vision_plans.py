"""MoH's published per-layer head plans in the DiT and the hierarchical ViT (spec diffusion_multimodal_bench.md §5,
vision_mechanisms.md §10): the plans of SkyworkAI/MoH (MoH-DiT/models.py, MoH-ViT/transnext.py @ 66bb340),
transcribed here and checked against the spec's tables; each builds (nnx.eval_shape, no compile) with the planned
router per block; the balance loss reaches the DiT's training loss; §5(e)/§10(e) limits in a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.dit import DiT, dit_config
from models.layers.mixers import call_with_auxiliary_loss
from models.vit import ViT, ViTConfig, ViTStage

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

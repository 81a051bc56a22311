"""The DiT's condition cross-attention (PixArt-α sub-layer, models/layers/cross_attention.py) with the registry's NC
mechanisms and their per-call inputs, and MoH-DiT-L/XL per-block head plans (SkyworkAI/MoH MoH-DiT/models.py).

Cheap by construction: models are traced abstractly and filled from numpy (no initialiser compiles), and every
forward pass of the file runs in two jitted bundles."""

import dataclasses
import functools
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import dit
from models.dit import DiT, DiTBlock, DiTConfig
from models.layers.cross_attention import ConditionCrossAttention
from nnx_helpers import filled_from_numpy
from train import gin_config

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

# B=2, 4x4 input in 2x2 patches -> T=4 image tokens; S = 1 shared + 2 class tokens = 3; D=16, N=2 heads of 8.
CONFIG = DiTConfig(input_size=4, patch_size=2, in_channels=1, num_classes=3, width=16, depth=1, num_heads=2,
                   cross_attention="region_mask")
CROSS_PARTS = ("cross_attention", "label_tokens", "condition_proj")
X = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
STEPS = jnp.array([3, 500])
Y = jnp.array([0, 2])
FOREGROUND = np.array([[True, False, True, False], [False, False, False, True]])


def _is_cross(path) -> bool:
    return any(part in CROSS_PARTS for part in path)


@functools.cache
def _models():
    """(graphdefs, states): the region_mask DiT filled from numpy; the same DiT without the cross-attention (its
    state minus the cross-attention parts); the first with the cross-attention output projection at zero (its
    initialisation, PixArt's initialize_weights); a softmax DiT whose block has 3 heads of 4 (inner width 12 != 16)."""
    on = filled_from_numpy(lambda: DiT(CONFIG, rngs=nnx.Rngs(0)), seed=0)
    graph_on, state_on = nnx.split(on)
    off_config = dataclasses.replace(CONFIG, cross_attention=None)
    graph_off, abstract_off = nnx.split(nnx.eval_shape(lambda: DiT(off_config, rngs=nnx.Rngs(0))))
    state_off = nnx.filter_state(state_on, lambda path, _: not _is_cross(path))
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "cross_attention" in str(path) and ("out_" in str(path)) else x,
        state_on)
    planned = filled_from_numpy(lambda: DiT(dataclasses.replace(off_config, layer_num_heads=(3,),
                                                                attention_head_dim=4), rngs=nnx.Rngs(0)), seed=1)
    graph_planned, state_planned = nnx.split(planned)
    return (graph_on, graph_off, graph_planned), (state_on, state_off, zeroed, state_planned), abstract_off


@functools.cache
def dit_outputs():
    (graph_on, graph_off, graph_planned), states, _ = _models()

    @jax.jit
    def bundle(state_on, state_off, zeroed, state_planned):
        on, off = nnx.merge(graph_on, state_on), nnx.merge(graph_off, state_off)
        subject = jnp.broadcast_to(on.label_tokens.subject_tokens(), (2, 3))
        masked = dict(foreground=jnp.asarray(FOREGROUND), subject_tokens=subject)
        no_op = dict(foreground=jnp.ones((2, 4), bool), subject_tokens=subject)
        keep, drop = jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32)
        return dict(
            off=off(X, STEPS, Y), zeroed=nnx.merge(graph_on, zeroed)(X, STEPS, Y), on=on(X, STEPS, Y),
            no_op=on(X, STEPS, Y, cross_attention_kwargs=no_op),
            masked=on(X, STEPS, Y, force_drop_ids=keep, cross_attention_kwargs=masked),
            unconditional=on(X, STEPS, Y, force_drop_ids=drop),
            context=on(X, STEPS, Y, context=on.label_tokens(Y)),
            cfg_3=on.forward_with_cfg(X, STEPS, Y, 3.0, cross_attention_kwargs=masked),
            planned=nnx.merge(graph_planned, state_planned)(X, STEPS, Y))

    return jax.tree.map(np.asarray, bundle(*states))


def test_off_is_dit_and_on_adds_only_its_own_parameters():
    """With cross_attention=None the DiT has exactly its old parameters; switching it on adds the cross-attention
    parts only (built last, so DiT's own weights keep their draws: same paths, shapes and order)."""
    _, (state_on, state_off, _, _), abstract_off = _models()
    paths = lambda state: [(path, leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(state)]  # noqa: E731
    assert paths(state_off) == paths(abstract_off)
    added = [path for path, _ in paths(state_on) if _is_cross([getattr(p, "key", p) for p in path])]
    assert len(paths(state_on)) == len(paths(state_off)) + len(added) and added
    D, S_shared, S_class, V = 16, 1, 2, CONFIG.num_classes + 1
    # per block: q, k, v [D, N, H] + 3 biases [N, H] + out [N, H, D] + bias [D]; model: tokens, PixArt's y_proj
    expected = 4 * D * D + 4 * D + S_shared * D + V * S_class * D + (D * D + D) * 2
    count = lambda state: sum(int(np.prod(s)) for _, s in paths(state))  # noqa: E731
    assert count(state_on) - count(state_off) == expected


@pytest.mark.slow  # two real initialisations compiled (~5 s on the CI machine); the structure is checked above
def test_switching_it_on_keeps_every_other_weights_draw():
    config = dataclasses.replace(CONFIG, depth=2)
    off, on = jax.jit(lambda: tuple(nnx.state(DiT(c, rngs=nnx.Rngs(0)), nnx.Param) for c in (
        dataclasses.replace(config, cross_attention=None), config)))()
    on = nnx.filter_state(on, lambda path, _: not _is_cross(path))
    assert jax.tree.structure(on) == jax.tree.structure(off)
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(on)):
        np.testing.assert_array_equal(a, b)


def test_at_initialisation_the_sub_layer_is_the_identity_bit_for_bit():
    out = dit_outputs()
    np.testing.assert_array_equal(out["zeroed"], out["off"])
    assert not np.allclose(out["on"], out["off"], atol=1e-3)  # with weights, the sub-layer does contribute


def test_per_call_inputs_reach_the_mechanism():
    out = dit_outputs()
    np.testing.assert_allclose(out["no_op"], out["on"], rtol=1e-5, atol=1e-6)  # every pixel in the foreground
    assert not np.allclose(out["masked"], out["on"], atol=1e-4)
    np.testing.assert_allclose(out["context"], out["on"], rtol=1e-5, atol=1e-6)  # explicit context = label tokens


def test_guidance_applies_per_call_inputs_to_the_conditional_half_only():
    out = dit_outputs()
    conditional, unconditional = out["masked"], out["unconditional"]  # with the masks / the null tokens without
    guided = unconditional[..., :1] + 3.0 * (conditional[..., :1] - unconditional[..., :1])
    np.testing.assert_allclose(out["cfg_3"][..., :1], guided, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["cfg_3"][..., 1:], conditional[..., 1:], rtol=1e-5, atol=1e-5)  # variance


def test_a_block_with_an_inner_width_other_than_the_model_width_runs():
    _, (_, _, _, state_planned), _ = _models()
    query = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state_planned) if "query_dnh" in str(path)]
    assert [q.shape for q in query] == [(16, 3, 4)]
    planned = dit_outputs()["planned"]
    assert planned.shape == (2, 4, 4, 2) and np.all(np.isfinite(planned))


# ---- the layer against a numpy oracle, every NC mechanism with its per-call inputs -----------------------------

B, T, S, M, D, N = 2, 5, 3, 2, 16, 2
LAYER_CASES = {
    "softmax": ("softmax", {}),
    "region_mask": ("region_mask", {}),
    "isolation": ("isolation", {"background_sees_all": False}),
    "structured_default": ("structured_cross", {"mode": "default"}),
    "structured_conjunction": ("structured_cross", {"mode": "conjunction"}),
}
rng = np.random.default_rng(3)
LAYER_X = rng.standard_normal((B, T, D)).astype(np.float32)
LAYER_CONDITION = rng.standard_normal((B, S, D)).astype(np.float32)
EXTRA = rng.standard_normal((M, B, S, D)).astype(np.float32)
LAYER_FOREGROUND = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], bool)
SUBJECT_TOKENS = np.array([[0, 1, 1], [0, 0, 1]], bool)
Q_IDS = np.array([[0, 1, 2, 1, 0], [2, 2, 0, 1, 1]], np.int32)
K_IDS = np.array([[1, 0, 2], [1, 2, 0]], np.int32)


def _call_kwargs(case):
    if case == "region_mask":
        return dict(foreground=LAYER_FOREGROUND, subject_tokens=SUBJECT_TOKENS)
    if case == "isolation":
        return dict(q_ids=Q_IDS, k_ids=K_IDS)
    return dict(extra_contexts=EXTRA) if case.startswith("structured") else {}


SHARED_ONLY = ~SUBJECT_TOKENS  # region_mask: what a pixel outside the foreground may read


@functools.cache
def layer_outputs():
    layers = {case: filled_from_numpy(lambda kind=kind, kw=kw: ConditionCrossAttention(
        D, N, kind=kind, kind_kwargs=kw, rngs=nnx.Rngs(0)), seed=i) for i, (case, (kind, kw)) in
        enumerate(LAYER_CASES.items())}
    graphs = {case: nnx.split(layer)[0] for case, layer in layers.items()}
    states = {case: nnx.split(layer)[1] for case, layer in layers.items()}

    @jax.jit
    def run(states):
        out = {case: nnx.merge(graphs[case], states[case])(
            jnp.asarray(LAYER_X), jnp.asarray(LAYER_CONDITION), **_call_kwargs(case)) for case in LAYER_CASES}
        region = nnx.merge(graphs["region_mask"], states["region_mask"])
        for b in range(B):  # the same layer without masks over the non-subject tokens only
            out[f"region_kept_{b}"] = region(jnp.asarray(LAYER_X[b:b + 1]),
                                             jnp.asarray(LAYER_CONDITION[b:b + 1, SHARED_ONLY[b]]))
        return out

    return layers, jax.tree.map(np.asarray, run(states))


def _np_attention(q, k, v, allowed):
    """[B, T, N, H] x [B, S, N, H] under allowed [B, T, S] (fully masked rows give 0), float64."""
    z = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    z = np.where(allowed[:, None], z, -np.inf)
    peak = np.max(np.where(allowed[:, None], z, -1e300), axis=-1, keepdims=True)
    e = np.where(allowed[:, None], np.exp(z - peak), 0.0)
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bnts,bsnv->btnv", p, v)


def _np_layer(layer, case):
    w = {name: np.asarray(getattr(layer, name)[...], np.float64) for name in (
        "query_dnh", "key_dnh", "value_dnh", "out_nhd", "query_bias_nh", "key_bias_nh", "value_bias_nh",
        "out_bias_d")}
    project = lambda x, which: np.einsum("...sd,dnh->...snh", x, w[f"{which}_dnh"]) + w[f"{which}_bias_nh"]  # noqa
    q, k, v = project(LAYER_X, "query"), project(LAYER_CONDITION, "key"), project(LAYER_CONDITION, "value")
    every = np.ones((B, T, S), bool)
    if case == "region_mask":  # subject-token logits are -inf outside the foreground
        outs = [_np_attention(q, k, v, LAYER_FOREGROUND[:, :, None] | ~SUBJECT_TOKENS[:, None, :])]
    elif case == "isolation":  # background_sees_all=False: background rows see background keys only
        qi, ki = Q_IDS[:, :, None], K_IDS[:, None, :]
        outs = [_np_attention(q, k, v, np.where(qi == 0, ki == 0, (qi == ki) | (ki == 0)))]
    elif case == "structured_default":  # one map over the prompt's and every phrase's values
        outs = [_np_attention(q, k, vi, every) for vi in [v, *project(EXTRA, "value")]]
    elif case == "structured_conjunction":  # every key set's map over the one value set
        outs = [_np_attention(q, ki, v, every) for ki in [k, *project(EXTRA, "key")]]
    else:
        outs = [_np_attention(q, k, v, every)]
    return np.einsum("btnh,nhd->btd", sum(outs) / len(outs), w["out_nhd"]) + w["out_bias_d"]


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_cross_attention_layer_equals_a_numpy_oracle(case):
    layers, outputs = layer_outputs()
    np.testing.assert_allclose(outputs[case], _np_layer(layers[case], case), rtol=2e-5, atol=2e-5)


def test_region_mask_layer_hides_the_subject_from_background_pixels():
    """PrimeComposer's test (spec §8): outside the foreground a pixel's output is attention over the non-subject
    tokens alone."""
    _, outputs = layer_outputs()
    for b in range(B):
        background = ~LAYER_FOREGROUND[b]
        np.testing.assert_allclose(outputs["region_mask"][b, background], outputs[f"region_kept_{b}"][0, background],
                                   rtol=2e-5, atol=2e-5)
    assert not np.allclose(outputs["region_mask"][0, 0], outputs["region_kept_0"][0, 0], atol=1e-4)  # foreground


# ---- refusals -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(cross_attention="hilo"), r"cross_attention='hilo' does not support non-causal cross attention"),
    (dict(cross_attention="no_such_mechanism"), "no_such_mechanism"),
    (dict(cross_attention_kwargs={"mode": "default"}), "without a cross_attention mechanism"),
    (dict(cross_attention="region_mask", condition_shared_tokens=2, condition_class_tokens=2),
     "4 condition tokens .* equal the 4 image tokens"),
    (dict(condition_class_tokens=-1), "condition_class_tokens must be an int >= 0"),
    (dict(layer_num_heads=(3,)), r"layer_num_heads\[0\]=3 does not divide width=16"),
    (dict(layer_num_heads=(0,)), "layer_num_heads must be a tuple of positive ints"),
    (dict(attention_head_dim=0), "attention_head_dim must be a positive int or None"),
    (dict(attention="hilo", layer_num_heads=(4,)), "spatial mixer"),
])
def test_bad_configs_are_clear_errors(overrides, message):
    base = dict(input_size=4, patch_size=2, in_channels=1, num_classes=3, width=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=message):
        DiTConfig(**{**base, **overrides})


def test_bad_calls_are_clear_errors():
    (graph_on, graph_off, _), (state_on, state_off, _, _), _ = _models()
    on, off = nnx.merge(graph_on, state_on), nnx.merge(graph_off, state_off)
    with pytest.raises(ValueError, match="no condition cross-attention"):
        jax.eval_shape(lambda: off(X, STEPS, Y, context=jnp.zeros((2, 3, 16))))
    with pytest.raises(ValueError, match="only cross attention 'structured_cross' reads extra contexts"):
        jax.eval_shape(lambda: on(X, STEPS, Y, cross_attention_kwargs={"extra_contexts": jnp.zeros((1, 2, 3, 16))}))
    with pytest.raises(ValueError, match="give context and null_context together"):
        jax.eval_shape(lambda: on.forward_with_cfg(X, STEPS, Y, 2.0, context=jnp.zeros((2, 3, 16))))
    with pytest.raises(ValueError, match="region_mask: query length T=4 equals key length S=4"):
        jax.eval_shape(lambda: on(X, STEPS, Y, context=jnp.zeros((2, 4, 16))))


# ---- MoH-DiT-L/XL per-block head plans ------------------------------------------------------------------------

# MoH-DiT/models.py @ 66bb340: (depth, width, num_heads per block, shared_head, routed_head, head_dim), written out
# here from the code (not read from the gin files they check).
OFFICIAL_PLANS = {
    "XL_2_90": (28, 1152, [8] * 9 + [16] * 10 + [24] * 9, [8] * 9 + [16] * 19, [0] * 19 + [3] * 9, 72),
    "XL_2_75": (28, 1152, [8] * 9 + [16] * 10 + [24] * 9, [8] * 9 + [10] * 10 + [14] * 9, [0] * 9 + [2] * 19, 72),
    "L_2_90": (24, 1024, [8] * 8 + [16] * 8 + [24] * 8, [8] * 8 + [16] * 16, [0] * 16 + [3] * 8, 64),
    "L_2_75": (24, 1024, [8] * 8 + [16] * 8 + [24] * 8, [8] * 16 + [12] * 8, [0] * 8 + [4] * 16, 64),
}


@functools.cache
def plan_config(name: str) -> DiTConfig:
    """The config a size file gives on the digits experiment (parsed, nothing built)."""
    gin_config.parse([str(CONFIGS / "experiments/dit_digits.gin"), str(CONFIGS / f"models/dit/moh_{name}.gin")], [])
    try:
        return gin.query_parameter("image_diffusion.ClassConditionalDiffusion.model").scoped_configurable_fn()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name", sorted(OFFICIAL_PLANS))
def test_size_files_give_every_block_the_official_heads_and_gates(name):
    depth, width, heads, shared, routed, head_dim = OFFICIAL_PLANS[name]
    config = plan_config(name)
    assert (config.depth, config.width, config.patch_size) == (depth, width, 2)
    for index in range(depth):
        attention, kwargs = config.layer_choice(index)
        assert config.layer_heads(index) == (heads[index], head_dim), (name, index)
        assert attention == "moh" and (kwargs["n_shared"], kwargs["top_k"]) == (shared[index], routed[index])
    active = sum(s + k for s, k in zip(shared, routed)) / sum(heads)
    assert abs(active - int(name[-2:]) / 100) < 0.01  # the name is the share of heads active per token


def official_block_parameters(width, heads, head_dim, shared, routed):
    """Parameters of one MoH-DiT block as MoH-DiT/models.py builds it: qkv Linear(D, 3 N H) and proj Linear(N H, D)
    with biases, wg [D, N - h_s] (routed), wg_0 [D, 2] (routed and shared), wg_1 [D, h_s] (h_s > 1), Mlp(D, 4D),
    adaLN Linear(D, 6D); the LayerNorms have none."""
    inner = heads * head_dim
    attention = width * 3 * inner + 3 * inner + inner * width + width
    routers = (width * (heads - shared) if routed else 0) + (2 * width if routed and shared else 0) + \
        (width * shared if shared > 1 else 0)
    return attention + routers + (width * 4 * width + 4 * width + 4 * width * width + width) + \
        (width * 6 * width + 6 * width)


@pytest.mark.parametrize("index", [0, 9, 19])  # XL/2-90's three kinds of block: 8, 16 and 24 heads
def test_xl_90_blocks_have_the_planned_heads_and_the_official_parameter_count(index):
    _, width, heads, shared, routed, head_dim = OFFICIAL_PLANS["XL_2_90"]
    config = plan_config("XL_2_90")
    block = nnx.eval_shape(lambda: DiTBlock(config, rngs=nnx.Rngs(0), layer=index))
    attention = block.attention
    assert attention.query_dnh.shape == (width, heads[index], head_dim)
    assert attention.out_nhd.shape == (heads[index], head_dim, width)
    assert (attention.router.n_shared, attention.router.top_k) == (shared[index], routed[index])
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(block, nnx.Param)))
    assert count == official_block_parameters(width, heads[index], head_dim, shared[index], routed[index])


@pytest.mark.slow  # the whole XL model traced abstractly: ~5-10 s on the CI machine
def test_moh_xl_90_parameter_count_is_the_official_codes():
    """The paper gives no parameter count for MoH-DiT; its code's modules at ImageNet 256 (32x32x4 latents, 1000
    classes, learned sigma) add up to this, without the frozen position embedding."""
    depth, width, heads, shared, routed, head_dim = OFFICIAL_PLANS["XL_2_90"]
    config = dataclasses.replace(plan_config("XL_2_90"), input_size=32, in_channels=4, num_classes=1000)
    blocks = sum(official_block_parameters(width, heads[i], head_dim, shared[i], routed[i]) for i in range(depth))
    embed = 2 * 2 * 4 * width + width + (256 * width + width + width * width + width) + 1001 * width
    final = width * 2 * width + 2 * width + width * 2 * 2 * 8 + 2 * 2 * 8
    assert dit.count_params(config) == blocks + embed + final

"""The DiT family: preset shapes and parameter counts (abstractly), adaLN-Zero identity at initialisation, label
dropout and the null class, classifier-free guidance, embeddings against the reference formulas, validation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import dit
from models.dit import DiT, DiTConfig, dit_config
from models.layers.adaln import LabelEmbedder, timestep_embedding
from models.layers.patch import patchify, unpatchify

# Distinct sizes per axis (ARCHITECTURE §7): B=2, 6x6 input of 4 channels (DiT's latent channel count, so the
# reference guidance quirk is visible), p=2 -> T=9 tokens, D=24, N=3 heads of H=8, F=96, 5 classes.
CONFIG = DiTConfig(input_size=6, patch_size=2, in_channels=4, num_classes=5, width=24, depth=2, num_heads=3)


def randomized(model: DiT, seed: int = 0, scale: float = 0.2) -> DiT:
    """The model with every parameter perturbed: the zero-initialised layers would hide most behaviour."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return nnx.merge(graphdef, jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


INPUTS = (jax.random.normal(jax.random.key(1), (2, 6, 6, 4)), jnp.array([3, 711]), jnp.array([1, 4]))


@jax.jit
def outputs(model: DiT) -> dict[str, jax.Array]:
    """Everything the tests below compare, from one compiled function (eager NNX calls and compiles are slow)."""
    x, t, y = INPUTS
    conditional, intermediates = model(x, t, y, return_intermediates=True)
    return dict(
        conditional=conditional,
        intermediates=intermediates,
        dropped=model(x, t, y, force_drop_ids=jnp.array([1, 0])),
        null_labels=model(x, t, jnp.array([CONFIG.num_classes, 4])),
        unconditional=model(x, t, y, force_drop_ids=jnp.ones(2, jnp.int32)),
        **{f"cfg_{scale:g}": model.forward_with_cfg(x, t, y, scale) for scale in (0.0, 1.0, 4.0)},
        cfg_4_quirk=model.forward_with_cfg(x, t, y, 4.0, all_channels=False),
    )


def build(perturb: bool = False) -> DiT:
    """The test DiT, built in one compiled function (an eager build runs each initializer separately: slow)."""
    return jax.jit(lambda: randomized(DiT(CONFIG, rngs=nnx.Rngs(0))) if perturb else DiT(CONFIG, rngs=nnx.Rngs(0)))()


@pytest.fixture(scope="module")
def randomized_outputs():
    return outputs(build(perturb=True))


@functools.cache
def abstract_run(preset: str):
    """(output shape, parameter count) of a preset's DiT, traced abstractly: nothing is allocated, even for XL."""
    config = dit_config(preset)
    side = config.input_size

    def build_and_apply():
        model = DiT(config, rngs=nnx.Rngs(0))
        zeros = jnp.zeros(2, jnp.int32)
        return model(jnp.zeros((2, side, side, config.in_channels)), zeros, zeros), nnx.state(model, nnx.Param)

    out, params = jax.eval_shape(build_and_apply)
    return out, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


# The /4 and /8 presets differ from /2 only in the patch size (the same code path, traced abstractly at 5-10 s
# each on the CI machine): they run with `-m slow`.
@pytest.mark.parametrize("preset", [pytest.param(name, marks=pytest.mark.slow) if name.endswith(("/4", "/8"))
                                    else name for name in sorted(dit.PRESETS)])
def test_every_preset_has_the_right_output_shape(preset):
    config = dit_config(preset)
    out, _ = abstract_run(preset)
    side = config.input_size
    assert out.shape == (2, side, side, config.out_channels) and out.dtype == jnp.float32


@pytest.mark.parametrize("preset, millions", [("S/2", 33), ("B/2", 130), ("L/2", 458), ("XL/2", 675)])
def test_parameter_counts_match_the_paper(preset, millions):
    """Table 1 (rounded); XL/2 also against the 675,129,632 that DiT's code reports, which includes its fixed
    position embedding (a frozen parameter there, a constant here)."""
    config = dit_config(preset)
    _, count = abstract_run(preset)
    assert count == pytest.approx(millions * 1e6, rel=0.01)
    if preset == "S/2":  # count_params, the helper for reports, agrees with the traced shapes
        assert dit.count_params(config) == count
    if preset == "XL/2":
        assert count + config.num_patches * config.width == 675_129_632


def test_blocks_are_the_identity_and_the_output_is_zero_at_initialisation():
    results = outputs(build())
    intermediates = results["intermediates"]
    np.testing.assert_array_equal(results["conditional"], 0)
    for index in range(CONFIG.depth):
        np.testing.assert_array_equal(intermediates[f"block_{index}"], intermediates["tokens"])
    assert results["conditional"].shape == (2, 6, 6, 8) and intermediates["tokens"].shape == (2, 9, 24)


def test_patchify_round_trip_and_reference_unpatchify_order():
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    tokens = patchify(x, 2)
    np.testing.assert_array_equal(unpatchify(tokens, 2, (3, 3), 3), x)
    # DiT's unpatchify: reshape (n, h, w, p, q, c), einsum nhwpqc->nchpwq; channels last here.
    expected = np.asarray(tokens).reshape(2, 3, 3, 2, 2, 3).transpose(0, 5, 1, 3, 2, 4).reshape(2, 3, 6, 6)
    np.testing.assert_array_equal(np.moveaxis(expected, 1, -1), unpatchify(tokens, 2, (3, 3), 3))


def test_timestep_embedding_is_cos_then_sin():
    t = jnp.array([0.0, 3.0, 250.5])
    half = 4
    frequencies = np.exp(-np.log(10_000) * np.arange(half) / half)
    expected = np.concatenate([np.cos(np.outer(t, frequencies)), np.sin(np.outer(t, frequencies))], axis=1)
    np.testing.assert_allclose(timestep_embedding(t, 8), expected, rtol=1e-5, atol=1e-6)
    assert timestep_embedding(t, 9).shape == (3, 9)


def test_force_drop_ids_give_the_null_class(randomized_outputs):
    results = randomized_outputs
    np.testing.assert_allclose(results["dropped"], results["null_labels"], atol=1e-6)
    assert not np.allclose(results["dropped"][0], results["conditional"][0], atol=1e-4)


def test_label_dropout_in_training_draws_from_the_rng():
    embedder = LabelEmbedder(10, 4, dropout_prob=0.1, rngs=nnx.Rngs(0))
    labels = jnp.zeros(20_000, jnp.int32)
    dropped = embedder.drop_labels(labels, rng=jax.random.key(0))
    assert float(jnp.mean(dropped == 10)) == pytest.approx(0.1, abs=0.01)
    np.testing.assert_array_equal(embedder.drop_labels(labels), labels)  # no rng: nothing dropped
    model = nnx.eval_shape(lambda: DiT(CONFIG, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="train=True .* needs an rng"):
        model.conditioning(jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), train=True)


def test_guidance_scale_one_is_the_conditional_model(randomized_outputs):
    results = randomized_outputs
    np.testing.assert_allclose(results["cfg_1"], results["conditional"], atol=1e-5)
    # Scale 0: the unconditional ε; the variance channels stay the conditional model's.
    np.testing.assert_allclose(results["cfg_0"][..., :4], results["unconditional"][..., :4], atol=1e-5)
    np.testing.assert_allclose(results["cfg_0"][..., 4:], results["conditional"][..., 4:], atol=1e-5)


def test_reference_quirk_guides_only_the_first_three_channels(randomized_outputs):
    results = randomized_outputs
    quirk, standard = results["cfg_4_quirk"], results["cfg_4"]
    np.testing.assert_allclose(quirk[..., :3], standard[..., :3], atol=1e-5)
    np.testing.assert_allclose(quirk[..., 3:], results["conditional"][..., 3:], atol=1e-5)  # channel 3 unguided
    assert not np.allclose(quirk[..., 3], standard[..., 3], atol=1e-3)


def test_config_asks_for_non_causal_self_attention(monkeypatch):
    """The mechanism is checked for the NS pattern at construction (the shared resolver rejects the others)."""
    calls = []
    monkeypatch.setattr(dit, "check_attention_choice",
                        lambda owner, kind, kwargs, *, causal: calls.append((kind, causal)))
    DiTConfig(attention="sliding_window")
    assert calls == [("sliding_window", False)]


def test_attention_is_the_shared_layer_picked_by_name():
    model = nnx.eval_shape(lambda: DiT(CONFIG, rngs=nnx.Rngs(0)))
    attention = model.blocks[0].attention
    assert attention.kind == "softmax" and not attention.causal and not attention.use_rope
    assert attention.query_dnh.shape == (24, 3, 8) and attention.query_bias_nh is not None


def test_layer_attention_picks_each_blocks_mechanism_in_a_repeating_pattern():
    """MoH-DiT's head plans differ per block; entries repeat over the depth (block l takes entry l % len)."""
    moh = ("moh", {"n_shared": 1, "top_k": 1, "core": "softmax"})
    config = dataclasses.replace(CONFIG, depth=4, layer_attention=[None, moh])
    assert config.layer_attention == (None, moh)
    model = nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0)))
    kinds = [block.attention.kind for block in model.blocks]
    assert kinds == ["softmax", "moh", "softmax", "moh"]
    assert model.blocks[0].attention.router is None and model.blocks[1].attention.router is not None


def test_presets_and_overrides():
    assert dit_config("tiny") == DiTConfig()
    assert dit_config("XL/2", attention="moh").attention == "moh"
    assert set(dit.PRESETS) == {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} | {"tiny"}
    with pytest.raises(ValueError, match="unknown DiT preset 'XXL/2'.*XL/2"):
        dit_config("XXL/2")


@pytest.mark.parametrize("overrides, message", [
    (dict(attention="no_such_mechanism"), "no_such_mechanism.*softmax"),
    (dict(input_size=8, patch_size=3), "input_size=8 is not divisible by patch_size=3"),
    (dict(width=30, num_heads=4), "width=30 is not divisible by num_heads=4"),
    (dict(width=18, num_heads=3), "width=18 must be divisible by 4"),
    (dict(depth=0), "DiTConfig.depth must be a positive int, got 0"),
    (dict(class_dropout_prob=1.0), r"class_dropout_prob must be in \[0, 1\), got 1.0"),
    (dict(mlp_ratio=0), "mlp_ratio must be > 0"),
    (dict(param_dtype="float64"), "param_dtype='float64'; allowed"),
    (dict(learn_sigma="yes"), "learn_sigma must be a bool"),
    (dict(layer_attention=(None, "no_such_mechanism")), r"layer_attention\[1\].*no_such_mechanism"),
    (dict(layer_attention=(None, 3)), "layer_attention entry 3: expected None"),
    (dict(layer_attention="softmax"), "layer_attention must be a tuple"),
])
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig(**overrides)

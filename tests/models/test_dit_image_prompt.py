"""DiT with IP-Adapter image-prompt conditioning (DiTConfig.image_prompt_tokens): structure and parameter count,
adaLN-Zero identity at initialisation with the option on, the image stream's weight lambda, guidance, and a 2-step
smoke run of the image-prompt experiment (bench/image_prompt.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.dit import DiT, DiTConfig, count_params
from models.layers.ip_adapter import DecoupledCrossAttention, ImageProjModel

E, M = 12, 3  # image embedding width, image prompt tokens
CONFIG = DiTConfig(patch_size=4, width=16, depth=2, num_heads=2, image_prompt_tokens=M, image_prompt_dim=E,
                   image_prompt_scale=0.7)


@pytest.fixture(scope="module")
def model():
    return jax.jit(lambda: DiT(CONFIG, rngs=nnx.Rngs(0)))()  # one compile, not one per initializer


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32), jnp.asarray([3, 500]),
            jnp.asarray([1, 7]), jnp.asarray(rng.standard_normal((2, E)), jnp.float32),
            jnp.asarray(rng.standard_normal((2, E)), jnp.float32))


def test_option_adds_exactly_the_adapter_weights_and_is_absent_when_off():
    off = DiTConfig(patch_size=4, width=16, depth=2, num_heads=2)
    D = off.width
    projection = E * M * D + M * D + 2 * D  # Linear(E, M*D) with bias, LayerNorm(D) with gain and bias
    cross = 3 * (D * D + D) + 2 * D * D + D * D + D  # to_q/k/v with biases, bias-free to_k_ip/to_v_ip, to_out
    assert count_params(CONFIG) == count_params(off) + projection + off.depth * cross
    plain = nnx.eval_shape(lambda: DiT(off, rngs=nnx.Rngs(0)))
    assert plain.image_proj is None and all(block.image_attention is None for block in plain.blocks)
    kinds = {m.kind for _, m in nnx.iter_graph(nnx.eval_shape(lambda: DiT(CONFIG, rngs=nnx.Rngs(0))))
             if hasattr(m, "kind")}
    assert kinds == {"softmax", "ip_adapter"}


@pytest.fixture(scope="module")
def forward(model):
    """One compiled forward for every check: (plain output, intermediates, guided output) of the model with the
    given weights (the initial ones, or `randomized`)."""
    graphdef, _ = nnx.split(model)

    @jax.jit
    def run(state, x, t, y, image, scale, cfg):
        net = nnx.merge(graphdef, state)
        out, inter = net(x, t, y, image_embeds=image, image_prompt_scale=scale, return_intermediates=True)
        return out, inter, net.forward_with_cfg(x, t, y, cfg, image_embeds=image, image_prompt_scale=scale)

    return run


@pytest.fixture(scope="module")
def randomized(model):
    """The model's weights with every zero-initialised one redrawn, so that each branch reaches the output."""
    @jax.jit  # one compile rather than one per weight shape
    def redraw(state):
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return jax.tree.unflatten(treedef, [jnp.where(leaf == 0, 0.3 * jax.random.normal(k, leaf.shape, leaf.dtype),
                                                      leaf) for leaf, k in zip(leaves, keys)])

    return redraw(nnx.split(model)[1])


def test_blocks_are_the_identity_and_the_output_is_zero_at_initialisation_with_the_option_on(model, forward,
                                                                                            inputs):
    x, t, y, image, _ = inputs
    out, inter, _ = forward(nnx.split(model)[1], x, t, y, image, jnp.float32(CONFIG.image_prompt_scale),
                            jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    for index in range(CONFIG.depth):
        np.testing.assert_array_equal(np.asarray(inter[f"block_{index}"]), np.asarray(inter["tokens"]))


def test_lambda_weighs_the_image_stream_and_zero_removes_it(forward, randomized, inputs):
    x, t, y, image, other = inputs
    one = jnp.float32(1.0)
    a = forward(randomized, x, t, y, image, jnp.float32(0.0), one)[0]
    b = forward(randomized, x, t, y, other, jnp.float32(0.0), one)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # lambda = 0: the image cannot matter
    c = forward(randomized, x, t, y, image, one, one)[0]
    d = forward(randomized, x, t, y, other, one, one)[0]
    assert float(jnp.max(jnp.abs(c - d))) > 1e-3
    assert float(jnp.max(jnp.abs(c - a))) > 1e-3


def test_guidance_scale_one_is_the_image_conditioned_model(forward, randomized, inputs):
    x, t, y, image, _ = inputs
    out, _, guided = forward(randomized, x, t, y, image, jnp.float32(0.5), jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(guided), np.asarray(out), atol=1e-5, rtol=1e-5)


def test_missing_or_unexpected_image_embeds_are_clear_errors(model, inputs):
    x, t, y, _, _ = inputs
    with pytest.raises(ValueError, match="image_embeds"):
        model(x, t, y)
    plain = nnx.eval_shape(lambda: DiT(DiTConfig(patch_size=4, width=16, depth=1, num_heads=2), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="image_prompt_tokens"):
        nnx.eval_shape(lambda: plain(x, t, y, image_embeds=jnp.zeros((2, E))))


@pytest.mark.parametrize("overrides, message", [
    (dict(image_prompt_tokens=-1), "image_prompt_tokens"),
    (dict(image_prompt_tokens=2, image_prompt_dim=0), "image_prompt_dim"),
    (dict(image_prompt_tokens=2, image_prompt_scale="big"), "image_prompt_scale"),
])
def test_bad_image_prompt_configs_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig(**overrides)


def test_image_projection_and_cross_attention_layer():
    proj = ImageProjModel(E, 16, M, rngs=nnx.Rngs(0))
    tokens = proj(jnp.ones((2, E)))
    assert tokens.shape == (2, M, 16)
    np.testing.assert_allclose(np.asarray(tokens.mean(-1)), 0.0, atol=1e-5)  # LayerNorm over the context width
    layer = DecoupledCrossAttention(16, 2, rngs=nnx.Rngs(0))
    assert layer.kind == "ip_adapter"
    np.testing.assert_array_equal(np.asarray(layer.image_key_cnh[...]), np.asarray(layer.key_cnh[...]))
    np.testing.assert_array_equal(np.asarray(layer.out_nhd[...]), 0.0)


def _tiny_task(**overrides):
    from bench.image_prompt import ImagePromptDiffusion
    from train import image_diffusion
    from train.data.digits import DigitsData

    base = image_diffusion.ClassConditionalDiffusion(
        model=DiTConfig(patch_size=4, width=16, depth=1, num_heads=2, image_prompt_tokens=2, image_prompt_dim=64),
        data=DigitsData(batch_size=8), num_timesteps=40, sampling_steps=2, samples_per_class=2, grid_columns=2,
        classifier_steps=20)  # the classifier of tests/train/test_image_diffusion.py (cached per process)
    return ImagePromptDiffusion(base=base, encoder_steps=20, references_per_class=1, **overrides)


def _check_outputs(path, scales, guidance):
    from bench.image_prompt import RESULTS_JSON, RESULTS_PNG

    record = json.loads((path / RESULTS_JSON).read_text())
    assert (path / RESULTS_PNG).stat().st_size > 1000
    assert set(record["reference_class_share"]) == {f"lambda_{s}_cfg_{g}" for s in scales for g in guidance}
    assert all(0 <= v <= 1 for v in record["reference_class_share"].values())
    assert record["num_references"] == 10


# Slow (~35 s on the CI machine): the task, its encoder and finish() on top of the DiT checks above; the gin
# experiment and overlay are built by the config test.
@pytest.mark.slow
def test_image_prompt_experiment_smoke(tmp_path):
    """2 optimizer steps on the task's loss (the adapter weights learn), then finish() writes the JSON and grid."""
    task = _tiny_task(scales=(0.0, 1.0), cfg_scale=1.0)
    model = jax.jit(lambda: task.build_model(nnx.Rngs(0)))()
    images, labels = task.base.data.arrays("train")
    batch = {"image": jnp.asarray(images[:8]), "label": jnp.asarray(labels[:8])}
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, rng):
        loss, grads = jax.value_and_grad(lambda s: task.loss_fn(nnx.merge(graphdef, s), batch, rng)[0])(state)
        return loss, grads, jax.tree.map(lambda p, g: p - 0.05 * g, state, grads)

    losses = []
    for index in range(2):
        loss, grads, state = step(state, jax.random.key(index))
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    # The second step's gradient reaches the adapter's output projection (the first one reaches only DiT's
    # zero-initialised final layer).
    assert float(jnp.max(jnp.abs(grads["blocks"][0]["image_attention"]["out_nhd"][...]))) > 0
    task.finish(nnx.merge(graphdef, state), jax.random.key(0), workdir=str(tmp_path))
    _check_outputs(tmp_path, ("0", "1"), ("1",))


@pytest.mark.slow
def test_image_prompt_experiment_through_the_trainer(tmp_path):
    from train import trainer
    from train.optim import OptimizerConfig

    task = _tiny_task(scales=(0.0, 1.0), cfg_scale=1.5)
    result = trainer.train(task, workdir=str(tmp_path), steps=2, optimizer=OptimizerConfig(warmup_steps=1),
                           progress_bar=False, async_checkpoints=False)
    assert result.final_step == 2 and all(np.isfinite(list(result.losses.values())))
    _check_outputs(tmp_path, ("0", "1"), ("1", "1.5"))

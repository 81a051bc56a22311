"""Gaussian diffusion: schedules and forward process against numpy ports of the papers' formulas, the training loss,
respacing, and the DDPM/DDIM samplers (oracle denoisers, determinism, guidance scale 1 == conditional)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import diffusion
from models.dit import DiT, DiTConfig

# Distinct sizes per axis: B=3 examples of 4x6 images with 2 channels; T=50 steps.
SHAPE = (3, 4, 6, 2)
T = 50


def numpy_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Ho et al. (2020): α_t = 1 - β_t, ᾱ_t = Π α_s (eq. 4), posterior q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
    alphas = 1 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return {
        "alphas_cumprod": alphas_cumprod,
        "posterior_variance": betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        "coef_x0": np.sqrt(alphas_cumprod_prev) * betas / (1 - alphas_cumprod),
        "coef_xt": np.sqrt(alphas) * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
    }


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 17, T - 1], np.int32)
    return x0, noise, t


def test_linear_schedule_is_ho_et_al_scaled_by_1000_over_T():
    np.testing.assert_allclose(diffusion.beta_schedule("linear", 1000), np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    np.testing.assert_allclose(diffusion.beta_schedule("linear", 200), np.linspace(5e-4, 0.1, 200), rtol=1e-12)


def test_cosine_schedule_follows_its_alpha_bar():
    """Nichol & Dhariwal (2021) eq. 17: ᾱ(t) = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2), s = 0.008."""
    betas = diffusion.beta_schedule("squaredcos_cap_v2", T)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    expected = f(np.arange(1, T + 1) / T) / f(0)
    np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], expected[:-1], rtol=1e-10)
    assert betas[-1] == pytest.approx(0.999)  # the cap: ᾱ reaches 0 at t = T


@pytest.mark.parametrize("schedule", diffusion.SCHEDULES)
def test_alphas_cumprod_q_sample_and_q_posterior_match_numpy(schedule, arrays):
    x0, noise, t = arrays
    d = diffusion.make_diffusion(schedule, T)
    ref = numpy_tables(diffusion.beta_schedule(schedule, T))
    np.testing.assert_allclose(d.alphas_cumprod, ref["alphas_cumprod"], rtol=1e-12)

    abar = ref["alphas_cumprod"][t][:, None, None, None]
    xt_expected = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise  # eq. 4
    xt = diffusion.q_sample(d, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    np.testing.assert_allclose(xt, xt_expected, atol=1e-6)

    mean, variance, log_variance = diffusion.q_posterior(d, jnp.asarray(x0), jnp.asarray(xt_expected, jnp.float32),
                                                         jnp.asarray(t))
    col = lambda table: table[t][:, None, None, None]
    np.testing.assert_allclose(mean, col(ref["coef_x0"]) * x0 + col(ref["coef_xt"]) * xt_expected, atol=1e-6)
    np.testing.assert_allclose(variance, np.broadcast_to(col(ref["posterior_variance"]), SHAPE), atol=1e-6)
    # log β̃ with β̃_0 = 0 replaced by β̃_1.
    clipped = np.log(np.concatenate([ref["posterior_variance"][1:2], ref["posterior_variance"][1:]]))
    np.testing.assert_allclose(log_variance, np.broadcast_to(col(clipped), SHAPE), rtol=1e-6)


def test_eps_and_x0_predictions_invert_each_other(arrays):
    x0, noise, t = arrays
    d = diffusion.make_diffusion("linear", T)
    xt = diffusion.q_sample(d, x0, t, noise)
    np.testing.assert_allclose(diffusion.predict_x0_from_eps(d, xt, t, noise), x0, atol=2e-4)
    np.testing.assert_allclose(diffusion.predict_eps_from_x0(d, xt, t, x0), noise, atol=2e-4)


def test_respacing_keeps_alpha_bar_at_the_kept_steps():
    d = diffusion.make_diffusion("linear", 1000)
    kept = diffusion.space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    spaced = diffusion.respace(d, 250)
    np.testing.assert_array_equal(spaced.timestep_map, kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12)
    np.testing.assert_array_equal(diffusion.space_timesteps(10, 4), [0, 3, 6, 9])
    with pytest.raises(ValueError, match="cannot respace 100 steps to 101"):
        diffusion.respace(diffusion.make_diffusion("linear", 100), 101)
    with pytest.raises(ValueError, match=r"betas must be a 1-D array in \(0, 1\)"):
        diffusion.make_diffusion("linear", 20)  # the 1000/T rule reaches β = 1 here


def test_training_loss_is_eps_mse_plus_vb_with_the_mean_detached(arrays):
    x0, noise, t = arrays
    d = diffusion.make_diffusion("linear", T)
    output = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, SHAPE[:-1] + (4,)), jnp.float32)
    terms = diffusion.training_losses(d, lambda xt, tm: output, x0, t, noise, learn_sigma=True)
    np.testing.assert_allclose(terms["mse"], np.mean((noise - np.asarray(output[..., :2])) ** 2, axis=(1, 2, 3)),
                               rtol=1e-6)
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)
    assert np.all(np.isfinite(terms["vb"])) and np.all(np.asarray(terms["vb"]) > 0)

    vb_grad = jax.grad(lambda o: diffusion.training_losses(d, lambda xt, tm: o, x0, t, noise,
                                                           learn_sigma=True)["vb"].sum())(output)
    assert np.all(np.asarray(vb_grad[..., :2]) == 0)  # the bound does not train the mean (stop-gradient)
    assert np.any(np.asarray(vb_grad[..., 2:]) != 0)  # it trains the variance

    fixed = diffusion.training_losses(d, lambda xt, tm: output[..., :2], x0, t, noise, learn_sigma=False)
    np.testing.assert_allclose(fixed["loss"], fixed["mse"])
    with pytest.raises(ValueError, match="expected 4 .* learn_sigma=True"):
        diffusion.training_losses(d, lambda xt, tm: output[..., :2], x0, t, noise, learn_sigma=True)


def test_vb_is_the_kl_to_the_true_posterior_and_the_decoder_nll_at_t0(arrays):
    x0, noise, _ = arrays
    d = diffusion.make_diffusion("linear", T)
    t = np.array([0, 5, 9], np.int32)
    xt = diffusion.q_sample(d, x0, t, noise)
    # The true ε with the variance at β̃_t (v = -1): the KL terms vanish; at t = 0 the decoder NLL remains.
    true_eps = diffusion.predict_eps_from_x0(d, xt, t, x0)
    output = jnp.concatenate([true_eps, -jnp.ones_like(true_eps)], axis=-1)
    vb = np.asarray(diffusion.vb_terms(d, output, x0, xt, t, learn_sigma=True))
    np.testing.assert_allclose(vb[1:], 0, atol=1e-4)
    mean, _, log_variance = diffusion.q_posterior(d, x0, xt, t)
    nll = -np.mean(np.asarray(diffusion.discretized_gaussian_log_likelihood(
        jnp.asarray(x0), mean, 0.5 * log_variance))[0]) / math.log(2)
    assert vb[0] == pytest.approx(nll, rel=1e-5)


def oracle(d: diffusion.Diffusion, x0: jax.Array):
    """A denoiser that knows x_0: it returns the exact ε of x_t at the *original* step it is given."""
    return lambda xt, t_model: diffusion.predict_eps_from_x0(d, xt, t_model, x0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_with_an_oracle_denoiser_return_x0(sampler, arrays):
    """Holds for any respacing, so it also checks that the network sees the original steps (timestep_map)."""
    x0, noise, _ = arrays
    d = diffusion.make_diffusion("linear", T)
    spaced = diffusion.respace(d, 7)
    if sampler == "ddim":
        out = diffusion.ddim_sample(spaced, oracle(d, x0), jnp.asarray(noise), jax.random.key(0), eta=0.5)
    else:
        out = diffusion.ddpm_sample(spaced, oracle(d, x0), jnp.asarray(noise), jax.random.key(0), learn_sigma=False)
    np.testing.assert_allclose(out, x0, atol=1e-4)


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not(arrays):
    _, noise, _ = arrays
    d = diffusion.respace(diffusion.make_diffusion("linear", T), 5)
    model_fn = lambda xt, t: 0.3 * xt + 0.01 * t[:, None, None, None]
    a = diffusion.ddim_sample(d, model_fn, noise, jax.random.key(0))
    np.testing.assert_array_equal(a, diffusion.ddim_sample(d, model_fn, noise, jax.random.key(1)))
    np.testing.assert_array_equal(a, diffusion.ddim_sample(d, model_fn, noise))
    b = diffusion.ddim_sample(d, model_fn, noise, jax.random.key(0), eta=1.0)
    assert not np.allclose(b, diffusion.ddim_sample(d, model_fn, noise, jax.random.key(1), eta=1.0))
    with pytest.raises(ValueError, match="needs an rng"):
        diffusion.ddim_sample(d, model_fn, noise, eta=1.0)


def test_guidance_formula_and_reference_channel_quirk():
    rng = np.random.default_rng(2)
    cond, uncond = (jnp.asarray(rng.standard_normal((2, 3, 3, 8)), jnp.float32) for _ in range(2))
    out = diffusion.classifier_free_guidance(cond, uncond, 4.0, guided_channels=4)
    np.testing.assert_allclose(out[..., :4], uncond[..., :4] + 4.0 * (cond[..., :4] - uncond[..., :4]), rtol=1e-6)
    np.testing.assert_array_equal(out[..., 4:], cond[..., 4:])


@pytest.fixture(scope="module")
def dit_and_inputs():
    """A tiny DiT with random (not zero-initialised) weights, so its output depends on the label."""
    config = DiTConfig(input_size=4, patch_size=2, in_channels=2, num_classes=5, width=16, depth=1, num_heads=2)

    @jax.jit  # one compiled build rather than one eager initializer at a time
    def build():
        graphdef, state = nnx.split(DiT(config, rngs=nnx.Rngs(0)))
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(3), len(leaves))
        state = jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
        return nnx.merge(graphdef, state)

    noise = jax.random.normal(jax.random.key(4), (3, 4, 4, 2))
    return build(), noise, jnp.array([0, 3, 4])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_with_guidance_scale_one_equal_the_conditional_model(sampler, dit_and_inputs):
    model, noise, labels = dit_and_inputs
    d = diffusion.respace(diffusion.make_diffusion("linear", T), 3)
    guided = lambda x, t: model.forward_with_cfg(x, t, labels, 1.0)
    conditional = lambda x, t: model(x, t, labels)

    @jax.jit
    def both(noise):
        if sampler == "ddim":
            run = lambda fn: diffusion.ddim_sample(d, fn, noise)
        else:
            run = lambda fn: diffusion.ddpm_sample(d, fn, noise, jax.random.key(5), learn_sigma=True)
        return run(guided), run(conditional), run(lambda x, t: model.forward_with_cfg(x, t, labels, 3.0))

    a, b, c = both(noise)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a, c, atol=1e-3)  # guidance does something at other scales

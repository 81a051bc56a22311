"""Gaussian diffusion as pure functions: noise schedules, the forward process, the training loss and the DDPM and
DDIM samplers, in the parameterisation DiT uses (Peebles & Xie, 2023, arXiv 2212.09748, §3.1).

- Forward process and ε-prediction loss: Ho et al., 2020, "Denoising Diffusion Probabilistic Models" (DDPM),
  eqs. 4, 6, 7 and 14; linear betas 1e-4 -> 0.02 over T = 1000 steps.
- Cosine schedule ("squaredcos_cap_v2"), learned variances interpolated between β_t and β̃_t, the hybrid loss
  ε-MSE + VLB with a stop-gradient on the mean, and evenly respaced sampling: Nichol & Dhariwal, 2021, "Improved
  Denoising Diffusion Probabilistic Models", §3.1 (eq. 15, 16), §3.2 (eq. 17) and §4.
- Deterministic and stochastic DDIM steps: Song et al., 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16.
- Classifier-free guidance: Ho & Salimans, 2022, eq. 6, as DiT applies it (§3.1 "Classifier-free guidance").

Images are [B, H, W, C] (channels last). A `Diffusion` holds its tables in float64 numpy, computed once, exactly as
the reference code does; functions gather them per example into float32. Timesteps `t` are int32 indices into the
(possibly respaced) tables; the network always sees `diffusion.timestep_map[t]`, the step of the original
T-step process, so a model trained on 1000 steps samples correctly with 50.

`model_fn(x_t, t_model) -> output [B, H, W, C or 2C]` is any function: the DiT itself, or a closure applying
classifier-free guidance, e.g. `lambda x, t: dit.forward_with_cfg(x, t, labels, 4.0)`.
"""

import dataclasses
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "squaredcos_cap_v2")
FIXED_VARIANCES = ("large", "small")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


# ---- Schedules ----


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
                        ) -> np.ndarray:
    """Betas whose cumulative product of (1 - β) follows `alpha_bar` on [0, 1]: β_t = 1 - ᾱ(t+1/T) / ᾱ(t/T).

    Capped at `max_beta` because ᾱ reaches 0 at the end and β = 1 would make the last step singular (Nichol &
    Dhariwal, 2021, §3.2).
    """
    steps = np.arange(num_timesteps, dtype=np.float64)
    ratios = np.array([alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps) for i in steps])
    return np.minimum(1 - ratios, max_beta)


def beta_schedule(name: Literal["linear", "squaredcos_cap_v2"], num_timesteps: int) -> np.ndarray:
    """float64 betas [num_timesteps].

    linear: Ho et al.'s 1e-4 -> 0.02 for T = 1000, both ends scaled by 1000 / T so that shorter processes destroy
        the signal as completely (the "1000/T" rule of the improved-DDPM code that DiT uses).
    squaredcos_cap_v2: ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2) (Nichol & Dhariwal, 2021, eq. 17, offset 0.008).
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r}; allowed: {SCHEDULES}")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so it can be a static jit argument
class Diffusion:
    """A discrete Gaussian diffusion: betas [T] and every table derived from them (float64 numpy).

    timestep_map [T]: the original step each index stands for (the identity unless built by `respace`).
    """

    betas: np.ndarray
    timestep_map: np.ndarray | None = None

    def __post_init__(self):
        betas = np.asarray(self.betas, np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas < 1).all()):
            # β = 1 would make ᾱ = 0 and x_0 unrecoverable from ε; the linear schedule reaches it at T <= 20.
            raise ValueError(f"Diffusion.betas must be a 1-D array in (0, 1), got shape {betas.shape} with range "
                             f"[{betas.min() if betas.size else None}, {betas.max() if betas.size else None}]")
        timestep_map = np.arange(len(betas)) if self.timestep_map is None else np.asarray(self.timestep_map)
        if timestep_map.shape != betas.shape:
            raise ValueError(f"Diffusion.timestep_map has shape {timestep_map.shape}, betas {betas.shape}")
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # β̃_t of DDPM eq. 7: the variance of q(x_{t-1} | x_t, x_0).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = dict(
            betas=betas,
            timestep_map=timestep_map.astype(np.int32),
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            # β̃_0 = 0: its log is replaced by log β̃_1, as in the reference code, so the table stays finite.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:]))
            if len(betas) > 1 else np.log(np.maximum(posterior_variance, 1e-20)),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        )
        for name, value in tables.items():
            object.__setattr__(self, name, value)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


def make_diffusion(schedule: Literal["linear", "squaredcos_cap_v2"] = "linear", num_timesteps: int = 1000
                   ) -> Diffusion:
    return Diffusion(beta_schedule(schedule, num_timesteps))


def space_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` evenly spaced steps of 0 .. num_timesteps - 1, both ends included, rounded to the nearest integer
    (Python's round, so that the steps are those of the reference `space_timesteps` with one section)."""
    if not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} steps to {steps!r}; need an int in [1, {num_timesteps}]")
    stride = 1 if steps == 1 else (num_timesteps - 1) / (steps - 1)
    return np.array(sorted({round(i * stride) for i in range(steps)}), np.int64)


def respace(diffusion: Diffusion, steps: int) -> Diffusion:
    """The process that visits only `space_timesteps(T, steps)` (Nichol & Dhariwal, 2021, §4).

    Its betas keep ᾱ at every kept step: β'_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}}. Its timestep_map sends index i back to
    the original step k_i, which is what the network was trained on.
    """
    kept = space_timesteps(diffusion.num_timesteps, steps)
    alphas_cumprod = diffusion.alphas_cumprod[kept]
    betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return Diffusion(betas, diffusion.timestep_map[kept])


# ---- Forward process and posterior ----


def _gather(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] as float32 [B, 1, ..., 1] (rank `ndim`), to broadcast against images."""
    values = jnp.asarray(table, jnp.float32)[jnp.asarray(t)]
    return values.reshape(values.shape + (1,) * (ndim - 1))


def q_mean_variance(diffusion: Diffusion, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I) (DDPM eq. 4)."""
    mean = _gather(diffusion.sqrt_alphas_cumprod, t, x0.ndim) * x0
    variance = _gather(1.0 - diffusion.alphas_cumprod, t, x0.ndim)
    log_variance = _gather(np.log(1.0 - diffusion.alphas_cumprod), t, x0.ndim)
    return mean, jnp.broadcast_to(variance, x0.shape), jnp.broadcast_to(log_variance, x0.shape)


def q_sample(diffusion: Diffusion, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε: a draw from q(x_t | x_0) given the noise ε (DDPM eq. 4)."""
    return (_gather(diffusion.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _gather(diffusion.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior(diffusion: Diffusion, x0: jax.Array, xt: jax.Array, t: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
    mean = (_gather(diffusion.posterior_mean_coef1, t, xt.ndim) * x0
            + _gather(diffusion.posterior_mean_coef2, t, xt.ndim) * xt)
    variance = _gather(diffusion.posterior_variance, t, xt.ndim)
    log_variance = _gather(diffusion.posterior_log_variance_clipped, t, xt.ndim)
    return mean, jnp.broadcast_to(variance, xt.shape), jnp.broadcast_to(log_variance, xt.shape)


def predict_x0_from_eps(diffusion: Diffusion, xt: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t, written as √(1/ᾱ) x_t - √(1/ᾱ - 1) ε."""
    return (_gather(diffusion.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
            - _gather(diffusion.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)


def predict_eps_from_x0(diffusion: Diffusion, xt: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    return ((_gather(diffusion.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
            / _gather(diffusion.sqrt_recipm1_alphas_cumprod, t, xt.ndim))


# ---- The reverse process p(x_{t-1} | x_t) ----


def split_output(output: jax.Array, channels: int, *, learn_sigma: bool) -> tuple[jax.Array, jax.Array | None]:
    """Model output [..., C or 2C] -> (ε [..., C], variance values [..., C] in [-1, 1] or None)."""
    expected = 2 * channels if learn_sigma else channels
    if output.shape[-1] != expected:
        raise ValueError(f"model output has {output.shape[-1]} channels; expected {expected} for {channels} image "
                         f"channels with learn_sigma={learn_sigma}")
    if learn_sigma:
        return output[..., :channels], output[..., channels:]
    return output, None


def p_mean_variance(diffusion: Diffusion, output: jax.Array, xt: jax.Array, t: jax.Array, *, learn_sigma: bool,
                    clip_denoised: bool = True, fixed_variance: Literal["large", "small"] = "large"
                    ) -> dict[str, jax.Array]:
    """The model's p(x_{t-1} | x_t) from its output at (x_t, t): {"mean", "variance", "log_variance", "pred_x0"}.

    learn_sigma: the second half of the channels, v in [-1, 1], interpolates log-variances between β̃_t and β_t
        (Nichol & Dhariwal, 2021, eq. 15, with frac = (v + 1) / 2). Otherwise the variance is fixed: "large" is β_t
        (with β̃_1 at t = 0, as DiT's non-learned default), "small" is β̃_t (DDPM §3.2 discusses both).
    clip_denoised: clip the predicted x_0 to [-1, 1], the data range, before forming the posterior mean.
    """
    if fixed_variance not in FIXED_VARIANCES:
        raise ValueError(f"fixed_variance={fixed_variance!r}; allowed: {FIXED_VARIANCES}")
    eps, variance_values = split_output(output, xt.shape[-1], learn_sigma=learn_sigma)
    if learn_sigma:
        min_log = _gather(diffusion.posterior_log_variance_clipped, t, xt.ndim)
        max_log = _gather(np.log(diffusion.betas), t, xt.ndim)
        fraction = (variance_values + 1) / 2
        log_variance = fraction * max_log + (1 - fraction) * min_log
    else:
        if fixed_variance == "large":
            table = np.log(np.append(diffusion.posterior_variance[1], diffusion.betas[1:]))
        else:
            table = diffusion.posterior_log_variance_clipped
        log_variance = jnp.broadcast_to(_gather(table, t, xt.ndim), xt.shape)
    pred_x0 = predict_x0_from_eps(diffusion, xt, t, eps)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1, 1)
    mean, _, _ = q_posterior(diffusion, pred_x0, xt, t)
    return {"mean": mean, "variance": jnp.exp(log_variance), "log_variance": log_variance, "pred_x0": pred_x0}


# ---- Losses ----


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Φ(x) by the tanh approximation of the reference code (the same curve as GELU-tanh's gate)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array, *,
                                        bin_half_width: float = 1 / 255) -> jax.Array:
    """log P(x) in nats of the decoder L_0 (DDPM §3.3): the Gaussian's mass over x's quantisation bin.

    bin_half_width: half the spacing of the data's levels in [-1, 1]: 1/255 for 8-bit images (the reference's
    constant), 1/16 for the 17 grey levels of the 8x8 digits. The outermost bins extend to ±infinity.
    """
    centered = x - means
    inverse_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inverse_std * (centered + bin_half_width))
    cdf_min = approx_standard_normal_cdf(inverse_std * (centered - bin_half_width))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    # The data's extreme levels are exactly ±1; ±0.999 finds them whatever the bin width (reference constants).
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_terms(diffusion: Diffusion, output: jax.Array, x0: jax.Array, xt: jax.Array, t: jax.Array, *,
             learn_sigma: bool, bin_half_width: float = 1 / 255) -> jax.Array:
    """[B] bits per dimension: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL at t = 0
    (the terms L_{t-1} and L_0 of DDPM eq. 5). x_0 predictions are not clipped here, as in the reference."""
    true_mean, _, true_log_variance = q_posterior(diffusion, x0, xt, t)
    model = p_mean_variance(diffusion, output, xt, t, learn_sigma=learn_sigma, clip_denoised=False)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, model["mean"], model["log_variance"])) / math.log(2.0)
    decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(
        x0, model["mean"], 0.5 * model["log_variance"], bin_half_width=bin_half_width)) / math.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl)


def training_losses(diffusion: Diffusion, model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array, *,
                    learn_sigma: bool, bin_half_width: float = 1 / 255) -> dict[str, jax.Array]:
    """Per-example losses [B] at steps t with noise ε: {"mse", "vb", "loss"}.

    mse: |ε - ε_θ(x_t, t)|² averaged over pixels (DDPM eq. 14, "L_simple").
    vb: with learn_sigma, the variational bound of the learned variance with the mean's ε under a stop-gradient,
        so the bound trains only the variance and L_simple alone trains the mean (Nichol & Dhariwal, 2021, §3.1,
        L_hybrid; DiT §3.1 trains this, without the λ = 0.001 weight since its losses are in bits). Else 0.
    loss: mse + vb.
    """
    xt = q_sample(diffusion, x0, t, noise)
    output = model_fn(xt, jnp.asarray(diffusion.timestep_map)[t])
    eps, variance_values = split_output(output, x0.shape[-1], learn_sigma=learn_sigma)
    mse = _mean_flat((noise - eps) ** 2)
    if learn_sigma:
        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), variance_values], axis=-1)
        vb = vb_terms(diffusion, frozen, x0, xt, t, learn_sigma=True, bin_half_width=bin_half_width)
    else:
        vb = jnp.zeros_like(mse)
    return {"mse": mse, "vb": vb, "loss": mse + vb}


# ---- Guidance and sampling ----


def classifier_free_guidance(conditional: jax.Array, unconditional: jax.Array, scale, *, guided_channels: int
                             ) -> jax.Array:
    """ε_u + s (ε_c - ε_u) on the first `guided_channels` channels; the rest (learned variances) conditional.

    Ho & Salimans, 2022, eq. 6 with w = s - 1. Scale 1 is the conditional model, 0 the unconditional one.
    """
    guided = unconditional[..., :guided_channels] + scale * (
        conditional[..., :guided_channels] - unconditional[..., :guided_channels])
    return jnp.concatenate([guided, conditional[..., guided_channels:]], axis=-1)


def _reverse_indices(diffusion: Diffusion) -> jax.Array:
    return jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)


def ddpm_sample(diffusion: Diffusion, model_fn: ModelFn, noise: jax.Array, rng: jax.Array, *, learn_sigma: bool,
                clip_denoised: bool = True, fixed_variance: Literal["large", "small"] = "large") -> jax.Array:
    """Ancestral sampling from x_T = noise through every step of `diffusion` (respace it to take fewer):
    x_{t-1} = μ_θ(x_t, t) + σ_t z, with no noise added at the last step (DDPM Algorithm 2). Returns x_0."""

    def step(x, index):
        t = jnp.full((x.shape[0],), index, jnp.int32)
        output = model_fn(x, jnp.asarray(diffusion.timestep_map)[t])
        out = p_mean_variance(diffusion, output, x, t, learn_sigma=learn_sigma, clip_denoised=clip_denoised,
                              fixed_variance=fixed_variance)
        z = jax.random.normal(jax.random.fold_in(rng, index), x.shape, x.dtype)
        x = out["mean"] + (index > 0) * jnp.exp(0.5 * out["log_variance"]) * z
        return x, None

    x, _ = jax.lax.scan(step, noise, _reverse_indices(diffusion))
    return x


def ddim_sample(diffusion: Diffusion, model_fn: ModelFn, noise: jax.Array, rng: jax.Array | None = None, *,
                eta: float = 0.0, clip_denoised: bool = True) -> jax.Array:
    """DDIM from x_T = noise through every step of `diffusion` (Song et al., 2021, eq. 12):
    x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z, σ_t = η √((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t-1}).

    eta = 0 is deterministic (no rng needed); eta = 1 matches DDPM's posterior variance (eq. 16). ε̂ is re-derived
    from the (clipped) x̂_0, as in the reference, so clipping stays consistent. Learned variances are ignored.
    """
    if eta != 0 and rng is None:
        raise ValueError("ddim_sample: eta > 0 draws noise, so it needs an rng")

    def step(x, index):
        t = jnp.full((x.shape[0],), index, jnp.int32)
        output = model_fn(x, jnp.asarray(diffusion.timestep_map)[t])
        eps = output[..., : x.shape[-1]]
        pred_x0 = predict_x0_from_eps(diffusion, x, t, eps)
        if clip_denoised:
            pred_x0 = jnp.clip(pred_x0, -1, 1)
        eps = predict_eps_from_x0(diffusion, x, t, pred_x0)
        alpha_bar = _gather(diffusion.alphas_cumprod, t, x.ndim)
        alpha_bar_prev = _gather(diffusion.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
        x = pred_x0 * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta != 0:
            x = x + (index > 0) * sigma * jax.random.normal(jax.random.fold_in(rng, index), x.shape, x.dtype)
        return x, None

    x, _ = jax.lax.scan(step, noise, _reverse_indices(diffusion))
    return x

"""Conditioning layers of DiT (Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers", arXiv
2212.09748): adaptive layer-norm modulation (§3.2, "adaLN-Zero"), the sinusoidal timestep embedder and the class
label embedder with a null class for classifier-free guidance (Ho & Salimans, 2022).

Axis letters as in ARCHITECTURE §3 (B batch, T tokens, D width); `C` below counts the modulation chunks
(shift, scale, gate, ...), so a PyTorch `Linear(D, C * D)` weight [C * D, D] maps onto `modulation_dcd` by a
transpose and a reshape of its output axis.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x [B, T, D] scaled by (1 + scale [B, D]) and shifted by shift [B, D], one pair per example.

    `1 + scale` rather than `scale`: a zero-initialised modulation then leaves the normalised input unchanged.
    """
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLNModulation(nnx.Module):
    """c [B, D] -> `num_chunks` vectors [B, D]: SiLU, then one linear map to num_chunks * D.

    zero_init: start with every chunk 0 (DiT §3.2 "adaLN-Zero"): each gate is 0, so a residual block is the identity
    at initialisation, which the paper found to train best of its conditioning variants (Fig. 5).
    """

    def __init__(self, width: int, num_chunks: int, *, zero_init: bool = True, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.num_chunks = num_chunks
        if zero_init:
            kernel = jnp.zeros((width, num_chunks, width), param_dtype)
        else:  # Xavier over the flat [D, C * D] matrix, the initialisation of a plain nn.Linear in DiT
            kernel = nnx.initializers.xavier_uniform()(rngs.params(), (width, num_chunks * width), param_dtype)
            kernel = kernel.reshape(width, num_chunks, width)
        self.modulation_dcd = nnx.Param(kernel)
        self.modulation_bias_cd = nnx.Param(jnp.zeros((num_chunks, width), param_dtype))

    def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
        chunks = jnp.einsum("bd,dce->bce", jax.nn.silu(c), self.modulation_dcd[...]) + self.modulation_bias_cd[...]
        return tuple(chunks[:, i] for i in range(self.num_chunks))


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0) -> jax.Array:
    """t [B] (integer or fractional diffusion steps) -> [B, dim] sinusoids, cosines first then sines.

    Frequencies run geometrically from 1 down to 1/max_period, as in the Transformer's positions (Vaswani et al.,
    2017) and in DiT's `TimestepEmbedder` (whose [cos, sin] order we keep so published weights line up). An odd
    `dim` gets one zero column at the end.
    """
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(t, jnp.float32)[:, None] * frequencies[None, :]
    embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


class TimestepEmbedder(nnx.Module):
    """t [B] -> [B, D]: a fixed `frequency_dim`-d sinusoid, then Linear -> SiLU -> Linear (DiT §3.2).

    Both linear kernels start from N(0, 0.02^2), as in DiT's initialisation, biases at 0.
    """

    def __init__(self, width: int, *, frequency_dim: int = 256, max_period: float = 10_000.0, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        init = nnx.initializers.normal(0.02)
        self.fc1_fd = nnx.Param(init(rngs.params(), (frequency_dim, width), param_dtype))
        self.fc1_bias_d = nnx.Param(jnp.zeros((width,), param_dtype))
        self.fc2_dd = nnx.Param(init(rngs.params(), (width, width), param_dtype))
        self.fc2_bias_d = nnx.Param(jnp.zeros((width,), param_dtype))

    def __call__(self, t: jax.Array) -> jax.Array:
        frequencies = timestep_embedding(t, self.frequency_dim, self.max_period).astype(self.fc1_fd.dtype)
        hidden = jax.nn.silu(frequencies @ self.fc1_fd[...] + self.fc1_bias_d[...])
        return hidden @ self.fc2_dd[...] + self.fc2_bias_d[...]


class LabelEmbedder(nnx.Module):
    """labels [B] -> [B, D] from a table of num_classes + 1 rows (a vocabulary of labels, hence `v`); row `num_classes` is
    the null class.

    The null class is what classifier-free guidance (Ho & Salimans, 2022) evaluates the unconditional model with;
    training replaces each label by it with probability `dropout_prob` (DiT uses 0.1), so one network learns both.
    (DiT omits the null row when dropout_prob is 0; we always keep it, so guidance is always defined: one extra row.)
    Rows start from N(0, 0.02^2) as in DiT.
    """

    def __init__(self, num_classes: int, width: int, *, dropout_prob: float, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_vd = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (num_classes + 1, width),
                                                                    param_dtype))

    def drop_labels(self, labels: jax.Array, *, rng: jax.Array | None = None,
                    force_drop_ids: jax.Array | None = None) -> jax.Array:
        """Labels with some replaced by the null class: those where force_drop_ids [B] is nonzero if it is given,
        otherwise a Bernoulli(dropout_prob) draw from `rng`."""
        if force_drop_ids is not None:
            drop = jnp.asarray(force_drop_ids) != 0
        elif rng is not None and self.dropout_prob > 0:
            drop = jax.random.bernoulli(rng, self.dropout_prob, labels.shape)
        else:
            return labels
        return jnp.where(drop, self.num_classes, labels)

    def __call__(self, labels: jax.Array, *, rng: jax.Array | None = None,
                 force_drop_ids: jax.Array | None = None) -> jax.Array:
        labels = self.drop_labels(jnp.asarray(labels, jnp.int32), rng=rng, force_drop_ids=force_drop_ids)
        return jnp.take(self.embedding_vd[...], labels, axis=0)

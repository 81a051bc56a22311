"""A small digits classifier trained inside the project in seconds, to measure generated digits (spec §4(d)).

Two numbers come from it, as FID and classification accuracy come from Inception for ImageNet samples:
- the share of class-conditional samples that it assigns to their conditioning label;
- the Fréchet distance (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", eq. 6) between Gaussians fitted to its penultimate features of two image sets.

The network is an MLP 64 -> 256 -> 64 -> 10 (GELU) trained with AdamW on the training split, with the same one-pixel
random shifts as the ViT baseline, so its features do not hinge on exact pixel positions. Training is one jitted
`lax.scan` from a fixed seed: deterministic, and cached per process (`train_classifier` is memoised).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.data.digits import NUM_CLASSES, split

HIDDEN = (256, 64)  # the second is the feature width of the Fréchet distance


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsClassifier:
    """Trained weights (numpy) and the accuracy they reach on the real test split."""

    params: dict[str, np.ndarray]
    test_accuracy: float

    def features(self, images: np.ndarray) -> np.ndarray:
        """images [n, 8, 8, 1] in [0, 1] -> penultimate features [n, 64] (float64)."""
        return np.asarray(_features(self.params, jnp.asarray(images, jnp.float32)), np.float64)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(jnp.argmax(_logits(self.params, jnp.asarray(images, jnp.float32)), axis=-1))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))


def _features(params, images: jax.Array) -> jax.Array:
    x = images.reshape(images.shape[0], -1)
    x = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return jax.nn.gelu(x @ params["w2"] + params["b2"])


def _logits(params, images: jax.Array) -> jax.Array:
    return _features(params, images) @ params["w3"] + params["b3"]


def _shift(images: jax.Array, rng: jax.Array) -> jax.Array:
    """Rolls each image by -1, 0 or +1 pixels along each axis (the digits' borders are blank)."""
    shifts = jax.random.randint(rng, (images.shape[0], 2), -1, 2)
    return jax.vmap(lambda image, s: jnp.roll(image, (s[0], s[1]), axis=(0, 1)))(images, shifts)


@functools.partial(jax.jit, static_argnames=("steps", "batch_size"))
def _fit(images: jax.Array, labels: jax.Array, rng: jax.Array, *, steps: int, batch_size: int):
    sizes = (images[0].size, *HIDDEN, NUM_CLASSES)
    keys = jax.random.split(rng, len(sizes))
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        params[f"w{i}"] = jax.random.normal(keys[i - 1], (fan_in, fan_out)) * fan_in**-0.5
        params[f"b{i}"] = jnp.zeros((fan_out,))
    schedule = optax.cosine_decay_schedule(3e-3, steps, alpha=0.01)
    tx = optax.adamw(schedule, weight_decay=1e-3)

    def step(carry, index):
        params, opt_state = carry
        draw = jax.random.fold_in(keys[-1], index)
        batch = jax.random.choice(jax.random.fold_in(draw, 0), labels.shape[0], (batch_size,), replace=False)
        x = _shift(images[batch], jax.random.fold_in(draw, 1))

        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), labels[batch]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    return params, losses


@functools.cache
def train_classifier(test_fraction: float = 0.25, split_seed: int = 0, seed: int = 0, steps: int = 1500,
                     batch_size: int = 128) -> DigitsClassifier:
    """Trains (once per process and arguments) on the training split of `train.data.digits.split`."""
    data = split(test_fraction, split_seed)
    train_x, train_y = data["train"]
    params, _ = _fit(jnp.asarray(train_x), jnp.asarray(train_y), jax.random.key(seed), steps=steps,
                     batch_size=batch_size)
    params = {name: np.asarray(value) for name, value in params.items()}
    classifier = DigitsClassifier(params=params, test_accuracy=0.0)
    test_x, test_y = data["test"]
    return dataclasses.replace(classifier, test_accuracy=classifier.accuracy(test_x, test_y))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """|μ_a - μ_b|² + Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½) between Gaussians fitted to two feature sets [n, F].

    Tr((Σ_a Σ_b)^½) is computed as Σ √λ_i of the symmetric matrix Σ_a^½ Σ_b Σ_a^½ (same eigenvalues as Σ_a Σ_b),
    which is stable where a general matrix square root of the product can turn complex. Small sets bias the
    distance upwards, so compare numbers computed at the same set sizes.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two [n >= 2, F] feature sets, got {a.shape} and {b.shape}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sum(np.sqrt(np.clip(cross, 0, None)))
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)

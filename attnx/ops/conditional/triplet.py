"""Per-attribute triplet loss of the Conditional Cross-Attention Network (Song, Hwang, Yoon, Choi, Gu, 2023,
"Conditional Cross Attention Network for Multi-Space Embedding without Entanglement in Only a SINGLE Network",
ICCV 2023, arXiv 2307.13254, §3; no official code).

Under condition c, two images are similar when their attribute c has the same value. For an anchor a, a positive p
(same value of attribute c, another image) and a negative n (another value), all embedded under condition c:

    L_c(a, p, n) = max(0, margin - sim(e_c(a), e_c(p)) + sim(e_c(a), e_c(n)))

The paper's §3 could not be read here (only its abstract and introduction): the hinge on cosine similarity with
margin 0.2 is the triplet ranking loss of ASEN (Ma et al., AAAI 2020, arXiv 2002.02814), the prior work on the same
benchmarks (FashionAI, DARN, DeepFashion) that the paper compares with; `similarity="euclidean"` uses the negative
squared distance instead. Triplets are drawn inside the batch (`sample_triplets`), one per anchor and condition.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Similarity = Literal["cosine", "euclidean"]
SIMILARITIES = ("cosine", "euclidean")


def similarity(a, b, kind: Similarity = "cosine"):
    """sim(a, b) over the last axis: cosine similarity, or minus the squared Euclidean distance."""
    if kind not in SIMILARITIES:
        raise ValueError(f"triplet.similarity: expected one of {list(SIMILARITIES)}, got {kind!r}")
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if kind == "euclidean":
        return -jnp.sum((a - b) ** 2, axis=-1)
    # The epsilon keeps the gradient finite at a zero embedding.
    norm = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
    return jnp.sum(norm(a) * norm(b), axis=-1)


def triplet_loss(anchor, positive, negative, *, margin: float = 0.2, kind: Similarity = "cosine"):
    """Hinge per triplet, [*]: anchor, positive, negative [*, D] -> max(0, margin - sim(a, p) + sim(a, n))."""
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
        raise ValueError(f"triplet_loss.margin: expected a number >= 0, got {margin!r}")
    return jax.nn.relu(margin - similarity(anchor, positive, kind) + similarity(anchor, negative, kind))


def sample_triplets(attributes, rng):
    """One (positive, negative) per anchor and condition, drawn uniformly inside the batch.

    attributes [B, C] ints (the value of attribute c of image b). Returns positive [B, C], negative [B, C] (batch
    indices) and valid [B, C]: False where the batch holds no other image with the anchor's value or none with
    another value (those triplets must be left out of the loss).
    """
    attributes = jnp.asarray(attributes)
    if attributes.ndim != 2 or not jnp.issubdtype(attributes.dtype, jnp.integer):
        raise ValueError(f"sample_triplets.attributes: expected integer attribute values [B, C], got "
                         f"{attributes.dtype} {attributes.shape}")
    B = attributes.shape[0]
    same = attributes[:, None, :] == attributes[None, :, :]  # [anchor, candidate, C]
    other = ~jnp.eye(B, dtype=bool)[:, :, None]
    draws = jax.random.uniform(rng, (2, B, B, attributes.shape[1]))
    pick = lambda allowed, draw: (jnp.argmax(jnp.where(allowed, draw, -1.0), axis=1), jnp.any(allowed, axis=1))
    positive, has_positive = pick(same & other, draws[0])
    negative, has_negative = pick(~same, draws[1])
    return positive, negative, has_positive & has_negative


def conditional_triplet_loss(embeddings, attributes, rng, *, margin: float = 0.2, kind: Similarity = "cosine"):
    """(loss, per-condition loss [C], per-condition triplet accuracy [C]) of in-batch triplets.

    embeddings [B, C, D]: image b embedded under condition c; attributes [B, C]. The loss is the mean hinge over the
    valid triplets of every condition, each condition weighted equally; accuracy is the share of valid triplets with
    sim(a, p) > sim(a, n).
    """
    if embeddings.ndim != 3 or embeddings.shape[:2] != jnp.shape(attributes):
        raise ValueError(f"conditional_triplet_loss.embeddings: expected [B, C, D] with [B, C] = "
                         f"{jnp.shape(attributes)} (the attributes), got {embeddings.shape}")
    positive, negative, valid = sample_triplets(attributes, rng)
    gather = lambda index: jnp.take_along_axis(embeddings, index[..., None], axis=0)  # [B, C, D]
    anchor, pos, neg = embeddings, gather(positive), gather(negative)
    hinge = triplet_loss(anchor, pos, neg, margin=margin, kind=kind)  # [B, C]
    correct = similarity(anchor, pos, kind) > similarity(anchor, neg, kind)
    count = jnp.maximum(jnp.sum(valid, axis=0), 1)
    per_condition = jnp.sum(jnp.where(valid, hinge, 0.0), axis=0) / count
    accuracy = jnp.sum(valid & correct, axis=0) / count
    return jnp.mean(per_condition), per_condition, accuracy

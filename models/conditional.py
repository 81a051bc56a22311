"""Conditional Cross-Attention Network around the ViT (Song, Hwang, Yoon, Choi, Gu, 2023, "Conditional Cross
Attention Network for Multi-Space Embedding without Entanglement in Only a SINGLE Network", ICCV 2023,
arXiv 2307.13254, §3; math in attnx.ops.conditional). A thin wrapper, not a fork: the backbone is an unchanged
`models.vit.ViT`, whose classification head is not used.

- Each attribute c ("condition") has a learned condition token, one row of `condition_table_cd` (one-hot -> linear).
- The condition token is the query of a multi-head cross attention whose keys and values are the backbone's final
  patch tokens (after its final norm; positions are already in them, the class token is left out):
  e_c = W_O concat_h softmax((t_c W_Q^h)(X W_K^h)^T / sqrt(d)) (X W_V^h) (`conditional_cross_attention`).
  One image gives one embedding per condition, [B, C, D]: "multi-space" embedding with a single backbone.
- Training: the per-attribute triplet loss (attnx.ops.conditional.triplet) on in-batch triplets, every condition
  weighted equally. Evaluation: per-condition triplet accuracy on the test split (fixed triplets).

The paper's §3 could not be read (only its abstract and introduction were retrievable, twice); the spec's reading is
followed (vision_mechanisms.md §9, unverified): the exact layer position, whether the cross attention sits inside a
full block (norm, MLP, residual) and the loss's distance are assumptions. Here the cross attention reads the output
of the backbone's last block and its output is the embedding, with no MLP after it.

Digits setup (`attributes="digits"`, the brief's choice): attribute 0 is the digit's class, 1 its parity, 2 whether
it is >= 5; two digits are similar under condition c when their attribute c matches.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnx.ops.conditional.conditional import conditional_cross_attention
from attnx.ops.conditional.triplet import SIMILARITIES, conditional_triplet_loss
from models.layers import PARAM_DTYPES
from models.vit import ViT, ViTConfig

ATTRIBUTE_SETS = {"digits": ("class", "parity", "at_least_5")}


def digit_attributes(labels: jax.Array) -> jax.Array:
    """labels [B] (digits 0-9) -> attributes [B, 3]: (class, parity, digit >= 5)."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    return jnp.stack([labels, labels % 2, (labels >= 5).astype(jnp.int32)], axis=-1)


class ConditionalViT(nnx.Module):
    """ViT backbone + condition tokens + one conditional cross attention: images -> embeddings [B, C, D].

    attributes: the named attribute set, which fixes the number of conditions and how a batch's labels map to
    attribute values. margin, similarity: the triplet loss's (attnx.ops.conditional.triplet).
    """

    def __init__(self, config: ViTConfig, *, attributes: Literal["digits"] = "digits", margin: float = 0.2,
                 similarity: Literal["cosine", "euclidean"] = "cosine", rngs: nnx.Rngs):
        if attributes not in ATTRIBUTE_SETS:
            raise ValueError(f"ConditionalViT.attributes={attributes!r}; allowed: {list(ATTRIBUTE_SETS)}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"ConditionalViT.similarity={similarity!r}; allowed: {list(SIMILARITIES)}")
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
            raise ValueError(f"ConditionalViT.margin must be a number >= 0, got {margin!r}")
        self.kind = "conditional_cross"
        self.attributes = attributes
        self.condition_names = ATTRIBUTE_SETS[attributes]
        self.margin = float(margin)
        self.similarity = similarity
        self.num_prefix = 1 if config.pooling == "cls" and not config.stages else 0
        dtype = PARAM_DTYPES[config.param_dtype]
        self.vit = ViT(config, rngs=rngs)
        width, heads = config.final_width, config.num_heads if not config.stages else config.stages[-1].num_heads
        if width % heads:
            raise ValueError(f"ConditionalViT: the final width {width} must divide into {heads} heads")
        head_dim = width // heads
        # Unit-variance condition tokens: the scale of the normalised image tokens, so the queries start non-trivial.
        self.condition_table_cd = nnx.Param(nnx.initializers.normal(1.0)(
            rngs.params(), (len(self.condition_names), width), dtype))
        in_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        self.query_dnh = nnx.Param(in_init(rngs.params(), (width, heads, head_dim), dtype))
        self.key_dnh = nnx.Param(in_init(rngs.params(), (width, heads, head_dim), dtype))
        self.value_dnh = nnx.Param(in_init(rngs.params(), (width, heads, head_dim), dtype))
        self.out_nhd = nnx.Param(out_init(rngs.params(), (heads, head_dim, width), dtype))

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        """The backbone's final tokens [B, P, D] (after its final norm), class token left out."""
        _, intermediates = self.vit(images, return_intermediates=True)
        return intermediates["encoded"][:, self.num_prefix:]

    def embed_tokens(self, tokens: jax.Array, condition_ids: jax.Array) -> jax.Array:
        """tokens [B, P, D], condition ids [B] or [B, C] -> embeddings [B, D] or [B, C, D]."""
        return conditional_cross_attention(
            tokens, condition_ids, condition_table=self.condition_table_cd[...], query_weight=self.query_dnh[...],
            key_weight=self.key_dnh[...], value_weight=self.value_dnh[...], out_weight=self.out_nhd[...])

    def __call__(self, images: jax.Array, condition_ids: jax.Array | None = None) -> jax.Array:
        """images [B, H, W, C] -> embeddings [B, C, D] under every condition (condition_ids None), or under the
        given ids [B] / [B, C]."""
        if condition_ids is None:
            condition_ids = jnp.broadcast_to(jnp.arange(len(self.condition_names)),
                                             (images.shape[0], len(self.condition_names)))
        return self.embed_tokens(self.patch_tokens(images), condition_ids).astype(jnp.float32)

    def attribute_values(self, labels: jax.Array) -> jax.Array:
        """[B, C] attribute values of a batch, from its labels."""
        return digit_attributes(labels)

    def training_loss(self, batch: dict[str, jax.Array], rng: jax.Array | None, *, label_smoothing: float = 0.0
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The task's loss hook (train.image_classification): triplet loss over in-batch triplets drawn with `rng`
        (label_smoothing does not apply to a triplet loss)."""
        del label_smoothing
        rng = jax.random.key(0) if rng is None else rng
        loss, per_condition, accuracy = conditional_triplet_loss(
            self(batch["image"]), self.attribute_values(batch["label"]), rng, margin=self.margin,
            kind=self.similarity)
        metrics = {}
        for c, name in enumerate(self.condition_names):
            metrics[f"triplet_loss_{name}"] = per_condition[c]
            metrics[f"triplet_accuracy_{name}"] = accuracy[c]
        return loss, metrics

    def evaluation_metrics(self, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """The task's evaluation hook: test triplet loss and per-condition triplet accuracy of `outputs` [n, C, D]
        (this model's embeddings of the whole test split), one fixed triplet per anchor and condition (seed 0)."""
        loss, accuracy = _test_triplets(jnp.asarray(outputs), self.attribute_values(jnp.asarray(labels)),
                                        margin=self.margin, kind=self.similarity)
        results = {"test_triplet_loss": float(loss)}
        results.update({f"test_triplet_accuracy_{name}": float(accuracy[c])
                        for c, name in enumerate(self.condition_names)})
        results["test_triplet_accuracy"] = float(np.mean(np.asarray(accuracy)))
        return results


@functools.partial(jax.jit, static_argnames=("margin", "kind"))
def _test_triplets(embeddings, attributes, *, margin, kind):
    loss, _, accuracy = conditional_triplet_loss(embeddings, attributes, jax.random.key(0), margin=margin, kind=kind)
    return loss, accuracy

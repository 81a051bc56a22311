"""DCAL around the ViT (Zhu et al., 2022, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
Object Re-Identification", arXiv 2205.02151, §3.2-3.4; math in attnx.ops.dcal). A thin wrapper, not a fork: the
self-attention (SA) branch is an unchanged `models.vit.ViT`.

- GLCA branch (M = 1 block, its own weights and classifier): the attention rollout of the SA blocks' maps ranks the
  tokens by the class token's row; the class token plus the top R = ceil(ratio * patches) patch tokens query all
  tokens of the GLCA block's own projections. The selected tokens then go through the block's MLP, a norm and the
  GLCA head, which reads the class token.
- PWCA (training only, weights shared with SA): images and distractor images run through the SA blocks together,
  each image's queries attending over its own and its partner's keys/values (one joint softmax).
- Inference adds the SA and GLCA class probabilities (`__call__` returns the log of their mean, so argmax is the
  paper's prediction).
- Training combines the branch losses with uncertainty weights (FairMOT's, which the paper follows):
  L = 0.5 sum_i (exp(-w_i) L_i + w_i), w learned.

Assumptions where the paper is silent (no official code): the GLCA block sits beside the last SA block (same input,
rollout over all L SA blocks, including the last); the class token is always among GLCA's queries (the paper reads
"the final class token" of the GLCA branch for Re-ID), patches are ranked by the rollout without it; the distractor
of PWCA runs through the same PWCA blocks with the target image as its own distractor (a symmetric pair).
Requires a plain (non-hierarchical) ViT with a class token and 'softmax' attention: the rollout reads softmax maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnx.ops.dcal.dcal import attention_rollout, glca, num_selected, pwca_attention, rollout_scores
from models.layers import PARAM_DTYPES
from models.layers.attention import Attention
from models.layers.mlp import GeluMlp
from models.layers.norm import LayerNorm
from models.vit import ViT, ViTConfig


class DCAL(nnx.Module):
    """SA ViT + GLCA block and head + PWCA pair forward + uncertainty-weighted loss (module docstring).

    ratio: the share of patch tokens GLCA selects (10% for FGVC, 30% for Re-ID in the paper).
    """

    def __init__(self, config: ViTConfig, *, ratio: float = 0.1, rngs: nnx.Rngs):
        if config.pooling != "cls" or config.stages or config.attention != "softmax" or config.layer_attention \
                or config.attention_kwargs:
            raise ValueError("DCAL needs a plain ViT with pooling='cls' and plain attention='softmax' (no stages, "
                             "layer_attention or attention_kwargs): the rollout reads the class token's row of "
                             f"softmax maps; got pooling={config.pooling!r}, attention={config.attention!r}, "
                             f"{len(config.stages)} extra stages")
        num_selected(config.num_patches, ratio)  # validates ratio
        self.ratio = ratio
        self.num_patches = config.num_patches
        dtype = PARAM_DTYPES[config.param_dtype]
        self.vit = ViT(config, rngs=rngs)
        width, heads = config.width, config.num_heads
        self.glca_norm = LayerNorm(width, eps=config.norm_eps, param_dtype=dtype)
        # kind 'glca' names the block's mechanism (the config test reads it); the branch calls its projections and
        # attnx's glca itself, with the rollout scores (called plainly, the layer is GLCA at ratio 1: all rows).
        self.glca_attention = Attention(width, heads, heads, width // heads, kind="glca", causal=False,
                                        use_rope=False, use_bias=True, qk_norm=config.qk_norm, rngs=rngs,
                                        param_dtype=dtype)
        self.glca_mlp_norm = LayerNorm(width, eps=config.norm_eps, param_dtype=dtype)
        self.glca_mlp = GeluMlp(width, config.mlp_width, rngs=rngs, param_dtype=dtype)
        self.glca_final_norm = LayerNorm(width, eps=config.norm_eps, param_dtype=dtype)
        self.glca_head_dc = nnx.Param(jnp.zeros((width, config.num_classes), dtype))
        self.glca_head_bias_c = nnx.Param(jnp.zeros((config.num_classes,), dtype))
        self.loss_weights_3 = nnx.Param(jnp.zeros((3,), jnp.float32))  # w of SA, GLCA, PWCA

    def branches(self, images: jax.Array) -> dict[str, jax.Array]:
        """{"sa": logits, "glca": logits, "selected": token indices [B, 1 + R] (class token first),
        "rollout": [B, T, T]}."""
        sa_logits, inter = self.vit(images, return_intermediates=True)
        names = [name for name, _ in self.vit.named_blocks()]
        maps = [block.attention.attention_probabilities(inter[f"{name}/attention_input"])
                for name, block in self.vit.named_blocks()]
        rollout = attention_rollout(maps)
        last_input = inter[f"{names[-2]}/output"] if len(names) > 1 else inter["embedded"]
        normed = self.glca_norm(last_input)
        query, key, value = self.glca_attention.project_heads(normed)
        # The class token scores +inf, so it is always selected, first; R patches follow by rollout score.
        scores = rollout_scores(rollout).at[:, 0].set(jnp.inf)
        rows, selected = glca(query, key, value, scores, count=1 + num_selected(self.num_patches, self.ratio))
        x = jnp.take_along_axis(last_input, selected[..., None], axis=1) + self.glca_attention.output(rows)
        x = x + self.glca_mlp(self.glca_mlp_norm(x))
        cls = self.glca_final_norm(x)[:, 0]
        glca_logits = (cls @ self.glca_head_dc[...] + self.glca_head_bias_c[...]).astype(jnp.float32)
        return {"sa": sa_logits, "glca": glca_logits, "selected": selected, "rollout": rollout}

    def pwca_logits(self, images: jax.Array, distractors: jax.Array) -> jax.Array:
        """Logits [B, classes] of `images` through the SA blocks with PWCA attention, `distractors` [B, ...] as the
        partners (sample b with distractor b). Shares every weight with the SA branch."""
        batch = images.shape[0]
        x = self.vit.embed(jnp.concatenate([images, distractors], axis=0))
        for _, block in self.vit.named_blocks():
            layer = block.attention
            query, key, value = layer.project_heads(block.attention_norm(x))
            # In the stacked batch [images; distractors], sample b's partner sits `batch` rows away.
            x = x + layer.output(pwca_attention(query, key, value, pair_shift=batch))
            x = x + block.mlp(block.mlp_norm(x))
        cls = self.vit.final_norm(x[:batch])[:, 0]
        return (cls @ self.vit.head_dc[...] + self.vit.head_bias_c[...]).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Inference: log of the mean of the SA and GLCA class probabilities [B, classes]."""
        out = self.branches(images)
        return jnp.logaddexp(jax.nn.log_softmax(out["sa"]), jax.nn.log_softmax(out["glca"])) - jnp.log(2.0)

    def loss(self, images: jax.Array, labels: jax.Array, distractors: jax.Array, *,
             label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Uncertainty-weighted sum of the SA, GLCA and PWCA cross-entropies (PWCA has the SA branch's targets)."""
        return self._weighted_loss(self.branches(images), images, labels, distractors, label_smoothing)

    def _weighted_loss(self, out, images, labels, distractors, label_smoothing):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, out["sa"].shape[-1]), label_smoothing)
        logits = (out["sa"], out["glca"], self.pwca_logits(images, distractors))
        losses = jnp.stack([optax.softmax_cross_entropy(z, targets).mean() for z in logits])
        w = self.loss_weights_3[...]
        total = 0.5 * jnp.sum(jnp.exp(-w) * losses + w)
        return total, {"sa_loss": losses[0], "glca_loss": losses[1], "pwca_loss": losses[2]}

    def training_loss(self, batch: dict[str, jax.Array], rng: jax.Array | None, *, label_smoothing: float = 0.0
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The task's loss hook (train.image_classification): `loss` with distractor pairs drawn from the batch.

        The paper samples I_2 at random from the training set; here image b's distractor is image (b + s) mod B of
        the (shuffled) batch, with s drawn uniformly from 1..B-1 per step (`rng`), so no image is its own
        distractor (which would make PWCA plain self attention). Metrics: the branch losses, the uncertainty
        weights w, and the accuracy of the inference rule (SA + GLCA probabilities)."""
        images, labels = batch["image"], batch["label"].astype(jnp.int32)
        batch_size = images.shape[0]
        if batch_size < 2:
            raise ValueError(f"DCAL.training_loss: PWCA pairs images within the batch, so it needs at least 2 "
                             f"images, got batch size {batch_size}")
        rng = jax.random.key(0) if rng is None else rng
        shift = jax.random.randint(rng, (), 1, batch_size)
        distractors = jnp.roll(images, -shift, axis=0)  # row b holds image b + shift
        out = self.branches(images)
        total, metrics = self._weighted_loss(out, images, labels, distractors, label_smoothing)
        combined = jnp.logaddexp(jax.nn.log_softmax(out["sa"]), jax.nn.log_softmax(out["glca"]))
        metrics["accuracy"] = jnp.mean(jnp.argmax(combined, axis=-1) == labels)
        w = self.loss_weights_3[...]
        metrics.update({"weight_sa": w[0], "weight_glca": w[1], "weight_pwca": w[2]})
        return total, metrics

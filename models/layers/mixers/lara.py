"""The LARA weights and sampling of one attention layer (Zheng et al., 2022, "Linear Complexity Randomized
Self-attention Mechanism", arXiv 2204.04667, §4; CAB's `efficient_attention/modules/lara.py`; the pure function is
attnx.ops.efficient.lara)."""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.efficient.lara import PROPOSALS


class LaraSampleKey(nnx.Variable):
    """The layer's own PRNG key data (uint32), not a parameter: the optimiser never sees it."""


class LaraProposals(nnx.Module):
    """Owns what CAB's LinearRA owns beside the attention projections, and feeds its sampling key.

    proposal_gen: 'seg-means' (CAB's default: no weights) or 'adaptive-seg-means', which owns q_bar_proj and
    k_bar_proj, two Linear(H, H) maps with bias shared by all heads, applied to the query / key segment means (the
    code's `nn.Linear(dim_heads, dim_heads)`; torch's default init, weight and bias U(-1/sqrt(H), 1/sqrt(H))).
    Stored as [H_in, H_out] for x W + b.

    Sampling follows the code's train/eval switch through NNX's convention: the `deterministic` attribute, which
    `model.train()` / `model.eval()` set. Evaluation (deterministic, the default unless the layer's option
    `training=True`) uses w = mu and draws nothing. In training the module passes `rng` to the attention function:
    the key is its own key (drawn once from the layer's `rngs` at construction) folded with a 32-bit digest of the
    layer input x (the wrapping uint32 sum of its bits, exact and order-free). No mutable RNG counter is needed, so
    the draw is a pure function of (layer key, batch): reproducible, the same after a checkpoint restart, different
    for every new batch and for every layer, and correct under train/trainer.py, which closes over non-parameter
    state (a counter there would never advance). Identical inputs give identical noise (e.g. the same batch twice).
    Option `training` (also read by the attention function, which this module's output overrides) sets the mode a
    freshly built layer starts in; train/trainer.py switches modes itself (its train step runs `model.train()`,
    evaluation and the task's finish `model.eval()`), so under the trainer LARA samples in training and uses w = mu
    in evaluation, as the code does, whatever the option says.
    """

    def __init__(self, width: int, num_heads: int, *, head_dim: int, qk_head_dim: int | None = None,
                 proposal_gen: str = "seg-means", training: bool | None = None, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, **options):
        del width, num_heads, options  # the layer's shape and the attention function's own options
        if proposal_gen not in PROPOSALS:
            raise ValueError(f"lara.proposal_gen: expected one of {PROPOSALS}, got {proposal_gen!r}")
        if training is not None and not isinstance(training, bool):
            raise ValueError(f"lara.training: expected None, True or False, got {training!r}")
        H = qk_head_dim or head_dim
        self.proposal_gen = proposal_gen
        if proposal_gen == "adaptive-seg-means":
            bound = H ** -0.5
            uniform = lambda shape: jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound)
            self.q_bar_weight = nnx.Param(uniform((H, H)))
            self.q_bar_bias = nnx.Param(uniform((H,)))
            self.k_bar_weight = nnx.Param(uniform((H, H)))
            self.k_bar_bias = nnx.Param(uniform((H,)))
        self.sample_key = LaraSampleKey(jax.random.key_data(rngs.params()))
        self.deterministic = not training

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, object]:
        del query, key  # the proposals are formed from the (rotated) heads inside the function
        out: dict[str, object] = {"training": not self.deterministic, "rng": None}
        if self.proposal_gen == "adaptive-seg-means":
            out["segment_projections"] = (self.q_bar_weight[...], self.q_bar_bias[...], self.k_bar_weight[...],
                                          self.k_bar_bias[...])
        if not self.deterministic:
            out["rng"] = jax.random.fold_in(jax.random.wrap_key_data(self.sample_key[...]), input_digest(x))
        return out


def input_digest(x: jax.Array) -> jax.Array:
    """uint32 digest of x: the sum of its float32 bit patterns modulo 2^32 (integer addition, so exact and
    independent of the reduction order or sharding); no gradient flows through it."""
    bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(x).astype(jnp.float32), jnp.uint32)
    return jnp.sum(bits, dtype=jnp.uint32)

"""DependencyViT's gates of one reversed-attention layer (Ding et al., 2023, arXiv 2304.03282, §3; math in
attnx.ops.dependency.reversed): the head selector W_p [D, N] and the message controller W_1 [D, D/2], W_2 [D/2, 1],
all bias-free as in the timm WIP port (its FIXMEs leave the bias question open)."""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.dependency.reversed import TEMPERATURE, head_selector, message_controller


class DependencyGates(nnx.Module):
    """{"head_gates": p [B, T, N], "messages": m [B, T]} from the layer input x [B, T, D].

    attention_kwargs it reads: temperature (the head selector's, 0.1). Weights are truncated normals of std 0.02,
    the port's: its DependencyViT subclasses timm's VisionTransformer, whose init_weights gives every nn.Linear of
    the model, these included, trunc_normal(0.02).

    m is this layer's own message gate. The port multiplies m over the layers (the product reaches the final
    features too); a layer's router sees only its own input, so that cumulative product is formed by the model
    that carries it (models/dependency_vit.py), not here. In the plain ViT (configs/attention/reversed.gin) each
    layer's gate is its own.
    """

    def __init__(self, width: int, num_heads: int, *, temperature: float = TEMPERATURE, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, **options):
        del options  # the layer's shape and the attention function's options (block_size, scale)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
            raise ValueError(f"reversed.temperature: expected a number > 0, got {temperature!r}")
        if width < 2:
            raise ValueError(f"reversed: the message controller halves the width, which must be >= 2, got {width}")
        self.temperature = float(temperature)
        init = nnx.initializers.truncated_normal(0.02)  # timm's trunc_normal_(std=.02) (cut at +-2, not +-2 std)
        self.selector_dn = nnx.Param(init(rngs.params(), (width, num_heads), param_dtype))
        self.message_hidden_df = nnx.Param(init(rngs.params(), (width, width // 2), param_dtype))
        self.message_out_f1 = nnx.Param(init(rngs.params(), (width // 2, 1), param_dtype))

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        del query, key
        return {"head_gates": head_selector(x, self.selector_dn[...], temperature=self.temperature),
                "messages": message_controller(x, self.message_hidden_df[...], self.message_out_f1[...])}

"""The learned Gaussians of a GAAM attention layer (Ioannides et al., 2024, arXiv 2401.11143, §3; formula in
attnx.ops.gaussian): for every projection in `apply_to` and every head, G offsets delta (init 0) and scales c (init
exp(N(0, 1))), as the official code's GaussianAdaptiveAttention initialises mean_offsets and c; with num_layers > 1
one set per layer of the code's GaussianBlock ([num_layers, heads, G])."""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.gaussian.attention import check_layers, check_targets, param_shape


class GAAMGaussians(nnx.Module):
    """Returns the Gaussians of attnx's `gaam` attention function: {"delta", "c"} for the values ([K, G]),
    {"key_delta", "key_c"} ([K, G]) and {"query_delta", "query_c"} ([N, G]) for the projections in apply_to
    (a leading num_layers axis when num_layers > 1). Each is stored as the attribute <keyword>_<layout>, e.g.
    delta_kg, query_c_ng, key_delta_lkg."""

    def __init__(self, width: int, num_heads: int, *, num_kv_heads: int, num_gaussians: int = 4,
                 num_layers: int = 1, apply_to=("value",), rngs: nnx.Rngs, param_dtype=jnp.float32, **options):
        del width, options  # the layer's width and the attention function's own options
        check_layers(num_gaussians, num_layers)
        names = []  # (attention keyword, attribute name); kept as a tuple, static for NNX
        for target in check_targets(apply_to):
            heads = num_heads if target == "query" else num_kv_heads
            layout = ("l" if num_layers > 1 else "") + ("n" if target == "query" else "k") + "g"
            shape = param_shape(heads, num_gaussians, num_layers)
            prefix = "" if target == "value" else f"{target}_"
            for p, init in (("delta", jnp.zeros(shape)), ("c", jnp.exp(jax.random.normal(rngs.params(), shape)))):
                names.append((prefix + p, f"{prefix}{p}_{layout}"))
                setattr(self, names[-1][1], nnx.Param(init.astype(param_dtype)))
        self.names = tuple(names)

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        return {keyword: getattr(self, name)[...] for keyword, name in self.names}

"""NNX wrappers of mechanisms that own weights beside the attention projections (ARCHITECTURE §2), looked up by
the registry name of the layer's mechanism, and the collection of the auxiliary losses they sow."""

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers.mixers.abc import ABCMemory
from models.layers.mixers.crossformer import DynamicPositionBias
from models.layers.mixers.dependency import DependencyGates
from models.layers.mixers.longshort import LongShortProjection
from models.layers.mixers.gaam import GAAMGaussians
from models.layers.mixers.hilo import HiLo
from models.layers.mixers.inline import InLineResidual
from models.layers.mixers.lara import LaraProposals
from models.layers.mixers.moa_experts import MoAExpertsRouter
from models.layers.mixers.moh import MoHRouter
from models.layers.mixers.multimodal import RunTimeInputs, VARSinkDetector
from models.layers.mixers.relative_bias import HaloRelativeEmbedding, NeighborhoodBias
from models.layers.mixers.seer import SeerGate
from models.layers.mixers.transnext import AggregatedAttention

# Registry name -> NNX module that owns the mechanism's own weights (beside the layer's projections). The attention
# layer builds it as `module(width, num_heads, num_kv_heads=, head_dim=, qk_head_dim=, rngs=, param_dtype=,
# **attention_kwargs)` and calls it as `module(x, query, key)` with the layer input [B, T, D] and the query/key heads
# before rotary positions ([B, T, N, H], [B, S, K, H]); it returns the extra keyword arguments of the attention
# function (MoH: {"gates": [B, T, N]}).
ROUTERS = {"moh": MoHRouter, "seer": SeerGate, "abc": ABCMemory, "longshort": LongShortProjection, "gaam": GAAMGaussians,
           "moa_experts": MoAExpertsRouter, "reversed": DependencyGates,
           "neighborhood": NeighborhoodBias, "halo": HaloRelativeEmbedding,
           "lsda": DynamicPositionBias, "inline": InLineResidual, "lara": LaraProposals, "var": VARSinkDetector,
           "head_modulation": RunTimeInputs}

# Registry name -> NNX module that replaces the whole attention layer of a ViT or DiT block, for vision mechanisms
# whose weights the shared query/key/value/output projections cannot express. Built by
# `models.layers.attention.token_mixer` as `module(width, num_heads, *, grid, use_bias, rngs, param_dtype,
# **attention_kwargs)` with the block's token grid (h, w) and called as `module(x [B, T, D]) -> [B, T, D]`.
SPATIAL_MIXERS: dict[str, type] = {"aggregated": AggregatedAttention, "hilo": HiLo}


def call_with_auxiliary_loss(model: nnx.Module, *args, **kwargs) -> tuple[object, jax.Array | None]:
    """Calls `model(*args, **kwargs)` and returns (output, auxiliary loss): the weighted losses its layers sow (e.g.
    MoH's balance loss) averaged over the layers that sow one, or None when none does. Use it in loss functions."""
    # nnx.capture marks the module it runs; a copy made here (same arrays, so gradients flow) lets this work on a
    # model closed over by an outer jit or grad, whose objects the current trace may not mutate.
    graphdef, state = nnx.split(model)
    output, intermediates = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(*args, **kwargs)
    sown = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates)
            if any(getattr(entry, "key", None) == "auxiliary_loss" for entry in path)]
    if not sown:
        return output, None
    return output, jnp.mean(jnp.stack([jnp.sum(leaf) for leaf in sown]))

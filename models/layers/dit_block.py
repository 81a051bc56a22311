"""The DiT's blocks (Peebles & Xie, 2023, arXiv 2212.09748, §3.2): the adaLN-Zero block with its optional
sub-layers (condition cross-attention, IP-Adapter image prompts) and the final layer. `models.dit` assembles them;
see its docstring for the options."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import PARAM_DTYPES
from models.layers.adaln import AdaLNModulation, modulate
from models.layers.attention import Attention, token_mixer
from models.layers.cross_attention import ConditionCrossAttention
from models.layers.ip_adapter import DecoupledCrossAttention
from models.layers.mlp import GeluMlp
from models.layers.norm import LayerNorm

if TYPE_CHECKING:
    from models.dit import DiTConfig

NORM_EPS = 1e-6  # DiT's LayerNorms (no learned gain or bias: adaLN supplies both)


def _xavier_uniform(rng: jax.Array, fan_in: int, fan_out: int, shape: tuple[int, ...], dtype) -> jax.Array:
    """Uniform(±√(6 / (fan_in + fan_out))) reshaped to `shape`: Glorot & Bengio (2010) over a flat matrix."""
    return nnx.initializers.xavier_uniform()(rng, (fan_in, fan_out), dtype).reshape(shape)


class DiTBlock(nnx.Module):
    """adaLN-Zero block (§3.2): c -> (shift, scale, gate) for attention and for the MLP;
    x += gate · Attn(LN(x) (1 + scale) + shift), then the same for the MLP. Identity at initialisation."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs, layer: int = 0):
        dtype = PARAM_DTYPES[config.param_dtype]
        width = config.width
        heads, head_dim = config.layer_heads(layer)
        norm = functools.partial(LayerNorm, width, eps=NORM_EPS, use_scale=False, use_bias=False, param_dtype=dtype)
        self.attention_norm = norm()
        attention, attention_kwargs = config.layer_choice(layer)
        grid = (config.grid_size, config.grid_size)
        if heads * head_dim == width:
            self.attention = token_mixer(width, heads, attention=attention, attention_kwargs=attention_kwargs,
                                         grid=grid, rngs=rngs, param_dtype=dtype)
        else:  # an inner width N * H other than D (MoH-DiT-L/XL plans): the shared layer takes both sizes
            self.attention = Attention(width, heads, heads, head_dim, kind=attention, kind_kwargs=attention_kwargs,
                                       causal=False, use_rope=False, use_bias=True, grid=grid, rngs=rngs,
                                       param_dtype=dtype)
        if isinstance(self.attention, Attention):
            # DiT initialises timm's fused qkv Linear(D, 3D) and the output Linear(D, D) Xavier-uniform; the shared
            # layer's own fan-in normal is redrawn here so that the bound is the fused matrix's, √(6 / 4D).
            qkv = _xavier_uniform(rngs.params(), width, 3 * heads * head_dim, (width, 3, heads, head_dim), dtype)
            # (New Param objects rather than in-place writes: writing into a Variable under tracing, as in the
            # trainer's jitted initialisation, costs a slow provenance lookup per write.)
            self.attention.query_dnh, self.attention.key_dkh, self.attention.value_dkh = (
                nnx.Param(qkv[:, 0]), nnx.Param(qkv[:, 1]), nnx.Param(qkv[:, 2]))
            self.attention.out_nhd = nnx.Param(_xavier_uniform(rngs.params(), heads * head_dim, width,
                                                               (heads, head_dim, width), dtype))
        self.mlp_norm = norm()
        self.mlp = GeluMlp(width, config.mlp_width, approximate=True, rngs=rngs, param_dtype=dtype)
        self.modulation = AdaLNModulation(width, 6, rngs=rngs, param_dtype=dtype)
        # Built last in the block, so that the first block's DiT weights draw the same numbers with the option on or
        # off (later blocks' draws shift; the condition cross-attention below avoids that by being attached last).
        if config.image_prompt_tokens or config.dense_prompt_dim:
            self.image_attention_norm = norm()
            self.image_attention = DecoupledCrossAttention(
                width, config.num_heads, image_dim=width if config.image_prompt_tokens else 0,
                scale=config.image_prompt_scale, merge=config.image_prompt_merge, dense_dim=config.dense_prompt_dim,
                dense_scale=config.dense_prompt_scale, zero_out=True, rngs=rngs, param_dtype=dtype)
        else:
            self.image_attention_norm = self.image_attention = None
        # Attached by the DiT after all its other weights (`add_cross_attention`), so that switching it on leaves
        # every other weight's random draw unchanged. (nnx.data: the attribute holds a module once attached.)
        self.cross_attention = nnx.data(None)

    def add_cross_attention(self, config: DiTConfig, *, rngs: nnx.Rngs) -> None:
        """Adds the condition cross-attention sub-layer (config.cross_attention) to this block."""
        self.cross_attention = ConditionCrossAttention(
            config.width, config.num_heads, kind=config.cross_attention, kind_kwargs=config.cross_attention_kwargs,
            rngs=rngs, param_dtype=PARAM_DTYPES[config.param_dtype])

    def __call__(self, x: jax.Array, c: jax.Array, image_prompt: Mapping[str, Any] | None = None, *,
                 condition: jax.Array | None = None, cross_attention_kwargs: Mapping[str, Any] | None = None
                 ) -> jax.Array:
        """x [B, T, D], c [B, D] -> [B, T, D]; with image prompts also `image_prompt`, the keyword arguments of
        `DecoupledCrossAttention` (context, image_tokens, scale, entity inputs, dense_tokens, dense_scale); with
        condition cross-attention the condition tokens [B, S, D] (projected to the width) and the mechanism's
        per-call inputs."""
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = x + gate_attn[:, None, :] * self.attention(modulate(self.attention_norm(x), shift_attn, scale_attn))
        if self.cross_attention is not None:  # PixArt-α: on x itself, no norm or gate (the output starts at 0)
            x = x + self.cross_attention(x, condition, **dict(cross_attention_kwargs or {}))
        if self.image_attention is not None:
            x = x + self.image_attention(self.image_attention_norm(x), **image_prompt)
        return x + gate_mlp[:, None, :] * self.mlp(modulate(self.mlp_norm(x), shift_mlp, scale_mlp))


class FinalLayer(nnx.Module):
    """LN -> adaLN (shift, scale) -> Linear(D, p² · out_channels). Zero-initialised, so the DiT outputs 0 at first."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        dtype = PARAM_DTYPES[config.param_dtype]
        patch_features = config.patch_size**2 * config.out_channels
        self.norm = LayerNorm(config.width, eps=NORM_EPS, use_scale=False, use_bias=False, param_dtype=dtype)
        self.modulation = AdaLNModulation(config.width, 2, rngs=rngs, param_dtype=dtype)
        self.linear_dp = nnx.Param(jnp.zeros((config.width, patch_features), dtype))
        self.linear_bias_p = nnx.Param(jnp.zeros((patch_features,), dtype))

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """x [B, T, D], c [B, D] -> patch values [B, T, p² · out_channels]."""
        shift, scale = self.modulation(c)
        x = modulate(self.norm(x), shift, scale)
        return jnp.einsum("btd,dp->btp", x, self.linear_dp[...]) + self.linear_bias_p[...]

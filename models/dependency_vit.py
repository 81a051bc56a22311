"""DependencyViT (Ding, Shen, Fan, Chen, Chen, Luo, Tenenbaum, Gan, 2023, "Visual Dependency Transformers: Dependency
Tree Emerges from Reversed Attention", CVPR 2023, arXiv 2304.03282, §3 and §4 (DependencyViT-Lite)); reversed
attention's math is in attnx.ops.dependency.reversed.

The authors released no code; the architecture follows the timm work-in-progress port (F. Guan,
`timm/models/dependencyvit.py` on a side branch, read at f63d2e80), which presumes a CPVT-GAP layout:

- patch embedding (a p x p convolution with bias), no class token and no absolute position embedding; positions
  come from a CPVT position encoding generator (PEG: x + depth-wise 3x3 convolution with bias, Chu et al., 2023,
  arXiv 2102.10882) after each of the first `peg_depth` blocks (the port's cpe_depth, 1);
- pre-norm blocks: x + LayerScale(reversed attention(LN x)), [pruning], x + LayerScale(MLP(LN x)), [PEG]; the
  query/key/value projections have no bias, the output projection has one; LayerScale starts at 1e-6;
- the message gate is cumulative: layer l attends with m_{<=l} = m_l * m_{l-1} * ... * m_1 (its own gate times the
  product so far), and the final features are LN(x) * m_{<=L} before the mean over tokens and the linear head;
- DependencyViT-Lite: at the 1-based layers `prune_layers` ([2, 5, 8, 11] in the port, ratio 0.16), after the
  attention residual and before the MLP, the tokens of highest cumulative gate m_{<=l} (detached) are kept, the
  i-th step keeping floor((1 - i r) / (1 - (i - 1) r) * T_current) (`attnx...reversed.lite_token_counts`), and the
  gates are gathered with them;
- the dependency mask A^M = sum_h A^R (with the cumulative gate, as the port's `track_dependency_mask`) of every
  block is an intermediate output (`model(images, return_intermediates=True)`), beside the original patch index of
  every surviving token, for parsing visualisations.

Choices where the port is silent or WIP: kept tokens are in ascending grid order (the port's top-k is unsorted; all
that follows pruning is permutation equivariant, so the logits are the same); a PEG after a pruning layer is refused
(the port would fail to reshape the pruned tokens into the grid); weights use this codebase's initialisers for the
shared projections, patch embedding and MLP (the port's are timm's trunc_normal(0.02)); the gates' are the port's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.dependency.reversed import (TEMPERATURE, dependency_mask, lite_token_counts, prune_tokens,
                                           reversed_attention)
from models.layers import PARAM_DTYPES, check_param_dtype
from models.layers.attention import Attention
from models.layers.mixers.hilo import depthwise_conv3x3
from models.layers.mlp import GeluMlp
from models.layers.norm import LayerNorm
from models.layers.patch import PatchEmbed


@dataclasses.dataclass(frozen=True)
class DependencyViTConfig:
    """Shape and options of a `DependencyViT`; fields default to the `tiny` digits preset.

    mlp_width: 0 means 4 * width (the port's ratio). peg_depth: blocks followed by a PEG (the port's cpe_depth).
    prune_layers: 1-based layers that prune (DependencyViT-Lite); () for the full model. prune_ratio: the share of
    the original tokens each pruning step removes. temperature: the head selector's softmax temperature.
    block_size: children per scan step of the reversed attention. layer_scale: LayerScale's initial value.
    The fields `image_hw`, `channels`, `num_classes`, `num_patches` are those `ImageClassification` reads.
    """

    image_size: int | tuple[int, int] = 8
    patch_size: int = 2
    channels: int = 1
    num_classes: int = 10
    width: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_width: int = 0
    peg_depth: int = 1
    prune_layers: tuple[int, ...] = ()
    prune_ratio: float = 0.16
    temperature: float = TEMPERATURE
    block_size: int = 128
    layer_scale: float = 1e-6
    norm_eps: float = 1e-6
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("image_size", "prune_layers"):  # gin gives lists; tuples keep the config hashable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        size = self.image_hw
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"DependencyViTConfig.image_size must be a positive int or (height, width), got "
                             f"{self.image_size!r}")
        for name in ("patch_size", "channels", "num_classes", "width", "depth", "num_heads", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DependencyViTConfig.{name} must be a positive int, got {value!r}")
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"DependencyViTConfig.image_size={self.image_size!r} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.width % self.num_heads or self.width < 2:
            raise ValueError(f"DependencyViTConfig.width={self.width} must be >= 2 and divisible by "
                             f"num_heads={self.num_heads}")
        if not isinstance(self.mlp_width, int) or self.mlp_width < 0:
            raise ValueError(f"DependencyViTConfig.mlp_width must be an int >= 0 (0: 4 * width), got "
                             f"{self.mlp_width!r}")
        if not isinstance(self.peg_depth, int) or not 0 <= self.peg_depth <= self.depth:
            raise ValueError(f"DependencyViTConfig.peg_depth must be an int in [0, depth={self.depth}], got "
                             f"{self.peg_depth!r}")
        layers = self.prune_layers
        if not isinstance(layers, tuple) or not all(isinstance(i, int) and 1 <= i <= self.depth for i in layers) \
                or list(layers) != sorted(set(layers)):
            raise ValueError(f"DependencyViTConfig.prune_layers must be increasing 1-based layers in [1, "
                             f"{self.depth}], got {layers!r}")
        if layers and self.peg_depth > layers[0] - 1:
            raise ValueError(f"DependencyViTConfig.peg_depth={self.peg_depth} puts a PEG (a convolution over the "
                             f"token grid) after pruning layer {layers[0]}, where the grid is gone; allowed: "
                             f"peg_depth <= {layers[0] - 1}")
        if layers:
            lite_token_counts(self.num_patches, len(layers), self.prune_ratio)  # validates the ratio
        for name in ("temperature", "layer_scale", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DependencyViTConfig.{name} must be a number > 0, got {value!r}")
        check_param_dtype("DependencyViTConfig", self.param_dtype)

    @property
    def image_hw(self) -> tuple[int, int]:
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_hw[0] // self.patch_size, self.image_hw[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def resolved_mlp_width(self) -> int:
        return self.mlp_width or 4 * self.width

    def token_counts(self) -> tuple[int, ...]:
        """Tokens entering the model, then after each pruning layer (e.g. Lite-Ti: 196, 164, 132, 100, 69)."""
        return lite_token_counts(self.num_patches, len(self.prune_layers), self.prune_ratio)

    def build_model(self, rngs: nnx.Rngs) -> "DependencyViT":
        return DependencyViT(self, rngs=rngs)


_IMAGENET = dict(image_size=224, patch_size=16, channels=3, num_classes=1000)
_LITE = dict(prune_layers=(2, 5, 8, 11), prune_ratio=0.16)

PRESETS: dict[str, DependencyViTConfig] = {
    # The port's dependencyvit_tiny_patch16_224 (ViT-T-like: 192 wide, 12 heads, depth 12, one PEG) and its Lite.
    "Ti/16": DependencyViTConfig(**_IMAGENET, width=192, depth=12, num_heads=12),
    "lite_Ti/16": DependencyViTConfig(**_IMAGENET, width=192, depth=12, num_heads=12, **_LITE),
    # 8x8 digits at patch 2 (a 4x4 grid): configs/experiments/dependency_vit_digits.gin trains them.
    "tiny": DependencyViTConfig(),
    "tiny_lite": DependencyViTConfig(prune_layers=(2, 3, 4)),  # 16 -> 13 -> 10 -> 7 tokens
}


def dependency_vit_config(preset: str = "tiny", **overrides: Any) -> DependencyViTConfig:
    """The named preset with `overrides` applied, e.g. `dependency_vit_config("lite_Ti/16", num_classes=10)`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DependencyViT preset {preset!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


class DependencyBlock(nnx.Module):
    """x [B, T, D], cumulative gate m [B, T] -> (x [B, T', D], m [B, T'], extras); T' < T in a pruning layer."""

    def __init__(self, config: DependencyViTConfig, *, keep: int | None, peg: bool, rngs: nnx.Rngs, param_dtype):
        width, heads = config.width, config.num_heads
        self.block_size = config.block_size
        self.keep = keep  # tokens kept by this layer's pruning (static), None: no pruning
        self.grid = config.grid if peg else None
        self.attention_norm = LayerNorm(width, eps=config.norm_eps, param_dtype=param_dtype)
        # The shared layer owns the bias-free q/k/v projections, the output projection and (as its router) the
        # head selector and message controller; the port's output projection has a bias, added here.
        self.attention = Attention(width, heads, heads, width // heads, kind="reversed",
                                   kind_kwargs={"temperature": config.temperature}, causal=False, use_rope=False,
                                   use_bias=False, rngs=rngs, param_dtype=param_dtype)
        self.out_bias_d = nnx.Param(jnp.zeros((width,), param_dtype))
        self.attention_scale_d = nnx.Param(jnp.full((width,), config.layer_scale, param_dtype))
        self.mlp_norm = LayerNorm(width, eps=config.norm_eps, param_dtype=param_dtype)
        self.mlp = GeluMlp(width, config.resolved_mlp_width, rngs=rngs, param_dtype=param_dtype)
        self.mlp_scale_d = nnx.Param(jnp.full((width,), config.layer_scale, param_dtype))
        if peg:  # torch's Conv2d default init (kaiming-uniform a=sqrt(5)): U(+-1/sqrt(fan_in)), fan_in = 9
            init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1), out_axis=2)
            self.peg_33d = nnx.Param(init(rngs.params(), (3, 3, width), param_dtype))
            self.peg_bias_d = nnx.Param(nnx.initializers.uniform(2.0 / 3.0)(rngs.params(), (width,), param_dtype)
                                        - 1.0 / 3.0)
        else:
            self.peg_33d = self.peg_bias_d = None

    def __call__(self, x: jax.Array, cumulative: jax.Array, *, with_mask: bool = False):
        layer = self.attention
        normed = self.attention_norm(x)
        query, key, value = layer.project_heads(normed)
        gates = layer.router(normed, query, key)
        messages = gates["messages"]
        cumulative = cumulative * messages  # m_{<=l} = m_l * m_{<l}: the port's cumulative gate
        mixed = reversed_attention(query, key, value, head_gates=gates["head_gates"], messages=cumulative,
                                   block_size=self.block_size)
        x = x + self.attention_scale_d[...] * (layer.output(mixed) + self.out_bias_d[...])
        extras = {"messages": messages, "cumulative_messages": cumulative}
        if with_mask:
            extras["dependency_mask"] = dependency_mask(query, key, head_gates=gates["head_gates"],
                                                        messages=cumulative)
        if self.keep is not None:
            # Ranked by the detached cumulative gate (the port's f63d2e80 score); x and the gate are gathered.
            x, kept = prune_tokens(x, jax.lax.stop_gradient(cumulative), self.keep)
            cumulative = jnp.take_along_axis(cumulative, kept, axis=-1)
            extras["kept"] = kept
        x = x + self.mlp_scale_d[...] * self.mlp(self.mlp_norm(x))
        if self.peg_33d is not None:  # CPVT's PEG: x + DWConv3x3(x) on the token grid
            x = x + depthwise_conv3x3(x, self.peg_33d[...], self.peg_bias_d[...], self.grid)
        return x, cumulative, extras


class DependencyViT(nnx.Module):
    """images [B, H, W, C] -> logits [B, num_classes] (float32).

    `model(images, return_intermediates=True)` returns (logits, intermediates) with, per block "block_<i>":
        "<block>/messages"             the block's own message gate m_l [B, T_l]
        "<block>/cumulative_messages"  m_{<=l} [B, T_l], before the block's pruning
        "<block>/dependency_mask"      A^M = sum_h A^R [B, T_l (parent), T_l (child)], with the cumulative gate
        "<block>/positions"            the original patch index (row-major) of each of the block's tokens [B, T_l]
        "<block>/kept"                 (pruning blocks) indices into the block's tokens that survive [B, T_{l+1}]
    and "encoded" (LN(x) * m after the last block), "pre_logits" (their mean) [B, D].
    """

    def __init__(self, config: DependencyViTConfig, *, rngs: nnx.Rngs):
        dtype = PARAM_DTYPES[config.param_dtype]
        self.image_hw = config.image_hw
        self.channels = config.channels
        self.patch_embed = PatchEmbed(config.patch_size, config.channels, config.width, rngs=rngs, param_dtype=dtype)
        counts = config.token_counts()
        blocks = []
        for index in range(config.depth):
            layer = index + 1
            keep = counts[config.prune_layers.index(layer) + 1] if layer in config.prune_layers else None
            blocks.append(DependencyBlock(config, keep=keep, peg=index < config.peg_depth, rngs=rngs,
                                          param_dtype=dtype))
        self.blocks = nnx.List(blocks)
        self.final_norm = LayerNorm(config.width, eps=config.norm_eps, param_dtype=dtype)
        self.head_dc = nnx.Param(jnp.zeros((config.width, config.num_classes), dtype))  # zero-init, as the ViT's
        self.head_bias_c = nnx.Param(jnp.zeros((config.num_classes,), dtype))

    def __call__(self, images: jax.Array, *, return_intermediates: bool = False):
        if images.shape[1:] != (*self.image_hw, self.channels):
            raise ValueError(f"DependencyViT: expected images [B, {self.image_hw[0]}, {self.image_hw[1]}, "
                             f"{self.channels}], got {list(images.shape)}")
        x = self.patch_embed(images)
        batch, length = x.shape[:2]
        cumulative = jnp.ones((batch, length), jnp.float32)  # the port starts m at 1
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        intermediates: dict[str, jax.Array] = {}
        for index, block in enumerate(self.blocks):
            name = f"block_{index}"
            x, cumulative, extras = block(x, cumulative, with_mask=return_intermediates)
            if return_intermediates:
                intermediates[f"{name}/positions"] = positions
                intermediates.update({f"{name}/{k}": v for k, v in extras.items()})
            if "kept" in extras:
                positions = jnp.take_along_axis(positions, extras["kept"], axis=-1)
        # The port gates the normalised features by the cumulative message (after the norm, its FIXME's choice).
        x = self.final_norm(x) * cumulative[..., None].astype(x.dtype)
        pooled = jnp.mean(x, axis=1)
        logits = (jnp.einsum("bd,dc->bc", pooled, self.head_dc[...]) + self.head_bias_c[...]).astype(jnp.float32)
        if not return_intermediates:
            return logits
        intermediates.update({"encoded": x, "pre_logits": pooled, "final_positions": positions})
        return logits, intermediates

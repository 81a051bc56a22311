"""Diffusion Transformer (Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers", arXiv 2212.09748).

A class-conditional noise predictor: image [B, H, W, C] (pixels or latents), diffusion step t [B] and label y [B]
-> ε̂ [B, H, W, C] (and, with learn_sigma, C more channels that set the reverse-process variance; see
`models.diffusion`). Patches of p x p become tokens with fixed 2-D sin-cos positions (§3.2 "Patchify"); the
conditioning c = embed(t) + embed(y) modulates every block through adaLN-Zero (§3.2 "DiT block design"); a final
adaLN and linear layer map tokens back to patches.

`DiTConfig` is a frozen dataclass validated on construction; `DiT(config, rngs=...)` builds the NNX module. The
attention mixer is chosen by name (`DiTConfig.attention`, default "softmax"): any registered mechanism that supports
non-causal self attention drops in with one gin line (ARCHITECTURE §5).

Image prompts (`DiTConfig.image_prompt_tokens` > 0): IP-Adapter's decoupled cross-attention (Ye et al., 2023,
arXiv 2308.06721, §3.2; models/layers/ip_adapter.py) becomes a sub-layer of every block, between self-attention
and the MLP (where PixArt-α puts its text cross-attention): queries from the normalised tokens, one stream of keys
and values from the label embedding (a one-token "text" context, the null class when labels are dropped) and one
from M image tokens (`ImageProjModel` of an image embedding [B, image_prompt_dim], e.g. a frozen encoder's
features of a reference image), added with weight λ = `image_prompt_scale`. Its output projection starts at zero,
so every block is still the identity at initialisation; with the option off the blocks and the parameter count are
exactly DiT's. The model is then called with `image_embeds=` (zeros: no image prompt, IP-Adapter's unconditional
`proj(zeros)`), and `image_prompt_scale=` overrides λ per call (0 removes the image stream exactly). With condition
cross-attention on, the image layer's "text" stream is the condition tokens instead of the label embedding.
Several reference images (image_embeds [B, O, E]) merge by `image_prompt_merge`: "concat" (one stream of all their
tokens) or "mip" (MIP-Adapter's per-position object weights; the entity phrases come per call, `DiT.entity_phrases`
builds them from the references' labels). `dense_prompt_dim` > 0 adds DPDEdit's dense stream: per-call feature
maps [B, S_d, dense_prompt_dim], one for all blocks or one per block ([depth, B, S_d, C], e.g. a reference
network's features at the matching block, `DiT.reference_features`). See models/layers/ip_adapter.py.

Condition ("text") cross-attention (`DiTConfig.cross_attention`, a registry name; None, the default, leaves DiT
unchanged, parameters and outputs bit-identical): PixArt-α's sub-layer (arXiv 2310.00426, §2.3;
models/layers/cross_attention.py) in every block, after self-attention and before the MLP, residual, queries from
the image tokens, keys and values from a condition sequence [B, S, condition_dim] projected to the width once per
model (PixArt's caption embedder). Any mechanism with pattern NC drops in with one gin line: 'softmax' (PixArt),
or the attention-control entries 'structured_cross', 'region_mask', 'isolation', whose per-call inputs the caller
passes as `cross_attention_kwargs=` (see `DiT.__call__`). The digits DiT has no text encoder: by default its
condition sequence is `LabelTokens` of the label (condition_shared_tokens learned tokens common to all images,
then condition_class_tokens learned tokens of the class, a null row when the label is dropped for guidance); a
caller with real condition tokens passes `context=` instead.

Per-block head plans (`DiTConfig.layer_num_heads`, `attention_head_dim`): MoH-DiT-L/XL (SkyworkAI/MoH
MoH-DiT/models.py) vary the number of heads per block (8 -> 16 -> 24) at a fixed head size (64 / 72), so the
attention's inner width N * H differs from the model width D in some blocks; the official DiT takes the same two
lists (`num_heads`, `head_dim`).
"""

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attnx

from models.diffusion import classifier_free_guidance
from models.layers.adaln import LabelEmbedder, TimestepEmbedder
from models.layers import PARAM_DTYPES, check_param_dtype
from models.layers.attention import check_attention_choice, layer_entry
from models.layers.cross_attention import CaptionProjection, LabelTokens, check_cross_attention_choice
from models.layers.dit_block import DiTBlock, FinalLayer
from models.layers.ip_adapter import ImageProjModel, check_image_prompt_options
from models.layers.mixers import SPATIAL_MIXERS
from models.layers.patch import PatchEmbed, sincos_2d, unpatchify
from models.layers.sharding import constrain

# DiT's forward_with_cfg guides only channels [:3] "for exact reproducibility reasons" (its comment); with 4 latent
# channels that leaves the 4th unguided. `all_channels=False` reproduces that.
DIT_REFERENCE_GUIDED_CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Shape and options of a `DiT`. Fields default to the `tiny` preset: 8x8 grey digits, 10 classes, in 4x4-pixel
    patches (4 tokens: on two shared CPU cores, 2x2 patches cost 4x as much per step for a model that must train in
    minutes).

    input_size: side of the (square) input, pixels or latent cells. patch_size: p; tokens = (input_size / p)².
    learn_sigma: predict the reverse-process variance as well (output 2 * in_channels channels).
    class_dropout_prob: probability of replacing a label by the null class in training (for guidance).
    layer_attention: per-block attention, a tuple of entries repeated over the depth (block l takes entry
        l % len); each None (the config's `attention` and `attention_kwargs`), a mechanism name, or (name, kwargs).
        MoH-DiT's published head plans differ per block (diffusion spec §5), e.g. 8 routed blocks then 4 all-shared.
    image_prompt_tokens: M > 0 adds IP-Adapter image-prompt cross-attention to every block (module docstring);
        0 (default) leaves DiT unchanged. image_prompt_dim: width of the image embedding given to the model.
        image_prompt_scale: λ, the weight of the image stream (1.0 in the IP-Adapter code). image_prompt_merge:
        "concat" or "mip", for several reference images. dense_prompt_dim: width of DPDEdit's dense stream (0:
        none); dense_prompt_scale: its weight.
    layer_num_heads: per-block head counts, repeated over the depth like layer_attention (empty: num_heads in
        every block). attention_head_dim: the head size H of every block (None: width // the block's heads), so
        that N * H may differ from the width (MoH-DiT-L/XL: 8, 16, 24 heads of 64 / 72).
    cross_attention: None (default): no condition cross-attention. A registry name (pattern NC) adds PixArt-α's
        cross-attention sub-layer to every block (module docstring); cross_attention_kwargs: its fixed options.
        condition_dim: width C of the condition tokens (None: width). condition_shared_tokens /
        condition_class_tokens: the digits stand-in for a text encoder, S = shared + class tokens derived from
        the label (class_tokens 0: none; the model must then be called with `context=`).
    """

    input_size: int = 8
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    attention: str = "softmax"
    attention_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    layer_attention: tuple[Any, ...] = ()
    param_dtype: str = "float32"
    image_prompt_tokens: int = 0
    image_prompt_dim: int = 64
    image_prompt_scale: float = 1.0
    image_prompt_merge: str = "concat"
    dense_prompt_dim: int = 0
    dense_prompt_scale: float = 1.0
    layer_num_heads: tuple[int, ...] = ()
    attention_head_dim: int | None = None
    cross_attention: str | None = None
    cross_attention_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    condition_dim: int | None = None
    condition_shared_tokens: int = 1
    condition_class_tokens: int = 2
    # Diffusers' DiTTransformer2DModel spaces the timestep frequencies by half - 1 (downscale_freq_shift=1), not half:
    # the same sinusoids as DiT's with max_period 10000^(half / (half - 1)) (models/interop/diffusers_dit.py).
    timestep_max_period: float = 10_000.0

    def __post_init__(self):
        if isinstance(self.layer_attention, list):  # gin gives lists; a tuple keeps the config hashable
            object.__setattr__(self, "layer_attention", tuple(self.layer_attention))
        if isinstance(self.layer_num_heads, list):
            object.__setattr__(self, "layer_num_heads", tuple(self.layer_num_heads))
        for name in ("input_size", "patch_size", "in_channels", "num_classes", "width", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig.input_size={self.input_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"DiTConfig.width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.width % 4:
            raise ValueError(f"DiTConfig.width={self.width} must be divisible by 4 (2-D sin-cos positions)")
        if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"DiTConfig.mlp_ratio must be > 0 (and width * mlp_ratio >= 1), got {self.mlp_ratio!r}")
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"DiTConfig.learn_sigma must be a bool, got {self.learn_sigma!r}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"DiTConfig.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")
        if not isinstance(self.timestep_max_period, (int, float)) or not self.timestep_max_period > 1:
            raise ValueError(f"DiTConfig.timestep_max_period must be a number > 1, got {self.timestep_max_period!r}")
        check_param_dtype("DiTConfig", self.param_dtype)
        check_image_prompt_options("DiTConfig", tokens=self.image_prompt_tokens, dim=self.image_prompt_dim,
                                   scale=self.image_prompt_scale, merge=self.image_prompt_merge,
                                   dense_dim=self.dense_prompt_dim, dense_scale=self.dense_prompt_scale)
        check_attention_choice("DiTConfig", self.attention, self.attention_kwargs, causal=False)
        if not isinstance(self.layer_attention, tuple):
            raise ValueError(f"DiTConfig.layer_attention must be a tuple of entries, got {self.layer_attention!r}")
        for index in range(len(self.layer_attention)):
            check_attention_choice(f"DiTConfig.layer_attention[{index}]", *self.layer_choice(index), causal=False)
        self._check_head_plan()
        self._check_condition()

    def _check_head_plan(self) -> None:
        if not isinstance(self.layer_num_heads, tuple) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in self.layer_num_heads):
            raise ValueError(f"DiTConfig.layer_num_heads must be a tuple of positive ints (heads per block, "
                             f"repeated over the depth), got {self.layer_num_heads!r}")
        if self.attention_head_dim is not None and (not isinstance(self.attention_head_dim, int) or isinstance(
                self.attention_head_dim, bool) or self.attention_head_dim <= 0):
            raise ValueError(f"DiTConfig.attention_head_dim must be a positive int or None (width // heads), got "
                             f"{self.attention_head_dim!r}")
        planned = bool(self.layer_num_heads) or self.attention_head_dim is not None
        for index in range(self.depth if planned else 0):
            heads = self.layer_heads(index)[0]
            if self.attention_head_dim is None and self.width % heads:
                raise ValueError(f"DiTConfig.layer_num_heads[{index % len(self.layer_num_heads)}]={heads} does not "
                                 f"divide width={self.width}; set attention_head_dim for heads of a fixed size")
            name = attnx_name(self.layer_choice(index)[0])
            if name in SPATIAL_MIXERS and self.layer_heads(index) != (self.num_heads, self.head_dim):
                raise ValueError(f"DiTConfig: block {index} uses {name!r}, a spatial mixer that owns its "
                                 f"projections at num_heads / width // num_heads; layer_num_heads and "
                                 f"attention_head_dim apply to the shared attention layer only")

    def _check_condition(self) -> None:
        for name in ("condition_shared_tokens", "condition_class_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DiTConfig.{name} must be an int >= 0, got {value!r}")
        if self.condition_dim is not None and (not isinstance(self.condition_dim, int) or isinstance(
                self.condition_dim, bool) or self.condition_dim <= 0):
            raise ValueError(f"DiTConfig.condition_dim must be a positive int or None (the width), got "
                             f"{self.condition_dim!r}")
        if self.cross_attention is None:
            if self.cross_attention_kwargs:
                raise ValueError(f"DiTConfig.cross_attention_kwargs={dict(self.cross_attention_kwargs)!r} given "
                                 f"without a cross_attention mechanism (None: no condition cross-attention)")
            return
        if not isinstance(self.cross_attention, str):
            raise ValueError(f"DiTConfig.cross_attention must be a registry name or None, got "
                             f"{self.cross_attention!r}")
        check_cross_attention_choice("DiTConfig", self.cross_attention, self.cross_attention_kwargs)
        length = self.condition_tokens
        if length and length == self.num_patches and not attnx.get_attention(self.cross_attention).supports("NS"):
            raise ValueError(f"DiTConfig: {length} condition tokens (condition_shared_tokens + "
                             f"condition_class_tokens) equal the {self.num_patches} image tokens, which "
                             f"{self.cross_attention!r} (cross attention only) reads as self attention; use another "
                             f"token count")

    def layer_heads(self, layer: int) -> tuple[int, int]:
        """(heads, head size) of block `layer`'s attention."""
        heads = self.layer_num_heads[layer % len(self.layer_num_heads)] if self.layer_num_heads else self.num_heads
        return heads, self.attention_head_dim or self.width // heads

    @property
    def condition_tokens(self) -> int:
        """S of the label-derived condition sequence (0: none built in)."""
        if self.cross_attention is None or not self.condition_class_tokens:
            return 0
        return self.condition_shared_tokens + self.condition_class_tokens

    def layer_choice(self, layer: int) -> tuple[str, Mapping[str, Any]]:
        """(mechanism name, kwargs) of block `layer`."""
        return layer_entry("DiTConfig.layer_attention", self.layer_attention, layer, self.attention,
                           self.attention_kwargs)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


# Table 1 of the paper: depth, width, heads per size; every size at p = 2, 4, 8. The latent inputs of 256 px
# ImageNet: 32x32x4 (SD-VAE, 8x downsampling), 1000 classes, learned variances.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

PRESETS: dict[str, DiTConfig] = {
    f"{size}/{patch}": DiTConfig(input_size=32, patch_size=patch, in_channels=4, num_classes=1000, width=width,
                                 depth=depth, num_heads=heads, learn_sigma=True)
    for size, (depth, width, heads) in _SIZES.items() for patch in (2, 4, 8)
}
# Pixel-space class-conditional 8x8 digits on a CPU in minutes (configs/experiments/dit_digits.gin).
PRESETS["tiny"] = DiTConfig()


def dit_config(preset: str = "tiny", **overrides: Any) -> DiTConfig:
    """Returns the named preset with `overrides` applied, e.g. `dit_config("XL/2", attention="linear")`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def attnx_name(kind: str) -> str:
    """The registry's canonical name of `kind` (aliases resolved)."""
    return attnx.get_attention(kind).name


class DiT(nnx.Module):
    """(x [B, H, W, C], t [B], y [B]) -> [B, H, W, out_channels] in float32: ε̂ first, then variance values."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        # Plain hashable attributes rather than the config itself (its dict field is unhashable under jit).
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.width = config.width
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.num_classes = config.num_classes
        self.class_dropout_prob = config.class_dropout_prob
        self.dense_prompt_dim = config.dense_prompt_dim
        dtype = PARAM_DTYPES[config.param_dtype]
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, config.width, rngs=rngs,
                                      param_dtype=dtype)
        self.timestep_embedder = TimestepEmbedder(config.width, max_period=config.timestep_max_period, rngs=rngs,
                                                  param_dtype=dtype)
        self.label_embedder = LabelEmbedder(config.num_classes, config.width, dropout_prob=config.class_dropout_prob,
                                            rngs=rngs, param_dtype=dtype)
        self.blocks = nnx.List([DiTBlock(config, rngs=rngs, layer=index) for index in range(config.depth)])
        self.final_layer = FinalLayer(config, rngs=rngs)
        self.image_proj = (ImageProjModel(config.image_prompt_dim, config.width, config.image_prompt_tokens,
                                          rngs=rngs, param_dtype=dtype) if config.image_prompt_tokens else None)
        # Condition cross-attention, built last (every other weight draws the same numbers with it on or off):
        # the sub-layer of every block, the digits' label tokens and PixArt's caption projection.
        if config.cross_attention is not None:
            for block in self.blocks:
                block.add_cross_attention(config, rngs=rngs)
        condition_dim = config.condition_dim or config.width
        self.label_tokens = (LabelTokens(config.num_classes, condition_dim, shared=config.condition_shared_tokens,
                                         per_class=config.condition_class_tokens, rngs=rngs, param_dtype=dtype)
                             if config.condition_tokens else None)
        self.condition_proj = (CaptionProjection(condition_dim, config.width, rngs=rngs, param_dtype=dtype)
                               if config.cross_attention is not None else None)

    def position_embedding(self) -> np.ndarray:
        """The fixed 2-D sin-cos positions [T, D] (MAE/DiT order), a constant rather than a parameter."""
        return _positions(self.width, self.grid_size)

    def conditioning(self, t: jax.Array, y: jax.Array, *, train: bool = False, rng: jax.Array | None = None,
                     force_drop_ids: jax.Array | None = None) -> jax.Array:
        """c = embed(t) + embed(y) [B, D]. Labels go to the null class where force_drop_ids != 0, or, with
        train=True, with probability class_dropout_prob drawn from `rng`."""
        if train and self.class_dropout_prob > 0 and rng is None and force_drop_ids is None:
            raise ValueError("DiT: train=True drops labels at random (class_dropout_prob="
                             f"{self.class_dropout_prob}), so it needs an rng")
        return self.timestep_embedder(t) + self._label_embedding(y, train=train, rng=rng,
                                                                 force_drop_ids=force_drop_ids)

    def _label_embedding(self, y, *, train, rng, force_drop_ids):
        return self.label_embedder(y, rng=rng if train else None, force_drop_ids=force_drop_ids)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, train: bool = False,
                 rng: jax.Array | None = None, force_drop_ids: jax.Array | None = None,
                 return_intermediates: bool = False, image_embeds: jax.Array | None = None,
                 image_prompt_scale=None, context: jax.Array | None = None,
                 cross_attention_kwargs: Mapping[str, Any] | None = None,
                 image_prompt_kwargs: Mapping[str, Any] | None = None):
        """Returns the output [B, H, W, out_channels]; with return_intermediates, (output, dict) where the dict
        holds "conditioning" [B, D], "tokens" (after the position embedding) and "block_{i}" [B, T, D].

        image_embeds [B, image_prompt_dim] or, for several references, [B, O, image_prompt_dim]: required when the
        config has image prompts (zeros: none), refused otherwise. image_prompt_scale: λ for this call (a number or
        a traced scalar), default the config's. image_prompt_kwargs: the image layer's other per-call inputs:
        entity_context [B, O, L, C] and entity_lengths [B, O] (merge "mip"; C = condition_dim with condition
        cross-attention, else the width; `entity_phrases` builds them), dense_features [B, S_d, dense_prompt_dim]
        or one per block [depth, B, S_d, dense_prompt_dim] (required with a dense stream), dense_scale.
        context [B, S, condition_dim]: the condition tokens of the cross-attention (default: the label tokens of
        y, null where labels are dropped); refused without cross_attention. cross_attention_kwargs: the cross
        mechanism's per-call inputs, the same for every block, e.g. region_mask's foreground [B, T] (bool, per
        image token in row-major order) and subject_tokens [B, S], isolation's q_ids [B, T] / k_ids [B, S],
        structured_cross's extra_contexts [M, B, S, condition_dim] (noun-phrase encodings, projected like
        `context`)."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"DiT expects images [B, H, W, {self.in_channels}], got {x.shape}")
        if (self.image_proj is None) != (image_embeds is None):
            raise ValueError("DiT: image_embeds given, but the model has no image prompt (DiTConfig."
                             "image_prompt_tokens=0)" if image_embeds is not None else
                             "DiT: this model has image prompts (DiTConfig.image_prompt_tokens > 0); pass "
                             "image_embeds [B, image_prompt_dim] (zeros for no image prompt)")
        c = self.conditioning(t, y, train=train, rng=rng, force_drop_ids=force_drop_ids)
        condition, cross_kwargs = self._condition(y, context, cross_attention_kwargs, train=train, rng=rng,
                                                  force_drop_ids=force_drop_ids)
        prompts = self._image_prompts(y, condition, image_embeds, image_prompt_scale, image_prompt_kwargs,
                                      train=train, rng=rng, force_drop_ids=force_drop_ids)
        tokens = self.patch_embed(x) + self.position_embedding().astype(x.dtype)
        intermediates = {"conditioning": c, "tokens": tokens}
        for index, block in enumerate(self.blocks):
            tokens = block(constrain(tokens, "btd"), c, prompts[index], condition=condition,
                           cross_attention_kwargs=cross_kwargs)
            intermediates[f"block_{index}"] = tokens
        patches = self.final_layer(tokens, c)
        grid = (self.grid_size, self.grid_size)
        out = unpatchify(patches, self.patch_size, grid, self.out_channels).astype(jnp.float32)
        return (out, intermediates) if return_intermediates else out

    def _image_prompts(self, y, condition, image_embeds, scale, kwargs, *, train, rng, force_drop_ids) -> list:
        """The image layer's keyword arguments per block (None everywhere without one)."""
        kwargs = dict(kwargs or {})
        if self.blocks[0].image_attention is None:
            if kwargs:
                raise ValueError(f"DiT: image_prompt_kwargs {sorted(kwargs)} given, but the model has no image "
                                 f"prompt layer (DiTConfig.image_prompt_tokens=0 and dense_prompt_dim=0)")
            return [None] * len(self.blocks)
        unknown = set(kwargs) - {"entity_context", "entity_lengths", "dense_features", "dense_scale"}
        if unknown:
            raise ValueError(f"DiT: unknown image_prompt_kwargs {sorted(unknown)}; known: entity_context, "
                             f"entity_lengths, dense_features, dense_scale")
        if condition is None:  # the label embedding as a one-token "text" context; the same rng drops the same labels
            condition = self._label_embedding(y, train=train, rng=rng, force_drop_ids=force_drop_ids)[:, None, :]
        common = dict(context=condition, scale=scale, dense_scale=kwargs.get("dense_scale"))
        if image_embeds is not None:
            if image_embeds.ndim not in (2, 3):
                raise ValueError(f"DiT: image_embeds must be [B, E] or [B, O, E] (O references), got "
                                 f"{image_embeds.shape}")
            flat = self.image_proj(image_embeds.reshape(-1, image_embeds.shape[-1]))  # [B * O, M, D]
            common["image_tokens"] = flat.reshape(*image_embeds.shape[:-1], *flat.shape[1:])
        entity = kwargs.get("entity_context")
        if entity is not None and self.condition_proj is not None:  # phrases take the context's projection
            entity = self.condition_proj(entity.astype(condition.dtype))
        common.update(entity_context=entity, entity_lengths=kwargs.get("entity_lengths"))
        dense = kwargs.get("dense_features")
        depth = len(self.blocks)
        if dense is not None and dense.ndim == 4 and dense.shape[0] != depth:
            raise ValueError(f"DiT: dense_features must be [B, S_d, C] or one per block [{depth}, B, S_d, C], got "
                             f"{dense.shape}")
        per_block = dense is not None and dense.ndim == 4
        return [dict(common, dense_tokens=dense[index] if per_block else dense) for index in range(depth)]

    def entity_phrases(self, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """MIP-Adapter's entity phrases of O references from their labels [B, O]: (entity_context [B, O, L, C],
        entity_lengths [B, O]). The digits stand-in for a tokenised phrase: a BOS token, then the class's tokens --
        the label tokens' first shared token (or the null class's first token) and the class tokens with condition
        cross-attention (L = 1 + condition_class_tokens), else the null class's and the class's label embedding
        (L = 2)."""
        labels = jnp.asarray(labels, jnp.int32)
        if labels.ndim != 2:
            raise ValueError(f"DiT.entity_phrases: labels must be [B, O], got {labels.shape}")
        null = jnp.full(labels.shape, self.num_classes, jnp.int32)
        if self.label_tokens is None:
            table = self.label_embedder.embedding_vd[...]
            phrase = jnp.stack([jnp.take(table, null, axis=0), jnp.take(table, labels, axis=0)], axis=2)
        else:
            tokens = self.label_tokens.class_vsc[...]  # [classes + 1, per_class, C]
            bos = (jnp.broadcast_to(self.label_tokens.shared_sc[...][0], (*labels.shape, tokens.shape[-1]))
                   if self.label_tokens.shared_sc is not None else jnp.take(tokens[:, 0], null, axis=0))
            phrase = jnp.concatenate([bos[:, :, None], jnp.take(tokens, labels, axis=0)], axis=2)
        return phrase, jnp.full(labels.shape, phrase.shape[2] - 1, jnp.int32)

    def reference_features(self, x: jax.Array, t: jax.Array, y: jax.Array, **kwargs) -> jax.Array:
        """The tokens entering each block for images x [B, H, W, C]: [depth, B, T, D], DPDEdit's "features at the
        matching layer" when this DiT serves as the texture network (give them as dense_features to a DiT with
        dense_prompt_dim = this width). kwargs: passed to the forward (e.g. force_drop_ids, image_embeds)."""
        _, inter = self(x, t, y, return_intermediates=True, **kwargs)
        return jnp.stack([inter["tokens"]] + [inter[f"block_{i}"] for i in range(len(self.blocks) - 1)])

    def _condition(self, y, context, cross_attention_kwargs, *, train, rng, force_drop_ids):
        """(condition tokens projected to the width [B, S, D] or None, per-call cross-attention kwargs)."""
        if self.condition_proj is None:
            if context is not None or cross_attention_kwargs:
                raise ValueError("DiT: context / cross_attention_kwargs given, but the model has no condition "
                                 "cross-attention (DiTConfig.cross_attention=None)")
            return None, None
        if context is None:
            if self.label_tokens is None:
                raise ValueError("DiT: this model has condition cross-attention but no label tokens "
                                 "(DiTConfig.condition_class_tokens=0); pass context [B, S, condition_dim]")
            # the same rng and force_drop_ids drop the same labels as in c: null tokens for guidance
            labels = self.label_embedder.drop_labels(jnp.asarray(y, jnp.int32), rng=rng if train else None,
                                                     force_drop_ids=force_drop_ids)
            context = self.label_tokens(labels)
        elif context.ndim != 3 or context.shape[0] != y.shape[0]:
            raise ValueError(f"DiT: context must be [B, S, condition_dim] with B={y.shape[0]}, got {context.shape}")
        kwargs = dict(cross_attention_kwargs or {})
        if kwargs.get("extra_contexts") is not None:  # noun-phrase encodings take the context's projection too
            kwargs["extra_contexts"] = self.condition_proj(kwargs["extra_contexts"].astype(context.dtype))
        return self.condition_proj(context), kwargs

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale, *,
                         all_channels: bool = True, image_embeds: jax.Array | None = None,
                         image_prompt_scale=None, context: jax.Array | None = None,
                         null_context: jax.Array | None = None,
                         cross_attention_kwargs: Mapping[str, Any] | None = None,
                         image_prompt_kwargs: Mapping[str, Any] | None = None) -> jax.Array:
        """Classifier-free guided output [B, H, W, out_channels] from one forward pass over 2B examples.

        The batch is run with its labels and with the null class; ε_u + s (ε_c - ε_u) replaces the ε channels (all
        in_channels of them), and the variance channels come from the conditional half. all_channels=False
        reproduces DiT's `forward_with_cfg`, which guides only the first three output channels. With image
        prompts, the unconditional half also gets a zero image embedding (IP-Adapter's uncond `proj(zeros)`) and
        zero dense features; MIP's entity phrases are the same in both halves.

        Condition cross-attention: the unconditional half reads the null class's label tokens, or `null_context`
        when `context` is given (both or neither). Per-call `cross_attention_kwargs` apply to the conditional half
        only, as Structured Diffusion Guidance does (the unconditional prompt has no noun phrases or subject
        words); the two halves then run as two calls of B examples instead of one of 2B.
        """
        batch = x.shape[0]
        image = {}
        if image_embeds is not None:
            image = dict(image_embeds=jnp.concatenate([image_embeds, jnp.zeros_like(image_embeds)]),
                         image_prompt_scale=image_prompt_scale)
        if (context is None) != (null_context is None):
            raise ValueError("DiT.forward_with_cfg: give context and null_context together (the unconditional "
                             "half needs its own condition tokens) or neither (the label tokens)")
        prompt = dict(image_prompt_kwargs or {})
        dense = prompt.get("dense_features")
        null_prompt = dict(prompt, **({} if dense is None else {"dense_features": jnp.zeros_like(dense)}))
        if cross_attention_kwargs:
            null_image = None if image_embeds is None else jnp.zeros_like(image_embeds)
            conditional = self(x, t, y, force_drop_ids=jnp.zeros(batch, jnp.int32), context=context,
                               cross_attention_kwargs=cross_attention_kwargs, image_embeds=image_embeds,
                               image_prompt_scale=image_prompt_scale, image_prompt_kwargs=prompt)
            unconditional = self(x, t, y, force_drop_ids=jnp.ones(batch, jnp.int32), context=null_context,
                                 image_embeds=null_image, image_prompt_scale=image_prompt_scale,
                                 image_prompt_kwargs=null_prompt)
            out = jnp.concatenate([conditional, unconditional])
        else:
            if context is not None:
                image["context"] = jnp.concatenate([context, null_context])
            if prompt:  # both halves in one batch: the batch axis is 1 for per-block dense features
                axis = lambda name, value: 1 if name == "dense_features" and value.ndim == 4 else 0
                image["image_prompt_kwargs"] = {
                    name: value if name == "dense_scale" else
                    jnp.concatenate([value, null_prompt[name]], axis=axis(name, value))
                    for name, value in prompt.items()}
            out = self(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, y]),
                       force_drop_ids=jnp.concatenate([jnp.zeros(batch, jnp.int32), jnp.ones(batch, jnp.int32)]),
                       **image)
        guided = self.in_channels if all_channels else min(DIT_REFERENCE_GUIDED_CHANNELS, self.out_channels)
        return classifier_free_guidance(out[:batch], out[batch:], cfg_scale, guided_channels=guided)


@functools.cache
def _positions(width: int, grid_size: int) -> np.ndarray:
    return sincos_2d(width, (grid_size, grid_size))


def count_params(model_or_config) -> int:
    """Number of trainable parameters of a DiT or of a config's DiT (built abstractly: nothing is allocated).

    The paper's code also counts its fixed position embedding (T x D numbers, a frozen nn.Parameter); we hold it
    as a constant, so add `num_patches * width` to compare with its logged totals.
    """
    if isinstance(model_or_config, DiTConfig):
        model_or_config = nnx.eval_shape(lambda: DiT(model_or_config, rngs=nnx.Rngs(0)))
    params = nnx.state(model_or_config, nnx.Param)
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

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
`proj(zeros)`), and `image_prompt_scale=` overrides λ per call (0 removes the image stream exactly).
"""

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.diffusion import classifier_free_guidance
from models.layers.adaln import AdaLNModulation, LabelEmbedder, TimestepEmbedder, modulate
from models.layers import PARAM_DTYPES, check_param_dtype
from models.layers.attention import Attention, check_attention_choice, layer_entry, token_mixer
from models.layers.ip_adapter import DecoupledCrossAttention, ImageProjModel
from models.layers.mlp import GeluMlp
from models.layers.norm import LayerNorm
from models.layers.patch import PatchEmbed, sincos_2d, unpatchify

NORM_EPS = 1e-6  # DiT's LayerNorms (no learned gain or bias: adaLN supplies both)
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
        image_prompt_scale: λ, the weight of the image stream (1.0 in the IP-Adapter code).
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

    def __post_init__(self):
        if isinstance(self.layer_attention, list):  # gin gives lists; a tuple keeps the config hashable
            object.__setattr__(self, "layer_attention", tuple(self.layer_attention))
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
        check_param_dtype("DiTConfig", self.param_dtype)
        if not isinstance(self.image_prompt_tokens, int) or isinstance(self.image_prompt_tokens, bool) \
                or self.image_prompt_tokens < 0:
            raise ValueError(f"DiTConfig.image_prompt_tokens must be an int >= 0 (0: no image prompt), got "
                             f"{self.image_prompt_tokens!r}")
        if not isinstance(self.image_prompt_dim, int) or isinstance(self.image_prompt_dim, bool) \
                or self.image_prompt_dim <= 0:
            raise ValueError(f"DiTConfig.image_prompt_dim must be a positive int, got {self.image_prompt_dim!r}")
        if isinstance(self.image_prompt_scale, bool) or not isinstance(self.image_prompt_scale, (int, float)):
            raise ValueError(f"DiTConfig.image_prompt_scale must be a number (λ), got {self.image_prompt_scale!r}")
        check_attention_choice("DiTConfig", self.attention, self.attention_kwargs, causal=False)
        if not isinstance(self.layer_attention, tuple):
            raise ValueError(f"DiTConfig.layer_attention must be a tuple of entries, got {self.layer_attention!r}")
        for index in range(len(self.layer_attention)):
            check_attention_choice(f"DiTConfig.layer_attention[{index}]", *self.layer_choice(index), causal=False)

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


def _xavier_uniform(rng: jax.Array, fan_in: int, fan_out: int, shape: tuple[int, ...], dtype) -> jax.Array:
    """Uniform(±√(6 / (fan_in + fan_out))) reshaped to `shape`: Glorot & Bengio (2010) over a flat matrix."""
    return nnx.initializers.xavier_uniform()(rng, (fan_in, fan_out), dtype).reshape(shape)


class DiTBlock(nnx.Module):
    """adaLN-Zero block (§3.2): c -> (shift, scale, gate) for attention and for the MLP;
    x += gate · Attn(LN(x) (1 + scale) + shift), then the same for the MLP. Identity at initialisation."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs, layer: int = 0):
        dtype = PARAM_DTYPES[config.param_dtype]
        width, heads, head_dim = config.width, config.num_heads, config.head_dim
        norm = functools.partial(LayerNorm, width, eps=NORM_EPS, use_scale=False, use_bias=False, param_dtype=dtype)
        self.attention_norm = norm()
        attention, attention_kwargs = config.layer_choice(layer)
        self.attention = token_mixer(width, heads, attention=attention, attention_kwargs=attention_kwargs,
                                     grid=(config.grid_size, config.grid_size), rngs=rngs, param_dtype=dtype)
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
        # Built last, so that DiT's own weights draw the same numbers with the option on or off.
        if config.image_prompt_tokens:
            self.image_attention_norm = norm()
            self.image_attention = DecoupledCrossAttention(width, heads, scale=config.image_prompt_scale,
                                                           zero_out=True, rngs=rngs, param_dtype=dtype)
        else:
            self.image_attention_norm = self.image_attention = None

    def __call__(self, x: jax.Array, c: jax.Array, context: jax.Array | None = None,
                 image_tokens: jax.Array | None = None, image_prompt_scale=None) -> jax.Array:
        """x [B, T, D], c [B, D] -> [B, T, D]; with image prompts also the text context [B, S, D] and the image
        tokens [B, M, D] (λ = image_prompt_scale, default the config's)."""
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = x + gate_attn[:, None, :] * self.attention(modulate(self.attention_norm(x), shift_attn, scale_attn))
        if self.image_attention is not None:
            x = x + self.image_attention(self.image_attention_norm(x), context, image_tokens,
                                         scale=image_prompt_scale)
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
        dtype = PARAM_DTYPES[config.param_dtype]
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, config.width, rngs=rngs,
                                      param_dtype=dtype)
        self.timestep_embedder = TimestepEmbedder(config.width, rngs=rngs, param_dtype=dtype)
        self.label_embedder = LabelEmbedder(config.num_classes, config.width, dropout_prob=config.class_dropout_prob,
                                            rngs=rngs, param_dtype=dtype)
        self.blocks = nnx.List([DiTBlock(config, rngs=rngs, layer=index) for index in range(config.depth)])
        self.final_layer = FinalLayer(config, rngs=rngs)
        self.image_proj = (ImageProjModel(config.image_prompt_dim, config.width, config.image_prompt_tokens,
                                          rngs=rngs, param_dtype=dtype) if config.image_prompt_tokens else None)

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
                 image_prompt_scale=None):
        """Returns the output [B, H, W, out_channels]; with return_intermediates, (output, dict) where the dict
        holds "conditioning" [B, D], "tokens" (after the position embedding) and "block_{i}" [B, T, D].

        image_embeds [B, image_prompt_dim]: required when the config has image prompts (zeros: none), refused
        otherwise. image_prompt_scale: λ for this call (a number or a traced scalar), default the config's."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"DiT expects images [B, H, W, {self.in_channels}], got {x.shape}")
        if (self.image_proj is None) != (image_embeds is None):
            raise ValueError("DiT: image_embeds given, but the model has no image prompt (DiTConfig."
                             "image_prompt_tokens=0)" if image_embeds is not None else
                             "DiT: this model has image prompts (DiTConfig.image_prompt_tokens > 0); pass "
                             "image_embeds [B, image_prompt_dim] (zeros for no image prompt)")
        c = self.conditioning(t, y, train=train, rng=rng, force_drop_ids=force_drop_ids)
        context = image_tokens = None
        if self.image_proj is not None:  # the same rng drops the same labels as in c
            context = self._label_embedding(y, train=train, rng=rng, force_drop_ids=force_drop_ids)[:, None, :]
            image_tokens = self.image_proj(image_embeds)
        tokens = self.patch_embed(x) + self.position_embedding().astype(x.dtype)
        intermediates = {"conditioning": c, "tokens": tokens}
        for index, block in enumerate(self.blocks):
            tokens = block(tokens, c, context, image_tokens, image_prompt_scale)
            intermediates[f"block_{index}"] = tokens
        patches = self.final_layer(tokens, c)
        grid = (self.grid_size, self.grid_size)
        out = unpatchify(patches, self.patch_size, grid, self.out_channels).astype(jnp.float32)
        return (out, intermediates) if return_intermediates else out

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale, *,
                         all_channels: bool = True, image_embeds: jax.Array | None = None,
                         image_prompt_scale=None) -> jax.Array:
        """Classifier-free guided output [B, H, W, out_channels] from one forward pass over 2B examples.

        The batch is run with its labels and with the null class; ε_u + s (ε_c - ε_u) replaces the ε channels (all
        in_channels of them), and the variance channels come from the conditional half. all_channels=False
        reproduces DiT's `forward_with_cfg`, which guides only the first three output channels. With image
        prompts, the unconditional half also gets a zero image embedding (IP-Adapter's uncond `proj(zeros)`).
        """
        batch = x.shape[0]
        image = {}
        if image_embeds is not None:
            image = dict(image_embeds=jnp.concatenate([image_embeds, jnp.zeros_like(image_embeds)]),
                         image_prompt_scale=image_prompt_scale)
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

"""Decoder-only language model in the Llama style (Touvron et al., 2023, "LLaMA", arXiv 2302.13971, §2.2):
RMSNorm pre-normalisation, rotary positions, SwiGLU, grouped-query attention, tied or untied embeddings, optional
QK-norm, and a KV cache for `models.sampling.generate`.

`LLMConfig` is a frozen dataclass validated on construction; `LLM(config, rngs=...)` builds the NNX module. The
attention mixer is chosen by name (`LLMConfig.attention`, default "softmax") so that any registered causal
mechanism drops in with one gin line, e.g. `llm.LLMConfig.attention = 'lightning'` (ARCHITECTURE §5).

Presets (`llm_config(name)`; parameter counts are exact, tested):

| preset | vocab | width | depth | heads / kv | MLP | tied | params | shape from |
|---|---|---|---|---|---|---|---|---|
| tiny | 256 | 128 | 4 | 4 / 2 | 384 | yes | 0.82M | bytes; trains in minutes on CPU |
| 125m | 50304 | 768 | 12 | 12 / 12 | 2048 | yes | 123.6M | GPT-3 Small (Brown et al., 2020, Table 2.1) |
| 350m | 50304 | 1024 | 24 | 16 / 16 | 2752 | yes | 355.1M | GPT-3 Medium (same table) |
| 1b | 128256 | 2048 | 16 | 32 / 8 | 8192 | yes | 1235.8M | Llama 3.2 1B (Meta, 2024) |

125m and 350m keep GPT-3's width, depth and heads with the Llama block (SwiGLU at 8/3 width rounded up to 64) and
GPT-2's vocabulary padded to a multiple of 64. 1b is Llama 3.2 1B's shape (rope theta 500k, eps 1e-5) without its
long-context RoPE rescaling.
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import PARAM_DTYPES, check_param_dtype
from models.layers.attention import Attention, KVCache, check_attention_choice
from models.layers.embed import Embed
from models.layers.mlp import SwiGLU
from models.layers.norm import RMSNorm



@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Shape and options of an `LLM`. Fields default to the `tiny` preset's byte-level model.

    head_dim / mlp_width default (0) to width // num_heads and the Llama rule 8/3 * width rounded up to 64.
    qk_head_dim (0 = head_dim) sizes query/key heads apart from value heads (Based's small feature dimension);
    use_mlp=False drops the feed-forward blocks (Zoology's attention-only MQAR models).
    """

    vocab_size: int = 256
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0
    mlp_width: int = 0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qk_norm: bool = False
    qk_head_dim: int = 0
    use_mlp: bool = True
    attention: str = "softmax"
    attention_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    param_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.qk_head_dim, int) or self.qk_head_dim < 0:
            raise ValueError(f"LLMConfig.qk_head_dim must be an int >= 0 (0 = head_dim), got {self.qk_head_dim!r}")
        for name in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LLMConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LLMConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.head_dim and self.width % self.num_heads:
            raise ValueError(
                f"LLMConfig.width={self.width} is not divisible by num_heads={self.num_heads}; set head_dim")
        check_param_dtype("LLMConfig", self.param_dtype)
        check_attention_choice("LLMConfig", self.attention, self.attention_kwargs, causal=True)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads

    @property
    def resolved_mlp_width(self) -> int:
        if self.mlp_width:
            return self.mlp_width
        return -(-(8 * self.width // 3) // 64) * 64


PRESETS: dict[str, LLMConfig] = {
    # Byte-level model small enough to train in minutes on a laptop CPU (the quickstart).
    "tiny": LLMConfig(),
    # The fixed shape of bench/train_step.py (vocab 256, width 256, 4 layers, 4 heads).
    "bench": LLMConfig(width=256, depth=4, num_heads=4, num_kv_heads=4, mlp_width=768, tie_embeddings=False),
    "125m": LLMConfig(vocab_size=50304, width=768, depth=12, num_heads=12, num_kv_heads=12),
    "350m": LLMConfig(vocab_size=50304, width=1024, depth=24, num_heads=16, num_kv_heads=16),
    "1b": LLMConfig(vocab_size=128256, width=2048, depth=16, num_heads=32, num_kv_heads=8, mlp_width=8192,
                    rope_theta=500_000.0, norm_eps=1e-5),
}


def llm_config(preset: str = "tiny", **overrides: Any) -> LLMConfig:
    """Returns the named preset with `overrides` applied, e.g. `llm_config("tiny", depth=2)`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown LLM preset {preset!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        dtype = PARAM_DTYPES[config.param_dtype]
        self.attention_norm = RMSNorm(config.width, eps=config.norm_eps, param_dtype=dtype)
        self.attention = Attention(
            config.width,
            config.num_heads,
            config.num_kv_heads,
            config.resolved_head_dim,
            kind=config.attention,
            kind_kwargs=config.attention_kwargs,
            causal=True,
            rope_theta=config.rope_theta,
            qk_norm=config.qk_norm,
            qk_head_dim=config.qk_head_dim or None,
            rngs=rngs,
            param_dtype=dtype,
        )
        self.mlp_norm = RMSNorm(config.width, eps=config.norm_eps, param_dtype=dtype) if config.use_mlp else None
        self.mlp = SwiGLU(config.width, config.resolved_mlp_width, rngs=rngs, param_dtype=dtype) \
            if config.use_mlp else None

    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), positions)
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

    def decode(self, x: jax.Array, cache: KVCache, cache_index: jax.Array) -> tuple[jax.Array, KVCache]:
        mixed, cache = self.attention.decode(self.attention_norm(x), cache, cache_index)
        x = x + mixed
        return (x if self.mlp is None else x + self.mlp(self.mlp_norm(x))), cache


class LLM(nnx.Module):
    """Token ids [B, T] -> next-token logits [B, T, vocab] (float32)."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        self.tie_embeddings = config.tie_embeddings  # not the config itself: its dict field is unhashable
        dtype = PARAM_DTYPES[config.param_dtype]
        self.embed = Embed(config.vocab_size, config.width, rngs=rngs, param_dtype=dtype)
        self.blocks = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.final_norm = RMSNorm(config.width, eps=config.norm_eps, param_dtype=dtype)
        if not config.tie_embeddings:
            init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            self.unembed_dv = nnx.Param(init(rngs.params(), (config.width, config.vocab_size), dtype))

    def __call__(self, token_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        return self.logits(self.features(token_ids, positions))

    def features(self, token_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """The last block's output [B, T, D] before the final norm: `logits(features(t)) == model(t)`. Tasks that
        score a few positions (MQAR) gather those rows first and skip the vocabulary projection of the rest."""
        x = self.embed(token_ids)
        for block in self.blocks:
            x = block(x, positions)
        return x

    def init_cache(self, batch_size: int, length: int) -> list[KVCache]:
        """An empty KV cache of `length` positions per layer, in the parameters' dtype."""
        dtype = self.embed.embedding_vd.dtype
        return [block.attention.init_cache(batch_size, length, dtype) for block in self.blocks]

    def decode(self, token_ids: jax.Array, cache: list[KVCache], cache_index: jax.Array
               ) -> tuple[jax.Array, list[KVCache]]:
        """Logits [B, T, vocab] of the tokens at positions cache_index .. cache_index + T - 1, given the cache of
        everything before them; returns the cache with these tokens added. Equal to the matching rows of
        `__call__` on the whole sequence (tested)."""
        x = self.embed(token_ids)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block.decode(x, layer_cache, cache_index)
            new_cache.append(layer_cache)
        return self.logits(x), new_cache

    def logits(self, x: jax.Array) -> jax.Array:
        """Features [..., D] -> next-token logits [..., vocab] (float32)."""
        x = self.final_norm(x)
        if self.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("...d,dv->...v", x, self.unembed_dv[...])
        return logits.astype(jnp.float32)

"""IP-Adapter's weights as NNX modules (Ye et al., 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for
Text-to-Image Diffusion Models", arXiv 2308.06721, §3.2; official code tencent-ailab/IP-Adapter
`ip_adapter/ip_adapter.py` (`ImageProjModel`) and `ip_adapter/attention_processor.py` (`IPAttnProcessor`)).

- `ImageProjModel`: a global image embedding [B, E] (CLIP's in the paper) -> Linear(E, M * C) -> reshape to M
  tokens -> LayerNorm(C): M "image prompt" tokens in the width C of the text context.
- `DecoupledCrossAttention`: a cross-attention layer whose queries come from the latent tokens and whose keys and
  values come from two streams: the text context through to_k / to_v and the image tokens through the new,
  bias-free to_k_ip / to_v_ip, attended separately and added with weight lambda (`attnx` mechanism `ip_adapter`,
  attnx/ops/cross/multi_stream.py) before to_out. As in the code, to_k_ip / to_v_ip start as copies of to_k / to_v
  when the two contexts have the same width.

In the DiT (models/dit.py, `DiTConfig.image_prompt_tokens`), the class-conditional model has no text encoder; the
base stream is its label embedding as a one-token context (the null class when labels are dropped), and the output
projection starts at zero so that the block stays the identity at initialisation (adaLN-Zero, DiT §3.2); the
paper's UNet instead starts from a pretrained text cross-attention and zero is not needed there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.cross.multi_stream import ip_adapter_attention
from models.layers.norm import LayerNorm

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by ImageProjModel


class ImageProjModel(nnx.Module):
    """image_embeds [B, E] -> image prompt tokens [B, M, C] (Linear with bias, reshape, LayerNorm with gain/bias)."""

    def __init__(self, embed_dim: int, context_dim: int, num_tokens: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        for name, value in (("embed_dim", embed_dim), ("context_dim", context_dim), ("num_tokens", num_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImageProjModel.{name} must be a positive int, got {value!r}")
        self.num_tokens = num_tokens
        self.context_dim = context_dim
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.proj_em = nnx.Param(init(rngs.params(), (embed_dim, num_tokens * context_dim), param_dtype))
        self.proj_bias_m = nnx.Param(jnp.zeros((num_tokens * context_dim,), param_dtype))
        self.norm = LayerNorm(context_dim, eps=LAYER_NORM_EPS, param_dtype=param_dtype)

    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        if image_embeds.ndim != 2 or image_embeds.shape[-1] != self.proj_em.shape[0]:
            raise ValueError(f"ImageProjModel expects image_embeds [B, {self.proj_em.shape[0]}], got "
                             f"{image_embeds.shape}")
        tokens = image_embeds @ self.proj_em[...] + self.proj_bias_m[...]
        return self.norm(tokens.reshape(image_embeds.shape[0], self.num_tokens, self.context_dim))


class DecoupledCrossAttention(nnx.Module):
    """x [B, T, D], text context [B, S, C], image tokens [B, M, C_i] -> [B, T, D]:
    to_out(Attn(q, to_k(text), to_v(text)) + lambda * Attn(q, to_k_ip(image), to_v_ip(image))).

    scale: lambda (`image_prompt_scale`), overridable per call. zero_out: start to_out at zero (identity residual
    branch). use_bias: biases on to_q / to_k / to_v / to_out (DiT style); to_k_ip / to_v_ip never have one, as in
    the code.
    """

    def __init__(self, width: int, num_heads: int, *, context_dim: int | None = None, image_dim: int | None = None,
                 scale: float = 1.0, use_bias: bool = True, zero_out: bool = True, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        if width % num_heads:
            raise ValueError(f"DecoupledCrossAttention: width={width} is not divisible by num_heads={num_heads}")
        context_dim = width if context_dim is None else context_dim
        image_dim = context_dim if image_dim is None else image_dim
        self.kind = "ip_adapter"  # the registry name of the mechanism (configs test, model summaries)
        self.scale = float(scale)
        head_dim = width // num_heads
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        param = lambda fan_in: nnx.Param(init(rngs.params(), (fan_in, num_heads, head_dim), param_dtype))
        self.query_dnh = param(width)
        self.key_cnh = param(context_dim)
        self.value_cnh = param(context_dim)
        if image_dim == context_dim:  # the code initialises to_k_ip / to_v_ip from to_k / to_v
            self.image_key_cnh = nnx.Param(self.key_cnh[...])
            self.image_value_cnh = nnx.Param(self.value_cnh[...])
        else:
            self.image_key_cnh, self.image_value_cnh = param(image_dim), param(image_dim)
        out_init = nnx.initializers.zeros if zero_out else nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        self.out_nhd = nnx.Param(out_init(rngs.params(), (num_heads, head_dim, width), param_dtype))
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype)) if use_bias else None
        self.query_bias_nh, self.key_bias_nh = zeros(num_heads, head_dim), zeros(num_heads, head_dim)
        self.value_bias_nh, self.out_bias_d = zeros(num_heads, head_dim), zeros(width)

    def _bias(self, x, bias):
        return x if bias is None else x + bias[...]

    def __call__(self, x: jax.Array, context: jax.Array, image_tokens: jax.Array, *,
                 scale: float | jax.Array | None = None) -> jax.Array:
        query = self._bias(jnp.einsum("btd,dnh->btnh", x, self.query_dnh[...]), self.query_bias_nh)
        key = self._bias(jnp.einsum("bsc,cnh->bsnh", context, self.key_cnh[...]), self.key_bias_nh)
        value = self._bias(jnp.einsum("bsc,cnh->bsnh", context, self.value_cnh[...]), self.value_bias_nh)
        image_key = jnp.einsum("bmc,cnh->bmnh", image_tokens, self.image_key_cnh[...])
        image_value = jnp.einsum("bmc,cnh->bmnh", image_tokens, self.image_value_cnh[...])
        mixed = ip_adapter_attention(query, key, value, image_key=image_key, image_value=image_value,
                                     scale=self.scale if scale is None else scale)
        return self._bias(jnp.einsum("btnh,nhd->btd", mixed, self.out_nhd[...]), self.out_bias_d)

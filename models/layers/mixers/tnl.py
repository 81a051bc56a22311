"""The TransNormerLLM token mixer: gated, normalised Lightning attention with per-layer decay.

Qin, Li, Sun, Sun, Shen, Han, Wei, Lv, Luo, Qiao, Zhong, 2023, "TransNormerLLM: A Faster and Better Large Language
Model with Improved TransNormer", arXiv 2307.14995, §3.1-3.3 (LRPE-d decay, gated linear attention, SRMSNorm), with
Lightning Attention-2 as its core (Qin et al., 2024, "Various Lengths, Constant Speed: Efficient Language Modeling
with Lightning Attention", arXiv 2405.17381). Follows the official module OpenNLPLab/lightning-attention
`examples/module/tnl_attn.py` and its slopes (`utils/utils.py`, `_build_slope_tensor`):

    q, k, v = SiLU(x W_q), SiLU(x W_k), SiLU(x W_v)                 no rotary positions, no 1/sqrt(H) scale
    o       = lightning(q, k, v)  causal, decay exp(-s_h (t - j)),  s_h = alibi_h * (1 - l / (L - 1) + 1e-5)
    y       = (SRMSNorm(o) * sigmoid(x W_1 W_2)) W_o                W_1: D -> H (rank = head_dim), W_2: H -> N H

SRMSNorm is RMS normalisation without a gain (TransNormerLLM §3.3; `SimpleRMSNorm` in the official code), over the
concatenated heads as in the code. The example module defaults to a LayerNorm there; TransNormerLLM's models and the
spec use SRMSNorm, which is what this layer does.

Departures, each deliberate: key/value projections may have fewer heads than queries (GQA, `num_kv_heads`; equal
counts give the official MHA module exactly); the block around this mixer is the LLM's (RMSNorm + SwiGLU), not
TNL's SGLU channel mixer, so that `LLMConfig.layer_attention = ('tnl',)` swaps the token mixer only.

Decoding keeps Lightning's recurrent state, one [H, V] matrix per head (`init_cache` / `decode`), instead of a KV
cache: the prefill of T tokens adds their intra-chunk part (the tiled function) to the queries' view of the carried
state, and the state advances by T steps. The result equals the matching rows of the full forward (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.linear.decay import alibi_slopes, tnl_slopes
from attnx.ops.linear.lightning import lightning_attention

SLOPE_SCHEDULES = ("tnl", "alibi")


def check_slopes(owner: str, slopes: Any, num_heads: int | None = None) -> None:
    """`slopes` of a lightning-type layer: 'tnl' (per-layer schedule), 'alibi' (the same ALiBi slopes in every
    layer), None (the function's default, ALiBi) or one non-negative float per query head."""
    if slopes is None or (isinstance(slopes, str) and slopes in SLOPE_SCHEDULES):
        return
    if isinstance(slopes, str) or not isinstance(slopes, Sequence) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0 for s in slopes):
        raise ValueError(f"{owner}.slopes={slopes!r}: expected one of {SLOPE_SCHEDULES}, None, or a sequence of "
                         f"floats >= 0 (one decay rate per query head)")
    if num_heads is not None and len(slopes) != num_heads:
        raise ValueError(f"{owner}.slopes has {len(slopes)} rates; the layer has num_heads={num_heads}")


def resolve_slopes(slopes: Any, num_heads: int, layer_index: int, num_layers: int) -> tuple[float, ...] | None:
    """The per-head decay rates of layer `layer_index` of `num_layers` as a tuple of floats (hashable, so it can sit
    in a module's static attributes), or None for the attention function's default. 'tnl' is TransNormerLLM's
    s_h * (1 - l / (L - 1) + 1e-5): fast decay in the first layer, almost none in the last."""
    check_slopes("tnl", slopes, num_heads)
    if slopes is None:
        return None
    if slopes == "tnl":
        return tuple(float(s) for s in tnl_slopes(num_heads, layer_index, num_layers))
    if slopes == "alibi":
        return tuple(float(s) for s in alibi_slopes(num_heads))
    return tuple(float(s) for s in slopes)


def simple_rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """SRMSNorm: x / RMS(x) over the last axis, no learned gain (statistics in float32)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


class TNLMixer(nnx.Module):
    """x [B, T, D] -> [B, T, D]: TransNormerLLM's gated linear attention for layer `layer_index` of `num_layers`.

    slopes: 'tnl' (default; the per-layer schedule), 'alibi', or N explicit rates. block_size: Lightning's tile.
    """

    kind = "tnl"  # its name in LLMConfig.layer_attention; read like Attention.kind (e.g. by the config tests)

    @staticmethod
    def check_options(options: Mapping[str, Any], num_heads: int | None = None) -> None:
        unknown = set(options) - {"slopes", "block_size"}
        if unknown:
            raise ValueError(f"tnl: unknown options {sorted(unknown)}; allowed: ['block_size', 'slopes']")
        check_slopes("tnl", options.get("slopes", "tnl"), num_heads)
        block_size = options.get("block_size", 64)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"tnl.block_size must be an int >= 1, got {block_size!r}")

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, *, layer_index: int,
                 num_layers: int, slopes: Any = "tnl", block_size: int = 64, norm_eps: float = 1e-6,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.check_options({"slopes": slopes, "block_size": block_size}, num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"tnl: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.slopes = resolve_slopes(slopes, num_heads, layer_index, num_layers)
        self.block_size = block_size
        self.norm_eps = norm_eps
        in_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        dense = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        param = lambda init, shape: nnx.Param(init(rngs.params(), shape, param_dtype))
        self.query_dnh = param(in_init, (width, num_heads, head_dim))
        self.key_dkh = param(in_init, (width, num_kv_heads, head_dim))
        self.value_dkh = param(in_init, (width, num_kv_heads, head_dim))
        # The output gate's low-rank pair (rank = head_dim, as in the official module).
        self.gate_down_dr = param(dense, (width, head_dim))
        self.gate_up_rnh = param(in_init, (head_dim, num_heads, head_dim))
        self.out_nhd = param(out_init, (num_heads, head_dim, width))

    def heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> SiLU-activated query [B, T, N, H], key [B, T, K, H], value [B, T, K, H]."""
        query = jnp.einsum("btd,dnh->btnh", x, self.query_dnh[...])
        key = jnp.einsum("btd,dkh->btkh", x, self.key_dkh[...])
        value = jnp.einsum("btd,dkh->btkh", x, self.value_dkh[...])
        return jax.nn.silu(query), jax.nn.silu(key), jax.nn.silu(value)

    def gate(self, x: jax.Array) -> jax.Array:
        """sigmoid(x W_1 W_2): [B, T, N, H]."""
        low = jnp.einsum("btd,dr->btr", x, self.gate_down_dr[...])
        return jax.nn.sigmoid(jnp.einsum("btr,rnh->btnh", low, self.gate_up_rnh[...]))

    def output(self, x: jax.Array, mixed: jax.Array) -> jax.Array:
        """Normalise the heads' output [B, T, N, H] over all heads together, gate it, project back to [B, T, D]."""
        B, T, N, H = mixed.shape
        normed = simple_rms_norm(mixed.reshape(B, T, N * H), self.norm_eps).reshape(B, T, N, H)
        return jnp.einsum("btnh,nhd->btd", normed * self.gate(x).astype(normed.dtype), self.out_nhd[...])

    def _slopes(self, num_heads: int) -> jax.Array:
        return jnp.asarray(self.slopes if self.slopes is not None else alibi_slopes(num_heads), jnp.float32)

    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; `positions` is accepted for the layer interface and unused (the decay is
        relative; TNL has no rotary positions)."""
        del positions
        query, key, value = self.heads(x)
        mixed = lightning_attention(query, key, value, causal=True, slopes=self._slopes(query.shape[2]),
                                    block_size=self.block_size)
        return self.output(x, mixed)

    # ---- Decoding with Lightning's recurrent state ----

    def init_cache(self, batch_size: int, length: int, dtype=jnp.float32) -> dict[str, jax.Array]:
        """The empty state {"state": [B, N, H, V]} (float32 whatever `dtype`, like the kernel's accumulator); its size
        does not depend on `length`."""
        del length, dtype
        _, num_heads, head_dim = self.query_dnh.shape
        return {"state": jnp.zeros((batch_size, num_heads, head_dim, self.value_dkh.shape[-1]), jnp.float32)}

    def decode(self, x: jax.Array, cache: dict[str, jax.Array], cache_index: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, T, D]: the tokens right after everything the state has seen (calls must be consecutive, as
        `models.sampling.generate` makes them; `cache_index` is not needed). Returns (out [B, T, D], new cache)."""
        del cache_index
        query, key, value = self.heads(x)
        B, T, N, H = query.shape
        s = self._slopes(N)
        intra = lightning_attention(query, key, value, causal=True, slopes=s, block_size=self.block_size)
        state = cache["state"]
        steps = jnp.arange(T, dtype=jnp.float32)
        # Query t (0-based in this call) sees the carried state decayed by t + 1 steps.
        carried = jnp.einsum("btnh,bnhv,tn->btnv", query.astype(jnp.float32), state,
                             jnp.exp(-(steps[:, None] + 1.0) * s))
        mixed = intra.astype(jnp.float32) + carried
        group = N // key.shape[2]
        k = jnp.repeat(key.astype(jnp.float32), group, axis=2)
        v = jnp.repeat(value.astype(jnp.float32), group, axis=2)
        # Key t reaches the end of the call decayed by T - 1 - t steps; the old state by T steps.
        state = jnp.exp(-T * s)[:, None, None] * state + jnp.einsum(
            "btnh,btnv,tn->bnhv", k, v, jnp.exp(-(T - 1.0 - steps)[:, None] * s))
        return self.output(x, mixed.astype(query.dtype)), {"state": state}

"""Lightning Attention-2: causal linear attention with a per-head exponential decay, computed in tiles.

Qin, Sun, Li, Shen, Sun, Zhong, 2024, "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning
Attention", arXiv 2405.17381 (§3.1 the decayed form, Algorithm 1/2 the tiled forward/backward), and Lightning
Attention-2 as used by TransNormerLLM (Qin et al., 2023, arXiv 2307.14995). Official code:
OpenNLPLab/lightning-attention (`lightning_attn/ops/triton/lightning_attn2.py`, `utils/utils.py`).

    o_t = sum_{j <= t} exp(-s_h (t - j)) (q_t . k_j) v_j

No softmax, no normaliser, no 1/sqrt(H) scale (as in the code: models normalise the output instead, e.g.
TransNormerLLM's SRMSNorm). Default slopes s_h are ALiBi's for N heads (`decay.alibi_slopes`); s = 0 is plain causal
linear attention (Katharopoulos et al., 2020).

Patterns CS and NS. The paper and code are causal; for non-causal self attention (NS, which the catalogue asks for)
the decay is symmetric, exp(-s_h |t - j|), the bidirectional analogue, computed as a forward scan plus a scan over
the reversed sequence minus the diagonal counted twice.

Three ways to run it, all tested against the quadratic reference:
    lightning_attention(...)           the whole sequence (implementation "chunked" by default, or "reference")
    lightning_decode_step(state, ...)  the recurrent form, one token per call, O(H V) per head
    lightning_decode(...)              the registry's KV-cache decode rule (exact; O(L) per token)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnx.ops.linear.chunked import lightning_chunked
from attnx.ops.linear.common import check_block_size, resolve_implementation
from attnx.ops.linear.decay import alibi_slopes
from attnx.ops.linear.pallas_gpu import run_scan, scan_config
from attnx.ops.linear.reference import decayed_linear_attention, lightning_reference
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("chunked", "reference", "pallas_gpu", "pallas_tpu")


def _slopes(slopes, num_heads: int) -> jax.Array:
    if slopes is None:
        return jnp.asarray(alibi_slopes(num_heads))
    s = jnp.asarray(slopes)
    if s.shape != (num_heads,) or not jnp.issubdtype(s.dtype, jnp.floating):
        raise ValueError(f"lightning.slopes: expected a float array of shape [N] = ({num_heads},) (one decay rate "
                         f"per query head), got {s.dtype}{list(s.shape)}")
    if not isinstance(s, jax.core.Tracer) and bool(jnp.any(s < 0)):
        raise ValueError(f"lightning.slopes: decay rates must be >= 0 (lambda = exp(-s) <= 1), got {np.asarray(s)}")
    return s


def lightning_attention(query, key, value, *, causal: bool = True, slopes=None, block_size: int = 64,
                        implementation: str | None = None):
    """query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V] -> [*B, T, N, V]; K divides N (GQA).

    slopes: [N] decay rates (default: ALiBi slopes for N heads). block_size: the tile C of the chunked form.
    implementation: "chunked" (default), "reference", or the Lightning Attention-2 Pallas kernels "pallas_gpu" / a
    `LinearScanPallas` (Triton) and "pallas_tpu" / a `LinearScanPallasTpu` (Mosaic; block_size a multiple of 128).
    causal=False: symmetric decay (see the module docstring).
    """
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    S = args.k.shape[1]
    if S != T:
        raise ValueError(f"lightning: self attention only, got query length {T} and key length {S}")
    check_block_size("lightning", block_size)
    config = scan_config("lightning", implementation, block_size)
    implementation = resolve_implementation("lightning", config.name if config else implementation, IMPLEMENTATIONS)
    s = _slopes(slopes, N)
    scan = lightning_chunked
    if config is not None:
        scan = lambda q, k, v, slopes, block_size: run_scan(q, k, v, slopes, config)
    if implementation == "reference":
        out = lightning_reference(args.q, args.k, args.v, s, causal).astype(args.q.dtype)
    elif causal:
        out = scan(args.q, args.k, args.v, s, block_size)
    else:
        out = _bidirectional(args.q, args.k, args.v, s, block_size, scan)
    return out.reshape(args.batch_shape + out.shape[1:])


def _bidirectional(q, k, v, slopes, block_size, scan=lightning_chunked):
    """sum_j exp(-s |t - j|) (q_t . k_j) v_j = forward scan + backward scan - the diagonal (counted by both)."""
    forward = scan(q, k, v, slopes, block_size).astype(jnp.float32)
    flip = lambda x: jnp.flip(x, axis=1)
    backward = flip(scan(flip(q), flip(k), flip(v), slopes, block_size).astype(jnp.float32))
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    diagonal = jnp.einsum("btkgh,btkh,btkv->btkgv", qg, k.astype(jnp.float32), v.astype(jnp.float32))
    return (forward + backward - diagonal.reshape(B, T, N, -1)).astype(q.dtype)


def lightning_reference_fn(query, key, value, *, causal: bool = True, slopes=None, block_size: int = 64):
    return lightning_attention(query, key, value, causal=causal, slopes=slopes, block_size=block_size,
                               implementation="reference")


def lightning_init_state(batch_shape: tuple[int, ...], num_heads: int, head_dim: int, value_dim: int) -> jax.Array:
    """The empty recurrent state [*B, N, H, V] (float32): sum over the past of decayed k v^T."""
    return jnp.zeros((*batch_shape, num_heads, head_dim, value_dim), jnp.float32)


def lightning_decode_step(state, query, key, value, *, slopes=None):
    """One token of the recurrent form: state <- lambda state + k v^T, o = q state.

    state [*B, N, H, V] float32, query [*B, N, H], key [*B, K, H], value [*B, K, V] -> (out [*B, N, V], state).
    """
    num_heads, num_kv_heads = query.shape[-2], key.shape[-2]
    if num_heads % num_kv_heads or state.shape[-3:] != (num_heads, query.shape[-1], value.shape[-1]):
        raise ValueError(f"lightning_decode_step: state {state.shape}, query {query.shape}, key {key.shape}, "
                         f"value {value.shape} do not fit [*B, N, H, V] / [*B, N, H] / [*B, K, H] / [*B, K, V]")
    s = _slopes(slopes, num_heads)
    group = num_heads // num_kv_heads
    k = jnp.repeat(key.astype(jnp.float32), group, axis=-2)  # one token: repeating is cheaper than regrouping
    v = jnp.repeat(value.astype(jnp.float32), group, axis=-2)
    state = jnp.exp(-s)[:, None, None] * state + k[..., :, None] * v[..., None, :]
    out = jnp.einsum("...nh,...nhv->...nv", query.astype(jnp.float32), state)
    return out.astype(query.dtype), state


def lightning_decode(query, key_cache, value_cache, *, query_positions, slopes=None, block_size: int = 64):
    """The registry decode rule: queries at absolute `query_positions` [T] over a cache whose slot j holds
    position j (slots after the query are ignored). query [B, T, N, H], caches [B, L, K, H] / [B, L, K, V]."""
    del block_size  # a model's attention_kwargs are shared with the full-sequence call
    s = _slopes(slopes, query.shape[-2])
    out = decayed_linear_attention(query, key_cache, value_cache, s, jnp.asarray(query_positions),
                                   jnp.arange(key_cache.shape[1]))
    return out.astype(query.dtype)

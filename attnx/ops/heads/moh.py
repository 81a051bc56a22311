"""MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin, Zhu, Yan, Yuan, 2024, arXiv 2410.11842, §3.2).

Heads are experts: the first `n_shared` heads are always on, the other E = N - n_shared are routed with top-k per
token, and each head's output is scaled by its gate before the output projection:

    out = W_O concat_h(g_h o_h)

Gates follow the official code (SkyworkAI/MoH, `MoH-DiT/models.py` `MoHAttention`), which differs from the paper's
equation by the factors k, n_shared and 2 below; they make uniform gates equal 1, so MoH starts out as plain MHA:

    routed   p = softmax(W_r x) in R^E,  m = onehot(top_k(p)),  g_r = k (p ⊙ m) / max(sum(p ⊙ m), eps)
    shared   g_s = n_shared softmax(W_s x)            (1 when n_shared == 1)
    mixing   [a1, a2] = 2 softmax(W_h x),  g = [a1 g_s, a2 g_r]   (when both kinds exist; with k = 0 only g_s)
    balance  L_b = E sum_i f_i P_i,  f_i = share of tokens routing to i, P_i = mean routed probability of i

The trainer adds 0.01 x the mean of L_b over layers to the task loss (§3.3). `moh_param_free_gates` is the
inference-only LLaMA3 variant of the repo (`MoH-LLaMA3/Inference_code/modeling_llama.py`): routed logits are query
norms standardised across routed heads, and gates are binary.

Gates act on head outputs only, so `apply_head_gates` works with any attention core; every head's keys and values
are still computed (the reference masks rather than skips).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-6  # the official code's floor on the routed gate normaliser


def _check_counts(num_heads: int, n_shared: int, top_k: int) -> None:
    routed = num_heads - n_shared
    if not 0 <= n_shared <= num_heads:
        raise ValueError(f"moh.n_shared: expected 0 <= n_shared <= num_heads={num_heads}, got {n_shared}")
    if not 0 <= top_k <= routed:
        raise ValueError(f"moh.top_k: expected 0 <= top_k <= {routed} routed heads (num_heads {num_heads} - "
                         f"n_shared {n_shared}), got {top_k}")
    if n_shared == 0 and top_k == 0:
        raise ValueError("moh: n_shared=0 and top_k=0 switch every head off; set at least one of them")


def _top_k_mask(probabilities: jax.Array, top_k: int) -> jax.Array:
    _, chosen = jax.lax.top_k(probabilities, top_k)
    return jnp.sum(jax.nn.one_hot(chosen, probabilities.shape[-1], dtype=probabilities.dtype), axis=-2)


def moh_gates(x, routed_weight=None, shared_weight=None, mix_weight=None, *, num_heads: int, n_shared: int,
              top_k: int):
    """Per-token head gates.

    x [*B, T, D]; routed_weight [D, E], shared_weight [D, n_shared], mix_weight [D, 2] (each None when its
    router does not exist: E = 0 / top_k = 0, n_shared <= 1, or not both kinds).
    Returns (gates [*B, T, num_heads] float32, {"balance_loss": scalar, "routed_mask": [*B, T, E]}).
    """
    _check_counts(num_heads, n_shared, top_k)
    x = x.astype(jnp.float32)
    routed = num_heads - n_shared
    batch = x.shape[:-1]
    aux = {"balance_loss": jnp.zeros((), jnp.float32), "routed_mask": jnp.zeros((*batch, routed), jnp.float32)}

    shared_gates = jnp.ones((*batch, n_shared), jnp.float32)
    if n_shared > 1:
        shared_gates = n_shared * jax.nn.softmax(x @ shared_weight.astype(jnp.float32), axis=-1)
    if top_k == 0:  # only the shared heads run; any routed heads stay off
        return jnp.concatenate([shared_gates, jnp.zeros((*batch, routed), jnp.float32)], -1), aux

    probabilities = jax.nn.softmax(x @ routed_weight.astype(jnp.float32), axis=-1)  # [*B, T, E]
    mask = _top_k_mask(probabilities, top_k)
    kept = probabilities * mask
    routed_gates = top_k * kept / jnp.maximum(jnp.sum(kept, -1, keepdims=True), EPS)
    token_axes = tuple(range(mask.ndim - 1))
    aux = {"balance_loss": routed * jnp.sum(jnp.mean(mask, token_axes) * jnp.mean(probabilities, token_axes)),
           "routed_mask": mask}
    if n_shared == 0:
        return routed_gates, aux
    mix = 2.0 * jax.nn.softmax(x @ mix_weight.astype(jnp.float32), axis=-1)  # [*B, T, 2]
    return jnp.concatenate([mix[..., :1] * shared_gates, mix[..., 1:] * routed_gates], -1), aux


def moh_param_free_gates(query, *, n_shared: int, top_k: int):
    """Binary gates [*B, T, N] from the queries [*B, T, N, H]: shared heads 1; of the routed heads, the top_k whose
    query norm, standardised across routed heads, is largest (softmax is monotone, so it does not change the pick)."""
    num_heads = query.shape[-2]
    _check_counts(num_heads, n_shared, top_k)
    norms = jnp.linalg.norm(query[..., n_shared:, :].astype(jnp.float32), axis=-1)  # [*B, T, E]
    logits = norms / jnp.maximum(jnp.std(norms, axis=-1, keepdims=True), EPS)
    mask = _top_k_mask(jax.nn.softmax(logits, axis=-1), top_k) if top_k else jnp.zeros_like(norms)
    return jnp.concatenate([jnp.ones((*norms.shape[:-1], n_shared), jnp.float32), mask], -1)


def apply_head_gates(out, gates):
    """out [*B, T, N, V] scaled per head by gates [*B, T, N] (before the output projection)."""
    if gates.shape != out.shape[:-1]:
        raise ValueError(f"apply_head_gates: gates {gates.shape} must have the shape of out {out.shape} without "
                         f"its last (value) axis")
    return (out * gates[..., None].astype(out.dtype)).astype(out.dtype)

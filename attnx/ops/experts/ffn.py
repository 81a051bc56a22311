"""BAM's top-k FFN experts (Zhang et al., 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling for
Mixture of Experts", arXiv 2408.08274, §3; spec llm_mechanisms.md §11). No official code was found; the routing
follows Branch-Train-MiX (Sukhbaatar et al., 2024, arXiv 2403.07816, §2.3), whose FFN MoE BAM keeps:

    y = sum_{e in topk(l)} g_e(x) FFN_e(x),   l = W_F x,   g = softmax over the top-k logits (zero elsewhere)

and the load-balancing loss of Switch Transformer (Fedus et al., 2021, arXiv 2101.03961, eq. 4) as BTX uses it:

    balance = E sum_e f_e P_e,   f_e = share of the T.k token-to-expert assignments that go to e,
                                 P_e = mean over tokens of softmax(l)_e

(1 for a uniform router; the caller weights it). Each expert is a SwiGLU (the LLM's MLP), so experts can be
upcycled from dense FFNs; ties in the top-k go to the lower expert index (jax.lax.top_k). `expert_ffn` computes
every expert densely and masks by the gates: numerically the sparse dispatch, without capacity limits or token
dropping (fine for the small models here, E times the FFN compute). BAM's upcycling initialisation from dense
seed models is models/layers/mixers/moa_experts.py `upcycle`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_routing(logits, top_k: int):
    """logits [*B, E] -> (gates [*B, E] float32, balance loss scalar) as in the module docstring."""
    num_experts = logits.shape[-1]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"ffn experts top_k: expected an int in [1, {num_experts}] (the number of experts), "
                         f"got {top_k!r}")
    logits = logits.astype(jnp.float32)
    _, chosen = jax.lax.top_k(logits, top_k)
    selected = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=-2)  # [*B, E] in {0, 1}
    gates = jax.nn.softmax(jnp.where(selected > 0, logits, -jnp.inf), axis=-1)
    token_axes = tuple(range(logits.ndim - 1))
    share = jnp.mean(selected, token_axes) / top_k  # f_e: sums to 1
    probability = jnp.mean(jax.nn.softmax(logits, axis=-1), token_axes)  # P_e
    return gates, num_experts * jnp.sum(share * probability)


def expert_ffn(x, gate_up_ed2f, down_efd, gates):
    """x [*B, D], experts' SwiGLU weights gate_up [E, D, 2, F] and down [E, F, D], gates [*B, E] -> [*B, D]."""
    num_experts = gate_up_ed2f.shape[0]
    if gate_up_ed2f.ndim != 4 or gate_up_ed2f.shape[2] != 2 or down_efd.shape != (
            num_experts, gate_up_ed2f.shape[3], gate_up_ed2f.shape[1]) or gates.shape[-1] != num_experts \
            or x.shape[-1] != gate_up_ed2f.shape[1]:
        raise ValueError(f"expert_ffn: expected x [*B, D], gate_up [E, D, 2, F], down [E, F, D], gates [*B, E], got "
                         f"{x.shape}, {gate_up_ed2f.shape}, {down_efd.shape}, {gates.shape}")
    gate_up = jnp.einsum("...d,edcf->...ecf", x, gate_up_ed2f)
    hidden = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]  # [*B, E, F]
    out = jnp.einsum("...ef,efd->...ed", hidden, down_efd)
    return jnp.einsum("...ed,...e->...d", out, gates.astype(out.dtype))


def expert_ffn_reference(x, gate_up_ed2f, down_efd, gates):
    """A loop over experts, each a plain SwiGLU, weighted by its gate."""
    out = jnp.zeros_like(x)
    for e in range(gate_up_ed2f.shape[0]):
        gate = jax.nn.silu(x @ gate_up_ed2f[e, :, 0]) * (x @ gate_up_ed2f[e, :, 1])
        out = out + gates[..., e:e + 1].astype(x.dtype) * (gate @ down_efd[e])
    return out

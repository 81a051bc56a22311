"""BAM's soft Mixture of Attention experts (Zhang, Gritsch, Gnaneshwar, Guo, Cairuz, Venkitesh, Foerster, Blunsom,
Ruder, Üstün, Locatelli, 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of
Experts", arXiv 2408.08274, §4; §3 for the parallel block; section numbers not checked against the PDF). No official
code was found; this follows the paper as summarised in the spec (llm_mechanisms.md §11).

E attention experts, each with its own heads, are all computed and mixed per token by a soft router:

    y = sum_e r_e(x) Attn_e(x),   r(x) = softmax(W_A x) in R^E      (soft routing: no top-k for attention)

Written as E.N_e heads of one layer, the sum over experts is the output projection of the concatenated heads with
each head scaled by its expert's gate (W_O concat_e(r_e o_e) = sum_e r_e W_O^e o_e), so the gates reuse MoH's
`apply_head_gates` (spec shared building block 5). Heads are expert-major: query head n belongs to expert
n // N_e. Two variants (the abstract's 1) and 2)):

    full       every expert owns Q, K, V, O: the layer has E.N_e query heads and E.K_e key/value heads, and the
               contiguous GQA grouping already sends expert e's queries to expert e's keys/values.
    kv_shared  experts own Q and O only; every expert's N_e query heads attend to the same K key/value heads
               (N_e % K == 0). The heads are regrouped so that the core's GQA grouping does the sharing (no copies).

gates=None mixes the experts uniformly (r_e = 1/E), the router of a fresh upcycled model being random. The router
W_A lives in models/layers/mixers/moa_experts.py. BAM's parallel attention+FFN block, y = x + Attn(LN x) +
FFN(LN x) from one norm, is block-level: `LLMConfig.parallel_block=True` (models/llm.py); its top-k FFN experts
with their balance loss are attnx.ops.experts.ffn (`LLMConfig.ffn_experts`), and the upcycling initialisation from
E dense seeds is models/layers/mixers/moa_experts.py `upcycle`.
"""

from __future__ import annotations

import jax.numpy as jnp

from attnx.ops.heads.moh import apply_head_gates


def check_experts(num_heads: int, num_kv_heads: int, num_experts: int, kv_shared: bool) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"moa_experts.num_experts: expected a positive int, got {num_experts!r}")
    if num_heads % num_experts:
        raise ValueError(f"moa_experts.num_experts: the {num_heads} query heads must split evenly into "
                         f"{num_experts} experts")
    per_expert = num_heads // num_experts
    if kv_shared and per_expert % num_kv_heads:
        raise ValueError(f"moa_experts.kv_shared: each expert's {per_expert} query heads must be a multiple of the "
                         f"{num_kv_heads} shared key/value heads")
    if not kv_shared and num_kv_heads % num_experts:
        raise ValueError(f"moa_experts: with full experts the {num_kv_heads} key/value heads must split evenly into "
                         f"{num_experts} experts (or set kv_shared=True)")


def expert_gates_to_heads(gates, num_heads: int):
    """gates [*B, T, E] -> head gates [*B, T, num_heads], each expert's gate on its N_e contiguous heads."""
    return jnp.repeat(gates, num_heads // gates.shape[-1], axis=-1)


def _to_shared_order(x, num_experts: int, num_kv_heads: int):
    """[*B, T, E.N_e, D] (expert-major) -> [*B, T, N, D] ordered (kv head, group, expert), so the core's contiguous
    GQA grouping (head n -> key/value head n // (N / K)) sends every expert's head g of kv group k to kv head k."""
    *batch, t, n, d = x.shape
    x = x.reshape(*batch, t, num_experts, num_kv_heads, n // num_experts // num_kv_heads, d)
    return jnp.moveaxis(x, -4, -2).reshape(*batch, t, n, d)


def _from_shared_order(x, num_experts: int, num_kv_heads: int):
    *batch, t, n, d = x.shape
    x = x.reshape(*batch, t, num_kv_heads, n // num_experts // num_kv_heads, num_experts, d)
    return jnp.moveaxis(x, -2, -4).reshape(*batch, t, n, d)


def mix_experts(core, query, key, value, *, gates=None, num_experts: int = 2, kv_shared: bool = False):
    """Runs `core(query, key, value)` ([*B,T,N,H], [*B,S,K,H], [*B,S,K,V] -> [*B,T,N,V]) over the E experts' heads
    and scales each head by its expert's gate. gates [*B, T, E] or None (uniform 1/E)."""
    num_heads, num_kv_heads = query.shape[-2], key.shape[-2]
    check_experts(num_heads, num_kv_heads, num_experts, kv_shared)
    if gates is None:
        gates = jnp.full((*query.shape[:-2], num_experts), 1.0 / num_experts, jnp.float32)
    if gates.shape != (*query.shape[:-2], num_experts):
        raise ValueError(f"moa_experts.gates: expected shape {(*query.shape[:-2], num_experts)} ([*B, T, E]), got "
                         f"{gates.shape}")
    if kv_shared:
        out = core(_to_shared_order(query, num_experts, num_kv_heads), key, value)
        out = _from_shared_order(out, num_experts, num_kv_heads)
    else:
        out = core(query, key, value)
    return apply_head_gates(out, expert_gates_to_heads(gates, num_heads))


def mix_experts_reference(core, query, key, value, *, gates=None, num_experts: int = 2, kv_shared: bool = False):
    """The oracle: one core call per expert on its own heads (and its own or the shared keys/values), gated, then
    concatenated."""
    num_heads, num_kv_heads = query.shape[-2], key.shape[-2]
    check_experts(num_heads, num_kv_heads, num_experts, kv_shared)
    if gates is None:
        gates = jnp.full((*query.shape[:-2], num_experts), 1.0 / num_experts, jnp.float32)
    per_q, per_kv = num_heads // num_experts, num_kv_heads // num_experts
    outs = []
    for e in range(num_experts):
        q = query[..., e * per_q:(e + 1) * per_q, :]
        k, v = (key, value) if kv_shared else (key[..., e * per_kv:(e + 1) * per_kv, :],
                                               value[..., e * per_kv:(e + 1) * per_kv, :])
        outs.append(core(q, k, v) * gates[..., e, None, None].astype(query.dtype))
    return jnp.concatenate(outs, -2).astype(query.dtype)

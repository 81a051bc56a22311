"""Reversed attention (Ding, Shen, Fan, Chen, Chen, Luo, Tenenbaum, Gan, 2023, "Visual Dependency Transformers:
Dependency Tree Emerges from Reversed Attention", CVPR 2023, arXiv 2304.03282, §3: reversed attention, head selector,
message controller, dependency mask, and DependencyViT-Lite pruning).

The authors' repository (dingmyu/DependencyViT) holds no code. The math follows the paper as read in the spec
(vision_mechanisms.md §7) and the timm work-in-progress port (F. Guan, `timm/models/dependencyvit.py`, side branch,
read at f63d2e80); where they differ the port's code is followed and said so below.

Forward attention is the usual row softmax: row j (a *child*) is a distribution over the keys (its *parents*),

    A^F_{j,i} = softmax_i(q_j . k_i * scale)                                  [per head h]

Reversed attention transposes it, so a parent *receives* what its children send, weighted by a head selector p and
a message controller m of the sending child:

    out_{i,h} = sum_j A^F_{h,j,i} p_{h,j} m_j v_{j,h}

    head selector       p_{.,j} = softmax_h(W_p x_j / 0.1)          (appendix D.1 temperature, as in the port)
    message controller  m_j     = sigmoid(W_2 GELU(W_1 x_j))         C -> C/2 -> 1, no biases, exact (erf) GELU

Each child's outgoing weights sum to p_{h,j} m_j (its row of A^F sums to 1): the normalisation is over the
*receiving* axis, so parents' incoming weights do not sum to 1. The dependency mask (used for part parsing) is
A^M_{i,j} = sum_h A^F_{h,j,i} p_{h,j} m_j; with the head selector's softmax its column j sums to m_j.

Pruning (DependencyViT-Lite): tokens are ranked by a score and the top ones kept. The paper prunes leaf nodes that
"rarely send messages". The port at f63d2e80 scores a token by its cumulative message gate (the product of m over
the layers so far, detached; earlier revisions used the received mass sum_j A^M_{i,j}, `received_mass`, and left the
other candidates commented out); `prune_tokens` takes any score. The i-th pruning layer keeps
floor(f_i * T_current) tokens with f_i = (1 - i r) / (1 - (i - 1) r), so each step removes about r of the *original*
count (`lite_token_counts`). The port multiplies m cumulatively across layers (m_l = m_l' * m_{l-1} ...) and feeds
that product to the attention; `reversed_attention` takes whatever m it is given, so a model that carries m across
layers passes the product (models/dependency_vit.py does).

Only non-causal self attention (CAB "NS") exists: the values are the *children's* (query positions) and the output
rows are the *parents'* (key positions), so T must equal S; and a causal mask (children attend to parents i <= j)
would make parent i's output a sum over later children j >= i, so output i would read the future. Masking that too
(j <= i) leaves only i = j.

`reversed_attention` scans over blocks of children (O(block * S) memory for the map instead of O(T * S)), each
block adding its transposed, gated rows into the parents' accumulator; `reversed_reference` materialises the map
and transposes it, exactly as the port does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32
TEMPERATURE = 0.1  # the head selector's softmax temperature (DependencyViT appendix D.1, the port's value)


def _check(query, key, value, causal, head_gates, messages, scale):
    if causal:
        raise ValueError("reversed: causal=True is not supported: parent i receives from every child j that "
                         "attends to it, and under a causal mask children attend to earlier parents (i <= j), so "
                         "output i would read later tokens; reversed attention is non-causal self attention (NS)")
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(f"reversed: expected query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] of one "
                         f"rank, got {query.shape}, {key.shape}, {value.shape}")
    T, N = query.shape[-3:-1]
    S, K = key.shape[-3:-1]
    if T != S:
        raise ValueError(f"reversed: reversed attention is self attention (children are the queries, parents the "
                         f"keys, and the values are the children's), so query length T={T} must equal key length "
                         f"S={S}; cross attention is not defined")
    if value.shape[:-1] != key.shape[:-1] or query.shape[:-3] != key.shape[:-3] or query.shape[-1] != key.shape[-1]:
        raise ValueError(f"reversed: shapes do not fit: query {query.shape}, key {key.shape}, value {value.shape}")
    if N % K:
        raise ValueError(f"reversed: query heads N={N} must be a multiple of key/value heads K={K}")
    if head_gates is not None and tuple(head_gates.shape) != tuple(query.shape[:-1]):
        raise ValueError(f"reversed.head_gates: expected shape [*B, T, N] = {tuple(query.shape[:-1])}, got "
                         f"{tuple(head_gates.shape)}")
    if messages is not None and tuple(messages.shape) != tuple(query.shape[:-2]):
        raise ValueError(f"reversed.messages: expected shape [*B, T] = {tuple(query.shape[:-2])}, got "
                         f"{tuple(messages.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"reversed.scale: expected a number > 0 or None, got {scale!r}")


def _child_weights(query, head_gates, messages):
    """p_{h,j} m_j as float32 [*B, T, N] (ones where a gate is not given)."""
    weights = jnp.ones(query.shape[:-1], F32)
    if head_gates is not None:
        weights = weights * head_gates.astype(F32)
    if messages is not None:
        weights = weights * messages.astype(F32)[..., None]
    return weights


def reversed_attention(query, key, value, *, causal: bool = False, head_gates=None, messages=None,
                       scale: float | None = None, block_size: int = 128, temperature: float = TEMPERATURE):
    """out [*B, T, N, V]: out_{i,h} = sum_j softmax_i(q_j . k_i)_h p_{h,j} m_j v_{j,h} (module docstring).

    query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V] (GQA when K < N); head_gates p [*B, T, N] and
    messages m [*B, T] (None: ones). block_size: children per scan step. temperature configures the layer's head
    selector (models/layers/mixers/dependency.py) and is accepted here so one attention_kwargs dict serves both.
    """
    del temperature
    _check(query, key, value, causal, head_gates, messages, scale)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"reversed.block_size: expected an int >= 1, got {block_size!r}")
    batch = query.shape[:-3]
    T, N, H = query.shape[-3:]
    K, V = value.shape[-2:]
    G = N // K
    scale = H ** -0.5 if scale is None else scale
    q = query.astype(F32).reshape(-1, T, K, G, H)
    k = key.astype(F32).reshape(-1, T, K, H)
    v = value.astype(F32).reshape(-1, T, K, V)
    w = _child_weights(query, head_gates, messages).reshape(-1, T, K, G)
    B = q.shape[0]
    block = min(block_size, T)
    blocks = math.ceil(T / block)
    pad = blocks * block - T
    # Padded children get weight 0, so they send nothing (their uniform softmax rows are multiplied away).
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0))).reshape(B, blocks, block, K, G, H)
    w = jnp.pad(w, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, blocks, block, K, G)
    v_children = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, blocks, block, K, V)

    def send(received, xs):
        q_c, w_c, v_c = xs  # one block of children: [B, C, K, G, H], [B, C, K, G], [B, C, K, V]
        logits = jnp.einsum("bckgh,bskh->bkgcs", q_c, k, precision=HIGHEST) * scale
        rows = jax.nn.softmax(logits, axis=-1)  # each child's distribution over all parents s
        messages_c = w_c[..., None] * v_c[:, :, :, None, :]  # [B, C, K, G, V]
        return received + jnp.einsum("bkgcs,bckgv->bskgv", rows, messages_c, precision=HIGHEST), None

    # The scan body is rematerialised so reverse mode stores one block's map at a time, not all of them.
    received, _ = jax.lax.scan(jax.checkpoint(send), jnp.zeros((B, T, K, G, V), F32),
                               (jnp.moveaxis(q, 1, 0), jnp.moveaxis(w, 1, 0), jnp.moveaxis(v_children, 1, 0)))
    return received.reshape(*batch, T, N, V).astype(query.dtype)


def _forward_map(query, key, scale):
    """A^F [B, N, T(child j), S(parent i)], float32, key heads repeated (reference only: clarity over memory)."""
    T, N, H = query.shape[-3:]
    K = key.shape[-2]
    q = query.astype(F32).reshape(-1, T, N, H)
    k = jnp.repeat(key.astype(F32).reshape(-1, T, K, H), N // K, axis=2)
    scale = H ** -0.5 if scale is None else scale
    return jax.nn.softmax(jnp.einsum("bjnh,binh->bnji", q, k, precision=HIGHEST) * scale, axis=-1)


def _reversed_map(query, key, head_gates, messages, scale):
    """A^R [B, N, T(parent i), T(child j)] = transpose(A^F) * p * m, as the port forms it."""
    N = query.shape[-2]
    weights = _child_weights(query, head_gates, messages).reshape(-1, query.shape[-3], N)  # [B, j, N]
    return jnp.swapaxes(_forward_map(query, key, scale), -1, -2) * jnp.moveaxis(weights, -1, 1)[:, :, None, :]


def reversed_reference(query, key, value, *, causal: bool = False, head_gates=None, messages=None,
                       scale: float | None = None, **unused):
    """The naive form: materialise A^F, transpose, gate the children's columns, multiply by the values."""
    del unused  # block_size / temperature of the fast path and the router
    _check(query, key, value, causal, head_gates, messages, scale)
    N = query.shape[-2]
    K, V = value.shape[-2:]
    T = query.shape[-3]
    v = jnp.repeat(value.astype(F32).reshape(-1, T, K, V), N // K, axis=2)
    out = jnp.einsum("bnij,bjnv->binv", _reversed_map(query, key, head_gates, messages, scale), v, precision=HIGHEST)
    return out.reshape(*query.shape[:-1], V).astype(query.dtype)


def dependency_mask(query, key, *, head_gates=None, messages=None, scale: float | None = None):
    """A^M [*B, T(parent i), T(child j)] = sum_h A^R_h: how much child j sends to parent i over all heads."""
    value = jnp.zeros((*key.shape[:-1], 1), query.dtype)
    _check(query, key, value, False, head_gates, messages, scale)
    mask = jnp.sum(_reversed_map(query, key, head_gates, messages, scale), axis=1)
    return mask.reshape(*query.shape[:-2], query.shape[-3])


def received_mass(mask):
    """The total message mass each parent receives, sum_j A^M_{i,j} -> [*B, T] (the pruning score of the port's
    earlier revisions; f63d2e80 scores by the cumulative message gate instead)."""
    return jnp.sum(mask, axis=-1)


def head_selector(x, weight, *, temperature: float = TEMPERATURE):
    """p [*B, T, N] = softmax over heads of (x [*B, T, D] @ weight [D, N]) / temperature."""
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"reversed.temperature: expected a number > 0, got {temperature!r}")
    logits = jnp.einsum("...d,dn->...n", x.astype(F32), weight.astype(F32), precision=HIGHEST)
    return jax.nn.softmax(logits / temperature, axis=-1)


def message_controller(x, hidden_weight, out_weight):
    """m [*B, T] = sigmoid(GELU(x @ hidden_weight [D, F]) @ out_weight [F, 1]); exact GELU (torch nn.GELU)."""
    hidden = jax.nn.gelu(jnp.einsum("...d,df->...f", x.astype(F32), hidden_weight.astype(F32), precision=HIGHEST),
                         approximate=False)
    return jax.nn.sigmoid(jnp.einsum("...f,fo->...o", hidden, out_weight.astype(F32), precision=HIGHEST))[..., 0]


def lite_keep_fraction(prune_index: int, ratio: float) -> float:
    """The share of the current tokens the `prune_index`-th (1-based) pruning layer keeps:
    (1 - i r) / (1 - (i - 1) r), so that after i steps about 1 - i r of the original count remains (the port's)."""
    if not isinstance(prune_index, int) or isinstance(prune_index, bool) or prune_index < 1:
        raise ValueError(f"lite_keep_fraction.prune_index: expected an int >= 1 (1-based), got {prune_index!r}")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio * prune_index < 1:
        raise ValueError(f"lite_keep_fraction.ratio: expected a number with 0 < ratio * {prune_index} < 1 (each "
                         f"pruning step removes `ratio` of the original tokens), got {ratio!r}")
    return (1 - prune_index * ratio) / (1 - (prune_index - 1) * ratio)


def lite_token_counts(num_tokens: int, num_prunes: int, ratio: float) -> tuple[int, ...]:
    """Token counts (num_tokens, after the 1st pruning, ..., after the last): each floor(fraction * current), as the
    port computes them (e.g. 196 tokens, 4 steps of 0.16: 196, 164, 132, 100, 69)."""
    counts = [num_tokens]
    for index in range(1, num_prunes + 1):
        counts.append(math.floor(lite_keep_fraction(index, ratio) * counts[-1]))
        if counts[-1] < 1:
            raise ValueError(f"lite_token_counts: pruning step {index} of ratio {ratio} leaves no token of "
                             f"{num_tokens}")
    return tuple(counts)


def prune_tokens(tokens, score, keep: int):
    """DependencyViT-Lite pruning: the `keep` tokens of highest score, in their original order.

    tokens [*B, T, D], score [*B, T] -> (kept [*B, keep, D], indices [*B, keep] ascending). `keep` is static
    (jit), e.g. `lite_token_counts`. The port's top-k is unsorted (any order); ascending order is chosen here so
    the kept tokens keep their grid order (what follows is permutation equivariant, so the output is the same).
    """
    T = tokens.shape[-2]
    if score.shape != tokens.shape[:-1]:
        raise ValueError(f"prune_tokens.score: expected shape {tokens.shape[:-1]} (tokens without features), got "
                         f"{score.shape}")
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= T:
        raise ValueError(f"prune_tokens.keep: expected an int in [1, {T}], got {keep!r}")
    _, chosen = jax.lax.top_k(score, keep)
    chosen = jnp.sort(chosen, axis=-1)  # keep the token order (row-major grid order, class tokens first)
    return jnp.take_along_axis(tokens, chosen[..., None], axis=-2), chosen

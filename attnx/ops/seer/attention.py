"""SeerAttention as a registered mechanism (Gao et al., 2024, "SeerAttention: Learning Intrinsic Sparse Attention
in Your LLMs", arXiv 2410.13276, §3; official code microsoft/SeerAttention, `seer_attn/modules/attention_forward.py`
`sparse_flash_attention_forward`): softmax attention restricted to the key blocks a gate keeps.

The gate's weights live in the model (models/layers/mixers/seer.py, `SeerGate`), which hands this function its
logits. Given
    gate_logits [*B|1, N|1, nb, nb]  -> block mask = seer_block_mask(softmax(gate_logits), threshold | nz_ratio,
                                        dense_last, causal), as the code does at inference (causal: blocks above
                                        the diagonal are masked before the softmax, masked or not already);
    block_mask  [..., nb, nb] bool   -> used as given (e.g. an oracle mask from the ground truth);
    neither                          -> dense attention. This is the gate's threshold-0 limit and what the code does
                                        where it has no gate output (single-token decoding); it keeps the mechanism
                                        a drop-in with no options (and lets the CAB checks run it). Pass a gate to be
                                        sparse.
The block-sparse softmax itself is `attnx.dot_product_attention` with `Mask(block_mask=...)`: the reference
materialises the mask, the chunked path skips the dead blocks. Rows whose blocks are all dead return 0; top-k
keeps at least one block per row, a threshold does when it is below 1 / (live blocks of the row).

Patterns NS and CS (the catalogue's): self attention only, since the gate pools queries and keys on one block grid
with a block-causal mask. Note that a gated output is not token-causal inside a block: the gate pools every query
of a block, so a query's mask depends on later queries of its own block (true of the official code too); the dense
form (no gate) is exactly causal.

Decoding: the code's prefill-sparse model decodes densely (its gate returns None for one query), so `seer_decode`
is causal softmax over the cache. It equals the last rows of the gated forward wherever those rows are dense, which
`dense_last` >= 1 guarantees for the final positions.
"""

from __future__ import annotations

import jax.numpy as jnp

from attnx.api import dot_product_attention, implementation_names
from attnx.mask import Mask
from attnx.ops.builtin import softmax_decode
from attnx.ops.seer.gate import (DEFAULT_THRESHOLD, MASKED_LOGIT, block_causal, check_block, check_pools,
                                 seer_block_mask, seer_gate_probabilities)

IMPLEMENTATIONS = implementation_names()


def seer_block_mask_from_kwargs(gate_logits, block_mask, *, num_blocks: int, threshold, nz_ratio, dense_last: int,
                                causal: bool):
    """The block mask the attention uses, or None for dense attention (see the module docstring)."""
    if gate_logits is not None and block_mask is not None:
        raise ValueError("seer: give gate_logits (from the gate) or block_mask, not both")
    if gate_logits is None and block_mask is None:
        return None
    given = gate_logits if gate_logits is not None else block_mask
    name = "gate_logits" if gate_logits is not None else "block_mask"
    if jnp.ndim(given) < 2 or tuple(jnp.shape(given)[-2:]) != (num_blocks, num_blocks):
        raise ValueError(f"seer.{name}: expected [..., {num_blocks}, {num_blocks}] (query blocks x key blocks at the "
                         f"configured block size), got shape {jnp.shape(given)}")
    if block_mask is not None:
        if jnp.asarray(block_mask).dtype != jnp.bool_:
            raise ValueError(f"seer.block_mask: expected a bool array, got {jnp.asarray(block_mask).dtype}")
        return block_mask
    if threshold is None and nz_ratio is None:
        threshold = DEFAULT_THRESHOLD
    if causal:  # the gate module leaves its logits unmasked; the softmax must see only the causal blocks
        gate_logits = jnp.where(block_causal(num_blocks, num_blocks), gate_logits, MASKED_LOGIT)
    return seer_block_mask(seer_gate_probabilities(gate_logits), threshold=threshold, nz_ratio=nz_ratio,
                           dense_last=dense_last, causal=causal)


def seer_attention(query, key, value, *, causal: bool = False, gate_logits=None, block_mask=None, block: int = 64,
                   threshold: float | None = None, nz_ratio: float | None = None, dense_last: int = 2,
                   mask: Mask | None = None, hidden: int = 128, q_pools=("avg",), k_pools=("max", "min", "avg"),
                   rope_theta: float | None = 10_000.0, **kwargs):
    """Block-sparse softmax attention [*B, T, N, V] over the blocks a SeerAttention gate keeps (arXiv 2410.13276).

    query [*B, T, N, H], key/value [*B, T, K, H|V] (self attention: S == T). gate_logits / block_mask: see the
    module docstring. block: tokens per gate block (64 in the paper). threshold (default 0.0, the code's config
    default: every causal block) or nz_ratio: the sparsity rule of `seer_block_mask`; dense_last: dense query-block
    rows at the end. hidden, q_pools, k_pools, rope_theta configure the gate module and are accepted here so that
    one attention_kwargs dict serves the layer and the function. Other kwargs (implementation, scale, ...) go to
    `attnx.dot_product_attention`.
    """
    del hidden, rope_theta
    check_block(block)
    check_pools("q_pools", q_pools), check_pools("k_pools", k_pools)
    T, S = query.shape[-3], key.shape[-3]
    if T != S:
        raise ValueError(f"seer: self attention only (patterns NS, CS): the gate pools queries and keys on one block "
                         f"grid; got query length {T} and key length {S}")
    num_blocks = -(-T // block)
    bm = seer_block_mask_from_kwargs(gate_logits, block_mask, num_blocks=num_blocks, threshold=threshold,
                                     nz_ratio=nz_ratio, dense_last=dense_last, causal=causal)
    m = Mask(causal=causal)
    if bm is not None:
        m = m & Mask(block_mask=bm, block_size=(block, block))
    if mask is not None:
        m = m & mask
    return dot_product_attention(query, key, value, mask=m, **kwargs)


def seer_reference(query, key, value, **kwargs):
    return seer_attention(query, key, value, implementation="reference", **kwargs)


def seer_decode(query, key_cache, value_cache, *, query_positions, gate_logits=None, block_mask=None,
                block: int = 64, threshold=None, nz_ratio=None, dense_last: int = 2, hidden: int = 128,
                q_pools=("avg",), k_pools=("max", "min", "avg"), rope_theta=10_000.0, **kwargs):
    """Dense causal attention of the new queries over the KV cache (the code decodes densely; module docstring)."""
    del gate_logits, block_mask, block, threshold, nz_ratio, dense_last, hidden, q_pools, k_pools, rope_theta
    return softmax_decode(query, key_cache, value_cache, query_positions=query_positions, **kwargs)

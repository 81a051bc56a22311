"""Lightning Attention-2's tiled algorithm in `lax.scan` (Qin et al., 2024, arXiv 2405.17381, Algorithm 1).

Blocks of C queries/keys; r, c are offsets inside a block, lambda = exp(-s) per query head:

    intra-block  O_i += [(Q_i K_i^T) ⊙ Λ] V_i,          Λ_rc = lambda^(r - c) for r >= c, else 0
    inter-block  O_i += (Q_i ⊙ lambda^r) KV
    state        KV <- lambda^C KV + (K_i ⊙ lambda^(C - c))^T V_i           (float32)

so the cost is O(T C (H + V) + T H V) and the carried state is one [H, V] matrix per head, whatever T. The scan
body is rematerialised (`jax.checkpoint`), so reverse mode stores only the per-block states, O(T / C · H · V), and
`jax.jvp` works (no custom_vjp). Arithmetic is float32 whatever the input dtype, like the Triton kernel's
accumulators; the output is cast back.
"""

import jax
import jax.numpy as jnp


def lightning_chunked(q, k, v, slopes, block_size: int = 64):
    B, T, N, H = q.shape
    K, V = k.shape[2], v.shape[-1]
    G = N // K
    C = min(block_size, T)
    num_blocks = -(-T // C)
    pad = num_blocks * C - T  # zero keys/values in the tail add nothing; tail outputs are cut off

    def blocks(x):
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, num_blocks, C, *x.shape[2:]), 1, 0)

    qb = blocks(q.reshape(B, T, K, G, H))  # [nb, B, C, K, G, H]
    kb, vb = blocks(k), blocks(v)  # [nb, B, C, K, H], [nb, B, C, K, V]
    s = slopes.astype(jnp.float32).reshape(K, G)
    offsets = jnp.arange(C, dtype=jnp.float32)
    gap = offsets[:, None] - offsets[None, :]
    intra_decay = jnp.where(gap >= 0, jnp.exp(-s[..., None, None] * jnp.maximum(gap, 0.0)), 0.0)  # [K, G, C, C]
    query_decay = jnp.exp(-s[..., None] * offsets)  # [K, G, C]: lambda^r
    key_decay = jnp.exp(-s[..., None] * (C - offsets))  # [K, G, C]: lambda^(C - c)
    block_decay = jnp.exp(-s * C)[..., None, None]  # [K, G, 1, 1]

    @jax.checkpoint
    def step(kv, block):
        qi, ki, vi = block
        scores = jnp.einsum("brkgh,bckh->bkgrc", qi, ki) * intra_decay
        intra = jnp.einsum("bkgrc,bckv->brkgv", scores, vi)
        inter = jnp.einsum("brkgh,kgr,bkghv->brkgv", qi, query_decay, kv)
        kv = kv * block_decay + jnp.einsum("bckh,kgc,bckv->bkghv", ki, key_decay, vi)
        return kv, intra + inter

    kv0 = jnp.zeros((B, K, G, H, V), jnp.float32)
    _, out = jax.lax.scan(step, kv0, (qb, kb, vb))  # [nb, B, C, K, G, V]
    out = jnp.moveaxis(out, 0, 1).reshape(B, num_blocks * C, N, V)[:, :T]
    return out.astype(q.dtype)

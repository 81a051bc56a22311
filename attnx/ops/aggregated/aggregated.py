"""TransNeXt's aggregated attention (and its full-attention stage-4 form) as pure functions of explicit weights.

Shi, 2024, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", CVPR 2024, arXiv 2311.17132:
§3.1 pixel-focused attention, §3.2 aggregated attention (query embedding, learnable tokens, length-scaled cosine
attention), §3.3 convolutional GLU (models/layers/mixers/transnext.py). The math follows the official code,
DaiShiResearch/TransNeXt @ c8a9974, `classification/attention_native.py` (`AggregatedAttention`) and
`classification/transnext.py` (`Attention`, the stage-4 full attention). Per head h, with q, k, v the raw
projections of token i and of the pooled tokens p:

    q_hat = q / |q|,  q_tilde = (q_hat + e_h) * softplus(tau_h) * log(n_i + P)
    local:  s_it = q_tilde . k_hat_{j(i,t)} + b_h[t]        for the window^2 offsets t; off-grid keys are dropped
    pooled: s_ip = q_tilde . k_hat_p + CPB_h(i, p)
    a = softmax([s_i., s_ip])                               one softmax over both branches
    o_i = sum_t (a_it + q_hat_i . T_h[:, t] + beta_h[t]) v_{j(i,t)} + sum_p a_ip v_p

n_i counts the in-grid neighbours of i, P the pooled tokens, CPB is an MLP (2 -> C, ReLU, C -> heads) on
log-spaced relative coordinates (attnx/ops/aggregated/tables.py). The learnable-token weights use the *unscaled*
q_hat and are added after the softmax (unnormalised). Where the paper's equations leave details open (which query
the learnable tokens see, zero-padded and masked border keys, the CPB coordinate scaling, softplus on tau), this
follows the code. `window=None` is the stage-4 form: softmax
over all tokens with the same cosine logits, query embedding and CPB, scale log(T); no local bias, no learnable
tokens, no pooled branch.

The pooled keys/values come from the same key/value projection applied to LN(AdaptiveAvgPool(GELU(Conv1x1(x))))
(`pooled_tokens` below); the NNX layer (models/layers/mixers/transnext.py) owns that projection, so this function
takes the pooled keys and values as arrays. Self attention only (the window pairs a query with keys at its own grid
position), non-causal only: CAB pattern NS.

Implementations: "xla" gathers the local keys/values by zero padding and window^2 shifted slices (the code's
`F.unfold`), O(T (window^2 + P) H); "reference" forms the dense T x T neighbourhood mask, bias and learnable-token
matrices and one softmax over T + P columns (the oracle).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnx.ops.aggregated import tables

IMPLEMENTATIONS = ("xla", "reference")
# softplus(tau) at initialisation, 1 / 0.24 (the code's `temperature` init); used when no temperature is given.
INITIAL_TEMPERATURE = 1.0 / 0.24
HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|, eps) over the last axis (torch's F.normalize), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pooled_tokens(x: jax.Array, *, grid: tuple[int, int], pooled_grid: tuple[int, int], sr_kernel: jax.Array,
                  sr_bias: jax.Array, norm_scale: jax.Array, norm_bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """x [*B, h*w, D] (row-major on `grid`) -> [*B, ph*pw, D]: LN(AdaptiveAvgPool(GELU(x W + b))), the pooled
    branch's features before the shared key/value projection. W [D, D] is the code's 1x1 convolution `sr`; GELU is
    exact (erf); LN has torch's default eps 1e-5. Adaptive pooling uses torch's (possibly overlapping) bins."""
    grid, pooled_grid = tuple(grid), tuple(pooled_grid)
    if x.shape[-2] != grid[0] * grid[1]:
        raise ValueError(f"pooled_tokens: x has {x.shape[-2]} tokens, grid {grid} holds {grid[0] * grid[1]}")
    if not all(0 < p <= g for p, g in zip(pooled_grid, grid)):
        raise ValueError(f"pooled_tokens.pooled_grid={pooled_grid}: each side must be in 1..grid side {grid}")
    hidden = jax.nn.gelu(jnp.einsum("...td,de->...te", x, sr_kernel) + sr_bias, approximate=False)
    pooled = jnp.einsum("pt,...td->...pd", jnp.asarray(tables.pool_matrix(grid, pooled_grid)), hidden)
    pooled32 = pooled.astype(jnp.float32)
    mean = jnp.mean(pooled32, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(pooled32 - mean), axis=-1, keepdims=True)
    normed = (pooled32 - mean) * jax.lax.rsqrt(variance + eps) * norm_scale + norm_bias
    return normed.astype(x.dtype)


def cpb_bias(cpb, grid: tuple[int, int], key_grid: tuple[int, int],
             pretrain_grid: tuple[int, int] | None = None) -> jax.Array:
    """[N, T, P] continuous position bias: MLP(2 -> C, ReLU, C -> N) of each (query, key) pair's log-spaced offset.
    cpb = (w1 [2, C], b1 [C], w2 [C, N], b2 [N])."""
    w1, b1, w2, b2 = cpb
    coords = jnp.asarray(tables.cpb_coordinates(grid, key_grid, pretrain_grid))
    hidden = jax.nn.relu(jnp.einsum("tpc,cd->tpd", coords, w1.astype(jnp.float32), precision=HIGHEST) + b1)
    bias = jnp.einsum("tpd,dn->tpn", hidden, w2.astype(jnp.float32), precision=HIGHEST) + b2
    return jnp.transpose(bias, (2, 0, 1))


def _check_shape(name: str, x, shape: tuple[int, ...]) -> None:
    if x is not None and tuple(np.shape(x)) != shape:
        raise ValueError(f"aggregated.{name}: expected shape {list(shape)}, got {list(np.shape(x))}")


def _validate(query, key, value, causal, grid, window, pooled_key, pooled_value, pooled_grid, temperature,
              query_embedding, local_bias, learnable_tokens, learnable_bias, cpb, pretrain_grid, implementation):
    """Checks every argument once; returns (grid, pooled_grid or None, implementation)."""
    if pretrain_grid is not None and (
            not isinstance(pretrain_grid, (tuple, list)) or len(pretrain_grid) != 2
            or not all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g > 0 for g in pretrain_grid)):
        raise ValueError(f"aggregated.pretrain_grid: expected None or (h, w), two positive ints, got "
                         f"{pretrain_grid!r}")
    if causal:
        raise ValueError("aggregated: causal=True is not supported; TransNeXt's windows and pooled tokens are "
                         "non-causal (CAB pattern NS only)")
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"aggregated.implementation: {implementation!r}; allowed: {IMPLEMENTATIONS} or None")
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(f"aggregated: query/key/value must be [*B, T, N, H] / [*B, S, K, H] / [*B, S, K, V] with "
                         f"the same rank, got {query.shape}, {key.shape}, {value.shape}")
    *batch, T, N, H = query.shape
    if key.shape[:-3] != tuple(batch) or value.shape[:-1] != key.shape[:-1] or key.shape[-1] != H:
        raise ValueError(f"aggregated: key {key.shape} / value {value.shape} do not match query {query.shape}")
    S, K = key.shape[-3], key.shape[-2]
    if S != T:
        raise ValueError(f"aggregated: self attention only (the window pairs each query with the keys around its own "
                         f"grid position), got T={T} queries and S={S} keys")
    if N % K:
        raise ValueError(f"aggregated: query heads N={N} must be a multiple of key/value heads K={K}")
    grid = tables.resolve_grid(grid, T)
    if window is not None and (not isinstance(window, (int, np.integer)) or isinstance(window, bool)
                               or window < 1 or window % 2 == 0):
        raise ValueError(f"aggregated.window: expected an odd int >= 1 (3 in TransNeXt) or None (the full-attention "
                         f"stage), got {window!r}")
    if (pooled_key is None) != (pooled_value is None):
        raise ValueError("aggregated: pooled_key and pooled_value come together (both None: no pooled branch)")
    if window is None:
        for name, arg in (("pooled_key", pooled_key), ("local_bias", local_bias),
                          ("learnable_tokens", learnable_tokens), ("learnable_bias", learnable_bias)):
            if arg is not None:
                raise ValueError(f"aggregated.{name}: window=None is the full-attention stage, which has no local "
                                 f"window and no pooled branch; pass {name}=None")
    if pooled_key is not None:
        if pooled_grid is None or len(tuple(pooled_grid)) != 2:
            raise ValueError(f"aggregated.pooled_grid: the (ph, pw) layout of the pooled tokens is required with "
                             f"pooled_key, got {pooled_grid!r}")
        pooled_grid = tuple(int(p) for p in pooled_grid)
        P = pooled_grid[0] * pooled_grid[1]
        _check_shape("pooled_key", pooled_key, (*batch, P, K, H))
        _check_shape("pooled_value", pooled_value, (*batch, P, K, value.shape[-1]))
    elif window is not None:
        pooled_grid = None
        if cpb is not None:
            raise ValueError("aggregated.cpb: the position bias of the windowed form is on the pooled keys; pass "
                             "pooled_key/pooled_value/pooled_grid with it, or cpb=None")
    else:
        pooled_grid = grid  # full attention: the CPB's keys are the tokens themselves
    _check_shape("temperature", temperature, (N,))
    _check_shape("query_embedding", query_embedding, (N, H))
    taps = None if window is None else window * window
    _check_shape("local_bias", local_bias, (N, taps))
    _check_shape("learnable_tokens", learnable_tokens, (N, H, taps))
    _check_shape("learnable_bias", learnable_bias, (N, taps))
    if cpb is not None:
        if not isinstance(cpb, (tuple, list)) or len(cpb) != 4:
            raise ValueError("aggregated.cpb: expected (w1 [2, C], b1 [C], w2 [C, N], b2 [N])")
        hidden = np.shape(cpb[0])[-1]
        for name, arg, shape in zip(("w1", "b1", "w2", "b2"), cpb, ((2, hidden), (hidden,), (hidden, N), (N,))):
            _check_shape(f"cpb.{name}", arg, shape)
    return grid, pooled_grid, implementation or IMPLEMENTATIONS[0]


def aggregated_attention(query, key, value, *, causal: bool = False, grid=None, window: int | None = 3,
                         pooled_key=None, pooled_value=None, pooled_grid=None, temperature=None,
                         query_embedding=None, local_bias=None, learnable_tokens=None, learnable_bias=None, cpb=None,
                         pretrain_grid=None, implementation: str | None = None) -> jax.Array:
    """TransNeXt aggregated attention: [*B, T, N, H], [*B, T, K, H], [*B, T, K, V] -> [*B, T, N, V].

    query/key/value: raw projections of the tokens, row-major on `grid` (h, w) (None: one row of T tokens); query
        and keys are L2-normalised here. GQA when K < N.
    window: odd local window side (3), or None for the full-attention stage 4.
    pooled_key [*B, P, K, H], pooled_value [*B, P, K, V], pooled_grid (ph, pw): the pooled branch (None: off).
    temperature [N]: raw tau (softplus applied here); None uses softplus(tau) = 1/0.24, the code's initial value.
    query_embedding [N, H], local_bias [N, window^2], learnable_tokens [N, H, window^2], learnable_bias
        [N, window^2]: None means zero. cpb: (w1 [2, C], b1 [C], w2 [C, N], b2 [N]) or None (no position bias).
    pretrain_grid: the grid the CPB coordinates are normalised by (default `grid`), for resolution transfer.
    implementation: "xla" (default) or "reference".
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    grid, pooled_grid, implementation = _validate(
        query, key, value, causal, grid, window, pooled_key, pooled_value, pooled_grid, temperature,
        query_embedding, local_bias, learnable_tokens, learnable_bias, cpb, pretrain_grid, implementation)
    pretrain_grid = None if pretrain_grid is None else tuple(int(g) for g in pretrain_grid)
    *batch, T, N, H = query.shape
    K, V = key.shape[-2], value.shape[-1]
    flat = lambda x, *tail: None if x is None else jnp.asarray(x).reshape(-1, *tail)
    q, k, v = flat(query, T, N, H), flat(key, T, K, H), flat(value, T, K, V)
    P = 0 if pooled_key is None else pooled_grid[0] * pooled_grid[1]
    pk, pv = flat(pooled_key, P, K, H), flat(pooled_value, P, K, V)
    softplus_tau = (jnp.full((N,), INITIAL_TEMPERATURE, jnp.float32) if temperature is None
                    else jax.nn.softplus(jnp.asarray(temperature, jnp.float32)))
    embedding = jnp.zeros((N, H), jnp.float32) if query_embedding is None else jnp.asarray(query_embedding, jnp.float32)
    bias = None if cpb is None or pooled_grid is None else cpb_bias(cpb, grid, pooled_grid, pretrain_grid)
    scale = jnp.asarray(tables.length_scale(grid, window, P if window is not None else 0))
    weights = dict(softplus_tau=softplus_tau, embedding=embedding, scale=scale, bias=bias,
                   local_bias=local_bias, tokens=learnable_tokens, token_bias=learnable_bias)
    if window is None:
        out = _full(q, k, v, **weights)
    elif implementation == "reference":
        out = _local_reference(q, k, v, pk, pv, grid=grid, window=window, **weights)
    else:
        out = _local_unfold(q, k, v, pk, pv, grid=grid, window=window, **weights)
    return out.reshape(*batch, T, N, V).astype(query.dtype)


def aggregated_reference(query, key, value, **kwargs) -> jax.Array:
    """The dense oracle of `aggregated_attention` (implementation="reference")."""
    kwargs.pop("implementation", None)
    return aggregated_attention(query, key, value, implementation="reference", **kwargs)


def _scaled_queries(q, softplus_tau, embedding, scale):
    """(q_hat, q_tilde) [B, T, N, H]: unit queries, and the length-scaled cosine queries with the embedding."""
    q_hat = l2_normalize(q)
    return q_hat, (q_hat + embedding) * softplus_tau[:, None] * scale[:, None, None]


def _full(q, k, v, *, softplus_tau, embedding, scale, bias, **unused):
    """Stage 4: one softmax over all tokens of the cosine logits (+ CPB over token pairs)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    _, q_tilde = _scaled_queries(q, softplus_tau, embedding, scale)
    logits = jnp.einsum("btkgh,bskh->bkgts", q_tilde.reshape(B, T, K, N // K, H), l2_normalize(k), precision=HIGHEST)
    logits = logits.reshape(B, N, T, T) + (0.0 if bias is None else bias)
    probs = jax.nn.softmax(logits, axis=-1).reshape(B, K, N // K, T, T)
    return jnp.einsum("bkgts,bskv->btkgv", probs, v.astype(jnp.float32), precision=HIGHEST).reshape(B, T, N, -1)


def _unfold(x: jax.Array, grid: tuple[int, int], window: int) -> jax.Array:
    """[B, T, K, X] -> [B, T, window^2, K, X]: the zero-padded window around each token (torch's F.unfold), as
    window^2 shifted slices of the padded grid; off-grid slots hold zeros."""
    B, T = x.shape[:2]
    h, w = grid
    radius = window // 2
    padded = jnp.pad(x.reshape(B, h, w, *x.shape[2:]), ((0, 0), (radius, radius), (radius, radius), (0, 0), (0, 0)))
    slices = [padded[:, dy:dy + h, dx:dx + w] for dy in range(window) for dx in range(window)]
    return jnp.stack(slices, axis=3).reshape(B, T, window * window, *x.shape[2:])


def _local_unfold(q, k, v, pk, pv, *, grid, window, softplus_tau, embedding, scale, bias, local_bias, tokens,
                  token_bias):
    B, T, N, H = q.shape
    K = k.shape[2]
    G, taps = N // K, window * window
    _, valid = tables.local_neighbours(grid, window)
    q_hat, q_tilde = _scaled_queries(q, softplus_tau, embedding, scale)
    q_tilde = q_tilde.reshape(B, T, K, G, H)
    k_local = _unfold(l2_normalize(k), grid, window)           # [B, T, taps, K, H]
    v_local = _unfold(v.astype(jnp.float32), grid, window)     # zeros off the grid
    logits = jnp.einsum("btkgh,btokh->btkgo", q_tilde, k_local, precision=HIGHEST).reshape(B, T, N, taps)
    if local_bias is not None:
        logits = logits + jnp.asarray(local_bias, jnp.float32)
    logits = jnp.where(jnp.asarray(valid)[:, None, :], logits, -jnp.inf)
    if pk is not None:
        pooled = jnp.einsum("btkgh,bpkh->btkgp", q_tilde, l2_normalize(pk), precision=HIGHEST).reshape(B, T, N, -1)
        if bias is not None:
            pooled = pooled + jnp.transpose(bias, (1, 0, 2))
        logits = jnp.concatenate([logits, pooled], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    local = probs[..., :taps]
    if tokens is not None:  # query-dependent, unnormalised extra weights on the local values (unscaled q_hat)
        local = local + jnp.einsum("btnh,nho->btno", q_hat, jnp.asarray(tokens, jnp.float32), precision=HIGHEST)
    if token_bias is not None:
        local = local + jnp.asarray(token_bias, jnp.float32)
    out = jnp.einsum("btkgo,btokv->btkgv", local.reshape(B, T, K, G, taps), v_local, precision=HIGHEST)
    if pk is not None:
        out = out + jnp.einsum("btkgp,bpkv->btkgv", probs[..., taps:].reshape(B, T, K, G, -1),
                               pv.astype(jnp.float32), precision=HIGHEST)
    return out.reshape(B, T, N, -1)


def _local_reference(q, k, v, pk, pv, *, grid, window, softplus_tau, embedding, scale, bias, local_bias, tokens,
                     token_bias):
    """Dense form: per-offset one-hot matrices M[t, i, j] place every local term in a T x T matrix."""
    B, T, N, H = q.shape
    G, taps = N // k.shape[2], window * window
    index, valid = tables.local_neighbours(grid, window)
    onehot = np.zeros((taps, T, T), np.float32)
    rows, offsets = np.nonzero(valid)
    onehot[offsets, rows, index[rows, offsets]] = 1.0
    neighbour = jnp.asarray(onehot.sum(0) > 0)
    onehot = jnp.asarray(onehot)
    repeat = lambda x: None if x is None else jnp.repeat(x.astype(jnp.float32), G, axis=2)
    k, v, pk, pv = repeat(k), repeat(v), repeat(pk), repeat(pv)
    q_hat, q_tilde = _scaled_queries(q, softplus_tau, embedding, scale)
    logits = jnp.einsum("binh,bjnh->bnij", q_tilde, l2_normalize(k), precision=HIGHEST)
    if local_bias is not None:
        logits = logits + jnp.einsum("no,oij->nij", jnp.asarray(local_bias, jnp.float32), onehot, precision=HIGHEST)
    logits = jnp.where(neighbour, logits, -jnp.inf)
    if pk is not None:
        pooled = jnp.einsum("binh,bpnh->bnip", q_tilde, l2_normalize(pk), precision=HIGHEST)
        logits = jnp.concatenate([logits, pooled + (0.0 if bias is None else bias)], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    dense = probs[..., :T]
    extra = jnp.zeros((B, N, T, taps), jnp.float32)
    if tokens is not None:
        extra = extra + jnp.einsum("binh,nho->bnio", q_hat, jnp.asarray(tokens, jnp.float32), precision=HIGHEST)
    if token_bias is not None:
        extra = extra + jnp.asarray(token_bias, jnp.float32)[None, :, None, :]
    dense = dense + jnp.einsum("bnio,oij->bnij", extra, onehot, precision=HIGHEST)
    out = jnp.einsum("bnij,bjnv->binv", dense, v, precision=HIGHEST)
    if pk is not None:
        out = out + jnp.einsum("bnip,bpnv->binv", probs[..., T:], pv, precision=HIGHEST)
    return out

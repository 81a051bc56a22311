"""Transformer-LS: long-short attention (Zhu et al., 2021, "Long-Short Transformer: Efficient Transformers for
Language and Vision", arXiv 2107.02192, §3.1 short-term sliding window, §3.2 dynamic projection, §3.3 DualLN, §3.4
segment-wise causal projection), as benchmarked in CAB (`efficient_attention/modules/transformer_ls.py`: AttentionLS
for pattern NS, CausalLS for CS).

Each query attends, in ONE softmax, to short-range window keys and to r dynamically projected long-range keys:

    P = softmax_s(K W_P)                        (W_P [K heads, H, r]; softmax over positions)
    K_bar = LN_p(P^T K),  V_bar = LN_p(P^T V)   (the long-range keys/values, r per head)
    K_win = LN_w(K),      V_win = LN_w(V)       (the short-range keys/values)
    o_t = softmax([q_t K_bar^T, q_t K_win[window(t)]^T] / sqrt(H)) [V_bar; V_win[window(t)]]

DualLN: two LayerNorms, each over all heads' features jointly (the code's nn.LayerNorm(embed_dim)) and shared by keys
and values, as in the code, so the value head size must equal the key head size.

Non-causal (the code's AttentionLS): the window is block-wise: queries in block b = [b w, (b + 1) w) see keys
[b w - e, (b + 1) w + e), e = max(w // 2, 1), clipped to the sequence (the code pads and masks). The projection is
taken over the whole sequence from the window-normalised keys/values (LN_w first, then P^T, then LN_p), as the code
does; r = 16 by default (CAB's num_landmarks).

Causal (the code's CausalLS): the window is the last w positions [t - w + 1, t]; the projection is segment-wise:
the sequence is cut into chunks of `chunk_size`, each compressed to r vectors by a softmax over its own positions
(P^T applied to the raw keys/values, then LN_p, as the code does), and query t sees only the chunks that end before
its own chunk starts, so nothing of the future leaks; r = 1 by default (CAB's chunk_rank).

Projection logits: the code's `dconv_fc` / `dconv_1` read the layer input x (X W_P + b in the paper); a pure
function sees only per-head q/k/v, so the caller passes those logits as `projection_scores` [*B, S, K, r] (what
models/layers/mixers/longshort.py does by default). Without them the logits fall back to K W_P from the keys of each
key/value head (a departure, kept because a KV-cache decode step has no layer input for the cached positions).
CausalLS's Transformer-XL relative positions (r_net, r_net_chunk, r_w_bias, r_r_bias) are the option
`relative_positions` (explicit weights; off by default because attnx's models supply their own positions). Other
departure: the code's zero memory cache (mem_len slots of zeros, which it attends to) is masked instead.
Weights: `projection` [K, H, r], `window_norm` and `projection_norm` (scale [K, H], bias [K, H]) pairs; None
draws W_P from the fixed `seed` (U(-1/sqrt(H), 1/sqrt(H)), torch Linear's init) and uses identity norms (scale 1,
bias 0, LayerNorm's init).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.efficient.common import (HIGHEST, check_int, decode_through_full_causal, group, layer_norm,
                                        refuse_pattern, resolve_implementation)
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("blocked", "reference")


def projection_weights(rng: jax.Array, num_kv_heads: int, head_dim: int, rank: int, dtype=jnp.float32):
    """[K, H, r] ~ U(-1/sqrt(H), 1/sqrt(H)) (torch nn.Linear's default init with fan-in H)."""
    bound = head_dim ** -0.5
    return jax.random.uniform(rng, (num_kv_heads, head_dim, rank), dtype, -bound, bound)


def _norm_pair(name: str, pair, K: int, H: int):
    if pair is None:
        return None, None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"longshort.{name}: expected a (scale, bias) pair of [K, H] arrays, got {type(pair)}")
    scale, bias = (jnp.asarray(x, jnp.float32) for x in pair)
    if scale.shape != (K, H) or bias.shape != (K, H):
        raise ValueError(f"longshort.{name}: expected scale and bias of shape [K, H] = [{K}, {H}], got "
                         f"{scale.shape} and {bias.shape}")
    return scale, bias


def longshort_attention(query, key, value, *, causal: bool = False, window: int = 16, rank: int | None = None,
                        chunk_size: int = 16, projection=None, projection_scores=None, window_norm=None,
                        projection_norm=None, projection_from: str | None = None, relative_positions=None,
                        seed: int = 0, implementation: str | None = None):
    """query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, H] -> [*B, T, N, H]; patterns NS and CS.

    window: w (block width non-causal, look-back causal); rank: r (None: the projection's, else 16 non-causal and
    1 causal); chunk_size: the causal projection's segment length. projection_scores: [*B, S, K, r] projection
    logits computed by the caller from the layer input (X W_P + b, the official code's `dconv_fc` / `dconv_1`); when
    given, `projection` must be None and the keys no longer feed the logits. projection_from: the weight module's
    option ("input" / "keys"), passed through by the attention layer; when set it must match what was given.
    relative_positions (causal only): CausalLS's Transformer-XL terms, a tuple (window_net [P, N, H], chunk_net
    [P, N, H], chunk_bias [N, H], content_bias [N, H], position_bias [N, H]) of r_net, r_net_chunk (weight, bias),
    r_w_bias and r_r_bias; P is the even sinusoid width (the code's embed_dim). None or False: no such terms."""
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    S, K, V = args.k.shape[1], args.k.shape[2], args.v.shape[3]
    refuse_pattern("longshort", causal=causal, T=T, S=S, patterns="NS, CS", causal_ok=True)
    if V != H:
        raise ValueError(f"longshort: the DualLN norms are shared by keys and values, so the value head size must "
                         f"equal the key head size; got value [.., {V}] and key [.., {H}]")
    check_int("longshort.window", window)
    check_int("longshort.chunk_size", chunk_size)
    implementation = resolve_implementation("longshort", implementation, IMPLEMENTATIONS)
    k, v = args.k.astype(jnp.float32), args.v.astype(jnp.float32)
    if projection_from not in (None, "input", "keys"):
        raise ValueError(f"longshort.projection_from: expected 'input' or 'keys', got {projection_from!r}")
    if (projection_from == "input") != (projection_scores is not None) and projection_from is not None:
        raise ValueError(f"longshort: projection_from={projection_from!r} but projection_scores was "
                         f"{'not ' if projection_scores is None else ''}given")
    if projection_scores is not None:
        logits = _input_scores(projection_scores, projection, rank, args.batch_shape, B, S, K)
    else:
        if projection is None:
            rank = (1 if causal else 16) if rank is None else rank
            check_int("longshort.rank", rank)
            projection = projection_weights(jax.random.key(seed), K, H, rank)
        projection = jnp.asarray(projection, jnp.float32)
        if (projection.ndim != 3 or projection.shape[:2] != (K, H)
                or (rank is not None and projection.shape[2] != rank)):
            raise ValueError(f"longshort.projection: expected [K, H, r] = [{K}, {H}, {rank or 'r'}], got "
                             f"{projection.shape}")
        logits = jnp.einsum("bskh,khr->bskr", k, projection, precision=HIGHEST)
    norms = (*_norm_pair("window_norm", window_norm, K, H), *_norm_pair("projection_norm", projection_norm, K, H))
    q = group(args.q.astype(jnp.float32) * H ** -0.5, K)  # [B, T, K, G, H]
    dense = implementation == "reference"
    if relative_positions is None or relative_positions is False:  # False: the weight module's option, off
        branch = _causal if causal else _non_causal
        out = branch(q, k, v, logits, norms, window, chunk_size, dense)
    elif not causal:
        raise ValueError("longshort.relative_positions: only the causal form (CausalLS) has relative positions; "
                         "the non-causal AttentionLS has none")
    else:
        rel = _relative_weights(relative_positions, N, K, H)
        out = _causal(q, k, v, logits, norms, window, chunk_size, dense, rel)
    out = out.reshape(B, T, N, H).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def _input_scores(scores, projection, rank, batch_shape, B: int, S: int, K: int):
    """The caller's projection logits [*B, S, K, r] (from the layer input) as [B, S, K, r]."""
    if projection is not None:
        raise ValueError("longshort: pass either projection (logits K W_P from the keys) or projection_scores "
                         "(logits from the layer input), not both")
    scores = jnp.asarray(scores, jnp.float32)
    want = (*batch_shape, S, K)
    if scores.ndim != len(want) + 1 or scores.shape[:-1] != want or (rank is not None and scores.shape[-1] != rank):
        raise ValueError(f"longshort.projection_scores: expected [*B, S, K, r] = [{', '.join(map(str, want))}, "
                         f"{rank or 'r'}] (one row per key position; a KV-cache decode step sees only the new "
                         f"tokens' inputs, so decoding needs the key-side projection), got {scores.shape}")
    return scores.reshape(B, S, K, scores.shape[-1])


def _relative_weights(weights, N: int, K: int, H: int):
    if not isinstance(weights, (tuple, list)) or len(weights) != 5:
        raise ValueError(f"longshort.relative_positions: expected (window_net [P, N, H], chunk_net [P, N, H], "
                         f"chunk_bias [N, H], content_bias [N, H], position_bias [N, H]), got {type(weights)}")
    window_net, chunk_net, chunk_bias, content_bias, position_bias = (jnp.asarray(x, jnp.float32) for x in weights)
    P = window_net.shape[0] if window_net.ndim == 3 else 0
    if (P < 2 or P % 2 or window_net.shape != (P, N, H) or chunk_net.shape != (P, N, H)
            or any(x.shape != (N, H) for x in (chunk_bias, content_bias, position_bias))):
        raise ValueError(f"longshort.relative_positions: expected nets [P, {N}, {H}] with an even P and biases "
                         f"[{N}, {H}], got {[tuple(x.shape) for x in weights]}")
    G = N // K
    return (window_net.reshape(P, K, G, H), chunk_net.reshape(P, K, G, H), chunk_bias.reshape(K, G, H),
            content_bias.reshape(K, G, H), position_bias.reshape(K, G, H))


def _sinusoid(distances, width: int):
    """The code's PositionalEmbedding: [sin(d f), cos(d f)], f_i = 10000^(-2i / width); distances [...] -> [..., P]."""
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, width, 2, dtype=jnp.float32) / width))
    angles = distances.astype(jnp.float32)[..., None] * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _mix(score_parts, value_parts):
    """One softmax over the concatenated score blocks [..., r_i], then the matching value sums."""
    probs = jax.nn.softmax(jnp.concatenate(score_parts, axis=-1), axis=-1)
    out, start = 0.0, 0
    for scores, (equation, values) in zip(score_parts, value_parts):
        width = scores.shape[-1]
        out = out + jnp.einsum(equation, probs[..., start:start + width], values, precision=HIGHEST)
        start += width
    return out


def _non_causal(q, k, v, logits, norms, w, chunk_size, dense):
    del chunk_size
    wn_scale, wn_bias, pn_scale, pn_bias = norms
    B, T = q.shape[:2]
    k_win, v_win = layer_norm(k, wn_scale, wn_bias), layer_norm(v, wn_scale, wn_bias)
    p = jax.nn.softmax(logits, axis=1)
    k_bar = layer_norm(jnp.einsum("bskr,bskh->brkh", p, k_win, precision=HIGHEST), pn_scale, pn_bias)
    v_bar = layer_norm(jnp.einsum("bskr,bskh->brkh", p, v_win, precision=HIGHEST), pn_scale, pn_bias)
    long_scores = jnp.einsum("btkgh,brkh->btkgr", q, k_bar, precision=HIGHEST)
    e = max(w // 2, 1)
    if dense:  # [T, S] mask of the block-wise window
        t, s = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
        start = (t // w) * w - e
        visible = (s >= start) & (s < start + w + 2 * e)
        short = jnp.einsum("btkgh,bskh->btkgs", q, k_win, precision=HIGHEST)
        short = jnp.where(visible[None, :, None, None, :], short, -jnp.inf)
        return _mix([long_scores, short], [("btkgr,brkh->btkgh", v_bar), ("btkgs,bskh->btkgh", v_win)])
    # Blocked: pad to whole blocks plus e on each side; block b reads the w + 2e keys starting at b w.
    nb = -(-T // w)
    pad = ((0, 0), (e, nb * w - T + e), (0, 0), (0, 0))
    kp, vp = jnp.pad(k_win, pad), jnp.pad(v_win, pad)
    idx = jnp.arange(nb)[:, None] * w + jnp.arange(w + 2 * e)[None, :]  # [nb, w + 2e] in padded coordinates
    valid = (idx >= e) & (idx < T + e)
    k_tiles, v_tiles = kp[:, idx], vp[:, idx]  # [B, nb, w + 2e, K, H]
    qb = jnp.pad(q, ((0, 0), (0, nb * w - T), (0, 0), (0, 0), (0, 0))).reshape(B, nb, w, *q.shape[2:])
    short = jnp.einsum("bnikgh,bnjkh->bnikgj", qb, k_tiles, precision=HIGHEST)
    short = jnp.where(valid[None, :, None, None, None, :], short, -jnp.inf)
    long_b = jnp.pad(long_scores, ((0, 0), (0, nb * w - T), (0, 0), (0, 0), (0, 0))).reshape(B, nb, w,
                                                                                              *long_scores.shape[2:])
    out = _mix([long_b, short], [("bnikgr,brkh->bnikgh", v_bar), ("bnikgj,bnjkh->bnikgh", v_tiles)])
    return out.reshape(B, nb * w, *out.shape[3:])[:, :T]


def _causal(q, k, v, logits, norms, w, c, dense, rel=None):
    """rel: CausalLS's relative terms (see `longshort_attention`); as in the code's `attn`, the window score is
    (q + u) . k_s + (q + v_r) . R_w(t - s) and the chunk score q . k_bar_j + q . R_c(d_j), where chunk vector j =
    (chunk c, slot rho) seen from query chunk a has distance d_j = (a - c) r - 1 - rho (what `_rel_shift_chunked`
    computes: the code's memory chunks shift both indices alike, so d does not depend on mem_len)."""
    wn_scale, wn_bias, pn_scale, pn_bias = norms
    B, T = q.shape[:2]
    if rel is not None:
        window_net, chunk_net, chunk_bias, content_bias, position_bias = rel
        P = window_net.shape[0]
        r_window = jnp.einsum("dp,pkgh->dkgh", _sinusoid(jnp.arange(w), P), window_net, precision=HIGHEST)
        q_content, q_position = q + content_bias, q + position_bias  # [B, T, K, G, H]
    k_win, v_win = layer_norm(k, wn_scale, wn_bias), layer_norm(v, wn_scale, wn_bias)
    # Segment-wise projection: chunk j's r vectors mix its own c positions only (the last chunk may be partial:
    # padded positions get -inf logits; only queries after a chunk's end see it, so they see whole chunks).
    nc = -(-T // c)
    pad = ((0, 0), (0, nc * c - T), (0, 0), (0, 0))
    logits = jnp.where((jnp.arange(nc * c) < T)[None, :, None, None], jnp.pad(logits, pad), -jnp.inf)
    p = jax.nn.softmax(logits.reshape(B, nc, c, *logits.shape[2:]), axis=2)  # [B, nc, c, K, r]
    chunks = lambda x: jnp.pad(x, pad).reshape(B, nc, c, *x.shape[2:])
    k_bar = layer_norm(jnp.einsum("bjckr,bjckh->bjrkh", p, chunks(k), precision=HIGHEST), pn_scale, pn_bias)
    v_bar = layer_norm(jnp.einsum("bjckr,bjckh->bjrkh", p, chunks(v), precision=HIGHEST), pn_scale, pn_bias)
    r = logits.shape[-1]
    k_bar, v_bar = k_bar.reshape(B, nc * r, *k.shape[2:]), v_bar.reshape(B, nc * r, *v.shape[2:])
    long_scores = jnp.einsum("btkgh,bjkh->btkgj", q, k_bar, precision=HIGHEST)
    if rel is not None:  # distance of chunk vector j from query t: (t // c) r - 1 - j (>= 0 where visible)
        distance = (jnp.arange(T) // c)[:, None] * r - 1 - jnp.arange(nc * r)[None, :]  # [T, nc r]
        r_chunk = jnp.einsum("dp,pkgh->dkgh", _sinusoid(jnp.arange(nc * r), P), chunk_net,
                             precision=HIGHEST) + chunk_bias  # [nc r distances, K, G, H]
        index = jnp.clip(distance, 0, nc * r - 1)
        if dense:  # the embedding of each (t, j) pair gathered explicitly
            long_scores = long_scores + jnp.einsum("btkgh,tjkgh->btkgj", q, r_chunk[index], precision=HIGHEST)
        else:  # q . R_c(d) for every distance, then each (t, j) reads its own
            by_distance = jnp.einsum("btkgh,dkgh->btkgd", q, r_chunk, precision=HIGHEST)
            long_scores = long_scores + jnp.take_along_axis(by_distance, index[None, :, None, None, :], axis=-1)
    chunk_of = jnp.repeat(jnp.arange(nc), r)  # [nc r]
    long_visible = chunk_of[None, :] < (jnp.arange(T) // c)[:, None]  # [T, nc r]: chunks ended before t's chunk
    long_scores = jnp.where(long_visible[None, :, None, None, :], long_scores, -jnp.inf)
    long_part = ("btkgj,bjkh->btkgh", v_bar)
    if dense:
        t, s = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
        visible = (s <= t) & (s > t - w)
        short = jnp.einsum("btkgh,bskh->btkgs", q if rel is None else q_content, k_win, precision=HIGHEST)
        if rel is not None:
            r_ts = r_window[jnp.clip(t - s, 0, w - 1)]  # [T, S, K, G, H]
            short = short + jnp.einsum("btkgh,tskgh->btkgs", q_position, r_ts, precision=HIGHEST)
        short = jnp.where(visible[None, :, None, None, :], short, -jnp.inf)
        return _mix([long_scores, short], [long_part, ("btkgs,bskh->btkgh", v_win)])
    # Blocked: query block b (w queries) reads keys [b w - w, b w + w); row i keeps offsets i + 1 .. i + w.
    nb = -(-T // w)
    pad_w = ((0, 0), (w, nb * w - T), (0, 0), (0, 0))
    kp, vp = jnp.pad(k_win, pad_w), jnp.pad(v_win, pad_w)
    idx = jnp.arange(nb)[:, None] * w + jnp.arange(2 * w)[None, :]  # padded coordinates; real s = idx - w
    k_tiles, v_tiles = kp[:, idx], vp[:, idx]  # [B, nb, 2w, K, H]
    i, j = jnp.arange(w)[:, None], jnp.arange(2 * w)[None, :]
    visible = (j > i) & (j <= i + w) & (idx[:, None, :] >= w)  # [nb, w, 2w]
    padq = ((0, 0), (0, nb * w - T), (0, 0), (0, 0), (0, 0))
    tiles = lambda x: jnp.pad(x, padq).reshape(B, nb, w, *x.shape[2:])
    short = jnp.einsum("bnikgh,bnjkh->bnikgj", tiles(q if rel is None else q_content), k_tiles, precision=HIGHEST)
    if rel is not None:  # tile column j holds s = t - (w + i - j): distance w + i - j
        by_distance = jnp.einsum("bnikgh,dkgh->bnikgd", tiles(q_position), r_window, precision=HIGHEST)
        index = jnp.clip(w + i - j, 0, w - 1)  # [w, 2w]
        short = short + jnp.take_along_axis(by_distance, index[None, None, :, None, None, :], axis=-1)
    short = jnp.where(visible[None, :, :, None, None, :], short, -jnp.inf)
    long_b = jnp.pad(long_scores, padq, constant_values=-jnp.inf).reshape(B, nb, w, *long_scores.shape[2:])
    out = _mix([long_b, short], [("bnikgj,bjkh->bnikgh", v_bar), ("bnikgj,bnjkh->bnikgh", v_tiles)])
    return out.reshape(B, nb * w, *out.shape[3:])[:, :T]


def longshort_reference(query, key, value, **kwargs):
    return longshort_attention(query, key, value, implementation="reference", **kwargs)


def longshort_decode(query, key_cache, value_cache, *, query_positions, **kwargs):
    """The registry decode rule: queries at `query_positions` over a KV cache (slot j = position j), equal to the
    rows of the full causal call (window and ended chunks both lie at or before the query)."""
    return decode_through_full_causal(longshort_attention, query, key_cache, value_cache,
                                      query_positions=query_positions, **kwargs)

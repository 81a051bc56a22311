"""DARE: Decoupled Attention and Representation Embeddings (Feng, Pan, Wu, Chen, Wang, Li, Hu, Jiang, Long, 2024,
"Long-Sequence Recommendation Models Need Decoupled Embeddings", arXiv 2410.02604, §3-§4). Official code: thuml/DARE
`model/din_pytorch.py` (the two sets of embedding tables), `model/attention_pytorch.py` (`attention`,
scaled_dot_product / concat time mode), run flags in `scripts/taobao.sh` (-hard_or_soft soft -top_k 20
-use_time_mode concat -time_embedding_dim 16).

Each feature (item, category, time) has two tables, E_att and E_rep. The target and the history are embedded in
both, each embedding being the concatenation of the features' rows (time last):

    q = E_att[target],  K = E_att[history],  V = E_rep[history]
    score_j = q_sem . k_sem_j / sqrt(d_sem) + q_t . k_t_j / sqrt(d_t)     (t = the last d_t = time_dim columns)
    padded history positions get the code's fill -2^32 + 1 before the softmax
    search (GSU, soft): keep the top_k scores of the row (ties and padding as the code: top-k is taken over the
        filled scores, and the second pass masks with the top-k set only), u = softmax(scores over them) . V
    features = [E_rep[target], u, E_rep[target] * u]  -> MLP

TWIN, the baseline, is the same with one set of tables (E_att = E_rep); the paper reports that projecting one table
into two spaces does not work, hence separate tables. Gradients of the logits never reach E_rep.

`decoupled_target_attention` is the recommender form above (one target query per row). `dare_attention` is the
multi-head form on the attention contract, registered as `dare`: key (the logit stream) and value (the
representation stream) may come from different sources, given either as the key/value arguments or as
`kv_source=(key, value)`; the score is split into a semantic and a time part as above (time_dim=0: plain scaled dot
product), and top_k keeps each query's top_k allowed keys. Unlike the code's padding quirk (which can put padded
positions back into the top-k set), only allowed keys are searched here: otherwise causal attention would see the
future when a row has fewer than top_k visible keys.

In the LLM. DARE decouples *embedding tables* of the same ids. An attention layer's keys and values are already
separate linear maps of one hidden state, which is the "projection" variant the paper reports as ineffective for
recommenders. The faithful translation is a representation table indexed by the token ids feeding each layer's
values (what some LMs call value embeddings): `LLMConfig.representation_embeddings=True` (models/llm.py,
models/layers/attention.py `value_vocab`) gives every attention layer its own table [vocab, value heads, head_dim]
whose rows are the values, as `V = E_rep[history]` is in the code (no projection after the lookup), while queries
and keys come from the residual stream, which starts at the token embedding (the attention table). This works with
any mechanism, `dare` (split score, top-k search) included; a layer's attention map does not depend on its table.
Departures: one table per layer rather than one for the model (each layer has its own values, as each of the
recommender's one attention has); deeper layers' queries and keys see earlier layers' outputs, so only within a
layer are the two streams fully separate.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from attnx.mask import Mask
from attnx.ops.builtin import softmax_attention, softmax_decode

MASK_FILL = -(2.0**32) + 1  # the code's fill for padded history positions


def embed(tables: Sequence[jax.Array], ids: Sequence[jax.Array]) -> jax.Array:
    """Concatenated rows of each feature's table: tables[f] [V_f, d_f], ids[f] [*B] -> [*B, sum_f d_f]."""
    if len(tables) != len(ids):
        raise ValueError(f"dare.embed: {len(tables)} tables but {len(ids)} id arrays")
    return jnp.concatenate([jnp.take(table, i, axis=0) for table, i in zip(tables, ids)], axis=-1)


def _check_time_dim(time_dim, width: int, name: str) -> None:
    if not isinstance(time_dim, int) or isinstance(time_dim, bool) or not 0 <= time_dim < width:
        raise ValueError(f"{name}.time_dim: expected an int in [0, {width}) (columns of the {width}-wide "
                         f"attention embedding), got {time_dim!r}")


def target_scores(target_att, history_att, *, time_dim: int = 0):
    """[*B, D] x [*B, S, D] -> [*B, S]: semantic and time parts, each scaled by its own sqrt(dim) (concat mode)."""
    width = target_att.shape[-1]
    _check_time_dim(time_dim, width, "dare")
    q, k = target_att.astype(jnp.float32), history_att.astype(jnp.float32)
    dot = lambda a, b: jnp.einsum("...d,...sd->...s", a, b, precision=jax.lax.Precision.HIGHEST)
    split = width - time_dim
    scores = dot(q[..., :split], k[..., :split]) / split**0.5
    if time_dim:
        scores = scores + dot(q[..., split:], k[..., split:]) / time_dim**0.5
    return scores


def _top_k_set(scores, top_k: int):
    """Bool [*B, S]: the code's top-k set (torch.topk of the filled scores; exactly top_k positions)."""
    _, chosen = jax.lax.top_k(scores, top_k)
    return jnp.sum(jax.nn.one_hot(chosen, scores.shape[-1], dtype=jnp.int32), axis=-2) > 0


def decoupled_target_attention(target_att, history_att, history_rep, *, mask=None, time_dim: int = 0,
                               top_k: int | None = None, return_scores: bool = False):
    """u [*B, Dr] = softmax(scores) . history_rep (module docstring), code-exact.

    target_att [*B, Da], history_att [*B, S, Da], history_rep [*B, S, Dr]; mask [*B, S] (True = real behaviour)
    or None; top_k: the soft search's k (None: attend to every unmasked position). With return_scores also the
    filled scores [*B, S] before the search.
    """
    if history_att.shape[:-1] != history_rep.shape[:-1] or target_att.shape[:-1] != history_att.shape[:-2]:
        raise ValueError(f"dare: expected target_att [*B, Da], history_att [*B, S, Da], history_rep [*B, S, Dr], got "
                         f"{target_att.shape}, {history_att.shape}, {history_rep.shape}")
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= history_att.shape[-2]):
        raise ValueError(f"dare.top_k: expected None or an int in [1, {history_att.shape[-2]}], got {top_k!r}")
    scores = target_scores(target_att, history_att, time_dim=time_dim)
    if mask is not None:
        scores = jnp.where(jnp.asarray(mask, bool), scores, MASK_FILL)
    searched = scores
    if top_k is not None:  # the code's second pass: masked by the top-k set alone
        raw = target_scores(target_att, history_att, time_dim=time_dim)
        searched = jnp.where(_top_k_set(scores, top_k), raw, MASK_FILL)
    weights = jax.nn.softmax(searched, axis=-1)
    u = jnp.einsum("...s,...sd->...d", weights, history_rep.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST).astype(history_rep.dtype)
    return (u, scores) if return_scores else u


def dare_features(target_rep, u):
    """The features DIN's MLP sees in DARE's runs (use_cross_feature): [E_rep[target], u, E_rep[target] * u]."""
    return jnp.concatenate([target_rep, u, target_rep * u], axis=-1)


# ---- The multi-head form on the attention contract (registry entry `dare`) ----


def _split_scaled_query(query, time_dim: int):
    """Scales the semantic and time columns of the query by their own 1/sqrt(dim), so that a plain dot product with
    scale 1 gives the split score."""
    width = query.shape[-1]
    _check_time_dim(time_dim, width, "dare")
    split = width - time_dim
    if not time_dim:
        return query * split**-0.5
    return jnp.concatenate([query[..., :split] * split**-0.5, query[..., split:] * time_dim**-0.5], -1)


def _sources(key, value, kv_source):
    """kv_source = (key, value) replaces the arguments; a None element keeps its argument (a model that supplies
    only the representation stream passes (None, values))."""
    if kv_source is None:
        return key, value
    if not isinstance(kv_source, (tuple, list)) or len(kv_source) != 2:
        raise ValueError("dare.kv_source: expected a pair (key from the attention stream, value from the "
                         "representation stream; None keeps the argument)")
    return (key if kv_source[0] is None else kv_source[0]), (value if kv_source[1] is None else kv_source[1])


def _top_k_mask(query, key, causal: bool, top_k: int, positions=None):
    """Dense [*B, N, T, S]: each query's top_k allowed keys by logit (all allowed ones when fewer)."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"dare.top_k: expected None or an int >= 1, got {top_k!r}")
    *batch, t, n, h = query.shape
    s, kh = key.shape[-3], key.shape[-2]
    q = query.astype(jnp.float32).reshape(*batch, t, kh, n // kh, h)
    logits = jnp.einsum("...tkgh,...skh->...kgts", q, key.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    logits = logits.reshape(*batch, n, t, s)
    rows = jnp.arange(t)[:, None] if positions is None else jnp.asarray(positions)[:, None]
    allowed = (jnp.arange(s)[None, :] <= rows) if causal else jnp.ones((t, s), bool)
    logits = jnp.where(allowed, logits, -jnp.inf)
    kth = jax.lax.top_k(logits, min(top_k, s))[0][..., -1:]
    return allowed & (logits >= kth)


def dare_attention(query, key, value, *, causal: bool = False, time_dim: int = 0, top_k: int | None = None,
                   kv_source=None, mask: Mask | None = None, **kwargs):
    """Multi-head DARE attention (module docstring): logits from `key` (the attention stream), values from `value`
    (the representation stream), or from kv_source=(key, value). kwargs go to softmax attention."""
    key, value = _sources(key, value, kv_source)
    q = _split_scaled_query(query, time_dim)
    if top_k is not None:
        search = Mask(dense=_top_k_mask(q, key, causal, top_k))
        mask = search if mask is None else mask & search
    return softmax_attention(q, key, value, causal=causal, mask=mask, scale=1.0, **kwargs)


def dare_reference(query, key, value, **kwargs):
    return dare_attention(query, key, value, implementation="reference", **kwargs)


def dare_decode(query, key_cache, value_cache, *, query_positions, time_dim: int = 0, top_k: int | None = None,
                kv_source=None, mask: Mask | None = None, **kwargs):
    """Causal DARE over a KV cache (slot j = position j); the top-k search runs over the visible slots."""
    key_cache, value_cache = _sources(key_cache, value_cache, kv_source)
    q = _split_scaled_query(query, time_dim)
    if top_k is not None:
        search = Mask(dense=_top_k_mask(q, key_cache, True, top_k, positions=query_positions))
        mask = search if mask is None else mask & search
    return softmax_decode(q, key_cache, value_cache, query_positions=query_positions, mask=mask, scale=1.0, **kwargs)

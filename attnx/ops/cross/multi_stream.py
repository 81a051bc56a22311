"""Decoupled multi-stream cross-attention: one query, several key/value streams, one softmax per stream.

IP-Adapter (Ye, Zhang, Liu, Han, Yang, 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models", arXiv 2308.06721, §3.2.2 "Decoupled Cross-Attention"; official code tencent-ailab/IP-Adapter
`ip_adapter/attention_processor.py`, `IPAttnProcessor`):

    Z = softmax(Q K_t^T / sqrt(H)) V_t  +  lambda * softmax(Q K_i^T / sqrt(H)) V_i

K_t, V_t come from the text tokens through the frozen W_k, W_v; K_i, V_i from the image tokens through the new
W'_k, W'_v (`to_k_ip`, `to_v_ip`); the sum is formed before the output projection. It is *not* one softmax over the
concatenated tokens (in the code the image tokens are appended to the text context and split off again only to be
attended separately). The same primitive, with more streams or per-query weights, covers:

- MIP-Adapter (Huang et al., 2024, "Resolving Multi-Condition Confusion for Finetuning-Free Personalized Image
  Generation", arXiv 2409.17920, §3.2; code hqhQAQ/MIP-Adapter `ip_adapter/attention_processor_multi.py`): one
  stream per reference object with per-position weights (attnx/ops/cross/mip.py computes them).
- DPDEdit (Wang et al., 2024, "DPDEdit: Detail-Preserved Diffusion Models for Multimodal Fashion Image Editing",
  arXiv 2409.01086, §3.3; code XL-Wang1117/DPDEdit `Decoupled_Cross_Attention_Mechanism/attention_processor.py`,
  of which only compiled files are public): a *dense* second stream, the auxiliary texture UNet's feature map at the
  matching layer flattened to h*w tokens, unmasked. Such a stream can be long (~10^3 tokens), which is why the fast
  path runs each stream through `attnx.dot_product_attention` (tiled on CPU for long keys) instead of
  materialising the logits.
- PortraitTalk (paper only): Z = sum_s lambda_s Attn(Q, K_s, V_s) over text, identity and audio streams.

Layout (ARCHITECTURE §4): query [*B, T, N, H]; each stream (key [*B, S_s, K_s, H], value [*B, S_s, K_s, V],
weight), with its own length S_s and its own number of key/value heads K_s dividing N (GQA per stream). The weight
is a scalar, [*B, T] (per query position, MIP) or [*B, T, N] (per position and head). A weight that is the Python
number 0 skips its stream (its output would be multiplied by 0 anyway); array weights are always computed.

`ip_adapter_attention` is the registry form (`ip_adapter`): `key`/`value` are the base (text) stream with weight 1,
`image_key`/`image_value` the image stream with weight `scale` (IP-Adapter's lambda, default 1.0 as in the code),
and `streams` any further (key, value, weight) triples. It is non-causal: causal=True raises (patterns NS and NC;
NS is the degenerate case of a single stream taken from the queries' own tokens).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp

from attnx.api import dot_product_attention
from attnx.validation import canonicalize


def _is_static_zero(weight) -> bool:
    return isinstance(weight, numbers.Number) and not isinstance(weight, bool) and weight == 0


def _check_streams(name: str, query, streams) -> list[tuple]:
    """Validates shapes once, at the public entry, and returns the streams as a list of triples."""
    if isinstance(streams, (str, bytes)) or not isinstance(streams, Sequence) or not streams:
        raise ValueError(f"{name}.streams: expected a non-empty sequence of (key, value, weight) triples, got "
                         f"{type(streams).__name__}")
    query = jnp.asarray(query)
    batch_shape, (T, N, _) = query.shape[:-3], query.shape[-3:]
    value_dim = None
    out = []
    for index, stream in enumerate(streams):
        if not isinstance(stream, (tuple, list)) or len(stream) != 3:
            raise ValueError(f"{name}.streams[{index}]: expected a (key, value, weight) triple, got {stream!r:.80}")
        key, value, weight = stream
        try:  # the attention contract's own checks: ranks, batch dims, head dim, GQA divisibility, dtypes
            canonicalize(query, key, value)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{name}.streams[{index}]: {error}") from error
        V = jnp.shape(value)[-1]
        if value_dim is not None and V != value_dim:
            raise ValueError(f"{name}.streams[{index}]: value head dim {V} differs from the first stream's "
                             f"{value_dim}; the stream outputs are summed, so they must agree")
        value_dim = V
        if isinstance(weight, bool) or weight is None:
            raise ValueError(f"{name}.streams[{index}]: weight must be a number or an array, got {weight!r}")
        shape = jnp.shape(weight)
        allowed = ((), (*batch_shape, T), (*batch_shape, T, N))
        if shape not in allowed:
            raise ValueError(f"{name}.streams[{index}]: weight shape {shape} is not a scalar, [*B, T] = "
                             f"{allowed[1]} or [*B, T, N] = {allowed[2]}")
        out.append((key, value, weight))
    return out


def _weighted(out: jax.Array, weight, batch_rank: int) -> jax.Array:
    """out [*B, T, N, V] (float32) times a scalar / [*B, T] / [*B, T, N] weight."""
    w = jnp.asarray(weight, jnp.float32)
    extra = w.ndim - batch_rank if w.ndim else None
    if extra == 1:  # [*B, T]
        w = w[..., None, None]
    elif extra == 2:  # [*B, T, N]
        w = w[..., None]
    return out * w


def multi_stream_cross_attention(query, streams, *, scale: float | None = None, implementation=None) -> jax.Array:
    """sum_s w_s * softmax(scale * q k_s^T) v_s  ->  [*B, T, N, V] in the query's dtype.

    query [*B, T, N, H]; streams: sequence of (key [*B, S_s, K_s, H], value [*B, S_s, K_s, V], weight) with weight a
    scalar, [*B, T] or [*B, T, N]. scale: the logit scale of every stream (default 1 / sqrt(H), as
    `F.scaled_dot_product_attention` in the official processors). implementation: passed to
    `attnx.dot_product_attention` for each stream (None picks the best available, tiled for long streams on CPU);
    "pallas_gpu" or a `MultiStreamPallas` config instead runs all streams in one fused kernel
    (attnx/ops/cross/pallas_gpu.py: one query tile, one online softmax per stream).
    """
    streams = _check_streams("multi_stream_cross_attention", query, streams)
    if implementation is not None:
        from attnx.ops.cross import pallas_gpu  # imported only when an implementation is named (Pallas is heavy)

        if implementation == "pallas_gpu" or isinstance(implementation, pallas_gpu.MultiStreamPallas):
            config = None if implementation == "pallas_gpu" else implementation
            return pallas_gpu.multi_stream_pallas(query, streams, scale=scale, config=config)
    query = jnp.asarray(query)
    batch_rank = query.ndim - 3
    total = None
    for key, value, weight in streams:
        if _is_static_zero(weight):
            continue
        out = dot_product_attention(query, key, value, scale=scale, implementation=implementation)
        term = _weighted(out.astype(jnp.float32), weight, batch_rank)
        total = term if total is None else total + term
    if total is None:  # every stream weighted by a literal 0
        total = jnp.zeros((*query.shape[:-1], jnp.shape(streams[0][1])[-1]), jnp.float32)
    return total.astype(query.dtype)


def _naive_attention(q, k, v, scale):
    """Materialised softmax attention in float32 at the highest precision; GQA by grouping query heads."""
    *batch, T, N, H = q.shape
    K = k.shape[-2]
    qg = q.astype(jnp.float32).reshape(*batch, T, K, N // K, H)
    logits = jnp.einsum("...tkgh,...skh->...kgts", qg, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("...kgts,...skv->...tkgv", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(*batch, T, N, v.shape[-1])


def multi_stream_reference(query, streams, *, scale: float | None = None) -> jax.Array:
    """The naive oracle of `multi_stream_cross_attention`: every stream's logits materialised, float32."""
    streams = _check_streams("multi_stream_reference", query, streams)
    query = jnp.asarray(query)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    total = sum(_weighted(_naive_attention(query, jnp.asarray(k), jnp.asarray(v), scale), w, query.ndim - 3)
                for k, v, w in streams)
    return total.astype(query.dtype)


def _registry_streams(name, key, value, causal, image_key, image_value, scale, streams):
    if causal:
        raise ValueError(f"{name}: decoupled cross-attention is non-causal (CAB patterns NS and NC); got causal=True")
    if (image_key is None) != (image_value is None):
        raise ValueError(f"{name}: image_key and image_value must be given together (got image_key "
                         f"{'set' if image_key is not None else 'None'}, image_value "
                         f"{'set' if image_value is not None else 'None'})")
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Number, jax.Array)):
        raise ValueError(f"{name}.scale: expected the image stream's weight lambda (a number or array), got "
                         f"{scale!r}")
    out = [(key, value, 1.0)]
    if image_key is not None:
        out.append((image_key, image_value, scale))
    return out + list(streams)


def ip_adapter_attention(query, key, value, *, causal: bool = False, image_key=None, image_value=None,
                         scale: float = 1.0, streams: Sequence = (), softmax_scale: float | None = None,
                         implementation=None) -> jax.Array:
    """IP-Adapter decoupled cross-attention on the registry calling convention (see the module docstring).

    key/value: the base (text) stream, weight 1. image_key [*B, S_i, K_i, H] / image_value: the image stream,
    weight `scale` (lambda; 0 gives the base attention exactly). streams: further (key, value, weight) triples
    (DPDEdit's dense texture stream, MIP's per-object streams). softmax_scale: logit scale (default 1/sqrt(H)).
    """
    all_streams = _registry_streams("ip_adapter", key, value, causal, image_key, image_value, scale, streams)
    return multi_stream_cross_attention(query, all_streams, scale=softmax_scale, implementation=implementation)


def ip_adapter_reference(query, key, value, *, causal: bool = False, image_key=None, image_value=None,
                         scale: float = 1.0, streams: Sequence = (), softmax_scale: float | None = None,
                         implementation=None) -> jax.Array:
    del implementation
    all_streams = _registry_streams("ip_adapter", key, value, causal, image_key, image_value, scale, streams)
    return multi_stream_reference(query, all_streams, scale=softmax_scale)

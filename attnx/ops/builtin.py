"""Registry entries of the mechanisms that live in the core: `softmax` and `sliding_window`."""

from __future__ import annotations

import jax.numpy as jnp

from attnx.api import dot_product_attention, implementation_names
from attnx.mask import Mask
from attnx.registry import AttentionSpec, register_attention


def softmax_attention(query, key, value, *, causal: bool = False, bias=None, mask: Mask | None = None, **kwargs):
    """Standard multi-head scaled dot-product attention (Vaswani et al., 2017, "Attention Is All You Need",
    §3.2), with GQA/MQA (Ainslie et al., 2023, arXiv 2305.13245) when key/value have fewer heads. All four CAB
    patterns; causal cross attention aligns the diagonal top-left (query t sees keys 0..t) unless `mask` says
    otherwise."""
    m = Mask(causal=causal)
    if mask is not None:
        m = m & mask
    return dot_product_attention(query, key, value, bias, m, **kwargs)


def _position_mask(query_positions, cache_length: int, window: int | None = None) -> Mask:
    """Query at absolute position p sees cache slots j <= p (and p - j < window): a dense [T, L] mask, which is
    small because decoding feeds one or a few queries at a time."""
    q = jnp.asarray(query_positions)[:, None]
    k = jnp.arange(cache_length)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    return Mask(dense=allowed)


def softmax_decode(query, key_cache, value_cache, *, query_positions, mask: Mask | None = None, **kwargs):
    """Causal softmax attention of queries at `query_positions` over a KV cache (slot j = position j)."""
    m = _position_mask(query_positions, key_cache.shape[-3])
    return dot_product_attention(query, key_cache, value_cache, mask=m if mask is None else m & mask, **kwargs)


def softmax_reference(query, key, value, *, causal: bool = False, **kwargs):
    return softmax_attention(query, key, value, causal=causal, implementation="reference", **kwargs)


def sliding_window_attention(query, key, value, *, window: int = 16, causal: bool = False, mask=None, **kwargs):
    """Local (sliding-window) attention as in CAB's `local` attention (Zhang et al., 2023, §3.1; Shark-NLP/CAB
    `local_attention.py`) and the window of StreamingLLM / Mistral.

    Non-causal: query i sees keys [i - window, i + window]. Causal: query i sees the `window` most recent keys,
    [i - window + 1, i]. Self attention only (NS, CS): a window over positions needs queries and keys on one axis.
    Fast paths skip every key block outside the band, so cost is O(T·window)."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window.window: expected an int >= 1, got {window!r}")
    if query.shape[-3] != key.shape[-3]:
        raise ValueError(f"sliding_window: self attention only (patterns NS, CS), got query length "
                         f"{query.shape[-3]} and key length {key.shape[-3]}")
    m = Mask(causal=True, window=(window - 1, 0)) if causal else Mask(window=(window, window))
    if mask is not None:
        m = m & mask
    return dot_product_attention(query, key, value, mask=m, **kwargs)


def sliding_window_decode(query, key_cache, value_cache, *, query_positions, window: int = 16, mask=None,
                          **kwargs):
    """Causal sliding-window attention over a KV cache: the `window` most recent positions up to each query."""
    m = _position_mask(query_positions, key_cache.shape[-3], window)
    return dot_product_attention(query, key_cache, value_cache, mask=m if mask is None else m & mask, **kwargs)


def sliding_window_reference(query, key, value, *, window: int = 16, causal: bool = False, **kwargs):
    return sliding_window_attention(query, key, value, window=window, causal=causal, implementation="reference",
                                    **kwargs)


def block_sparse_attention(query, key, value, *, causal: bool = False, block_mask=None,
                           block_size: tuple[int, int] = (64, 64), mask: Mask | None = None, **kwargs):
    """Softmax attention restricted to the live blocks of `block_mask` [..., ceil(T/bq), ceil(S/bk)] (True =
    computed), broadcastable to [*B, N, nT, nS] at `block_size` = (bq, bk): the generic pattern behind
    SeerAttention's gated blocks, MoA's per-head block lists and landmark retrieval (spec llm_mechanisms.md §2,
    §6). The chunked path skips dead blocks; rows with no live key return 0. block_mask=None keeps every block
    (plain softmax attention), so the mechanism fits every CAB pattern."""
    m = Mask(causal=causal)
    if block_mask is not None:
        m = m & Mask(block_mask=block_mask, block_size=tuple(block_size))
    if mask is not None:
        m = m & mask
    return dot_product_attention(query, key, value, mask=m, **kwargs)


def block_sparse_reference(query, key, value, **kwargs):
    return block_sparse_attention(query, key, value, implementation="reference", **kwargs)


register_attention(AttentionSpec(
    name="block_sparse",
    fn=block_sparse_attention,
    reference=block_sparse_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="generic block-sparse attention as used by SeerAttention (Gao et al., 2024, arXiv 2410.13276, §3) and "
          "MoA (Fu et al., 2024, arXiv 2406.14909)",
    implementations=implementation_names(),
    defaults={"block_size": (64, 64)},
    description="softmax attention over the live blocks of a block mask",
))

register_attention(AttentionSpec(
    name="softmax",
    fn=softmax_attention,
    reference=softmax_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="Vaswani et al., 2017, Attention Is All You Need, arXiv 1706.03762, §3.2; GQA: Ainslie et al., 2023, "
          "arXiv 2305.13245",
    implementations=implementation_names(),
    aliases=("mha", "dot_product"),
    description="standard multi-head / grouped-query softmax attention",
    decode=softmax_decode,
))

register_attention(AttentionSpec(
    name="sliding_window",
    fn=sliding_window_attention,
    reference=sliding_window_reference,
    patterns=frozenset({"NS", "CS"}),
    paper="local attention as benchmarked in CAB (Zhang et al., 2023, arXiv 2210.07661, §3.1); sliding window of "
          "Longformer (Beltagy et al., 2020) / Mistral 7B (Jiang et al., 2023)",
    implementations=implementation_names(),
    aliases=("local",),
    defaults={"window": 16},
    description="band of `window` keys around (or before) each query",
    decode=sliding_window_decode,
))

"""StreamingLLM (spec llm_mechanisms.md §8): the sink + window mask, the bounded cache, and the exact identities of
decoding past the window: with positions inside the cache (the paper's method) a step equals a fresh forward pass
over [sinks | recent]; with absolute positions it equals the full-sequence forward."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnx
from attnx.ops.streaming import sink_window_decode, sink_window_init, streaming_attention
from attnx.testing.tolerances import assert_close
from models.layers.attention import Attention
from models.llm import LLM, LLMConfig
from models.sampling import generate

SINK, WINDOW, STEPS = 2, 5, 17
KWARGS = {"sink": SINK, "window": WINDOW}


def test_mask_is_sinks_plus_the_recent_window():
    x = jax.random.normal(jax.random.key(0), (1, 12, 2, 4))
    t, j = np.arange(12)[:, None], np.arange(12)[None, :]
    allowed = (j <= t) & ((j < SINK) | (t - j < WINDOW))
    want = attnx.dot_product_attention(x, x, x, mask=jnp.asarray(allowed), implementation="reference")
    assert_close(streaming_attention(x, x, x, **KWARGS), want, jnp.float32)


def test_a_window_covering_the_stream_is_dense_causal_attention():
    x = jax.random.normal(jax.random.key(0), (1, 9, 2, 4))
    want = attnx.dot_product_attention(x, x, x, mask=attnx.Mask(causal=True), implementation="reference")
    assert_close(streaming_attention(x, x, x, sink=0, window=9), want, jnp.float32)


@pytest.fixture(scope="module")
def layer():
    return Attention(16, 4, 2, 8, kind="streaming", kind_kwargs=KWARGS, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def stream():
    return jax.random.normal(jax.random.key(1), (2, STEPS, 16))


# Compiled once per shape: eager NNX calls dispatch op by op, which dominated these tests.
_forward = nnx.jit(lambda layer, x: layer(x))
_decode = nnx.jit(lambda layer, x, cache, index: layer.decode(x, cache, index))


def _decode_all(layer, stream, prefill: int):
    """Prefill `prefill` tokens in one call, then one token per call; returns every output row and the cache."""
    cache = layer.init_cache(2, 10_000)
    out, cache = _decode(layer, stream[:, :prefill], cache, jnp.int32(0))
    rows = [out]
    for t in range(prefill, STEPS):
        out, cache = _decode(layer, stream[:, t:t + 1], cache, jnp.int32(t))
        rows.append(out)
    return jnp.concatenate(rows, axis=1), cache


@pytest.mark.parametrize("prefill", [1, 9], ids=["token_by_token", "prefill_past_the_window"])
def test_each_step_equals_a_fresh_forward_over_sinks_and_recent(layer, stream, prefill):
    got, cache = _decode_all(layer, stream, prefill)
    assert cache["key"].shape[1] == SINK + WINDOW  # bounded: 10,000 positions were asked for
    for t in range(STEPS):
        view = list(range(min(SINK, t + 1))) + list(range(max(SINK, t - WINDOW + 1), t + 1))
        fresh = _forward(layer, stream[:, jnp.asarray(view)])  # positions 0 .. len(view) - 1, as a new sequence
        np.testing.assert_allclose(got[:, t], fresh[:, -1], rtol=2e-5, atol=2e-5, err_msg=f"step {t}")


def test_without_position_shift_decode_equals_the_full_forward(stream):
    layer = Attention(16, 4, 2, 8, kind="streaming", kind_kwargs={**KWARGS, "position_shift": False},
                      rngs=nnx.Rngs(0))
    got, _ = _decode_all(layer, stream, 3)
    np.testing.assert_allclose(got, _forward(layer, stream), rtol=2e-5, atol=2e-5)


def test_cache_keeps_exactly_the_sinks_and_the_recent_positions():
    cache = sink_window_init(1, 100, (1, 2), (1, 2), jnp.float32, **KWARGS)
    q = jnp.ones((1, 1, 1, 2))
    for t in range(11):
        _, cache = sink_window_decode(q, q * t, q, cache, jnp.int32(t), rope_theta=None, **KWARGS)
    assert sorted(np.asarray(cache["position"]).tolist()) == [0, 1, 6, 7, 8, 9, 10]
    np.testing.assert_array_equal(cache["key"][0, :, 0, 0], cache["position"].astype(jnp.float32))


def test_generate_streams_past_the_cache_size():
    config = LLMConfig(vocab_size=31, width=16, depth=2, num_heads=2, num_kv_heads=1, mlp_width=24,
                       attention="streaming", attention_kwargs=KWARGS)
    model = LLM(config, rngs=nnx.Rngs(0))
    tokens = generate(model, jnp.zeros((1, 3), jnp.int32), max_new_tokens=12, rng=jax.random.key(0))
    assert tokens.shape[-1] in (12, 15) and bool(jnp.all((tokens >= 0) & (tokens < 31)))
    assert all(c["key"].shape[1] == SINK + WINDOW for c in model.init_cache(1, 15))


@pytest.mark.parametrize("kwargs, message", [({"sink": -1}, "streaming.sink"), ({"window": 0}, "streaming.window")])
def test_bad_settings_are_named(kwargs, message):
    x = jnp.ones((1, 3, 1, 2))
    with pytest.raises(ValueError, match=message):
        streaming_attention(x, x, x, **{**KWARGS, **kwargs})
    with pytest.raises(ValueError, match="causal self attention only"):
        streaming_attention(x, x, x, causal=False)

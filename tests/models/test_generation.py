"""KV-cache decoding, generate() and the logits filters; the LLM presets' shapes and parameter counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnx
from attnx import registry
from models.llm import LLM, LLMConfig, llm_config
from models.sampling import filter_logits, generate, sample_logits

# B=2, T=7 tokens, width 24, N=4 heads of H=6 over K=2 kv heads, F=40: distinct sizes per axis.
BASE = LLMConfig(vocab_size=97, width=24, depth=2, num_heads=4, num_kv_heads=2, mlp_width=40)
VARIANTS = {
    "softmax": BASE,
    "sliding_window_3": dataclasses.replace(BASE, attention="sliding_window", attention_kwargs={"window": 3}),
    "lightning": dataclasses.replace(BASE, attention="lightning"),
    "based_qk4_no_mlp": dataclasses.replace(BASE, attention="based", qk_head_dim=4, use_mlp=False),
    "moh_around_sliding_window": dataclasses.replace(BASE, attention="moh", attention_kwargs={
        "n_shared": 1, "top_k": 2, "core": "sliding_window", "core_kwargs": {"window": 3}}),
    "moh_param_free": dataclasses.replace(BASE, attention="moh", attention_kwargs={
        "n_shared": 2, "top_k": 1, "param_free": True}),
    "diffqkv_k1_v2_augmented_q": dataclasses.replace(BASE, attention="diffqkv", num_kv_heads=1, num_value_heads=2,
                                                     query_hidden_dim=36),
    "qk_norm_untied_soft_cap": dataclasses.replace(BASE, qk_norm=True, tie_embeddings=False,
                                                   attention_kwargs={"logits_soft_cap": 2.0}),
}


# Compiled once per variant and shape: eager NNX calls dispatch op by op, which dominated these tests' time.
_forward = nnx.jit(lambda model, tokens: model(tokens))
_decode = nnx.jit(lambda model, tokens, cache, index: model.decode(tokens, cache, index))


@pytest.mark.parametrize("name", VARIANTS)
def test_decode_step_equals_the_last_row_of_a_full_forward(name):
    model = LLM(VARIANTS[name], rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 97)
    full = _forward(model, tokens)
    cache = model.init_cache(2, 9)  # longer than the sequence: unwritten slots must not be attended
    prefill, cache = _decode(model, tokens[:, :4], cache, jnp.int32(0))
    np.testing.assert_allclose(prefill, full[:, :4], rtol=1e-5, atol=1e-5)
    for position in range(4, 7):
        step, cache = _decode(model, tokens[:, position : position + 1], cache, jnp.int32(position))
        np.testing.assert_allclose(step[:, 0], full[:, position], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # default-suite time budget: decode-step equality per mechanism runs by default
def test_greedy_generate_equals_argmax_of_repeated_full_forwards():
    model = LLM(VARIANTS["sliding_window_3"], rngs=nnx.Rngs(3))
    prompt = jax.random.randint(jax.random.key(4), (2, 3), 0, 97)
    out = generate(model, prompt, 5)
    expected = prompt
    for _ in range(5):
        next_token = jnp.argmax(_forward(model, expected)[:, -1], axis=-1)
        expected = jnp.concatenate([expected, next_token[:, None].astype(expected.dtype)], axis=1)
    np.testing.assert_array_equal(out, expected)
    # top-k 1 and a tiny nucleus leave only the argmax, whatever the temperature.
    np.testing.assert_array_equal(generate(model, prompt, 5, rng=jax.random.key(0), temperature=5.0, top_k=1),
                                  expected)
    np.testing.assert_array_equal(generate(model, prompt, 5, rng=jax.random.key(0), temperature=5.0, top_p=1e-6),
                                  expected)


def test_sampling_is_seeded_and_varies_with_the_seed():
    model = LLM(BASE, rngs=nnx.Rngs(5))
    prompt = jnp.zeros((2, 2), jnp.int32)
    first = generate(model, prompt, 6, rng=jax.random.key(1), temperature=1.0)
    np.testing.assert_array_equal(first, generate(model, prompt, 6, rng=jax.random.key(1), temperature=1.0))
    assert not np.array_equal(first, generate(model, prompt, 6, rng=jax.random.key(2), temperature=1.0))


def test_filters_keep_the_top_k_and_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept_k = np.isfinite(filter_logits(logits, top_k=2))[0]
    np.testing.assert_array_equal(kept_k, [False, True, False, True, False])
    # Sorted: 0.4, 0.3, 0.15, 0.1, 0.05. Mass before each: 0, 0.4, 0.7, 0.85, 0.95.
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, top_p=0.7))[0], [False, True, False, True, False])
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, top_p=0.71))[0], [False, True, False, True, True])
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, top_k=1, top_p=0.9))[0],
                                  [False, True, False, False, False])
    draws = jax.vmap(lambda r: sample_logits(logits, r, temperature=1.0, top_k=2))(
        jax.random.split(jax.random.key(0), 2000))
    frequencies = np.bincount(np.asarray(draws).ravel(), minlength=5) / 2000
    np.testing.assert_allclose(frequencies, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.04)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be a number >= 0"),
    (dict(top_k=-2), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=0.5), "needs rng"),
])
def test_bad_sampling_settings_are_named(kwargs, message):
    model = LLM(BASE, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        generate(model, jnp.zeros((1, 2), jnp.int32), 3, **kwargs)
    with pytest.raises(ValueError, match="prompt must be int token ids"):
        generate(model, jnp.zeros((2,), jnp.int32), 3)


def test_a_mechanism_without_a_decode_rule_is_refused_by_name(monkeypatch):
    spec = dataclasses.replace(attnx.get_attention("softmax"), name="no_decode", aliases=(), decode=None)
    monkeypatch.setitem(registry._REGISTRY, "no_decode", spec)
    model = LLM(dataclasses.replace(BASE, attention="no_decode"), rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="'no_decode' has no KV-cache decode rule.*softmax"):
        generate(model, jnp.zeros((1, 2), jnp.int32), 2)


def test_a_non_causal_only_mechanism_is_refused_with_the_allowed_ones(monkeypatch):
    spec = dataclasses.replace(attnx.get_attention("softmax"), name="bidirectional_only", aliases=(),
                               patterns=frozenset({"NS"}))
    monkeypatch.setitem(registry._REGISTRY, "bidirectional_only", spec)
    with pytest.raises(ValueError, match="'bidirectional_only' does not support causal.*supports.*'softmax'"):
        LLMConfig(attention="bidirectional_only")


# Published shapes: exact parameter counts (1b is Llama 3.2 1B's 1,235,814,400).
PRESET_PARAMETERS = {"tiny": 820_352, "125m": 123_587_328, "350m": 355_124_224, "1b": 1_235_814_400}


@pytest.mark.parametrize("preset", PRESET_PARAMETERS)
def test_preset_shapes_and_parameter_counts_without_allocating(preset):
    config = llm_config(preset)
    model = nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == PRESET_PARAMETERS[preset]
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, jax.ShapeDtypeStruct((2, 11), jnp.int32))
    assert logits.shape == (2, 11, config.vocab_size) and logits.dtype == jnp.float32

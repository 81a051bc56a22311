"""Autoregressive generation with a KV cache, and the logits filters it samples with (temperature, top-k, top-p).

`generate` works with any model that has `init_cache(batch_size, length)` and `decode(token_ids, cache,
cache_index) -> (logits, cache)`, i.e. `models.llm.LLM`. The prompt is consumed in one prefill call, then one token
per step; every step is the same compiled function, so generation costs one compilation per (shape, settings).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p!r}")


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets to -inf every logit outside the `top_k` largest and outside the nucleus of mass `top_p`
    (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration", §3.1: the smallest set of most likely
    tokens whose probability sums to at least top_p). logits [..., V]; ties at a threshold are kept."""
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probabilities = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probabilities, axis=-1) - probabilities
        # A token is in the nucleus while the mass of the tokens ranked above it is still short of top_p.
        in_nucleus = mass_before < top_p
        threshold = jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """One token id per row of logits [B, V]: argmax when temperature is 0, else a draw from the filtered,
    temperature-scaled distribution."""
    _validate_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, *, rng: jax.Array | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             attention_inputs: dict | None = None) -> jax.Array:
    """Continues every row of `prompt` [B, P] (int token ids, all rows the same length) by `max_new_tokens`.

    Returns [B, P + max_new_tokens]. temperature 0 is greedy decoding (rng not needed); otherwise `rng` is required.
    The cache holds exactly P + max_new_tokens positions. Mechanisms without a decode rule raise
    NotImplementedError naming the ones that have one. attention_inputs: run-time attention kwargs (arrays, e.g.
    per-sequence token masks for 'head_modulation'), passed to every `model.decode` call; None (default) passes none.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer) or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt must be int token ids [B, P] with P >= 1, got {prompt.dtype} "
                         f"{prompt.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _validate_sampling(temperature, top_k, top_p)
    if temperature > 0 and rng is None:
        raise ValueError("generate: sampling with temperature > 0 needs rng=jax.random.key(...)")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    if attention_inputs is not None and not isinstance(attention_inputs, dict):
        raise ValueError(f"generate: attention_inputs must be a dict of arrays or None, got {attention_inputs!r}")
    return _generate(graphdef, state, prompt.astype(jnp.int32), rng, max_new_tokens, float(temperature), top_k,
                     float(top_p), attention_inputs)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, state, prompt, rng, max_new_tokens, temperature, top_k, top_p, attention_inputs=None):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = prompt.shape
    cache = model.init_cache(batch, prompt_length + max_new_tokens)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    # only models given attention_inputs are called with them: others keep their plain decode signature
    inputs = {} if attention_inputs is None else {"attention_inputs": attention_inputs}
    logits, cache = model.decode(prompt, cache, jnp.int32(0), **inputs)
    first = sample(logits[:, -1], jax.random.fold_in(rng, 0))

    def step(carry, index):
        token, cache = carry
        logits, cache = model.decode(token[:, None], cache, prompt_length + index, **inputs)
        next_token = sample(logits[:, -1], jax.random.fold_in(rng, index + 1))
        return (next_token, cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(max_new_tokens - 1, dtype=jnp.int32))
    generated = jnp.concatenate([tokens.T, last[:, None]], axis=1)
    return jnp.concatenate([prompt, generated], axis=1)

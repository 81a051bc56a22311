"""The byte-LM task: its loss, bits-per-byte evaluation, compression baselines and sampling against naive versions."""

import gzip
import lzma
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import language_model


@pytest.fixture(scope="module")
def task_and_model(corpus, tiny_task):
    task = tiny_task(corpus)
    return task, task.build_model(nnx.Rngs(0))


def jitted_forward(model):
    """model(tokens [1, t]) as one compiled function per length (eager NNX calls dispatch op by op: slow)."""
    return jax.jit(lambda tokens: model(tokens))


def naive_nats(forward, window: np.ndarray) -> np.ndarray:
    logits = np.asarray(forward(jnp.asarray(window[None, :-1], jnp.int32))[0], np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    return -log_probs[np.arange(len(window) - 1), window[1:]]


def test_evaluation_is_bits_per_byte_over_every_validation_byte(task_and_model):
    task, model = task_and_model
    text = np.frombuffer(task.data.validation_text, np.uint8)
    seq_len = task.data.seq_len
    total, forward = 0.0, jitted_forward(model)
    for start in range(0, len(text) - 1, seq_len):  # each byte after the first, predicted once
        total += naive_nats(forward, text[start : start + seq_len + 1]).sum()
    expected = total / (len(text) - 1) / math.log(2)
    assert task.evaluate(model)["validation_bits_per_byte"] == pytest.approx(expected, rel=1e-5)


def test_baselines_compress_exactly_the_validation_bytes(task_and_model):
    task, model = task_and_model
    text = task.data.validation_text
    results = task.evaluate(model)
    assert results["gzip_bits_per_byte"] == 8 * len(gzip.compress(text, compresslevel=9)) / len(text)
    assert results["xz_bits_per_byte"] == 8 * len(lzma.compress(text, preset=9)) / len(text)


def test_training_loss_is_mean_next_byte_cross_entropy(task_and_model):
    task, model = task_and_model
    tokens = np.stack([np.frombuffer(task.data.validation_text[i : i + 17], np.uint8) for i in (0, 40)])
    loss, metrics = task.loss_fn(model, {"tokens": jnp.asarray(tokens)})
    expected = np.mean([naive_nats(jitted_forward(model), row).mean() for row in tokens])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["bits_per_byte"]) == pytest.approx(expected / math.log(2), rel=1e-5)


def test_greedy_sampling_beyond_the_context_uses_the_latest_window(task_and_model):
    task, model = task_and_model
    # The prompt nearly fills the context, so generation covers both the growing and the sliding window.
    seq_len = task.data.seq_len
    prompt, new = list(range(100, 100 + seq_len - 2)), seq_len
    graphdef, state = nnx.split(model)
    buffer = np.zeros(len(prompt) + new, np.int32)
    buffer[: len(prompt)] = prompt
    out = np.asarray(language_model._generate(graphdef, state, jnp.asarray(buffer), len(prompt), len(buffer),
                                              seq_len, 0.0, jax.random.key(0)))
    expected, forward = list(prompt), jitted_forward(model)
    for _ in range(new):
        window = np.asarray(expected[-seq_len:], np.int32)
        expected.append(int(np.argmax(forward(jnp.asarray(window[None]))[0, -1])))
    assert out.tolist() == expected


def test_sample_returns_prompt_and_continuation(task_and_model):
    task, model = task_and_model
    text = task.sample(model, jax.random.key(1))
    # Each sampled byte decodes to at most one character (invalid UTF-8 becomes U+FFFD).
    assert text.startswith(task.sample_prompt) and len(text) <= len(task.sample_prompt) + task.sample_bytes


@pytest.fixture(scope="module")
def landmark_task_and_model(corpus, tiny_task):
    import dataclasses
    task = tiny_task(corpus)
    model_config = dataclasses.replace(task.model, vocab_size=257, attention="landmark",
                                       attention_kwargs={"block_size": 3})
    task = dataclasses.replace(task, model=model_config)
    return task, task.build_model(nnx.Rngs(0))


def test_landmark_windows_carry_the_landmark_token_and_score_bytes_only(landmark_task_and_model):
    task, model = landmark_task_and_model
    window = np.frombuffer(task.data.validation_text[:17], np.uint8)[None].astype(np.int32)  # T = 16
    inputs, labels = language_model._layout(jnp.asarray(window), 3)
    assert inputs[0].tolist() == [*window[0, 0:3], 256, *window[0, 3:6], 256, *window[0, 6:9], 256,
                                  *window[0, 9:12], 256]
    # Each byte predicts the next byte; the byte before a landmark predicts the byte after it.
    assert labels[0].tolist() == [*window[0, 1:4], -1, *window[0, 4:7], -1, *window[0, 7:10], -1,
                                  *window[0, 10:13], -1]
    loss, _ = task.loss_fn(model, {"tokens": jnp.asarray(window)})
    logits = np.asarray(model(inputs)[0], np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    scored = [i for i, label in enumerate(labels[0].tolist()) if label != -1]
    expected = -np.mean([log_probs[i, labels[0, i]] for i in scored])
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_landmark_task_evaluates_and_samples_bytes(landmark_task_and_model):
    task, model = landmark_task_and_model
    assert math.isfinite(task.evaluate(model)["validation_bits_per_byte"])
    text = task.sample(model, jax.random.key(0))
    assert text.startswith(task.sample_prompt)
    with pytest.raises(ValueError, match="vocab_size=257"):
        import dataclasses
        dataclasses.replace(task, model=dataclasses.replace(task.model, vocab_size=256))


def test_a_landmark_layer_in_layer_attention_gets_the_layout_too():
    from models.llm import LLMConfig
    mixed = LLMConfig(vocab_size=257, depth=2, layer_attention=("base_conv", ("landmark", {"block_size": 7})))
    assert language_model.ByteLanguageModel(model=mixed).landmark_block_size == 7
    assert language_model.ByteLanguageModel().landmark_block_size is None
    clash = LLMConfig(vocab_size=257, depth=2, layer_attention=(("landmark", {"block_size": 7}),
                                                                 ("landmark", {"block_size": 5})))
    with pytest.raises(ValueError, match="same block_size"):
        language_model.ByteLanguageModel(model=clash)

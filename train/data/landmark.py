"""Landmark tokens for language-model data (Landmark Attention, Mohtashami & Jaggi, 2023, arXiv 2305.16300, §3.1).

The `landmark` mechanism (attnx/ops/landmark) expects a landmark token at every position p with
(p + 1) % (block_size + 1) == 0, i.e. one after every `block_size` ordinary tokens, counted from the start of each
model input. These pure numpy functions put them there:

    tokens  a b c d e f g ...        block_size = 3, landmark id L
    input   a b c L d e f L g ...    label of an ordinary token = the next ordinary token; of a landmark = ignored

As in the official code (epfml/landmark-attention `lm_benchmark/data/utils.py` `apply_add_mem_tokens` and
`optim/utils.py` `get_batch`): the landmark is appended after every complete block, the token before a landmark is
trained to predict the token after it, and landmark slots carry the ignore label (-1 there). Departure: the code
inserts landmarks into the whole token stream and cuts windows at random offsets, so a window's landmarks sit at a
random phase; here each window is laid out from its own start, which is what the regular-spacing attention assumes.

Landmark logits are not predictions of anything; `remove_landmarks` drops their rows (the code's
`get_final_logits`) before evaluation or sampling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = -1


def _check(block_size: int) -> None:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"landmark.block_size: expected an int >= 1, got {block_size!r}")


def landmark_mask(length: int, block_size: int) -> np.ndarray:
    """[length] bool: True at the landmark slots (p + 1) % (block_size + 1) == 0."""
    _check(block_size)
    return (np.arange(length) + 1) % (block_size + 1) == 0


def num_ordinary(length: int, block_size: int) -> int:
    """How many ordinary tokens fill `length` slots (the rest are landmarks): the raw tokens a window needs."""
    _check(block_size)
    return length - length // (block_size + 1)


def _namespace(x):
    """jax.numpy for jax arrays (so the layout can be built inside a jitted loss), numpy otherwise."""
    return jnp if isinstance(x, jax.Array) else np


def insert_landmarks(tokens, labels=None, *, block_size: int, landmark_id: int, ignore_label: int = IGNORE_LABEL,
                     length: int | None = None):
    """tokens [..., n] (and labels [..., n], the target of each token) -> the same with a landmark after every
    `block_size` tokens: [..., n + n // block_size], or the first `length` slots of it.

    Landmark slots hold `landmark_id` in tokens and `ignore_label` in labels. Returns (tokens, labels), labels None
    when none were given. `length` must not exceed the laid-out length (pad the input instead). numpy in, numpy
    out (a grain map); jax arrays in, jax arrays out (traceable: the slot layout is static).
    """
    _check(block_size)
    xp = _namespace(tokens)
    tokens = xp.asarray(tokens)
    if tokens.ndim == 0:
        raise ValueError(f"insert_landmarks.tokens: expected [..., n], got a scalar {tokens!r}")
    if labels is not None:
        labels = xp.asarray(labels)
        if labels.shape != tokens.shape:
            raise ValueError(f"insert_landmarks.labels: shape {labels.shape} must equal tokens' {tokens.shape}")
    n = tokens.shape[-1]
    total = n + n // block_size
    if length is None:
        length = total
    if not 0 <= length <= total:
        raise ValueError(f"insert_landmarks.length: expected 0 <= length <= {total} ({n} tokens with their "
                         f"landmarks), got {length}")
    # A gather with a static index: slot p holds ordinary token p - (landmarks before p) = p - (p + 1) // (b + 1).
    slot = np.arange(length)
    is_lm = landmark_mask(length, block_size)
    source = np.where(is_lm, 0, slot - (slot + 1) // (block_size + 1))
    dtype = np.result_type(tokens.dtype, np.min_scalar_type(landmark_id))  # e.g. uint8 bytes + id 256 -> uint16
    out = xp.where(is_lm, xp.asarray(landmark_id, dtype), xp.take(tokens, source, axis=-1).astype(dtype))
    if labels is not None:
        dtype = np.result_type(labels.dtype, np.int32)
        labels = xp.where(is_lm, xp.asarray(ignore_label, dtype), xp.take(labels, source, axis=-1).astype(dtype))
    return out, labels


def language_model_example(window, *, block_size: int, landmark_id: int, ignore_label: int = IGNORE_LABEL,
                           length: int | None = None):
    """A window of raw tokens [..., n + 1] -> (inputs, labels) for next-token training with landmarks: the inputs
    are window[..., :-1] laid out with landmarks, each ordinary input labelled with the next raw token."""
    window = _namespace(window).asarray(window)
    return insert_landmarks(window[..., :-1], window[..., 1:], block_size=block_size, landmark_id=landmark_id,
                            ignore_label=ignore_label, length=length)


def remove_landmarks(x, block_size: int, axis: int = -1):
    """Drop the landmark slots of `x` along `axis` (e.g. logits [B, T, vocab] with axis=1); numpy or jax."""
    xp = _namespace(x)
    x = xp.asarray(x)
    keep = np.flatnonzero(~landmark_mask(x.shape[axis], block_size))
    return xp.take(x, keep, axis=axis)

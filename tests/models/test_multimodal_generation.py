"""Generation with the multimodal head transforms (spec diffusion_multimodal_bench.md §7): VHR re-selecting its heads
for every generated token (models/multimodal.py `vhr_generate`) against a step-by-step oracle on exact-length
sequences, and head_modulation's per-image token sets threaded through `LLM.__call__` / `decode` / `generate`
(`attention_inputs`). Tiny random models filled from numpy; one compile per jitted pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import llm
from models import multimodal as mmodel
from models.sampling import generate
from nnx_helpers import filled_from_numpy

# ---- VHR: per-token, layer-by-layer head re-selection ---------------------------------------------------------------

VHR_CONFIG = llm.LLMConfig(vocab_size=16, width=16, depth=2, num_heads=4, num_kv_heads=2, mlp_width=16)
SPAN, NEW = (1, 5), 3
PROMPT = jnp.array([[3, 9, 10, 11, 12, 4, 5], [6, 13, 14, 15, 9, 7, 2]])  # image tokens at [1, 5)


def _np_selection(vhd):
    """The paper's per-layer rule in numpy: above the median over heads, surges above mean + std (ddof 1) dropped."""
    return (vhd > np.median(vhd, -1, keepdims=True)) & (
        vhd <= vhd.mean(-1, keepdims=True) + vhd.std(-1, ddof=1, keepdims=True))


def _np_causal_heads(q, k, v):
    """Plain causal softmax heads in numpy (GQA by repeating key/value heads): [B, T, N, V]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    z = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    T = z.shape[-1]
    z = np.where(np.tril(np.ones((T, T), bool)), z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnv->btnv", p, v)


_embed = nnx.jit(lambda model, tokens: model.embed(tokens))
_logits = nnx.jit(lambda model, x: model.logits(x))
_qkv = nnx.jit(lambda block, x: (block.attention_norm(x),) + block.attention.project(block.attention_norm(x)))
_residual = nnx.jit(lambda block, x, normed, out: block._add_mlp(x, normed, block.attention.output(out)))


def _np_blocks(model, tokens, row, scales=None, vhd_against=None, alpha=2.0):
    """The blocks by hand (the model's pieces jitted; heads, VHD, selection and scales in numpy) on a zero-padded
    sequence whose row `row` produces the next token (causal: the padding after it never reaches it). With
    `vhd_against` (the image-free pass's head outputs at that token, per layer) each layer selects its heads on row
    `row`'s VHD and scales them there; `scales` [L, B, T, N] holds the earlier rows' scales. Returns (row logits,
    row head outputs per layer, chosen heads per layer)."""
    x = _embed(model, tokens)
    last, chosen = [], []
    for layer, block in enumerate(model.blocks):
        normed, q, k, v = _qkv(block, x)
        out = _np_causal_heads(q, k, v)
        last.append(out[:, row])
        if vhd_against is not None:
            vhd = np.linalg.norm(out[:, row] - vhd_against[layer], axis=-1)  # [B, N]
            now = 1.0 + (alpha - 1.0) * _np_selection(vhd)
            chosen.append(now != 1.0)
            scales[layer][:, row] = now
            out = out * scales[layer][..., None]
        x = _residual(block, x, normed, jnp.asarray(out, jnp.float32))
    return np.asarray(_logits(model, x))[:, row], last, chosen


def vhr_oracle(model, prompt, steps, alpha=2.0):
    """Greedy VHR step by step: each step recomputes both passes from the tokens so far and selects per layer."""
    batch, length = prompt.shape
    image = SPAN[1] - SPAN[0]
    tokens = np.zeros((batch, length + steps), np.int32)
    tokens[:, :length] = prompt
    scales = np.ones((2, batch, length + steps, 4))  # rows keep the scales chosen at their own step
    selections = []
    for step in range(steps):
        row = length - 1 + step
        text = np.concatenate([tokens[:, :SPAN[0]], tokens[:, SPAN[1]:]], axis=1)
        _, without, _ = _np_blocks(model, jnp.asarray(text), row - image)
        logits, _, chosen = _np_blocks(model, jnp.asarray(tokens), row, scales, without, alpha)
        selections.append(np.stack(chosen))
        tokens[:, row + 1] = logits.argmax(-1)
    return tokens, np.stack(selections)


@pytest.fixture(scope="module")
def vhr_model():
    return filled_from_numpy(lambda: llm.LLM(VHR_CONFIG, rngs=nnx.Rngs(0)), seed=11, scale=0.5)


# Slow: VHR's generation loop; its attention is tested at the op level.
@pytest.mark.slow
def test_vhr_generate_reselects_heads_per_token_like_the_step_by_step_oracle(vhr_model):
    got = mmodel.vhr_generate(vhr_model, PROMPT, SPAN, NEW, alpha=2.0)
    want_tokens, want_selected = vhr_oracle(vhr_model, PROMPT, NEW)
    np.testing.assert_array_equal(got["selected"], want_selected)  # [steps, L, B, N]
    np.testing.assert_array_equal(got["tokens"], want_tokens)
    selected = np.asarray(got["selected"])
    assert selected.any() and not selected.all()
    # the selection is re-made per token (not one fixed set): it changes between steps or sequences
    assert len({s.tobytes() for s in selected.reshape(NEW * 2, 2, 4)}) > 1
    assert got["vhd"].shape == (NEW, 2, 2, 4) and np.all(np.asarray(got["vhd"]) >= 0)


def test_vhr_generate_without_reinforcement_is_greedy_generation(vhr_model):
    got = mmodel.vhr_generate(vhr_model, PROMPT, SPAN, NEW, alpha=1.0)  # alpha 1 scales nothing
    np.testing.assert_array_equal(got["tokens"], generate(vhr_model, PROMPT, NEW))


def test_vhr_generate_validates_its_inputs(vhr_model):
    with pytest.raises(ValueError, match="image_span"):
        mmodel.vhr_generate(vhr_model, PROMPT, (3, 7), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mmodel.vhr_generate(vhr_model, PROMPT, SPAN, 0)
    with pytest.raises(ValueError, match="top_k"):
        mmodel.vhr_generate(vhr_model, PROMPT, SPAN, 1, top_k=9)


# ---- head_modulation: per-image token sets through LLM.__call__, decode and generate --------------------------------

PAINT_CONFIG = llm.LLMConfig(vocab_size=16, width=16, depth=1, num_heads=2, num_kv_heads=1, mlp_width=16,
                             attention="head_modulation",
                             attention_kwargs={"mode": "code", "alpha": 0.7, "beta": 0.3, "from_position": 0})
LOCAL = jnp.zeros((2, 7), bool).at[0, [1, 3]].set(True).at[1, [2, 4]].set(True)  # per sequence, prompt length
SUMMARY = jnp.zeros((2, 7), bool).at[0, 2].set(True).at[1, 1].set(True)


@nnx.jit
def paint_passes(model, tokens, local, summary):
    inputs = {"local_tokens": local, "summary_tokens": summary}
    return (model(tokens, attention_inputs=inputs),
            mmodel.run_llm(model, tokens, extra_kwargs=inputs, extra_for="head_modulation")[0],
            model(tokens))


def test_head_modulation_per_sequence_sets_through_call_and_generate():
    model = filled_from_numpy(lambda: llm.LLM(PAINT_CONFIG, rngs=nnx.Rngs(0)), seed=12, scale=0.8)
    assert type(model.blocks[0].attention.router).__name__ == "RunTimeInputs"
    inputs = {"local_tokens": LOCAL, "summary_tokens": SUMMARY}
    tokens = generate(model, PROMPT, NEW, attention_inputs=inputs)
    # the full forward with the same (prompt-length, padded) sets: generate's tokens are its greedy continuation
    full, threaded, plain = paint_passes(model, tokens, LOCAL, SUMMARY)
    np.testing.assert_array_equal(tokens[:, PROMPT.shape[1]:], np.argmax(full[:, PROMPT.shape[1] - 1:-1], -1))
    np.testing.assert_allclose(full, threaded, rtol=1e-6, atol=1e-6)  # = run_llm's tested per-sequence path
    assert np.abs(np.asarray(full - plain)).max() > 1e-3  # the sets changed the model
    swapped = paint_passes(model, tokens, LOCAL[::-1], SUMMARY[::-1])[0]
    assert np.abs(np.asarray(full - swapped)).max() > 1e-3  # each sequence uses its own sets
    with pytest.raises(ValueError, match="attention_inputs"):
        generate(model, PROMPT, 1, attention_inputs=[LOCAL])


def test_attention_inputs_are_refused_by_a_model_without_run_time_layers(vhr_model):
    with pytest.raises(ValueError, match="no layer of this model takes run-time attention inputs"):
        vhr_model.features(PROMPT, attention_inputs={"tokens": LOCAL})  # refused before any layer runs

"""Model-level passes of the multimodal LLM mechanisms (spec diffusion_multimodal_bench.md §7, llm_mechanisms.md §8):
VAR's sink detection inside the LLM (router on the residual stream, decode through its sink cache). Tiny models built
abstractly and filled from numpy; one jitted forward per model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.multimodal import attention as mm
from attnx.ops.multimodal import var as var_ops
from models import llm
from models.layers.mixers.multimodal import VARSinkDetector
from nnx_helpers import filled_from_numpy, forward

decode_step = nnx.jit(lambda model, tokens, cache, index: model.decode(tokens, cache, index))

# ---- VAR: sinks detected from the hidden state entering each active layer -----------------------------------------

SINK_DIM, TAU, IMAGE = 3, 3.0, (1, 5)
VAR_CONFIG = llm.LLMConfig(
    vocab_size=16, width=16, depth=3, num_heads=2, num_kv_heads=1, use_mlp=False, attention="var",
    attention_kwargs={"image_span": IMAGE},
    layer_attention=var_ops.var_layer_attention(3, IMAGE, first=1, sink_dims=(SINK_DIM,), tau=TAU, summ=0.1))
VAR_TOKENS = jnp.array([[0, 2, 1, 3, 4, 5, 1, 6], [7, 1, 8, 2, 9, 10, 11, 1]])  # token 1 carries a massive activation


def var_model():
    model = filled_from_numpy(lambda: llm.LLM(VAR_CONFIG, rngs=nnx.Rngs(0)), seed=3)
    model.embed.embedding_vd[...] = model.embed.embedding_vd[...].at[1, SINK_DIM].set(12.0)
    for block in model.blocks:  # a trained-looking gain, so that reading x instead of h would be caught
        block.attention_norm.scale_d[...] = jnp.linspace(0.3, 2.0, 16).at[SINK_DIM].set(0.1)
    return model


def manual_var_logits(model, tokens, *, detect=True):
    """Independent oracle: the blocks by hand, sinks from the residual stream h (var_sink_tokens) in the layers whose
    entry has sink_dims, passed to the pure var function."""
    x = model.embed(tokens)
    masks = []
    for layer, block in enumerate(model.blocks):
        kwargs = dict(VAR_CONFIG.layer_mixer(layer)[1])
        normed = block.attention_norm(x)
        q, k, v = block.attention.project(normed)
        if "sink_dims" in kwargs:
            sinks = var_ops.var_sink_tokens(x, kwargs.pop("sink_dims"), kwargs.pop("tau"))
            masks.append(sinks)
            kwargs["sinks"] = sinks if detect else ()
        x = x + block.attention.output(mm.var_attention(q, k, v, causal=True, **kwargs))
    return model.logits(x), masks


# one compile for both oracles (eager op-by-op dispatch would compile every primitive)
var_oracle = nnx.jit(lambda model, tokens: (manual_var_logits(model, tokens),
                                            manual_var_logits(model, tokens, detect=False)))


def test_var_detects_sinks_from_the_residual_stream_in_the_model_and_decodes():
    model = var_model()
    assert type(model.blocks[1].attention.router).__name__ == "VARSinkDetector"
    (want, masks), (plain, _) = var_oracle(model, VAR_TOKENS)
    got = forward(model, VAR_TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(masks) == 1  # the schedule: layer 1 only (first=1, last layer skipped)
    np.testing.assert_array_equal(masks[0], VAR_TOKENS == 1)  # the massive token, visual (in the image) or text
    assert np.abs(np.asarray(want - plain)).max() > 1e-3  # some image-centric rows were redistributed
    # token by token through the KV cache (one compile): each step's sink flag joins the cache
    cache = model.init_cache(2, VAR_TOKENS.shape[1])
    for position in range(VAR_TOKENS.shape[1]):
        step, cache = decode_step(model, VAR_TOKENS[:, position:position + 1], cache, jnp.int32(position))
        np.testing.assert_allclose(step[:, 0], got[:, position], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache[1]["sink"], VAR_TOKENS == 1)


def test_var_detection_options_are_validated():
    with pytest.raises(ValueError, match=r"var.sink_dims.*\[0, 16\)"):
        VARSinkDetector(16, 2, sink_dims=(99,))
    with pytest.raises(ValueError, match="var.tau"):
        VARSinkDetector(16, 2, sink_dims=(1,), tau=-1.0)
    with pytest.raises(ValueError, match="var.sink_dims"):
        var_ops.var_layer_attention(3, IMAGE, sink_dims=())
    assert VARSinkDetector(16, 2)(jnp.ones((1, 3, 16))) == {}  # a layer VAR skips: no sinks passed
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="router"):
        mm.var_attention(q, q, q, causal=True, image_span=(0, 2), sinks=(0,), sink_dims=(1,))

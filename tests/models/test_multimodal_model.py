"""Model-level passes of the multimodal LLM mechanisms (spec diffusion_multimodal_bench.md §7): VAR's sink detection
inside the LLM (router on the residual stream, decode through its sink cache), VHR's image-free pass measuring VHD
(a hand-made model where one head reads the image), and PAINT's token sets from a ViT's CLS attention fed to the LLM
per sequence. Tiny models built abstractly and filled from numpy; one jitted pass per model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.multimodal import attention as mm
from attnx.ops.multimodal import modulation
from attnx.ops.multimodal import var as var_ops
from models import llm, vit
from models import multimodal as mmodel
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


# ---- VHR: VHD from the model's image-free pass ----------------------------------------------------------------------

VHR_CONFIG = llm.LLMConfig(vocab_size=8, width=8, depth=2, num_heads=2, num_kv_heads=2, use_mlp=False,
                           rope_theta=1e12)  # head dim 4: feature 1 rotates by 1e-6 rad per position
SPAN = (1, 4)
VHR_TOKENS = jnp.array([[0, 4, 5, 6, 1, 2], [3, 7, 4, 5, 2, 1]])  # ids 4..7 are image tokens


def vhr_model(image_head: int):
    """Hand-made: layer 0 head `image_head` averages the image tokens' content (dims 0, 1); the other head reads only
    text content (dims 2, 3) and cannot see image keys (logit -200 from the image flag, dim 6). Layer 1 is zero."""
    model = filled_from_numpy(lambda: llm.LLM(VHR_CONFIG, rngs=nnx.Rngs(0)), seed=5)
    rng = np.random.default_rng(0)
    table = np.zeros((8, 8), np.float32)
    table[:, 7] = 1.0  # constant feature: the text head's query
    table[4:, 6] = 1.0  # image flag
    table[4:, 0:2] = rng.standard_normal((4, 2))
    table[:4, 2:4] = rng.standard_normal((4, 2))
    model.embed.embedding_vd[...] = jnp.asarray(table)
    text_head = 1 - image_head
    q, k, v = (np.zeros((8, 2, 4), np.float32) for _ in range(3))
    q[7, text_head, 1], k[6, text_head, 1] = 1.0, -200.0
    v[0, image_head, 0] = v[1, image_head, 1] = 1.0
    v[2, text_head, 0] = v[3, text_head, 1] = 1.0
    for block, (qq, kk, vv) in zip(model.blocks, [(q, k, v), (0 * q, 0 * k, 0 * v)]):
        attention = block.attention
        attention.query_dnh[...], attention.key_dkh[...], attention.value_dkh[...] = map(jnp.asarray, (qq, kk, vv))
        block.attention_norm.scale_d[...] = jnp.ones(8)
    model.blocks[1].attention.out_nhd[...] = jnp.zeros((2, 4, 8))
    return model


vhd_pass = nnx.jit(lambda model, tokens: (mmodel.measure_vhd(model, tokens, SPAN), mmodel.run_llm(model, tokens)[0],
                                          model(tokens)))


@pytest.mark.parametrize("image_head", [0, 1])
def test_measure_vhd_selects_the_head_that_reads_the_image(image_head):
    model = vhr_model(image_head)
    vhd, logits, want = vhd_pass(model, VHR_TOKENS)
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)  # run_llm is the model's forward
    vhd = np.asarray(vhd)
    assert vhd.shape == (2, 2, 2)  # [L, B, N]
    assert (vhd[0, :, image_head] > 0.1).all() and (vhd[0, :, 1 - image_head] < 1e-4).all()
    np.testing.assert_allclose(vhd[1], 0.0, atol=1e-6)  # a zero layer reads nothing
    # last row by hand: the image head's output with the image is its mean content over the row's keys, 0 without
    content = np.asarray(model.embed.embedding_vd[...])[np.asarray(VHR_TOKENS)][:, :, :2]
    normed = content / np.sqrt(np.mean(np.asarray(model.embed.embedding_vd[...])[np.asarray(VHR_TOKENS)] ** 2,
                                       axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(vhd[0, :, image_head], np.linalg.norm(normed.mean(1), axis=-1), rtol=1e-4)
    plan = mmodel.vhr_plan(vhd, alpha=2.0)
    assert plan["layer_heads"] == ((image_head,), ())
    assert plan["layer_attention"] == (("vhr", {"heads": (image_head,), "alpha": 2.0}),
                                       ("vhr", {"heads": (), "alpha": 2.0}))
    assert mmodel.vhr_plan(vhd, top_k=1)["layer_heads"][0] == (image_head,)


def test_measure_vhd_validates_its_inputs():
    with pytest.raises(ValueError, match="image_span"):
        mmodel.measure_vhd(None, VHR_TOKENS, (2, 6))  # no text row after the image
    with pytest.raises(ValueError, match="rows"):
        mmodel.measure_vhd(None, VHR_TOKENS, SPAN, rows="first")
    with pytest.raises(ValueError, match="vhr_plan.vhd"):
        mmodel.vhr_plan(np.ones((2, 2)))


def test_measure_head_sensitivity_is_each_heads_visual_attention_mass():
    """head_modulation's s_h (the spec's definition): the causal-softmax mass a head puts on the image from the text
    rows after it. Layer 0's text head cannot see image keys (0); its image head and layer 1 (zero weights) attend
    uniformly: rows 4 and 5 put 3/5 and 3/6 on the 3 image tokens."""
    got = mmodel.measure_head_sensitivity(vhr_model(image_head=0), VHR_TOKENS, SPAN, alpha=0.5)
    uniform = (3 / 5 + 3 / 6) / 2
    np.testing.assert_allclose(got["layer_head_scores"], [[uniform, 0.0], [uniform, uniform]], atol=1e-6)
    assert got["heads"] == (0, 1)
    np.testing.assert_allclose(got["head_scores"], (uniform, uniform / 2), atol=1e-6)
    kind, kwargs = got["layer_attention"][1]
    assert kind == "head_modulation" and kwargs["tokens"] == (1, 2, 3) and kwargs["alpha"] == 0.5
    np.testing.assert_allclose(kwargs["head_scores"], (uniform, uniform), atol=1e-6)
    llm.LLMConfig(vocab_size=8, width=8, depth=2, num_heads=2, attention="head_modulation",  # a valid config
                  layer_attention=got["layer_attention"])


# ---- PAINT (head_modulation, mode 'code'): token sets from a ViT's CLS attention, fed to the LLM ---------------------

VIT_CONFIG = vit.ViTConfig(image_size=8, patch_size=2, width=16, depth=3, num_heads=2, mlp_width=16)  # 16 patches
PAINT_LLM = llm.LLMConfig(vocab_size=16, width=16, depth=1, num_heads=2, num_kv_heads=1, use_mlp=False,
                          attention="head_modulation",
                          attention_kwargs={"mode": "code", "alpha": 0.7, "beta": 0.3, "from_position": 0})
PAINT_TOKENS = jnp.array([[1] + list(range(16)) + [2, 3, 4], [5] + list(range(15, -1, -1)) + [6, 7, 8]])


@nnx.jit
def paint_pass(vision, model, images, tokens):
    local, summary = mmodel.paint_token_masks(vision, images, image_start=1, length=tokens.shape[1])
    cls_rows = [m[:, :, 0, 1:] for m in vit.attention_maps(vision, images).values()]
    logits, _ = mmodel.run_llm(model, tokens, extra_kwargs={"local_tokens": local, "summary_tokens": summary},
                               extra_for="head_modulation")
    return local, summary, cls_rows, logits, model(tokens)


@nnx.jit(static_argnames=("local", "summary"))
def paint_oracle(model, tokens, local, summary):
    """The one-layer LLM by hand, the layer's sets given as static index tuples."""
    attention, x = model.blocks[0].attention, model.embed(tokens)
    q, k, v = attention.project(model.blocks[0].attention_norm(x))
    out = modulation.head_modulation_attention(q, k, v, causal=True, mode="code", alpha=0.7, beta=0.3,
                                               local_tokens=local, summary_tokens=summary)
    return model.logits(x + attention.output(out))


def np_paint(first, late, ratio=0.25):
    """The code's two sets on one image (numpy: top int(ratio V) of the first layer's head-summed CLS row; IQR
    outliers of the penultimate one; local minus summary)."""
    top, bottom = first.sum(0), late.sum(0)
    q1, q3 = np.percentile(bottom, 25), np.percentile(bottom, 75)
    summary = bottom > q3 + 1.5 * (q3 - q1)
    local = np.zeros(top.shape, bool)
    local[np.argsort(-top, kind="stable")[:int(len(top) * ratio)]] = True
    return local & ~summary, summary


# Slow: a ViT-to-LLM integration; the masks are tested at the op level.
@pytest.mark.slow
def test_paint_token_sets_from_a_vit_reach_the_llm_per_sequence():
    vision = filled_from_numpy(lambda: vit.ViT(VIT_CONFIG, rngs=nnx.Rngs(0)), seed=7, scale=0.6)
    model = filled_from_numpy(lambda: llm.LLM(PAINT_LLM, rngs=nnx.Rngs(0)), seed=8, scale=0.6)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
    local, summary, cls_rows, logits, unmodulated = paint_pass(vision, model, images, PAINT_TOKENS)
    local, summary = np.asarray(local), np.asarray(summary)
    assert local.shape == summary.shape == (2, 20) and not local[:, [0, 17, 18, 19]].any()
    for b in range(2):
        want_local, want_summary = np_paint(np.asarray(cls_rows[0][b]), np.asarray(cls_rows[1][b]))
        np.testing.assert_array_equal(local[b, 1:17], want_local)
        np.testing.assert_array_equal(summary[b, 1:17], want_summary)
    assert local.any() and (local[0] != local[1]).any()  # two images, two sets
    # each sequence's logits equal the layer with that sequence's sets as static index tuples (the registered path)
    for b in range(2):
        want = paint_oracle(model, PAINT_TOKENS[b:b + 1], local=tuple(np.flatnonzero(local[b]).tolist()),
                            summary=tuple(np.flatnonzero(summary[b]).tolist()))
        np.testing.assert_allclose(logits[b:b + 1], want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(logits - unmodulated)).max() > 1e-3  # the sets changed the model's output

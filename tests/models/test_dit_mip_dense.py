"""Several reference images and DPDEdit's dense stream in the image-prompt layer and the DiT
(models/layers/ip_adapter.py, DiTConfig.image_prompt_merge / dense_prompt_dim): the layer equals the attnx ops it
wires (MIP's weighted merge, the concatenated stream, the dense stream), the weights it adds are built last, a
literal zero weight removes a stream exactly, the DiT is invariant to the order of its references, per-block dense
features reach the right blocks, guidance at scale 1 is the conditional model, and bad inputs are clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.cross.mip import mip_attention
from attnx.ops.cross.multi_stream import multi_stream_reference
from attnx.testing.tolerances import assert_close
from models.dit import DiT, DiTConfig
from models.layers.ip_adapter import DecoupledCrossAttention

B, T, S, O, M, L, D, N = 2, 5, 3, 2, 4, 3, 16, 2
H = D // N


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return dict(x=f(B, T, D), context=f(B, S, D), image_tokens=f(B, O, M, D), entity_context=f(B, O, L, D),
                entity_lengths=jnp.asarray([[1, 2], [2, 1]], jnp.int32), dense_tokens=f(B, 7, 12))


def _project(x, weights):
    """A bias-free key/value projection (to_k_ip, to_v_ip, to_k_c, to_v_c)."""
    return jnp.einsum("...c,cnh->...nh", x, weights[...])


def _heads(layer, inp):
    b = lambda value, param: value + param[...]
    q = b(jnp.einsum("btd,dnh->btnh", inp["x"], layer.query_dnh[...]), layer.query_bias_nh)
    k = b(jnp.einsum("bsc,cnh->bsnh", inp["context"], layer.key_cnh[...]), layer.key_bias_nh)
    v = b(jnp.einsum("bsc,cnh->bsnh", inp["context"], layer.value_cnh[...]), layer.value_bias_nh)
    return q, k, v


def _out(layer, mixed):
    return jnp.einsum("btnh,nhd->btd", mixed, layer.out_nhd[...]) + layer.out_bias_d[...]


def test_mip_layer_equals_the_weighted_merge_of_the_op_and_its_gate_learns():
    layer = DecoupledCrossAttention(D, N, merge="mip", scale=0.8, zero_out=False, rngs=nnx.Rngs(0))
    inp = _inputs()
    graphdef, state = nnx.split(layer)

    @jax.jit  # one compile for the layer, the op, the lambda = 0 call and the gradient (eager costs ~20 s)
    def run(state, inp):
        layer = nnx.merge(graphdef, state)
        q, k, v = _heads(layer, inp)
        entity_key = (jnp.einsum("bolc,cnh->bolnh", inp["entity_context"], layer.key_cnh[...])
                      + layer.key_bias_nh[...])
        expected = mip_attention(q, k, v, _project(inp["image_tokens"], layer.image_key_cnh),
                                 _project(inp["image_tokens"], layer.image_value_cnh), entity_key,
                                 inp["entity_lengths"], layer.text_weight_c[...], scale=0.8, reference=True)
        kwargs = {n: inp[n] for n in ("image_tokens", "entity_context", "entity_lengths")}
        text = multi_stream_reference(q, [(k, v, 1.0)])
        grads = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(inp["x"], inp["context"], **kwargs) ** 2))(state)
        return (layer(inp["x"], inp["context"], **kwargs), _out(layer, expected),
                layer(inp["x"], inp["context"], scale=0, **kwargs), _out(layer, text), grads["text_weight_c"][...])

    out, expected, text_only, text, gate_grad = run(state, inp)
    assert_close(out, expected, jnp.float32, what="mip layer")
    assert_close(text_only, text, jnp.float32, what="λ=0: a literal 0 removes every object, the text stream alone")
    assert float(jnp.max(jnp.abs(gate_grad))) > 0  # the gate trains; the relevance maps are detached, as the code


def test_concat_merge_is_one_stream_of_all_references_and_dense_stream_is_one_more_weighted_stream():
    inp = _inputs(1)
    plain = DecoupledCrossAttention(D, N, scale=0.6, zero_out=False, rngs=nnx.Rngs(3))
    layer = DecoupledCrossAttention(D, N, scale=0.6, zero_out=False, dense_dim=12, dense_scale=1.5,
                                    rngs=nnx.Rngs(3))
    q, k, v = _heads(layer, inp)
    flat = inp["image_tokens"].reshape(B, O * M, D)
    dense = inp["dense_tokens"]
    streams = [(k, v, 1.0), (_project(flat, layer.image_key_cnh), _project(flat, layer.image_value_cnh),
                             0.6),
               (_project(dense, layer.dense_key_cnh), _project(dense, layer.dense_value_cnh), 1.5)]
    out = layer(inp["x"], inp["context"], inp["image_tokens"], dense_tokens=dense)
    assert_close(out, _out(layer, multi_stream_reference(q, streams)), jnp.float32, what="text + images + dense")
    # The dense weights are built last: with the stream weighted by a literal 0 the layer is the plain one.
    np.testing.assert_array_equal(np.asarray(layer(inp["x"], inp["context"], inp["image_tokens"],
                                                   dense_tokens=dense, dense_scale=0)),
                                  np.asarray(plain(inp["x"], inp["context"], inp["image_tokens"])))
    # A dense stream only (no image stream), DPDEdit's texture features alone.
    only = DecoupledCrossAttention(D, N, image_dim=0, dense_dim=12, zero_out=False, rngs=nnx.Rngs(3))
    assert only.image_key_cnh is None
    q, k, v = _heads(only, inp)
    expected = multi_stream_reference(q, [(k, v, 1.0), (_project(dense, only.dense_key_cnh),
                                                         _project(dense, only.dense_value_cnh), 1.0)])
    assert_close(only(inp["x"], inp["context"], dense_tokens=dense), _out(only, expected), jnp.float32, what="dense")


@pytest.mark.parametrize("call, message", [
    (lambda layer, inp: layer(inp["x"], inp["context"], inp["image_tokens"]), "entity_context"),
    (lambda layer, inp: layer(inp["x"], inp["context"]), "image_tokens missing"),
    (lambda layer, inp: layer(inp["x"], inp["context"], inp["image_tokens"], entity_context=inp["entity_context"][:, :1],
                              entity_lengths=inp["entity_lengths"]), r"\[B, O, L, C\]"),
    (lambda layer, inp: layer(inp["x"], inp["context"], inp["image_tokens"], dense_tokens=inp["dense_tokens"],
                              entity_context=inp["entity_context"], entity_lengths=inp["entity_lengths"]),
     "no dense stream"),
])
def test_layer_input_errors_name_the_argument(call, message):
    layer = DecoupledCrossAttention(D, N, merge="mip", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        call(layer, _inputs())


@pytest.mark.parametrize("overrides, message", [
    (dict(image_prompt_tokens=2, image_prompt_merge="average"), "image_prompt_merge"),
    (dict(image_prompt_merge="mip"), "needs image prompts"),
    (dict(dense_prompt_dim=-3), "dense_prompt_dim"),
    (dict(dense_prompt_dim=4, dense_prompt_scale="high"), "dense_prompt_scale"),
])
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig(**overrides)


E = 6
MIP_CONFIGS = {
    "label": DiTConfig(patch_size=4, width=D, depth=2, num_heads=N, image_prompt_tokens=2, image_prompt_dim=E,
                       image_prompt_merge="mip", dense_prompt_dim=D),
    "condition": DiTConfig(patch_size=4, width=D, depth=1, num_heads=N, image_prompt_tokens=2, image_prompt_dim=E,
                           image_prompt_merge="mip", cross_attention="softmax", condition_dim=8,
                           condition_class_tokens=2),
}


def _randomized(model):
    """Weights with every zero-initialised one redrawn, so that each branch reaches the output."""
    @jax.jit
    def redraw(state):
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return jax.tree.unflatten(treedef, [jnp.where(leaf == 0, 0.3 * jax.random.normal(k, leaf.shape, leaf.dtype),
                                                      leaf) for leaf, k in zip(leaves, keys)])
    graphdef, state = nnx.split(model)
    return graphdef, redraw(state)


# "label" is slow (~23 s here): the "condition" case runs the same checks through the condition-token path, and
# the label path's dense per-block features have their own test below.
@pytest.mark.parametrize("name", [pytest.param("condition"), pytest.param("label", marks=pytest.mark.slow)])
def test_dit_with_mip_references_is_invariant_to_their_order_and_guidance_one_is_conditional(name):
    config = MIP_CONFIGS[name]
    graphdef, state = _randomized(jax.jit(lambda: DiT(config, rngs=nnx.Rngs(0)))())
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((B, 8, 8, 1)), jnp.float32)
    t, y = jnp.asarray([3, 40]), jnp.asarray([1, 7])
    embeds = jnp.asarray(rng.standard_normal((B, O, E)), jnp.float32)
    ref_labels = jnp.asarray([[2, 5], [9, 0]])
    dense = jnp.asarray(rng.standard_normal((config.depth, B, 4, D)), jnp.float32) if config.dense_prompt_dim else None

    @jax.jit
    def run(state, embeds, ref_labels, cfg):
        model = nnx.merge(graphdef, state)
        phrases, lengths = model.entity_phrases(ref_labels)
        kwargs = dict(entity_context=phrases, entity_lengths=lengths)
        if dense is not None:
            kwargs["dense_features"] = dense
        out = model(x, t, y, image_embeds=embeds, image_prompt_kwargs=kwargs, force_drop_ids=jnp.zeros(B, jnp.int32))
        guided = model.forward_with_cfg(x, t, y, cfg, image_embeds=embeds, image_prompt_kwargs=kwargs)
        return out, guided, phrases.shape

    out, guided, shape = run(state, embeds, ref_labels, 1.0)
    width = config.condition_dim or D
    assert shape == (B, O, 1 + (config.condition_class_tokens if config.cross_attention else 1), width)
    swapped, _, _ = run(state, embeds[:, ::-1], ref_labels[:, ::-1], 1.0)
    assert_close(swapped, out, jnp.float32, what="references swapped together with their phrases")
    relabelled, _, _ = run(state, embeds, ref_labels[:, ::-1], 1.0)  # phrases no longer match their images
    assert float(jnp.max(jnp.abs(relabelled - out))) > 1e-4
    assert_close(guided, out, jnp.float32, what="guidance at scale 1")
    assert float(jnp.max(jnp.abs(run(state, embeds, ref_labels, 3.0)[1] - out))) > 1e-4


# Slow: a DiT-level integration of the dense stream; the stream math is tested in tests/attnx/test_ip_adapter.py.
@pytest.mark.slow
def test_dense_features_per_block_reach_their_block_and_reference_features_come_from_a_dit():
    config = DiTConfig(patch_size=4, width=D, depth=2, num_heads=N, dense_prompt_dim=D)
    texture = DiTConfig(patch_size=4, width=D, depth=2, num_heads=N)
    graphdef, state = _randomized(jax.jit(lambda: DiT(config, rngs=nnx.Rngs(0)))())
    texture_net = jax.jit(lambda: DiT(texture, rngs=nnx.Rngs(5)))()
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((B, 8, 8, 1)), jnp.float32)
    t, y = jnp.asarray([3, 40]), jnp.asarray([1, 7])
    features = jax.jit(lambda m: m.reference_features(x, jnp.zeros_like(t), y))(texture_net)
    assert features.shape == (config.depth, B, 4, D)

    @jax.jit
    def run(state, dense):
        out, inter = nnx.merge(graphdef, state)(x, t, y, image_prompt_kwargs=dict(dense_features=dense),
                                                return_intermediates=True)
        return inter["block_0"], out

    block0, out = run(state, features)
    changed_second = features.at[1].add(1.0)
    block0_b, out_b = run(state, changed_second)
    np.testing.assert_array_equal(np.asarray(block0_b), np.asarray(block0))  # block 0 reads features[0] only
    assert float(jnp.max(jnp.abs(out_b - out))) > 1e-4
    shared, _ = run(state, features[0])  # one map for all blocks: block 0 sees the same as before
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(block0))
    model = nnx.merge(graphdef, state)
    check = lambda **kwargs: jax.eval_shape(lambda: model(x, t, y, **kwargs))  # the errors come at trace time
    with pytest.raises(ValueError, match="dense_tokens missing"):
        check()
    with pytest.raises(ValueError, match="unknown image_prompt_kwargs"):
        check(image_prompt_kwargs=dict(dense_features=features, entity=1))
    with pytest.raises(ValueError, match="one per block"):
        check(image_prompt_kwargs=dict(dense_features=features[:1].repeat(3, 0)))

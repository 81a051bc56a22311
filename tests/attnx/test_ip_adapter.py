"""Decoupled multi-stream cross-attention (IP-Adapter, DPDEdit) and MIP-Adapter object weights (attnx/ops/cross)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.cross.mip import entity_relevance, mip_attention, mip_object_weights, object_weights
from attnx.ops.cross.multi_stream import (ip_adapter_attention, multi_stream_cross_attention,
                                          multi_stream_reference)
from attnx.testing.tolerances import assert_close

B, T, N, H, V = 2, 5, 4, 8, 6


def _normal(rng, *shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {
        "q": _normal(rng, B, T, N, H),
        "kt": _normal(rng, B, 7, 2, H), "vt": _normal(rng, B, 7, 2, V),      # text: 7 tokens, GQA K=2
        "ki": _normal(rng, B, 3, 4, H), "vi": _normal(rng, B, 3, 4, V),      # image: 3 tokens, K=N
        "kd": _normal(rng, B, 40, 1, H), "vd": _normal(rng, B, 40, 1, V),    # dense texture map: 40 tokens, MQA
        "w_bt": _normal(rng, B, T), "w_btn": _normal(rng, B, T, N),
    }


def _once(fn):
    """Runs a closure under one jit: one compile instead of one per eager op shape (the suite's time budget)."""
    return jax.jit(fn)()


def _streams(d, w_i=0.7, w_d=None):
    return [(d["kt"], d["vt"], 1.0), (d["ki"], d["vi"], w_i), (d["kd"], d["vd"], d["w_btn"] if w_d is None else w_d)]


def test_fast_path_matches_reference_forward_and_gradients(data):
    d = data

    def run(fn, q, kt, vt, ki, vi, kd, vd, w_bt, w_btn):
        return fn(q, [(kt, vt, 1.0), (ki, vi, w_bt), (kd, vd, w_btn)])

    args = tuple(d[name] for name in ("q", "kt", "vt", "ki", "vi", "kd", "vd", "w_bt", "w_btn"))
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(run(fn, *a)))
    both = jax.jit(lambda *a: [(run(fn, *a), jax.grad(loss(fn), argnums=tuple(range(9)))(*a))
                               for fn in (multi_stream_cross_attention, multi_stream_reference)])
    (fast, fast_grads), (ref, ref_grads) = both(*args)
    assert fast.shape == (B, T, N, V)
    assert_close(fast, ref, jnp.float32, "forward", "multi-stream")
    for index, (g_fast, g_ref) in enumerate(zip(fast_grads, ref_grads)):
        assert float(jnp.max(jnp.abs(g_ref))) > 0, index  # every input (weights included) reaches the output
        assert_close(g_fast, g_ref, jnp.float32, "gradient", f"multi-stream grad {index}")


def test_registry_entry_is_the_function(data):
    d = data
    spec = attnx.get_attention("ip_adapter")
    out, ref = _once(lambda: [f(d["q"], d["kt"], d["vt"], image_key=d["ki"], image_value=d["vi"], scale=0.5,
                                streams=[(d["kd"], d["vd"], 0.25)]) for f in (spec.fn, spec.reference)])
    assert_close(out, ref, jnp.float32, "forward", "registry")
    assert spec.patterns == frozenset({"NS", "NC"})


def test_zero_scale_is_the_base_cross_attention_exactly(data):
    d = data
    base = attnx.dot_product_attention(d["q"], d["kt"], d["vt"])
    for lam in (0.0, jnp.float32(0.0)):  # a literal 0 skips the stream; an array 0 adds exact zeros
        out = ip_adapter_attention(d["q"], d["kt"], d["vt"], image_key=d["ki"], image_value=d["vi"], scale=lam)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_identical_streams_give_one_plus_lambda_times_base_and_not_one_concatenated_softmax(data):
    d = data
    lam = 0.6
    base = attnx.dot_product_attention(d["q"], d["kt"], d["vt"])
    out = ip_adapter_attention(d["q"], d["kt"], d["vt"], image_key=d["kt"], image_value=d["vt"], scale=lam)
    assert_close(out, (1 + lam) * base, jnp.float32, "forward", "identical streams")
    # One softmax over [text; image] tokens is a different mechanism: with lambda = 1 it differs clearly. (The
    # image stream has the text stream's shape here only to reuse a compiled attention.)
    ki, vi = 1.5 * d["kt"][:, ::-1], -d["vt"]
    decoupled = ip_adapter_attention(d["q"], d["kt"], d["vt"], image_key=ki, image_value=vi, scale=1.0)
    concatenated = multi_stream_reference(d["q"], [(jnp.concatenate([d["kt"], ki], 1),
                                                    jnp.concatenate([d["vt"], vi], 1), 1.0)])
    assert float(jnp.max(jnp.abs(decoupled - concatenated))) > 0.1


def test_stream_order_does_not_matter_and_zero_weight_streams_are_no_ops(data):
    d = data
    streams = _streams(d)
    out = multi_stream_cross_attention(d["q"], streams)
    for order in ((2, 0, 1), (1, 2, 0)):
        assert_close(multi_stream_cross_attention(d["q"], [streams[i] for i in order]), out, jnp.float32,
                     "forward", f"order {order}")
    # A stream weighted by zero (literal, array, or per-position zeros) leaves the result as it was.
    extra = (-d["ki"], 2 * d["vi"])
    for zero in (0.0, jnp.zeros(()), jnp.zeros((B, T)), jnp.zeros((B, T, N))):
        np.testing.assert_array_equal(np.asarray(multi_stream_cross_attention(d["q"], streams + [(*extra, zero)])),
                                      np.asarray(out))


def test_arguments_are_validated_with_their_names(data):
    d = data
    with pytest.raises(ValueError, match="non-causal"):
        ip_adapter_attention(d["q"], d["kt"], d["vt"], causal=True)
    with pytest.raises(ValueError, match="image_key and image_value"):
        ip_adapter_attention(d["q"], d["kt"], d["vt"], image_key=d["ki"])
    with pytest.raises(ValueError, match=r"streams\[1\]: weight shape \(2, 4\)"):
        multi_stream_cross_attention(d["q"], [(d["kt"], d["vt"], 1.0), (d["ki"], d["vi"], jnp.ones((B, N)))])
    with pytest.raises(ValueError, match=r"streams\[1\]: value head dim 3"):
        multi_stream_cross_attention(d["q"], [(d["kt"], d["vt"], 1.0), (d["ki"], d["vi"][..., :3], 1.0)])
    with pytest.raises(ValueError, match=r"streams\[0\]: key: 3 key/value heads must divide"):
        multi_stream_cross_attention(d["q"], [(d["ki"][:, :, :3], d["vi"][:, :, :3], 1.0)])
    with pytest.raises(ValueError, match="non-empty sequence"):
        multi_stream_cross_attention(d["q"], [])


# ---- MIP-Adapter ----

O, L, C = 3, 6, N * V


@pytest.fixture(scope="module")
def mip():
    rng = np.random.default_rng(1)
    return {
        "entity_key": _normal(rng, B, O, L, 2, H),
        "lengths": jnp.asarray([[2, 3, 1], [5, 1, 2]], jnp.int32),
        "object_keys": _normal(rng, B, O, 7, 2, H), "object_values": _normal(rng, B, O, 7, 2, V),
        "text_out": _normal(rng, B, T, C), "w_t": _normal(rng, C, scale=0.3),
    }


def test_entity_relevance_matches_a_loop_over_heads_and_phrase_tokens(data, mip):
    q, ek, lengths = np.asarray(data["q"], np.float64), np.asarray(mip["entity_key"], np.float64), mip["lengths"]
    expected = np.zeros((B, O, T))
    for b in range(B):
        for o in range(O):
            maps = []
            for n in range(N):
                logits = ek[b, o, :, n // 2] @ q[b, :, n].T / np.sqrt(H)  # [L, T]; GQA: head n reads group n // 2
                probs = np.exp(logits - logits.max(-1, keepdims=True))
                maps.append(probs / probs.sum(-1, keepdims=True))
            expected[b, o] = np.mean(maps, axis=0)[1 : 1 + int(lengths[b, o])].mean(0)  # skip BOS
    # The maps are detached, as in the code: no gradient reaches the queries.
    relevance = lambda q: entity_relevance(q, mip["entity_key"], lengths)
    got, grad = _once(lambda: (relevance(data["q"]), jax.grad(lambda q: jnp.sum(relevance(q) ** 2))(data["q"])))
    assert_close(got, expected, jnp.float32, "forward", "relevance")
    assert float(jnp.max(jnp.abs(grad))) == 0.0


def test_object_weights_normalise_and_split_identical_objects_evenly(data, mip):
    def run():
        relevance = entity_relevance(data["q"], mip["entity_key"], mip["lengths"])
        # w_t = 0: the gate is 1 everywhere; otherwise the sum over objects is g / mean g.
        weights, gated = [object_weights(relevance, mip["text_out"], w) for w in (jnp.zeros(C), mip["w_t"])]
        same = jnp.repeat(mip["entity_key"][:, :1], 2, axis=1)  # two objects with the same phrase
        even = mip_object_weights(data["q"], same, jnp.repeat(mip["lengths"][:, :1], 2, axis=1), mip["text_out"],
                                  jnp.zeros(C))
        return weights, gated, even

    weights, gated, even = _once(run)
    assert_close(weights.sum(1), np.ones((B, T)), jnp.float32, "forward", "sum over objects")
    assert_close(gated.sum(1).mean(-1), np.ones(B), jnp.float32, "forward", "gate mean")
    assert float(jnp.std(gated.sum(1))) > 1e-3
    np.testing.assert_allclose(np.asarray(even), 0.5, atol=1e-6)


def test_one_object_with_zero_gate_is_ip_adapter(data, mip):
    d, m = data, mip
    out, ref = _once(lambda: [mip_attention(d["q"], d["kt"], d["vt"], m["object_keys"][:, :1],
                                            m["object_values"][:, :1], m["entity_key"][:, :1], m["lengths"][:, :1],
                                            jnp.zeros(C), scale=0.6, reference=reference)
                              for reference in (False, True)])
    ip = ip_adapter_attention(d["q"], d["kt"], d["vt"], image_key=m["object_keys"][:, 0],
                              image_value=m["object_values"][:, 0], scale=0.6)
    assert_close(out, ip, jnp.float32, "forward", "MIP with one object")
    assert_close(out, ref, jnp.float32, "forward", "MIP reference")


def test_permuting_objects_permutes_weights_and_keeps_the_output(data, mip):
    d, m = data, mip
    perm = np.array([2, 0, 1])
    args = lambda p: (d["q"], d["kt"], d["vt"], m["object_keys"][:, p], m["object_values"][:, p],
                      m["entity_key"][:, p], m["lengths"][:, p], m["w_t"])
    weights = mip_object_weights(d["q"], m["entity_key"], m["lengths"], m["text_out"], m["w_t"])
    permuted = mip_object_weights(d["q"], m["entity_key"][:, perm], m["lengths"][:, perm], m["text_out"], m["w_t"])
    assert_close(permuted, weights[:, perm], jnp.float32, "forward", "permuted weights")
    assert_close(mip_attention(*args(perm)), mip_attention(*args(np.arange(O))), jnp.float32, "forward", "output")


def test_one_hot_relevance_confines_each_object_to_its_region(data, mip):
    d, m = data, mip
    region = np.array([0, 0, 1, 2, 1])  # the object that owns each query position
    relevance = jnp.asarray(np.eye(O)[region].T[None].repeat(B, 0), jnp.float32)  # [B, O, T] one-hot over objects
    weights = object_weights(relevance, m["text_out"], jnp.zeros(C))
    lam = 0.8
    streams = [(d["kt"], d["vt"], 1.0)] + [(m["object_keys"][:, o], m["object_values"][:, o], lam * weights[:, o])
                                           for o in range(O)]
    out = multi_stream_cross_attention(d["q"], streams)
    for o in range(O):
        alone = ip_adapter_attention(d["q"], d["kt"], d["vt"], image_key=m["object_keys"][:, o],
                                     image_value=m["object_values"][:, o], scale=lam)
        assert_close(out[:, region == o], alone[:, region == o], jnp.float32, "forward", f"object {o}")

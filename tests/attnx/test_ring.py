"""Ring attention (attnx/ops/softmax/ring.py) on the 8 forced host devices: equal to single-device attention,
forward and gradients, causal and not, with GQA and the batch split over a second mesh axis; argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import attnx
from attnx.ops.softmax.ring import ring_attention
from attnx.testing.tolerances import assert_close

B, T, N, K, H, V = 2, 24, 4, 2, 8, 6


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "sequence"))


def _inputs(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return f(B, T, N, H), f(B, T, K, H), f(B, T, K, V), f(B, T, N, V)


@functools.partial(jax.jit, static_argnames=("mesh", "causal", "ring", "implementation", "head_axis"))
def _value_and_grads(q, k, v, cotangent, *, mesh, causal, ring, implementation=None, head_axis=None):
    def loss(q, k, v):
        if ring:
            out = ring_attention(q, k, v, mesh=mesh, batch_axes="data", head_axis=head_axis, causal=causal,
                                 implementation=implementation)
        else:
            out = attnx.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                              mask=attnx.Mask(causal=causal), implementation="reference")
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


# The chunk partials run through each backend's own loops inside shard_map: the materialised reference (the
# default at these sizes) and the chunked flash path with several blocks per chunk (its loop carries must carry
# the chunks' device-varying type).
@pytest.mark.parametrize("causal, implementation", [(False, None), (True, None), (True, attnx.Chunked(4, 4))],
                         ids=["full", "causal", "causal_chunked"])
def test_ring_equals_single_device_attention_with_gradients(mesh, causal, implementation):
    q, k, v, cotangent = _inputs()
    out, grads = _value_and_grads(q, k, v, cotangent, mesh=mesh, causal=causal, ring=True,
                                  implementation=implementation)
    want, want_grads = _value_and_grads(q, k, v, cotangent, mesh=mesh, causal=causal, ring=False)
    assert out.dtype == q.dtype and out.shape == (B, T, N, V)
    assert_close(out, want, jnp.float32, what="ring forward")
    for name, got, expected in zip("qkv", grads, want_grads):
        assert_close(got, expected, jnp.float32, kind="gradient", what=f"ring d{name}")


def test_ring_with_heads_split_over_a_tensor_axis():
    """GQA heads split 2 ways (query heads 0-1 with key/value head 0 on one device) beside a 2-way ring."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "tensor", "sequence"))
    q, k, v, cotangent = _inputs()
    out, grads = _value_and_grads(q, k, v, cotangent, mesh=mesh, causal=True, ring=True, head_axis="tensor")
    want, want_grads = _value_and_grads(q, k, v, cotangent, mesh=mesh, causal=True, ring=False)
    assert out.sharding.spec == jax.sharding.PartitionSpec("data", "sequence", "tensor")
    assert_close(out, want, jnp.float32, what="ring forward, heads split")
    for name, got, expected in zip("qkv", grads, want_grads):
        assert_close(got, expected, jnp.float32, kind="gradient", what=f"ring d{name}, heads split")


def test_ring_in_bfloat16_over_eight_sequence_chunks():
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("sequence",))
    q, k, v, _ = _inputs(jnp.bfloat16, seed=1)
    run = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, causal=True))
    want = attnx.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                       mask=attnx.Mask(causal=True), implementation="reference")
    out = run(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert_close(out, want, jnp.bfloat16, what="ring bf16, 3 tokens per device")


@pytest.mark.parametrize("kwargs, length, message", [
    (dict(axis_name="seq"), T, "not an axis of the mesh"),
    ({}, 22, "not divisible"),
    (dict(head_axis="sequence"), T, "other than axis_name"),
])
def test_errors_name_the_argument(mesh, kwargs, length, message):
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match=message):
        ring_attention(q[:, :length], k[:, :length], v[:, :length], mesh=mesh, **kwargs)


def test_causal_needs_equal_chunks(mesh):
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="equal query and key chunks"):
        ring_attention(q[:, :8], k, v, mesh=mesh, causal=True)


def test_heads_must_divide_over_the_head_axis():
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("tensor", "sequence"))
    q, k, v, _ = _inputs()  # K = 2 key/value heads cannot split 4 ways
    with pytest.raises(ValueError, match="must both be divisible by the 4 devices"):
        ring_attention(q, k, v, mesh=mesh, head_axis="tensor")

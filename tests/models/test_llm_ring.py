"""The LLM with `attention="ring"` (attnx/ops/softmax/ring.py): under a mesh whose `sequence` axis splits the
tokens over the 8 host devices, its logits and gradients equal the softmax LLM's with the same weights; without a
mesh it is the softmax LLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from attnx.testing.tolerances import assert_close
from models.llm import LLM, llm_config
from train.sharding import MESH_AXES

T = 32  # 4 tokens per device on the ring


def _model(attention):
    return jax.jit(lambda: LLM(llm_config("tiny", attention=attention, depth=2), rngs=nnx.Rngs(0)))()


def _loss_and_grads(model, tokens):
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    return jax.value_and_grad(loss)(state)


# sequence8 is slow (~20 s here): eight chunks are covered by tests/attnx/test_ring.py at the function level.
@pytest.mark.parametrize("shape", [pytest.param((1, 1, 1, 8), marks=pytest.mark.slow), (2, 1, 1, 4)],
                         ids=["sequence8", "data2_sequence4"])
# Slow: the ring function is tested on 8 devices in tests/attnx/test_ring.py and the trainer on a (1,2,2,2) mesh in tests/train/test_mesh_training.py.
@pytest.mark.slow
def test_ring_llm_equals_softmax_llm_on_a_sequence_mesh(shape):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, T)), jnp.int32)
    ring, softmax = _model("ring"), _model("softmax")
    want_loss, want_grads = jax.jit(_loss_and_grads)(softmax, tokens)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(shape), MESH_AXES)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(tokens, NamedSharding(mesh, P(("data",), "sequence")))
        loss, grads = jax.jit(_loss_and_grads)(ring, sharded)
    assert_close(loss, want_loss, jnp.float32, what="loss")
    for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        assert_close(got, expected, jnp.float32, kind="gradient", what=jax.tree_util.keystr(path))
    # Without a mesh in context the ring LLM is the softmax LLM.
    plain_loss, _ = jax.jit(_loss_and_grads)(ring, tokens)
    assert_close(plain_loss, want_loss, jnp.float32, what="no mesh")

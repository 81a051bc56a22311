"""LARA in the attention layer (models/layers/mixers/lara.py): the module's adaptive segment-mean weights and its
sampling key reach attnx's lara_attention exactly; NNX train/eval switch the code's two modes; the key is a pure
function of (layer key, input). The function's own math is checked against a float64 port in
tests/attnx/test_longshort_lara.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.efficient.lara import lara_attention
from models.layers.attention import Attention
from models.layers.mixers.lara import LaraProposals, input_digest
from nnx_helpers import filled_from_numpy
from attnx.testing.tolerances import assert_close

WIDTH, HEADS, HEAD_DIM, T = 16, 2, 8, 7
KWARGS = {"num_landmarks": 3, "proposal_gen": "adaptive-seg-means"}


def make_layer():
    layer = filled_from_numpy(lambda: Attention(WIDTH, HEADS, HEADS, HEAD_DIM, kind="lara", kind_kwargs=KWARGS,
                                                causal=False, use_rope=False, use_bias=True, rngs=nnx.Rngs(0)), 3)
    layer.router.sample_key[...] = jax.random.key_data(jax.random.key(11))  # numpy filled it with noise
    return layer


@nnx.jit
def run(evaluating, training, x, y):
    """Both layers' outputs on x (and the training layer's on y), and lara_attention called by hand on the layer's
    own heads with the module's weights and the key it should derive."""
    query, key, value = evaluating.project(x)
    router = evaluating.router
    projections = (router.q_bar_weight[...], router.q_bar_bias[...], router.k_bar_weight[...], router.k_bar_bias[...])
    by_hand = lambda **kw: evaluating.output(lara_attention(query, key, value, segment_projections=projections, **KWARGS,
                                                            **kw))
    sample = jax.random.fold_in(jax.random.wrap_key_data(router.sample_key[...]), input_digest(x))
    return (evaluating(x), by_hand(), training(x), by_hand(rng=sample, training=True), training(y),
            training(x + 0.0))


def test_lara_layer_feeds_its_weights_and_a_deterministic_sampling_key():
    evaluating = make_layer()
    assert isinstance(evaluating.router, LaraProposals) and evaluating.router.deterministic  # eval by default
    training = nnx.clone(evaluating)
    training.train()  # NNX's convention: deterministic=False
    assert not training.router.deterministic
    x, y = (jax.random.normal(jax.random.key(i), (2, T, WIDTH)) for i in (0, 1))
    out_eval, want_eval, out_train, want_train, out_train_y, out_train_again = run(evaluating, training, x, y)
    assert_close(out_eval, want_eval, jnp.float32, what="eval: w = mu with the module's q_bar/k_bar weights")
    assert_close(out_train, want_train, jnp.float32, what="train: w = mu + eps from fold_in(key, digest(x))")
    assert float(jnp.max(jnp.abs(out_train - out_eval))) > 1e-3  # the sample moved the proposals
    np.testing.assert_array_equal(out_train, out_train_again)  # a pure function of (key, input)
    # A different batch draws different noise (the key changes with the input; its output would differ anyway, so
    # compare the keys themselves).
    keys = [jax.random.key_data(jax.random.fold_in(jax.random.key(0), input_digest(z))) for z in (x, y)]
    assert not np.array_equal(*keys) and bool(jnp.all(jnp.isfinite(out_train_y)))
    training.eval()
    assert training.router.deterministic


def test_input_digest_is_the_wrapped_sum_of_the_bits_and_options_are_checked():
    x = jax.random.normal(jax.random.key(2), (2, 3, 4))
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    assert int(input_digest(x)) == int(bits.sum() % 2 ** 32)
    assert int(input_digest(x[:, ::-1])) == int(input_digest(x))  # order-free
    with pytest.raises(ValueError, match="lara.proposal_gen"):
        LaraProposals(WIDTH, HEADS, head_dim=HEAD_DIM, proposal_gen="pool", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lara.training"):
        LaraProposals(WIDTH, HEADS, head_dim=HEAD_DIM, training="yes", rngs=nnx.Rngs(0))
    built = nnx.eval_shape(lambda: LaraProposals(WIDTH, HEADS, head_dim=HEAD_DIM, training=True, rngs=nnx.Rngs(0)))
    assert not built.deterministic and not hasattr(built, "q_bar_weight")  # seg-means: no weights

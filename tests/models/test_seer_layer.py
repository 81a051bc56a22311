"""SeerAttention in the model: the gate module inside the attention layer (dense at threshold 0, block-sparse from
its logits otherwise) and gate distillation with the base model frozen (train/seer_distill.py): the KL falls, only
gate parameters move, and the distilled gate's block mask beats a random mask of equal density."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.seer.attention import seer_attention
from attnx.ops.seer.gate import seer_block_mask, seer_gate_probabilities
from models.layers.attention import Attention
from models.llm import LLM, LLMConfig
from train.optim import OptimizerConfig
from train.seer_distill import distill_gates, gate_losses

X = jax.random.normal(jax.random.key(0), (2, 11, 24))  # T = 11 with blocks of 4: a partial last block
SEER = {"block": 4, "hidden": 8}


def test_layer_is_dense_at_threshold_zero_and_block_sparse_from_its_gate():
    @nnx.jit
    def run(x):
        plain = Attention(24, 4, 2, 6, causal=True, rngs=nnx.Rngs(1))
        dense = Attention(24, 4, 2, 6, kind="seer", kind_kwargs=SEER, causal=True, rngs=nnx.Rngs(1))
        sparse = Attention(24, 4, 2, 6, kind="seer", kind_kwargs={**SEER, "nz_ratio": 0.3, "dense_last": 0},
                           causal=True, rngs=nnx.Rngs(1))
        query_pre, key_pre, value = sparse.project_heads(x)
        query, key, value = sparse.rotate(query_pre, key_pre, value)
        logits = sparse.router(x, query_pre, key_pre)["gate_logits"]
        by_hand = sparse.output(seer_attention(query, key, value, causal=True, block=4, gate_logits=logits,
                                               nz_ratio=0.3, dense_last=0))
        shapes = (sparse.router.q_weight.shape, sparse.router.k_weight.shape, logits.shape)
        return plain(x), dense(x), sparse(x), by_hand, shapes

    plain, dense, sparse, by_hand, shapes = run(X)
    # The gate is built last, so a seer layer draws the same projections as a plain one from the same seed.
    np.testing.assert_allclose(dense, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sparse, by_hand, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(sparse - plain))) > 1e-3  # some blocks really were skipped
    # Qavg -> 1 pool x H=6 features, Kmaxminavg -> 3 x 6; GQA key linear on K=2 heads; logits [B, N, nb, nb].
    assert shapes == ((4, 6, 8), (2, 18, 8), (2, 4, 3, 3))


def test_gate_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="seer.hidden: expected a positive int .even with rotary"):
        nnx.eval_shape(lambda: Attention(24, 4, 2, 6, kind="seer", kind_kwargs={"hidden": 7}, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="seer.q_pools"):
        nnx.eval_shape(lambda: Attention(24, 4, 2, 6, kind="seer", kind_kwargs={"q_pools": ("median",)},
                                         rngs=nnx.Rngs(0)))
    # Abstract models (nnx.eval_shape): the checks run before any parameter is needed.
    softmax_model = nnx.eval_shape(lambda: LLM(LLMConfig(width=8, depth=1, num_heads=2, num_kv_heads=1, mlp_width=8),
                                               rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no gate parameters; build it with attention='seer'"):
        distill_gates(softmax_model, iter([]), steps=1)


CONFIG = LLMConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_width=64, attention="seer",
                   attention_kwargs={"block": 8, "hidden": 16})
FAST = OptimizerConfig(peak_learning_rate=3e-2, warmup_steps=5, final_learning_rate_fraction=0.0, beta2=0.999,
                       weight_decay=0.0)


def token_batches(seed):
    """[4, 64] tokens in 8 blocks of 8; each block draws from one of 4 disjoint 16-token "topics", so which key
    blocks matter to a query block is a property of the blocks' contents that pooled queries/keys can reveal."""
    rng = np.random.default_rng(seed)
    while True:
        topics = rng.integers(0, 4, (4, 8, 1))
        yield (16 * topics + rng.integers(0, 16, (4, 8, 8))).reshape(4, 64)


@nnx.jit
def evaluate(model, tokens):
    """Per-layer gate losses, the dense walk's features and the model's own features (dense at threshold 0)."""
    walk, losses = gate_losses(model, tokens, "reference")
    return losses, walk, model.features(tokens)


@nnx.jit
def mask_errors(model, tokens, rng):
    """Mean |error| against dense attention of each layer's output with its gate's top-k mask and with a random
    mask of the same per-row count, at nz_ratio 0.5 (2 of 8 blocks per row); and the two densities."""
    x, errors = model.embed(tokens), []
    tril = jnp.tril(jnp.ones((8, 8), bool))
    for block in model.blocks:
        attention = block.attention
        query_pre, key_pre, value = attention.project_heads(block.attention_norm(x))
        query, key, value = attention.rotate(query_pre, key_pre, value)
        gated = seer_block_mask(seer_gate_probabilities(attention.router.logits(query_pre, key_pre)), nz_ratio=0.5,
                                dense_last=0)
        rng, draw = jax.random.split(rng)
        random = seer_block_mask(jnp.where(tril, jax.random.uniform(draw, gated.shape), 0.0), nz_ratio=0.5,
                                 dense_last=0)
        attend = lambda **kw: seer_attention(query, key, value, causal=True, block=8, implementation="reference", **kw)
        dense = attend()
        error = lambda m: jnp.mean(jnp.abs(attend(block_mask=m) - dense))
        errors.append(jnp.stack([error(gated), error(random), jnp.mean(gated), jnp.mean(random)]))
        x = block(x)
    return jnp.stack(errors)


@pytest.fixture(scope="module")
def distilled():
    @nnx.jit
    def build():
        """A softmax 'base model' and a seer model carrying its weights (the distillation workflow)."""
        base = LLM(dataclasses.replace(CONFIG, attention="softmax", attention_kwargs={}), rngs=nnx.Rngs(0))
        for block in base.blocks:  # content-matching heads (keys = queries of heads 0 and 2), sharpened
            attention = block.attention
            attention.query_dnh[...] = 3.0 * attention.query_dnh[...]
            attention.key_dkh[...] = attention.query_dnh[...][:, ::2] / 3.0
        model = LLM(CONFIG, rngs=nnx.Rngs(7))
        nnx.update(model, nnx.state(base))
        return model, base

    model, base = build()
    held_out = jnp.asarray(next(token_batches(99)))
    before = evaluate(model, held_out) + (nnx.jit(lambda m, t: m.features(t))(base, held_out),)
    frozen_before = [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.PathContains("router"))))]
    steps = distill_gates(model, token_batches(0), steps=40, optimizer=FAST, implementation="reference")
    return model, held_out, before, evaluate(model, held_out), frozen_before, steps


def test_the_distillation_walk_is_the_base_models_forward(distilled):
    _, _, (_, walk, features, base_features), *_ = distilled
    np.testing.assert_allclose(walk, base_features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features, base_features, rtol=1e-5, atol=1e-5)  # seer at threshold 0 is dense


def test_distillation_lowers_the_kl_and_trains_only_the_gates(distilled):
    model, _, before, after, frozen_before, steps = distilled
    assert len(steps) == 40 and all(np.isfinite(steps))
    losses_before, losses_after = np.asarray(before[0]), np.asarray(after[0])
    assert np.all(losses_after < 0.75 * losses_before), (losses_before, losses_after)  # measured: -41%, -40%
    frozen_after = nnx.state(model, nnx.Not(nnx.PathContains("router")))
    assert len(frozen_before) == len(jax.tree.leaves(frozen_after)) > 10
    for a, b in zip(frozen_before, jax.tree.leaves(frozen_after)):
        np.testing.assert_array_equal(a, b)


def test_distilled_gate_beats_a_random_mask_of_equal_density(distilled):
    model, held_out, *_ = distilled
    errors = np.asarray(mask_errors(model, held_out, jax.random.key(5)))
    np.testing.assert_allclose(errors[:, 2], errors[:, 3])  # equal densities
    assert np.all(errors[:, 0] < 0.85 * errors[:, 1]), errors  # measured: 0.59x, 0.73x

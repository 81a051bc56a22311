"""make_train_step's gradient_accumulation and compute_dtype: accumulating 2 microbatches makes the same step as the
whole batch (loss, gradient norm, updated parameters: float32 tolerance), each microbatch draws its own key,
bfloat16 compute keeps float32 master weights and optimizer state with a loss within bfloat16 tolerance, and bad
values are refused. Tiny LLM (width 32, depth 2, B=4, T=8), plain SGD so that updated parameters are a linear
function of the gradients; one compile per configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnx.testing.tolerances import assert_close
from models.llm import LLM, LLMConfig
from train.step import init_train_state, make_train_step, split_microbatches

CONFIG = LLMConfig(vocab_size=48, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_width=40)
BATCH = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 48, (4, 9)), jnp.int32)}
LEARNING_RATE = 0.5
TX = optax.sgd(LEARNING_RATE)


def cross_entropy(model, batch, rng):
    """Mean next-token cross-entropy (deterministic: rng unused), plus a metric."""
    del rng
    logits = model(batch["tokens"][:, :-1])
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
    return jnp.mean(nats), {"max_logit": jnp.max(logits)}


@pytest.fixture(scope="module")
def model_parts():
    graphdef, params = nnx.split(LLM(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
    return graphdef, params


def one_step(model_parts, **options):
    """(state before, state after, metrics) of one step from a fresh copy of the initial state (buffers donated)."""
    graphdef, params = model_parts
    step = make_train_step(lambda p: nnx.merge(graphdef, p), cross_entropy, TX, skip_nonfinite=False, **options)
    before = init_train_state(params, TX, seed=0)
    state, metrics = step(jax.tree.map(jnp.copy, before), BATCH)
    return before, state, metrics


@pytest.fixture(scope="module")
def plain_step(model_parts):
    return one_step(model_parts)


def test_accumulating_two_microbatches_equals_the_whole_batch(model_parts, plain_step):
    _, want, want_metrics = plain_step
    _, got, metrics = one_step(model_parts, gradient_accumulation=2)
    for name in ("loss", "grad_norm"):
        assert_close(metrics[name], want_metrics[name], jnp.float32, "forward", name)
    assert bool(metrics["finite"])
    # max over the batch is not a mean: its microbatch average is only close to the whole batch's maximum
    assert float(metrics["max_logit"]) <= float(want_metrics["max_logit"]) + 1e-6
    for (path, leaf), want_leaf in zip(jax.tree_util.tree_leaves_with_path(got["params"]),
                                       jax.tree.leaves(want["params"])):
        assert_close(leaf, want_leaf, jnp.float32, "gradient", f"params{jax.tree_util.keystr(path)}")
    assert int(got["step"]) == 1


def test_microbatches_are_strided_and_draw_their_own_keys():
    """A parameter-free loss that reports each microbatch's examples and key: the metrics are the means over the
    microbatches of fold_in(step key, i)."""
    def probe(model, batch, rng):
        return jnp.sum(model.w[...] * batch["x"]), {"draw": jax.random.uniform(rng), "first": batch["x"][0]}

    class Linear(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(()))

    graphdef, params = nnx.split(Linear(), nnx.Param)
    step = make_train_step(lambda p: nnx.merge(graphdef, p), probe, TX, skip_nonfinite=False, gradient_accumulation=3)
    state, metrics = step(init_train_state(params, TX, seed=7), {"x": jnp.arange(6.0)})
    key = jax.random.fold_in(jax.random.key(7), 0)  # step 0's key
    draws = [jax.random.uniform(jax.random.fold_in(key, i)) for i in range(3)]
    np.testing.assert_allclose(metrics["draw"], np.mean(draws), rtol=1e-6)
    assert len({float(d) for d in draws}) == 3
    np.testing.assert_allclose(metrics["first"], np.mean([0.0, 1.0, 2.0]))  # microbatch i starts at example i
    np.testing.assert_allclose(metrics["loss"], 15.0 / 3)  # the mean of the microbatch sums
    np.testing.assert_allclose(state["params"]["w"][...], 1.0 - LEARNING_RATE * 15.0 / 3)
    split = split_microbatches({"x": jnp.arange(6)}, 3)["x"]
    np.testing.assert_array_equal(split, [[0, 3], [1, 4], [2, 5]])


def test_bfloat16_compute_keeps_float32_masters(model_parts, plain_step):
    want_before, want, want_metrics = plain_step
    before, got, metrics = one_step(model_parts, compute_dtype="bfloat16")
    for tree in (got["params"], got["opt_state"]):
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}
        assert dtypes <= {jnp.dtype(jnp.float32)}, dtypes
    assert metrics["loss"].dtype == jnp.float32 and bool(metrics["finite"])
    assert_close(metrics["loss"], want_metrics["loss"], jnp.bfloat16, "forward", "loss")
    assert float(metrics["loss"]) != float(want_metrics["loss"])  # the step did compute in bfloat16
    # the float32 gradients (recovered from the SGD update) agree with float32 compute to bfloat16 tolerance
    for (path, new), old, want_new in zip(jax.tree_util.tree_leaves_with_path(got["params"]),
                                          jax.tree.leaves(before["params"]), jax.tree.leaves(want["params"])):
        grad = (old - new) / LEARNING_RATE
        want_grad = (old - want_new) / LEARNING_RATE
        assert_close(grad, want_grad, jnp.bfloat16, "gradient", f"d/dparams{jax.tree_util.keystr(path)}")


def test_bad_values_are_refused(model_parts):
    graphdef, params = model_parts
    merge = lambda p: nnx.merge(graphdef, p)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"gradient_accumulation must be an int >= 1 .* got {bad!r}"):
            make_train_step(merge, cross_entropy, TX, skip_nonfinite=False, gradient_accumulation=bad)
    for bad, why in (("float16", "loss scaling"), ("int8", "allowed"), (jnp.bfloat16, "allowed")):
        with pytest.raises(ValueError, match=f"compute_dtype=.*{why}"):
            make_train_step(merge, cross_entropy, TX, skip_nonfinite=False, compute_dtype=bad)
    step = make_train_step(merge, cross_entropy, TX, skip_nonfinite=False, gradient_accumulation=3)
    with pytest.raises(ValueError, match=r"gradient_accumulation=3 must divide .* batch\['tokens'\] has shape \(4, 9\)"):
        step(init_train_state(params, TX, seed=0), BATCH)


@pytest.mark.slow  # two trainer runs with their own compiles (~30 s on 2 cores)
def test_scanned_rematerialised_model_trains_on_a_mesh_like_the_plain_model(corpus, tiny_task, tmp_path):
    """The knobs together through the real trainer: an LLM with scan_layers and remat='full' on a data 2 x fsdp 2 x
    tensor 2 mesh (stacked parameters sharded by the same rules) reaches the plain single-device model's losses."""
    import dataclasses

    from train import sharding, trainer

    model = dataclasses.replace(CONFIG, vocab_size=256, tie_embeddings=False)
    losses = {}
    for name, config, mesh in (
            ("plain", model, sharding.MeshConfig(data=1)),
            ("knobs", dataclasses.replace(model, scan_layers=True, remat="full"),
             sharding.MeshConfig(data=2, fsdp=2, tensor=2))):
        task = _TrainOnly(dataclasses.replace(tiny_task(corpus), model=config))
        result = trainer.train(task, workdir=str(tmp_path / name), steps=3, mesh=mesh, progress_bar=False,
                               checkpoint_every=0, async_checkpoints=False)
        losses[name] = [result.losses[step] for step in (1, 2, 3)]
    assert_close(np.array(losses["knobs"]), np.array(losses["plain"]), jnp.float32, "gradient", "losses")


class _TrainOnly:
    """A task without evaluation and finish (their compiles are not what is tested)."""

    def __init__(self, task):
        self.task = task

    def __getattr__(self, name):
        if name in ("evaluate", "finish", "describe_evaluation"):
            raise AttributeError(name)
        return getattr(self.task, name)

"""MQAR generator (spec llm_mechanisms.md §7 (e)): each queried key appears once in the context, the label is its
paired value, the gap histogram follows the power law, and bad sizes are refused by name."""

import numpy as np
import pytest

from train.data.mqar import IGNORE, mqar


def test_structure_of_every_example():
    inputs, labels = mqar(200, 64, 4, vocab_size=128, seed=3)
    assert inputs.shape == labels.shape == (200, 64) and inputs.dtype == np.int32
    for x, y in zip(inputs, labels):
        keys, values = x[0:8:2], x[1:8:2]
        assert len(set(keys)) == 4 and len(set(values)) == 4
        assert np.all((1 <= keys) & (keys < 64)) and np.all((64 <= values) & (values < 128))
        (positions,) = np.nonzero(y != IGNORE)
        assert len(positions) == 4 and np.all(positions >= 8) and np.all((positions - 8) % 2 == 0)
        pairs = dict(zip(keys, values))
        for position in positions:
            assert x[position] in pairs and y[position] == pairs[x[position]]  # label = the queried key's value
        assert np.sum(np.isin(x, keys)) == 8  # each key once in the context, once as a query
        assert np.all(x[8:][~np.isin(np.arange(8, 64), positions)] == 0)  # filler


def test_gap_histogram_follows_the_power_law():
    _, labels = mqar(4000, 64, 1, vocab_size=128, seed=0)
    gaps = (np.argmax(labels != IGNORE, axis=1) - 2) // 2
    slots = (64 - 2) // 2
    weights = np.arange(1, slots + 1, dtype=float) ** (0.01 - 1)
    expected = weights / weights.sum()
    observed = np.bincount(gaps, minlength=slots) / len(gaps)
    np.testing.assert_allclose(observed[:4], expected[:4], atol=0.02)  # ~4.5x more mass on slot 0 than slot 3
    assert observed[0] > 3 * observed[3]


def test_random_filler_and_seeds():
    a, _ = mqar(5, 64, 4, vocab_size=128, random_non_queries=True, seed=1)
    assert np.count_nonzero(a[:, 8:] == 0) < 10
    np.testing.assert_array_equal(mqar(5, 64, 4, vocab_size=128, seed=2)[0], mqar(5, 64, 4, vocab_size=128, seed=2)[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=63, num_pairs=4), "seq_len must be even"),
    (dict(seq_len=64, num_pairs=4, vocab_size=64), "V > T"),
    (dict(seq_len=64, num_pairs=17), "4 \\* num_pairs <= seq_len"),
])
def test_bad_sizes_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mqar(2, **kwargs)


def test_benchmark_grid_builds_the_zoology_models():
    """bench/tasks.py's grid entries (shapes only, no weights drawn): lightning is TransNormerLLM's normalised mixer
    (the bare function did not learn MQAR), based is Zoology's Hybrid[BaseConv, Based]."""
    from flax import nnx

    from bench.mqar_setup import MECHANISMS, model_config
    from models.llm import LLM

    expected = {"lightning": {"tnl"}, "based": {"base_conv", "based"}, "performer": {"performer"}}
    for mechanism, kinds in expected.items():
        model = nnx.eval_shape(lambda: LLM(model_config(mechanism, 16, 64), rngs=nnx.Rngs(0)))
        assert {m.kind for _, m in nnx.iter_graph(model) if hasattr(m, "kind")} == kinds, mechanism
    assert set(MECHANISMS) == {"softmax", "sliding_window", "based", "lightning", "performer", "moh"}


def test_learned_positions_replace_rotary():
    """bench/tasks.py --positions learned (Zoology's scheme): rotary off, a [T, D] table added to the token embedding,
    the tied output unchanged; a mixer without a rotary switch is refused by name."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.mqar_setup import model_config, use_learned_positions
    from models.llm import LLM

    model = LLM(model_config("softmax", 16, 64), rngs=nnx.Rngs(0))
    ids = jnp.array([[3, 5, 7, 9, 3, 5, 7, 9]])
    tokens_only = model.embed(ids)
    use_learned_positions(model, 8, jax.random.key(1))
    assert not any(block.attention.use_rope for block in model.blocks)
    table = model.embed.position_td[...]
    assert table.shape == (8, 16) and 0.01 < float(jnp.std(table)) < 0.03
    np.testing.assert_allclose(model.embed(ids), tokens_only + table[None], rtol=1e-6)
    np.testing.assert_allclose(model.embed.attend(tokens_only), model.embed.inner.attend(tokens_only), rtol=1e-6)
    assert nnx.state(model, nnx.Param)["embed"]["position_td"].shape == (8, 16)  # trained with the rest
    assert model(ids).shape == (1, 8, 64)
    based = LLM(model_config("based", 16, 64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_rope"):
        use_learned_positions(based, 8, jax.random.key(1))


def test_untied_probe_config():
    """bench/tasks.py --untied: a separate [d, V] output matrix (no tied 1/sqrt(d) output); tied by default."""
    from flax import nnx

    from bench.mqar_setup import Budget, model_config
    from models.llm import LLM

    assert Budget().tie_embeddings and model_config("softmax", 16, 64).tie_embeddings
    model = nnx.eval_shape(lambda: LLM(model_config("softmax", 16, 64, tie_embeddings=False), rngs=nnx.Rngs(0)))
    assert model.unembed_dv.shape == (16, 64)


def test_matrices_train_at_the_width_scaled_learning_rate():
    """bench/tasks.py's muP-style optimizer: the embedding (tied output), norm scales and learned positions take the
    base lr; projections and an untied output take lr * base_width / d_model. One Adam step from a constant gradient
    moves each weight by about its lr, so the moves' ratio is the rates' ratio."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.mqar_setup import Budget, matrix_learning_rate_labels, model_config, optimizer_for
    from models.llm import LLM

    model = LLM(model_config("softmax", 16, 64, tie_embeddings=False), rngs=nnx.Rngs(0))
    labels = nnx.to_flat_state(matrix_learning_rate_labels(nnx.state(model, nnx.Param)))
    by_name = {".".join(map(str, path)): label for path, label in labels}
    assert by_name["embed.embedding_vd"] == "other" and by_name["final_norm.scale_d"] == "other"
    assert by_name["unembed_dv"] == "matrix" and by_name["blocks.0.attention.query_dnh"] == "matrix"
    optimizer, rate, matrix_rate = optimizer_for(model, Budget(learning_rate=1e-3, matrix_lr_base_width=64, warmup=0.5),
                                                  16, steps=4)
    assert (rate, matrix_rate) == (1e-3, 4e-3)  # base width 64 over d_model 16
    before = jax.tree_util.tree_map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # a copy, not a view
    ones = jax.tree_util.tree_map(jnp.ones_like, nnx.state(model, nnx.Param))
    for _ in range(3):  # the warmup's first step has lr 0; the third runs at the peak
        optimizer.update(model, ones)
    moved = jax.tree_util.tree_map(lambda new, old: float(np.mean(np.abs(new - old))),
                                   nnx.to_pure_dict(nnx.state(model, nnx.Param)), before)
    ratio = moved["blocks"][0]["attention"]["key_dkh"] / moved["embed"]["embedding_vd"]
    assert 3.6 < ratio < 4.4, ratio
    assert optimizer_for(model, Budget(matrix_lr_base_width=0), 16, 4)[1:] == (Budget().learning_rate,) * 2


def test_training_plan_splits_the_mixture_as_based():
    """bench/tasks.py's protocols: the mixture trains on 5 : 1 : 1 examples of (64, 4), (128, 8), (256, 16) (the
    Based paper's 100k / 20k / 20k), each step 3/4 of its rows from the shortest cell and the tokens of 1/4 of them
    from each longer one; per_cell keeps Zoology's halving of the
    batch with the length and refuses several cells."""
    from bench.mqar_setup import Budget
    from bench.tasks import training_plan

    cells = [(256, 16), (64, 4), (128, 8)]
    assert training_plan(cells, Budget()) == [(64, 4, 20_000, 48), (128, 8, 4_000, 8), (256, 16, 4_000, 4)]
    per_cell = Budget(protocol="per_cell")
    assert training_plan([(128, 8)], per_cell) == [(128, 8, 20_000, 32)]
    with pytest.raises(ValueError, match="one cell at a time"):
        training_plan(cells, per_cell)


def test_one_mixture_run_scores_every_cell():
    """A tiny mixture run (width 16, 3 steps): one model, one result per cell with that cell's plan and the run's
    shared steps; accuracies are shares of the cell's queries."""
    import dataclasses

    from bench.mqar_setup import Budget
    from bench.tasks import train_mqar

    budget = dataclasses.replace(Budget(), train_examples=64, test_examples=64, batch_size=8, steps=3,
                                 steps_per_call=3, vocab_size=160)
    results = train_mqar("softmax", 16, [(64, 4), (128, 8)], budget)
    assert [(r["seq_len"], r["num_pairs"], r["train_examples"], r["batch_size"]) for r in results] == [
        (64, 4, 64, 6), (128, 8, 12, 1)]
    assert all(r["steps"] == 3 and r["protocol"] == "mixture" and 0.0 <= r["accuracy"] <= 1.0 for r in results)
    assert all(np.isfinite(r["final_loss"]) for r in results)


def test_final_norm_gain_is_per_mechanism_unless_forced():
    """Budget.final_norm_gain "auto": each mechanism's own initial gain (the probes' pick: 1 for softmax, sqrt(d_model)
    for the Based hybrid and the other linear attentions); "one" / "sqrt" apply to all; the option never reaches
    LLMConfig."""
    from bench.mqar_setup import Budget, final_norm_gain_for, model_config

    auto = Budget()
    assert final_norm_gain_for("softmax", auto) == "one"
    assert {final_norm_gain_for(m, auto) for m in ("based", "lightning", "performer")} == {"sqrt"}
    assert final_norm_gain_for("based", Budget(final_norm_gain="one")) == "one"
    assert final_norm_gain_for("softmax", Budget(final_norm_gain="sqrt")) == "sqrt"
    assert model_config("based", 16, 64).attention == "based"  # built without the init-only key

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

    from bench.tasks import MECHANISMS, model_config
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

    from bench.tasks import model_config, use_learned_positions
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

    from bench.tasks import Budget, model_config
    from models.llm import LLM

    assert Budget().tie_embeddings and model_config("softmax", 16, 64).tie_embeddings
    model = nnx.eval_shape(lambda: LLM(model_config("softmax", 16, 64, tie_embeddings=False), rngs=nnx.Rngs(0)))
    assert model.unembed_dv.shape == (16, 64)

"""attnx.analysis.maps on hand-made maps with known answers: rollout (Abnar & Zuidema 2020), head divergence (VHD),
head-ablation tables, retrieval-head scores (spec llm_mechanisms.md §9)."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnx import analysis
from attnx.analysis import maps


def test_rollout_of_identity_maps_is_identity_and_uniform_maps_give_uniform_rows():
    eye = jnp.broadcast_to(jnp.eye(4), (3, 2, 4, 4))  # [L, N, T, T]
    np.testing.assert_allclose(analysis.attention_rollout(eye), np.eye(4), atol=1e-6)
    uniform = jnp.full((1, 2, 4, 4), 0.25)
    # one layer: 0.5 I + 0.5 U
    np.testing.assert_allclose(analysis.attention_rollout(uniform), 0.5 * np.eye(4) + 0.125, atol=1e-6)


def test_rollout_matches_the_product_of_residual_maps_later_layers_on_the_left():
    rng = np.random.default_rng(0)
    raw = rng.uniform(size=(3, 2, 5, 5))
    attn = raw / raw.sum(-1, keepdims=True)
    expected = np.eye(5)
    for layer in attn:
        expected = (0.5 * layer.mean(0) + 0.5 * np.eye(5)) @ expected
    got = np.asarray(analysis.attention_rollout(jnp.asarray(attn, jnp.float32)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)  # rows stay normalised


def test_rollout_to_grid_reads_the_class_row_over_the_patches():
    rollout = jnp.zeros((5, 5)).at[0, 1:].set(jnp.arange(4.0))
    np.testing.assert_array_equal(analysis.rollout_to_grid(rollout, (2, 2)), [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="num_prefix"):
        analysis.rollout_to_grid(rollout, (3, 3))


def test_head_divergence_is_the_mean_token_l2_distance_per_head():
    base = jnp.zeros((2, 3, 4))  # [T, N, V]
    other = base.at[:, 1, 0].set(3.0).at[:, 1, 1].set(4.0).at[0, 2, 0].set(2.0)
    np.testing.assert_allclose(analysis.head_divergence(other, base), [0.0, 5.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        analysis.head_divergence(other, base[:1])


def test_ablation_deltas_and_ranking():
    deltas = analysis.ablation_deltas(2.0, [[2.5, 1.9], [3.0, 2.0]])
    np.testing.assert_allclose(deltas, [[0.5, -0.1], [1.0, 0.0]])
    table = analysis.rank_heads(deltas, layer_names=["blocks.0", "blocks.1"])
    assert [(row["layer"], row["head"]) for row in table] == [(1, 0), (0, 0), (1, 1), (0, 1)]
    assert table[0] == {"rank": 1, "layer": 1, "head": 0, "score": 1.0, "name": "blocks.1"}
    assert [r["rank"] for r in analysis.rank_heads({(0, 1): 0.2, (2, 0): 0.7})] == [1, 2]
    with pytest.raises(ValueError, match="ablated_losses"):
        analysis.ablation_deltas(1.0, [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        analysis.ablation_deltas(1.0, [[np.nan]])


def _copy_head_trial(num_layers=2, num_heads=3, prompt_len=10, span=(4, 7), copy=(1, 2), seed=0):
    """A trial where head `copy` points at needle token s + i when it emits it, other heads look elsewhere."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(10, 100, prompt_len)
    steps = span[1] - span[0]
    attn = rng.uniform(size=(steps, num_layers, num_heads, prompt_len + steps)) * 0.1
    attn[:, :, :, 0] = 1.0  # every head: the first token (a sink)
    for i in range(steps):
        attn[i, copy[0], copy[1], span[0] + i] = 2.0
    tokens = prompt[span[0]:span[1]]
    return jnp.asarray(attn), prompt, tokens, span


def test_a_hand_built_copy_head_scores_one_and_the_others_zero():
    attn, prompt, tokens, span = _copy_head_trial()
    scores = np.asarray(analysis.retrieval_scores(attn, span, prompt, tokens))
    expected = np.zeros((2, 3))
    expected[1, 2] = 1.0
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert analysis.retrieval_heads(scores) == [(1, 2)]


def test_retrieval_step_needs_the_copied_token_to_match_and_the_argmax_in_the_span():
    attn, prompt, tokens, span = _copy_head_trial()
    step = analysis.retrieval_score_step(attn[0], span, prompt, int(tokens[0]))
    assert float(step[1, 2]) == pytest.approx(1 / 3)
    wrong = analysis.retrieval_score_step(attn[0], span, prompt, int(tokens[0]) + 1000)  # emitted another token
    assert float(jnp.sum(wrong)) == 0.0
    outside = analysis.retrieval_score_step(attn[0], (0, 2), prompt, int(prompt[0]))  # sinks at 0, in (0, 2)
    assert float(outside[0, 0]) == pytest.approx(0.5) and float(outside[1, 2]) == 0.0


def test_random_heads_score_near_zero():
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 50, 64)
    attn = jnp.asarray(rng.uniform(size=(8, 4, 4, 72)))
    scores = analysis.retrieval_scores(attn, (20, 28), prompt, jnp.asarray(prompt[20:28]))
    assert float(jnp.max(scores)) <= 0.25


@pytest.mark.parametrize("span", [(3, 3), (-1, 2), (0, 11), (1.0, 2), "ab"])
def test_bad_spans_name_the_argument(span):
    attn, prompt, tokens, _ = _copy_head_trial()
    with pytest.raises(ValueError, match="span"):
        maps.retrieval_score_step(attn[0], span, prompt, 1)


def test_bad_shapes_and_threshold_are_refused():
    with pytest.raises(ValueError, match="last_row_attn"):
        maps.retrieval_score_step(jnp.zeros((2, 3)), (0, 1), jnp.zeros(3, jnp.int32), 1)
    with pytest.raises(ValueError, match="prompt_ids"):
        maps.retrieval_score_step(jnp.zeros((1, 1, 3)), (0, 1), jnp.zeros(5, jnp.int32), 1)
    with pytest.raises(ValueError, match="threshold"):
        maps.retrieval_heads(np.zeros((1, 1)), threshold=2.0)
    with pytest.raises(ValueError, match="scores"):
        maps.rank_heads(np.zeros(3))

"""Registry behaviour and the CAB four-pattern property over every registered mechanism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.testing.patterns import supported_patterns


def test_builtins_are_registered():
    names = attnx.list_attentions()
    assert "softmax" in names and "sliding_window" in names
    assert names == sorted(names)


def test_get_attention_returns_spec_with_paper_and_implementations():
    spec = attnx.get_attention("softmax")
    assert spec.patterns == frozenset({"NS", "CS", "NC", "CC"})
    assert "1706.03762" in spec.paper
    assert "chunked" in spec.implementations and "reference" in spec.implementations


def test_alias_resolves_to_the_same_spec():
    assert attnx.get_attention("local") is attnx.get_attention("sliding_window")


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown name 'sofmax'.*softmax.*sliding_window|unknown name 'sofmax'"):
        attnx.get_attention("sofmax")
    with pytest.raises(ValueError) as err:
        attnx.get_attention("sofmax")
    assert "sliding_window" in str(err.value) and "softmax" in str(err.value)


def test_duplicate_registration_is_refused():
    spec = attnx.get_attention("softmax")
    with pytest.raises(ValueError, match="already registered"):
        attnx.register_attention(spec)


@pytest.mark.parametrize("name", attnx.list_attentions())
def test_cab_patterns_are_exactly_the_declared_ones(name):
    spec = attnx.get_attention(name)
    assert supported_patterns(spec) == spec.patterns


def test_sliding_window_matches_cab_definition():
    """CAB local attention: NS keys [i - w, i + w]; CS keys [i - w + 1, i]."""
    rng = np.random.default_rng(0)
    T, w = 12, 3
    x = jnp.asarray(rng.standard_normal((1, T, 2, 8)), jnp.float32)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    spec = attnx.get_attention("sliding_window")
    for causal, allowed in ((False, np.abs(i - j) <= w), (True, (j <= i) & (j > i - w))):
        got = spec.fn(x, x, x, window=w, causal=causal, implementation=attnx.Chunked(block_q=4, block_kv=4))
        want = attnx.dot_product_attention(x, x, x, mask=jnp.asarray(allowed), implementation="reference")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_sliding_window_rejects_bad_window():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="sliding_window.window"):
        attnx.get_attention("sliding_window").fn(x, x, x, window=0)


def _probe_spec(fn, patterns=frozenset({"NS", "CS", "NC", "CC"})):
    return attnx.registry.AttentionSpec(name="probe", fn=fn, reference=fn, patterns=patterns, paper="test probe")


def _causal_softmax(q, k, v, *, causal=False, length_scale=False, leak=False):
    logits = jnp.einsum("btnh,bsnh->bnts", q, k)
    T, S = q.shape[1], k.shape[1]
    if causal and not leak:
        logits = jnp.where(np.tril(np.ones((T, S), bool)), logits, -jnp.inf)  # CAB: query i sees keys <= i
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
    return out / T if length_scale else out


@pytest.mark.parametrize("option, passes", [({}, {"NS", "CS", "NC", "CC"}),
                                            ({"leak": True}, {"NS", "NC", "CC"}),
                                            ({"length_scale": True}, {"NS", "NC"})])
def test_cab_check_catches_future_leaks_and_length_dependence(option, passes):
    # A causal mask that reads the future fails CS (CC only fixes the queries, which plain cross attention keeps
    # independent, so a leak over keys passes it as in CAB); an output that depends on the total length fails both
    # (no future value enters row i, but a prefix gives another result): the two halves of the causal check.
    spec = _probe_spec(functools.partial(_causal_softmax, **option))
    assert supported_patterns(spec) == frozenset(passes)

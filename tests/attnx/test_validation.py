"""Input validation at the public entry: every invalid call raises ValueError/TypeError naming the argument."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnx

F32 = np.float32


def _valid(B, T, S, N, K, H, V):
    return dict(query=np.zeros((B, T, N, H), F32), key=np.zeros((B, S, K, H), F32),
                value=np.zeros((B, S, K, V), F32))


def _defects(B, T, S, N, K, H, V):
    """(argument name that the message must contain, a function turning valid kwargs into an invalid call)."""
    z = lambda *s, dt=F32: np.zeros(s, dt)  # noqa: E731
    return [
        ("query", lambda a: a.update(query=z(T, N))),
        ("query", lambda a: a.update(query=z(B, T, N, H, dt=np.int32))),
        ("key", lambda a: a.update(key=z(B, S, K, H, dt=np.int32))),
        ("value", lambda a: a.update(value=z(B, S, K, V, dt=np.int8))),
        ("key", lambda a: a.update(key=z(1, B, S, K, H))),
        ("query/key/value", lambda a: a.update(value=a["value"].astype(np.float16))),
        ("key", lambda a: a.update(key=z(B + 1, S, K, H))),
        ("key", lambda a: a.update(key=z(B, S, K, H + 1))),
        ("value", lambda a: a.update(value=z(B, S + 1, K, V))),
        ("value", lambda a: a.update(value=z(B, S, K + 1, V))),
        ("key", lambda a: a.update(key=z(B, S, N + 1, H), value=z(B, S, N + 1, V))),
        ("query", lambda a: a.update(query=z(B, T, N, 0))),
        ("bias", lambda a: a.update(bias=z(B, N, T, S + 1))),
        ("bias", lambda a: a.update(bias=z(B, N + 1, T, S))),
        ("bias", lambda a: a.update(bias=z(B, N, T + 2, S))),
        ("bias", lambda a: a.update(bias=z(S))),
        ("bias", lambda a: a.update(bias=z(B, N, T, S, dt=np.int32))),
        ("bias", lambda a: a.update(bias=z(B + 3, B + 2, N, T, S))),
        ("bias", lambda a: a.update(bias="not an array")),
        ("mask", lambda a: a.update(mask=z(T, S))),
        ("mask.dense", lambda a: a.update(mask=attnx.Mask(dense=z(T, S + 1, dt=bool)))),
        ("mask.dense", lambda a: a.update(mask=attnx.Mask(dense=z(T + 1, S, dt=bool)))),
        ("mask.dense", lambda a: a.update(mask=attnx.Mask(dense=z(T, S)))),
        ("mask.kv_lengths", lambda a: a.update(mask=attnx.Mask(kv_lengths=z(B)))),
        ("mask.kv_lengths", lambda a: a.update(mask=attnx.Mask(kv_lengths=z(B + 1, dt=np.int32)))),
        ("mask.q_lengths", lambda a: a.update(mask=attnx.Mask(q_lengths=z(B, dt=np.float32)))),
        ("mask.q_segment_ids", lambda a: a.update(mask=attnx.Mask(q_segment_ids=z(B, T + 1, dt=np.int32),
                                                                  kv_segment_ids=z(B, S, dt=np.int32)))),
        ("mask.kv_segment_ids", lambda a: a.update(mask=attnx.Mask(q_segment_ids=z(B, T, dt=np.int32),
                                                                   kv_segment_ids=z(B, S + 1, dt=np.int32)))),
        ("mask.q_segment_ids", lambda a: a.update(mask=attnx.Mask(q_segment_ids=z(B, T, dt=np.int32)))),
        ("mask.block_mask", lambda a: a.update(mask=attnx.Mask(block_mask=z(T + 1, S, dt=bool),
                                                               block_size=(1, 1)))),
        ("mask.block_mask", lambda a: a.update(mask=attnx.Mask(block_mask=z(T, S), block_size=(1, 1)))),
        ("mask.block_size", lambda a: a.update(mask=attnx.Mask(block_mask=z(T, S, dt=bool)))),
        ("mask.block_size", lambda a: a.update(mask=attnx.Mask(block_mask=z(T, S, dt=bool), block_size=(0, 1)))),
        ("mask.window", lambda a: a.update(mask=attnx.Mask(window=(-1, 2)))),
        ("mask.window", lambda a: a.update(mask=attnx.Mask(window=(2, -3)))),
        ("mask.window", lambda a: a.update(mask=attnx.Mask(window=-2))),
        ("mask.window", lambda a: a.update(mask=attnx.Mask(window=(1.5, 2)))),
        ("mask.window", lambda a: a.update(mask=attnx.Mask(window=(1, 2, 3)))),
        ("mask.causal", lambda a: a.update(mask=attnx.Mask(causal="yes"))),
        ("mask.q_offset", lambda a: a.update(mask=attnx.Mask(q_offset=1.5))),
        ("implementation", lambda a: a.update(implementation="flash")),
        ("implementation", lambda a: a.update(implementation=["chunked", "pallas_tpuu"])),
        ("implementation", lambda a: a.update(implementation=3)),
        ("implementation", lambda a: a.update(implementation=[])),
        ("scale", lambda a: a.update(scale=float("nan"))),
        ("scale", lambda a: a.update(scale="0.1")),
        ("logits_soft_cap", lambda a: a.update(logits_soft_cap=0.0)),
        ("logits_soft_cap", lambda a: a.update(logits_soft_cap=-5.0)),
        ("logits_soft_cap", lambda a: a.update(logits_soft_cap=float("inf"))),
        ("sinks", lambda a: a.update(sinks=z(N + 1))),
        ("sinks", lambda a: a.update(sinks=z(B, N))),
        ("sinks", lambda a: a.update(sinks=z(N, dt=np.int32))),
        ("score_mod", lambda a: a.update(score_mod=3)),
        ("mask_mod", lambda a: a.update(mask_mod="causal")),
    ]


N_DEFECTS = len(_defects(1, 1, 1, 1, 1, 1, 1))


def _wrong(data, valid: tuple, label: str) -> int:
    """A size that is none of `valid` (drawn, so the wrong shapes themselves vary)."""
    return data.draw(st.integers(0, 12).filter(lambda x: x not in valid), label=label)


def _drawn_defects(data, B, T, S, N, K, H, V):
    """Defects whose wrong sizes, ranks and dtypes are drawn by hypothesis."""
    z = lambda *s, dt=F32: np.zeros(s, dt)  # noqa: E731
    bad_int = data.draw(st.sampled_from([np.int8, np.int32, np.uint8, np.bool_]), label="non-float dtype")
    return [
        ("query", lambda a: a.update(query=z(*data.draw(st.lists(st.integers(1, 3), max_size=2), label="rank")))),
        ("query", lambda a: a.update(query=a["query"].astype(bad_int))),
        ("key", lambda a: a.update(key=z(B, S, K, _wrong(data, (H,), "H'")))),
        ("value", lambda a: a.update(value=z(B, _wrong(data, (S,), "S'"), K, V))),
        ("value", lambda a: a.update(value=z(B, S, _wrong(data, (K,), "K'"), V))),
        ("key", lambda a: (lambda k2: a.update(key=z(B, S, k2, H), value=z(B, S, k2, V)))(
            data.draw(st.integers(1, 12).filter(lambda x: N % x != 0), label="K not dividing N"))),
        ("bias", lambda a: a.update(bias=z(B, N, T, _wrong(data, (1, S), "bias S")))),
        ("bias", lambda a: a.update(bias=z(B, _wrong(data, (1, N), "bias N"), T, S))),
        ("bias", lambda a: a.update(bias=z(B, N, _wrong(data, (1, T), "bias T"), S))),
        ("mask.dense", lambda a: a.update(mask=attnx.Mask(dense=z(_wrong(data, (1, T), "mask T"), S, dt=bool)))),
        ("mask.kv_lengths", lambda a: a.update(mask=attnx.Mask(kv_lengths=z(_wrong(data, (1, B), "len B"),
                                                                              dt=np.int32)))),
        ("mask.window", lambda a: a.update(mask=attnx.Mask(window=(data.draw(st.integers(-50, -1), label="w"), 1)))),
        ("sinks", lambda a: a.update(sinks=z(_wrong(data, (N,), "sinks N")))),
        ("logits_soft_cap", lambda a: a.update(logits_soft_cap=data.draw(
            st.floats(max_value=0.0, allow_nan=False), label="cap"))),
    ]


# 100 drawn examples (was 300, ~45 s of the CI budget): every defect is also checked at fixed sizes below, so the
# drawn test only varies the wrong sizes, ranks and dtypes on top.
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_invalid_calls_raise_errors_that_name_the_argument(data):
    K = data.draw(st.integers(1, 3), label="K")
    G = data.draw(st.integers(1, 3), label="G")
    dims = dict(B=data.draw(st.integers(1, 3), label="B"), T=data.draw(st.integers(1, 9), label="T"),
                S=data.draw(st.integers(1, 9), label="S"), N=K * G, K=K,
                H=data.draw(st.integers(1, 8), label="H"), V=data.draw(st.integers(1, 8), label="V"))
    defects = _defects(**dims) + _drawn_defects(data, **dims)
    name, apply = defects[data.draw(st.integers(0, len(defects) - 1), label="defect")]
    kwargs = _valid(**dims)
    with pytest.raises((ValueError, TypeError)) as err:
        apply(kwargs)
        attnx.dot_product_attention(**kwargs)
    message = str(err.value)
    assert name in message, f"message does not name {name!r}: {message}"


@pytest.mark.parametrize("index", range(N_DEFECTS))
def test_every_defect_is_rejected_at_fixed_sizes(index):
    dims = dict(B=2, T=5, S=7, N=4, K=2, H=8, V=6)
    name, apply = _defects(**dims)[index]
    kwargs = _valid(**dims)
    with pytest.raises((ValueError, TypeError), match=name.replace(".", r"\.")):
        apply(kwargs)
        attnx.dot_product_attention(**kwargs)


def test_valid_base_call_runs():
    out = attnx.dot_product_attention(**_valid(2, 5, 7, 4, 2, 8, 6))
    assert out.shape == (2, 5, 4, 6)

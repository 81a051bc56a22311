"""Landmark Attention (spec llm_mechanisms.md §4 (e)): weights against a loop transcription of §4 (b), rows sum to 1
with landmark columns 0, the LSE identity, chunked and gathered paths = reference (forward, gradients, jvp), top-k
retrieval = the dense selection, decode = last rows, a passkey retrieval, the LM data layout, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.landmark.landmark import (landmark_attention, landmark_decode, landmark_retrieve,
                                         landmark_weights_of, regular_landmarks)
from attnx.testing.tolerances import assert_close
from train.data.landmark import (insert_landmarks, landmark_mask, language_model_example, num_ordinary,
                                 remove_landmarks)

B, T, N, K, H, V = 2, 11, 4, 2, 8, 5
BLOCK = 2  # landmarks at 2, 5, 8: three complete blocks and a partial one


def inputs(seed=0, length=T):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, length, N, H)), jax.random.normal(kk, (B, length, K, H)),
            jax.random.normal(kv, (B, length, K, V)))


@functools.partial(jax.jit, static_argnames=("implementation", "top_k"))
def attend(q, k, v, implementation=None, top_k=None):
    return landmark_attention(q, k, v, block_size=BLOCK, implementation=implementation, top_k=top_k)


def loop_weights(q, k, is_landmark):
    """Spec §4 (b) transcribed with Python loops: one batch row, one head; q [T, H], k [S, H] -> w [T, S]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    s = q @ k.T / np.sqrt(q.shape[-1])
    block = np.cumsum(is_landmark) - is_landmark
    w = np.zeros_like(s)
    for t in range(len(q)):
        c = block[t]
        outer = [j for j in range(t + 1) if (block[j] == c and not is_landmark[j]) or (is_landmark[j] and block[j] < c)]
        p = np.exp(s[t, outer] - s[t, outer].max())
        p /= p.sum()
        for pj, j in zip(p, outer):
            if not is_landmark[j]:
                w[t, j] = pj
                continue
            members = [i for i in range(t + 1) if block[i] == block[j] and not is_landmark[i]]
            inner = np.exp(s[t, members] - s[t, members].max())
            w[t, members] = pj * inner / inner.sum()
    return w


weights = jax.jit(lambda q, k, is_lm: landmark_weights_of(q, k, is_landmark=is_lm))


@pytest.mark.parametrize("general", [False, True], ids=["regular", "is_landmark"])
def test_weights_follow_the_spec_rows_sum_to_one_and_landmarks_get_zero(general):
    q, k, _ = inputs()
    is_lm = np.broadcast_to(np.asarray(regular_landmarks(T, BLOCK)), (B, T)).copy()
    if general:  # irregular blocks (3, 1, 4 tokens and 1, 4 tokens), a different mask per batch row
        is_lm[:] = False
        is_lm[0, [3, 5, 10]] = True
        is_lm[1, [1, 6]] = True
    w = np.asarray(weights(q, k, jnp.asarray(is_lm)))
    for b in range(B):
        for n in range(N):
            np.testing.assert_allclose(w[b, :, n], loop_weights(q[b, :, n], k[b, :, n // (N // K)], is_lm[b]),
                                       atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    for b in range(B):
        assert np.all(w[b][..., is_lm[b]] == 0.0)  # landmarks only gate: their values are never read
    future = np.triu(np.ones((T, T), bool), 1)[None, :, None, :]
    assert np.all(np.where(future, w, 0.0) == 0.0)


def test_landmark_logit_equal_to_block_lse_gives_plain_softmax():
    """Queries constant over positions and within each GQA group: setting each landmark key so that
    q . k_L / sqrt(H) equals its block's LSE makes p_{L_g} the block's share of one softmax, so w = the plain causal
    softmax over the ordinary tokens."""
    rng = np.random.default_rng(3)
    q_kv = rng.standard_normal((B, K, H))  # one query per kv head, shared by its group and by every position
    q = np.broadcast_to(np.repeat(q_kv, N // K, axis=1)[:, None], (B, T, N, H))
    k, v = rng.standard_normal((B, T, K, H)), rng.standard_normal((B, T, K, V))
    lm = np.asarray(regular_landmarks(T, BLOCK))
    s = np.einsum("bkh,bskh->bks", q_kv, k) / np.sqrt(H)  # the same for every query
    for p in np.flatnonzero(lm):
        lse = np.log(np.exp(s[:, :, p - BLOCK:p]).sum(-1))  # [B, K]
        k[:, p] = q_kv * (lse * np.sqrt(H) / np.sum(q_kv**2, -1))[..., None]
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    allowed = np.tril(np.ones((T, T), bool)) & ~lm[None, :]
    want = attnx.dot_product_attention(*args, mask=jnp.asarray(allowed), implementation="reference")
    for implementation in ("reference", "chunked", "gather"):
        assert_close(attend(*args, implementation=implementation), want, jnp.float32, what=implementation)
    # The identity is not vacuous: with another landmark logit the output differs.
    args[1] = args[1].at[:, BLOCK].add(jnp.asarray(q_kv, jnp.float32))  # the first landmark logit + |q|^2/sqrt(H)
    assert float(jnp.max(jnp.abs(attend(*args, implementation="reference") - want))) > 1e-2


@pytest.mark.parametrize("top_k", [None, 1], ids=["training", "top1"])
def test_fast_paths_equal_the_reference_forward_gradients_and_jvp(top_k):
    primals, tangents = inputs(), inputs(seed=1)
    cotangent = jax.random.normal(jax.random.key(9), (B, T, N, V))
    want = attend(*primals, implementation="reference", top_k=top_k)
    loss = lambda impl: jax.jit(jax.grad(lambda *a: jnp.sum(cotangent * attend(*a, implementation=impl,
                                                                                top_k=top_k)), (0, 1, 2)))
    grads_want = loss("reference")(*primals)
    for impl in ("chunked", "gather") if top_k is None else ("gather",):
        assert_close(attend(*primals, implementation=impl, top_k=top_k), want, jnp.float32, what=impl)
    # Gradients: the scan for the training path; the gather once (top_k=None runs the same code with k = nb).
    for impl in ("chunked",) if top_k is None else ("gather",):
        for name, g, w in zip("qkv", loss(impl)(*primals), grads_want):
            assert_close(g, w, jnp.float32, "gradient", what=f"{impl} d{name}")
    if top_k is None:  # forward mode of the scan: <cotangent, J t> must equal <J^T cotangent, t> of the reference
        _, got = jax.jit(lambda p, t: jax.jvp(lambda *a: attend(*a, implementation="chunked"), p, t))(primals,
                                                                                                       tangents)
        want_dot = sum(jnp.sum(g * t) for g, t in zip(grads_want, tangents))
        assert_close(jnp.sum(cotangent * got), want_dot, jnp.float32, "gradient", what="jvp")


def test_bfloat16_inputs_within_the_table():
    low = [x.astype(jnp.bfloat16) for x in inputs()]
    got = attend(*low, implementation="chunked")
    assert got.dtype == jnp.bfloat16
    assert_close(got, attend(*(x.astype(jnp.float32) for x in low), implementation="reference"), jnp.bfloat16)


def test_top_k_selects_and_restricts():
    q, k, v = inputs()
    full, top1 = attend(q, k, v, implementation="chunked"), attend(q, k, v, implementation="gather", top_k=1)
    # Rows in blocks 0 and 1 have at most one earlier block: top-1 retrieval is the whole past there.
    assert_close(top1[:, : 2 * (BLOCK + 1)], full[:, : 2 * (BLOCK + 1)], jnp.float32)
    assert float(jnp.max(jnp.abs(top1[:, -1] - full[:, -1]))) > 1e-3  # three earlier blocks, one kept
    # k = all blocks (top_k=None) equals the training path: test_fast_paths_equal_the_reference_...[training].


def test_decode_equals_the_last_rows():
    q, k, v = inputs()
    L = T + 4  # unwritten slots after the queries must not matter
    cache_k = jnp.full((B, L, K, H), 7.0).at[:, :T].set(k)
    cache_v = jnp.full((B, L, K, V), 7.0).at[:, :T].set(v)
    rows = slice(T - 3, T)
    decode = jax.jit(lambda qq, top_k: landmark_decode(qq, cache_k, cache_v, query_positions=jnp.arange(T - 3, T),
                                                       block_size=BLOCK, top_k=top_k), static_argnums=1)
    assert_close(decode(q[:, rows], None), attend(q, k, v, implementation="chunked")[:, rows], jnp.float32)
    # Retrieval of one block per query and head: the rows of the full-sequence retrieval call.
    assert_close(decode(q[:, rows], 1), attend(q, k, v, implementation="gather", top_k=1)[:, rows], jnp.float32)
    assert attnx.get_attention("landmark").decode is landmark_decode


retrieve_top1 = jax.jit(lambda q, landmark_k, valid: landmark_retrieve(q, landmark_k, 1, valid=valid))


def test_passkey_block_is_retrieved_and_read():
    """The last query (position 10, three earlier blocks) is aligned with one block's landmark key only: top-1
    retrieval must pick that block, and the output must be that block's (constant) value."""
    b1, blocks, target = BLOCK + 1, T // (BLOCK + 1), 1
    q, k, v = (0.1 * x for x in inputs(seed=5))
    direction = jnp.zeros((H,)).at[0].set(8.0)
    passkey = jnp.arange(1.0, V + 1.0)
    k = k.at[:, target * b1 + BLOCK].set(direction)  # the passkey block's landmark
    v = v.at[:, target * b1: target * b1 + BLOCK].set(passkey)
    q = q.at[:, -1].set(direction)
    landmark_k = k[:, BLOCK::b1]
    everything = jnp.ones((blocks,), bool)
    idx, ok = retrieve_top1(q, landmark_k, everything)
    assert idx.shape == (B, T, N, 1) and np.all(np.asarray(idx[:, -1]) == target) and np.all(np.asarray(ok))
    out = attend(q, k, v, implementation="gather", top_k=1)[:, -1]
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(passkey, (B, N, V)), atol=1e-2)
    # Candidates are respected: with the passkey block excluded another block is chosen.
    idx, _ = retrieve_top1(q, landmark_k, everything.at[target].set(False))
    assert not np.any(np.asarray(idx) == target)


def test_retrieval_methods_pool_over_heads_and_tokens():
    q, k, _ = inputs()
    landmark_k = k[:, BLOCK::BLOCK + 1]
    for method, axis in (("max_over_heads", 2), ("max_over_tokens", 1)):
        idx, _ = landmark_retrieve(q, landmark_k, 2, retrieval=method)
        assert np.all(np.asarray(idx) == np.take(np.asarray(idx), [0], axis=axis)), method


def test_registry_entry_is_causal_self_only():
    spec = attnx.get_attention("landmark")
    assert spec.patterns == frozenset({"CS"}) and "2305.16300" in spec.paper
    q, k, v = inputs()
    with pytest.raises(ValueError, match="causal=False is not supported"):
        spec.fn(q, k, v, causal=False)
    with pytest.raises(ValueError, match="query length == key length"):
        spec.fn(q, k[:, :7], v[:, :7], causal=True)


def test_bad_arguments_are_named():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="landmark.block_size: expected an int >= 1"):
        landmark_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="landmark.top_k"):
        landmark_attention(q, k, v, top_k=-1)
    with pytest.raises(ValueError, match="landmark.retrieval: 'best'"):
        landmark_attention(q, k, v, retrieval="best")
    with pytest.raises(ValueError, match="landmark.implementation: 'fast'"):
        landmark_attention(q, k, v, implementation="fast")
    with pytest.raises(NotImplementedError, match="general is_landmark"):
        landmark_attention(q, k, v, is_landmark=jnp.zeros((T,), bool), implementation="chunked")
    with pytest.raises(ValueError, match="landmark.is_landmark: expected shape"):
        landmark_attention(q, k, v, is_landmark=jnp.zeros((T + 1,), bool))
    with pytest.raises(ValueError, match="landmark_retrieve.top_k"):
        landmark_retrieve(q, k[:, :3], 4)


def test_lm_data_layout_matches_the_attention_layout():
    window = np.arange(10, 20, dtype=np.uint8)  # 9 inputs + 1 target
    tokens, labels = language_model_example(window, block_size=BLOCK, landmark_id=256)
    is_lm = tokens == 256
    np.testing.assert_array_equal(is_lm, landmark_mask(len(tokens), BLOCK))
    np.testing.assert_array_equal(is_lm, np.asarray(regular_landmarks(len(tokens), BLOCK)))
    np.testing.assert_array_equal(tokens[~is_lm], window[:-1])
    np.testing.assert_array_equal(labels[~is_lm], window[1:])  # the token before a landmark predicts the next byte
    assert np.all(labels[is_lm] == -1) and tokens.dtype == np.uint16
    np.testing.assert_array_equal(remove_landmarks(tokens, BLOCK), window[:-1])
    # A model length of 11 slots holds num_ordinary(11) = 8 tokens; the trailing landmark of 8 tokens is cut.
    assert num_ordinary(11, BLOCK) == 8 and num_ordinary(12, BLOCK) == 8
    cut, _ = insert_landmarks(window[:8], block_size=BLOCK, landmark_id=256, length=T)
    assert cut.shape == (T,) and cut[-1] == 17 and np.sum(cut == 256) == 3
    traced = jax.jit(lambda w: language_model_example(w, block_size=BLOCK, landmark_id=256))(jnp.asarray(window))
    np.testing.assert_array_equal(traced[0], tokens)  # inside a jitted loss, the same layout
    np.testing.assert_array_equal(traced[1], labels)
    with pytest.raises(ValueError, match="insert_landmarks.length"):
        insert_landmarks(window, block_size=BLOCK, landmark_id=256, length=100)

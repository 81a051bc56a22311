"""SeerAttention (attnx.ops.seer; spec llm_mechanisms.md §2 (e)): the ground truth against a brute-force max-pool,
the gate against a direct per-head loop, the mask rules (tau = 0, nz_ratio density, dense rows), the KL loss, the
block-sparse attention against dense and reference (forward and gradients), and an oracle gate whose error falls
with density."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.seer.attention import seer_attention
from attnx.ops.seer.gate import (seer_block_mask, seer_gate_logits, seer_gate_loss,
                                 seer_gate_probabilities)
from attnx.ops.seer.ground_truth import block_maxpool_gt, block_maxpool_gt_chunked
from attnx.testing.tolerances import assert_close

B, T, N, K, H = 2, 19, 4, 2, 8  # T = 19 with blocks of 4: a partial last block
BLOCK = 4
NB = -(-T // BLOCK)


def normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


Q, KEY, VALUE = normal(0, (B, T, N, H), 1.5), normal(1, (B, T, K, H), 1.5), normal(2, (B, T, K, H))


def brute_force_gt(q, k, block, causal):
    """Dense probabilities in numpy, then the max over every (row block, column block) tile by explicit slices."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    Tq, S, G = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, G, axis=2)) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones((Tq, S), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    nT, nS = -(-Tq // block), -(-S // block)
    out = np.zeros(q.shape[:1] + (q.shape[2], nT, nS))
    for i in range(nT):
        for j in range(nS):
            out[:, :, i, j] = probs[:, :, i * block:(i + 1) * block, j * block:(j + 1) * block].max(axis=(-2, -1))
    return out / out.sum(-1, keepdims=True)


@pytest.mark.parametrize("causal", [True, False])
def test_ground_truth_reference_and_chunked_equal_brute_force(causal):
    want = brute_force_gt(Q, KEY, BLOCK, causal)
    k_cross = normal(3, (B, 10, K, H))  # cross lengths (non-causal): the key grid has its own partial block

    @jax.jit
    def both(q, k, k_cross):
        cross = block_maxpool_gt_chunked(q, k_cross, block=BLOCK, causal=False) if not causal else None
        return (block_maxpool_gt(q, k, block=BLOCK, causal=causal),
                block_maxpool_gt_chunked(q, k, block=BLOCK, causal=causal), cross)

    reference, chunked, cross = both(Q, KEY, k_cross)
    for name, got in (("reference", reference), ("chunked", chunked)):
        assert got.shape == (B, N, NB, NB)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5, err_msg=name)
    if causal:  # nothing above the block diagonal
        assert float(jnp.max(jnp.triu(chunked, 1))) == 0.0
    else:
        np.testing.assert_allclose(cross, brute_force_gt(Q, k_cross, BLOCK, False), atol=2e-6, rtol=1e-5)


def numpy_rope(x, positions, theta):
    d = x.shape[-1]
    freq = theta ** (-np.arange(0, d, 2) / d)
    angle = positions[:, None] * freq  # [n, d/2]
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def loop_gate_logits(q, k, wq, wk, block, q_pools, k_pools, theta):
    """The gate written head by head and block by block, in numpy (pooling by slices)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    ops = {"max": lambda a: a.max(1), "min": lambda a: a.min(1), "avg": lambda a: a.mean(1)}
    nb = -(-q.shape[1] // block)
    pool = lambda x, names: np.stack([np.concatenate([ops[p](x[:, i * block:(i + 1) * block]) for p in names], -1)
                                      for i in range(nb)], 1)  # [B, nb, heads, H * pools]
    qp, kp = pool(q, q_pools), pool(k, k_pools)
    Nq, Kk = q.shape[2], k.shape[2]
    if wq is None:
        qg, kp = qp, np.repeat(kp, Nq // Kk, axis=2)
    else:
        qg = np.stack([qp[:, :, n] @ np.asarray(wq[n]) for n in range(Nq)], 2)
    kg = np.stack([kp[:, :, h] @ np.asarray(wk[h]) for h in range(kp.shape[2])], 2)
    pos = np.arange(nb) * block
    qg, kg = numpy_rope(qg, pos, theta), numpy_rope(kg, pos, theta)
    kg = np.repeat(kg, Nq // kg.shape[2], axis=2)
    logits = np.einsum("bind,bjnd->bnij", qg, kg) / np.sqrt(kg.shape[-1])
    return np.where(np.tril(np.ones((nb, nb), bool)), logits, -1e9)


def test_gate_logits_equal_a_per_head_loop():
    pools = (("avg",), ("max", "min", "avg"))
    wq, wk, wk_n = normal(4, (N, H, 6)), normal(5, (K, 3 * H, 6)), normal(6, (N, 2 * H, H))

    @jax.jit
    def gates(q, k, wq, wk, wk_n):
        # With no query linear (one query pool, gate width == H) the key linear has N heads over repeated keys.
        return (seer_gate_logits(q, k, wq, wk, block=BLOCK, q_pools=pools[0], k_pools=pools[1], rope_theta=100.0),
                seer_gate_logits(q, k, None, wk_n, block=BLOCK, q_pools=("max",), k_pools=("min", "max"),
                                 rope_theta=100.0))

    with_linear, without = gates(Q, KEY, wq, wk, wk_n)
    np.testing.assert_allclose(with_linear, loop_gate_logits(Q, KEY, wq, wk, BLOCK, *pools, 100.0), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(without, loop_gate_logits(Q, KEY, None, wk_n, BLOCK, ("max",), ("min", "max"), 100.0),
                               rtol=1e-5, atol=1e-4)


def test_tau_zero_keeps_the_full_lower_triangle_and_nz_ratio_density_is_r():
    nb, ratios = 64, (0.1, 0.3, 0.5, 0.9)

    @jax.jit
    def masks(small, large):
        tau0 = seer_block_mask(seer_gate_probabilities(small), threshold=0.0, dense_last=0)
        prob = seer_gate_probabilities(large)
        return (tau0, [seer_block_mask(prob, nz_ratio=r, dense_last=0) for r in ratios],
                seer_block_mask(prob, threshold=2.0, dense_last=2))

    tau0, by_ratio, last_rows = masks(jnp.where(jnp.tril(jnp.ones((NB, NB), bool)), normal(7, (B, N, NB, NB), 3.), -1e9),
                                      jnp.where(jnp.tril(jnp.ones((nb, nb), bool)), normal(8, (2, nb, nb)), -1e9))
    np.testing.assert_array_equal(tau0, np.broadcast_to(np.tril(np.ones((NB, NB), bool)), tau0.shape))
    # Top-k rows with k = (1 - sqrt(1 - r)) nb keep about a fraction r of the causal triangle (nb = 64 here).
    triangle = nb * (nb + 1) / 2
    for r, mask in zip(ratios, by_ratio):
        assert abs(float(jnp.sum(mask[0])) / triangle - r) < 0.03, r
        assert bool(jnp.all(jnp.sum(mask, -1) >= 1))
    # dense_last makes the last rows dense (then causal), and a huge threshold keeps only them.
    np.testing.assert_array_equal(last_rows[0, -2:], np.tril(np.ones((nb, nb), bool))[-2:])
    assert not bool(jnp.any(last_rows[:, :-2]))


def test_kl_loss_is_torch_mean_on_the_last_three_quarters_of_rows():
    gt = np.asarray(brute_force_gt(Q, KEY, BLOCK, True), np.float32)
    logits = np.where(np.tril(np.ones((NB, NB), bool)), np.asarray(normal(9, (B, N, NB, NB))), -1e9)
    start = NB // 4
    p = logits[..., start:, :] - np.log(np.sum(np.exp(logits[..., start:, :]), -1, keepdims=True))
    g = gt[..., start:, :]
    want = np.where(g > 0, g * (np.log(np.where(g > 0, g, 1.0)) - p), 0.0).mean()
    perfect = np.where(gt > 0, np.log(np.where(gt > 0, gt, 1.0)), -1e9)  # softmax(perfect) == gt
    loss, perfect_loss, grad = jax.jit(lambda l, p, g: (seer_gate_loss(l, g), seer_gate_loss(p, g),
                                                        jax.grad(seer_gate_loss)(l, g)))(logits, perfect, gt)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert abs(float(perfect_loss)) < 1e-6
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad[..., :start, :]))) == 0.0


CHUNKED = attnx.Chunked(4, 4)


@pytest.mark.parametrize("causal", [True, False])
def test_all_true_mask_and_no_gate_give_dense_attention(causal):
    cases = ({"block_mask": jnp.ones((NB, NB), bool)}, {}, {"gate_logits": normal(10, (B, N, NB, NB)), "threshold": 0.})

    @jax.jit
    def outputs(q, k, v):
        dense = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=causal), implementation="reference")
        return dense, [seer_attention(q, k, v, causal=causal, block=BLOCK, implementation=implementation, **kwargs)
                       for implementation in ("reference", CHUNKED) for kwargs in cases]

    dense, outs = outputs(Q, KEY, VALUE)
    for out, name in zip(outs, [f"{i} {sorted(c)}" for i in ("reference", "chunked") for c in cases]):
        assert_close(out, dense, jnp.float32, what=name)


def test_gated_block_sparse_equals_the_expanded_mask_with_gradients():
    gate_logits = normal(11, (B, N, NB, NB), 3.0)
    kwargs = dict(causal=True, block=BLOCK, gate_logits=gate_logits, nz_ratio=0.3, dense_last=1)
    bm = seer_block_mask(seer_gate_probabilities(jnp.where(jnp.tril(jnp.ones((NB, NB), bool)), gate_logits, -1e9)),
                         nz_ratio=0.3, dense_last=1)
    assert 0.2 < float(jnp.mean(bm)) < 0.6  # genuinely sparse
    dense_mask = jnp.repeat(jnp.repeat(bm, BLOCK, 2), BLOCK, 3)[:, :, :T, :T] & jnp.tril(jnp.ones((T, T), bool))
    want = attnx.dot_product_attention(Q, KEY, VALUE, mask=attnx.Mask(dense=dense_mask), implementation="reference")
    spec = attnx.get_attention("seer")

    def loss(fn, **extra):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, **kwargs, **extra)))

    @jax.jit
    def run(q, k, v):
        return (spec.fn(q, k, v, implementation=CHUNKED, **kwargs), spec.reference(q, k, v, **kwargs),
                jax.grad(loss(spec.fn, implementation=CHUNKED), (0, 1, 2))(q, k, v),
                jax.grad(loss(spec.reference), (0, 1, 2))(q, k, v))

    chunked, reference, got, ref = run(Q, KEY, VALUE)
    assert_close(chunked, want, jnp.float32, what="chunked")
    assert_close(reference, want, jnp.float32, what="reference")
    for name, g, w in zip(("query", "key", "value"), got, ref):
        assert_close(g, w, jnp.float32, "gradient", what=name)


def test_oracle_gate_error_falls_monotonically_with_density():
    T2, block = 64, 4
    q, k, v = normal(12, (2, T2, N, H), 2.0), normal(13, (2, T2, K, H), 2.0), normal(14, (2, T2, K, H))

    @jax.jit
    def errors_by_density(q, k, v):
        dense = seer_attention(q, k, v, causal=True, block=block, implementation="reference")
        oracle = block_maxpool_gt(q, k, block=block)
        errors = []
        for r in (0.15, 0.3, 0.5, 0.7, 0.9, 1.0):  # 1, 2, 4, 7, 10, 16 of 16 blocks per row
            mask = seer_block_mask(oracle, nz_ratio=r, dense_last=0)
            out = seer_attention(q, k, v, causal=True, block=block, block_mask=mask, implementation="reference")
            errors.append(jnp.mean(jnp.abs(out - dense)))
        return jnp.stack(errors)

    errors = [float(e) for e in errors_by_density(q, k, v)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6 and errors[0] > 10 * max(errors[-2], 1e-6), errors


def test_decode_is_dense_over_the_cache_and_equals_the_last_rows():
    spec = attnx.get_attention("seer")
    full, step = jax.jit(lambda q, k, v, g: (
        spec.fn(q, k, v, causal=True, block=BLOCK, gate_logits=g, nz_ratio=0.2),
        spec.decode(q[:, -2:], k, v, query_positions=jnp.arange(T - 2, T), block=BLOCK)))(
            Q, KEY, VALUE, normal(15, (B, N, NB, NB)))
    assert_close(step, full[:, -2:], jnp.float32)  # the last query-block rows are dense (dense_last=2)


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="self attention only"):
        seer_attention(Q, KEY[:, :7], VALUE[:, :7], block=BLOCK)
    with pytest.raises(ValueError, match="not both"):
        seer_attention(Q, KEY, VALUE, block=BLOCK, gate_logits=jnp.zeros((NB, NB)), block_mask=jnp.ones((NB, NB), bool))
    with pytest.raises(ValueError, match=r"seer.gate_logits: expected \[..., 5, 5\]"):
        seer_attention(Q, KEY, VALUE, block=BLOCK, gate_logits=jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match="exactly one of threshold or nz_ratio"):
        seer_attention(Q, KEY, VALUE, block=BLOCK, gate_logits=jnp.zeros((NB, NB)), threshold=0.1, nz_ratio=0.5)
    with pytest.raises(ValueError, match=r"seer.nz_ratio: expected a fraction .* got 1.5"):
        seer_block_mask(jnp.ones((3, 3)), nz_ratio=1.5)
    with pytest.raises(ValueError, match="seer.k_pools: .*'mean'"):
        seer_attention(Q, KEY, VALUE, block=BLOCK, k_pools=("mean",))
    with pytest.raises(ValueError, match=r"seer.block: expected an int >= 1 .*got 0"):
        block_maxpool_gt(Q, KEY, block=0)
    with pytest.raises(ValueError, match=r"k_weight must be \[2, 24, dg\]"):
        seer_gate_logits(Q, KEY, normal(4, (N, H, 6)), normal(5, (K, H, 6)), block=BLOCK)

"""The shared conformance suite: every softmax-attention implementation against the reference.

A backend's test file is a few lines::

    class TestChunked(AttentionConformance):
        implementation = attnx.Chunked(block_q=4, block_kv=3)

Each case checks, in one compiled function per (case, implementation): the output, the log-sum-exp, gradients
with respect to query/key/value/bias/sinks, and a forward-mode `jax.jvp`, all against the float32 reference with
the tolerance table of `attnx.testing.tolerances`. Cases cover the four CAB patterns, MHA/GQA/MQA, odd lengths
with ragged blocks, every mask kind, bias broadcasting, soft cap, sinks, score_mod/mask_mod, fully masked rows,
extra batch dims and reduced precision. Features an implementation declares unsupported must raise
`NotImplementedError` (never run silently wrong).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.mask import Mask
from attnx.testing.inputs import Case, make_inputs, random_bool, segment_ids
from attnx.testing.tolerances import assert_close


def _alibi(s, b, n, t, j):
    # Per-head slopes as in ALiBi (Press et al., 2022); a closed-over constant.
    slopes = 2.0 ** (-(jnp.arange(8, dtype=jnp.float32) + 1.0))
    return s - jnp.take(slopes, n) * jnp.abs(t - j).astype(jnp.float32)


def _stripes(b, n, t, j):
    return ((t + 2 * j + n) % 3 != 0) | (t == j)


CASES = [
    Case("NS", T=7, S=7),
    Case("CS", T=7, S=7, mask=lambda c: Mask(causal=True)),
    Case("NC", T=5, S=7),
    Case("CC", T=5, S=7, mask=lambda c: Mask(causal=True)),
    Case("MQA", T=6, S=6, K=1, mask=lambda c: Mask(causal=True)),
    Case("MHA", K=4),
    Case("value_dim", V=6, features=frozenset({"value_dim"})),
    Case("odd_lengths", T=13, S=11, bias=("B", "N", "T", "S"), mask=lambda c: Mask(causal=True)),
    Case("window", T=13, S=13, mask=lambda c: Mask(window=(2, 1))),
    Case("window_causal", T=13, S=13, mask=lambda c: Mask(window=(3, 0), causal=True)),
    Case("q_offset", T=5, S=11, mask=lambda c: Mask(causal=True, q_offset=6), features=frozenset({"q_offset"})),
    Case("segment_ids", T=11, S=11, mask=lambda c: Mask(
        causal=True, q_segment_ids=segment_ids(c.batch, c.T), kv_segment_ids=segment_ids(c.batch, c.S))),
    Case("lengths", T=9, S=10, mask=lambda c: Mask(kv_lengths=jnp.array([10, 3]), q_lengths=jnp.array([6, 9]))),
    Case("block_mask", T=9, S=10, mask=lambda c: Mask(
        block_mask=random_bool((2, 4, 5, 4), 0.5).at[0, 0, 1].set(False), block_size=(2, 3))),
    Case("dense", T=9, S=10, mask=lambda c: Mask(dense=random_bool((2, 1, 9, 10), 0.5).at[1, 0, 4].set(False))),
    Case("fully_masked_rows", T=6, S=6, mask=lambda c: Mask(kv_lengths=jnp.array([0, 6]))),
    Case("bias_broadcast", bias=(1, "N", 1, "S")),
    Case("bias_batch", T=9, S=10, bias=("B", 1, "T", "S"), mask=lambda c: Mask(causal=True)),
    Case("soft_cap", T=9, S=10, bias=("B", "N", "T", "S"), soft_cap=1.5, features=frozenset({"soft_cap"})),
    Case("sinks", T=9, S=9, sinks=True, mask=lambda c: Mask(causal=True), features=frozenset({"sinks"})),
    Case("sinks_masked_rows", T=6, S=6, sinks=True, mask=lambda c: Mask(kv_lengths=jnp.array([0, 4])),
         features=frozenset({"sinks"})),
    Case("score_mod", T=9, S=10, N=8, K=2, score_mod=_alibi, features=frozenset({"score_mod"})),
    Case("mask_mod", T=9, S=10, mask_mod=_stripes, mask=lambda c: Mask(causal=True)),
    Case("batch_dims", batch=(2, 3), T=6, S=5, bias=("B", "N", "T", "S"), mask=lambda c: Mask(causal=True)),
    Case("no_batch", batch=(), T=6, S=5, mask=lambda c: Mask(causal=True)),
    Case("bf16", dtype="bfloat16", T=9, S=9, mask=lambda c: Mask(causal=True)),
    Case("f16", dtype="float16", T=7, S=9, K=1, mask=lambda c: Mask(causal=True), features=frozenset({"f16"})),
    Case("neg_inf_bias", T=6, S=7, bias=("B", "N", "T", "S"), features=frozenset({"neg_inf_bias"})),
    Case("window_offset", T=5, S=11, mask=lambda c: Mask(window=(2, 3), q_offset=3),
         features=frozenset({"q_offset"})),
    Case("negative_offset", T=7, S=7, mask=lambda c: Mask(causal=True, q_offset=-2),
         features=frozenset({"q_offset"})),
    Case("dense_per_head", T=9, S=10, mask=lambda c: Mask(dense=random_bool((1, 4, 9, 10), 0.6, seed=5))),
    Case("bf16_bias", dtype="bfloat16", T=9, S=10, bias=("B", "N", "T", "S")),
]
CASE_IDS = [c.name for c in CASES]
LSE_CASES = ("CC", "odd_lengths", "fully_masked_rows", "segment_ids", "sinks_masked_rows", "score_mod", "bf16")


def _call(case: Case, implementation, inputs: dict, with_lse: bool = True):
    mask = case.mask(case) if case.mask is not None else None
    fn = attnx.dot_product_attention_with_lse if with_lse else attnx.dot_product_attention
    return fn(inputs["query"], inputs["key"], inputs["value"], inputs.get("bias"), mask,
              logits_soft_cap=case.soft_cap, sinks=inputs.get("sinks"), score_mod=case.score_mod,
              mask_mod=case.mask_mod, implementation=implementation)


def _everything(case: Case, implementation, inputs: dict, with_lse: bool, with_jvp: bool = True):
    """Output (and lse), gradients of a scalar loss of them, and the forward-mode tangent (None without
    `with_jvp`), in one function so each case compiles once per implementation."""
    names = [n for n in ("query", "key", "value", "bias", "sinks") if n in inputs]
    weights = jax.random.normal(jax.random.PRNGKey(7), inputs["query"].shape[:-1] + (case.V,), jnp.float32)

    def fwd(*diff):
        res = _call(case, implementation, dict(inputs, **dict(zip(names, diff))), with_lse)
        return res if with_lse else (res, None)

    def loss(*diff):
        out, lse = fwd(*diff)
        total = jnp.sum(out.astype(jnp.float32) * weights)
        if with_lse:
            total = total + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        return total

    primals = tuple(inputs[n] for n in names)
    out, lse = fwd(*primals)
    grads = jax.grad(loss, argnums=tuple(range(len(names))))(*primals)
    if not with_jvp:
        return out, lse, dict(zip(names, grads)), (None, None)
    # Tangents are zero where a primal is infinite (a -inf bias entry is a mask, not a value to perturb).
    tangents = tuple(jnp.where(jnp.isfinite(p), jnp.cos(p.astype(jnp.float32) * 1.7), 0).astype(p.dtype)
                     for p in primals)
    _, (t_out, t_lse) = jax.jvp(fwd, primals, tangents)
    return out, lse, dict(zip(names, grads)), (t_out, t_lse)


@functools.lru_cache(maxsize=None)
def reference_results(case_name: str, with_lse: bool = False):
    """Reference results for a case, computed once per test session, in float32 on upcast inputs."""
    case = next(c for c in CASES if c.name == case_name)
    inputs = make_inputs(case)
    f32 = {k: v.astype(jnp.float32) for k, v in inputs.items()}
    f32_case = Case(**{**case.__dict__, "dtype": "float32"})
    return jax.jit(lambda inp: _everything(f32_case, "reference", inp, with_lse))(f32)


class AttentionConformance:
    """Subclass and set `implementation`; list features it does not support in `unsupported`.

    unsupported may also name "lse" (no differentiable log-sum-exp) and "jvp": forward-mode differentiation is not
    available (a `custom_vjp` kernel, which `jax.jvp` cannot enter); the tangent checks are then left out rather
    than expected to raise, since the failure is JAX's own TypeError, not the implementation's refusal.
    default_cases: names of the cases that run in the default suite (None: all); the others are marked `slow` by
    tests/conftest.py, for backends that are slow to compile on CPU (Pallas kernels in interpret mode).
    """

    implementation = None
    unsupported: frozenset = frozenset()
    default_cases: frozenset | None = None

    def _expect_not_implemented(self, case: Case) -> bool:
        return bool(case.features & self.unsupported)

    def _check(self, case: Case, with_lse: bool):
        inputs = make_inputs(case)
        with_jvp = "jvp" not in self.unsupported
        run = jax.jit(lambda inp: _everything(case, self.implementation, inp, with_lse, with_jvp))
        if self._expect_not_implemented(case) or (with_lse and "lse" in self.unsupported):
            with pytest.raises(NotImplementedError):
                run(inputs)
            return
        out, lse, grads, (t_out, t_lse) = run(inputs)
        r_out, r_lse, r_grads, (rt_out, rt_lse) = reference_results(case.name, with_lse)
        dt = case.dtype
        assert out.dtype == inputs["query"].dtype and out.shape == r_out.shape
        assert_close(out, r_out, dt, "forward", f"{case.name}: output")
        for name, g in grads.items():
            assert g.shape == inputs[name].shape, f"{case.name}: grad {name} shape"
            assert_close(g, r_grads[name], dt, "gradient", f"{case.name}: d/d{name}")
        if with_jvp:
            assert_close(t_out, rt_out, dt, "gradient", f"{case.name}: jvp of output")
        if with_lse:
            finite = np.isfinite(np.asarray(r_lse))
            np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite, err_msg=f"{case.name}: lse -inf")
            assert_close(jnp.where(finite, lse, 0), jnp.where(finite, r_lse, 0), dt, "forward", f"{case.name}: lse")
            if with_jvp:
                assert_close(jnp.where(finite, t_lse, 0), jnp.where(finite, rt_lse, 0), dt, "gradient",
                             f"{case.name}: jvp of lse")

    @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
    def test_matches_reference(self, case: Case):
        self._check(case, with_lse=False)

    @pytest.mark.parametrize("case", [c for c in CASES if c.name in LSE_CASES], ids=lambda c: c.name)
    def test_with_lse_matches_reference(self, case: Case):
        """`dot_product_attention_with_lse`: lse values, and gradients/tangents flowing through lse."""
        self._check(case, with_lse=True)

    def test_fully_masked_rows_are_zero(self):
        case = next(c for c in CASES if c.name == "fully_masked_rows")
        out = jax.jit(lambda inp: _call(case, self.implementation, inp, False))(make_inputs(case))
        assert np.all(np.asarray(out[0]) == 0), "batch element with kv_lengths=0 must return exactly 0"
        assert np.all(np.isfinite(np.asarray(out[1])))

    def test_vmap_matches_batch(self):
        case = next(c for c in CASES if c.name == "odd_lengths")
        inputs = make_inputs(case)
        f = lambda q, k, v, b: _call(case, self.implementation, dict(query=q, key=k, value=v, bias=b), False)
        batched = jax.jit(f)(inputs["query"], inputs["key"], inputs["value"], inputs["bias"])
        mapped = jax.jit(jax.vmap(f))(inputs["query"][:, None], inputs["key"][:, None], inputs["value"][:, None],
                                      inputs["bias"][:, None])
        assert_close(mapped[:, 0], batched, case.dtype, "forward", "vmap")

    def test_deterministic_and_jit_equals_eager(self):
        case = next(c for c in CASES if c.name == "segment_ids")
        inputs = make_inputs(case)
        f = jax.jit(lambda inp: _everything(case, self.implementation, inp, False, "jvp" not in self.unsupported))
        a, b = f(inputs), f(inputs)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        eager = _call(case, self.implementation, inputs, False)
        assert_close(eager, a[0], case.dtype, "forward", "eager vs jit")

    @pytest.mark.parametrize("pattern", ["CS", "CC"])
    def test_causal_prefix_property(self, pattern):
        """CAB (Zhang et al., 2023): for a causal pattern, output i on the full query sequence equals output i
        computed on the query prefix [0, i] (CS: keys/values are the same prefix; CC: keys/values fixed)."""
        rng = np.random.default_rng(3)
        T, S = (5, 5) if pattern == "CS" else (4, 7)
        x = jnp.asarray(rng.standard_normal((2, max(T, S), 4, 8)), jnp.float32)
        q, kv = x[:, :T], x[:, :S]
        attend = jax.jit(lambda q, kv: attnx.dot_product_attention(q, kv, kv, mask=Mask(causal=True),
                                                                   implementation=self.implementation))
        full = attend(q, kv)
        for i in range(T):
            part = attend(q[:, : i + 1], kv[:, : i + 1] if pattern == "CS" else kv)
            np.testing.assert_allclose(np.asarray(part[:, i]), np.asarray(full[:, i]), atol=1e-5, rtol=1e-5)

"""Forward *and* reverse mode for a kernel with a hand-written backward.

A `jax.custom_vjp` kernel cannot be entered by `jax.jvp` (ARCHITECTURE §4). `differentiable` builds the kernel as a
`jax.custom_jvp` instead, whose tangent is a `jax.custom_derivatives.linear_call`:

- forward mode (`jax.jvp`, `jax.linearize`, `jax.jacfwd`) runs `tangent(static, diff, rest, out, t_diff)`: the
  kernel's own tangent computation (a tangent kernel, or the forward kernel applied to tangents where the map is
  multilinear);
- reverse mode (`jax.grad`, `jax.vjp`) transposes that linear call, and the transpose IS
  `backward(static, diff, rest, out, cotangents)`: the same backward kernels a custom_vjp would run, with the same
  residuals (inputs and outputs), so reverse mode costs what it did; the tangent function is never run there.

Second-order derivatives through the kernel (the backward of the backward) are not available.

JAX ships no batching rule for `linear_call`, so `jax.vmap` over a differentiated kernel would fail; one is
registered here (`_batch_linear_call`): operands are batched at axis 0, the callee and, lazily, its transpose are
batched with `batching.batch_jaxpr`. It uses JAX internals (`jax._src.interpreters.batching`); when they are absent
or changed, registration is skipped and vmap of a derivative raises JAX's own NotImplementedError.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, linear_call

__all__ = ["differentiable"]


def differentiable(forward: Callable, tangent: Callable, backward: Callable,
                   reverse_only: Callable[[object], bool] = lambda static: False,
                   forward_with_residuals: Callable | None = None):
    """f(static, diff, rest) = forward(static, diff, rest), differentiable in `diff` in both modes.

    static: hashable (a nondiff argument); diff: a dict of float arrays; rest: a pytree of arrays that are not
    differentiated (integer tables, lengths). Only the perturbed inputs take part (symbolic zeros):
    tangent(static, diff, rest, out, t) -> the tangent of `out`, linear in t, a dict holding the tangents of the
    perturbed entries of diff only (absent = zero); backward(static, diff, rest, out, ct) -> the cotangents of the
    entries named in `ct[1]` (a tuple of names, the perturbed ones), linear in ct[0], a pytree like out (zeros where
    an output is unused). So a backward can skip what nobody differentiates (a constant bias or decay rate).
    reverse_only(static): True selects a plain `jax.custom_vjp` around the same forward and backward for that call
    (no `jax.jvp`): for kernels whose body carries effects (e.g. the io callbacks of Pallas' TPU emulation on CPU),
    which `linear_call` cannot carry through lowering.
    forward_with_residuals(static, diff, rest) -> (out, extra): when derivatives are taken, the forward that also
    saves what tangent/backward need beyond the output (per-stream statistics); they then receive (out, extra) in
    place of `out`. Without derivatives `forward` runs, and writes no residuals.
    """
    def saved_forward(static, diff, rest):
        if forward_with_residuals is None:
            out = forward(static, diff, rest)
            return out, out
        out, extra = forward_with_residuals(static, diff, rest)
        return out, (out, extra)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def f(static, diff, rest):
        return forward(static, diff, rest)

    @functools.partial(f.defjvp, symbolic_zeros=True)
    def f_jvp(static, primals, tangents):
        diff, rest = primals
        out, saved = saved_forward(static, diff, rest)
        live = {n: t for n, t in tangents[0].items() if not isinstance(t, SymbolicZero)}
        if not live:
            return out, jax.tree.map(jnp.zeros_like, out)
        names = tuple(live)
        t_out = linear_call(lambda res, t: tangent(static, *res, t),
                            lambda res, ct: backward(static, *res, (ct, names)),
                            (diff, rest, saved), live)
        return out, t_out

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def f_vjp(static, diff, rest):
        return forward(static, diff, rest)

    def f_vjp_fwd(static, diff, rest):
        out, saved = saved_forward(static, diff, rest)
        return out, (diff, rest, saved)

    def f_vjp_bwd(static, res, ct):
        diff, rest, saved = res
        return backward(static, diff, rest, saved, (ct, tuple(diff))), jax.tree.map(lambda _: None, rest)

    f_vjp.defvjp(f_vjp_fwd, f_vjp_bwd)

    def call(static, diff, rest):
        return (f_vjp if reverse_only(static) else f)(static, diff, rest)

    return call


def _register_linear_call_batching() -> bool:
    try:
        from jax._src import custom_derivatives as cd
        from jax._src.interpreters import batching
        prim = cd.linear_call_p
        if prim in batching.fancy_primitive_batchers:
            return True  # a JAX that ships its own rule
        batch_jaxpr, at_front = batching.batch_jaxpr, batching.bdim_at_front
    except (ImportError, AttributeError):
        return False

    def _batch_linear_call(axis_data, args, dims, *, callee, transpose_thunk, num_callee_consts, num_res):
        # Residuals (and constants) keep their batching; the linear operands are all batched at 0, so that the
        # transpose's outputs (instantiated at 0) match them whichever of them vmap actually mapped.
        fixed = num_callee_consts + num_res
        operands, batched = [], []
        for i, (x, d) in enumerate(zip(args, dims)):
            if d is None and i < fixed:
                operands.append(x)
                batched.append(False)
            else:
                operands.append(at_front(x, d, axis_data.size))
                batched.append(True)
        callee_b, _ = batch_jaxpr(callee, axis_data, batched, instantiate=True)
        res_batched = batched[num_callee_consts:fixed]

        def batched_transpose():
            t_jaxpr, t_consts = transpose_thunk()
            n_cts = len(t_jaxpr.in_avals) - len(t_consts) - num_res
            t_b, _ = batch_jaxpr(t_jaxpr, axis_data, [False] * len(t_consts) + res_batched + [True] * n_cts,
                                 instantiate=True)
            return t_b, t_consts

        outs = prim.bind(*operands, callee=callee_b, transpose_thunk=batched_transpose,
                         num_callee_consts=num_callee_consts, num_res=num_res)
        return outs, [0] * len(outs)

    batching.fancy_primitive_batchers[prim] = _batch_linear_call
    return True


LINEAR_CALL_BATCHING = _register_linear_call_batching()

"""The public attention entry points: `dot_product_attention`, `dot_product_attention_with_lse`, `explain`.

Contract (ARCHITECTURE §4): layout [*B, T, N, H] for queries and [*B, S, K, H] / [*B, S, K, V] for keys/values,
GQA/MQA when K < N with N % K == 0 (keys and values are never repeated), self and cross attention (T != S), a
value head dim that may differ. Arguments are validated once, here (`attnx.validation`); implementations receive
canonical arrays.

`implementation` selects how it runs:
    None                 the best available for the backend and shapes (see `_auto_order`); works on CPU.
    "reference"          materialised logits, float32 softmax at the highest precision: the oracle.
    "chunked"            flash attention in plain JAX with O(T·block) memory in forward and backward.
    "xla", "cudnn"       `jax.nn.dot_product_attention` with that implementation, where its features allow.
    a config object      e.g. `attnx.Chunked(block_q=256, block_kv=512)`.
    a list of the above  tried in order; only `NotImplementedError` falls through to the next one.
A single named implementation never falls back silently: it runs or raises `NotImplementedError` saying why.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from attnx.mask import Mask
from attnx.ops.softmax import pallas_gpu as pallas_gpu_impl
from attnx.ops.softmax import pallas_tpu as pallas_tpu_impl
from attnx.ops.softmax import xla as xla_impl
from attnx.ops.softmax.chunked import chunked_attention
from attnx.ops.softmax.config import IMPLEMENTATIONS, Chunked, Cudnn, Reference, Xla
from attnx.ops.softmax.reference import reference_attention
from attnx.validation import AttentionArgs, canonicalize

__all__ = ["dot_product_attention", "dot_product_attention_with_lse", "explain", "Explanation",
           "implementation_names"]


def _no_check(args: AttentionArgs, return_lse: bool, cfg) -> None:
    return None


# name -> (check(args, return_lse, cfg) raising NotImplementedError, run(args, cfg, return_lse)). The check sees
# the config, so that `explain` knows e.g. that a Pallas kernel neither on its device nor interpreted cannot run.
_BACKENDS: dict[str, tuple[Callable, Callable]] = {
    "reference": (_no_check, lambda args, cfg, lse: reference_attention(args, return_lse=lse)),
    "chunked": (_no_check, lambda args, cfg, lse: chunked_attention(args, cfg, return_lse=lse)),
    "xla": (lambda args, lse, cfg: xla_impl.check_xla(args, lse), xla_impl.run_xla),
    "cudnn": (lambda args, lse, cfg: xla_impl.check_cudnn(args, lse), xla_impl.run_cudnn),
    "pallas_gpu": (lambda args, lse, cfg: pallas_gpu_impl.check(args, lse, cfg),
                   lambda args, cfg, lse: pallas_gpu_impl.run(args, cfg, return_lse=lse)),
    "pallas_tpu": (lambda args, lse, cfg: pallas_tpu_impl.check(args, lse, cfg),
                   lambda args, cfg, lse: pallas_tpu_impl.run(args, cfg, return_lse=lse)),
}

# Below this many logits per (batch, head) the chunked path is a single key block, so materialising is as fast on
# CPU (bench/attention.py at T=512: within noise of each other) and the reference compiles faster and handles
# every feature (sinks, score_mod, a -inf bias, a differentiable lse).
_SMALL_LOGITS = 256 * 256


def implementation_names() -> tuple[str, ...]:
    """Names of the implementations that exist ("pallas_gpu" / "pallas_tpu" run on their devices, or anywhere in
    interpret mode)."""
    return tuple(name for name, (_, run) in _BACKENDS.items() if run is not None)


def _auto_order(args: AttentionArgs) -> list:
    info = args.shape_info
    small = info["T"] * info["S"] <= _SMALL_LOGITS
    backend = jax.default_backend()
    if backend == "gpu":
        order = [Cudnn()] + ([Xla()] if info["T"] * info["S"] <= 4096 * 4096 else []) + [Chunked()]
    elif small:
        order = [Reference()]
    else:
        order = [Chunked()]
    return order


def _resolve(implementation: Any, args: AttentionArgs) -> tuple[list, bool]:
    """The implementations to try, and whether the user named exactly one (no fallback)."""
    def one(item):
        if isinstance(item, str):
            if item not in IMPLEMENTATIONS:
                raise ValueError(f"implementation: unknown name {item!r}; known: {sorted(IMPLEMENTATIONS)} "
                                 "(or a config object such as attnx.Chunked(...), or a list of these)")
            return IMPLEMENTATIONS[item]()
        if isinstance(item, tuple(IMPLEMENTATIONS.values())):
            return item
        raise TypeError(f"implementation: expected None, a name in {sorted(IMPLEMENTATIONS)}, a config object "
                        f"(attnx.Chunked, ...) or a list of these, got {item!r}")

    if implementation is None:
        return _auto_order(args), False
    if isinstance(implementation, (list, tuple)):
        if not implementation:
            raise ValueError("implementation: an empty list; give at least one name or None for automatic")
        return [one(x) for x in implementation], len(implementation) == 1
    return [one(implementation)], True


def _run(args: AttentionArgs, implementation: Any, return_lse: bool):
    candidates, single = _resolve(implementation, args)
    reasons = []
    for cfg in candidates:
        check, run = _BACKENDS[cfg.name]
        try:
            check(args, return_lse, cfg)
            return run(args, cfg, return_lse)
        except NotImplementedError as err:
            if single:
                raise
            reasons.append(f"{cfg.name}: {err}")
    raise NotImplementedError("no implementation can run these arguments:\n  " + "\n  ".join(reasons))


def _unflatten(args: AttentionArgs, x: jax.Array) -> jax.Array:
    return x.reshape(args.batch_shape + x.shape[1:])


def dot_product_attention(
    query, key, value, bias=None, mask: Mask | jax.Array | None = None, *,
    scale: float | None = None, logits_soft_cap: float | None = None, sinks=None,
    score_mod: Callable | None = None, mask_mod: Callable | None = None,
    implementation: str | Sequence[str] | Any | None = None,
) -> jax.Array:
    """Scaled dot-product attention (Vaswani et al., 2017, §3.2.1) with GQA/MQA, masks, bias and extras.

    Args:
      query: [*B, T, N, H]; key: [*B, S, K, H]; value: [*B, S, K, V], one floating dtype, N % K == 0.
      bias: additive logits bias broadcastable to [*B, N, T, S] (size-1 axes broadcast; its gradient is reduced
        over them).
      mask: an `attnx.Mask` (or a bool array [..., T, S], True = attend). Fully masked query rows return 0.
      scale: logits scale, default 1/sqrt(H).
      logits_soft_cap: c > 0 maps logits to c·tanh(logits/c) (Gemma 2), after bias, before score_mod.
      sinks: [N] per-head logits of a virtual key with value 0 that joins every row's softmax denominator
        (attention sinks as in gpt-oss); learnable (gradients flow).
      score_mod: score_mod(score, batch, head, q_idx, kv_idx) -> score, applied last to the logits; each argument
        is an array that broadcasts against the logits block. E.g. ALiBi:
        `lambda s, b, n, t, j: s - slopes[n] * jnp.abs(t - j)`. Arrays it closes over receive gradients.
      mask_mod: mask_mod(batch, head, q_idx, kv_idx) -> bool (True = attend), combined with `mask`; blocks it
        rules out entirely are skipped by the chunked path.
      implementation: see the module docstring.

    Returns:
      [*B, T, N, V] in the query's dtype.
    """
    args = canonicalize(query, key, value, bias, mask, scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                        score_mod=score_mod, mask_mod=mask_mod)
    return _unflatten(args, _run(args, implementation, return_lse=False))


def dot_product_attention_with_lse(
    query, key, value, bias=None, mask: Mask | jax.Array | None = None, *,
    scale: float | None = None, logits_soft_cap: float | None = None, sinks=None,
    score_mod: Callable | None = None, mask_mod: Callable | None = None,
    implementation: str | Sequence[str] | Any | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Like `dot_product_attention`, also returning the float32 log-sum-exp of each row's logits, [*B, T, N]
    (including the sink term when `sinks` is given; -inf for fully masked rows). Differentiable: d lse/d logits is
    the attention probability, so ring attention and analysis tools can combine partial results exactly."""
    args = canonicalize(query, key, value, bias, mask, scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                        score_mod=score_mod, mask_mod=mask_mod)
    out, lse = _run(args, implementation, return_lse=True)
    return _unflatten(args, out), _unflatten(args, lse)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What `dot_product_attention` would run for some arguments, and why each other implementation would not."""

    chosen: str | None
    considered: tuple[str, ...]
    rejected: dict
    shapes: dict

    def __str__(self) -> str:
        lines = [f"attnx.explain: B={self.shapes['B']} T={self.shapes['T']} S={self.shapes['S']} "
                 f"N={self.shapes['N']} K={self.shapes['K']} H={self.shapes['H']} V={self.shapes['V']} "
                 f"on {jax.default_backend()}"]
        lines.append(f"  runs: {self.chosen or 'nothing (NotImplementedError)'}")
        for name in IMPLEMENTATIONS:
            if name == self.chosen:
                continue
            why = self.rejected.get(name, "")
            why = why[len(name) + 2:] if why.startswith(f"{name}: ") else why
            lines.append(f"  {name:>9}: {why}")
        return "\n".join(lines)


def explain(query, key, value, bias=None, mask=None, *, scale=None, logits_soft_cap=None, sinks=None,
            score_mod=None, mask_mod=None, implementation=None, with_lse: bool = False) -> Explanation:
    """Say which implementation `dot_product_attention` (or, with `with_lse=True`,
    `dot_product_attention_with_lse`) would run for these arguments, and why each other one was rejected or not
    chosen. Accepts arrays or `jax.ShapeDtypeStruct`s; computes nothing."""
    def abstract(x):
        if x is None or isinstance(x, (jax.Array,)) or not hasattr(x, "shape"):
            return x
        return jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x

    args = canonicalize(abstract(query), abstract(key), abstract(value), abstract(bias), mask, scale=scale,
                        logits_soft_cap=logits_soft_cap, sinks=abstract(sinks), score_mod=score_mod,
                        mask_mod=mask_mod)
    candidates, single = _resolve(implementation, args)
    considered = tuple(c.name for c in candidates)
    rejected = {}
    chosen = None
    configs = {cfg.name: cfg for cfg in candidates}
    for name, (check, _) in _BACKENDS.items():
        try:
            check(args, with_lse, configs.get(name) or IMPLEMENTATIONS[name]())
        except NotImplementedError as err:
            rejected[name] = str(err)
    for cfg in candidates:
        if cfg.name not in rejected:
            chosen = cfg.name
            break
        if single:
            break
    for name in _BACKENDS:
        if name not in rejected and name != chosen:
            if name in considered:
                rejected[name] = "supported, but an earlier candidate runs first"
            elif implementation is None:
                rejected[name] = (f"supported, but automatic selection on {jax.default_backend()} does not pick it "
                                  f"for these shapes (order: {', '.join(considered)})")
            else:
                rejected[name] = "supported, but not in the requested implementation(s)"
    return Explanation(chosen=chosen, considered=considered, rejected=rejected, shapes=args.shape_info)

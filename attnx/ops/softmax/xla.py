"""`xla` and `cudnn`: thin wrappers of `jax.nn.dot_product_attention` that refuse what it cannot do.

Each wrapper has a `check_*` that raises `NotImplementedError` naming the unsupported feature (used by dispatch
fallback and by `attnx.explain`), and a `run_*` that assumes the check passed. The attnx contract is kept on top
of jax.nn: a fully masked query row returns 0 (jax.nn's XLA path would return the mean of the values); such rows
are found from jax.nn's own log-sum-exp, so the mask is never materialised a second time.

Known limits inherited from jax.nn: the log-sum-exp it returns is under `stop_gradient`, so `with_lse` raises
NotImplementedError here; the cuDNN path is a `custom_vjp`, so `jax.jvp` through `cudnn` fails (use `chunked`).
The `cudnn` wrapper has not been run on a GPU yet (no device in the sessions so far).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.softmax import common
from attnx.validation import AttentionArgs

_DYNAMIC_FIELDS = ("q_segment_ids", "kv_segment_ids", "block_mask", "dense")


def _common_limits(args: AttentionArgs, name: str, return_lse: bool) -> None:
    if return_lse:
        raise NotImplementedError(f"{name}: jax.nn returns the log-sum-exp under stop_gradient; the attnx contract "
                                  "needs a differentiable lse (use 'chunked' or 'reference')")
    if args.logits_soft_cap is not None:
        raise NotImplementedError(f"{name}: logits_soft_cap is not supported by jax.nn.dot_product_attention")
    if args.sinks is not None:
        raise NotImplementedError(f"{name}: sinks are not supported by jax.nn.dot_product_attention")
    if args.score_mod is not None:
        raise NotImplementedError(f"{name}: score_mod is not supported by jax.nn.dot_product_attention")
    if args.mask.q_offset != 0 and (args.mask.causal or args.mask.window is not None):
        raise NotImplementedError(f"{name}: jax.nn aligns the causal/window diagonal top-left only (q_offset=0), "
                                  f"got q_offset={args.mask.q_offset}")
    info = args.shape_info
    if info["V"] != info["H"]:
        raise NotImplementedError(f"{name}: jax.nn needs the value head dim to equal the query/key head dim, got "
                                  f"V={info['V']} and H={info['H']}")


def check_xla(args: AttentionArgs, return_lse: bool = False) -> None:
    _common_limits(args, "xla", return_lse)
    if args.q.dtype == jnp.float16 and jax.default_backend() == "cpu":
        raise NotImplementedError("xla: jax.nn's float16 path asks dot_general for precision F16_F16_F32, which the "
                                  "CPU backend does not support (its gradient fails); use 'chunked' or 'reference'")


def _jax_nn_masks(args: AttentionArgs):
    """Translate a canonical Mask into jax.nn's keyword arguments plus an optional dense bool mask."""
    m = args.mask
    info = args.shape_info
    B, T, S = info["B"], info["T"], info["S"]
    kw = dict(is_causal=m.causal)
    window = m.window
    if window is not None:
        left, right = window
        kw["local_window_size"] = (T + S if left is None else left, T + S if right is None else right)
    if m.kv_lengths is not None:
        kw["key_value_seq_lengths"] = jnp.broadcast_to(m.kv_lengths, (B,)).astype(jnp.int32)
    if m.q_lengths is not None:
        kw["query_seq_lengths"] = jnp.broadcast_to(m.q_lengths, (B,)).astype(jnp.int32)
    dense = None
    if any(getattr(m, f) is not None for f in _DYNAMIC_FIELDS) or args.mask_mod is not None:
        rest = m.replace(causal=False, window=None, q_lengths=None, kv_lengths=None)
        K, G = info["K"], info["N"] // info["K"]
        grouped = common.mask_block(rest, args.mask_mod, (), jnp.arange(T)[:, None], jnp.arange(S)[None, :],
                                    K, G, B, T, S)  # [B|1, K|1, G|1, T, S]
        grouped = jnp.broadcast_to(grouped, grouped.shape[:1] + (K, G) + grouped.shape[3:])
        dense = grouped.reshape(grouped.shape[0], K * G, T, S)
    return kw, dense


def _run(args: AttentionArgs, implementation: str):
    kw, dense = _jax_nn_masks(args)
    bias = args.bias
    if bias is not None:
        # jax.nn turns a row whose bias is all -inf into NaN: clamp the bias (in float32, the dtype of jax.nn's
        # logits) to jax.nn's own "large negative", so that such a row looks like a masked one.
        bias = jnp.maximum(bias.astype(jnp.float32), 0.7 * jnp.finfo(jnp.float32).min)
    out, lse = jax.nn.dot_product_attention(args.q, args.k, args.v, bias=bias, mask=dense, scale=args.scale,
                                            implementation=implementation, return_residual=True, **kw)
    # A row with no visible key (masked, padded, or all -inf bias) has only "large negative" logits, so its
    # (stop-gradient) log-sum-exp is far below any real one, or -inf/NaN after a cast: the attnx contract gives 0
    # there, where jax.nn gives the mean of the values.
    empty = ~(lse.astype(jnp.float32) > 0.35 * float(jnp.finfo(jnp.float32).min))
    return jnp.where(empty[..., None], jnp.zeros((), out.dtype), out)


def run_xla(args: AttentionArgs, cfg=None, return_lse: bool = False):
    return _run(args, "xla")


def check_cudnn(args: AttentionArgs, return_lse: bool = False) -> None:
    if jax.default_backend() != "gpu":
        raise NotImplementedError(f"cudnn: needs an NVIDIA GPU backend, the default backend is "
                                  f"'{jax.default_backend()}'")
    _common_limits(args, "cudnn", return_lse)
    info = args.shape_info
    if args.q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"cudnn: needs bfloat16 or float16 inputs, got {args.q.dtype}")
    if info["H"] % 8 != 0 or info["H"] > 256:
        raise NotImplementedError(f"cudnn: head dim must be a multiple of 8 and <= 256, got {info['H']}")
    m = args.mask
    if any(getattr(m, f) is not None for f in _DYNAMIC_FIELDS) or args.mask_mod is not None:
        raise NotImplementedError("cudnn: segment ids, block masks, dense masks and mask_mod are not supported "
                                  "(an explicit mask is very slow on cuDNN; use 'chunked' or a Pallas kernel)")
    if m.window is not None and m.window[0] is None:
        raise NotImplementedError("cudnn: a window needs a finite left size")
    if m.window is not None and not m.causal and m.window[1] != 0:
        raise NotImplementedError(f"cudnn: a right window is only supported together with causal, got "
                                  f"window={m.window}")
    if m.q_lengths is not None or m.kv_lengths is not None:
        raise NotImplementedError("cudnn: padding lengths return uninitialised rows for padded queries; use "
                                  "'chunked' (fully masked rows must return 0)")


def run_cudnn(args: AttentionArgs, cfg=None, return_lse: bool = False):
    return _run(args, "cudnn")

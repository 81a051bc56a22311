"""VAR's in-model sink detection (Kang, Kim, Kim, Hwang, 2025, "See What You Are Told: Visual Attention Sink in Large
Multimodal Models", ICLR 2025, arXiv 2503.03321, §4.1; code MICV-yonsei/VisAttnSink `src/logic/logic.py`
DimProspector and `src/model/llava.py`, which runs it on the hidden states entering each selected decoder layer).

`VARSinkDetector` is the `ROUTERS` entry of 'var': weight-free, it marks a token as a sink when its residual-stream
hidden state h entering the layer has max over `sink_dims` of |h / rms(h)| > tau (`attnx.ops.multimodal.var.
var_sink_tokens`) and passes the bool mask [B, T] to the attention function as `sinks`. A layer without `sink_dims`
(the layers VAR's schedule skips, or static `sinks` indices) gets nothing from it.

The residual stream. The attention layer hands its router the *normalised* input x = g * h / rms(h) (the block's
pre-attention RMSNorm), not h. The LLM's blocks therefore publish h for the duration of their attention call
(`residual_stream`, a context variable: no module state is written, so this works under jit and grad whatever the
trace the model was built in, and the parameter tree is the plain model's, so pretrained checkpoints restore into a
VAR model), and the detector reads it (`current_residual`). Without one (a layer called outside an LLM block) the
detector reads x itself.

Departure: the code detects sinks at prefill only (later tokens are never sinks) and pools the indices over the
batch; here every token, generated ones included, is tested on its own hidden state and each sequence has its own
mask, so that decoding (VAR's CacheRule keeps the flags beside the KV cache) equals the full forward.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from flax import nnx

from attnx.ops.multimodal.var import var_sink_tokens

_RESIDUAL: contextvars.ContextVar = contextvars.ContextVar("residual_stream", default=None)
_INPUTS: contextvars.ContextVar = contextvars.ContextVar("attention_inputs", default=None)


@contextlib.contextmanager
def _published(variable: contextvars.ContextVar, value):
    """Sets `variable` to `value` for the duration of the block, then restores what it held."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def residual_stream(hidden: jax.Array):
    """Publishes the residual stream h [B, T, D] entering a block while its attention layer runs."""
    return _published(_RESIDUAL, hidden)


def current_residual() -> jax.Array | None:
    """The residual stream published by the enclosing block, or None outside one."""
    return _RESIDUAL.get()


def attention_inputs(inputs):
    """Publishes run-time attention kwargs (a dict of arrays, e.g. PAINT's per-image token masks) to the layers'
    `RunTimeInputs` routers while a model runs (`LLM.__call__` / `decode` / `generate(attention_inputs=...)`).
    None publishes nothing."""
    if inputs is not None and not isinstance(inputs, dict):
        raise ValueError(f"attention_inputs: expected a dict of run-time attention kwargs (e.g. {{'local_tokens': "
                         f"bool [B, S]}}) or None, got {type(inputs).__name__}")
    return _published(_INPUTS, None if inputs is None else dict(inputs))


def check_attention_inputs(layers, inputs) -> None:
    """Refuses run-time attention kwargs that no layer would read (a model without `RunTimeInputs` routers), so a
    misconfigured model does not silently ignore them. layers: the attention layers (or mixers) of a model."""
    if inputs is not None and not any(isinstance(getattr(layer, "router", None), RunTimeInputs) for layer in layers):
        raise ValueError(f"attention_inputs {sorted(inputs)}: no layer of this model takes run-time attention inputs "
                         f"(only 'head_modulation' layers do); pass None")


class RunTimeInputs(nnx.Module):
    """The `ROUTERS` entry of 'head_modulation': weight-free; hands the layer's attention function the run-time
    kwargs the enclosing model call published (`attention_inputs`), e.g. per-image token sets as bool [B, S] masks
    (the function pads / truncates them to its key length, so one prompt-length mask serves the full forward and
    every decode step). Outside such a call it adds nothing: the layer is exactly the gin-configured one."""

    def __init__(self, width: int, num_heads: int, **unused):
        del width, num_heads, unused

    def __call__(self, x: jax.Array, query: jax.Array | None = None, key: jax.Array | None = None) -> dict:
        del x, query, key
        inputs = _INPUTS.get()
        return {} if inputs is None else dict(inputs)


class VARSinkDetector(nnx.Module):
    """Built as a ROUTERS module: `VARSinkDetector(width, num_heads, sink_dims=None, tau=20.0, **attention_kwargs)`;
    called as `detector(x, query, key) -> {"sinks": bool [B, T]}` (or {} when the layer has no sink_dims)."""

    def __init__(self, width: int, num_heads: int, *, sink_dims=None, tau: float = 20.0, **unused):
        del num_heads, unused  # the layer's other options (rngs, head sizes, VAR's own kwargs)
        if sink_dims is not None:
            if not isinstance(sink_dims, (tuple, list)) or not sink_dims or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < width for d in sink_dims):
                raise ValueError(f"var.sink_dims: expected a non-empty tuple of hidden dims in [0, {width}) (the "
                                 f"model width), got {sink_dims!r}")
            if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
                raise ValueError(f"var.tau: expected a number >= 0, got {tau!r}")
        self.sink_dims = None if sink_dims is None else tuple(sink_dims)
        self.tau = float(tau)

    def __call__(self, x: jax.Array, query: jax.Array | None = None, key: jax.Array | None = None) -> dict:
        del query, key
        if self.sink_dims is None:
            return {}
        hidden = current_residual()
        if hidden is None or hidden.shape != x.shape:  # outside an LLM block: the layer input itself
            hidden = x
        return {"sinks": jax.lax.stop_gradient(var_sink_tokens(hidden, self.sink_dims, self.tau))}

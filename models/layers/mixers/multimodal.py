"""VAR's in-model sink detection (Kang, Kim, Kim, Hwang, 2025, "See What You Are Told: Visual Attention Sink in Large
Multimodal Models", ICLR 2025, arXiv 2503.03321, §4.1; code MICV-yonsei/VisAttnSink `src/logic/logic.py`
DimProspector and `src/model/llava.py`, which runs it on the hidden states entering each selected decoder layer).

`VARSinkDetector` is the `ROUTERS` entry of 'var': weight-free, it marks a token as a sink when its residual-stream
hidden state h entering the layer has max over `sink_dims` of |h / rms(h)| > tau (`attnx.ops.multimodal.var.
var_sink_tokens`) and passes the bool mask [B, T] to the attention function as `sinks`. A layer without `sink_dims`
(the layers VAR's schedule skips, or static `sinks` indices) gets nothing from it.

The residual stream. The attention layer hands its router the *normalised* input x = g * h / rms(h) (the block's
pre-attention RMSNorm with gain g), not h. The LLM therefore binds the block's norm to the detector
(`bind_input_norm`, models/llm.py), and the detector recovers h / rms(h) = x / g exactly (the block's norm eps
instead of the code's 1e-6 inside rms; the second weight-free normalisation then changes values by O(eps / mean h^2)).
A feature whose gain is exactly 0 carries no information about h and reads as 0. Without a bound norm (a layer used
outside the LLM) the detector reads x itself.

Departure: the code detects sinks at prefill only (later tokens are never sinks) and pools the indices over the
batch; here every token, generated ones included, is tested on its own hidden state and each sequence has its own
mask, so that decoding (VAR's CacheRule keeps the flags beside the KV cache) equals the full forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.multimodal.var import var_sink_tokens


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
        self.input_norm = nnx.data(None)  # data, not static: it will hold the block's norm module

    def bind_input_norm(self, norm: nnx.Module) -> None:
        """The block's pre-attention RMSNorm (shared, not copied), whose gain the detector divides out of x."""
        self.input_norm = nnx.data(norm)

    def __call__(self, x: jax.Array, query: jax.Array | None = None, key: jax.Array | None = None) -> dict:
        del query, key
        if self.sink_dims is None:
            return {}
        h = x.astype(jnp.float32)
        if self.input_norm is not None:
            gain = self.input_norm.scale_d[...].astype(jnp.float32)
            h = jnp.where(gain != 0, h / jnp.where(gain != 0, gain, 1.0), 0.0)
        return {"sinks": jax.lax.stop_gradient(var_sink_tokens(h, self.sink_dims, self.tau))}

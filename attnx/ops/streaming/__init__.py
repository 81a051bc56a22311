"""StreamingLLM's sink + window attention and its bounded KV cache (attnx/ops/streaming/streaming.py)."""

from attnx.ops.streaming.streaming import (sink_window_decode, sink_window_init, streaming_attention,
                                           streaming_reference)

__all__ = ["sink_window_decode", "sink_window_init", "streaming_attention", "streaming_reference"]

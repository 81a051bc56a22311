"""Registry entry of StreamingLLM's `streaming` attention, with its own bounded cache rule."""

from attnx.api import implementation_names
from attnx.ops.streaming.streaming import (sink_window_decode, sink_window_init, streaming_attention,
                                           streaming_reference)
from attnx.registry import AttentionSpec, CacheRule, register_attention

register_attention(AttentionSpec(
    name="streaming",
    fn=streaming_attention,
    reference=streaming_reference,
    patterns=frozenset({"CS"}),
    paper="Xiao et al., 2024, Efficient Streaming Language Models with Attention Sinks, arXiv 2309.17453, §3.2 "
          "(rolling KV cache with attention sinks; positions within the cache, code's pos_shift)",
    implementations=implementation_names(),
    aliases=("streaming_llm", "attention_sinks"),
    defaults={"sink": 4, "window": 16},
    description="first `sink` tokens + `window` recent tokens; decoding keeps a bounded sink + window cache",
    cache=CacheRule(init=sink_window_init, decode=sink_window_decode),
))

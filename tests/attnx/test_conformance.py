"""Every softmax-attention implementation against the reference, through the shared conformance suite."""

import attnx
from attnx.testing.conformance import AttentionConformance


class TestChunkedSmallBlocks(AttentionConformance):
    # Blocks that divide neither T nor S, so ragged last blocks, block skipping and multi-block online softmax
    # are all exercised at test sizes.
    implementation = attnx.Chunked(block_q=4, block_kv=3)


class TestXla(AttentionConformance):
    implementation = "xla"
    # jax.nn has no sinks/soft cap/score_mod/q_offset/distinct value dim, returns a stop-gradient lse, and its
    # float16 gradient fails on CPU (CI's backend).
    unsupported = frozenset({"sinks", "soft_cap", "score_mod", "value_dim", "q_offset", "lse", "f16"})


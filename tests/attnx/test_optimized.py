"""A few conformance cases compiled with every XLA optimisation on.

The rest of the suite compiles with `jax_disable_most_optimizations` for speed (tests/conftest.py); fusion and
algebraic simplification must not change results, and these cases check that on the paths users actually run.
"""

import jax
import pytest

import attnx
from attnx.testing.conformance import CASES, AttentionConformance


@pytest.fixture(autouse=True)
def _optimised():
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# One case for the suite's time budget (each optimised compile costs ~16 s on 2 cores): segment ids exercise the
# dynamic block skipping and masking that fusion could reorder; sinks_masked_rows runs with -m slow.
_KEEP = {"segment_ids"}
_SLOW = {"sinks_masked_rows"}


class TestChunkedOptimised(AttentionConformance):
    implementation = attnx.Chunked(block_q=4, block_kv=3)

    @pytest.mark.parametrize("case", [pytest.param(c, marks=() if c.name in _KEEP else pytest.mark.slow, id=c.name)
                                      for c in CASES if c.name in _KEEP | _SLOW])
    def test_matches_reference(self, case):
        self._check(case, with_lse=True)

    # The other inherited checks already run unoptimised in test_conformance.py.
    test_with_lse_matches_reference = None
    test_fully_masked_rows_are_zero = None
    test_vmap_matches_batch = None
    test_deterministic_and_jit_equals_eager = None
    test_causal_prefix_property = None

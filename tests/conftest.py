"""Test configuration shared by the whole suite.

Eight host devices are forced *before* JAX is imported anywhere, so sharding tests see a mesh on a plain CPU
(ARCHITECTURE §7). Markers `slow`, `gpu`, `tpu` are declared in pyproject.toml and enforced with --strict-markers.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402  (imported after the flags on purpose)

# XLA's optimisation passes dominate compile time at test sizes (6 s -> 0.7 s per conformance case measured on
# 2 cores) and do not change semantics; set ATTNX_TEST_OPTIMIZE=1 to run the suite fully optimised.
# tests/attnx/test_optimized.py always re-runs a few cases with every optimisation on.
if os.environ.get("ATTNX_TEST_OPTIMIZE", "0") != "1":
    jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(config, items):
    """Conformance subclasses with `default_cases` (attnx/testing/conformance.py): their other cases are `slow`,
    so a backend that compiles slowly on CPU (Pallas in interpret mode) keeps a small default share."""
    import pytest

    for item in items:
        default = getattr(getattr(item, "cls", None), "default_cases", None)
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec is not None else None
        name = getattr(case, "name", None)
        if default is not None and name is not None and name not in default:
            item.add_marker(pytest.mark.slow)

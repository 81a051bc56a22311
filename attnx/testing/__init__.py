"""Test support shared by every attnx test: tolerance table, input generators, the conformance suite and the CAB
pattern checks. Importing `attnx.testing.conformance` needs pytest (the `test` extra)."""

from attnx.testing.inputs import Case, make_inputs
from attnx.testing.tolerances import TOLERANCES, assert_close, tolerance

__all__ = ["Case", "make_inputs", "TOLERANCES", "assert_close", "tolerance"]

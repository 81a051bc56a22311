"""Entry setup shared by CAB's sampled self-attentions (LARA's importance-sampled proposals, Informer's ProbSparse
key sample): both are non-causal self attention only (pattern NS) with one integer option that sizes the sample.
"""

from __future__ import annotations

from attnx.ops.efficient.common import check_int, refuse_pattern, resolve_implementation
from attnx.validation import canonicalize


def sampled_self_attention_setup(name: str, query, key, value, *, causal: bool, option: str, option_value,
                                 implementation: str | None, implementations: tuple[str, ...]):
    """Canonicalise q/k/v, refuse every pattern but NS, check the sample-size option `<name>.<option>` (an int >= 1)
    and resolve the implementation. Returns (args, (B, T, N, H, S, K), implementation)."""
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    S, K = args.k.shape[1], args.k.shape[2]
    refuse_pattern(name, causal=causal, T=T, S=S, patterns="NS")
    check_int(f"{name}.{option}", option_value)
    return args, (B, T, N, H, S, K), resolve_implementation(name, implementation, implementations)

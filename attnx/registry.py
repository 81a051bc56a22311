"""The mechanism registry: name -> `AttentionSpec` (function, reference, CAB patterns, paper, implementations).

Every mechanism registers the same way, so models pick one by name (`attention='sliding_window'`) and the test
suite runs the CAB four-pattern property check over every entry.

Calling convention of `spec.fn` and `spec.reference`: `fn(query, key, value, *, causal=False, **kwargs)` with the
attention contract's layout ([*B, T, N, H] / [*B, S, K, H] / [*B, S, K, V]). `causal` selects between the causal
and non-causal patterns; a mechanism that does not support the requested pattern raises `ValueError`.

CAB patterns (Zhang et al., 2023, "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling", §2):
    NS non-causal self · CS causal self · NC non-causal cross · CC causal cross.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

__all__ = ["AttentionSpec", "CacheRule", "PATTERNS", "register_attention", "get_attention", "list_attentions"]

PATTERNS = ("NS", "CS", "NC", "CC")


@dataclasses.dataclass(frozen=True)
class CacheRule:
    """A mechanism's own decoding cache, for mechanisms whose cache is not one slot per position (StreamingLLM's
    bounded sink + window cache, which also re-assigns rotary positions inside the cache).

    init(batch_size, length, key_shape (K, H), value_shape (K', V), dtype, **kwargs) -> cache (a pytree of arrays).
    decode(query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K', V], cache, cache_index, *, rope_theta,
        **kwargs) -> (out [*B, T, N, V], cache): the T new tokens sit at positions cache_index .. cache_index + T - 1;
        query and key come **before** rotary positions, which the rule applies itself (rope_theta None: the layer
        has no rotary positions).
    """

    init: Callable
    decode: Callable


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """A registered mechanism.

    name: the registry name (short, lower case, the paper's own name).
    fn: the mechanism, `fn(query, key, value, *, causal=False, **kwargs)`.
    reference: the same computation written naively (the oracle its fast paths are tested against).
    patterns: the CAB patterns it supports, a subset of ("NS", "CS", "NC", "CC").
    paper: citation (title, authors, year, arXiv id, section).
    implementations: the `implementation=` names it accepts.
    aliases: other accepted names (listed here, never guessed).
    defaults: default keyword arguments (e.g. window sizes), documented for users and the CAB checks.
    decode: the cached-decode rule for causal language models, or None when the mechanism has none yet:
        `decode(query [*B, T, N, H], key_cache [*B, L, K, H], value_cache [*B, L, K, V], *, query_positions [T],
        **kwargs)`, where cache slot j holds the key/value of position j and queries sit at absolute
        `query_positions`. It must equal the last rows of `fn(..., causal=True)` over the whole sequence.
    cache: a `CacheRule` that replaces the one-slot-per-position cache (and `decode`) for mechanisms that keep
        their own cache; None for the rest.
    rotary_positions: `rotary_positions(index [T], **kwargs) -> positions [T]`, the positions at which a layer
        with rotary embeddings rotates the queries and keys at sequence indices `index`, for mechanisms that
        re-number positions (CCA's concentric image positions); None keeps index = position.
    spatial: the mechanism reads the 2-D (or 1-D/3-D) layout of the tokens: `fn(..., grid=(h, w))` with the tokens
        in row-major grid order (neighbourhood attention, HiLo, halo, ...). `grid=None` (the default, and what the
        CAB pattern checks use) means a 1-D sequence of length T. Tokens beyond prod(grid) at the front (a class
        token) are the mechanism's to handle or refuse with a ValueError. Model layers pass their grid.
    """

    name: str
    fn: Callable
    reference: Callable
    patterns: frozenset
    paper: str
    implementations: tuple = ()
    aliases: tuple = ()
    defaults: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    decode: Callable | None = None
    cache: CacheRule | None = None
    rotary_positions: Callable | None = None
    spatial: bool = False

    def __post_init__(self):
        bad = set(self.patterns) - set(PATTERNS)
        if bad:
            raise ValueError(f"AttentionSpec.patterns: unknown pattern(s) {sorted(bad)}, allowed {PATTERNS}")
        object.__setattr__(self, "patterns", frozenset(self.patterns))

    def supports(self, pattern: str) -> bool:
        return pattern in self.patterns


_REGISTRY: dict[str, AttentionSpec] = {}
_ALIASES: dict[str, str] = {}


def register_attention(spec: AttentionSpec) -> AttentionSpec:
    """Add a mechanism; its name and aliases must be new."""
    for name in (spec.name, *spec.aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"register_attention: the name {name!r} is already registered")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def _ensure_builtins() -> None:
    # Import for the side effect of registering the built-in mechanisms, lazily to avoid import cycles. Every family
    # folder attnx/ops/<family>/ that holds a registration.py registers its mechanisms there, so a new family is
    # picked up without editing this list (sorted: the registration order is the same on every machine).
    import importlib
    import pathlib

    from attnx import ops
    from attnx.ops import builtin  # noqa: F401

    # Looks for the file rather than asking importlib, which would import every family package to answer.
    for folder in sorted(pathlib.Path(ops.__file__).parent.iterdir()):
        if (folder / "registration.py").is_file():
            importlib.import_module(f"attnx.ops.{folder.name}.registration")


def list_attentions() -> list[str]:
    """Sorted names of every registered mechanism."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_attention(name: str) -> AttentionSpec:
    """The spec of a registered mechanism (or alias). Unknown names raise `ValueError` listing the known ones."""
    _ensure_builtins()
    if not isinstance(name, str):
        raise TypeError(f"get_attention: name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        aliases = f"; aliases: {sorted(_ALIASES)}" if _ALIASES else ""
        raise ValueError(f"attention: unknown name {name!r}; known: {sorted(_REGISTRY)}{aliases}")
    return _REGISTRY[key]

"""ListOps, the hierarchical-reasoning task of the Long Range Arena (Tay et al., 2021, "Long Range Arena: A Benchmark
for Efficient Transformers", arXiv 2011.04006, §3.1; after Nangia & Bowman, 2018, "ListOps: A Diagnostic Dataset for
Latent Tree Learning", arXiv 1804.06028), generated here from the rules of the official generator
(google-research/long-range-arena `lra_benchmarks/data/listops.py`; spec `diffusion_multimodal_bench.md` §9).

A node at depth d (the root has depth 1) is a digit 0-9 with probability 0.75, and always at d = max_depth;
otherwise an operator, uniform over MIN, MAX, MED (the median rounded down, `int(np.median)`) and SM (sum mod 10),
applied to 2..max_args arguments (uniform), each a node at depth d + 1. Written out,
`[MAX 2 9 [MIN 4 7 ] 0 ]` has the value 9. The length of an example is its number of tokens (operators, digits and
closing brackets; LRA's files add parentheses that its input pipeline strips), and LRA keeps only examples with
`min_len < length < max_len` (both strict), without duplicates. The label is the value, one of 10 classes.

Tokens form a closed vocabulary of 16 (`VOCAB`): 0 is padding, then the ten digits, the four operators and `]`.
`listops_generate` pads every example to `max_len - 1`, the longest length allowed, so that all calls with the same
bounds give the same shape. numpy's generator is seeded: a dataset is reproducible (it matches the official
distribution, not its bytes, which come from Python's `random`).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

OPERATORS = ("MIN", "MAX", "MED", "SM")
PAD, END = "<pad>", "]"
VOCAB: tuple[str, ...] = (PAD, *(str(digit) for digit in range(10)), *(f"[{op}" for op in OPERATORS), END)
VOCAB_SIZE = len(VOCAB)
TOKEN_IDS: dict[str, int] = {token: index for index, token in enumerate(VOCAB)}
PAD_ID, END_ID = TOKEN_IDS[PAD], TOKEN_IDS[END]
DIGIT_IDS = np.arange(1, 11)  # token id of digit v is v + 1
NUM_CLASSES = 10
VALUE_PROBABILITY = 0.75  # LRA: an operator when random() <= VALUE_P = 0.25, else a digit

# A tree is a digit (int 0-9) or (operator name, [argument trees]).
Tree = Union[int, tuple[str, list["Tree"]]]


def _apply(op: str, args: Sequence[int]) -> int:
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "MED":
        return int(np.median(args))  # LRA: int() of the median, so the mean of the middle pair rounded down
    return sum(args) % 10  # SM


def listops_eval(tree: Tree | str | Sequence[int]) -> int:
    """The value (0-9) of a ListOps tree: a digit, `(op, [args])`, a string such as `"[MAX 2 9 [MIN 4 7 ] 0 ]"`
    (parentheses, as in LRA's files, are ignored) or a token-id sequence (padding ignored)."""
    if isinstance(tree, (str, list, np.ndarray)) or (isinstance(tree, tuple) and not (
            len(tree) == 2 and isinstance(tree[0], str))):
        tree = listops_parse(tree)
    if isinstance(tree, (int, np.integer)) and not isinstance(tree, bool):
        if not 0 <= tree <= 9:
            raise ValueError(f"listops_eval: a leaf must be a digit 0-9, got {tree}")
        return int(tree)
    if not (isinstance(tree, tuple) and len(tree) == 2 and tree[0] in OPERATORS and isinstance(tree[1], list)
            and tree[1]):
        raise ValueError(f"listops_eval: expected a digit 0-9 or (operator in {list(OPERATORS)}, non-empty list of "
                         f"trees), got {tree!r}")
    return _apply(tree[0], [listops_eval(arg) for arg in tree[1]])


def listops_parse(source: str | Sequence[int]) -> Tree:
    """A tree from its written form (`"[MAX 2 9 [MIN 4 7 ] 0 ]"`, parentheses ignored) or its token ids."""
    if isinstance(source, str):
        words = [word for word in source.replace("(", " ").replace(")", " ").split()]
        unknown = [word for word in words if word not in TOKEN_IDS or word == PAD]
        if unknown:
            raise ValueError(f"listops_parse: unknown tokens {unknown[:5]}; allowed: {list(VOCAB[1:])}")
    else:
        ids = [int(i) for i in np.asarray(source).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise ValueError(f"listops_parse: token ids {bad[:5]} outside the vocabulary [0, {VOCAB_SIZE})")
        words = [VOCAB[i] for i in ids if i != PAD_ID]
    stack: list[tuple[str, list]] = []
    root: Tree | None = None
    for position, word in enumerate(words):
        if root is not None:
            raise ValueError(f"listops_parse: tokens after the end of the tree at position {position}: {word!r}")
        if word.startswith("["):
            stack.append((word[1:], []))
            continue
        if word == END:
            if not stack or not stack[-1][1]:
                raise ValueError(f"listops_parse: ']' at position {position} closes "
                                 f"{'nothing' if not stack else 'an operator without arguments'}")
            node: Tree = stack.pop()
        else:
            node = int(word)
        if stack:
            stack[-1][1].append(node)
        else:
            root = node
    if root is None:
        raise ValueError(f"listops_parse: incomplete tree ({len(stack)} unclosed operators)" if stack else
                         "listops_parse: empty input")
    return root


def listops_to_string(tree: Tree) -> str:
    """`(op, [args])` trees written out as in the spec, e.g. `[MAX 2 9 [MIN 4 7 ] 0 ]`."""
    if isinstance(tree, tuple):
        return " ".join([f"[{tree[0]}", *(listops_to_string(arg) for arg in tree[1]), END])
    return str(tree)


def listops_decode(tokens: Sequence[int]) -> str:
    """Token ids -> the written form (padding dropped)."""
    return " ".join(VOCAB[int(i)] for i in np.asarray(tokens).reshape(-1) if int(i) != PAD_ID)


def max_tree_length(max_depth: int, max_args: int) -> int:
    """The longest possible example: every node above max_depth an operator with max_args arguments."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


class _Uniforms:
    """Uniform [0, 1) numbers drawn from `rng` in blocks (one scalar draw per node would dominate the cost)."""

    def __init__(self, rng: np.random.Generator, block: int = 8192):
        self.rng, self.block = rng, block
        self.values, self.index = rng.random(block), 0

    def __call__(self) -> float:
        if self.index == self.block:
            self.values, self.index = self.rng.random(self.block), 0
        self.index += 1
        return float(self.values[self.index - 1])


def _draw(uniform: _Uniforms, depth: int, max_depth: int, max_args: int, out: list[int], limit: int) -> int:
    """Appends one random subtree's token ids to `out` and returns its value. Stops writing (the caller discards
    the example) once `out` is longer than `limit`, so a huge tree never costs more than the length filter allows;
    the random draws of a discarded example are still consumed in full, so results do not depend on `limit`."""
    if depth >= max_depth or uniform() < VALUE_PROBABILITY:
        value = min(int(uniform() * 10), 9)
        out.append(value + 1)
        return value
    num_args = 2 + min(int(uniform() * (max_args - 1)), max_args - 2)
    op = OPERATORS[min(int(uniform() * 4), 3)]
    out.append(TOKEN_IDS[f"[{op}"])
    values = [_draw(uniform, depth + 1, max_depth, max_args, out, limit) for _ in range(num_args)]
    out.append(END_ID)
    if len(out) > limit:
        del out[limit + 1 :]
    return _apply(op, values)


def _check_int(name: str, value: object, minimum: int, rule: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"listops_generate: {name} must be an int {rule}, got {value!r}")
    return int(value)


def listops_generate(rng: np.random.Generator | int, n: int, max_depth: int = 10, max_args: int = 10,
                     min_len: int = 500, max_len: int = 2000, *, unique: bool = True,
                     max_draws: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` ListOps examples with `min_len < length < max_len` (LRA's strict bounds; its defaults max_depth 10,
    max_args 10, 500 < length < 2000): (tokens int32 [n, max_len - 1], padded with 0 after each example; labels
    int32 [n] in 0..9). `rng` is a numpy Generator or an int seed. unique: no example twice (LRA keeps a set).
    Trees are drawn until n pass the filter; after `max_draws` draws (default 1000 n + 100,000) a RuntimeError
    says how many were found, e.g. when few trees of the requested length exist."""
    n = _check_int("n", n, 1, ">= 1")
    max_depth = _check_int("max_depth", max_depth, 2, ">= 2 (at depth 1 the root is a single digit)")
    max_args = _check_int("max_args", max_args, 2, ">= 2 (an operator takes 2..max_args arguments)")
    min_len = _check_int("min_len", min_len, 0, ">= 0")
    max_len = _check_int("max_len", max_len, min_len + 2, f"> min_len + 1 = {min_len + 1} (lengths are strictly "
                                                          f"between min_len={min_len} and max_len)")
    if max_len <= 4:
        raise ValueError(f"listops_generate: max_len must be > 4 (the shortest operator example, e.g. "
                         f"'[MIN 1 2 ]', has 4 tokens), got {max_len}")
    longest = max_tree_length(max_depth, max_args)
    if longest <= min_len:
        raise ValueError(f"listops_generate: min_len={min_len} leaves no example: with max_depth={max_depth} and "
                         f"max_args={max_args} the longest tree has {longest} tokens")
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        rng = np.random.default_rng(int(rng))
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"listops_generate: rng must be a numpy Generator or an int seed, got {type(rng).__name__}")
    max_draws = 1000 * n + 100_000 if max_draws is None else _check_int("max_draws", max_draws, 1, ">= 1")
    uniform = _Uniforms(rng)
    width = max_len - 1
    tokens = np.full((n, width), PAD_ID, np.int32)
    labels = np.empty((n,), np.int32)
    seen: set[bytes] = set()
    found = 0
    for _ in range(max_draws):
        out: list[int] = []
        value = _draw(uniform, 1, max_depth, max_args, out, width)
        if not min_len < len(out) < max_len:
            continue
        if unique:
            fingerprint = bytes(out)  # ids < 16 fit a byte each
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
        tokens[found, : len(out)] = out
        labels[found] = value
        found += 1
        if found == n:
            return tokens, labels
    raise RuntimeError(f"listops_generate: found only {found} of n={n} {'distinct ' if unique else ''}examples with "
                       f"{min_len} < length < {max_len} in {max_draws} draws (max_depth={max_depth}, "
                       f"max_args={max_args}); widen the length bounds or raise max_draws")


def lengths(tokens: np.ndarray) -> np.ndarray:
    """Number of non-padding tokens of each row of `tokens` [n, L]."""
    return np.sum(np.asarray(tokens) != PAD_ID, axis=-1)

"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (Arora et al., 2023, "Zoology:
Measuring and Improving Recall in Efficient Language Models", arXiv 2312.04927, §3.1; HazyResearch/zoology
`zoology/data/multiquery_ar.py`), generated here from the spec's description (`llm_mechanisms.md` §7 (b)).

One example of length T with D key-value pairs over a vocabulary of V tokens:
    context  k_1 v_1 k_2 v_2 ... k_D v_D        keys from [1, V/2), values from [V/2, V), each without repetition
    queries  (T - 2D) / 2 slots; D distinct gaps g drawn with probability proportional to (g + 1)^(a - 1), a = 0.01
             (early slots favoured); key k_i is written at input position 2D + 2 g_i, and the label at that same
             position is v_i (the value itself is not in the input). Every other label is -100 (ignored).
Filler tokens are 0, or uniform random tokens when `random_non_queries`. Needs V > T and 4 D <= T.

numpy's generator is seeded, so a dataset is reproducible; it matches the official distribution, not its bytes.
"""

import numpy as np

IGNORE = -100


def _distinct(rng: np.random.Generator, rows: int, population: int, count: int, chunk: int = 2048) -> np.ndarray:
    """[rows, count] draws from range(population), distinct within a row, in random order. The `count` smallest of
    iid uniforms are a uniform random subset; sorting by those uniforms randomises their order. Chunked so that 100k
    rows over a vocabulary of 8,192 need ~70 MB, not gigabytes."""
    out = np.empty((rows, count), np.int64)
    for start in range(0, rows, chunk):
        uniforms = rng.random((min(chunk, rows - start), population))
        chosen = np.argpartition(uniforms, count - 1, axis=1)[:, :count] if count < population else \
            np.tile(np.arange(population), (len(uniforms), 1))
        order = np.argsort(np.take_along_axis(uniforms, chosen, axis=1), axis=1)
        out[start : start + len(uniforms)] = np.take_along_axis(chosen, order, axis=1)
    return out


def mqar(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int = 8192, *, power_a: float = 0.01,
         random_non_queries: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(inputs int32 [n, T], labels int32 [n, T]) with labels -100 except at the D query positions."""
    if seq_len % 2:
        raise ValueError(f"mqar: seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"mqar: vocab_size must exceed seq_len (V > T), got V={vocab_size}, T={seq_len}")
    if not 1 <= num_pairs or 4 * num_pairs > seq_len:
        raise ValueError(f"mqar: need 1 <= num_pairs and 4 * num_pairs <= seq_len, got D={num_pairs}, T={seq_len}")
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(f"mqar: {num_pairs} pairs need that many distinct keys in [1, {vocab_size // 2})")
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    context = 2 * num_pairs
    keys = 1 + _distinct(rng, num_examples, half - 1, num_pairs)
    values = half + _distinct(rng, num_examples, vocab_size - half, num_pairs)
    slots = (seq_len - context) // 2
    weights = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
    # D distinct gaps per example, drawn without replacement with those weights (Gumbel top-k sampling).
    gumbel = np.log(weights / weights.sum()) - np.log(-np.log(rng.random((num_examples, slots))))
    gaps = np.argsort(-gumbel, axis=1)[:, :num_pairs]

    inputs = np.zeros((num_examples, seq_len), np.int64)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    labels = np.full((num_examples, seq_len), IGNORE, np.int64)
    positions = context + 2 * gaps
    np.put_along_axis(inputs, positions, keys, axis=1)
    np.put_along_axis(labels, positions, values, axis=1)
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
    return inputs.astype(np.int32), labels.astype(np.int32)

"""Multimodal attention masks and CCA's concentric positions (spec diffusion_multimodal_bench.md §7).

The sequence is `[prefix | image, indices [s, s + V) | text ...]`; masks are boolean [L, L] (True = attend).
Every mask here is an elementwise predicate of (query index, key index), so the same rule builds the full mask
(`*_mask(length, ...)`) and the rows of a KV-cache decode (`*_allowed(query_positions[:, None], arange(L)[None])`).
Spans that reach past the sequence are clipped to it: a sequence shorter than the image holds the part that fits.

**CCA**, Concentric Causal Attention (Xing, Li, Laptev, Lu, 2024, "Mitigating Object Hallucination via Concentric
Causal Attention", NeurIPS 2024, arXiv 2410.15926, §3.2-3.3, Fig. 3; code xing0047/cca-llava
`llava/cca_utils/cca.py`). The G x G image grid is split into G/2 square rings, ring 0 the outermost, ring G/2 - 1
the central 2 x 2: ring(r, c) = min(r, c, G - 1 - r, G - 1 - c), the value the code's pointer loop writes.

    positions  prefix i -> i;  image (r, c) -> s + ring(r, c);  text index i >= s + G^2 -> i - G^2 + G/2
    mask       causal, except inside the image block, where query q sees image key k iff ring(k) <= ring(q)
               (same ring both ways, the centre sees the periphery, whatever the raster order)

The code builds the image block by first masking it fully and then re-opening, for each ring r, every
(q in ring r, k in ring <= r) pair; the predicate below is that result. Its decode rule gives a new token at cache
index L the position L - G^2 + G/2, which is the text formula above (it does not depend on s). The code assumes
G = 24 (576 tokens, 12 rings); any even G works the same way. Odd G has no 2 x 2 centre and is refused.
In this library the attention layer rotates queries and keys before it calls the mechanism, so the registered
`cca` entry applies the mask and declares `attention.cca_rotary_positions(index, **attention_kwargs)` as its
`rotary_positions`, by which the layer rotates.

**MMA**, modality-mutual attention (AKI: Wang, Wang, Suzuki, Kobayashi, 2025, "Seeing is Understanding:
Unlocking Causal Attention into Modality-Mutual Attention for Multimodal LLMs", arXiv 2503.02597, §3; code sony/aki
`codes/open_flamingo/src/vlm.py::_make_modality_mutual_mask`): causal, plus image rows see the question
columns [q_start, q_end) (up to, not including, the `<|assistant|>` token), never the answer. Padding key columns
are cleared. In the code the question starts right after the image; any span is accepted here.

**Composite** attention (EE-MLLM: Ma et al., 2024, "EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal
Large Language Model", arXiv 2408.11795, §3.2; no code): text rows are causal over [visual; text]; visual rows see
only themselves (a diagonal block), so a visual token's attention output is its own value and the layer's W_o W_v
(and FFN) act as a parameter-free aligner.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_span(name: str, span, *, allow_none: bool = True) -> tuple[int, int] | None:
    """A static (start, end) index pair with 0 <= start <= end, or None when allowed."""
    if span is None and allow_none:
        return None
    if not (isinstance(span, (tuple, list)) and len(span) == 2):
        raise ValueError(f"{name}: expected a pair (start, end) of ints{' or None' if allow_none else ''}, "
                         f"got {span!r}")
    start = check_int(f"{name}[0]", span[0])
    end = check_int(f"{name}[1]", span[1])
    if end < start:
        raise ValueError(f"{name}: expected start <= end, got {span!r}")
    return start, end


def check_grid(name: str, grid) -> int:
    grid = check_int(name, grid, 2)
    if grid % 2:
        raise ValueError(f"{name}: CCA's rings need an even grid side (a 2 x 2 centre), got {grid}")
    return grid


def _in(index, span):
    return (index >= span[0]) & (index < span[1])


# ---- CCA ----------------------------------------------------------------------------------------------------------

def cca_rings(grid: int) -> np.ndarray:
    """[G, G] int ring index of each grid cell: 0 on the border, G/2 - 1 on the central 2 x 2 (code's layout)."""
    grid = check_grid("cca.grid", grid)
    r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.minimum(np.minimum(r, c), np.minimum(grid - 1 - r, grid - 1 - c))


def _ring_of(index, start: int, grid: int):
    """Ring of sequence index `index` (meaningful only inside the image span)."""
    offset = index - start
    r, c = offset // grid, offset % grid
    return jnp.minimum(jnp.minimum(r, c), jnp.minimum(grid - 1 - r, grid - 1 - c))


def cca_allowed(q_index, k_index, *, start: int, grid: int):
    """The CCA mask as a predicate of broadcastable query/key index arrays."""
    image = (start, start + grid * grid)
    both = _in(q_index, image) & _in(k_index, image)
    return jnp.where(both, _ring_of(k_index, start, grid) <= _ring_of(q_index, start, grid), k_index <= q_index)


def cca_mask(start: int, length: int, grid: int) -> jnp.ndarray:
    """[L, L] bool CCA mask for an image of G x G tokens at [start, start + G^2) in a sequence of `length`."""
    start, length = check_int("cca.start", start), check_int("cca.length", length, 1)
    grid = check_grid("cca.grid", grid)
    i = jnp.arange(length)
    return cca_allowed(i[:, None], i[None, :], start=start, grid=grid)


def cca_positions_of(index, *, start: int, grid: int):
    """Rotary position of sequence index `index` (any int array): prefix i, image s + ring, text i - G^2 + G/2.
    For a token decoded at cache index L (>= s + G^2) this is the code's `L - IMG_TOKEN_LEN + H // 2`."""
    index = jnp.asarray(index)
    image = (start, start + grid * grid)
    text = index - grid * grid + grid // 2
    return jnp.where(index < start, index, jnp.where(_in(index, image), start + _ring_of(index, start, grid), text))


def cca_position_ids(start: int, length: int, grid: int) -> jnp.ndarray:
    """[L] int32 rotary positions of a sequence of `length` holding a whole G x G image at `start` (so the image
    takes G/2 position slots and the text after it continues from start + G/2, as in the code)."""
    start, length = check_int("cca.start", start), check_int("cca.length", length, 1)
    grid = check_grid("cca.grid", grid)
    if start + grid * grid > length:
        raise ValueError(f"cca.length: the image [{start}, {start + grid * grid}) must fit in the sequence, got "
                         f"length {length}")
    return cca_positions_of(jnp.arange(length, dtype=jnp.int32), start=start, grid=grid).astype(jnp.int32)


# ---- MMA ----------------------------------------------------------------------------------------------------------

def mma_allowed(q_index, k_index, *, image_span, question_span):
    """The MMA mask (without padding) as a predicate of broadcastable query/key index arrays."""
    mutual = _in(q_index, image_span) & _in(k_index, question_span)
    return (k_index <= q_index) | mutual


def mma_mask(length: int, image_span, question_span, pad=None) -> jnp.ndarray:
    """[L, L] bool modality-mutual mask: causal, plus image rows see the question columns; `pad` [L] bool (True =
    padding token) clears those key columns, as the code does with its 2-D attention mask."""
    length = check_int("mma.length", length, 1)
    image_span = check_span("mma.image_span", image_span, allow_none=False)
    question_span = check_span("mma.question_span", question_span, allow_none=False)
    i = jnp.arange(length)
    allowed = mma_allowed(i[:, None], i[None, :], image_span=image_span, question_span=question_span)
    if pad is not None:
        pad = jnp.asarray(pad)
        if pad.shape != (length,) or pad.dtype != jnp.bool_:
            raise ValueError(f"mma.pad: expected a bool [length={length}] array (True = padding), got "
                             f"{pad.dtype}{list(pad.shape)}")
        allowed = allowed & ~pad[None, :]
    return allowed


# ---- Composite (EE-MLLM) ------------------------------------------------------------------------------------------

def composite_allowed(q_index, k_index, *, image_span):
    """Text rows causal; visual rows see only their own column."""
    return jnp.where(_in(q_index, image_span), k_index == q_index, k_index <= q_index)


def composite_mask(length: int, image_span) -> jnp.ndarray:
    """[L, L] bool EE-MLLM composite mask (visual rows diagonal, every other row causal)."""
    length = check_int("composite.length", length, 1)
    image_span = check_span("composite.image_span", image_span, allow_none=False)
    i = jnp.arange(length)
    return composite_allowed(i[:, None], i[None, :], image_span=image_span)

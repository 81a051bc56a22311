"""Model-level passes of the multimodal LLM mechanisms (spec diffusion_multimodal_bench.md §7) that need more than one
attention call can see: VHR's image-free pass that measures each head's vision-aware divergence, and the token
scores of "Fixing Imbalanced Attention" (PAINT) taken from a vision encoder's CLS attention and fed to the LLM.

`run_llm` is the LLM's forward (`models.llm.LLM.features` + `logits`) written out block by block through the
attention layer's own steps (projection, rotary positions, router kwargs, attention function, output projection),
so that it can return every layer's per-head attention outputs [B, T, N, V] (before the output projection, where
VHR scales heads) and pass run-time arrays to the attention functions (`extra_kwargs`, e.g. PAINT's per-image token
masks). It equals `model(tokens)` (tested). Layers replaced by the LLM's own `MIXERS` have no such heads: refused.

**VHR** (He, Zhu, Guo, Fang, Hua, Jia, Tang, Chua, Wang, 2024, "Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence", arXiv 2412.13949, ACL 2025, §3.2 VHD, §4 VHR): VHD_{l,h} = || o_{l,h}(image, text) -
o_{l,h}(text) ||, the head output with the image in the context against the output without it. `measure_vhd` runs
the model twice, on the sequence and on the sequence with the image span removed (the text-only input; the text
after the image moves up by the image length and takes the positions a text-only prompt would have), and compares
the head outputs of the rows after the image (row s + V + i with image against row s + i without). The code
(jinghan1he/VHR) is not available here; which rows the paper compares is read as "the current (last) token" (VHR
re-selects per generated token), the default `rows='last'`; `rows='all'` averages over every text row after the
image. `vhr_plan` turns the measured VHD into per-layer head selections (the paper's rule, above the layer median
with surges above mean + std dropped: `vhr_layer_selection`; or a fixed `top_k`) and the `layer_attention` entries
that configs/attention/vhr.gin takes as LAYER_HEADS.

**PAINT** (Arif, Dip, Hussain, Zhang, Thomas, 2025, "Fixing Imbalanced Attention to Mitigate In-Context
Hallucination of Large Vision-Language Model", arXiv 2501.12206, §3; code hasanar1f/PAINT
modPAI/llava/model/multimodal_encoder/clip_encoder.py): the local tokens are the top 25% of the vision encoder's
first-layer CLS attention, the summary tokens the IQR outliers of its penultimate layer's
(`attnx.ops.multimodal.heads.paint_token_sets`). `paint_token_masks` reads both rows from a (tiny, softmax) `ViT`
with models/vit.py `attention_maps` and places them at the image span of the LLM sequence as bool [B, T] masks,
which `run_llm(..., extra_kwargs={'local_tokens': ..., 'summary_tokens': ...})` threads to the 'head_modulation'
layers (mode 'code'), one compile for any images.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import attnx
from attnx.ops.multimodal import heads as head_ops
from models.layers.attention import Attention, resolve_attention
from models.layers.mixers.multimodal import residual_stream
from models.llm import LLM
from models.vit import ViT, attention_maps


def run_llm(model: LLM, token_ids: jax.Array, positions: jax.Array | None = None, *,
            extra_kwargs: Mapping[str, Any] | None = None, extra_for: str | None = None
            ) -> tuple[jax.Array, list[jax.Array]]:
    """(logits [B, T, vocab], per-layer head outputs [[B, T, N, V] per layer]) of `model` on token_ids [B, T].

    extra_kwargs: run-time arguments (arrays) added to the attention function's kwargs in every layer whose
    registered mechanism is `extra_for` (a registry name; None = every layer)."""
    extra = dict(extra_kwargs or {})
    target = None if extra_for is None else attnx.get_attention(extra_for).name
    x = model.embed(token_ids)
    ids = token_ids if model.representation_embeddings else None
    outputs = []
    for layer, block in enumerate(model.blocks):
        attention = block.attention
        if not isinstance(attention, Attention):
            raise ValueError(f"run_llm: layer {layer} is the LLM's own mixer {type(attention).__name__}, which has no "
                             f"per-head attention outputs; use registered attention mechanisms in every layer")
        normed = block.attention_norm(x)
        heads = attention.project_heads(normed, ids)
        query, key, value = attention.rotate(*heads, positions)
        with residual_stream(x):  # as the block publishes it (VAR's sink detector reads h)
            kwargs = attention._call_kwargs(normed, *heads[:2])  # the layer's kwargs and its router's
        if target is None or attnx.get_attention(attention.kind).name == target:
            kwargs.update(extra)
        out = resolve_attention(attention.kind, causal=attention.causal)(query, key, value, **kwargs)
        outputs.append(out)
        x = block._add_mlp(x, normed, attention.output(out))
    return model.logits(x), outputs


def _check_span(image_span, length: int) -> tuple[int, int]:
    if not (isinstance(image_span, (tuple, list)) and len(image_span) == 2 and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in image_span)
            and 0 <= image_span[0] < image_span[1] < length):
        raise ValueError(f"image_span: expected (start, end) ints with 0 <= start < end < {length} (the sequence "
                         f"length; at least one text token after the image), got {image_span!r}")
    return int(image_span[0]), int(image_span[1])


def measure_vhd(model: LLM, token_ids: jax.Array, image_span, *, rows: Literal["last", "all"] = "last") -> jax.Array:
    """VHD [L, B, N]: per layer, sequence and query head, || o(with image) - o(image removed) || over the head's value
    axis at the last row (rows='last') or averaged over the text rows after the image (rows='all')."""
    if rows not in ("last", "all"):
        raise ValueError(f"measure_vhd.rows: expected 'last' or 'all', got {rows!r}")
    start, end = _check_span(image_span, token_ids.shape[1])
    without = jnp.concatenate([token_ids[:, :start], token_ids[:, end:]], axis=1)
    _, with_image = run_llm(model, token_ids)
    _, text_only = run_llm(model, without)
    scores = jnp.stack([head_ops.vhd_scores(a[:, end:], b[:, start:]) for a, b in zip(with_image, text_only)])
    return scores[:, :, -1] if rows == "last" else jnp.mean(scores, axis=2)  # [L, B, T', N] -> [L, B, N]


def vhr_plan(vhd: jax.Array, *, alpha: float = 2.0, top_k: int | None = None) -> dict[str, tuple]:
    """Per-layer VHR selections from measured VHD [L, B, N] (averaged over the batch): {'layer_heads': one tuple of
    head indices per layer (configs/attention/vhr.gin LAYER_HEADS), 'layer_attention': the matching
    `LLMConfig.layer_attention` entries}. top_k None: the paper's per-layer rule (vhr_layer_selection); an int: the
    top_k heads of each layer."""
    vhd = jnp.asarray(vhd, jnp.float32)
    if vhd.ndim != 3:
        raise ValueError(f"vhr_plan.vhd: expected [L, B, N] (measure_vhd), got shape {vhd.shape}")
    scale = np.asarray(head_ops.vhr_layer_scales(jnp.mean(vhd, axis=1), alpha=2.0, top_k=top_k))
    layer_heads = tuple(tuple(int(h) for h in np.flatnonzero(row > 1.0)) for row in scale)
    return {"layer_heads": layer_heads, "layer_attention": head_ops.vhr_layer_attention(layer_heads, alpha)}


def paint_token_masks(vit: ViT, images: jax.Array, *, image_start: int, length: int, ratio: float = 0.25,
                      first_layer: int = 0, late_layer: int = -2) -> tuple[jax.Array, jax.Array]:
    """(local, summary) bool [B, length]: PAINT's token sets from `vit`'s CLS attention (first and penultimate
    blocks by default, the code's choice; softmax blocks with a class token), placed at [image_start, image_start +
    V) of an LLM sequence of `length` tokens."""
    if vit.pooling != "cls" or vit.hierarchical:
        raise ValueError("paint_token_masks: the vision encoder needs a class token (pooling='cls', no stages): "
                         "PAINT reads the CLS row of its attention maps")
    maps = list(attention_maps(vit, images).values())  # block order: [B, heads, 1 + V, 1 + V] each
    try:
        first, late = maps[first_layer], maps[late_layer]
    except IndexError:
        raise ValueError(f"paint_token_masks: layers {first_layer}, {late_layer} outside the encoder's {len(maps)} "
                         f"blocks") from None
    local, summary = jax.vmap(lambda a, b: head_ops.paint_token_sets(a, b, ratio))(first[:, :, 0, 1:],
                                                                                    late[:, :, 0, 1:])
    place = jax.vmap(lambda m: head_ops.place_image_tokens(m, image_start, length))
    return place(local), place(summary)

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
(jinghan1he/VHR) is not available here and the paper's method section could not be read (only its abstract);
which rows the paper compares is read as "the current (last) token" (VHR re-selects per generated token), the
default `rows='last'`; `rows='all'` averages over every text row after the image. `vhr_plan` turns the measured VHD
into per-layer head selections (the paper's rule, above the layer median with surges above mean + std dropped:
`vhr_layer_selection`; or a fixed `top_k`) and the `layer_attention` entries that configs/attention/vhr.gin takes
as LAYER_HEADS: a static selection, what one gin line can hold. The paper's own schedule is `vhr_generate`: every
generated token re-selects, layer by layer, on its own VHD. Assumptions where the paper could not be checked: the
image-free pass is the plain model (not reinforced), run once per token; the pass with the image is reinforced
layer by layer, so layer l's VHD is measured after layers < l were reinforced; the scales act on the row producing
the next token only (earlier rows keep the scales of their own step, as a KV cache keeps them).

**PAINT** (Arif, Dip, Hussain, Zhang, Thomas, 2025, "Fixing Imbalanced Attention to Mitigate In-Context
Hallucination of Large Vision-Language Model", arXiv 2501.12206, §3; code hasanar1f/PAINT
modPAI/llava/model/multimodal_encoder/clip_encoder.py): the local tokens are the top 25% of the vision encoder's
first-layer CLS attention, the summary tokens the IQR outliers of its penultimate layer's
(`attnx.ops.multimodal.heads.paint_token_sets`). `paint_token_masks` reads both rows from a (tiny, softmax) `ViT`
with models/vit.py `attention_maps` and places them at the image span of the LLM sequence as bool [B, T] masks,
which `run_llm(..., extra_kwargs={'local_tokens': ..., 'summary_tokens': ...})` threads to the 'head_modulation'
layers (mode 'code'), one compile for any images; the model itself takes them as
`LLM(tokens, attention_inputs={...})`, `LLM.decode(..., attention_inputs=)` and
`models.sampling.generate(..., attention_inputs=)` (the layer's `RunTimeInputs` router hands them to the function,
which pads prompt-length masks to the key length). `measure_head_sensitivity` measures the per-head visual
sensitivity s_h of mode 'bias' offline (the spec's definition: see the comment above it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import attnx
from attnx.ops.multimodal import heads as head_ops
from models.layers.attention import Attention, resolve_attention
from models.layers.mixers.multimodal import residual_stream
from models.llm import LLM
from models.vit import ViT, attention_maps
from flax import nnx


HeadHook = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]


def run_llm(model: LLM, token_ids: jax.Array, positions: jax.Array | None = None, *,
            extra_kwargs: Mapping[str, Any] | None = None, extra_for: str | None = None,
            head_hook: HeadHook | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """(logits [B, T, vocab], per-layer head outputs [[B, T, N, V] per layer]) of `model` on token_ids [B, T].

    extra_kwargs: run-time arguments (arrays) added to the attention function's kwargs in every layer whose
    registered mechanism is `extra_for` (a registry name; None = every layer). head_hook(layer, query, key, out):
    sees the layer's rotated query/key heads and its head outputs [B, T, N, V] and returns the head outputs that go
    on to the output projection (e.g. VHR's per-token head scales); the returned list holds the outputs before it."""
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
        if head_hook is not None:
            out = head_hook(layer, query, key, out)
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


# ---- VHR during generation: heads re-selected for every generated token, layer by layer --------------------------

def _vhr_step_fn(model: LLM, tokens: jax.Array, text: jax.Array, cur: jax.Array, row_scales: jax.Array,
                 image_length: int, alpha: float, top_k: int | None):
    """One VHR step on fixed-length buffers (causal, so the rows after `cur` do not matter): the image-free pass
    once, then the pass with the image layer by layer, each layer's heads chosen on the current row's VHD (its head
    outputs after the earlier layers were reinforced) and scaled before the output projection. Returns (logits at
    row cur [B, vocab], row_scales with row cur set [L, B, T, N], vhd at row cur [L, B, N])."""
    _, text_only = run_llm(model, text)
    chosen, divergence = [], []

    def hook(layer, query, key, out):
        del query, key
        now = jnp.take(out, cur, axis=1)  # [B, N, V]: the row producing the next token
        without = jnp.take(text_only[layer], cur - image_length, axis=1)
        vhd = head_ops.vhd_scores(now, without)  # [B, N]
        chosen_heads = head_ops.vhr_layer_scales(vhd[None], alpha=2.0, top_k=top_k)[0] != 1.0
        scale = 1.0 + (alpha - 1.0) * chosen_heads.astype(jnp.float32)  # alpha traced: one compile for any alpha
        chosen.append(scale)
        divergence.append(vhd)
        scales = row_scales[layer].at[:, cur].set(scale)  # past rows keep the scales of their own step
        return head_ops.apply_head_scale(out, scales)

    logits, _ = run_llm(model, tokens, head_hook=hook)
    row_scales = row_scales.at[:, :, cur].set(jnp.stack(chosen))
    return jnp.take(logits, cur, axis=1), row_scales, jnp.stack(divergence)


@functools.partial(jax.jit, static_argnums=(0, 6, 8))
def _vhr_step(graphdef, state, tokens, text, cur, row_scales, image_length, alpha, top_k):
    return _vhr_step_fn(nnx.merge(graphdef, state), tokens, text, cur, row_scales, image_length, alpha, top_k)


def vhr_generate(model: LLM, prompt: jax.Array, image_span, max_new_tokens: int, *, alpha: float = 2.0,
                 top_k: int | None = None) -> dict[str, jax.Array]:
    """Greedy generation with VHR re-selecting heads for every generated token (paper §4): at each step the
    image-free pass (the prompt without its image span, the text after it moved up) gives each head's output
    without the image; then, layer by layer, the current token's VHD_{l,h} = || o_{l,h}(image) - o_{l,h}(no image) ||
    selects the layer's heads (`vhr_layer_selection`: above the layer median, surges above mean + std dropped; or
    the `top_k` largest), whose outputs are multiplied by alpha before the output projection, and the next layer's
    VHD is measured on the reinforced stream. The scales act on the row producing the next token (the last prompt
    row at the first step, then each generated token's row); earlier rows keep the scales of their own step, as
    their keys and values would stay in a KV cache. Every step recomputes the buffers (one compile; a tiny-model
    tool, not a serving loop).

    Returns {'tokens': [B, P + max_new_tokens], 'selected': bool [max_new_tokens, L, B, N] (the reinforced heads per
    step and layer), 'vhd': [max_new_tokens, L, B, N]}."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
        raise ValueError(f"vhr_generate.prompt: expected int token ids [B, P], got shape {prompt.shape}")
    start, end = _check_span(image_span, prompt.shape[1])
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"vhr_generate.max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if top_k is not None:
        head_ops.vhr_head_scale(jnp.zeros(model.blocks[0].attention.out_nhd.shape[0]), top_k)  # validates top_k
    batch, length = prompt.shape
    total = length + max_new_tokens
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :length].set(prompt)
    without = jnp.concatenate([prompt[:, :start], prompt[:, end:]], axis=1)
    text = jnp.zeros((batch, total - (end - start)), jnp.int32).at[:, :without.shape[1]].set(without)
    num_heads = model.blocks[0].attention.out_nhd.shape[0]
    row_scales = jnp.ones((len(model.blocks), batch, total, num_heads), jnp.float32)
    graphdef, state = nnx.split(model)
    selected, divergence = [], []
    for step in range(max_new_tokens):
        cur = length - 1 + step
        logits, row_scales, vhd = _vhr_step(graphdef, state, tokens, text, jnp.int32(cur), row_scales,
                                            end - start, jnp.float32(alpha), top_k)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens = tokens.at[:, cur + 1].set(token)
        text = text.at[:, cur + 1 - (end - start)].set(token)
        selected.append(row_scales[:, :, cur] != 1.0)  # (alpha 1 selects but scales nothing: reported as none)
        divergence.append(vhd)
    return {"tokens": tokens, "selected": jnp.stack(selected), "vhd": jnp.stack(divergence)}


# ---- PAINT's per-head visual sensitivity s_h ------------------------------------------------------------------------
# The paper measures each head's visual sensitivity offline and boosts the selected tokens by log(1 + alpha s_h);
# its method section could not be read here and the official code (hasanar1f/PAINT) has no per-head sensitivity
# (it modulates every head alike). Implemented is the spec's reading: s_{l,h} is the attention mass head h of layer
# l puts on the image tokens from the text rows after the image, averaged over those rows and the calibration
# sequences, under the model's plain causal softmax (scale 1/sqrt(head dim)), so s_h lies in [0, 1].

@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _visual_mass(graphdef, state, token_ids, start: int, end: int) -> jax.Array:
    """[L, N]: per layer and query head, the causal-softmax mass on keys [start, end) from the rows after `end`."""
    masses = []

    def hook(layer, query, key, out):
        del layer
        key = jnp.repeat(key, query.shape[2] // key.shape[2], axis=2)  # GQA: each query head's key head
        logits = jnp.einsum("btnh,bsnh->bnts", query.astype(jnp.float32), key.astype(jnp.float32),
                            precision="highest") * query.shape[-1] ** -0.5
        T = logits.shape[-1]
        probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf), axis=-1)
        masses.append(jnp.mean(jnp.sum(probs[:, :, end:, start:end], axis=-1), axis=(0, 2)))
        return out

    run_llm(nnx.merge(graphdef, state), token_ids, head_hook=hook)
    return jnp.stack(masses)


def measure_head_sensitivity(model: LLM, token_ids: jax.Array, image_span, *, tokens=None,
                             alpha: float = 1.0) -> dict[str, Any]:
    """Per-head visual sensitivity of `model` on calibration sequences token_ids [B, T] with the image at
    image_span (call outside jit: the result is static configuration). Returns {'layer_head_scores': [L, N] float32,
    'heads': all query heads, 'head_scores': the scores averaged over layers, one per head
    (configs/attention/head_modulation.gin HEADS / HEAD_SCORES), 'layer_attention': per-layer 'head_modulation'
    entries (LLMConfig.layer_attention) with each layer's own scores over `tokens` (default: the image span)}."""
    start, end = _check_span(image_span, token_ids.shape[1])
    graphdef, state = nnx.split(model)
    scores = _visual_mass(graphdef, state, jnp.asarray(token_ids), start, end)
    rows = np.asarray(scores, np.float64)
    heads = tuple(range(rows.shape[1]))
    tokens = tuple(range(start, end)) if tokens is None else tuple(int(t) for t in tokens)
    return {"layer_head_scores": scores,
            "heads": heads,
            "head_scores": tuple(float(x) for x in rows.mean(0)),
            "layer_attention": tuple(("head_modulation", {"tokens": tokens, "heads": heads,
                                                          "head_scores": tuple(float(x) for x in row),
                                                          "alpha": float(alpha)}) for row in rows)}


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

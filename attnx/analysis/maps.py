"""Looking inside a model: pure functions over materialised attention maps and per-head measurements
(ARCHITECTURE §2 `analysis/`; spec README "Tier 3 — tools": `retrieval_score`, `rollout`, `head_ablation`, `vhd`).

- **Attention rollout** (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers", ACL 2020, §3): with A_l
  the head-averaged map of layer l, Â_l = 0.5 I + 0.5 A_l (the residual connection), rollout = Â_L ... Â_1; rows
  stay normalised. One implementation serves the project: DCAL's (`attnx.ops.dcal.attention_rollout`, spec
  vision_mechanisms.md §8), re-exported here; `rollout_to_grid` lays the class token's row out on the patch grid.
- **Vision-aware head divergence** (He et al., 2024, "Cracking the Code of Hallucination in LVLMs with Vision-aware
  Head Divergence", arXiv 2412.13949 §3; spec diffusion_multimodal_bench.md §7): VHD_{l,h} = ||o_{l,h}(image, text)
  - o_{l,h}(text)||_2 over the head's value axis, per token (`attnx.ops.multimodal.vhd_scores`); `head_divergence`
  averages it over the tokens, one score per head.
- **Head ablation** (circuit-style: zero one head's output before the output projection and measure the loss):
  `ablation_deltas` / `rank_heads` turn per-head ablated losses into deltas and a ranked table.
- **Retrieval heads** (Wu, Wang, Xiao, Peng, Fu, 2024, "Retrieval Head Mechanistically Explains Long-Context
  Factuality", arXiv 2404.15574 §2; spec llm_mechanisms.md §9): while the model decodes token w after a prompt holding
  a needle at positions [s, e), head (l, h) gains 1/(e - s) at each step where the argmax j* of its last query row
  lies in [s, e) and prompt[j*] == w (the head copies the needle). A head that copies the whole needle scores 1.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from attnx.ops.dcal.dcal import attention_rollout
from attnx.ops.multimodal.heads import vhd_scores

__all__ = ["attention_rollout", "rollout_to_grid", "head_divergence", "ablation_deltas", "rank_heads",
           "retrieval_score_step", "retrieval_scores", "retrieval_heads"]


def rollout_to_grid(rollout: jax.Array, grid: tuple[int, int], *, num_prefix: int = 1) -> jax.Array:
    """The first (class) token's rollout row over the patches, [*B, h, w]: rollout [*B, T, T] with T = num_prefix +
    h * w (row-major patches after `num_prefix` class tokens; num_prefix=0 averages the rows of a model without one)."""
    rollout = jnp.asarray(rollout)
    h, w = grid
    if rollout.ndim < 2 or rollout.shape[-1] != num_prefix + h * w:
        raise ValueError(f"rollout_to_grid.rollout: expected [*B, T, T] with T = num_prefix + h*w = "
                         f"{num_prefix + h * w}, got {rollout.shape}")
    row = rollout[..., 0, :] if num_prefix else jnp.mean(rollout, axis=-2)
    return row[..., num_prefix:].reshape(*row.shape[:-1], h, w)


def head_divergence(out_with: jax.Array, out_without: jax.Array) -> jax.Array:
    """VHD per head, [..., N]: head outputs [..., T, N, V] with and without the image (or any context part) ->
    the L2 distance over V (VHD, arXiv 2412.13949 §3) averaged over the T tokens scored."""
    out_with, out_without = jnp.asarray(out_with), jnp.asarray(out_without)
    if out_with.ndim < 3:
        raise ValueError(f"head_divergence.out_with: expected head outputs [..., T, N, V], got {out_with.shape}")
    return jnp.mean(vhd_scores(out_with, out_without), axis=-2)


def ablation_deltas(base_loss: float, ablated_losses) -> np.ndarray:
    """Loss change per ablated head, [L, N] float64: ablated_losses[l][h] (the loss with head h of layer l zeroed)
    minus the intact model's `base_loss`; positive means the head helps."""
    ablated = np.asarray(ablated_losses, np.float64)
    if ablated.ndim != 2:
        raise ValueError(f"ablation_deltas.ablated_losses: expected [L, N] (layer, head), got shape {ablated.shape}")
    if not np.isfinite(base_loss) or not np.all(np.isfinite(ablated)):
        raise ValueError(f"ablation_deltas: losses must be finite, got base_loss={base_loss!r} and "
                         f"{int(np.sum(~np.isfinite(ablated)))} non-finite ablated losses")
    return ablated - float(base_loss)


def rank_heads(scores, *, layer_names=None, descending: bool = True) -> list[dict[str, Any]]:
    """A table of heads ranked by score: scores [L, N] (or {(layer, head): score}) -> [{"rank", "layer", "head",
    "score"} ...], highest first (ties: lower layer, then lower head, first). `layer_names` [L] labels the layers
    (e.g. module paths) in an extra "name" column."""
    if isinstance(scores, Mapping):
        items = [(int(l), int(h), float(v)) for (l, h), v in scores.items()]
    else:
        array = np.asarray(scores, np.float64)
        if array.ndim != 2:
            raise ValueError(f"rank_heads.scores: expected [L, N] (layer, head) or a {{(layer, head): score}} dict, "
                             f"got shape {array.shape}")
        items = [(l, h, float(array[l, h])) for l in range(array.shape[0]) for h in range(array.shape[1])]
    if layer_names is not None and len(layer_names) <= max((l for l, _, _ in items), default=-1):
        raise ValueError(f"rank_heads.layer_names: expected a name for each of the layers, got {len(layer_names)}")
    sign = -1.0 if descending else 1.0
    items.sort(key=lambda item: (sign * item[2], item[0], item[1]))
    table = []
    for rank, (l, h, v) in enumerate(items, start=1):
        row = {"rank": rank, "layer": l, "head": h, "score": v}
        if layer_names is not None:
            row["name"] = str(layer_names[l])
        table.append(row)
    return table


def _check_span(span, length: int) -> tuple[int, int]:
    if (not isinstance(span, (tuple, list)) or len(span) != 2
            or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in span)
            or not 0 <= span[0] < span[1] <= length):
        raise ValueError(f"retrieval_score.span: expected (start, end) ints with 0 <= start < end <= {length} (the "
                         f"needle's prompt positions), got {span!r}")
    return int(span[0]), int(span[1])


def retrieval_score_step(last_row_attn: jax.Array, span, prompt_ids: jax.Array, token) -> jax.Array:
    """One decoding step's retrieval-score increments, [L, N] float32 (spec llm_mechanisms.md §9 (d)).

    last_row_attn [L, N, S]: each head's attention row of the query that produced `token` (S >= P keys: the prompt,
    then any generated tokens); span (s, e): the needle's positions in the prompt; prompt_ids [P]; token: the
    generated token id. Head (l, h) gains 1/(e - s) when j* = argmax_j last_row_attn[l, h, j] is in [s, e) and
    prompt_ids[j*] == token.
    """
    attn = jnp.asarray(last_row_attn)
    prompt_ids = jnp.asarray(prompt_ids)
    if attn.ndim != 3:
        raise ValueError(f"retrieval_score_step.last_row_attn: expected [L, N, S], got shape {attn.shape}")
    if prompt_ids.ndim != 1 or prompt_ids.shape[0] > attn.shape[-1]:
        raise ValueError(f"retrieval_score_step.prompt_ids: expected [P] with P <= S = {attn.shape[-1]}, got shape "
                         f"{prompt_ids.shape}")
    start, end = _check_span(span, prompt_ids.shape[0])
    best = jnp.argmax(attn, axis=-1)  # [L, N]
    copied = prompt_ids[jnp.clip(best, 0, prompt_ids.shape[0] - 1)] == jnp.asarray(token, prompt_ids.dtype)
    hit = (best >= start) & (best < end) & copied
    return hit.astype(jnp.float32) / (end - start)


def retrieval_scores(step_attn: jax.Array, span, prompt_ids: jax.Array, tokens: jax.Array) -> jax.Array:
    """A trial's retrieval scores [L, N]: the increments of `retrieval_score_step` summed over decoding steps.
    step_attn [steps, L, N, S] (row of the query that produced tokens[i]), tokens [steps]."""
    step_attn, tokens = jnp.asarray(step_attn), jnp.asarray(tokens)
    if step_attn.ndim != 4 or tokens.shape != step_attn.shape[:1]:
        raise ValueError(f"retrieval_scores: expected step_attn [steps, L, N, S] and tokens [steps], got "
                         f"{step_attn.shape} and {tokens.shape}")
    per_step = jax.vmap(lambda a, t: retrieval_score_step(a, span, prompt_ids, t))(step_attn, tokens)
    return jnp.sum(per_step, axis=0)


def retrieval_heads(scores, threshold: float = 0.1) -> list[tuple[int, int]]:
    """(layer, head) of the heads whose retrieval score exceeds `threshold` (the paper's 0.1; spec §9 (b)),
    highest first."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"retrieval_heads.threshold: expected a number in [0, 1], got {threshold!r}")
    return [(row["layer"], row["head"]) for row in rank_heads(scores) if row["score"] > threshold]

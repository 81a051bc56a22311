"""SeerAttention gate distillation with the base model frozen (Gao et al., 2024, arXiv 2410.13276, §3.2; official
`distillation_prefill.py`, `scripts/run_distillation_prefill.sh` and the training branch of
`LlamaSeerAttention.forward` in microsoft/SeerAttention).

Only the gates train. Each layer runs its *dense* causal attention (the code's `attention_distill_forward`: the
hidden states that reach later layers are the base model's own), and the gate logits of its pre-RoPE queries/keys
are pulled towards the block max-pool of that layer's post-RoPE attention map (`block_maxpool_gt_chunked`) by
`seer_gate_loss` (KL on query-block rows >= nb // 4). The per-layer losses are summed and scaled by `loss_scale` = 10
(the script's `gate_loss_scale`). Optimiser as the script: AdamW, lr 1e-3, 20 warmup steps then cosine (to 0, the
Hugging Face cosine), weight decay 0, gradient clipping at norm 1 (the Trainer's default).

    config = dataclasses.replace(base.config, attention='seer', attention_kwargs={'block': 16, 'hidden': 32})
    model = LLM(config, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(base_model))           # the frozen base: the same tree without the gates
    losses = distill_gates(model, batches, steps=500)  # updates the gate parameters in place
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnx.api import dot_product_attention
from attnx.mask import Mask
from attnx.ops.seer.gate import seer_gate_loss
from attnx.ops.seer.ground_truth import block_maxpool_gt_chunked
from models.layers.mixers.seer import SeerGate
from train.optim import OptimizerConfig, make_optimizer

# The gate parameters: every Param under a layer's `router`; distill_gates refuses models whose routers are not all
# SeerGates (another mechanism's router in a hybrid model would otherwise be handed to the optimiser).
GATE_PARAMS = nnx.All(nnx.Param, nnx.PathContains("router"))

DISTILL_OPTIMIZER = OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=20, final_learning_rate_fraction=0.0,
                                    beta1=0.9, beta2=0.999, weight_decay=0.0, clip_global_norm=1.0)


# attention_kwargs of a seer layer that configure the gate and the mask (not the dense attention distilled from).
_SEER_OPTIONS = {"block", "hidden", "q_pools", "k_pools", "rope_theta", "threshold", "nz_ratio", "dense_last",
                 "implementation"}


def _seer_gate(block) -> SeerGate | None:
    router = getattr(getattr(block, "attention", None), "router", None)
    return router if isinstance(router, SeerGate) else None


def _attention_scale(attention) -> float | None:
    """The layer's softmax scale option, if any; options that change the attention map in ways the ground truth
    does not model (soft caps, sinks, score mods) are refused rather than silently distilled from the wrong map."""
    options = dict(attention.kind_kwargs)
    other = sorted(set(options) - _SEER_OPTIONS - {"scale"})
    if other:
        raise NotImplementedError(f"distill_gates: the ground truth is the block max-pool of plain softmax attention; "
                                  f"the seer layer's attention_kwargs {other} change that map")
    return options.get("scale")


def gate_losses(model, token_ids: jax.Array, implementation=None) -> tuple[jax.Array, jax.Array]:
    """(features [B, T, D], per-layer gate losses [L]) of a forward pass in which every seer layer attends densely
    (through attnx's `implementation`) and scores its gate against its own attention map. Layers without a SeerGate
    run as they are. The residual stream carries no gradient: only the gate logits depend on trained parameters."""
    x = model.embed(token_ids)
    positions = jnp.arange(token_ids.shape[-1])
    losses = []
    for block in model.blocks:
        gate = _seer_gate(block)
        if gate is None:
            x = block(x, positions)
            continue
        attention = block.attention
        scale = _attention_scale(attention)
        query_pre, key_pre, value = attention.project_heads(block.attention_norm(x))
        query, key, value = attention.rotate(query_pre, key_pre, value, positions)
        ground_truth = block_maxpool_gt_chunked(jax.lax.stop_gradient(query), jax.lax.stop_gradient(key),
                                                block=gate.block, causal=True, scale=scale)
        losses.append(seer_gate_loss(gate.logits(query_pre, key_pre, causal=True), ground_truth))
        mixed = dot_product_attention(query, key, value, mask=Mask(causal=True), scale=scale,
                                      implementation=implementation)
        x = x + attention.output(mixed)
        if block.mlp is not None:
            x = x + block.mlp(block.mlp_norm(x))
        x = jax.lax.stop_gradient(x)
    if not losses:
        raise ValueError("distill_gates: the model has no SeerGate; build it with attention='seer'")
    return x, jnp.stack(losses)


def distillation_loss(model, token_ids: jax.Array, loss_scale: float = 10.0, implementation=None) -> jax.Array:
    """loss_scale x the sum over seer layers of the gate KL (the code's `gate_loss_scale * mask_loss`)."""
    return loss_scale * jnp.sum(gate_losses(model, token_ids, implementation)[1])


def distill_gates(model, batches: Iterable[jax.Array], *, steps: int, optimizer: OptimizerConfig = DISTILL_OPTIMIZER,
                  loss_scale: float = 10.0, implementation=None) -> list[float]:
    """Trains the SeerGate parameters of `model` in place on `steps` batches of token ids [B, T]; every other
    parameter stays frozen. `implementation`: attnx's, for the layers' dense attention. Returns the loss of each
    step (before its update)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"distill_gates.steps: expected an int >= 1, got {steps!r}")
    others = sorted({type(m).__name__ for _, m in nnx.iter_graph(model)
                     if isinstance(getattr(m, "router", None), nnx.Module) and not isinstance(m.router, SeerGate)})
    if others:
        raise ValueError(f"distill_gates: layers with routers other than SeerGate ({others}) would train too")
    graphdef, gates, frozen = nnx.split(model, GATE_PARAMS, ...)
    if not jax.tree.leaves(gates):
        raise ValueError("distill_gates: the model has no gate parameters; build it with attention='seer'")
    tx = make_optimizer(optimizer, steps)
    opt_state = tx.init(gates)

    @jax.jit
    def step(gates, opt_state, frozen, token_ids):
        loss, grads = jax.value_and_grad(
            lambda g: distillation_loss(nnx.merge(graphdef, g, frozen), token_ids, loss_scale, implementation))(gates)
        updates, opt_state = tx.update(grads, opt_state, gates)
        return optax.apply_updates(gates, updates), opt_state, loss

    losses = []
    batches = iter(batches)
    for _ in range(steps):
        gates, opt_state, loss = step(gates, opt_state, frozen, jnp.asarray(next(batches)))
        losses.append(float(loss))
    nnx.update(model, gates)
    return losses
